"""What scoring the live weights beside their average (--eval-live) adds to a default training run: the
wall time of whole ppo_lateral.py runs with the default evaluation (100 held-out segments every 100k
steps), with and without --eval-live, alternated in one process, medians reported.

    python benchmark/eval_overhead.py --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx
"""

import tempfile
import time
from dataclasses import dataclass

import tyro
from common import compare

import ppo_lateral as pl
import tinyphysics_env as te


@dataclass
class Args:
    sim_model_path: str | None = None
    """the tinyphysics .onnx model (else $TINYPHYSICS_MODEL, ../models, or a download)"""
    total_timesteps: int = 300_000
    """steps per measured run (evaluated at 0 and every --eval-every steps of the defaults)"""
    repeats: int = 3
    """alternating runs without and with --eval-live; medians are reported"""


def run_seconds(args: Args, folder: str, eval_live: bool) -> float:
    """Wall time of one default run on synthetic segments, its warm start and evaluations included."""
    train_args = pl.Args(sim_model_path=args.sim_model_path, synthetic_train=512, eval_data_path=folder + "/heldout",
                         total_timesteps=args.total_timesteps, checkpoint_every=10**12, eval_live=eval_live,
                         runs_dir=folder + "/runs", progress=False)
    assert train_args.ema_decay > 0  # the defaults average the weights; the live score exists only beside that
    start = time.perf_counter()
    pl.train(train_args)
    return time.perf_counter() - start


def main(args: Args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        te.synthesize_segments(pl.Args().eval_segments, seed=0, out_dir=folder + "/heldout")
        without, with_live = [], []
        for _ in range(args.repeats):
            without.append(run_seconds(args, folder, eval_live=False))
            with_live.append(run_seconds(args, folder, eval_live=True))
    a, b = compare(f"{args.total_timesteps:,} steps, defaults, repeats={args.repeats}",
                   ("without --eval-live, s:", without), ("with --eval-live, s:", with_live), ".1f")
    print(f"--eval-live adds {100 * (b / a - 1):.1f}% to the run's wall time")


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
