"""Training steps/s of ppo_lateral.py in one process and under torchrun with N processes (gloo on
CPU), at the same global batch, measured alternately, several times, medians reported.

Each figure is the median per-iteration SPS that ppo_lateral.py logs, skipping the first iteration.

    python benchmark/dp_speed.py --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx \
        --eval-data-path ../shared/tinyphysics/data
"""

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tyro
from common import compare, median_training_sps

import tinyphysics_env as te

SCRIPT = Path(__file__).resolve().parent.parent / "ppo_lateral.py"


@dataclass
class Args:
    sim_model_path: str | None = None
    """the tinyphysics .onnx model (else $TINYPHYSICS_MODEL, ../models, or a download)"""
    eval_data_path: str | None = None
    """held-out segments (else $TINYPHYSICS_DATA, ../data, or a download)"""
    num_envs: int = 128
    """global number of environments of both measurements"""
    processes: int = 2
    """processes of the torchrun measurement"""
    iterations: int = 6
    """training iterations per measurement"""
    repeats: int = 3
    """alternating measurements; medians are reported"""
    sim_backend: str = "onnx"
    """simulator backend of both"""


def steps_per_second(args: Args, runs_dir: str, processes: int) -> float:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    flags = {"sim-model-path": te.resolve_model_path(args.sim_model_path), "eval-data-path": args.eval_data_path,
             "synthetic-train": 512, "num-envs": args.num_envs,
             "total-timesteps": args.num_envs * 100 * args.iterations,
             "eval-every": 10**12, "checkpoint-every": 10**12, "eval-segments": 1,
             "runs-dir": runs_dir, "sim-backend": args.sim_backend}
    command = [sys.executable, *launcher, str(SCRIPT), "--no-progress"]
    command += [x for k, v in flags.items() if v is not None for x in (f"--{k}", str(v))]
    result = subprocess.run(command, capture_output=True, text=True)  # torchrun sets 1 torch thread per process
    if result.returncode != 0:
        raise te.TinyPhysicsError(f"training failed: {result.stderr.strip().splitlines()[-1]}")
    return median_training_sps(Path(result.stdout.strip().splitlines()[-1]))


def main(args: Args) -> None:
    one, many = [], []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            one.append(steps_per_second(args, folder, 1))
            many.append(steps_per_second(args, folder, args.processes))
    a, b = compare(f"global num_envs={args.num_envs}, backend {args.sim_backend}, {os.cpu_count()} cores",
                   ("1 process, steps/s:", one),
                   (f"torchrun {args.processes} processes (gloo), steps/s:", many), ",.0f")
    print(f"{args.processes} processes / 1: {b / a:.2f}x")


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
