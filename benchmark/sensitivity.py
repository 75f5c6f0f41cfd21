"""How strongly does a policy answer each part of its observation, and does a long run make it answer more?
For two or more checkpoints (the policy each one saves), on the same observations, prints for every named
part of the observation (`OBS_LAYOUT`) the sum over its entries of |d action / d normalised input|, the
mean over the observations, and the share of the actor's first-layer units driven past |2| (where tanh is
above 0.96 and passes almost no gradient), over all observations and over the hardest quarter of the
segments. The observations are those the first checkpoint's policy meets on held-out segments (every 5th
step), so that every checkpoint is measured on the same inputs.

    python benchmark/sensitivity.py runs/<run>/checkpoints/checkpoint_1004800.pt \\
        runs/<run>/checkpoints/checkpoint_4000000.pt \\
        --eval-data-path ~/.cache/tinyphysics/synthetic/heldout-n200-seed12345 --segments 60 \\
        --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx
"""

import dataclasses

import numpy as np
import torch
import tyro
from common import scoring_inputs

import ppo_lateral as pl
import tinyphysics_env as te

SATURATED = 2.0


@dataclasses.dataclass
class Args:
    checkpoints: tyro.conf.Positional[tuple[str, ...]]
    """checkpoint files written by ppo_lateral.py; the first one's policy drives the rollouts"""
    eval_data_path: str | None = None
    """held-out segments to roll out on (else as ppo_lateral_eval.py finds data)"""
    segments: int = 60
    """roll out on the first this many segments"""
    every: int = 5
    """keep every this many steps' observations"""
    sim_model_path: str | None = None
    """the tinyphysics .onnx model"""
    threads: int = 1
    """ONNX Runtime threads"""


def observations(agent: pl.Agent, model: te.SimModel, segments: te.Segments,
                 every: int) -> tuple[np.ndarray, np.ndarray]:
    """([segments, calls, OBS_DIM] float32 observations the agent's deterministic policy is called on, every
    `every`-th call, and [segments] its total costs)."""
    params, seen = agent.numpy_params(), []

    def act(obs):
        seen.append(obs.astype(np.float32))
        return pl.numpy_policy(params, obs)

    costs = te.rollout_policy(te.TinyPhysicsSim(model, official_rng=True), segments, act)
    return np.stack(seen[::every], axis=1), costs["total_cost"]


def sensitivity(agent: pl.Agent, obs: np.ndarray) -> dict[str, float]:
    """Per named part of the observation, the mean over [N, OBS_DIM] observations of the summed |d action /
    d normalised input| of the actor's mean."""
    x = agent.inputs(torch.as_tensor(obs)).requires_grad_(True)
    agent.actor_mean(x).sum().backward()
    grad = x.grad.abs()
    return {name: float(grad[:, part].sum(dim=1).mean()) for name, part in te.obs_slices().items()}


def saturation(agent: pl.Agent, obs: np.ndarray) -> float:
    """Share of the actor's first-layer pre-activations beyond |SATURATED| over [N, OBS_DIM] observations."""
    with torch.no_grad():
        pre = agent.actor_mean[0](agent.inputs(torch.as_tensor(obs)))
    return float((pre.abs() > SATURATED).float().mean())


def main(args: Args) -> None:
    if len(args.checkpoints) < 2 or args.segments < 4 or args.every < 1:
        raise te.TinyPhysicsError(f"{len(args.checkpoints)} checkpoints, --segments {args.segments}, --every "
                                  f"{args.every}: need 2 or more checkpoints, 4 or more segments, --every 1 or more")
    agents = [pl.load_agent(path)[0] for path in args.checkpoints]
    segments, model = scoring_inputs(args.eval_data_path, args.segments, args.sim_model_path, args.threads)
    obs, costs = observations(agents[0], model, segments, args.every)
    hardest = obs[np.argsort(costs)[-max(1, len(costs) // 4):]].reshape(-1, te.OBS_DIM)
    obs = obs.reshape(-1, te.OBS_DIM)
    names = [name for name, _ in te.OBS_LAYOUT]
    print(f"{len(segments)} segments, {len(obs)} observations of {args.checkpoints[0]}'s policy")
    print("| checkpoint | " + " | ".join(names) + " | saturated | saturated, hardest quarter |")
    print("|---|" + "---:|" * (len(names) + 2))
    for path, agent in zip(args.checkpoints, agents):
        s = sensitivity(agent, obs)
        print(f"| {path} | " + " | ".join(f"{s[n]:.3f}" for n in names) +
              f" | {saturation(agent, obs):.1%} | {saturation(agent, hardest):.1%} |")


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
