"""Helpers shared by the benchmark scripts."""

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
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


def scoring_inputs(eval_data_path: str | None, count: int, sim_model_path: str | None,
                   threads: int) -> tuple[te.Segments, te.SimModel]:
    """The first `count` held-out segments (found as ppo_lateral_eval.py finds data) and the simulator model."""
    segments = te.load_segments(te.resolve_data_path(eval_data_path), progress=False)
    segments = segments.subset(np.arange(min(count, len(segments))))
    return segments, te.load_sim_model(te.resolve_model_path(sim_model_path), threads=threads)


BASE_OBSERVE = te.observe
Features = Callable[[te.TinyPhysicsSim, np.ndarray], np.ndarray]


def observe_with(features: Features) -> Callable[..., np.ndarray]:
    """An observe function: `te.observe` (in float64) followed by features(sim, that observation)."""
    def observe(sim: te.TinyPhysicsSim, dtype=np.float32) -> np.ndarray:
        base = BASE_OBSERVE(sim, np.float64)
        return np.concatenate([base, features(sim, base)], axis=1).astype(dtype)
    return observe


def extend_observation(extra_layout: tuple[tuple[str, int], ...], features: Features) -> None:
    """Give this process a longer observation for an input probe: ppo_lateral reads te.OBS_DIM, te.observe and
    the layout (for its normaliser, by the entries' names) when it runs. The bounds are left open: nothing in
    training reads them. The exported controller and ppo_lateral_eval.py do not know the extra inputs, so a
    probe's run is scored by its own evaluations."""
    te.OBS_LAYOUT = te.OBS_LAYOUT + extra_layout
    te.OBS_DIM = sum(n for _, n in te.OBS_LAYOUT)
    te.observe = observe_with(features)
    te.observation_space = lambda pool: gym.spaces.Box(-np.inf, np.inf, (te.OBS_DIM,), np.float32)
