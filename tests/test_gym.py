"""The Gymnasium environments: API conformance, reward = -cost, autoreset, observation layout."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import tinyphysics_env as te


def _official(official_costs, segment, controller="zero"):
    return official_costs[(official_costs.segment == segment) & (official_costs.controller == controller)].iloc[0]


def test_check_env(model, real_segments):
    env = te.TinyPhysicsEnv(segments=real_segments, model=model)
    check_env(env, skip_render_check=True)


def test_make_and_return_equals_minus_official_cost(model_path, real_data, official_costs):
    """Zero steer from step 100 is the official `zero` controller: with the official noise the episode's
    info costs are official, and the undiscounted return is -total_cost."""
    env = gym.make("TinyPhysics-v0", model_path=str(model_path), data_path=str(real_data), official_rng=True)
    obs, info = env.reset(seed=0, options={"segment": 3})
    assert info["segment"] == "00003" and obs.shape == (te.OBS_DIM,)
    total, steps, terminated = 0.0, 0, False
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(np.zeros(1, np.float32))
        assert not truncated
        total += reward
        steps += 1
    assert steps == te.COST_STEPS
    ref = _official(official_costs, "00003")
    for key in ("lataccel_cost", "jerk_cost", "total_cost"):
        assert info[key] == pytest.approx(ref[key], rel=1e-9)
    assert total == pytest.approx(-ref.total_cost, rel=1e-9)


def test_vector_env_next_step_autoreset(model, real_segments, official_costs):
    env = te.TinyPhysicsVectorEnv(4, segments=real_segments, model=model, official_rng=True)
    assert env.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    obs, info = env.reset(seed=1, options={"segments": [0, 1, 2, 3]})
    assert obs.shape == (4, te.OBS_DIM) and list(info["segment"]) == ["00000", "00001", "00002", "00003"]
    returns = np.zeros(4)
    for step in range(te.COST_STEPS):
        obs, rewards, terminated, truncated, info = env.step(np.zeros((4, 1)))
        returns += rewards
        assert terminated.all() == (step == te.COST_STEPS - 1) and not truncated.any()
    for i in range(4):
        ref = _official(official_costs, f"0000{i}")
        assert info["total_cost"][i] == pytest.approx(ref.total_cost, rel=1e-9) and info["_total_cost"][i]
        assert returns[i] == pytest.approx(-ref.total_cost, rel=1e-9)
    # The next step resets every sub-environment, ignores the actions and pays nothing.
    obs, rewards, terminated, truncated, info = env.step(np.full((4, 1), 2.0))
    assert np.all(rewards == 0) and not terminated.any() and not truncated.any()
    assert env.sim.t == te.CONTROL_START_IDX and "segment" in info
    np.testing.assert_array_equal(obs, te.observe(env.sim))


def test_vector_env_same_step_autoreset(model, real_segments):
    env = te.TinyPhysicsVectorEnv(2, segments=real_segments, model=model, autoreset_mode="same_step")
    env.reset(seed=2)
    for _ in range(te.COST_STEPS - 1):
        env.step(np.zeros((2, 1)))
    obs, rewards, terminated, truncated, info = env.step(np.zeros((2, 1)))
    assert terminated.all() and info["_final_obs"].all() and info["final_obs"].shape == (2, te.OBS_DIM)
    assert np.all(info["final_info"]["total_cost"] > 0)
    assert env.sim.t == te.CONTROL_START_IDX  # already the next episodes
    np.testing.assert_array_equal(obs, te.observe(env.sim))
    obs, rewards, terminated, truncated, info = env.step(np.zeros((2, 1)))
    assert np.all(rewards < 0) and not terminated.any()  # a real step, not a reset step


def test_make_vec_uses_the_batched_env(model_path, real_data):
    envs = gym.make_vec("TinyPhysics-v0", num_envs=3, vectorization_mode="vector_entry_point",
                        model_path=str(model_path), data_path=str(real_data))
    assert isinstance(envs.unwrapped, te.TinyPhysicsVectorEnv)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (3, te.OBS_DIM)


def test_training_segments_cycle_through_the_pool(model, real_segments):
    env = te.TinyPhysicsVectorEnv(5, segments=real_segments, model=model)
    env.reset(seed=0)
    first = list(env.sim.segments.names)
    env._needs_reset = True
    env.step(np.zeros((5, 1)))
    second = list(env.sim.segments.names)
    assert sorted(first + second) == real_segments.names  # every segment once per pass


def test_observation_layout(model, real_segments):
    sim = te.TinyPhysicsSim(model)
    sim.reset(real_segments.subset([5, 6]))
    sim.warm_up()
    for _ in range(7):
        sim.step(np.array([0.3, -0.2]))
    t = sim.t
    obs = te.observe(sim)
    parts = te.obs_slices()
    seg = real_segments.subset([5, 6])
    assert obs.shape == (2, te.OBS_DIM) and obs.dtype == np.float32
    np.testing.assert_array_equal(obs[:, parts["target_lataccel"]][:, 0], seg.target_lataccel[:, t].astype(np.float32))
    np.testing.assert_array_equal(obs[:, parts["current_lataccel"]][:, 0], sim.current[:, t - 1].astype(np.float32))
    np.testing.assert_array_equal(obs[:, parts["v_ego"]][:, 0], seg.v_ego[:, t].astype(np.float32))
    np.testing.assert_array_equal(obs[:, parts["past_actions"]][:, -1], np.float32([0.3, -0.2]))
    # Steps before 100 read 0: a controller never sees the logged steer that replaced its answers.
    np.testing.assert_array_equal(obs[:, parts["past_actions"]][:, :-7], 0.0)
    np.testing.assert_array_equal(obs[:, parts["past_lataccel"]], sim.current[:, t - 20:t].astype(np.float32))
    np.testing.assert_array_equal(obs[:, parts["future_lataccel"]],
                                  seg.target_lataccel[:, t + 1:t + 50].astype(np.float32))
    np.testing.assert_array_equal(obs[:, parts["future_a_ego"]], seg.a_ego[:, t + 1:t + 50].astype(np.float32))
    for i in range(2):  # the running sum a PID keeps, one controller call at a time from step 20
        running = 0.0
        for k in range(te.CONTEXT_LENGTH, t + 1):
            running += seg.target_lataccel[i, k] - sim.current[i, k - 1]
        assert obs[i, parts["error_integral"]][0] == np.float32(running)
        assert te.observe(sim, np.float64)[i, parts["error_integral"]][0] == running  # exactly, in float64
        previous = seg.target_lataccel[i, t - 1] - sim.current[i, t - 2]  # what a PID's derivative subtracts
        assert te.observe(sim, np.float64)[i, parts["prev_error"]][0] == previous
    np.testing.assert_array_equal(te.observe(sim, np.float64).astype(np.float32), obs)


def test_samples_per_segment_run_each_segment_k_times_with_common_noise(model, real_segments):
    env = te.TinyPhysicsVectorEnv(6, segments=real_segments, model=model, samples_per_segment=3, common_noise=True)
    obs, info = env.reset(seed=0)
    names = list(info["segment"])
    assert names[:3] == [names[0]] * 3 and names[3:] == [names[3]] * 3 and names[0] != names[3]
    for _ in range(30):  # the same steer and the same noise: copies of a segment stay identical
        obs, *_ = env.step(np.zeros((6, 1)))
    np.testing.assert_array_equal(env.sim.current[1], env.sim.current[0])
    np.testing.assert_array_equal(env.sim.current[5], env.sim.current[3])
    independent = te.TinyPhysicsVectorEnv(6, segments=real_segments, model=model, samples_per_segment=3)
    independent.reset(seed=0)
    for _ in range(30):  # without common noise the copies' samples differ
        independent.step(np.zeros((6, 1)))
    assert not np.array_equal(independent.sim.current[1], independent.sim.current[0])
