"""Helpers shared by the benchmark scripts."""

import statistics
import time
from pathlib import Path

import numpy as np

import tinyphysics_env as te

Runs = tuple[str, list[float]]


def compare(header: str, first: Runs, second: Runs, fmt: str) -> tuple[float, float]:
    """Print header, then each (label, runs) with its median and every run formatted with fmt (e.g.
    ',.0f'); return the two medians."""
    print(header)
    medians = []
    for label, runs in (first, second):
        medians.append(statistics.median(runs))
        print(f"{label} {medians[-1]:{fmt}}   runs: {', '.join(f'{x:{fmt}}' for x in runs)}")
    return medians[0], medians[1]


def model_steps_per_second(sim: te.TinyPhysicsSim, segments: te.Segments) -> float:
    """Segments x controlled steps per second of one zero-steer rollout over steps 100..499."""
    sim.reset(segments)
    sim.warm_up()
    zeros = np.zeros(len(segments))
    start = time.perf_counter()
    while sim.t < te.COST_END_IDX:
        sim.step(zeros)
    return len(segments) * te.COST_STEPS / (time.perf_counter() - start)


def median_training_sps(run_dir: Path) -> float:
    """Median per-iteration SPS of a ppo_lateral.py run, skipping row 0 (the start) and row 1 (warm-up)."""
    with np.load(run_dir / "training_stats.npz") as stats:
        return float(np.median(stats["sps"][2:]))
