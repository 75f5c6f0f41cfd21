"""ppo_lateral.py: artifacts, GAE, resume, determinism, compile, argument checks, signals."""

import contextlib
import dataclasses
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo_lateral as pl
import tinyphysics_env as te

ROOT = Path(__file__).resolve().parent.parent


def _tiny_args(runs_dir: Path, model_path, real_data, **overrides) -> pl.Args:
    """A few-hundred-step run on synthetic segments, evaluated on 2 real ones."""
    base = dict(sim_model_path=str(model_path), eval_data_path=str(real_data), synthetic_train=16,
                eval_segments=2, num_envs=4, samples_per_segment=2, num_steps=20, total_timesteps=320,
                num_minibatches=2, update_epochs=2, bc_segments=4, bc_epochs=1, eval_every=160,
                checkpoint_every=160, runs_dir=str(runs_dir), progress=False)
    return pl.Args(**{**base, **overrides})


@pytest.fixture
def tiny(tmp_path, model_path, real_data):
    return functools.partial(_tiny_args, tmp_path / "runs", model_path, real_data)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, model_path, real_data) -> Path:
    """The tiny run with nothing overridden, trained once for the tests that only read it."""
    return pl.train(_tiny_args(tmp_path_factory.mktemp("default") / "runs", model_path, real_data))


def _stats(run_dir: Path) -> dict:
    with np.load(run_dir / "training_stats.npz") as f:
        return {k: f[k] for k in f.files}


def test_tiny_run_writes_every_artifact(default_run, model_path, real_data):
    run_dir = default_run
    for name in ("final_model.pt", "best_model.pt", "training_stats.npz"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint_160.pt", "checkpoint_320.pt"]
    assert not list(run_dir.rglob("*.part"))

    stats = _stats(run_dir)
    assert set(stats) == set(pl.STAT_KEYS)
    np.testing.assert_array_equal(stats["global_step"], [0, 80, 160, 240, 320])  # row 0: before any update
    assert np.isfinite(stats["eval_total_cost"][[0, 2, 4]]).all() and np.isnan(stats["eval_total_cost"][[1, 3]]).all()
    assert np.all(stats["sps"][1:] > 0) and np.isfinite(stats["policy_loss"][1:]).all()

    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("charts/SPS", "charts/learning_rate", "losses/policy_loss", "losses/value_loss", "losses/entropy",
                "losses/approx_kl", "losses/clipfrac", "losses/explained_variance", "eval/total_cost", "charts/gamma",
                "eval/lataccel_cost", "eval/jerk_cost", "bc/actor_mse"):
        assert tag in scalars, tag
    assert any("hyperparameters" in t for t in events.Tags()["tensors"])

    # The checkpoint describes its own policy: rebuilt without any Args, it scores as training said.
    agent, checkpoint = pl.load_agent(run_dir / "final_model.pt")
    assert checkpoint["global_step"] == 320 and "optimizer" not in checkpoint
    model = te.TinyPhysicsModel(model_path)
    held_out = te.load_segments(real_data).subset([0, 1])
    assert pl.evaluate(agent, model, held_out)["total_cost"].mean() == pytest.approx(stats["eval_total_cost"][-1],
                                                                                     rel=1e-12)


def test_episodic_costs_are_logged_when_episodes_end(tiny):
    stats = _stats(pl.train(tiny(num_steps=100, total_timesteps=1600, eval_every=10**9, checkpoint_every=10**9,
                                      bc_segments=0)))
    ended = np.isfinite(stats["episodic_total_cost"])
    np.testing.assert_array_equal(stats["global_step"][ended], [1600])  # 400 steps per episode, 4 envs
    assert stats["episodic_total_cost"][ended][0] > 0


def test_gae_by_hand():
    """2 envs, 3 steps, gamma 0.9, lambda 0.8. Env 0: its episode ends after step 0 (dones[1] = 1) and the
    rollout is cut mid-episode (bootstrapped). Env 1: its episode ends after the last step (next_done = 1)."""
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.5], [2.0, 0.0], [3.0, 1.0]])
    values = torch.tensor([[0.5, 1.0], [1.0, 2.0], [1.5, 0.5]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    next_value, next_done = torch.tensor([4.0, 9.0]), torch.tensor([0.0, 1.0])
    advantages, returns = pl.compute_gae(rewards, values, dones, next_value, next_done, gamma, lam)

    # env 0: step 2 bootstraps from next_value; step 0 stops at the episode end.
    d2 = 3.0 + gamma * 4.0 - 1.5
    d1 = 2.0 + gamma * 1.5 - 1.0
    d0 = 1.0 - 0.5
    a0 = [d0, d1 + gamma * lam * d2, d2]
    # env 1: nothing is bootstrapped past the terminal step.
    e2 = 1.0 - 0.5
    e1 = 0.0 + gamma * 0.5 - 2.0
    e0 = 0.5 + gamma * 2.0 - 1.0
    a1 = [e0 + gamma * lam * (e1 + gamma * lam * e2), e1 + gamma * lam * e2, e2]
    np.testing.assert_allclose(advantages.numpy(), np.array([a0, a1]).T, rtol=1e-6)
    np.testing.assert_allclose(returns.numpy(), advantages.numpy() + values.numpy(), rtol=1e-6)


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=False)["agent"]


def _same_stats(a: dict, b: dict) -> None:
    for key in pl.STAT_KEYS:
        if key != "sps":  # wall-clock, the only thing allowed to differ
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_same_seed_gives_identical_runs(default_run, tiny):
    again = pl.train(tiny(exp_name="again"))
    _same_stats(_stats(default_run), _stats(again))
    for k, v in _weights(default_run / "final_model.pt").items():
        assert torch.equal(v, _weights(again / "final_model.pt")[k]), k
    different = pl.train(tiny(exp_name="c", seed=2, eval_every=10**9))
    assert not np.array_equal(_stats(default_run)["value_loss"][1:], _stats(different)["value_loss"][1:])


def test_resume_matches_the_uninterrupted_run(default_run, tmp_path):
    """Checkpoints fall mid-episode (400-step episodes, 20-step rollouts), so the env state is restored too.
    The run folder is moved first, and what the rest of the run writes is removed from it."""
    moved = tmp_path / default_run.name
    shutil.copytree(default_run, moved)
    for later in ("final_model.pt", "training_stats.npz", "checkpoints/checkpoint_320.pt"):
        (moved / later).unlink()
    middle = moved / "checkpoints" / "checkpoint_160.pt"
    state = torch.load(middle, weights_only=False)
    assert state["iteration"] == 2 and state["env"]["t"] not in (te.CONTROL_START_IDX, te.COST_END_IDX)
    resumed = pl.train(pl.Args(resume=str(middle)))  # its saved Args are used, in the folder that holds it
    assert resumed == moved
    _same_stats(_stats(default_run), _stats(resumed))
    for k, v in _weights(default_run / "final_model.pt").items():
        assert torch.equal(v, _weights(resumed / "final_model.pt")[k]), k


def test_extending_a_finished_run_is_the_longer_run(tiny):
    """--extend-to: a finished 240-step run, continued from the checkpoint its last iteration wrote, trains the
    480-step run's weights bit for bit (the defaults' inverse schedule does not depend on the budget). Its
    records are the longer run's plus the shorter run's final evaluation at 240, which is not one of the
    longer run's evaluation points (every 160 steps)."""
    shorter = pl.train(tiny(total_timesteps=240, exp_name="shorter"))
    extended = pl.train(pl.Args(resume=str(shorter / "checkpoints" / "checkpoint_240.pt"), extend_to=480))
    longer = pl.train(tiny(total_timesteps=480, exp_name="longer"))
    assert extended == shorter
    assert torch.load(extended / "checkpoints" / "checkpoint_480.pt", weights_only=False)["args"][
        "total_timesteps"] == 480
    for k, v in _weights(longer / "final_model.pt").items():
        assert torch.equal(v, _weights(extended / "final_model.pt")[k]), k
    a, b = _stats(longer), _stats(extended)
    at_240 = list(b["global_step"]).index(240)
    assert np.isnan(a["eval_total_cost"][at_240]) and np.isfinite(b["eval_total_cost"][at_240])
    b["eval_total_cost"][at_240] = np.nan
    _same_stats(a, b)


@pytest.mark.parametrize("saved, extend_to, problem", [
    (dict(lr_schedule="linear"), 480, "--lr-schedule linear schedule is laid out over its budget"),
    (dict(final_logstd=-5.0), 480, "--final-logstd schedule is laid out over its budget"),
    ({}, 320, "the checkpoint is at step 320; extend to at least one more batch"),
])
def test_extend_to_refuses_what_would_not_be_the_longer_run(default_run, saved, extend_to, problem):
    checkpoint = torch.load(default_run / "checkpoints" / "checkpoint_320.pt", weights_only=False)
    checkpoint["args"].update(saved)
    with pytest.raises(te.TinyPhysicsError, match=re.escape(problem)):
        pl.extended_budget(checkpoint, extend_to)


def test_extend_to_needs_a_run_to_continue(tiny):
    with pytest.raises(te.TinyPhysicsError, match="--extend-to continues a run: add --resume"):
        pl.train(tiny(extend_to=640))


def test_numpy_policy_mirrors_the_torch_agent():
    """numpy_policy (official scoring, export) and the torch agent (training) map observations to the same steer."""
    obs = np.random.default_rng(0).normal(0, 1, (50, te.OBS_DIM)).astype(np.float32)
    obs[:, te.obs_slices()["v_ego"]] += 20.0
    for mode, dist, curvature in [("delta", "gaussian", False), ("absolute", "gaussian", False),
                                  ("residual", "gaussian", False), ("residual", "tanh", False),
                                  ("delta", "tanh", False), ("residual", "gaussian", True)]:
        agent = pl.Agent(te.OBS_DIM, 16, mode, 0.25, policy_dist=dist, curvature_inputs=curvature)
        torch.nn.init.normal_(agent.actor_mean[0].weight, std=0.5)  # the curvature inputs' weights too
        torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.5)  # a policy whose actions are not all ~0
        x = torch.as_tensor(obs)
        with torch.no_grad():
            expected = agent.to_steer(x, agent.actor_mean(agent.inputs(x))).double().numpy()
        steer = pl.numpy_policy(agent.numpy_params(), obs)
        np.testing.assert_allclose(steer, expected, atol=1e-5)  # torch runs in float32, numpy_policy in float64
        assert np.ptp(steer) > 0.1


