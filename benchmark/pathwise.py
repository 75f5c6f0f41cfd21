"""Is PPO's plateau the gradient estimator's, or the policy's? Three measurements with a pathwise gradient,
backpropagated through the torch port of the simulator (`te.gpt_last_logits`) over the whole rollout.

The sampled step is not differentiable, so the gradient goes through the step's mean, with the sampled
innovation (sample minus mean) held fixed; the context tokens are differentiated through a linear
interpolation between neighbouring token embeddings (the forward pass keeps the exact token). Everything
outside the model runs in float64, as the official program does.

    split      each policy's official cost, the share of it the sampling variance makes (the expected
               step cost's variance terms), its cost under --sim-dynamics expected, and what is left above
               the variance share and the smoothing bound (the least any trajectory pays for the target)
    finetune   the deterministic policy of a checkpoint (or the teacher, at its step-0 weights) trained by
               the pathwise gradient on synthetic training segments, its mean of log episode costs (every
               segment weighted alike), scored official-exact on held-out segments as it goes
    plan       a per-segment open-loop steer correction on top of a policy, optimised under expected
               dynamics (no knowledge of the noise), then scored official-exact: how much lower a
               controller that plans with the model could go

    python benchmark/pathwise.py split pid_ff runs/<run>/final_model.pt \\
        --eval-data-path ~/.cache/tinyphysics/synthetic/heldout-n200-seed12345 \\
        --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx
    python benchmark/pathwise.py finetune pid_ff --iterations 60 --learning-rate 3e-4 --save-path pw_teacher.pt ...
    python benchmark/pathwise.py plan runs/<run>/final_model.pt --segments 32 --iterations 40 --learning-rate 0.002 ...
"""

import copy
import dataclasses
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from common import scoring_inputs

import ppo_lateral as pl
import tinyphysics_env as te

# Each controlled step's share of the official cost per squared lateral-acceleration error and per squared
# step change (the jerk's 1/DT^2 folded in).
LAT_WEIGHT = te.LAT_ACCEL_COST_MULTIPLIER * 100.0 / te.COST_STEPS
JERK_WEIGHT = 100.0 / (te.COST_STEPS - 1) / te.DT**2


@dataclasses.dataclass
class Args:
    mode: tyro.conf.Positional[Literal["split", "finetune", "plan"]]
    policies: tyro.conf.Positional[tuple[str, ...]]
    """checkpoints written by ppo_lateral.py, or pid_ff (a residual policy at its step-0 weights); finetune and
    plan take one"""
    eval_data_path: str | None = None
    """held-out segments to score on (else as ppo_lateral_eval.py finds data)"""
    segments: int = 200
    """score (plan: optimise and score) the first this many held-out segments"""
    sim_model_path: str | None = None
    """the tinyphysics .onnx model"""
    threads: int = 2
    """torch and ONNX Runtime threads"""
    synthetic_train: int = 5000
    """finetune: train on this many synthetic segments (the split ppo_lateral.py --synthetic-train makes)"""
    seed: int = 1
    """finetune: the synthetic training split's seed, and the seed of batches and simulator noise"""
    batch: int = 32
    """finetune: segments per gradient step"""
    iterations: int = 60
    """gradient steps"""
    learning_rate: float = 3e-4
    """Adam's step (finetune: on the actor's weights; plan: on the steer corrections)"""
    max_grad_norm: float = 1.0
    """finetune: gradient norm clip"""
    eval_every: int = 10
    """finetune: score the held-out segments every this many steps"""
    save_path: str | None = None
    """finetune: write the trained policy here (a checkpoint ppo_lateral_eval.py and the export take)"""
    validation: int = 0
    """finetune: also score this many synthetic validation segments (made with --validation-seed, apart from
    the training and held-out ones) at every held-out evaluation, and keep and save the weights that score
    lowest there (step 0 included) instead of the last: the choice never looks at the held-out scores"""
    validation_seed: int = 54321
    """finetune: the seed of the validation segments"""


