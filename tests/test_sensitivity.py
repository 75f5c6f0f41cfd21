"""benchmark/sensitivity.py: how strongly a policy answers each part of its observation."""

import numpy as np
import pytest
import torch

import ppo_lateral as pl
import tinyphysics_env as te


@pytest.fixture(scope="module")
def sensitivity(benchmark_script):
    return benchmark_script("sensitivity")


def residual_agent(last_std: float, first_gain: float = 1.0) -> pl.Agent:
    torch.manual_seed(0)
    agent = pl.Agent(te.OBS_DIM, 8, "residual", 0.25, -4.0)
    with torch.no_grad():
        torch.nn.init.normal_(agent.actor_mean[4].weight, std=last_std)
        agent.actor_mean[0].weight.mul_(first_gain)
    return agent


def test_the_teacher_answers_nothing_and_the_answer_is_linear_in_the_last_layer(sensitivity):
    obs = np.random.default_rng(0).normal(size=(50, te.OBS_DIM)).astype(np.float32)
    assert set(sensitivity.sensitivity(residual_agent(0.0), obs).values()) == {0.0}
    moved = residual_agent(0.02)
    once = sensitivity.sensitivity(moved, obs)
    with torch.no_grad():
        moved.actor_mean[4].weight.mul_(2.0)
    twice = sensitivity.sensitivity(moved, obs)
    assert set(once) == {name for name, _ in te.OBS_LAYOUT} and all(v > 0 for v in once.values())
    assert twice == pytest.approx({k: 2 * v for k, v in once.items()}, rel=1e-5)


def test_saturation_counts_first_layer_units_past_two(sensitivity):
    obs = np.random.default_rng(0).normal(size=(50, te.OBS_DIM)).astype(np.float32)
    agent = residual_agent(0.02)
    pre = agent.actor_mean[0](agent.inputs(torch.as_tensor(obs))).detach()
    assert sensitivity.saturation(agent, obs) == pytest.approx(float((pre.abs() > 2).float().mean()))
    assert sensitivity.saturation(residual_agent(0.02, first_gain=1e-3), obs) == 0.0
    assert sensitivity.saturation(residual_agent(0.02, first_gain=1e3), obs) > 0.9


def test_sensitivity_runs_end_to_end(sensitivity, tmp_path, real_data, model_path, capsys):
    paths = []
    for name, std in (("start", 0.0), ("moved", 0.02)):
        paths.append(tmp_path / f"{name}.pt")
        pl.save_checkpoint(pl.policy_checkpoint(residual_agent(std)), paths[-1])
    sensitivity.main(sensitivity.Args(checkpoints=tuple(map(str, paths)), eval_data_path=str(real_data), segments=4,
                                      sim_model_path=str(model_path)))
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith(f"| {tmp_path}")}
    assert len(rows[str(paths[0])]) == len(te.OBS_LAYOUT) + 2
    assert all(float(v) == 0.0 for v in rows[str(paths[0])][:-2])
    assert all(float(v) > 0.0 for v in rows[str(paths[1])][:-2])
    with pytest.raises(te.TinyPhysicsError, match="need 2 or more checkpoints"):
        sensitivity.main(sensitivity.Args(checkpoints=(str(paths[0]),), eval_data_path=str(real_data)))
