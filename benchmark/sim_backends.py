"""Simulator model steps/s of both backends (ONNX Runtime; the plain-torch port, eager and compiled),
measured side by side on this machine, and the floating-point work per simulator step worked out from
the model's shapes, with what it implies on data-centre GPUs (an estimate, not a measurement).

Each figure runs the batched simulator over the controlled steps 100..499 with zero steer and the
official random streams (so every backend computes the same rollout), synthetic segments.

    python benchmark/sim_backends.py --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx
"""

import statistics
import tempfile
from dataclasses import dataclass

import numpy as np
import tyro
from common import model_steps_per_second

import tinyphysics_env as te

# Peak dense throughput in TFLOP/s from the vendors' datasheets (A100 SXM, H100 SXM).
GPU_PEAKS = {"A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}, "H100": {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0}}


@dataclass
class Args:
    sim_model_path: str | None = None
    """the tinyphysics .onnx model (else $TINYPHYSICS_MODEL, ../models, or a download)"""
    sizes: tuple[int, ...] = (1, 8, 64, 256, 1024)
    """batch sizes to measure"""
    repeats: int = 3
    """runs per figure (the median is printed)"""
    utilization: float = 0.3
    """fraction of GPU peak assumed reachable by matmuls this narrow (width 128), for the estimate"""


class NoModel:
    """Samples token 0 at once: what is left is the simulator's host-side work per step (building the
    model's inputs, clipping, bookkeeping), the ceiling a faster model cannot lift."""

    def sample(self, states, tokens, uniforms, with_probs=False):
        return np.zeros(len(states), np.int64), None

    def uniform_stream(self, seed):
        return te.UniformStream(seed)


def flops_per_step(weights: dict[str, np.ndarray], heads: int) -> dict[str, int]:
    """Multiply-adds x 2 of one simulator step of one segment, as `te.gpt_last_logits` computes it:
    every position through all blocks but the last, whose query, MLP and head see the last position only."""
    t = weights["wp_embedding.weight"].shape[0]
    width = weights["wp_embedding.weight"].shape[1]
    hidden = weights["h.0.mlp.c_fc.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("h."))

    def block(queries: int) -> int:
        kv = 2 * t * width * 2 * width
        q = 2 * queries * width * width
        attention = 2 * 2 * queries * t * width  # scores and the weighted sum over values, all heads together
        return kv + q + attention + 2 * queries * width * width + 2 * 2 * queries * width * hidden

    parts = {"state embedding": 2 * t * weights["wt_embedding.weight"].size,
             f"{layers - 1} full blocks": (layers - 1) * block(t), "last block (1 query)": block(1),
             "output head (1 position)": 2 * weights["lm_head.weight"].size}
    parts["total"] = sum(parts.values())
    return parts


def main(args: Args) -> None:
    path = te.resolve_model_path(args.sim_model_path)
    backends = {"onnx (ONNX Runtime)": te.TinyPhysicsModel(path, threads=2),
                "torch eager": te.TorchTinyPhysicsModel(path),
                "torch compiled": te.TorchTinyPhysicsModel(path, compile=True)}
    sims = {name: te.TinyPhysicsSim(model) for name, model in backends.items()}
    with tempfile.TemporaryDirectory() as folder:
        te.synthesize_segments(max(args.sizes), seed=0, out_dir=folder)
        pool = te.load_segments(folder, progress=False)
    for b in args.sizes:  # compile every shape first: compilation is not throughput
        model_steps_per_second(sims["torch compiled"], pool.subset(range(b)))

    print(f"model steps/s, median of {args.repeats} runs, backends interleaved\n")
    print("| batch B | " + " | ".join(sims) + " | torch eager / onnx | torch compiled / onnx |")
    print("|---:|" + "---:|" * (len(sims) + 2))
    for b in args.sizes:
        segments = pool.subset(range(b))
        runs = {name: [] for name in sims}
        for _ in range(args.repeats):
            for name, sim in sims.items():
                runs[name].append(model_steps_per_second(sim, segments))
        med = {name: statistics.median(r) for name, r in runs.items()}
        onnx, eager, compiled = med.values()
        print(f"| {b} | " + " | ".join(f"{v:,.0f}" for v in med.values()) +
              f" | {eager / onnx:.2f}x | {compiled / onnx:.2f}x |", flush=True)

    print("\nhost-side work alone (no model), steps/s:")
    for b in sorted(set(args.sizes) | {4096}):
        segments = pool.subset(np.arange(b) % len(pool))
        runs = [model_steps_per_second(te.TinyPhysicsSim(NoModel()), segments) for _ in range(args.repeats)]
        print(f"  B={b}: {statistics.median(runs):,.0f}")

    flops = flops_per_step(te.onnx_weights(path), te.attention_heads(path))
    print("\nfloating-point operations per simulator step of one segment:")
    for part, n in flops.items():
        print(f"  {part}: {n / 1e6:.2f} MFLOP")
    print(f"\nimplied steps/s at {args.utilization:.0%} of peak (estimate, not a measurement):")
    for gpu, peaks in GPU_PEAKS.items():
        print(f"  {gpu}: " + ", ".join(f"{p} {args.utilization * tflops * 1e12 / flops['total'] / 1e6:.1f}M"
                                       for p, tflops in peaks.items()))


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