def load_policy(entry: str) -> pl.Agent:
    """A checkpoint's policy, or for pid_ff the residual policy at its step-0 weights (the teacher itself)."""
    if entry == "pid_ff":
        d = pl.Args()  # the policy ppo_lateral.py starts from with its defaults
        return pl.Agent(te.OBS_DIM, d.hidden, "residual", d.max_delta, d.init_logstd, critic_hidden=d.critic_hidden,
                        teacher="pid_ff", residual_scale=d.residual_scale, policy_dist=d.policy_dist,
                        curvature_inputs=d.curvature_inputs)
    return pl.load_agent(entry)[0]


def model_weights(path) -> tuple[dict[str, torch.Tensor], int]:
    return {k: torch.as_tensor(v) for k, v in te.onnx_weights(path).items()}, te.attention_heads(path)


def token_embedding(table: torch.Tensor, lataccel: torch.Tensor) -> torch.Tensor:
    """Embedding rows of the tokens of [B, 20] lateral accelerations: the exact rows forward; backward the
    slope of the linear interpolation between the two rows either side of each value."""
    clipped = lataccel.clamp(*te.LATACCEL_RANGE)
    bins = torch.as_tensor(te.BINS)
    exact = table[torch.searchsorted(bins, clipped.detach().contiguous())]  # as te.encode: bins[i-1] < x <= bins[i]
    position = (clipped - te.LATACCEL_RANGE[0]) / (te.BINS[1] - te.BINS[0])
    low = position.detach().floor().clamp(0, te.VOCAB_SIZE - 2).long()
    fraction = (position - low).float()[..., None]
    interpolated = table[low] + fraction * (table[low + 1] - table[low])
    return exact + (interpolated - interpolated.detach())


def observation(seg: dict, t: int, actions: list, current: list, integral, previous_error) -> torch.Tensor:
    """`te.observe` in torch from the rollout's lists of per-step tensors, so that gradients pass through it."""
    h, f = te.OBS_HISTORY, te.FUTURE_LEN
    future = [seg[k][:, t + 1:t + 1 + f] for k in ("target_lataccel", "roll_lataccel", "v_ego", "a_ego")]
    now = torch.stack([seg["target_lataccel"][:, t], current[t - 1], seg["roll_lataccel"][:, t], seg["v_ego"][:, t],
                       seg["a_ego"][:, t]], 1)
    past_actions = [a if k >= te.CONTROL_START_IDX else torch.zeros_like(a)
                    for k, a in enumerate(actions[t - h:t], t - h)]
    return torch.cat([now, torch.stack(past_actions, 1), torch.stack(current[t - h:t], 1), *future,
                      integral[:, None], previous_error[:, None]], 1)


