"""The plain-torch port of the simulator model (`--sim-backend torch`) against ONNX Runtime and the
official costs."""

import numpy as np
import pytest
import torch

import tinyphysics_env as te


@pytest.fixture(scope="module")
def torch_model(model_path) -> te.TorchTinyPhysicsModel:
    return te.TorchTinyPhysicsModel(model_path)


def _rollout_inputs(sim: te.TinyPhysicsSim, segments: te.Segments, t: int):
    window = slice(t - te.CONTEXT_LENGTH + 1, t + 1)
    states = np.stack([sim.actions[:, window], segments.roll_lataccel[:, window], segments.v_ego[:, window],
                       segments.a_ego[:, window]], axis=-1).astype(np.float32)
    return states, te.encode(sim.current[:, t - te.CONTEXT_LENGTH:t])


def test_weights_are_read_from_the_onnx_file_by_role(model_path):
    w = te.onnx_weights(model_path)
    assert te.attention_heads(model_path) == 4
    assert w["wt_embedding.weight"].shape == (4, 64) and w["wt2_embedding.weight"].shape == (te.VOCAB_SIZE, 64)
    assert w["wp_embedding.weight"].shape == (te.CONTEXT_LENGTH, 128)
    assert w["lm_head.weight"].shape == (128, te.VOCAB_SIZE)
    for i in range(4):
        assert w[f"h.{i}.attn.c_attn.weight"].shape == (128, 384)
        assert w[f"h.{i}.mlp.c_fc.weight"].shape == (128, 512)
    assert not any(k.endswith("attn.bias") for k in w)  # the causal masks are rebuilt, not copied


def test_logits_match_onnxruntime_on_random_inputs(model, torch_model):
    rng = np.random.default_rng(0)
    for b in (1, 7, 64, 300):
        states = rng.normal(0, 2, (b, te.CONTEXT_LENGTH, 4)).astype(np.float32)
        tokens = rng.integers(0, te.VOCAB_SIZE, (b, te.CONTEXT_LENGTH))
        np.testing.assert_allclose(torch_model.last_logits(states, tokens), model.last_logits(states, tokens),
                                   rtol=0, atol=1e-4)


def test_logits_match_onnxruntime_on_real_rollout_inputs(model, torch_model, real_segments):
    sim = te.TinyPhysicsSim(model)
    te.rollout_controllers(sim, real_segments, te.PIDController)
    for t in (100, 250, 499):
        states, tokens = _rollout_inputs(sim, real_segments, t)
        np.testing.assert_allclose(torch_model.last_logits(states, tokens), model.last_logits(states, tokens),
                                   rtol=0, atol=1e-4)


