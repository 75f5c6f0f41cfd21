"""Where the advantage's noise comes from: the discounted returns of the first few iterations of a
ppo_lateral.py run, split over each segment's K rollouts into the part odd in the exploration noise (half
the difference of an antithetic pair: what the gradient learns from) and the part even in it (the pair's
mean, centred over the segment), beside the spread between segments that the per-segment centring removes.

Run it once as the official simulator samples and once with --sim-dynamics expected (no sampling noise,
the same segments and the same exploration draws): the odd part's drop is the simulator's share.

    python benchmark/advantage_noise.py --synthetic-train 5000 --eval-data-path ../shared/tinyphysics/data \\
        --eval-segments 5 --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx --total-timesteps 19200
    # ... the same with --sim-dynamics expected
"""

import dataclasses
import tempfile

import numpy as np
import tyro

import ppo_lateral as pl

TAIL = 15  # the rollout's last steps lean on the critic's bootstrap: left out


def decompose(returns: np.ndarray, samples_per_segment: int) -> dict[str, float]:
    """Variances of the odd, centred even and between-segment parts of [num_steps, num_envs] returns whose
    environments k*K .. k*K+K-1 run one segment, with antithetic pairs (2j, 2j+1) among them."""
    steps, envs = returns.shape
    groups = returns.reshape(steps, envs // samples_per_segment, samples_per_segment // 2, 2)
    pair_mean = groups.mean(axis=3)
    return {"odd": float(((groups[..., 0] - groups[..., 1]) / 2).var()),
            "even": float((pair_mean - pair_mean.mean(axis=2, keepdims=True)).var()),
            "between segments": float(pair_mean.mean(axis=2).var())}


def main(args: pl.Args) -> None:
    if not args.antithetic_noise or args.samples_per_segment % 2:
        raise SystemExit("advantage_noise.py splits antithetic pairs: keep --antithetic-noise and an even K")
    captured = []
    compute = pl.advantages_and_returns

    def capturing(agent, buf, next_obs, next_done, gamma, run_args):
        advantages, returns = compute(agent, buf, next_obs, next_done, gamma, run_args)
        captured.append(returns[:-TAIL].cpu().numpy())
        return advantages, returns

    pl.advantages_and_returns = capturing  # train() looks it up at call time
    with tempfile.TemporaryDirectory() as runs_dir:
        pl.train(dataclasses.replace(args, runs_dir=runs_dir, progress=False))
    print(f"--sim-dynamics {args.sim_dynamics}, K={args.samples_per_segment}, seed {args.seed}: variance of the "
          "discounted return (reward units)")
    for i, returns in enumerate(captured, 1):
        parts = decompose(returns, args.samples_per_segment)
        print(f"iteration {i}: " + ", ".join(f"{k} {v:.3e}" for k, v in parts.items()))


if __name__ == "__main__":
    main(tyro.cli(pl.Args))