def rollout_costs(agent: pl.Agent, weights: tuple[dict, int], segments: te.Segments, dynamics: str,
                  uniforms=None, plan: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable official cost per segment of the agent's deterministic policy (float64; plus `plan`
    [B, 400], a steer correction per controlled step). Sampled dynamics draw each step's token from
    `uniforms` [B, >=480] (te.official_uniforms gives the official ones); expected dynamics use the mean."""
    w, heads = weights
    seg = {k: torch.as_tensor(np.asarray(getattr(segments, k)), dtype=torch.float64) for k in te.Segments.FIELDS}
    target = seg["target_lataccel"]
    start, context = te.CONTROL_START_IDX, te.CONTEXT_LENGTH
    actions = list(seg["steer_command"][:, :start].T)
    current = list(target[:, :start].T)
    errors = target[:, context:start] - target[:, context - 1:start - 1]
    integral, previous_error = errors.sum(1), errors[:, -1]
    bins = torch.as_tensor(te.BINS)
    cost = torch.zeros(len(segments), dtype=torch.float64)
    for t in range(start, te.COST_END_IDX):
        error = target[:, t] - current[t - 1]
        integral = integral + error
        obs = observation(seg, t, actions, current, integral, previous_error)
        previous_error = error
        steer = agent.to_steer(obs, agent.actor_mean(agent.inputs(obs)))
        actions.append((steer if plan is None else steer + plan[:, t - start]).clamp(*te.STEER_RANGE))
        window = slice(t - context + 1, t + 1)
        states = torch.stack([torch.stack(actions[window], 1)] +
                             [seg[k][:, window] for k in ("roll_lataccel", "v_ego", "a_ego")], -1)
        context_embedding = token_embedding(w["wt2_embedding.weight"], torch.stack(current[t - context:t], 1))
        logits = te.gpt_last_logits(w, states.float(), None, heads, context_embedding)
        probs = torch.softmax(logits / te.TEMPERATURE, -1).double()
        outcomes = torch.clamp(bins[None], current[t - 1][:, None] - te.MAX_ACC_DELTA,
                               current[t - 1][:, None] + te.MAX_ACC_DELTA)
        mean = (probs * outcomes).sum(1)
        if dynamics == "sampled":
            token = te.torch_inverse_cdf(probs.detach(), uniforms[:, t - context])
            mean = mean + (outcomes.detach().gather(1, token[:, None])[:, 0] - mean).detach()
        cost = cost + LAT_WEIGHT * (target[:, t] - mean) ** 2
        if t > start:
            cost = cost + JERK_WEIGHT * (mean - current[t - 1]) ** 2
        current.append(mean)
    return cost


def score(agent: pl.Agent, model: te.SimModel, segments: te.Segments, plan: np.ndarray | None = None) -> np.ndarray:
    """Official-exact total cost per segment of the agent's deterministic policy (plus an open-loop plan)."""
    params = agent.numpy_params()
    sim = te.TinyPhysicsSim(model, official_rng=True)

    def act(obs):
        steer = pl.numpy_policy(params, obs)
        return steer if plan is None else steer + plan[:, sim.t - te.CONTROL_START_IDX]
    return te.rollout_policy(sim, segments, act)["total_cost"]


def summary(costs: np.ndarray) -> str:
    return f"mean {costs.mean():6.2f}  median {np.median(costs):6.2f}"


def smoothing_bound(target: np.ndarray) -> np.ndarray:
    """Per segment, the least official cost any lateral-acceleration trajectory pays against this [B, 400]
    target in the cost window, with no dynamics and no noise: the minimum of a quadratic, where the
    tracking error's pull and the step changes' balance. Adding a policy's variance share gives a floor
    under its expected cost, since a step's innovation adds its variance to both terms whatever the steer."""
    n = target.shape[1]
    steps = np.diff(np.eye(n), axis=0)
    trajectory = np.linalg.solve(LAT_WEIGHT * np.eye(n) + JERK_WEIGHT * steps.T @ steps, LAT_WEIGHT * target.T).T
    return te.compute_costs(target, trajectory)["total_cost"]


def split(args: Args, model: te.SimModel, held: te.Segments) -> None:
    bound = smoothing_bound(held.target_lataccel[:, te.CONTROL_START_IDX:te.COST_END_IDX])
    print(f"the smoothing bound (the least any trajectory pays, noise and dynamics aside): {summary(bound)}")
    print("policy | official cost | sampling variance's share (the expected step costs' variance terms) | "
          "cost under expected dynamics | official cost less the share and the bound (what steering can still win)")
    for entry in args.policies:
        params = load_policy(entry).numpy_params()
        sim = te.TinyPhysicsSim(model, official_rng=True, expected_reward=True)
        def act(obs, params=params):
            return pl.numpy_policy(params, obs)
        costs = te.rollout_policy(sim, held, act)["total_cost"]
        var = sim.pred_var[:, te.CONTROL_START_IDX:te.COST_END_IDX]
        share = LAT_WEIGHT * var.sum(1) + JERK_WEIGHT * var[:, 1:].sum(1)
        expected = te.rollout_policy(te.TinyPhysicsSim(model, official_rng=False, dynamics="expected"), held,
                                     act)["total_cost"]
        print(f"{entry}: {summary(costs)} | {summary(share)} ({share.mean() / costs.mean():.0%}) | {summary(expected)}"
              f" | {summary(costs - share - bound)}")