def _cli(tmp_path, *flags, **kwargs):
    env = {**os.environ, "TINYPHYSICS_CACHE": os.environ["TINYPHYSICS_CACHE"]}
    return subprocess.run([sys.executable, str(ROOT / "ppo_lateral.py"), *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("flags, message", [
    (["--num-envs", "0"], "--num-envs 0: need at least 1"),
    (["--num-minibatches", "3"], "does not divide the batch"),
    (["--num-envs", "64"], "more than the 16 training segments"),
    (["--total-timesteps", "10"], "less than one batch"),
    (["--sim-backend", "torch", "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
    (["--sim-backend", "onnx", "--sim-precision", "bf16"], "apply to --sim-backend torch only"),
    (["--samples-per-segment", "3"], "--samples-per-segment 3 must divide the 4 environments"),
    (["--samples-per-segment", "1"],
     "leaves no rollouts to compare: add --no-segment-baseline --value-baseline --no-common-noise "
     "--no-antithetic-noise, or use K >= 2"),
    (["--no-segment-baseline"], "leaves the advantage without a baseline; add --value-baseline"),
    (["--residual-scale", "0"], "--residual-scale 0.0: must be positive"),
    (["--late-gamma", "1.5"], "--late-gamma 1.5: each must be in (0, 1]"),
    (["--late-gamma", "0.95"], "--late-gamma 0.95 --late-gamma-from 1000000 4000000: give one step for each"),
    (["--late-gamma", "0.95", "0.98", "--late-gamma-from", "5", "5"], "--late-gamma-from 5 5: the steps must be "
                                                                      "increasing"),
    (["--samples-per-segment", "1", "--no-segment-baseline", "--no-common-noise", "--antithetic-noise"],
     "must be even"),
    (["--innovation-cv", "--no-segment-baseline", "--value-baseline"],
     "--innovation-cv fits its weights on each segment's centred returns: it needs --segment-baseline"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, model_path, real_data, flags, message):
    base = ["--sim-model-path", str(model_path), "--eval-data-path", str(real_data), "--synthetic-train", "16",
            "--num-envs", "4", "--samples-per-segment", "2", "--num-steps", "20", "--no-progress"]
    result = _cli(tmp_path, *base, *flags)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_no_progress_silences_the_segment_reader(real_data, capsys):
    """--no-progress reaches the CSV reader too (its bar shows from 200 files), so a run's stderr holds
    only what went wrong: the recipes benchmark once reported a failed run as a progress bar."""
    train, held_out = pl.load_splits(pl.Args(synthetic_train=200, eval_data_path=str(real_data), progress=False))
    assert len(train) == 200 and len(held_out) == 10
    assert "reading segments" not in capsys.readouterr().err


def test_missing_model_is_a_one_line_error(tmp_path, real_data):
    result = _cli(tmp_path, "--sim-model-path", "/nope.onnx", "--data-path", str(real_data))
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --sim-model-path=/nope.onnx: no such file; point it at tinyphysics.onnx")


def test_sigterm_writes_a_checkpoint_that_resumes(tmp_path, model_path, real_data):
    flags = ["--sim-model-path", str(model_path), "--eval-data-path", str(real_data), "--synthetic-train", "16",
             "--eval-segments", "1", "--num-envs", "4", "--samples-per-segment", "2", "--num-steps", "20",
             "--total-timesteps", "40000", "--bc-segments", "0", "--num-minibatches", "2", "--eval-every", "100000",
             "--no-progress"]
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, str(ROOT / "ppo_lateral.py"), *flags], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "runs").glob("*/training_stats.npz")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    checkpoints = list((tmp_path / "runs").glob("*/checkpoints/*.pt"))
    assert len(checkpoints) == 1 and "resume with --resume" in stderr
    state = torch.load(checkpoints[0], weights_only=False)
    assert 0 < state["global_step"] < 40000
    assert not list((tmp_path / "runs").rglob("*.part"))


def test_cli_trains_with_the_compiled_torch_simulator(tmp_path, model_path, real_data):
    """--compile on CPU: the torch simulator, the policy step and the loss all compiled, end to end. The
    torch simulator's evaluations are official-exact, so ONNX Runtime scores the final policy the same."""
    result = _cli(tmp_path, "--sim-model-path", str(model_path), "--eval-data-path", str(real_data),
                  "--synthetic-train", "16", "--eval-segments", "1", "--num-envs", "4", "--samples-per-segment", "2",
                  "--num-steps", "20", "--total-timesteps", "80", "--num-minibatches", "2", "--bc-segments", "0",
                  "--no-progress", "--sim-backend", "torch", "--compile", "--curvature-inputs")
    assert result.returncode == 0, result.stderr
    run_dir = Path(tmp_path / result.stdout.strip().splitlines()[-1])
    assert torch.load(run_dir / "final_model.pt", weights_only=False)["args"]["sim_backend"] == "torch"
    stats = _stats(run_dir)  # the compiled policy step and loss (the same code as with ONNX Runtime) learned
    assert np.isfinite(stats["policy_loss"][1:]).all()
    agent, _ = pl.load_agent(run_dir / "final_model.pt")
    assert agent.config()["curvature_inputs"] and agent.actor_mean[0].in_features == te.OBS_DIM + 2 + te.FUTURE_LEN
    held_out = te.load_segments(real_data).subset([0])
    onnx_cost = pl.evaluate(agent, te.TinyPhysicsModel(model_path), held_out)["total_cost"].mean()
    assert onnx_cost == pytest.approx(stats["eval_total_cost"][-1], rel=1e-6)


@pytest.mark.parametrize("teacher", ["pid", "pid_ff"])
def test_batched_teacher_drives_like_the_official_interface(model, real_segments, teacher):
    """The warm start's demonstrations come from one controller instance driving the whole batch with
    arrays; with the official random streams its costs equal one instance per segment called with lists."""
    sim = te.TinyPhysicsSim(model)
    obs, steer, returns = pl.teacher_demonstrations(sim, real_segments, teacher, gamma=0.9, reward_scale=0.1)
    assert obs.shape == (len(real_segments) * te.COST_STEPS, te.OBS_DIM) and steer.shape == returns.shape
    batched = sim.costs()["total_cost"]
    official = te.rollout_controllers(te.TinyPhysicsSim(model), real_segments, te.BUILTIN_CONTROLLERS[teacher])
    np.testing.assert_array_equal(batched, official["total_cost"])


def test_feedforward_teacher_beats_pid_on_synthetic_segments(model, synthetic_data):
    segments = te.load_segments(synthetic_data, progress=False).subset(np.arange(12))  # 12 keep CI quick
    pid, ff = (te.rollout_controllers(te.TinyPhysicsSim(model), segments, c)["total_cost"].mean()
               for c in (te.PIDController, te.PIDFeedforwardController))
    assert ff < 0.6 * pid  # on these 12: 0.44


def test_delta_mode_clone_of_the_teacher_trains(tiny):
    """Outside residual mode the warm start clones the teacher's steer, then PPO trains the clone."""
    run_dir = pl.train(tiny(action_mode="delta", total_timesteps=160))
    stats = _stats(run_dir)
    assert np.isfinite(stats["eval_total_cost"]).sum() == 2 and np.isfinite(stats["policy_loss"][1:]).all()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert np.isfinite(events.Scalars("bc/actor_mse")[0].value)


# --- Learning past the teacher: residual policy, per-segment baseline, reward normalisation -------------
@pytest.mark.parametrize("teacher, curvature", [("pid", False), ("pid_ff", False), ("pid_ff", True)])
def test_residual_policy_at_step_0_is_the_teacher(model, real_segments, teacher, curvature):
    """The actor's output starts at exactly zero and the teacher is recomputed from the float64 observation
    with the controller's own arithmetic, so the per-segment official costs are the teacher's to the bit."""
    agent = pl.Agent(te.OBS_DIM, 16, "residual", 0.25, teacher=teacher, curvature_inputs=curvature)
    policy = pl.evaluate(agent, model, real_segments)
    official = te.rollout_controllers(te.TinyPhysicsSim(model), real_segments, te.BUILTIN_CONTROLLERS[teacher])
    np.testing.assert_array_equal(policy["total_cost"], official["total_cost"])
    # From float32 observations (what the network is trained on) the teacher is close, not exact.
    sim = te.TinyPhysicsSim(model)
    sim.reset(real_segments)
    sim.warm_up()
    for _ in range(50):
        sim.step(pl.teacher_steer(agent.teacher_params, te.observe(sim, np.float64)))
    exact = pl.teacher_steer(agent.teacher_params, te.observe(sim, np.float64))
    rounded = pl.teacher_steer(agent.teacher_params, te.observe(sim).astype(np.float64))
    assert 0 < np.abs(exact - rounded).max() < 1e-5


def test_curvature_inputs_are_lataccel_minus_roll_over_speed_squared(model, real_segments):
    sim = te.TinyPhysicsSim(model, official_rng=True)
    segments = real_segments.first(2)
    sim.reset(segments)
    sim.warm_up()
    for _ in range(30):
        sim.step(np.zeros(2))
    t = sim.t
    agent = pl.Agent(te.OBS_DIM, 8, "residual", 0.25, curvature_inputs=True)
    obs = te.observe(sim, np.float64)
    extra = np.concatenate(pl.curvature_inputs(agent.curvature_params, obs), axis=1)
    assert extra.shape == (2, 2 + te.FUTURE_LEN)
    rows = np.arange(t + 1, t + te.FUTURE_PLAN_STEPS)
    for i in range(2):
        lat, roll, v = (np.asarray(getattr(segments, f))[i] for f in ("target_lataccel", "roll_lataccel", "v_ego"))
        by_hand = [(sim.current[i, t - 1] - roll[t]) / max(v[t] ** 2, 1.0), (lat[t] - roll[t]) / max(v[t] ** 2, 1.0)]
        by_hand += [(lat[k] - roll[k]) / max(v[k] ** 2, 1.0) for k in rows]
        assert np.allclose(extra[i], np.clip(100.0 * np.array(by_hand), -5.0, 5.0), rtol=1e-12, atol=0)
    # The network reads them after the normalized observation, computed the same way in torch.
    with torch.no_grad():
        seen = agent.inputs(torch.as_tensor(obs, dtype=torch.float32)).numpy()
    assert seen.shape == (2, te.OBS_DIM + 2 + te.FUTURE_LEN)
    np.testing.assert_allclose(seen[:, te.OBS_DIM:], extra, rtol=1e-5, atol=1e-6)
    standing = obs[:1].copy()
    standing[0, te.obs_slices()["v_ego"]], standing[0, te.obs_slices()["target_lataccel"]] = 0.1, 0.5
    standing[0, te.obs_slices()["roll_lataccel"]] = 0.0
    assert pl.curvature_inputs(agent.curvature_params, standing)[1][0, 0] == pl.CURVATURE_CLIP  # 50, held


def test_residual_training_starts_from_the_teacher(default_run, model, real_data):
    stats = _stats(default_run)  # the defaults: a residual on pid_ff
    held_out = te.load_segments(real_data).subset([0, 1])
    teacher = te.rollout_controllers(te.TinyPhysicsSim(model), held_out, te.PIDFeedforwardController)
    assert stats["eval_total_cost"][0] == teacher["total_cost"].mean()  # row 0: before any update
    agent, _ = pl.load_agent(default_run / "final_model.pt")
    assert agent.actor_mean[-1].weight.abs().max() > 0  # PPO moved it


def test_segment_baseline_by_hand():
    """2 steps, 4 envs = 2 segments x K=2: centring subtracts the pair's mean at each step; normalising
    divides each pair by the standard deviation of its 4 centred entries."""
    advantages = torch.tensor([[1.0, 3.0, 10.0, 30.0], [2.0, 6.0, -10.0, 10.0]])
    centred = pl.segment_advantages(advantages, 2, center=True, norm_power=0.0)
    np.testing.assert_allclose(centred.numpy(), [[-1.0, 1.0, -10.0, 10.0], [-2.0, 2.0, -10.0, 10.0]])
    both = pl.segment_advantages(advantages, 2, center=True, norm_power=1.0)
    sd_a, sd_b = np.std([-1, 1, -2, 2], ddof=1), np.std([-10, 10, -10, 10], ddof=1)
    np.testing.assert_allclose(both.numpy(), [[-1 / sd_a, 1 / sd_a, -10 / sd_b, 10 / sd_b],
                                              [-2 / sd_a, 2 / sd_a, -10 / sd_b, 10 / sd_b]], rtol=1e-6)
    # K = 1: every environment is its own segment; normalising weighs each alike.
    alone = pl.segment_advantages(advantages, 1, center=False, norm_power=1.0)
    np.testing.assert_allclose(alone.numpy(), (advantages / advantages.std(dim=0)).numpy(), rtol=1e-6)
    # A softer power keeps part of the spread: the pair with 5x the spread keeps sqrt(5)x the weight.
    soft = pl.segment_advantages(advantages, 2, center=True, norm_power=0.5)
    np.testing.assert_allclose(soft.numpy(), [[-1 / sd_a**0.5, 1 / sd_a**0.5, -10 / sd_b**0.5, 10 / sd_b**0.5],
                                              [-2 / sd_a**0.5, 2 / sd_a**0.5, -10 / sd_b**0.5, 10 / sd_b**0.5]],
                               rtol=1e-6)
    # A floor at the median of the two spreads (their mean, for two) lifts the quieter pair's spread to it,
    # so that pair is divided by more and ends with less weight than the louder one.
    floor = (sd_a + sd_b) / 2
    floored = pl.segment_advantages(advantages, 2, center=True, norm_power=1.0, norm_floor=0.5)
    np.testing.assert_allclose(floored.numpy(), [[-1 / floor, 1 / floor, -10 / sd_b, 10 / sd_b],
                                                 [-2 / floor, 2 / floor, -10 / sd_b, 10 / sd_b]], rtol=1e-6)


def test_pair_baseline_by_hand():
    """1 step, 1 segment x K=4, antithetic pairs (0, 1) and (2, 3): centring on the pair subtracts each
    pair's own mean (an even function of the noise), not the mean over all four rollouts."""
    advantages = torch.tensor([[1.0, 3.0, 10.0, 30.0]])
    np.testing.assert_allclose(pl.segment_advantages(advantages, 4, center=True, norm_power=0.0).numpy(),
                               [[-10.0, -8.0, -1.0, 19.0]])
    paired = pl.segment_advantages(advantages, 4, center=True, norm_power=0.0, center_group=2)
    np.testing.assert_allclose(paired.numpy(), [[-1.0, 1.0, -10.0, 10.0]])
    normalised = pl.segment_advantages(advantages, 4, center=True, norm_power=1.0, center_group=2)
    np.testing.assert_allclose(normalised.numpy(), paired.numpy() / np.std([-1, 1, -10, 10], ddof=1), rtol=1e-6)


def test_steer_change_penalty_by_hand():
    """The mean squared change of the deterministic steer (teacher plus residual) from each step's previous
    step, over the steps whose previous step carried over; its gradient reaches only the actor."""
    torch.manual_seed(0)
    agent = pl.Agent(te.OBS_DIM, 8, "residual", 0.25)
    torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.5)
    obs, prev_obs = torch.randn((3, te.OBS_DIM)), torch.randn((3, te.OBS_DIM))
    carried = torch.tensor([[True], [False], [True]])
    with torch.no_grad():
        steer = agent.to_steer(obs, agent.actor_mean(agent.inputs(obs)))
        prev = agent.to_steer(prev_obs, agent.actor_mean(agent.inputs(prev_obs)))
    expected = ((steer[0] - prev[0]) ** 2 + (steer[2] - prev[2]) ** 2) / 2
    penalty = pl.steer_change_penalty(agent, obs, prev_obs, carried)
    np.testing.assert_allclose(penalty.item(), expected.item(), rtol=1e-6)
    penalty.backward()
    assert agent.actor_mean[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in agent.critic.parameters())


def test_advantages_without_the_value_baseline_by_hand():
    """2 steps, 1 segment x K=2, gamma 0.5, lambda 1, the episode ending after the last step (nothing
    bootstrapped). With the critic's baseline the advantage is the return minus V(s_t), then centred over
    the pair; without it, the return alone, centred: V no longer enters."""
    buf = {"rewards": torch.tensor([[1.0, 3.0], [2.0, 0.0]]), "values": torch.tensor([[5.0, -5.0], [1.0, 2.0]]),
           "dones": torch.zeros(2, 2)}
    agent = pl.Agent(te.OBS_DIM, 8, "residual", 0.25)
    next_obs, next_done = torch.zeros(2, te.OBS_DIM), torch.ones(2)
    returns = np.array([[1.0 + 0.5 * 2.0, 3.0 + 0.5 * 0.0], [2.0, 0.0]])
    args = dict(samples_per_segment=2, segment_norm=False, gae_lambda=1.0)
    with_v, target = pl.advantages_and_returns(agent, buf, next_obs, next_done, 0.5,
                                               pl.Args(**args, value_baseline=True))
    without_v, same_target = pl.advantages_and_returns(agent, buf, next_obs, next_done, 0.5,
                                                       pl.Args(**args, value_baseline=False))
    np.testing.assert_allclose(target.numpy(), returns)
    np.testing.assert_allclose(same_target.numpy(), returns)  # the critic's target does not change
    minus_v = returns - buf["values"].numpy()  # [[-3, 8], [1, -2]]
    np.testing.assert_allclose(with_v.numpy(), minus_v - minus_v.mean(axis=1, keepdims=True))
    np.testing.assert_allclose(without_v.numpy(), [[-0.5, 0.5], [1.0, -1.0]])


def test_reward_normalizer_tracks_the_discounted_return():
    norm = pl.RewardNormalizer(3, gamma=0.5)
    rng = np.random.default_rng(0)
    seen, running = [], np.zeros(3)
    for step in range(40):
        reward, done = rng.normal(0, 5, 3), np.array([step % 7 == 6] * 3)
        out = norm(reward, done)
        running = running * 0.5 + reward
        seen.append(running.copy())
        np.testing.assert_allclose(out, reward / np.sqrt(np.var(np.concatenate(seen)) + 1e-8), rtol=1e-3)
        running[done] = 0.0


def test_learning_rate_schedules(tiny):
    args = tiny(learning_rate=1.0, lr_schedule="cosine", final_lr_fraction=0.1)
    assert pl.learning_rate_at(1, 4, args) == pytest.approx(1.0)
    assert pl.learning_rate_at(3, 4, args) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: the middle
    assert pl.learning_rate_at(2, 4, tiny(learning_rate=1.0, lr_schedule="linear")) == pytest.approx(0.75)
    assert pl.learning_rate_at(4, 4, tiny(learning_rate=1.0, lr_schedule="constant")) == 1.0
    inverse = tiny(learning_rate=1.0, lr_schedule="inverse", lr_decay_steps=160)  # 80 steps an iteration
    assert [pl.learning_rate_at(i, 4, inverse) for i in (1, 3, 5)] == [1.0, 0.5, 1 / 3]  # halved at 160 steps
    assert pl.learning_rate_at(3, 4, inverse) == pl.learning_rate_at(3, 40, inverse)  # whatever the budget


def test_late_gamma_switches_the_discount_at_its_step(default_run, tiny):
    """The tiny run's rollouts start at steps 0, 80, 160, 240. A switch from step 0 trains as a run with that
    gamma, one past the budget as the default run, switches at 160 and 240 as neither; the discount used is
    logged."""
    late = tiny(late_gamma=(0.95, 0.98), late_gamma_from=(160, 240))
    assert [pl.gamma_at(step, late) for step in (0, 80, 159, 160, 239, 240, 10**9)] == \
        [0.9, 0.9, 0.9, 0.95, 0.95, 0.98, 0.98]
    assert pl.gamma_at(10**9, tiny(late_gamma=(), late_gamma_from=())) == 0.9
    assert [pl.gamma_at(step, tiny()) for step in (999_999, 1_000_000, 3_999_999, 4_000_000)] == \
        [0.9, 0.95, 0.95, 0.98]  # the defaults

    def final(run: Path) -> dict:
        return _weights(run / "final_model.pt")

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(v, b[k]) for k, v in a.items())

    # without the warm start, whose critic learns --gamma's returns
    throughout = final(pl.train(tiny(gamma=0.95, exp_name="g95", eval_every=10**9, bc_segments=0)))
    assert same(final(pl.train(tiny(late_gamma=(0.95,), late_gamma_from=(0,), exp_name="from0", eval_every=10**9,
                                    bc_segments=0))), throughout)
    assert same(final(pl.train(tiny(late_gamma=(0.95,), late_gamma_from=(320,), exp_name="never",
                                    eval_every=10**9))), final(default_run))
    switched_run = pl.train(dataclasses.replace(late, exp_name="switched", eval_every=10**9))
    switched = final(switched_run)
    assert not same(switched, throughout) and not same(switched, final(default_run))
    events = EventAccumulator(str(switched_run))
    events.Reload()
    assert [e.value for e in events.Scalars("charts/gamma")] == pytest.approx([0.9, 0.9, 0.95, 0.98])


def test_resume_is_exact_with_the_new_options(tiny):
    options = dict(action_mode="residual", samples_per_segment=4, common_noise=True, segment_baseline=True,
                   segment_norm=True, norm_reward=True, lr_schedule="cosine", critic_hidden=24, policy_dist="tanh",
                   antithetic_noise=True, noise_correlation=0.5, fast_noise_correlation=0.2, segment_norm_power=0.5,
                   noise_logprob="joint", learn_logstd=False, pair_baseline=True, smooth_coef=10.0,
                   final_logstd=-4.5, ema_decay=0.5, jerk_weight=1.5, adam_beta1=0.95, anchor_decay=100.0,
                   late_gamma=(0.8,), late_gamma_from=(400,),  # the switch falls after the resume
                   innovation_cv=True, curvature_inputs=True)
    full = pl.train(tiny(total_timesteps=640, checkpoint_every=240, eval_every=10**9, **options))
    checkpoint = torch.load(full / "checkpoints" / "checkpoint_240.pt", weights_only=False)
    assert checkpoint["optimizer"]["param_groups"][0]["betas"] == (0.95, 0.999)
    resumed = pl.train(dataclasses.replace(tiny(), resume=str(full / "checkpoints" / "checkpoint_240.pt")))
    _same_stats(_stats(full), _stats(resumed))
    for k, v in _weights(full / "final_model.pt").items():
        assert torch.equal(v, _weights(resumed / "final_model.pt")[k]), k


def test_fixed_logstd_stays_at_its_initial_value(default_run, tiny):
    init = pl.Args.init_logstd
    assert _weights(default_run / "final_model.pt")["actor_logstd"].item() != pytest.approx(init, abs=1e-6)
    fixed = pl.train(tiny(learn_logstd=False, exp_name="fixed"))
    assert _weights(fixed / "final_model.pt")["actor_logstd"].item() == pytest.approx(init, abs=1e-7)
    assert _weights(fixed / "final_model.pt")["actor_mean.4.weight"].abs().max() > 0  # the mean still learns


def test_annealed_logstd_follows_its_schedule(tiny):
    """--final-logstd: the log-std is set, not learned, linearly from --init-logstd at the first iteration
    towards the final value; the run's last iteration leaves it at that iteration's value."""
    args = tiny(init_logstd=-3.0, final_logstd=-5.0, ema_decay=0.0, exp_name="annealed")  # the live weights
    assert pl.logstd_at(1, 4, args) == -3.0
    assert pl.logstd_at(3, 4, args) == pytest.approx(-4.0)
    run = pl.train(args)
    iterations = args.total_timesteps // (args.num_envs * args.num_steps)
    assert _weights(run / "final_model.pt")["actor_logstd"].item() == pytest.approx(
        pl.logstd_at(iterations, iterations, args), abs=1e-6)


def test_ema_policy_is_the_running_average_of_the_live_weights(tiny):
    """--ema-decay d: the saved policy is the live weights after the first update, then d * itself + (1 - d) *
    the live weights after each later one; checkpoints keep the live weights, from which a run resumes, and
    the best model is the average that scored best; --eval-live scores the live weights beside it."""
    run = pl.train(tiny(ema_decay=0.6, checkpoint_every=80, eval_every=80, eval_live=True, exp_name="ema"))
    checkpoints = [torch.load(run / "checkpoints" / f"checkpoint_{step}.pt", weights_only=False)
                   for step in (80, 160, 240, 320)]
    average = {k: v.clone() for k, v in checkpoints[0]["live_agent"].items()}
    for checkpoint in checkpoints[1:]:
        for k, live in checkpoint["live_agent"].items():  # buffers (the normalizer) are constant
            average[k] = 0.6 * average[k] + 0.4 * live
    final = _weights(run / "final_model.pt")
    assert not torch.equal(final["actor_mean.4.weight"], checkpoints[-1]["live_agent"]["actor_mean.4.weight"])
    for k, v in average.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-7)
        assert torch.equal(final[k], checkpoints[-1]["agent"][k]), k  # a checkpoint's model is the average too
    stats = _stats(run)
    evaluated = stats["eval_total_cost"][np.isfinite(stats["eval_total_cost"])]
    assert torch.load(run / "best_model.pt", weights_only=False)["eval_total_cost"] == evaluated.min()
    assert [e.step for e in EventAccumulator(str(run)).Reload().Scalars("eval/live_total_cost")] == [80, 160, 240, 320]


def test_live_weights_are_scored_only_when_asked(default_run):
    """With --ema-decay (a default) and without --eval-live an evaluation scores only the average."""
    assert pl.Args().ema_decay > 0 and not pl.Args().eval_live
    tags = EventAccumulator(str(default_run)).Reload().Tags()["scalars"]
    assert "eval/total_cost" in tags and "eval/live_total_cost" not in tags


def test_anchor_decay_pulls_the_actor_towards_its_step_0_weights_after_each_step(tiny):
    """--anchor-decay c: each optimizer step is followed by actor <- actor + lr * c * (anchor - actor), on the
    actor's weights only. Two updates of one minibatch from the same state, with and without the pull: the
    pulled weights are the plain step's weights moved that fraction of the way to the anchor."""
    args = tiny(num_minibatches=1, update_epochs=1, anchor_decay=1000.0, learning_rate=1e-4)
    torch.manual_seed(0)
    agent = pl.Agent(te.OBS_DIM, 16, "residual", 0.25)
    anchor = {k: v.detach().clone() for k, v in agent.actor_mean.named_parameters()}
    torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.5)  # the actor has moved off its anchor
    buf = pl.new_rollout_buffers(8, 4, torch.device("cpu"))
    buf["obs"], buf["actions"] = torch.randn((8, 4, te.OBS_DIM)), torch.randn((8, 4, 1))
    advantages, returns = torch.randn((8, 4)), torch.randn((8, 4))
    after = {}
    for name, pull in (("plain", None), ("pulled", anchor)):
        trained = pl.Agent(te.OBS_DIM, 16, "residual", 0.25)
        trained.load_state_dict(agent.state_dict())
        optimizer = torch.optim.Adam(trained.parameters(), lr=args.learning_rate, eps=1e-5)
        np.random.seed(0)  # the same minibatch order, so the same sums
        pl.ppo_update(trained, optimizer, pl.ppo_loss, buf, advantages, returns, args, 1, contextlib.nullcontext(),
                      pull)
        after[name] = {k: v.detach() for k, v in trained.named_parameters()}
    assert not torch.equal(after["plain"]["actor_mean.4.weight"], agent.actor_mean[-1].weight)  # Adam stepped
    for k, anchored in anchor.items():
        expected = after["plain"][f"actor_mean.{k}"] + 0.1 * (anchored - after["plain"][f"actor_mean.{k}"])
        torch.testing.assert_close(after["pulled"][f"actor_mean.{k}"], expected, rtol=0, atol=1e-7)
    for k in ("critic.4.weight", "actor_logstd"):
        assert torch.equal(after["pulled"][k], after["plain"][k]), k


