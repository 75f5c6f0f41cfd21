"""ppo_lateral.py: artifacts, the pinned recipe, GAE and advantages, exploration noise, resume, old checkpoints,
determinism, compile, argument checks, signals."""

import dataclasses
import functools
import json
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
                num_minibatches=2, update_epochs=2, eval_every=160,
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
                "eval/lataccel_cost", "eval/jerk_cost", "warm_start/value_mse"):
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
    stats = _stats(pl.train(tiny(num_steps=100, total_timesteps=1600, eval_every=10**9, checkpoint_every=10**9)))
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


def test_extend_to_refuses_what_would_not_be_the_longer_run(default_run):
    with pytest.raises(te.TinyPhysicsError, match="the checkpoint is at step 320; extend to at least one more batch"):
        pl.train(pl.Args(resume=str(default_run / "checkpoints" / "checkpoint_320.pt"), extend_to=320))


def test_extend_to_needs_a_run_to_continue(tiny):
    with pytest.raises(te.TinyPhysicsError, match="--extend-to continues a run: add --resume"):
        pl.train(tiny(extend_to=640))


def test_numpy_policy_mirrors_the_torch_agent():
    """numpy_policy (official scoring, export) and the torch agent (training) map observations to the same steer."""
    obs = np.random.default_rng(0).normal(0, 1, (50, te.OBS_DIM)).astype(np.float32)
    obs[:, te.obs_slices()["v_ego"]] += 20.0
    for curvature in (False, True):
        agent = pl.Agent(te.OBS_DIM, 16, curvature_inputs=curvature)
        torch.nn.init.normal_(agent.actor_mean[0].weight, std=0.5)  # the curvature inputs' weights too
        torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.5)  # a policy whose actions are not all ~0
        x = torch.as_tensor(obs)
        with torch.no_grad():
            expected = agent.to_steer(x, agent.actor_mean(agent.inputs(x))).double().numpy()
        steer = pl.numpy_policy(agent.numpy_params(), obs)
        np.testing.assert_allclose(steer, expected, atol=1e-5)  # torch runs in float32, numpy_policy in float64
        assert np.ptp(steer) > 0.1


# --- The recipe, pinned ------------------------------------------------------------------------
RECIPE = dict(num_envs=64, num_steps=100, samples_per_segment=4, common_noise=True, antithetic_noise=True,
              noise_correlation=0.9, learning_rate=4e-4, gamma=0.9, late_gamma=(0.95, 0.98),
              late_gamma_from=(1_000_000, 4_000_000), gae_lambda=1.0, num_minibatches=4, update_epochs=4,
              norm_adv=True, clip_coef=0.05, clip_vloss=True, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5,
              target_kl=None, hidden=64, curvature_inputs=True, init_logstd=-4.0, )
RECIPE_CONSTANTS = dict(TEACHER="pid_ff", RESIDUAL_SCALE=0.25, REWARD_SCALE=0.1, LR_HALF_LIFE=500_000,
                        EMA_DECAY=0.97, WARM_START_SEGMENTS=256, WARM_START_EPOCHS=30)
# One seeded update of the default recipe on a fixed batch (the test below): its losses, as this code computes
# them. They move with any change to the loss, the advantages, the noise's log-probability, the agent, its
# initialisation or the optimizer; a change of CPU moves them by float rounding only, far inside the tolerance.
PINNED_UPDATE = {"policy_loss": 0.0964416, "value_loss": 2.924972, "approx_kl": 1.354928, "advantage_0": 1.888906,
                 "actor_out": 0.4471936}