def finetune(args: Args, model: te.SimModel, held: te.Segments) -> None:
    agent = load_policy(args.policies[0]).double()
    weights = model_weights(te.resolve_model_path(args.sim_model_path))
    train = te.load_segments(te.cached_synthetic(args.synthetic_train, args.seed), progress=False)
    validation = None if not args.validation else te.load_segments(
        te.cached_synthetic(args.validation, args.validation_seed, "validation-"), progress=False)
    optimizer = torch.optim.Adam(agent.actor_mean.parameters(), lr=args.learning_rate, eps=1e-5)
    rng = np.random.default_rng(args.seed)
    best = (np.inf, 0, None)  # validation mean, step, weights

    def evaluate(iteration: int) -> str:
        nonlocal best
        line = f"held-out {summary(score(agent, model, held))}"
        if validation is not None:
            cost = score(agent, model, validation).mean()
            if cost < best[0]:
                best = (cost, iteration, copy.deepcopy(agent.state_dict()))
            line += f"  validation mean {cost:6.2f}"
        return line
    print(f"step 0: {evaluate(0)}", flush=True)
    start = time.perf_counter()
    for iteration in range(1, args.iterations + 1):
        batch = train.subset(rng.choice(len(train), args.batch, replace=False))
        uniforms = torch.as_tensor(rng.random((args.batch, te.COST_END_IDX)))
        costs = rollout_costs(agent, weights, batch, "sampled", uniforms)
        optimizer.zero_grad()
        costs.log().mean().backward()  # d log C = dC / C: every segment's relative change counts alike
        grad_norm = torch.nn.utils.clip_grad_norm_(agent.actor_mean.parameters(), args.max_grad_norm)
        optimizer.step()
        line = f"step {iteration}: training {summary(costs.detach().numpy())}  grad norm {grad_norm:.3f}"
        if iteration % args.eval_every == 0 or iteration == args.iterations:
            line += f"  {evaluate(iteration)}  ({time.perf_counter() - start:.0f} s)"
        print(line, flush=True)
    if validation is not None:
        agent.load_state_dict(best[2])
        print(f"kept step {best[1]} (validation mean {best[0]:.2f})", flush=True)
    if args.save_path:
        pl.save_checkpoint(pl.policy_checkpoint(agent.float()), Path(args.save_path))


def plan(args: Args, model: te.SimModel, held: te.Segments) -> None:
    agent = load_policy(args.policies[0]).double().requires_grad_(False)
    weights = model_weights(te.resolve_model_path(args.sim_model_path))
    corrections = torch.zeros(len(held), te.COST_STEPS, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([corrections], lr=args.learning_rate)
    print(f"no plan: official {summary(score(agent, model, held))}", flush=True)
    for iteration in range(args.iterations + 1):
        costs = rollout_costs(agent, weights, held, "expected", plan=corrections)
        if iteration in (0, args.iterations) or iteration % args.eval_every == 0:
            official = score(agent, model, held, corrections.detach().numpy())
            print(f"step {iteration}: expected dynamics {summary(costs.detach().numpy())}  "
                  f"official {summary(official)}", flush=True)
        optimizer.zero_grad()
        costs.sum().backward()  # each segment's corrections are its own
        optimizer.step()


def main(args: Args) -> None:
    if args.mode != "split" and len(args.policies) != 1:
        raise te.TinyPhysicsError(f"{args.mode} takes one policy, not {len(args.policies)}; "
                                  "name one checkpoint or pid_ff")
    if args.validation and args.validation_seed == args.seed:
        raise te.TinyPhysicsError(f"--validation-seed {args.validation_seed} is the training split's --seed, so the "
                                  "validation segments would be trained on; pick another --validation-seed")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    held, model = scoring_inputs(args.eval_data_path, args.segments, args.sim_model_path, args.threads)
    {"split": split, "finetune": finetune, "plan": plan}[args.mode](args, model, held)


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
