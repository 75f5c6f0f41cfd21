"""Simulator throughput and batched-scoring speed-up.

For each batch size: model steps per second of the batched simulator (controlled steps 100..499,
zero steer, official random streams), and the wall time to score the same B segments with the
official PID (a) one segment at a time with one model call per step, as the official program does
(`reference_rollout`: every step from 20 to the last row), (a') one at a time with this project's
simulator at batch 1, and (b) in one batch, with the ratios. Segments are synthetic.

    python benchmark/sim_speed.py --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx
"""

import statistics
import tempfile
import time
from dataclasses import dataclass

import tyro
from common import model_steps_per_second

import tinyphysics_env as te


@dataclass
class Args:
    sim_model_path: str | None = None
    """the tinyphysics .onnx model (else $TINYPHYSICS_MODEL, ../models, or a download)"""
    sizes: tuple[int, ...] = (1, 8, 64, 256, 1024)
    """batch sizes to measure"""
    threads: int = 2
    """ONNX Runtime intra-op threads"""
    repeats: int = 3
    """runs per figure (the median is printed)"""
    sequential_repeat_limit: int = 64
    """above this batch size the slow one-at-a-time scoring runs once"""


def official_style_seconds(model: te.TinyPhysicsModel, segments: te.Segments) -> float:
    start = time.perf_counter()
    for i in range(len(segments)):
        te.reference_rollout(model, segments, i, te.PIDController())
    return time.perf_counter() - start


def score_seconds(sim: te.TinyPhysicsSim, segments: te.Segments, batch: int) -> float:
    start = time.perf_counter()
    for lo in range(0, len(segments), batch):
        te.rollout_controllers(sim, segments.subset(range(lo, min(lo + batch, len(segments)))), te.PIDController)
    return time.perf_counter() - start


def main(args: Args) -> None:
    model = te.TinyPhysicsModel(te.resolve_model_path(args.sim_model_path), threads=args.threads)
    sim = te.TinyPhysicsSim(model)
    with tempfile.TemporaryDirectory() as folder:
        te.synthesize_segments(max(args.sizes), seed=0, out_dir=folder)
        pool = te.load_segments(folder, progress=False)
    print(f"threads={args.threads}, median of {args.repeats} runs (one-at-a-time scoring: 1 run above "
          f"B={args.sequential_repeat_limit})\n")
    print("| batch B | model steps/s | (a) official-style loop (s) | (a') batch of 1 (s) | (b) batched (s) "
          "| (a)/(b) | (a')/(b) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.sizes:
        segments = pool.subset(range(b))
        sps = statistics.median(model_steps_per_second(sim, segments) for _ in range(args.repeats))
        batched = statistics.median(score_seconds(sim, segments, b) for _ in range(args.repeats))
        n_seq = args.repeats if b <= args.sequential_repeat_limit else 1
        official = statistics.median(official_style_seconds(model, segments) for _ in range(n_seq))
        single = statistics.median(score_seconds(sim, segments, 1) for _ in range(n_seq))
        print(f"| {b} | {sps:,.0f} | {official:.2f} | {single:.2f} | {batched:.2f} | {official / batched:.1f}x "
              f"| {single / batched:.1f}x |", flush=True)


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
