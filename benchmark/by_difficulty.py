"""Where on the difficulty scale does a longer run gain or lose? Scores two or more checkpoints (the policy
each one saves: the averaged weights where the run averaged them) or controllers (a built-in name such as
pid_ff, or an official-style controllers/<name>.py) on the same held-out segments (official-exact,
deterministic policy), splits the segments into groups by the first one's cost, and prints for each group
and each later one the change in total cost, in its two parts, and the share of segments that got better.
A mean that rises while most segments improve is a tail effect; with the teacher first, it shows where
PPO beats it.

    python benchmark/by_difficulty.py runs/<run>/checkpoints/checkpoint_1004800.pt \\
        runs/<run>/checkpoints/checkpoint_4000000.pt \\
        --eval-data-path ~/.cache/tinyphysics/synthetic/heldout-n200-seed12345 \\
        --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx
    python benchmark/by_difficulty.py pid_ff runs/<run>/checkpoints/checkpoint_16000000.pt ...
"""

import dataclasses

import numpy as np
import tyro
from common import scoring_inputs

import ppo_lateral_eval as ple
import tinyphysics_env as te


@dataclasses.dataclass
class Args:
    checkpoints: tyro.conf.Positional[tuple[str, ...]]
    """checkpoint files written by ppo_lateral.py, or controllers (pid, pid_ff or a controllers/<name>.py);
    the first is the reference"""
    eval_data_path: str | None = None
    """held-out segments to score on (else as ppo_lateral_eval.py finds data)"""
    segments: int = 200
    """score on the first this many segments"""
    groups: int = 4
    """difficulty groups (4: quartiles of the first checkpoint's cost)"""
    sim_model_path: str | None = None
    """the tinyphysics .onnx model"""
    threads: int = 1
    """ONNX Runtime threads"""


def difficulty_groups(reference: np.ndarray, groups: int) -> list[np.ndarray]:
    """Segment indices split into `groups` groups of (near) equal size, easiest first by the reference cost."""
    return np.array_split(np.argsort(reference, kind="stable"), groups)


def changes(reference: dict[str, np.ndarray], later: dict[str, np.ndarray], group: np.ndarray) -> dict[str, float]:
    """Mean changes in total, jerk and weighted lateral-acceleration cost over a group, and its share improved."""
    def delta(key):
        return float((later[key][group] - reference[key][group]).mean())
    return {"total": delta("total_cost"), "jerk": delta("jerk_cost"),
            "lataccel": te.LAT_ACCEL_COST_MULTIPLIER * delta("lataccel_cost"),
            "better": float((later["total_cost"][group] < reference["total_cost"][group]).mean())}


def scorer(entry: str) -> ple.Scorer:
    """A controller for a built-in name or a .py file, else the policy of a checkpoint file."""
    is_controller = entry in te.BUILTIN_CONTROLLERS or entry.endswith(".py")
    return ple.controller_scorer(entry) if is_controller else ple.policy_scorer(entry)


def main(args: Args) -> None:
    if len(args.checkpoints) < 2 or args.segments < args.groups or args.groups < 1:
        raise te.TinyPhysicsError(f"{len(args.checkpoints)} checkpoints, --segments {args.segments}, --groups "
                                  f"{args.groups}: need 2 or more checkpoints and at least one segment per group")
    scorers = [scorer(entry) for entry in args.checkpoints]
    segments, model = scoring_inputs(args.eval_data_path, args.segments, args.sim_model_path, args.threads)
    costs = [ple.score(s, model, segments, batch_size=1024) for s in scorers]
    reference = costs[0]
    print(f"{len(segments)} segments; reference {args.checkpoints[0]}: mean {reference['total_cost'].mean():.2f}, "
          f"median {np.median(reference['total_cost']):.2f}")
    print("| checkpoint | group (reference cost) | total | jerk | lataccel x 50 | better |")
    print("|---|---|---:|---:|---:|---:|")
    named = [(f"{i + 1} of {args.groups} ({reference['total_cost'][g].mean():.1f})", g)
             for i, g in enumerate(difficulty_groups(reference["total_cost"], args.groups))]
    named.append(("all", np.arange(len(segments))))
    for path, later in zip(args.checkpoints[1:], costs[1:]):
        for name, group in named:
            c = changes(reference, later, group)
            print(f"| {path} | {name} | {c['total']:+.3f} | {c['jerk']:+.3f} | {c['lataccel']:+.3f} | "
                  f"{c['better']:.0%} |")
        print(f"| {path} | median of all | {np.median(later['total_cost']) - np.median(reference['total_cost']):+.3f}"
              " | | | |")


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
