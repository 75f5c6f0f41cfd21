"""benchmark/drift.py: re-assembling a run's end from its updates with random signs, and weight averages."""

from pathlib import Path

import numpy as np
import pytest
import torch

import ppo_lateral as pl
import tinyphysics_env as te


@pytest.fixture(scope="module")
def drift(benchmark_script):
    return benchmark_script("drift")


def test_recombine_adds_each_update_with_its_sign(drift):
    states = [{"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([1.0, 3.0])}]
    assert torch.equal(drift.recombine(states, np.array([1.0, 1.0]))["w"], states[-1]["w"])
    assert torch.equal(drift.recombine(states, np.array([-1.0, 1.0]))["w"], torch.tensor([-1.0, 3.0]))
    assert torch.equal(drift.recombine(states, np.array([1.0, -1.0]))["w"], torch.tensor([1.0, -1.0]))
    assert torch.equal(drift.average(states)["w"], torch.tensor([2.0 / 3.0, 5.0 / 3.0]))


def write_run(run_dir: Path, steps: list[int], live: bool) -> list[pl.Agent]:
    """Checkpoints of residual agents whose actor output layers differ, as a run with or without averaged
    weights writes them (with --ema-decay the live weights are kept beside the averaged ones)."""
    agents = []
    for step in steps:
        torch.manual_seed(step)
        agent = pl.Agent(te.OBS_DIM, 8, "residual", 0.25, -4.0)
        torch.nn.init.normal_(agent.actor_mean[4].weight, std=0.01)
        averaged = pl.Agent(te.OBS_DIM, 8, "residual", 0.25, -4.0)
        extra = {"live_agent": agent.state_dict()} if live else {}
        pl.save_checkpoint(pl.policy_checkpoint(averaged if live else agent, **extra),
                           run_dir / "checkpoints" / f"checkpoint_{step}.pt")
        agents.append(agent)
    return agents


@pytest.mark.parametrize("live", [False, True])
def test_checkpoint_states_reads_the_live_weights_in_step_order(drift, tmp_path, live):
    agents = write_run(tmp_path, [1_204_800, 998_400, 2_000_000, 1_600_000], live)
    steps, states, _ = drift.checkpoint_states(tmp_path, 1_000_000)
    assert steps == [1_204_800, 1_600_000, 2_000_000]
    for state, agent in zip(states, [agents[0], agents[3], agents[2]]):
        assert torch.equal(state["actor_mean.4.weight"], agent.actor_mean[4].weight)
    with pytest.raises(te.TinyPhysicsError, match="need 3 or more"):
        drift.checkpoint_states(tmp_path, 1_500_000)


def test_drift_runs_end_to_end(drift, tmp_path, real_data, model_path, capsys):
    agents = write_run(tmp_path, [100, 200, 300], live=False)
    drift.main(drift.Args(run_dir=str(tmp_path), start_step=0, eval_data_path=str(real_data), segments=2,
                          trials=2, sim_model_path=str(model_path)))
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:44].strip(): [float(x) for x in line[44:].split()] for line in lines[2:]}
    assert len(rows) == 6
    assert all(len(values) == 4 and np.isfinite(values).all() for values in rows.values())
    segments = te.load_segments(real_data, progress=False).subset(np.arange(2))
    model = te.load_sim_model(model_path, threads=1)
    for label, agent in (("start (100)", agents[0]), ("end (300)", agents[2])):
        assert rows[label][0] == pytest.approx(pl.evaluate(agent, model, segments)["total_cost"].mean(), abs=1e-3)
    assert rows["end (300)"][0] != rows["start (100)"][0]


def test_no_segments_is_refused_before_any_work(drift, tmp_path):
    with pytest.raises(te.TinyPhysicsError, match="--segments 0, --trials 4: need at least 1 segment"):
        drift.main(drift.Args(run_dir=str(tmp_path), segments=0))