def test_the_default_recipe_is_pinned():
    """A change to the recipe must be deliberate: the defaults, the recipe's constants and one seeded update."""
    defaults = pl.Args()
    assert {k: getattr(defaults, k) for k in RECIPE} == RECIPE
    assert {k: getattr(pl, k) for k in RECIPE_CONSTANTS} == RECIPE_CONSTANTS
    assert [pl.learning_rate_at(s, defaults) for s in (0, 500_000, 1_500_000)] == pytest.approx([4e-4, 2e-4, 1e-4])
    assert [pl.gamma_at(s, defaults) for s in (999_999, 1_000_000, 3_999_999, 4_000_000)] == [0.9, 0.95, 0.95, 0.98]

    args = pl.Args(num_envs=8, num_steps=16)  # the default recipe on a batch small enough for a test
    torch.manual_seed(0)
    agent = pl.Agent(te.OBS_DIM, args.hidden, args.init_logstd, curvature_inputs=True)
    torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.01)  # an actor that has left the teacher
    rng = np.random.default_rng(0)
    obs = rng.normal(0.0, 1.0, (16, 8, te.OBS_DIM)).astype(np.float32)
    obs[..., te.obs_slices()["v_ego"]] += 20.0
    buf = {"obs": torch.as_tensor(obs), "dones": torch.zeros(16, 8)}
    buf["dones"][9, :4] = 1.0  # an episode starts mid-rollout in half the environments
    noise = torch.zeros((8, 1))
    actions, offsets, logprobs, values = [], [], [], []
    with torch.no_grad():
        for step in range(16):
            noise = noise * (1.0 - buf["dones"][step])[:, None]
            action, offset, noise = pl.exploration_actions(agent, buf["obs"][step], noise, args.noise_correlation,
                                                           args.antithetic_noise)
            _, logprob, _, value = agent.get_action_and_value(buf["obs"][step], action, offset)
            actions.append(action), offsets.append(offset), logprobs.append(logprob), values.append(value[:, 0])
    buf.update(actions=torch.stack(actions), noise_offsets=torch.stack(offsets), logprobs=torch.stack(logprobs),
               values=torch.stack(values), rewards=torch.as_tensor(rng.normal(-0.5, 0.2, (16, 8)), dtype=torch.float32))
    advantages, returns = pl.advantages_and_returns(agent, buf, buf["obs"][-1], torch.zeros(8), 0.9, args)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    np.random.seed(0)
    row = pl.ppo_update(agent, optimizer, pl.ppo_loss, buf, advantages, returns, args, 1)
    measured = {k: row[k] for k in ("policy_loss", "value_loss", "approx_kl")}  # (clipfrac is a step function)
    measured.update(advantage_0=float(advantages[0, 0]),
                    actor_out=float(agent.actor_mean[-1].weight.detach().abs().sum()))
    assert measured == pytest.approx(PINNED_UPDATE, rel=1e-3, abs=1e-7), measured


