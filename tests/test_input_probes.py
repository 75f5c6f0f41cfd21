"""benchmark/context_inputs.py: training on the observation with more inputs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import ppo_lateral as pl
import tinyphysics_env as te

ROOT = Path(__file__).resolve().parent.parent


def test_context_observation_appends_past_states_at_their_rows(benchmark_script, real_segments, model_path):
    probe = benchmark_script("context_inputs")
    context_observe = benchmark_script("common").observe_with(probe.past_context)
    sim = te.TinyPhysicsSim(te.load_sim_model(model_path, threads=1), official_rng=True)
    sim.reset(real_segments.first(2))
    for _ in range(5):  # step 25: the rows before step 20 read as step 20's
        sim.step(None)
    early = context_observe(sim, np.float64)
    assert np.array_equal(early[:, :te.OBS_DIM], te.observe(sim, np.float64))
    sim.warm_up()
    late = context_observe(sim, np.float64)
    assert np.array_equal(late[:, :te.OBS_DIM], te.observe(sim, np.float64))
    h = te.OBS_HISTORY
    for i, field in enumerate(probe.CONTEXT_FIELDS):
        part = slice(te.OBS_DIM + i * h, te.OBS_DIM + (i + 1) * h)
        data = np.asarray(getattr(real_segments.first(2), field))
        assert np.array_equal(late[:, part], data[:, sim.t - h:sim.t])
        assert np.array_equal(early[:, part], data[:, [20] * 15 + list(range(20, 25))])


def test_probe_run_trains_end_to_end_from_the_teacher(tmp_path, model, model_path, real_data):
    flags = {"sim-model-path": model_path, "eval-data-path": real_data, "synthetic-train": 16, "eval-segments": 2,
             "num-envs": 8, "samples-per-segment": 2, "num-steps": 20, "total-timesteps": 320, "num-minibatches": 2,
             "update-epochs": 1, "eval-every": 320, "runs-dir": tmp_path}
    args = [x for k, v in flags.items() for x in (f"--{k}", str(v))] + ["--no-progress"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmark" / "context_inputs.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    agent, _ = pl.load_agent(run_dir / "final_model.pt")
    assert agent.obs_offset.numel() == te.OBS_DIM + 3 * te.OBS_HISTORY
    with np.load(run_dir / "training_stats.npz") as f:
        step0 = f["eval_total_cost"][0]
    teacher = te.rollout_controllers(te.TinyPhysicsSim(model), te.load_segments(real_data).first(2),
                                     te.PIDFeedforwardController)["total_cost"]
    assert step0 == teacher.mean()  # the residual's output layer starts at zero: step 0 is the teacher
    assert torch.isfinite(agent.actor_mean[0].weight).all()
