"""Data-parallel PPO under torchrun: 2 CPU processes with gloo against one process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ppo_lateral as pl

ROOT = Path(__file__).resolve().parent.parent


def _flags(model_path, real_data, runs_dir, **overrides):
    flags = {"sim-model-path": model_path, "eval-data-path": real_data, "synthetic-train": 16, "eval-segments": 2,
             "num-envs": 8, "samples-per-segment": 2, "num-steps": 20, "total-timesteps": 640, "num-minibatches": 2,
             "update-epochs": 2, "eval-every": 640, "checkpoint-every": 320,
             "runs-dir": runs_dir,
             **overrides}
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))] + ["--no-progress"]


def _run(tmp_path, flags, processes):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes else []
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, *launcher, str(ROOT / "ppo_lateral.py"), *flags], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    return result


def _stats(run_dir: Path) -> dict:
    with np.load(run_dir / "training_stats.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, model_path, real_data):
    tmp = tmp_path_factory.mktemp("ddp")
    result = _run(tmp, _flags(model_path, real_data, tmp / "runs"), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


def test_two_processes_share_one_run_and_identical_weights(two_process_run):
    runs = list((two_process_run / "runs").iterdir())
    assert len(runs) == 1  # rank 0 named the run; rank 1 wrote nothing of its own
    run_dir = runs[0]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    final = torch.load(run_dir / "final_model.pt", weights_only=False)
    agent, _ = pl.load_agent(run_dir / "final_model.pt")
    assert final["replica_fingerprints"] == [pl.weights_fingerprint(agent)] * 2
    checkpoint = torch.load(run_dir / "checkpoints" / "checkpoint_320.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2
    np.testing.assert_array_equal(_stats(run_dir)["global_step"], [0, 160, 320, 480, 640])  # global steps


def test_matches_one_process_with_the_same_global_batch(two_process_run, tmp_path, model_path, real_data):
    """Same start (rank 0's warm start on all training segments, broadcast), same global batch and
    step schedule. The rollouts cannot be equal: each process draws its own segments (from a disjoint
    share) and its own simulator noise and actions, and normalises advantages over its own minibatch.
    So the trajectories differ, and only the learning is compared, within a tolerance. The exact part
    of the equivalence, the averaged gradient, is checked by the next test."""
    result = _run(tmp_path, _flags(model_path, real_data, tmp_path / "runs"), processes=0)
    assert result.returncode == 0, result.stderr[-3000:]
    one = _stats(next((tmp_path / "runs").iterdir()))
    two = _stats(next((two_process_run / "runs").iterdir()))
    assert one["eval_total_cost"][0] == two["eval_total_cost"][0]  # the same starting policy, exactly
    for key in ("global_step", "learning_rate"):
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
    # Four updates of a tiny run move its policy by about as much as the different rollouts do.
    assert two["eval_total_cost"][-1] == pytest.approx(one["eval_total_cost"][-1], rel=0.25)
    assert np.nanmean(two["value_loss"]) == pytest.approx(np.nanmean(one["value_loss"]), rel=0.5)


GRADIENT_CHECK = """
import torch
import torch.distributed as dist

import ppo_lateral as pl
import tinyphysics_env as te

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
replica, whole = pl.Agent(te.OBS_DIM, 16), pl.Agent(te.OBS_DIM, 16)
whole.load_state_dict(replica.state_dict())
obs = torch.randn(8 * world, te.OBS_DIM, generator=torch.Generator().manual_seed(1))
actions = torch.randn(8 * world, 1, generator=torch.Generator().manual_seed(2))


def loss(agent, x, a):
    _, logprob, _, value = agent.get_action_and_value(x, a, torch.zeros_like(a))
    return (value[:, 0] ** 2).mean() - logprob.mean()


loss(replica, obs[8 * rank:8 * rank + 8], actions[8 * rank:8 * rank + 8]).backward()
pl.average_gradients(replica, world)
loss(whole, obs, actions).backward()
diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(replica.parameters(), whole.parameters()))
print(f"rank {rank}: max gradient difference {diff:.3g}")
assert diff < 1e-6
dist.destroy_process_group()
"""


def test_averaged_gradient_is_the_whole_batch_gradient(tmp_path):
    """Each of 2 processes takes the gradient of the mean loss over its half of a batch; averaged with
    `average_gradients` it equals the gradient of the mean loss over the whole batch in one process."""
    script = tmp_path / "check.py"
    script.write_text(GRADIENT_CHECK)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("max gradient difference") == 2


def test_distributed_resume_matches_the_uninterrupted_run(two_process_run, tmp_path):
    """Resumed from its mid-run checkpoint (each process gets back its own environments and random
    streams), the 2-process run ends with the same weights, bit for bit; one process may not resume it."""
    run_dir = next((two_process_run / "runs").iterdir())
    final = run_dir / "final_model.pt"
    expected = torch.load(final, weights_only=False)["replica_fingerprints"]
    final.unlink()
    resume = ["--resume", str(run_dir / "checkpoints" / "checkpoint_320.pt"), "--no-progress"]
    wrong = _run(tmp_path, resume, processes=0)
    assert wrong.returncode == 2 and "written by 2 processes" in wrong.stderr and not final.exists()
    result = _run(tmp_path, resume, processes=2)  # the saved arguments write into the same run folder
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(final, weights_only=False)["replica_fingerprints"] == expected