def test_device_sampling_matches_numpy_semantics():
    """Inverse CDF on the normalised float64 cumulative sum, right side: the same tokens as the numpy
    sampler on the same probabilities, including uniforms exactly on a cumulative value (the next
    token is drawn) and the smallest and largest uniforms."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (500, te.VOCAB_SIZE)).astype(np.float32)
    probs = te.softmax_probs(logits)
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    cdf /= cdf[:, -1:]
    uniforms = rng.random(500)
    uniforms[:100] = cdf[np.arange(100), rng.integers(0, 1000, 100)]
    uniforms[100], uniforms[101] = 0.0, np.nextafter(1.0, 0.0)
    sampled = te.torch_inverse_cdf(torch.from_numpy(probs), torch.from_numpy(uniforms)).numpy()
    np.testing.assert_array_equal(sampled, te.sample_tokens(probs, uniforms))
    assert sampled[100] == probs[100].nonzero()[0][0] and sampled[101] <= te.VOCAB_SIZE - 1
    tokens, torch_probs = te.torch_sample(torch.from_numpy(logits), torch.from_numpy(uniforms[200:201].repeat(500)))
    np.testing.assert_allclose(torch_probs.numpy(), probs, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(tokens.numpy(), te.sample_tokens(probs, uniforms[200:201].repeat(500)))


@pytest.mark.parametrize("compile", [False, True])
def test_official_costs_with_the_torch_backend(model_path, real_segments, official_costs, compile):
    """With the official per-segment uniforms, PID on every asset segment gives the official costs."""
    torch_model = te.TorchTinyPhysicsModel(model_path, compile=compile)
    costs = te.rollout_controllers(te.TinyPhysicsSim(torch_model), real_segments, te.PIDController)
    pid = official_costs[official_costs.controller == "pid"].set_index("segment")
    for k, name in enumerate(real_segments.names):
        for key in ("lataccel_cost", "jerk_cost", "total_cost"):
            assert costs[key][k] == pytest.approx(pid.loc[name, key], rel=1e-6), (name, key)


def test_training_stream_is_a_seeded_torch_generator(torch_model, real_segments):
    def run(seed):  # the first 40 controlled steps: sampled, so they follow the stream
        sim = te.TinyPhysicsSim(torch_model, official_rng=False, seed=seed)
        sim.reset(real_segments.subset([0, 1, 2]))
        sim.warm_up()
        for _ in range(40):
            sim.step(np.zeros(3))
        return sim.current[:, te.CONTROL_START_IDX:sim.t].copy(), sim

    a, sim = run(3)
    b, _ = run(3)
    c, _ = run(4)
    assert isinstance(sim.rng, te.TorchUniformStream)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any(axis=1).all()  # every segment's path differs under another seed


def test_vector_env_state_round_trip_with_torch_generator(model_path, synthetic_data):
    """A resumed env continues the torch generator's stream exactly."""
    torch_model = te.TorchTinyPhysicsModel(model_path)
    pool = te.load_segments(synthetic_data, progress=False)
    envs = te.TinyPhysicsVectorEnv(4, segments=pool, model=torch_model)
    envs.reset(seed=0)
    steer = np.full((4, 1), 0.05, np.float32)
    for _ in range(5):
        envs.step(steer)
    state = envs.state_dict()
    after = [envs.step(steer)[0] for _ in range(5)]
    restored = te.TinyPhysicsVectorEnv(4, segments=pool, model=torch_model)
    restored.reset(seed=123)
    restored.load_state_dict(state)
    for expected in after:
        np.testing.assert_array_equal(restored.step(steer)[0], expected)


def test_bf16_is_close_but_not_exact(model, model_path, real_segments):
    bf16 = te.TorchTinyPhysicsModel(model_path, precision="bf16")
    sim = te.TinyPhysicsSim(model)
    te.rollout_controllers(sim, real_segments, te.PIDController)
    states, tokens = _rollout_inputs(sim, real_segments, 300)
    exact, approx = model.last_logits(states, tokens), bf16.last_logits(states, tokens)
    assert 1e-4 < np.abs(exact - approx).max() < 0.5
    assert np.abs(approx.argmax(1) - exact.argmax(1)).max() <= 2  # the most likely bin moves by a bin or two at most


def test_backend_choice_and_guards(model_path):
    assert te.default_sim_backend("cpu") == "onnx" and te.default_sim_backend("cuda:0") == "torch"
    assert isinstance(te.load_sim_model(model_path, "auto", "cpu"), te.TinyPhysicsModel)
    assert isinstance(te.load_sim_model(model_path, "torch", "cpu"), te.TorchTinyPhysicsModel)
    with pytest.raises(te.TinyPhysicsError, match="--sim-backend"):
        te.load_sim_model(model_path, "jax")
    with pytest.raises(te.TinyPhysicsError, match="--cuda-graphs needs a CUDA device"):
        te.load_sim_model(model_path, "torch", "cpu", cuda_graphs=True)
    with pytest.raises(te.TinyPhysicsError, match="torch only"):
        te.load_sim_model(model_path, "onnx", "cpu", precision="bf16")
    with pytest.raises(te.TinyPhysicsError, match="--sim-precision"):
        te.load_sim_model(model_path, "torch", "cpu", precision="fp8")