def test_full_anchor_decay_holds_the_actor_at_its_step_0_weights(tiny):
    """lr x --anchor-decay 1: every step returns the actor exactly to its step-0 weights (after the warm start),
    which checkpoints keep as the anchor, so the scored policy never changes while the critic still learns."""
    run = pl.train(tiny(learning_rate=0.5, anchor_decay=2.0, lr_schedule="constant", exp_name="anchored"))
    start = torch.load(run / "best_model.pt", weights_only=False)  # never beaten: the step-0 policy
    checkpoint = torch.load(run / "checkpoints" / "checkpoint_320.pt", weights_only=False)
    final = _weights(run / "final_model.pt")
    assert start["global_step"] == 0  # without the pull the residual's output layer leaves zero (test above)
    for k, v in checkpoint["anchor"].items():
        assert torch.equal(v, start["agent"][f"actor_mean.{k}"]), k
        assert torch.equal(final[f"actor_mean.{k}"], v), k
    assert not torch.equal(final["critic.4.weight"], start["agent"]["critic.4.weight"])
    assert np.all(_stats(run)["eval_total_cost"][np.isfinite(_stats(run)["eval_total_cost"])] == start[
        "eval_total_cost"])


def test_tanh_policy_log_probability_is_the_squashed_density():
    """The stored action is the pre-squash sample u; its logprob is the density of tanh(u), as torch's own
    transformed distribution computes it, and the zero-initialised residual's deterministic action is 0."""
    torch.manual_seed(0)
    agent = pl.Agent(te.OBS_DIM, 16, "residual", 0.25, init_logstd=-0.5, policy_dist="tanh")
    torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.5)
    obs = torch.as_tensor(np.random.default_rng(0).normal(0, 1, (64, te.OBS_DIM)), dtype=torch.float32)
    with torch.no_grad():
        u, logprob, _, _ = agent.get_action_and_value(obs)
        mean = agent.actor_mean(agent.inputs(obs))
        # in float64: the reference inverts tanh, which float32 cannot do near +-1
        squashed = torch.distributions.TransformedDistribution(
            torch.distributions.Normal(mean.double(), agent.actor_logstd.exp().double()),
            [torch.distributions.TanhTransform()])
        reference = squashed.log_prob(u.double().tanh()).sum(1)
    np.testing.assert_allclose(logprob.numpy(), reference.numpy(), rtol=1e-4, atol=1e-4)
    assert u.abs().max() > 1  # samples beyond +-1 are squashed, not clipped: the steer still moves with them
    fresh = pl.Agent(te.OBS_DIM, 16, "residual", 0.25, policy_dist="tanh")
    np.testing.assert_array_equal(pl.numpy_policy(fresh.numpy_params(), obs.double().numpy()),
                                  pl.teacher_steer(fresh.teacher_params, obs.double().numpy()))


