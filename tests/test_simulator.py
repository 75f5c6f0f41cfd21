"""The batched simulator against the official program's outputs (SPEC.md, reference/)."""

import numpy as np
import pandas as pd
import pytest

import tinyphysics_env as te


def _controller_per_row(kinds):
    it = iter(kinds)
    return lambda: te.BUILTIN_CONTROLLERS[next(it)]()


def test_official_costs_all_in_one_batch(model, real_segments, official_costs):
    """Every row of official_costs.csv, pid and zero on every segment, from ONE batch."""
    n = len(real_segments)
    batch = real_segments.subset(list(range(n)) * 2)
    kinds = ["pid"] * n + ["zero"] * n
    costs = te.rollout_controllers(te.TinyPhysicsSim(model), batch, _controller_per_row(kinds))
    assert len(official_costs) == 2 * n
    for k, (name, kind) in enumerate(zip(batch.names, kinds)):
        row = official_costs[(official_costs.segment == name) & (official_costs.controller == kind)].iloc[0]
        for key in ("lataccel_cost", "jerk_cost", "total_cost"):
            assert costs[key][k] == pytest.approx(row[key], rel=1e-9, abs=0), (name, kind, key)


@pytest.mark.parametrize("kind", ["pid", "zero"])
def test_official_trace_exact(model, real_segments, assets, kind):
    trace = pd.read_csv(assets / "reference" / f"official_trace_{kind}_00000.csv")
    sim = te.TinyPhysicsSim(model)
    te.rollout_controllers(sim, real_segments.subset([0]), te.BUILTIN_CONTROLLERS[kind])
    steps = trace.step.to_numpy()[:te.COST_END_IDX]
    np.testing.assert_array_equal(steps, np.arange(te.COST_END_IDX))
    np.testing.assert_array_equal(sim.current[0], trace.current_lataccel.to_numpy()[:te.COST_END_IDX])
    np.testing.assert_array_equal(sim.target[0, :te.COST_END_IDX], trace.target_lataccel.to_numpy()[:te.COST_END_IDX])


def test_batch_equals_one_at_a_time(model, real_segments):
    batched = te.TinyPhysicsSim(model)
    costs = te.rollout_controllers(batched, real_segments, te.PIDController)
    for i in range(len(real_segments)):
        single = te.TinyPhysicsSim(model)
        one = te.rollout_controllers(single, real_segments.subset([i]), te.PIDController)
        np.testing.assert_array_equal(single.current[0], batched.current[i])
        assert one["total_cost"][0] == costs["total_cost"][i]


def test_tokenizer_bin_edges():
    i = np.arange(te.VOCAB_SIZE)
    np.testing.assert_array_equal(te.encode(te.BINS), i)  # x == bins[i] belongs to bin i (right=True)
    np.testing.assert_array_equal(te.encode(np.nextafter(te.BINS[:-1], np.inf)), i[1:])
    np.testing.assert_array_equal(te.encode(np.array([-9.0, 9.0])), [0, te.VOCAB_SIZE - 1])
    np.testing.assert_array_equal(te.decode(te.encode(te.BINS)), te.BINS)


def test_sampling_matches_numpy_legacy_choice():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (200, te.VOCAB_SIZE)).astype(np.float32)
    probs = te.softmax_probs(logits)
    seeds = np.arange(200)
    uniforms = np.array([np.random.RandomState(s).random_sample() for s in seeds])
    expected = [np.random.RandomState(s).choice(te.VOCAB_SIZE, p=p) for s, p in zip(seeds, probs)]
    np.testing.assert_array_equal(te.sample_tokens(probs, uniforms), expected)


def test_warm_up_uses_logged_steer_and_targets(model, real_segments):
    sim = te.TinyPhysicsSim(model)
    sim.reset(real_segments)
    sim.warm_up()
    assert sim.t == te.CONTROL_START_IDX
    np.testing.assert_array_equal(sim.actions[:, :100], real_segments.steer_command[:, :100])
    np.testing.assert_array_equal(sim.current[:, :100], real_segments.target_lataccel[:, :100])


def test_fast_rng_is_seeded_and_differs_from_official(model, real_segments):
    def run(**kw):
        sim = te.TinyPhysicsSim(model, **kw)
        return te.rollout_controllers(sim, real_segments.subset([0, 1]), te.PIDController)["total_cost"]

    a, b = run(official_rng=False, seed=3), run(official_rng=False, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run(official_rng=True))


def test_rollout_cannot_run_past_step_499(model, real_segments):
    sim = te.TinyPhysicsSim(model)
    te.rollout_controllers(sim, real_segments.subset([0]), te.ZeroController)
    with pytest.raises(RuntimeError):
        sim.step(np.zeros(1))


