"""Is a long run's late rise in cost a systematic push or a random walk? Reads one ppo_lateral.py run's
checkpoints from --start-step on and scores, on held-out segments (official-exact, deterministic policy):

- the start and the end checkpoints;
- the end re-assembled from the start and the checkpoint-to-checkpoint updates, each added with a random sign:
  a push in one direction (a biased gradient) would undo itself, a random walk would not, so if these cost
  what the real end costs the rise is the gradient's noise accumulating;
- uniform averages of the weights over the whole span and over its second half: averaging cancels the
  fluctuation around a good point but not a walk away from it.

    python benchmark/drift.py --run-dir runs/<run> --start-step 1000000 \\
        --eval-data-path ~/.cache/tinyphysics/synthetic/heldout-n200-seed12345 --segments 100 \\
        --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx
"""

import dataclasses
from pathlib import Path

import numpy as np
import torch
import tyro
from common import scoring_inputs

import ppo_lateral as pl
import tinyphysics_env as te

State = dict[str, torch.Tensor]


@dataclasses.dataclass
class Args:
    run_dir: str
    """a ppo_lateral.py run folder (its checkpoints/ are read)"""
    start_step: int = 1_000_000
    """the first checkpoint used is the first at or after this step"""
    eval_data_path: str | None = None
    """held-out segments to score on (else as ppo_lateral_eval.py finds data)"""
    segments: int = 100
    """score on the first this many segments"""
    trials: int = 4
    """random-sign re-assemblies"""
    seed: int = 0
    """seed of the random signs"""
    sim_model_path: str | None = None
    """the tinyphysics .onnx model"""
    threads: int = 1
    """ONNX Runtime threads"""


def checkpoint_states(run_dir: Path, start_step: int) -> tuple[list[int], list[State], dict]:
    """Steps and weights (the live weights where the run averaged them) of the run's checkpoints from
    start_step on, in step order, and the agent configuration."""
    found = {int(p.stem.split("_")[1]): p for p in (run_dir / "checkpoints").glob("checkpoint_*.pt")}
    steps = sorted(step for step in found if step >= start_step)
    if len(steps) < 3:
        raise te.TinyPhysicsError(f"{run_dir}: {len(steps)} checkpoints at or after step {start_step}; need 3 or "
                                  "more (lower --start-step, or train with a smaller --checkpoint-every)")
    checkpoints = [pl.load_agent(found[step])[1] for step in steps]
    return steps, [c.get("live_agent") or c["agent"] for c in checkpoints], checkpoints[-1]["agent_config"]


def recombine(states: list[State], signs: np.ndarray) -> State:
    """states[0] plus each update states[i + 1] - states[i] times signs[i]."""
    return {k: states[0][k] + sum(float(s) * (states[i + 1][k] - states[i][k]) for i, s in enumerate(signs))
            for k in states[0]}


def average(states: list[State]) -> State:
    return {k: sum(state[k] for state in states) / len(states) for k in states[0]}


def main(args: Args) -> None:
    if args.segments < 1 or args.trials < 0:
        raise te.TinyPhysicsError(f"--segments {args.segments}, --trials {args.trials}: need at least 1 segment "
                                  "and 0 or more trials")
    steps, states, config = checkpoint_states(Path(args.run_dir), args.start_step)
    segments, model = scoring_inputs(args.eval_data_path, args.segments, args.sim_model_path, args.threads)

    def score(label: str, state: State) -> None:
        agent = pl.Agent(**config)
        agent.load_state_dict(state)
        costs = pl.evaluate(agent, model, segments)
        print(f"{label:<44} {costs['total_cost'].mean():8.3f} {np.median(costs['total_cost']):8.3f} "
              f"{costs['jerk_cost'].mean():8.3f} {costs['lataccel_cost'].mean():8.4f}", flush=True)

    print(f"{len(steps)} checkpoints, steps {steps[0]:,} to {steps[-1]:,}; {len(segments)} segments")
    print(f"{'weights':<44} {'mean':>8} {'median':>8} {'jerk':>8} {'lataccel':>8}")
    score(f"start ({steps[0]:,})", states[0])
    score(f"end ({steps[-1]:,})", states[-1])
    rng = np.random.default_rng(args.seed)
    for trial in range(args.trials):
        signs = rng.choice([-1.0, 1.0], len(states) - 1)
        score(f"start + updates with random signs ({trial + 1})", recombine(states, signs))
    score("average over all", average(states))
    score("average over the second half", average(states[len(states) // 2:]))


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