def test_antithetic_pairs_mirror_their_noise():
    agent = pl.Agent(te.OBS_DIM, 16, "delta", 0.25, init_logstd=-1.0)
    torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.5)
    obs = torch.as_tensor(np.random.default_rng(0).normal(0, 1, (8, te.OBS_DIM)), dtype=torch.float32)
    obs = obs.repeat_interleave(2, dim=0)  # pairs share a state, as copies of one segment do at the start
    with torch.no_grad():
        actions, offsets, noise = pl.exploration_actions(agent, obs, torch.zeros((16, 1)), 0.0, antithetic=True)
        mean = agent.actor_mean(agent.inputs(obs))
    np.testing.assert_allclose((actions - mean).numpy(), noise.numpy(), atol=1e-6)
    assert not offsets.any()
    noise = noise.reshape(8, 2)
    np.testing.assert_allclose(noise[:, 0].numpy(), -noise[:, 1].numpy(), atol=1e-6)
    assert noise.abs().min() > 0


def test_correlated_noise_is_ar1_with_the_policys_fresh_std():
    """noise_t = rho * noise_{t-1} + N(0, std^2): the lag-1 correlation is rho, the stationary std is
    std / sqrt(1 - rho^2), and the log-probability is the fresh noise's density given the offset."""
    rho, steps, envs = 0.8, 400, 256
    agent = pl.Agent(te.OBS_DIM, 16, "residual", 0.25, init_logstd=-1.0)
    obs = torch.zeros((envs, te.OBS_DIM))
    noise, trace = torch.zeros((envs, 1)), []
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(steps):
            previous = noise
            actions, offsets, noise = pl.exploration_actions(agent, obs, previous, rho, antithetic=False)
            trace.append(noise[:, 0].numpy().copy())
            np.testing.assert_allclose(offsets.numpy(), rho * previous.numpy(), rtol=1e-6)
        _, logprob, _, _ = agent.get_action_and_value(obs, actions, offsets)
    std = float(np.exp(-1.0))
    fresh = (noise - offsets).numpy()[:, 0]  # the residual's mean is 0 at init
    np.testing.assert_allclose(logprob.numpy(), -0.5 * (fresh / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi),
                               rtol=1e-5, atol=1e-5)
    trace = np.array(trace[100:])  # past the start-up from zero
    assert abs(np.corrcoef(trace[1:].ravel(), trace[:-1].ravel())[0, 1] - rho) < 0.02
    assert abs(trace.std() / (std / np.sqrt(1 - rho**2)) - 1) < 0.03


