"""benchmark/pathwise.py: the differentiable rollout against the simulator, and the token embedding's gradient."""

import copy

import numpy as np
import pytest
import torch

import ppo_lateral as pl
import tinyphysics_env as te


@pytest.fixture(scope="module")
def pathwise(benchmark_script):
    return benchmark_script("pathwise")


@pytest.fixture(scope="module")
def moved_policy():
    """A residual policy whose actor reads every part of the observation (so a misplaced entry shows)."""
    torch.manual_seed(0)
    agent = pl.Agent(te.OBS_DIM, 8, "residual", 0.25, -4.0)
    torch.nn.init.normal_(agent.actor_mean[4].weight, std=0.05)
    return agent.double()


def test_token_embedding_is_exact_forward_and_interpolates_backward(pathwise):
    table = torch.randn(te.VOCAB_SIZE, 3, dtype=torch.float64)
    x = torch.tensor([[0.3, -1.2345, 7.0]], dtype=torch.float64, requires_grad=True)
    out = pathwise.token_embedding(table, x)
    assert torch.equal(out.detach(), table[torch.as_tensor(te.encode(x.detach().numpy()))])
    out[..., 2].sum().backward()
    width = te.BINS[1] - te.BINS[0]
    for i, value in enumerate((0.3, -1.2345)):
        low = int(np.floor((value - te.LATACCEL_RANGE[0]) / width))
        assert x.grad[0, i].item() == pytest.approx(((table[low + 1, 2] - table[low, 2]) / width).item())
    assert x.grad[0, 2].item() == 0.0  # clipped to the range's end: no slope


def test_expected_rollout_equals_the_simulator(pathwise, moved_policy, synthetic_data, model_path):
    segments = te.load_segments(synthetic_data, progress=False).first(2)
    model = te.load_sim_model(model_path, threads=1)
    params = moved_policy.numpy_params()
    reference = te.rollout_policy(te.TinyPhysicsSim(model, official_rng=False, dynamics="expected"), segments,
                                  lambda obs: pl.numpy_policy(params, obs))["total_cost"]
    costs = pathwise.rollout_costs(moved_policy, pathwise.model_weights(model_path), segments, "expected")
    np.testing.assert_allclose(costs.detach().numpy(), reference, rtol=1e-5)


def test_sampled_rollout_with_official_uniforms_scores_as_the_official_loop(pathwise, moved_policy, real_segments,
                                                                             model_path):
    """Official noise, official costs: equal up to a rare token flip where the port's logits differ by ~1e-5."""
    segments = real_segments.first(2)
    model = te.load_sim_model(model_path, threads=1)
    agent = copy.deepcopy(moved_policy)
    official = pathwise.score(agent, model, segments)
    costs = pathwise.rollout_costs(agent, pathwise.model_weights(model_path), segments, "sampled",
                                   torch.as_tensor(te.official_uniforms(segments.names)))
    np.testing.assert_allclose(costs.detach().numpy(), official, rtol=1e-2)
    costs.sum().backward()
    grads = [p.grad for p in agent.actor_mean.parameters()]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_finetune_runs_end_to_end_and_saves_a_policy(pathwise, real_data, model_path, tmp_path, capsys):
    out = tmp_path / "pw.pt"
    pathwise.main(pathwise.Args(mode="finetune", policies=("pid_ff",), eval_data_path=str(real_data), segments=2,
                                sim_model_path=str(model_path), threads=1, synthetic_train=4, batch=2, iterations=1,
                                learning_rate=1e-3, save_path=str(out)))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step 0: held-out") and lines[1].startswith("step 1: training")
    agent, _ = pl.load_agent(out)
    assert agent.actor_mean[4].weight.abs().sum() > 0  # moved off the teacher's zero last layer


def test_finetune_keeps_the_step_that_scores_best_on_validation(pathwise, real_data, model_path, tmp_path, capsys):
    """A step far too large makes the policy worse on the validation segments, so step 0 (the teacher) is kept
    and saved, not the last step."""
    out = tmp_path / "pw.pt"
    pathwise.main(pathwise.Args(mode="finetune", policies=("pid_ff",), eval_data_path=str(real_data), segments=2,
                                sim_model_path=str(model_path), threads=1, synthetic_train=4, batch=2, iterations=1,
                                learning_rate=1.0, eval_every=1, validation=2, save_path=str(out)))
    lines = capsys.readouterr().out.splitlines()
    step0, step1 = (float(line.split("validation mean")[1].split()[0]) for line in lines[:2])
    assert step1 > step0 and lines[2] == f"kept step 0 (validation mean {step0:.2f})"
    agent, _ = pl.load_agent(out)
    assert agent.actor_mean[4].weight.abs().sum() == 0  # the teacher's zero last layer, as at step 0


def test_finetune_and_plan_take_one_policy(pathwise):
    with pytest.raises(te.TinyPhysicsError, match="finetune takes one policy, not 2"):
        pathwise.main(pathwise.Args(mode="finetune", policies=("pid_ff", "pid_ff")))


def test_finetune_refuses_validation_segments_it_trains_on(pathwise):
    with pytest.raises(te.TinyPhysicsError, match="--validation-seed 1 is the training split's --seed"):
        pathwise.main(pathwise.Args(mode="finetune", policies=("pid_ff",), validation=10, validation_seed=1))


def test_smoothing_bound_is_the_least_cost_of_any_trajectory(pathwise):
    rng = np.random.default_rng(0)
    target = np.cumsum(rng.normal(0, 0.05, (3, te.COST_STEPS)), axis=1)
    bound = pathwise.smoothing_bound(target)
    assert np.all(bound > 0) and np.all(pathwise.smoothing_bound(np.zeros_like(target)) == 0)
    # below following the target exactly (all jerk) and holding its mean (all tracking error)
    assert np.all(bound < te.compute_costs(target, target)["total_cost"])
    held = np.repeat(target.mean(1, keepdims=True), te.COST_STEPS, 1)
    assert np.all(bound < te.compute_costs(target, held)["total_cost"])
    # and the minimum a generic optimiser finds on the official cost itself
    goal = torch.as_tensor(target)
    y = goal.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([y], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def official():
        optimizer.zero_grad()
        cost = (te.LAT_ACCEL_COST_MULTIPLIER * ((goal - y) ** 2).mean(1) * 100
                + ((y.diff(dim=1) / te.DT) ** 2).mean(1) * 100).sum()
        cost.backward()
        return cost
    optimizer.step(official)
    found = te.compute_costs(target, y.detach().numpy())["total_cost"]
    assert np.allclose(found, bound, rtol=1e-6) and np.all(bound <= found + 1e-9)
