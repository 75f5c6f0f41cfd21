"""Wall time of `ppo_lateral_eval.py --controller pid` (the whole command, process start included)
against the official-style one-at-a-time loop (`tinyphysics_env.reference_rollout`, the model at
every step from 20, as tinyphysics.py runs it) on the same synthetic segments; medians of repeats.

    python benchmark/eval_speed.py --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx
"""

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro
from common import compare

import tinyphysics_env as te

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    sim_model_path: str | None = None
    """the tinyphysics .onnx model"""
    num_segs: int = 200
    """segments scored by both"""
    repeats: int = 3
    """runs of each (medians reported)"""
    sim_backend: str = "auto"
    """simulator backend of the eval command (onnx, torch, auto)"""


def main(args: Args) -> None:
    model_path = te.resolve_model_path(args.sim_model_path)
    model = te.TinyPhysicsModel(model_path)
    with tempfile.TemporaryDirectory() as folder:
        te.synthesize_segments(args.num_segs, seed=0, out_dir=folder)
        segments = te.load_segments(folder, progress=False)
        command = [sys.executable, str(ROOT / "ppo_lateral_eval.py"), "--controller", "pid", "--baseline", "none",
                   "--data-path", folder, "--sim-model-path", str(model_path), "--no-progress",
                   "--sim-backend", args.sim_backend]
        ours, official = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            for i in range(len(segments)):
                te.reference_rollout(model, segments, i, te.PIDController())
            official.append(time.perf_counter() - start)
    a, b = compare(f"{args.num_segs} segments, pid, median of {args.repeats}",
                   ("official-style one-at-a-time loop (s):", official),
                   ("ppo_lateral_eval.py, whole command (s):", ours), ".1f")
    print(f"speed-up: {a / b:.1f}x")


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
