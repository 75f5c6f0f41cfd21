"""Learning curves of ppo_lateral.py: eval total_cost against steps for several seeds, trained on
synthetic segments only and scored official-exactly on held-out real segments, with the official PID
on the same segments as a line. Runs the real command line once per seed, times it, and writes a PNG.

    python benchmark/learning_curves.py --eval-data-path ../shared/tinyphysics/data \
        --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

import tinyphysics_env as te

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    eval_data_path: str | None = None
    """held-out real segments (never trained on)"""
    sim_model_path: str | None = None
    """the tinyphysics .onnx model"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """one training run per seed"""
    total_timesteps: int = 1_000_000
    """steps per training run (the headline command's)"""
    num_envs: int = 64
    """parallel segments (the headline command's)"""
    synthetic_train: int = 5000
    """synthetic training segments"""
    eval_every: int = 50_000
    """evaluate every this many steps (finer than the script's default, for the curve)"""
    extra: tuple[str, ...] = ()
    """further ppo_lateral.py flags, e.g. --extra --update-epochs 8"""
    name: str = "headline"
    """names the PNG (benchmark/<name>_curves.png) and the runs folder"""
    runs_dir: str = "benchmark/runs"
    """where the training runs go"""


def pid_cost(model_path: Path, data_path: Path) -> float:
    segments = te.load_segments(data_path)
    sim = te.TinyPhysicsSim(te.TinyPhysicsModel(model_path))
    return float(te.rollout_controllers(sim, segments, te.PIDController)["total_cost"].mean())


def main(args: Args) -> None:
    model_path, data_path = te.resolve_model_path(args.sim_model_path), te.resolve_data_path(args.eval_data_path)
    pid = pid_cost(model_path, data_path)
    curves = {}
    for seed in args.seeds:
        command = [sys.executable, str(ROOT / "ppo_lateral.py"), "--seed", str(seed),
                   "--num-envs", str(args.num_envs), "--total-timesteps", str(args.total_timesteps),
                   "--synthetic-train", str(args.synthetic_train), "--eval-data-path", str(data_path),
                   "--sim-model-path", str(model_path), "--eval-every", str(args.eval_every),
                   "--exp-name", args.name, "--runs-dir", args.runs_dir, "--no-progress", *args.extra]
        print(" ".join(command[1:]), flush=True)
        start = time.perf_counter()
        run_dir = Path(subprocess.run(command, check=True, capture_output=True, text=True,
                                      env={**os.environ}).stdout.strip().splitlines()[-1])
        wall = time.perf_counter() - start
        with np.load(run_dir / "training_stats.npz") as stats:
            evaluated = np.isfinite(stats["eval_total_cost"])
            curves[seed] = (stats["global_step"][evaluated], stats["eval_total_cost"][evaluated], wall)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for seed, (steps, costs, _) in curves.items():
        ax.plot(steps, costs, marker=".", label=f"seed {seed}")
    ax.axhline(pid, color="black", ls="--", label=f"PID (official) {pid:.2f}")
    ax.axhline(0.75 * pid, color="gray", ls=":", label=f"25% below PID {0.75 * pid:.2f}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("eval total_cost (official-exact)")
    ax.set_title(f"ppo_lateral.py {args.name}: {len(te.list_segment_files(data_path))} held-out real segments")
    ax.legend()
    out = ROOT / "benchmark" / f"{args.name}_curves.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")

    print(f"\nPID on the same segments: {pid:.3f}   plot: {out.relative_to(ROOT)}\n")
    print("| seed | final eval total_cost | best eval total_cost | vs PID (final) | wall time (s) |")
    print("|---:|---:|---:|---:|---:|")
    for seed, (_steps, costs, wall) in curves.items():
        print(f"| {seed} | {costs[-1]:.2f} | {costs.min():.2f} | {100 * (costs[-1] / pid - 1):+.1f}% | {wall:.0f} |")
    finals = np.array([c[1][-1] for c in curves.values()])
    print(f"| mean | {finals.mean():.2f} | | {100 * (finals.mean() / pid - 1):+.1f}% | |")


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