def test_a_checkpoint_from_before_correlated_noise_resumes_with_white_noise():
    """Runs written before --noise-correlation (and --noise-logprob) existed trained with white noise (and the
    conditioned log-probability); resuming one must not switch it to today's defaults."""
    old = {k: v for k, v in dataclasses.asdict(pl.Args()).items()
           if k not in ("noise_correlation", "segment_norm_power", "noise_logprob")}
    resumed = pl.saved_args({"args": old}, resume="r.pt")
    assert (resumed.noise_correlation, resumed.segment_norm_power, resumed.noise_logprob) == (0.0, 1.0, "conditioned")
    assert pl.Args().noise_correlation > 0 and pl.Args().noise_logprob == "joint"  # the defaults it must not pick up
    new = dataclasses.asdict(pl.Args(noise_correlation=0.7, segment_norm_power=0.5, noise_logprob="conditioned"))
    resumed = pl.saved_args({"args": new}, resume="r.pt")
    assert (resumed.noise_correlation, resumed.segment_norm_power, resumed.noise_logprob) == (0.7, 0.5, "conditioned")


def test_a_checkpoint_from_before_curvature_inputs_loads_and_resumes_without_them(tmp_path):
    """A policy saved before --curvature-inputs existed read the observation alone: it must load, score and
    resume that way, not pick up today's default."""
    agent = pl.Agent(te.OBS_DIM, 8, "residual", 0.25)
    old = pl.policy_checkpoint(agent, global_step=0)
    del old["agent_config"]["curvature_inputs"]
    pl.save_checkpoint(old, tmp_path / "old.pt")
    loaded, _ = pl.load_agent(tmp_path / "old.pt")
    assert loaded.curvature_params is None and loaded.actor_mean[0].in_features == te.OBS_DIM
    assert not loaded.numpy_params()["curvature_inputs"]
    args = {k: v for k, v in dataclasses.asdict(pl.Args()).items() if k != "curvature_inputs"}
    assert pl.Args().curvature_inputs and not pl.saved_args({"args": args}).curvature_inputs