def test_controller_arguments_follow_the_official_interface(model, real_segments, real_data):
    """Called from step 20, once per step, with the CSV's rows: target t, state t, plan rows t+1..t+49."""
    calls = []

    class Recorder(te.BaseController):
        def update(self, target_lataccel, current_lataccel, state, future_plan):
            calls.append((target_lataccel, current_lataccel, state, future_plan))
            return 0.1

    sim = te.TinyPhysicsSim(model)
    te.rollout_controllers(sim, real_segments.subset([0]), Recorder)
    df = pd.read_csv(real_data / "00000.csv")
    assert len(calls) == te.COST_END_IDX - te.CONTEXT_LENGTH
    for t in (20, 99, 100, 300, 499):
        target, current, state, plan = calls[t - 20]
        assert target == df.targetLateralAcceleration[t]
        assert current == sim.current[0, t - 1]
        assert isinstance(state, te.State) and state.v_ego == df.vEgo[t] and state.a_ego == df.aEgo[t]
        assert state.roll_lataccel == np.sin(df.roll[t]) * te.ACC_G
        assert isinstance(plan, te.FuturePlan) and plan._fields == ("lataccel", "roll_lataccel", "v_ego", "a_ego")
        assert isinstance(plan.lataccel, list) and len(plan.lataccel) == 49
        assert plan.lataccel == df.targetLateralAcceleration[t + 1:t + 50].tolist()
        assert plan.v_ego == df.vEgo[t + 1:t + 50].tolist()
    np.testing.assert_array_equal(sim.actions[0, 100:], 0.1)


def test_future_plan_shrinks_near_the_segment_end(model, tmp_path):
    """A segment of exactly 500 rows gets plans of 500-1-t rows, as the official slicing gives."""
    te.synthesize_segments(2, seed=5, out_dir=tmp_path)
    df = pd.read_csv(tmp_path / "00000.csv").iloc[:500]
    df.to_csv(tmp_path / "00000.csv", index=False)
    lengths = {}

    class Recorder(te.BaseController):
        def __init__(self):
            self.t = 19

        def update(self, target_lataccel, current_lataccel, state, future_plan):
            self.t += 1
            lengths[self.t] = len(future_plan.v_ego)
            return 0.0

    te.rollout_controllers(te.TinyPhysicsSim(model), te.load_segments(tmp_path).subset([0]), Recorder)
    assert lengths[450] == 49 and lengths[451] == 48 and lengths[499] == 0


@pytest.mark.parametrize("index, kind", [(0, "pid"), (6, "pid"), (4, "zero")])
def test_literal_reference_rollout_agrees(model, real_segments, official_costs, index, kind):
    """The literal one-segment loop (all 580 steps, as the official program runs) gives the official
    cost too: the batched simulator's shortcuts (no model before step 100, stop after 499) change nothing."""
    costs = te.reference_rollout(model, real_segments, index, te.BUILTIN_CONTROLLERS[kind]())
    row = official_costs[(official_costs.segment == real_segments.names[index]) & (official_costs.controller == kind)]
    assert costs["total_cost"] == pytest.approx(row.total_cost.iloc[0], rel=1e-9)


def test_last_position_graph_gives_identical_logits(model, real_segments):
    """The cut graph (output head on the last position only) equals the official graph bit for bit,
    on random inputs and on real rollout inputs, at several batch sizes."""
    rng = np.random.default_rng(0)
    for b in (1, 5, 64, 300):
        states = rng.normal(0, 2, (b, 20, 4)).astype(np.float32)
        tokens = rng.integers(0, te.VOCAB_SIZE, (b, 20))
        np.testing.assert_array_equal(model.last_logits(states, tokens), model.full_logits(states, tokens)[:, -1])
    sim = te.TinyPhysicsSim(model)
    te.rollout_controllers(sim, real_segments, te.PIDController)
    window = slice(300 - 19, 301)
    states = np.stack([sim.actions[:, window], real_segments.roll_lataccel[:, window], real_segments.v_ego[:, window],
                       real_segments.a_ego[:, window]], axis=-1).astype(np.float32)
    tokens = te.encode(sim.current[:, 280:300])
    np.testing.assert_array_equal(model.last_logits(states, tokens), model.full_logits(states, tokens)[:, -1])


def test_expected_reward_is_the_mean_of_the_sampled_reward(model, real_segments):
    """At step 100 every copy of a segment has the same history, so the sampled rewards of many copies
    average to the expected reward; at step 101 (jerk included) the same holds over the copies."""
    n = 4000
    copies = real_segments.subset([2] * n)
    sampled, expected = te.TinyPhysicsSim(model, official_rng=False, seed=0), te.TinyPhysicsSim(
        model, official_rng=False, seed=0, expected_reward=True)
    for sim in (sampled, expected):
        sim.reset(copies)
        sim.warm_up()
    for t in (100, 101):
        steer = np.full(n, 0.1)
        sampled.step(steer)
        expected.step(steer)
        np.testing.assert_array_equal(sampled.current, expected.current)  # same draws, same trajectories
        r_sampled, r_expected = sampled.step_reward(t), expected.step_reward(t)
        standard_error = r_sampled.std() / np.sqrt(n)
        assert abs(r_sampled.mean() - r_expected.mean()) < 4 * standard_error, t
        assert r_expected.std() < r_sampled.std()  # the step's own sampling noise is gone
    assert len(set(expected.step_reward(100).tolist())) == 1


def test_shared_noise_refuses_official_scoring(model):
    with pytest.raises(te.TinyPhysicsError, match="for training only"):
        te.TinyPhysicsSim(model, official_rng=True, noise_group=2)
