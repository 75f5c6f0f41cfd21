"""benchmark/by_difficulty.py: a later checkpoint's change in cost, by the reference's difficulty groups."""

import numpy as np
import pytest
import torch

import ppo_lateral as pl
import tinyphysics_env as te


@pytest.fixture(scope="module")
def by_difficulty(benchmark_script):
    return benchmark_script("by_difficulty")


def test_groups_run_from_the_easiest_and_cover_every_segment_once(by_difficulty):
    reference = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0])
    groups = by_difficulty.difficulty_groups(reference, 3)
    assert [g.tolist() for g in groups] == [[1, 5], [3, 0], [4, 2]]


def test_changes_by_hand(by_difficulty):
    reference = {"total_cost": np.array([10.0, 20.0, 30.0]), "jerk_cost": np.array([4.0, 5.0, 6.0]),
                 "lataccel_cost": np.array([0.12, 0.3, 0.48])}
    later = {"total_cost": np.array([9.0, 23.0, 30.0]), "jerk_cost": np.array([5.0, 5.0, 7.0]),
             "lataccel_cost": np.array([0.08, 0.36, 0.46])}
    c = by_difficulty.changes(reference, later, np.array([0, 1]))
    assert c == pytest.approx({"total": 1.0, "jerk": 0.5, "lataccel": 50 * 0.01, "better": 0.5})


@pytest.fixture
def residual_checkpoints(tmp_path):
    """A pid_ff residual policy at its step-0 weights (the teacher itself) and one moved away from them."""
    paths = []
    for name, std in (("teacher", 0.0), ("moved", 0.02)):
        torch.manual_seed(0)
        agent = pl.Agent(te.OBS_DIM, 8, "residual", 0.25, -4.0)
        torch.nn.init.normal_(agent.actor_mean[4].weight, std=std)
        paths.append(tmp_path / f"{name}.pt")
        pl.save_checkpoint(pl.policy_checkpoint(agent), paths[-1])
    return paths


def test_by_difficulty_runs_end_to_end(by_difficulty, residual_checkpoints, real_data, model_path, capsys):
    paths = residual_checkpoints
    by_difficulty.main(by_difficulty.Args(checkpoints=tuple(map(str, paths)), eval_data_path=str(real_data),
                                          segments=4, groups=2, sim_model_path=str(model_path)))
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {paths[1]}")]
    assert [r[2].strip()[:6] for r in rows] == ["1 of 2", "2 of 2", "all", "median"]
    segments = te.load_segments(real_data, progress=False).subset(np.arange(4))
    model = te.load_sim_model(model_path, threads=1)
    costs = [pl.evaluate(pl.load_agent(p)[0], model, segments)["total_cost"] for p in paths]
    assert float(rows[2][3]) == pytest.approx(costs[1].mean() - costs[0].mean(), abs=1e-3)
    assert float(rows[2][3]) != 0.0


def test_a_controller_can_be_the_reference(by_difficulty, residual_checkpoints, real_data, model_path, capsys):
    """pid_ff scored as a controller against its own residual policy at step 0: no segment changes."""
    teacher = residual_checkpoints[0]
    by_difficulty.main(by_difficulty.Args(checkpoints=("pid_ff", str(teacher)), eval_data_path=str(real_data),
                                          segments=4, groups=2, sim_model_path=str(model_path)))
    out = capsys.readouterr().out
    assert "reference pid_ff: mean" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith(f"| {teacher}")]
    assert len(rows) == 4
    assert all(float(r[3]) == 0.0 for r in rows)
    assert [r[6].strip() for r in rows[:3]] == ["0%"] * 3


def test_one_checkpoint_is_refused_before_any_work(by_difficulty):
    with pytest.raises(te.TinyPhysicsError, match="1 checkpoints, --segments 200, --groups 4: need 2 or more"):
        by_difficulty.main(by_difficulty.Args(checkpoints=("a.pt",)))