def test_a_checkpoint_from_before_several_late_gammas_resumes_with_its_one_switch():
    """--late-gamma first took one value (or None, or did not exist); such a run's arguments still load, and
    discount as they did."""
    before = dataclasses.asdict(pl.Args())
    one = pl.saved_args({"args": {**before, "late_gamma": 0.97, "late_gamma_from": 2_000_000}})
    assert (one.late_gamma, one.late_gamma_from) == ((0.97,), (2_000_000,))
    assert [pl.gamma_at(s, one) for s in (1_999_999, 2_000_000)] == [0.9, 0.97]
    none = pl.saved_args({"args": {**before, "late_gamma": None, "late_gamma_from": 1_000_000}})
    older = pl.saved_args({"args": {k: v for k, v in before.items() if not k.startswith("late_gamma")}})
    for args in (none, older):
        assert (args.late_gamma, args.late_gamma_from) == ((), ()) and pl.gamma_at(10**9, args) == 0.9
        pl.validate(args)


@pytest.mark.parametrize("fast", [None, 0.3])
def test_joint_noise_logprob_is_the_ar1_process_density_under_the_new_policy(fast):
    """--noise-logprob joint: summed over a rollout, the per-step log-probabilities under an updated policy
    are the log-density of its whole AR(1) noise path, n_t = a_t - mean'(s_t) with innovations n_t - rho
    n_{t-1} (restarting where an episode starts), each environment with its own rho under
    --fast-noise-correlation; the conditioned log-probabilities are not."""
    steps, envs = 30, 8
    args = pl.Args(noise_correlation=0.8, fast_noise_correlation=fast, antithetic_noise=fast is not None)
    rho = np.where(np.arange(envs) % 4 >= 2, 0.8 if fast is None else fast, 0.8)  # the second pair of each 4
    torch.manual_seed(0)
    agent = pl.Agent(te.OBS_DIM, 16, "residual", 0.25, init_logstd=-1.0)
    torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.5)
    buf = pl.new_rollout_buffers(steps, envs, torch.device("cpu"))
    buf["obs"] = torch.randn((steps, envs, te.OBS_DIM))
    buf["dones"][12, 1] = buf["dones"][17, 2] = 1.0  # environments 1 and 2 start new episodes
    noise, b_rho = torch.zeros((envs, 1)), pl.batch_noise_correlations(args, buf)
    env_rho = pl.noise_correlations(args, envs, torch.device("cpu"))
    with torch.no_grad():
        for step in range(steps):
            noise = noise * (1.0 - buf["dones"][step])[:, None]
            buf["actions"][step], buf["noise_offsets"][step], noise = pl.exploration_actions(
                agent, buf["obs"][step], noise, env_rho, args.antithetic_noise)
        previous = [x.reshape(steps * envs, -1) for x in pl.previous_steps(buf)]
        flat = {k: buf[k].reshape(steps * envs, -1) for k in ("obs", "actions", "noise_offsets")}
        unchanged = pl.joint_noise_offsets(agent, flat["noise_offsets"], *previous, b_rho)
        np.testing.assert_allclose(unchanged.numpy(), flat["noise_offsets"].numpy(), atol=1e-6)

        torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.5)  # the policy after an update
        joint = pl.joint_noise_offsets(agent, flat["noise_offsets"], *previous, b_rho)
        logprob = {name: agent.get_action_and_value(flat["obs"], flat["actions"], offsets)[1].reshape(steps, envs)
                   for name, offsets in (("joint", joint), ("conditioned", flat["noise_offsets"]))}
        n = (buf["actions"] - agent.actor_mean(agent.inputs(buf["obs"])))[..., 0].numpy()
    std = float(np.exp(-1.0))
    carried = np.concatenate([np.zeros((1, envs)), rho * n[:-1] * (1 - buf["dones"][1:].numpy())])
    innovations = n - carried
    density = (-0.5 * (innovations / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(0)
    np.testing.assert_allclose(logprob["joint"].sum(0).numpy(), density, rtol=1e-5)
    assert np.abs(logprob["conditioned"].sum(0).numpy() - density).min() > 0.1


@pytest.mark.parametrize("rho", [-0.1, 1.0])
def test_noise_correlation_outside_0_1_is_refused(rho):
    with pytest.raises(te.TinyPhysicsError, match=rf"--noise-correlation {rho}: must be in \[0, 1\)"):
        pl.validate(pl.Args(noise_correlation=rho))


def test_fast_noise_goes_to_each_segments_second_antithetic_pair():
    """--fast-noise-correlation: with K=4 rollouts of a segment, rollouts 3 and 4 (one antithetic pair) carry
    the fast rho; with K=8, pairs 2 and 4. Each environment's noise is the AR(1) process of its own rho."""
    args = pl.Args(noise_correlation=0.8, fast_noise_correlation=0.3, antithetic_noise=True)
    assert pl.noise_correlations(args, 8, torch.device("cpu"))[:, 0].tolist() == pytest.approx([0.8] * 2 + [0.3] * 2
                                                                                            + [0.8] * 2 + [0.3] * 2)
    args8 = dataclasses.replace(args, samples_per_segment=8)
    assert pl.noise_correlations(args8, 16, torch.device("cpu"))[:, 0].tolist() == pytest.approx(
        ([0.8] * 2 + [0.3] * 2) * 4)
    agent = pl.Agent(te.OBS_DIM, 16, "residual", 0.25, init_logstd=-1.0)
    obs, noise, trace = torch.zeros((512, te.OBS_DIM)), torch.zeros((512, 1)), []
    env_rho = pl.noise_correlations(args, 512, obs.device)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(300):
            _, _, noise = pl.exploration_actions(agent, obs, noise, env_rho, antithetic=True)
            trace.append(noise[:, 0].numpy().copy())
    trace, fast = np.array(trace[100:]), np.arange(512) % 4 >= 2
    for rho, envs in ((0.8, ~fast), (0.3, fast)):
        assert abs(np.corrcoef(trace[1:, envs].ravel(), trace[:-1, envs].ravel())[0, 1] - rho) < 0.03


@pytest.mark.parametrize("flags, problem", [
    ({"fast_noise_correlation": 1.0}, r"--fast-noise-correlation 1.0: must be in \[0, 1\)"),
    ({"fast_noise_correlation": 0.5, "samples_per_segment": 2}, "needs --antithetic-noise and --samples-per"),
    ({"fast_noise_correlation": 0.5, "antithetic_noise": False, "pair_baseline": False},
     "needs --antithetic-noise and --samples-per"),
])
def test_fast_noise_without_a_second_pair_is_refused(flags, problem):
    with pytest.raises(te.TinyPhysicsError, match=problem):
        pl.validate(pl.Args(**flags))


@pytest.mark.parametrize("power", [0.0, 1.5])
def test_segment_norm_power_outside_0_1_is_refused(power):
    with pytest.raises(te.TinyPhysicsError, match=rf"--segment-norm-power {power}: must be in \(0, 1\]"):
        pl.validate(pl.Args(segment_norm_power=power))


@pytest.mark.parametrize("floor", [-0.1, 1.0])
def test_segment_norm_floor_outside_0_1_is_refused(floor):
    with pytest.raises(te.TinyPhysicsError, match=rf"--segment-norm-floor {floor}: must be in \[0, 1\)"):
        pl.validate(pl.Args(segment_norm_floor=floor))


@pytest.mark.parametrize("flags, message", [
    (dict(pair_baseline=True, antithetic_noise=False), "--pair-baseline centres each rollout on its antithetic pair"),
    (dict(pair_baseline=True, segment_baseline=False, value_baseline=True), "needs --antithetic-noise and "
                                                                             "--segment-baseline"),
    (dict(smooth_coef=-1.0), "--smooth-coef -1.0: cannot be negative"),
    (dict(jerk_weight=-1.0), "--jerk-weight -1.0: cannot be negative"),
    (dict(ema_decay=1.0), r"--ema-decay 1.0: must be in \[0, 1\)"),
    (dict(ema_decay=-0.1), r"--ema-decay -0.1: must be in \[0, 1\)"),
    (dict(adam_beta1=1.0), r"--adam-beta1 1.0: must be in \[0, 1\)"),
    (dict(lr_decay_steps=0), "--lr-decay-steps 0: need at least 1"),
    (dict(anchor_decay=-1.0, learning_rate=0.001), r"--anchor-decay -1.0 x --learning-rate 0.001 must be in \[0, 1\]"),
    (dict(anchor_decay=3.0, learning_rate=0.5), r"--anchor-decay 3.0 x --learning-rate 0.5 must be in \[0, 1\]"),
])
def test_misused_flags_are_refused(flags, message):
    with pytest.raises(te.TinyPhysicsError, match=message):
        pl.validate(pl.Args(**flags))


def test_expected_dynamics_training_runs(tiny):
    stats = _stats(pl.train(tiny(action_mode="residual", sim_dynamics="expected", total_timesteps=160)))
    assert np.isfinite(stats["policy_loss"][1:]).all() and np.isfinite(stats["eval_total_cost"][-1])


def test_discounted_innovations_by_hand():
    """3 steps, 1 environment, 2 features, gamma 0.5, a new episode starting at step 2: the sums run to the
    episode's end, and from step 2 to the rollout's end."""
    innovations = torch.tensor([[[1.0, 2.0]], [[4.0, -2.0]], [[8.0, 1.0]]])
    dones = torch.tensor([[0.0], [0.0], [1.0]])
    sums = pl.discounted_innovations(innovations, dones, 0.5)
    np.testing.assert_allclose(sums.numpy(), [[[3.0, 1.0]], [[4.0, -2.0]], [[8.0, 1.0]]])


def _control_variate_batch(rng, weights, steps=50, envs=16, noise=0.01):
    """Innovation sums, and returns whose centred part is a little noise plus those sums times weights, each
    segment of K=4 at its own scale (as segments differ in difficulty)."""
    scale = torch.as_tensor(np.repeat(rng.uniform(0.1, 10.0, envs // 4), 4))
    sums = torch.as_tensor(rng.normal(size=(steps, envs, len(weights)))) * scale[:, None]
    level = torch.as_tensor(rng.normal(size=(steps, envs // 4))).repeat_interleave(4, dim=1)  # a segment's own
    centred_noise = noise * torch.as_tensor(rng.normal(size=(steps, envs)))
    returns = scale * (level + centred_noise) + sums @ torch.as_tensor(weights)
    return returns, sums


def test_innovation_control_variate_fits_on_earlier_batches_only():
    """The first batch passes unchanged (nothing fitted yet); after it, the weights are the ones that built
    the returns, and they take the innovations' part out of the next batch; a batch's own returns never
    change what is subtracted from them (so the control variate adds no bias)."""
    rng = np.random.default_rng(0)
    weights = np.array([2.0, -1.0, 0.5])
    cv = pl.InnovationControlVariate(3, samples_per_segment=4, center_group=2)
    returns, sums = _control_variate_batch(rng, weights)
    np.testing.assert_array_equal(cv(returns, sums).numpy(), returns.numpy())
    np.testing.assert_allclose(cv.weights(), weights, rtol=0.02)
    assert cv.removed == 0.0
    returns, sums = _control_variate_batch(rng, weights)
    other = returns + torch.as_tensor(rng.normal(size=returns.shape))
    state = cv.state_dict()
    corrected = cv(returns, sums)
    assert cv.removed > 0.99
    cv.load_state_dict(state)
    np.testing.assert_allclose((other - cv(other, sums)).numpy(), (returns - corrected).numpy(), rtol=1e-12)
    centred = pl.segment_advantages(corrected, 4, center=True, norm_power=0.0, center_group=2)
    raw = pl.segment_advantages(returns, 4, center=True, norm_power=0.0, center_group=2)
    assert centred.var() < 0.01 * raw.var()