def _cli(tmp_path, *flags, **kwargs):
    env = {**os.environ, "TINYPHYSICS_CACHE": os.environ["TINYPHYSICS_CACHE"]}
    return subprocess.run([sys.executable, str(ROOT / "ppo_lateral.py"), *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("flags, message", [
    (["--num-envs", "0"], "--num-envs 0: need at least 1"),
    (["--num-minibatches", "3"], "does not divide the batch"),
    (["--num-envs", "64"], "more than the 16 training segments"),
    (["--total-timesteps", "10"], "less than one batch"),
    (["--samples-per-segment", "3"], "--samples-per-segment 3 must be 2 or more and divide the 4 environments"),
    (["--samples-per-segment", "1"], "--samples-per-segment 1 must be 2 or more"),
    (["--late-gamma", "1.5"], "--late-gamma 1.5: each must be in (0, 1]"),
    (["--late-gamma", "0.95"], "--late-gamma 0.95 --late-gamma-from 1000000 4000000: give one step for each"),
    (["--late-gamma", "0.95", "0.98", "--late-gamma-from", "5", "5"], "--late-gamma-from 5 5: the steps must be "
                                                                      "increasing"),
    (["--num-envs", "6", "--samples-per-segment", "3"], "must be even"),
    (["--noise-correlation", "1.0"], "--noise-correlation 1.0: must be in [0, 1)"),
    (["--synthetic-train", "-1"], "--synthetic-train -1: cannot be negative"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, model_path, real_data, flags, message):
    base = ["--sim-model-path", str(model_path), "--eval-data-path", str(real_data), "--synthetic-train", "16",
            "--num-envs", "4", "--samples-per-segment", "2", "--num-steps", "20", "--no-progress"]
    result = _cli(tmp_path, *base, *flags)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "runs").exists()


def test_help_is_short_user_documentation():
    """--help is what a user reads: about 120 lines, no field over two docstring lines, no measured scores."""
    result = subprocess.run([sys.executable, str(ROOT / "ppo_lateral.py"), "--help"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0 and len(result.stdout.splitlines()) <= 130, len(result.stdout.splitlines())
    source = (ROOT / "ppo_lateral.py").read_text()
    args = source[source.index("class Args:"):source.index("# Parts of the recipe")]
    docstrings = re.findall(r'"""(.*?)"""', args, flags=re.S)
    assert len(docstrings) == len(dataclasses.fields(pl.Args)) <= 45
    assert all(d.count("\n") <= 1 and not re.search(r"measured|\d\d\.\d\d", d) for d in docstrings)


def test_no_progress_silences_the_segment_reader(real_data, capsys):
    """--no-progress reaches the CSV reader too (its bar shows from 200 files), so a run's stderr holds
    only what went wrong: the recipes benchmark once reported a failed run as a progress bar."""
    train, held_out, _ = pl.load_splits(pl.Args(synthetic_train=200, eval_data_path=str(real_data), progress=False))
    assert len(train) == 200 and len(held_out) == 10
    assert "reading segments" not in capsys.readouterr().err


def test_missing_model_is_a_one_line_error(tmp_path, real_data):
    result = _cli(tmp_path, "--sim-model-path", "/nope.onnx", "--data-path", str(real_data))
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --sim-model-path=/nope.onnx: no such file; point it at tinyphysics.onnx")


def test_sigterm_writes_a_checkpoint_that_resumes(tmp_path, model_path, real_data):
    flags = ["--sim-model-path", str(model_path), "--eval-data-path", str(real_data), "--synthetic-train", "16",
             "--eval-segments", "1", "--num-envs", "4", "--samples-per-segment", "2", "--num-steps", "20",
             "--total-timesteps", "40000", "--num-minibatches", "2",
             "--eval-every", "100000", "--no-progress"]
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
                  "--num-steps", "20", "--total-timesteps", "80", "--num-minibatches", "2",
                  "--no-progress", "--sim-backend", "torch", "--compile")
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


def test_the_warm_starts_teacher_drives_like_the_official_interface(model, real_segments):
    """The critic's warm start drives the teacher from the observation, as the residual's step 0 does; with
    the official random streams its costs equal pid_ff's, one instance per segment called with lists."""
    sim = te.TinyPhysicsSim(model)
    obs, returns = pl.teacher_returns(sim, real_segments, gamma=0.9)
    assert obs.shape == (len(real_segments) * te.COST_STEPS, te.OBS_DIM) and returns.shape == (len(obs),)
    official = te.rollout_controllers(te.TinyPhysicsSim(model), real_segments, te.PIDFeedforwardController)
    np.testing.assert_array_equal(sim.costs()["total_cost"], official["total_cost"])
    first = returns.reshape(te.COST_STEPS, -1)[-2:]  # the last two steps: r_498 + 0.9 r_499, and r_499
    rewards = np.stack([sim.step_reward(t) for t in (te.COST_END_IDX - 2, te.COST_END_IDX - 1)]) * pl.REWARD_SCALE
    np.testing.assert_allclose(first, [rewards[0] + 0.9 * rewards[1], rewards[1]], rtol=1e-12)


def test_feedforward_teacher_beats_pid_on_synthetic_segments(model, synthetic_data):
    segments = te.load_segments(synthetic_data, progress=False).subset(np.arange(12))  # 12 keep CI quick
    pid, ff = (te.rollout_controllers(te.TinyPhysicsSim(model), segments, c)["total_cost"].mean()
               for c in (te.PIDController, te.PIDFeedforwardController))
    assert ff < 0.6 * pid  # on these 12: 0.44


# --- The residual on the teacher, and the advantages ----------------------------------------------
@pytest.mark.parametrize("curvature", [False, True])
def test_residual_policy_at_step_0_is_the_teacher(model, real_segments, curvature):
    """The actor's output starts at exactly zero and the teacher is recomputed from the float64 observation
    by the controller's own function, so the per-segment official costs are the teacher's to the bit."""
    agent = pl.Agent(te.OBS_DIM, 16, curvature_inputs=curvature)
    policy = pl.evaluate(agent, model, real_segments)
    official = te.rollout_controllers(te.TinyPhysicsSim(model), real_segments, te.PIDFeedforwardController)
    np.testing.assert_array_equal(policy["total_cost"], official["total_cost"])
    # From float32 observations (what the network is trained on) the teacher is close, not exact.
    sim = te.TinyPhysicsSim(model)
    sim.reset(real_segments)
    sim.warm_up()
    for _ in range(50):
        sim.step(te.teacher_steer(agent.teacher_params, te.observe(sim, np.float64)))
    exact = te.teacher_steer(agent.teacher_params, te.observe(sim, np.float64))
    rounded = te.teacher_steer(agent.teacher_params, te.observe(sim).astype(np.float64))
    assert 0 < np.abs(exact - rounded).max() < 1e-5


def test_curvature_inputs_are_lataccel_minus_roll_over_speed_squared(model, real_segments):
    sim = te.TinyPhysicsSim(model, official_rng=True)
    segments = real_segments.first(2)
    sim.reset(segments)
    sim.warm_up()
    for _ in range(30):
        sim.step(np.zeros(2))
    t = sim.t
    agent = pl.Agent(te.OBS_DIM, 8, curvature_inputs=True)
    obs = te.observe(sim, np.float64)
    extra = np.concatenate(te.curvature_inputs(agent.curvature_params, obs), axis=1)
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
    assert te.curvature_inputs(agent.curvature_params, standing)[1][0, 0] == te.CURVATURE_CLIP  # 50, held


def test_residual_training_starts_from_the_teacher(default_run, model, real_data):
    stats = _stats(default_run)
    held_out = te.load_segments(real_data).subset([0, 1])
    teacher = te.rollout_controllers(te.TinyPhysicsSim(model), held_out, te.PIDFeedforwardController)
    assert stats["eval_total_cost"][0] == teacher["total_cost"].mean()  # row 0: before any update
    agent, _ = pl.load_agent(default_run / "final_model.pt")
    assert agent.actor_mean[-1].weight.abs().max() > 0  # PPO moved it


def test_segment_advantages_by_hand():
    """2 steps, 4 envs = 2 segments x K=2: centring subtracts the pair's mean at each step, then each segment
    is divided by the standard deviation of its 4 centred entries. With K=4 and groups of 2 (antithetic
    pairs), each pair is centred on its own mean, not on the mean over all four rollouts."""
    returns = torch.tensor([[1.0, 3.0, 10.0, 30.0], [2.0, 6.0, -10.0, 10.0]])
    sd_a, sd_b = np.std([-1, 1, -2, 2], ddof=1), np.std([-10, 10, -10, 10], ddof=1)
    np.testing.assert_allclose(pl.segment_advantages(returns, 2, 2).numpy(),
                               [[-1 / sd_a, 1 / sd_a, -10 / sd_b, 10 / sd_b],
                                [-2 / sd_a, 2 / sd_a, -10 / sd_b, 10 / sd_b]], rtol=1e-6)
    one_step = returns[:1]
    paired = np.array([[-1.0, 1.0, -10.0, 10.0]])
    np.testing.assert_allclose(pl.segment_advantages(one_step, 4, 2).numpy(), paired / np.std(paired, ddof=1),
                               rtol=1e-6)
    whole = np.array([[-10.0, -8.0, -1.0, 19.0]])
    np.testing.assert_allclose(pl.segment_advantages(one_step, 4, 4).numpy(), whole / np.std(whole, ddof=1),
                               rtol=1e-6)


def test_advantages_are_the_returns_against_the_other_rollouts_by_hand():
    """2 steps, 1 segment x K=2, gamma 0.5, lambda 1, the episode ending after the last step (nothing
    bootstrapped): the critic's targets are the returns, and the advantages are those returns centred over
    the pair and scaled: the values V(s_t) do not enter."""
    buf = {"rewards": torch.tensor([[1.0, 3.0], [2.0, 0.0]]), "values": torch.tensor([[5.0, -5.0], [1.0, 2.0]]),
           "dones": torch.zeros(2, 2)}
    agent = pl.Agent(te.OBS_DIM, 8)
    next_obs, next_done = torch.zeros(2, te.OBS_DIM), torch.ones(2)
    returns = np.array([[1.0 + 0.5 * 2.0, 3.0 + 0.5 * 0.0], [2.0, 0.0]])
    args = pl.Args(samples_per_segment=2, gae_lambda=1.0)
    advantages, target = pl.advantages_and_returns(agent, buf, next_obs, next_done, 0.5, args)
    np.testing.assert_allclose(target.numpy(), returns)
    centred = np.array([[-0.5, 0.5], [1.0, -1.0]])
    np.testing.assert_allclose(advantages.numpy(), centred / np.std(centred, ddof=1), rtol=1e-6)


def test_learning_rate_halves_at_its_half_life_whatever_the_budget(tiny):
    short, long = tiny(learning_rate=1.0), tiny(learning_rate=1.0, total_timesteps=10**9)
    steps = (0, pl.LR_HALF_LIFE, 2 * pl.LR_HALF_LIFE)
    assert [pl.learning_rate_at(s, short) for s in steps] == [pl.learning_rate_at(s, long) for s in steps] == \
        pytest.approx([1.0, 0.5, 1 / 3])


def test_late_gamma_switches_the_discount_at_its_step(default_run, tiny):
    """The tiny run's rollouts start at steps 0, 80, 160, 240. A switch past the budget trains as the default
    run, switches at 160 and 240 change the weights; the discount used is logged."""
    late = tiny(late_gamma=(0.95, 0.98), late_gamma_from=(160, 240))
    assert [pl.gamma_at(step, late) for step in (0, 80, 159, 160, 239, 240, 10**9)] == \
        [0.9, 0.9, 0.9, 0.95, 0.95, 0.98, 0.98]
    assert pl.gamma_at(10**9, tiny(late_gamma=(), late_gamma_from=())) == 0.9

    def final(run: Path) -> dict:
        return _weights(run / "final_model.pt")

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(v, b[k]) for k, v in a.items())

    assert same(final(pl.train(tiny(late_gamma=(0.95,), late_gamma_from=(320,), exp_name="never",
                                    eval_every=10**9))), final(default_run))
    switched_run = pl.train(dataclasses.replace(late, exp_name="switched", eval_every=10**9))
    assert not same(final(switched_run), final(default_run))
    events = EventAccumulator(str(switched_run))
    events.Reload()
    assert [e.value for e in events.Scalars("charts/gamma")] == pytest.approx([0.9, 0.9, 0.95, 0.98])


def test_resume_is_exact_with_other_options(tiny):
    options = dict(samples_per_segment=4, common_noise=False, antithetic_noise=True, noise_correlation=0.5,
                   late_gamma=(0.8,), late_gamma_from=(400,),  # the switch falls after the resume
                   curvature_inputs=False, hidden=24, clip_vloss=False, num_envs=8)
    full = pl.train(tiny(total_timesteps=640, checkpoint_every=320, eval_every=10**9, **options))
    resumed = pl.train(dataclasses.replace(tiny(), resume=str(full / "checkpoints" / "checkpoint_320.pt")))
    _same_stats(_stats(full), _stats(resumed))
    for k, v in _weights(full / "final_model.pt").items():
        assert torch.equal(v, _weights(resumed / "final_model.pt")[k]), k


def test_saved_policy_is_the_running_average_of_the_live_weights(tiny):
    """The saved policy is the live weights after the first update, then EMA_DECAY * itself + (1 - EMA_DECAY)
    * the live weights after each later one; checkpoints keep the live weights, from which a run resumes, and
    the best model is the average that scored best."""
    run = pl.train(tiny(checkpoint_every=80, eval_every=80, exp_name="ema"))
    checkpoints = [torch.load(run / "checkpoints" / f"checkpoint_{step}.pt", weights_only=False)
                   for step in (80, 160, 240, 320)]
    decay = pl.EMA_DECAY
    average = {k: v.clone() for k, v in checkpoints[0]["live_agent"].items()}
    for checkpoint in checkpoints[1:]:
        for k, live in checkpoint["live_agent"].items():  # buffers (the normalizer) are constant
            average[k] = decay * average[k] + (1 - decay) * live
    final = _weights(run / "final_model.pt")
    assert not torch.equal(final["actor_mean.4.weight"], checkpoints[-1]["live_agent"]["actor_mean.4.weight"])
    for k, v in average.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-7)
        assert torch.equal(final[k], checkpoints[-1]["agent"][k]), k  # a checkpoint's model is the average too
    stats = _stats(run)
    evaluated = stats["eval_total_cost"][np.isfinite(stats["eval_total_cost"])]
    assert torch.load(run / "best_model.pt", weights_only=False)["eval_total_cost"] == evaluated.min()


# --- Exploration noise ---------------------------------------------------------------------------
def test_antithetic_pairs_mirror_their_noise():
    agent = pl.Agent(te.OBS_DIM, 16, init_logstd=-1.0)
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
    agent = pl.Agent(te.OBS_DIM, 16, init_logstd=-1.0)
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


def test_noise_logprob_is_the_ar1_process_density_under_the_new_policy():
    """Summed over a rollout, the per-step log-probabilities under an updated policy are the log-density of its
    whole AR(1) noise path, n_t = a_t - mean'(s_t) with innovations n_t - rho n_{t-1} (restarting where an
    episode starts); the log-probabilities conditioned on the rollout's stored offsets are not."""
    steps, envs, rho = 30, 8, 0.8
    args = pl.Args(noise_correlation=rho)
    torch.manual_seed(0)
    agent = pl.Agent(te.OBS_DIM, 16, init_logstd=-1.0)
    torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.5)
    buf = {"obs": torch.randn((steps, envs, te.OBS_DIM)), "dones": torch.zeros(steps, envs),
           "actions": torch.zeros(steps, envs, 1), "noise_offsets": torch.zeros(steps, envs, 1)}
    buf["dones"][12, 1] = buf["dones"][17, 2] = 1.0  # environments 1 and 2 start new episodes
    noise = torch.zeros((envs, 1))
    with torch.no_grad():
        for step in range(steps):
            noise = noise * (1.0 - buf["dones"][step])[:, None]
            buf["actions"][step], buf["noise_offsets"][step], noise = pl.exploration_actions(
                agent, buf["obs"][step], noise, rho, True)
        previous = [x.reshape(steps * envs, -1) for x in pl.previous_steps(buf)]
        flat = {k: buf[k].reshape(steps * envs, -1) for k in ("obs", "actions", "noise_offsets")}
        unchanged = pl.carried_noise(agent, flat["noise_offsets"], *previous, args)
        np.testing.assert_allclose(unchanged.numpy(), flat["noise_offsets"].numpy(), atol=1e-6)

        torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.5)  # the policy after an update
        joint = pl.carried_noise(agent, flat["noise_offsets"], *previous, args)
        logprob = {name: agent.get_action_and_value(flat["obs"], flat["actions"], offsets)[1].reshape(steps, envs)
                   for name, offsets in (("joint", joint), ("conditioned", flat["noise_offsets"]))}
        n = (buf["actions"] - agent.actor_mean(agent.inputs(buf["obs"])))[..., 0].numpy()
    std = float(np.exp(-1.0))
    carried = np.concatenate([np.zeros((1, envs)), rho * n[:-1] * (1 - buf["dones"][1:].numpy())])
    innovations = n - carried
    density = (-0.5 * (innovations / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(0)
    np.testing.assert_allclose(logprob["joint"].sum(0).numpy(), density, rtol=1e-5)
    assert np.abs(logprob["conditioned"].sum(0).numpy() - density).min() > 0.1


# --- Checkpoints of earlier versions --------------------------------------------------------------
OLD_RUN = ROOT / "tests" / "data" / "run_9e7e735"  # a tiny default-flags run of 9e7e735, the last main with variants


def _old_run_here(tmp_path, model_path, real_data) -> Path:
    """The old run's folder, its saved paths pointed at this machine's assets (as a user's moved run would)."""
    run = tmp_path / OLD_RUN.name
    shutil.copytree(OLD_RUN, run)
    path = run / "checkpoints" / "checkpoint_80.pt"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["args"].update(sim_model_path=str(model_path), eval_data_path=str(real_data))
    torch.save(checkpoint, path)
    return run


def test_a_checkpoint_of_the_previous_main_loads_scores_exports_and_resumes(tmp_path, model_path, real_data,
                                                                            real_segments, model):
    """9e7e735 wrote these files (default flags, a tiny budget, --hidden 8): its final policy scores the
    per-segment costs that version scored, and its mid-run checkpoint resumes to that version's final policy."""
    agent, _ = pl.load_agent(OLD_RUN / "final_model.pt")
    recorded = json.loads((OLD_RUN / "final_model_costs.json").read_text())
    assert recorded["segments"] == real_segments.names
    np.testing.assert_array_equal(pl.evaluate(agent, model, real_segments)["total_cost"], recorded["total_cost"])

    run = _old_run_here(tmp_path, model_path, real_data)
    resumed = pl.train(pl.Args(resume=str(run / "checkpoints" / "checkpoint_80.pt"), progress=False))
    assert resumed == run
    for k, v in _weights(OLD_RUN / "final_model.pt").items():  # another CPU may round differently: close, not equal
        torch.testing.assert_close(_weights(run / "final_model.pt")[k], v, rtol=1e-4, atol=1e-6)
    old_stats = np.load(OLD_RUN / "training_stats.npz")
    np.testing.assert_allclose(_stats(run)["value_loss"], old_stats["value_loss"], rtol=1e-4)


@pytest.mark.parametrize("flag, value", [("value_baseline", True), ("policy_dist", "tanh"), ("ema_decay", 0.0),
                                         ("jerk_weight", 1.2), ("teacher", "pid"), ("curvature_inputs", None),
                                         ("late_gamma", None)])
def test_a_checkpoint_that_used_a_removed_variant_or_predates_a_flag_is_refused(tmp_path, flag, value):
    """A version-3 run that used a variant this version no longer has, or was written before one of 9e7e735's
    flags existed (value None: the flag is missing), is refused in one line naming the flag and the commit to use;
    one with the removed fields at the recipe's values loads with today's arguments."""
    checkpoint = torch.load(OLD_RUN / "final_model.pt", weights_only=False)
    fields = {f.name for f in dataclasses.fields(pl.Args)}
    _, loaded = pl.load_agent(OLD_RUN / "final_model.pt")
    assert loaded["args"] == {k: v for k, v in checkpoint["args"].items() if k in fields}
    pl.Args(**loaded["args"])
    if value is None:
        del checkpoint["args"][flag]
    else:
        checkpoint["args"][flag] = value
    pl.save_checkpoint(checkpoint, tmp_path / "old.pt")
    with pytest.raises(te.TinyPhysicsError) as refused:
        pl.load_agent(tmp_path / "old.pt")
    named = f"--{flag.replace('_', '-')}" + ("" if value is None else f" {value}")
    assert named in str(refused.value) and "9e7e735" in str(refused.value)
    assert "\n" not in str(refused.value)


# --- Honest model selection, and a copy of the script that changes the actor ------------------------
def test_validation_segments_are_apart_from_training_and_from_the_official_test_set(tmp_path, real_data):
    """Without --eval-data-path the validation segments (periodic evaluation, best_model.pt) are the last
    --eval-segments of the training part, not trained on; the official evaluation set (the first 5,000 in
    sorted order; here, with few segments, the first half) is neither. With --eval-data-path that folder
    validates, and all of --data-path trains."""
    te.synthesize_segments(30, seed=3, out_dir=tmp_path / "data")
    test_set = set(te.load_segments(tmp_path / "data", progress=False).names[:15])
    train, validation, where = pl.load_splits(pl.Args(data_path=str(tmp_path / "data"), eval_segments=5,
                                                      progress=False))
    assert validation.names == [f"{i:05d}" for i in range(25, 30)] and "the last 5 training segments" in where
    assert train.names == [f"{i:05d}" for i in range(15, 25)]
    assert not (set(train.names) | set(validation.names)) & test_set
    train, validation, where = pl.load_splits(pl.Args(data_path=str(tmp_path / "data"), eval_segments=4,
                                                      eval_data_path=str(real_data), progress=False))
    assert len(train) == 30 and validation.names == ["00000", "00001", "00002", "00003"] and where == str(real_data)
    train, validation, _ = pl.load_splits(pl.Args(synthetic_train=12, eval_segments=3, progress=False))
    assert len(train) == 9 and not set(train.names) & set(validation.names)
    with pytest.raises(te.TinyPhysicsError, match="--eval-segments 12 leaves none of the 12 training segments"):
        pl.load_splits(pl.Args(synthetic_train=12, eval_segments=12, progress=False))


def test_saved_policies_record_the_segments_that_chose_them(default_run, real_data):
    names = te.load_segments(real_data).names[:2]
    for name in ("best_model.pt", "final_model.pt"):
        assert torch.load(default_run / name, weights_only=False)["selection_segments"] == names


def _copied_script(tmp_path: Path, old: str, new: str) -> Path:
    """ppo_lateral.py copied, with one edit, as a user makes a variant."""
    source = (ROOT / "ppo_lateral.py").read_text()
    assert source.count(old) == 1
    script = tmp_path / "ppo_variant.py"
    script.write_text(source.replace(old, new))
    return script


TINY_FLAGS = ["--synthetic-train", "16", "--eval-segments", "2", "--num-envs", "4", "--samples-per-segment", "2",
              "--num-steps", "20", "--total-timesteps", "160", "--num-minibatches", "2",
              "--eval-every", "80", "--no-progress"]


def test_a_copy_with_a_deeper_relu_actor_trains_saves_scores_and_exports(tmp_path, model_path, real_data):
    """A variant with one more hidden layer and ReLU instead of tanh needs no other edit: its checkpoints
    describe the layers, ppo_lateral_eval.py rebuilds and scores them, and the exported controller scores the
    same per-segment costs."""
    tanh = ("layer_init(nn.Linear(in_dim, hidden)), nn.Tanh(),\n"
            "                                 layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),")
    relu = ("layer_init(nn.Linear(in_dim, hidden)), nn.ReLU(),\n"
            "                                 layer_init(nn.Linear(hidden, hidden)), nn.ReLU(),\n"
            "                                 layer_init(nn.Linear(hidden, hidden)), nn.ReLU(),")
    script = _copied_script(tmp_path, tanh, relu)
    assets = ["--sim-model-path", str(model_path)]
    trained = subprocess.run([sys.executable, str(script), *assets, "--eval-data-path", str(real_data), *TINY_FLAGS],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    final = tmp_path / trained.stdout.strip().splitlines()[-1] / "final_model.pt"
    agent, checkpoint = pl.load_agent(final)  # this module's Agent, rebuilt from the checkpoint's layer list
    assert [type(m).__name__ for m in agent.actor_mean] == ["Linear", "ReLU"] * 3 + ["Linear"]
    assert agent.actor_mean[-1].weight.abs().max() > 0  # it trained

    package = tmp_path / "challenge" / "controllers"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("class BaseController:\n    pass\n")
    results = {}
    for name, flags in (("checkpoint", ["--model-path", str(final), "--export-controller", str(package / "v.py")]),
                        ("export", ["--controller", str(package / "v.py")])):
        scored = subprocess.run([sys.executable, str(ROOT / "ppo_lateral_eval.py"), *assets, "--data-path",
                                 str(real_data), "--num-segs", "3", "--baseline", "none", "--no-progress",
                                 "--results-csv", str(tmp_path / f"{name}.csv"), *flags],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert scored.returncode == 0, scored.stderr
        results[name] = np.loadtxt(tmp_path / f"{name}.csv", delimiter=",", skiprows=1, usecols=4)
    np.testing.assert_array_equal(results["checkpoint"], results["export"])
    assert checkpoint["eval_total_cost"] == pytest.approx(results["checkpoint"][:2].mean(), rel=1e-12)


def test_a_numpy_policy_that_does_not_compute_the_agent_is_refused_at_the_first_save(tmp_path, model_path, real_data):
    script = _copied_script(tmp_path, 'x = (obs - params["obs_offset"]) * params["obs_scale"]',
                            'x = (obs + params["obs_offset"]) * params["obs_scale"]')
    result = subprocess.run([sys.executable, str(script), "--sim-model-path", str(model_path), "--eval-data-path",
                             str(real_data), *TINY_FLAGS], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 2, result.stderr  # the split it validates on, then
    assert "error: the numpy policy differs from the torch agent in the inputs (Agent.inputs against numpy_inputs)" \
        in result.stderr
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.part"))


# --- Weights & Biases (--track, an optional extra) --------------------------------------------------
def test_track_logs_the_runs_scalars_to_an_offline_wandb_run(tiny, monkeypatch):
    pytest.importorskip("wandb")  # installed by .ci/run (pip install -e ".[dev,track]")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = pl.train(tiny(track=True, total_timesteps=160, eval_every=80, exp_name="tracked"))
    records = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1 and records[0].stat().st_size > 0
    data = records[0].read_bytes()
    assert b"eval/total_cost" in data and b"losses/policy_loss" in data  # the TensorBoard scalars, mirrored


def test_track_without_wandb_is_a_one_line_error_before_any_work(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    args = tiny(track=True)
    with pytest.raises(te.TinyPhysicsError, match=re.escape('pip install -e ".[track]"')):
        pl.train(args)
    assert not Path(args.runs_dir).exists()
