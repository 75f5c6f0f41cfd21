"""PPO for lateral control on the Controls Challenge v2 simulator, CleanRL-style, in one file.

    python ppo_lateral.py --num-envs 64 --total-timesteps 1000000
    torchrun --nproc-per-node 2 ppo_lateral.py --num-envs 128   # data-parallel, 64 envs per process

Reads top to bottom in the order PPO runs: arguments, environments, the agent (a residual on top of a
PID-with-feedforward teacher), the critic's warm start, then per iteration: rollout, advantages, the
clipped update, logging, evaluation and checkpoints. The simulator facts live in tinyphysics_env.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

# Torch's OpenMP threads spin after each op by default, taking the cores from the simulator's
# ONNX Runtime sessions that run between them: that halves the simulator's speed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import tyro  # noqa: E402
from torch.distributions.normal import Normal  # noqa: E402
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import tinyphysics_env as te  # noqa: E402
from tinyphysics_env import curvature_inputs, pid_ff_steer, teacher_steer  # noqa: E402  (exported by these names)

CHECKPOINT_KIND = "ppo_lateral"
CHECKPOINT_VERSION = 4  # 3: prev_error, residual policies; 4: the variants' flags removed (3 still loads)


@dataclass
class Args:
    exp_name: str = "ppo_lateral"
    """the name of this experiment (the run folder is runs/<exp_name>__<seed>__<time>)"""
    seed: int = 1
    """seed of the experiment (also picks the synthetic training segments)"""
    cuda: bool = True
    """use CUDA for the agent when it is present"""
    compile: bool = False
    """torch.compile the policy step, the PPO loss and, with --sim-backend torch, the simulator (CPU too)"""
    progress: bool = True
    """show a progress bar (only on a terminal)"""
    runs_dir: str = "runs"
    """where run folders are written"""
    track: bool = False
    """also log the run to Weights & Biases (pip install -e ".[track]"; WANDB_MODE=offline works offline)"""
    wandb_project_name: str = "ppo_lateral"
    """the Weights & Biases project, with --track"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team), with --track"""
    resume: str | None = None
    """continue from runs/<run>/checkpoints/checkpoint_<step>.pt, with that run's saved arguments and segments"""
    extend_to: int | None = None
    """with --resume: train on to this many steps in all (the schedules depend on the step, not the budget)"""

    # Assets and segments
    sim_model_path: str | None = None
    """the tinyphysics .onnx model (else $TINYPHYSICS_MODEL, ../models/tinyphysics.onnx, or a download)"""
    data_path: str | None = None
    """training segments (else $TINYPHYSICS_DATA, ../data, or a download); without --eval-data-path the first
    5,000 (the official test set) are left out and the last --eval-segments of the rest validate"""
    eval_data_path: str | None = None
    """validation segments: they draw the evaluation curve and choose best_model.pt (--data-path then all trains)"""
    synthetic_train: int = 0
    """train on this many generated synthetic segments instead of --data-path"""
    eval_segments: int = 100
    """how many held-out segments each evaluation scores (the first ones in sorted order)"""
    threads: int = 0
    """ONNX Runtime threads for the simulator (0: one per core, shared out among a machine's processes)"""
    sim_backend: Literal["auto", "onnx", "torch"] = "auto"
    """simulator model: onnx (ONNX Runtime), torch (the plain-torch port, on the agent's device), auto (onnx on
    CPU, torch on CUDA); both are score-exact"""

    # Algorithm
    total_timesteps: int = 1_000_000
    """total environment steps"""
    num_envs: int = 64
    """environments stepped in parallel, over all processes (under torchrun each of N steps num_envs / N)"""
    num_steps: int = 100
    """steps per environment per rollout (an episode is 400 steps)"""
    samples_per_segment: int = 4
    """K: each training segment runs K times side by side, and each rollout's advantage is taken against
    the others' (K >= 2, dividing the environments of each process)"""
    common_noise: bool = True
    """give the K rollouts of a segment the same simulator noise, so they differ only by exploration"""
    antithetic_noise: bool = True
    """pair the K rollouts of a segment (K even) with opposite exploration noise, and centre each advantage
    on its pair's mean"""
    noise_correlation: float = 0.9
    """rho in [0, 1): exploration noise is AR(1) within an episode, noise_t = rho * noise_t-1 + N(0, std^2);
    0 is white noise"""
    learning_rate: float = 4e-4
    """Adam learning rate at step 0; it halves by step 500,000 and decays on as 1 / (1 + step / 500,000)"""
    gamma: float = 0.9
    """discount factor until the first of --late-gamma-from"""
    late_gamma: tuple[float, ...] = (0.95, 0.98)
    """discounts used from the steps in --late-gamma-from on, one each (none: --gamma throughout)"""
    late_gamma_from: tuple[int, ...] = (1_000_000, 4_000_000)
    """increasing steps at which each --late-gamma takes over: --total-timesteps 2000000 changes gamma midway"""
    gae_lambda: float = 1.0
    """the lambda of the TD(lambda) returns that the advantages and the critic's targets are made of"""
    num_minibatches: int = 4
    """minibatches per update epoch"""
    update_epochs: int = 4
    """epochs over each batch"""
    norm_adv: bool = True
    """normalize advantages per minibatch"""
    clip_coef: float = 0.05
    """the surrogate clipping coefficient (and the value clip's, in the returns' units)"""
    clip_vloss: bool = True
    """clip the value loss as in the PPO paper's implementation"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient norm clip"""
    target_kl: float | None = None
    """stop the epochs of an update early when approx_kl exceeds this"""

    # The policy
    hidden: int = 64
    """width of the two hidden layers of the actor and the critic"""
    curvature_inputs: bool = True
    """also feed the networks (lataccel - roll) / max(v^2, 1) of the current, target and planned rows"""
    init_logstd: float = -4.0
    """initial log standard deviation of the exploration noise, in action units ([-1, 1] spans the residual)"""

    # Evaluation and checkpoints
    eval_every: int = 100_000
    """score the deterministic policy on the held-out segments every this many steps (and at the end)"""
    checkpoint_every: int = 200_000
    """write a resumable checkpoint every this many steps"""


# Parts of the recipe that are code, not flags.
TEACHER = "pid_ff"  # the controller the policy corrects: PID with feedforward (te.PIDFeedforwardController)
RESIDUAL_SCALE = 0.25  # the largest correction the actor adds to the teacher's steer
REWARD_SCALE = 0.1  # rewards are minus the official per-step cost times this
LR_HALF_LIFE = 500_000  # the step by which the learning rate has halved
EMA_DECAY = 0.97  # the evaluated and saved policy averages the weights after each update with this decay
WARM_START_SEGMENTS, WARM_START_EPOCHS = 256, 30  # the critic is fitted to the teacher's returns before PPO


def validate(args: Args, world: int = 1) -> None:
    """Refuse bad arguments before any work, with a one-line reason each (world: processes under torchrun)."""
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "eval_segments", "eval_every",
                 "checkpoint_every", "hidden"):
        if getattr(args, name) < 1:
            raise te.TinyPhysicsError(f"--{name.replace('_', '-')} {getattr(args, name)}: need at least 1")
    per_process, k = args.num_envs // world, args.samples_per_segment
    late_gammas, late_froms = " ".join(map(str, args.late_gamma)), " ".join(map(str, args.late_gamma_from))
    checks = [
        (args.extend_to is None or args.resume, "--extend-to continues a run: add --resume "
                                                 "runs/<run>/checkpoints/checkpoint_<step>.pt"),
        (args.num_envs % world == 0, f"--num-envs {args.num_envs} does not split over {world} processes; use a "
                                     "multiple of --nproc-per-node (times --nnodes)"),
        ((per_process * args.num_steps) % args.num_minibatches == 0,
         f"--num-minibatches {args.num_minibatches} does not divide the batch of {per_process * args.num_steps} "
         "(num_envs * num_steps per process); pick a divisor"),
        (args.total_timesteps >= args.num_envs * args.num_steps,
         f"--total-timesteps {args.total_timesteps} is less than one batch ({args.num_envs * args.num_steps})"),
        (k >= 2 and per_process % k == 0, f"--samples-per-segment {k} must be 2 or more and divide the "
                                          f"{per_process} environments of each process"),
        (k % 2 == 0 or not args.antithetic_noise, f"--antithetic-noise pairs the K rollouts of a segment: --samples-"
                                                  f"per-segment {k} must be even (or add --no-antithetic-noise)"),
        (0 <= args.noise_correlation < 1, f"--noise-correlation {args.noise_correlation}: must be in [0, 1)"),
        (0 < args.gamma <= 1 and 0 <= args.gae_lambda <= 1, "--gamma must be in (0, 1] and --gae-lambda in [0, 1]"),
        (all(0 < g <= 1 for g in args.late_gamma), f"--late-gamma {late_gammas}: each must be in (0, 1]"),
        (len(args.late_gamma) == len(args.late_gamma_from),
         f"--late-gamma {late_gammas} --late-gamma-from {late_froms}: give one step for each discount"),
        (list(args.late_gamma_from) == sorted(set(args.late_gamma_from)) and min(args.late_gamma_from, default=0) >= 0,
         f"--late-gamma-from {late_froms}: the steps must be increasing and not negative"),
        (args.synthetic_train >= 0, f"--synthetic-train {args.synthetic_train}: cannot be negative"),
    ]
    for ok, message in checks:
        if not ok:
            raise te.TinyPhysicsError(message)


# --- Environments ------------------------------------------------------------------------------
def pick_device(cuda: bool) -> torch.device:
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


def init_distributed(cuda: bool) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun, each process on its own device; (0, 1, device) without it."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), pick_device(cuda)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def load_splits(args: Args, version_3: bool = False) -> tuple[te.Segments, te.Segments, str]:
    """(training, validation) segments, and where the validation ones come from: --eval-data-path, or else the last
    --eval-segments of the training part, not trained on. The official evaluation set (the first 5,000 official
    segments) is neither: it scores the final model. (A resumed version-3 run trained on its validation part.)"""
    def load(path):
        return te.load_segments(path, progress=args.progress)

    if args.synthetic_train:
        train = load(te.cached_synthetic(args.synthetic_train, args.seed))
    else:
        train = load(te.resolve_data_path(args.data_path))
        if not args.eval_data_path:  # the official split: the evaluation set is held out
            train = train.subset(te.split_segments(len(train))[0])
    if args.eval_data_path:
        return train, load(te.resolve_data_path(args.eval_data_path)).first(args.eval_segments), args.eval_data_path
    if len(train) <= args.eval_segments:
        raise te.TinyPhysicsError(f"--eval-segments {args.eval_segments} leaves none of the {len(train)} training "
                                  "segments to train on; pass fewer, or held-out segments with --eval-data-path")
    cut = len(train) - args.eval_segments
    return (train if version_3 else train.subset(np.arange(cut)), train.subset(np.arange(cut, len(train))),
            f"the last {args.eval_segments} training segments ({train.names[cut]} .. {train.names[-1]})")


def training_segments(args: Args, rank: int, world: int,
                      checkpoint: dict | None) -> tuple[te.Segments, te.Segments, te.Segments]:
    """Every training segment (the warm start's pool: rank 0 fits on them all, as one process would), this
    process's disjoint share of them, and the held-out segments."""
    if rank > 0:  # rank 0 writes the synthetic segments and the segment cache; the others then read them
        torch.distributed.barrier()
    pool, eval_segments, where = load_splits(args, bool(checkpoint) and checkpoint["version"] == 3)
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    if checkpoint and checkpoint["train_segments"] != pool.names:  # a resumed run's environments index them
        saved = checkpoint["train_segments"]
        missing = sorted(set(saved) - set(pool.names))
        source = f"--synthetic-train {args.synthetic_train}" if args.synthetic_train else \
            f"--data-path {te.resolve_data_path(args.data_path)}"
        what = (f"{len(missing)} of its {len(saved)} training segments are missing from {source} (first: "
                f"{missing[0]})" if missing else f"{source} holds other training segments ({len(pool)}, not "
                f"{len(saved)})")
        raise te.TinyPhysicsError(f"{args.resume}: {what}; a run resumes only on its own segments, so restore them "
                                  "or start a new run")
    share = pool.subset(np.arange(rank, len(pool), world)) if world > 1 else pool
    if args.num_envs // world // args.samples_per_segment > len(share):
        raise te.TinyPhysicsError(f"--num-envs {args.num_envs} / --samples-per-segment {args.samples_per_segment} "
                                  f"is more than the {len(share) * world} training segments; use fewer "
                                  "envs or more segments")
    if rank == 0 and not checkpoint:
        print(f"validating on {len(eval_segments)} segments: {where}", file=sys.stderr)
    return pool, share, eval_segments


def load_sim_model(model_path: Path, args: Args, device: torch.device) -> te.SimModel:
    """The simulator model, on the agent's device for the torch backend (it trains and scores)."""
    # The processes of one machine share its cores.
    threads = args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return te.load_sim_model(model_path, args.sim_backend, device.type, threads, compile=args.compile)


# --- Agent -------------------------------------------------------------------------------------
def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Separate actor and critic MLPs on the normalized observation (and the curvature inputs). The steer is the
    teacher's plus RESIDUAL_SCALE times the action clipped to [-1, 1]; the actor's last layer starts at zero, so
    the policy starts as the teacher. `config()` lists the layers as built, so a checkpoint rebuilds its own."""

    def __init__(self, obs_dim: int, hidden: int, init_logstd: float = 0.0, obs_offset=None, obs_scale=None,
                 curvature_inputs: bool = False, actor: list | None = None, critic: list | None = None):
        super().__init__()
        offset, scale = te.observation_normalizer() if obs_offset is None else (obs_offset, obs_scale)
        self.register_buffer("obs_offset", torch.as_tensor(np.asarray(offset), dtype=torch.float32))
        self.register_buffer("obs_scale", torch.as_tensor(np.asarray(scale), dtype=torch.float32))
        self.hidden, self.teacher_params = hidden, te.teacher_params()
        self.curvature_params = te.curvature_params() if curvature_inputs else None
        in_dim = obs_dim + (2 + self.curvature_params["plan_rows"] if curvature_inputs else 0)

        def mlp(out_std: float) -> nn.Sequential:
            return nn.Sequential(layer_init(nn.Linear(in_dim, hidden)), nn.Tanh(),
                                 layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
                                 layer_init(nn.Linear(hidden, 1), std=out_std))

        self.critic = from_layer_list(critic) if critic else mlp(1.0)
        self.actor_mean = from_layer_list(actor) if actor else mlp(0.0)
        self.actor_logstd = nn.Parameter(torch.full((1, 1), float(init_logstd)))

    def config(self) -> dict:
        return {"obs_dim": int(self.obs_offset.numel()), "hidden": self.hidden, "obs_offset": self.obs_offset.tolist(),
                "obs_scale": self.obs_scale.tolist(), "curvature_inputs": self.curvature_params is not None,
                "actor": layer_list(self.actor_mean), "critic": layer_list(self.critic)}

    def inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """What the MLPs read: the normalized observation, then the curvature inputs if the policy has them."""
        x = (obs - self.obs_offset) * self.obs_scale
        if self.curvature_params is None:
            return x
        return torch.cat([x, *curvature_inputs(self.curvature_params, obs)], dim=1)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.inputs(obs))

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor, noise_offset: torch.Tensor):
        """The log-probability of an action under the policy whose mean is shifted by noise_offset (the part of
        correlated exploration noise carried over from the previous step), its entropy and the state's value."""
        x = self.inputs(obs)
        probs = Normal(self.actor_mean(x) + noise_offset, self.actor_logstd.expand_as(action).exp())
        return action, probs.log_prob(action).sum(1), probs.entropy().sum(1), self.critic(x)

    def to_steer(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Steer command for an action: the teacher's steer plus a bounded correction."""
        return teacher_steer(self.teacher_params, obs) + RESIDUAL_SCALE * action[:, 0].clamp(-1.0, 1.0)

    def numpy_params(self) -> dict[str, np.ndarray]:
        """The deterministic policy as float64 arrays for `numpy_policy`: the actor's layer names and weights."""
        params = {"actor_layers": np.array([type(m).__name__ for m in self.actor_mean])}
        for i, m in enumerate(self.actor_mean):
            params.update({f"{kind}{i}": p.detach().cpu().double().numpy() for kind, p in m.named_parameters()})
        params.update(obs_offset=self.obs_offset.cpu().double().numpy(),
                      obs_scale=self.obs_scale.cpu().double().numpy(), residual_scale=np.array(RESIDUAL_SCALE),
                      curvature_inputs=np.array(self.curvature_params is not None),
                      **{k: np.array(v) for k, v in (self.teacher_params | (self.curvature_params or {})).items()})
        return params


def layer_list(net: nn.Sequential) -> list:
    """[[class name, in, out] for a Linear, [class name] for a layer without parameters] of a network."""
    return [[type(m).__name__, m.in_features, m.out_features] if isinstance(m, nn.Linear) else [type(m).__name__]
            for m in net]


def from_layer_list(layers: list) -> nn.Sequential:
    return nn.Sequential(*(getattr(nn, name)(*sizes) for name, *sizes in layers))


# --- The deterministic policy in numpy: official scoring and the exported controller ---------------
# These functions are copied as they are into the exported controller, a file that imports numpy alone:
# they use numpy, builtins and each other only (ppo_lateral_eval.py's exporter checks it).
def numpy_inputs(params: dict, obs: np.ndarray) -> np.ndarray:
    """Agent.inputs in float64: the normalized observation, then the curvature inputs if the policy has them."""
    x = (obs - params["obs_offset"]) * params["obs_scale"]
    if bool(params["curvature_inputs"]):
        x = np.concatenate([x, *curvature_inputs(params, obs)], axis=1)
    return x


def numpy_layer(params: dict, i: int, kind: str, x: np.ndarray) -> np.ndarray:
    """Layer i of Agent.actor_mean, of class `kind`, in float64."""
    if kind == "Linear":
        return x @ params[f"weight{i}"].T + params[f"bias{i}"]
    activations = {"Tanh": np.tanh, "ReLU": lambda v: np.maximum(v, 0.0), "Identity": lambda v: v,
                   "ELU": lambda v: np.where(v > 0, v, np.expm1(v)), "SiLU": lambda v: v / (1.0 + np.exp(-v)),
                   "Sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v))}
    if kind not in activations:
        raise ValueError(f"layer {i} is {kind}, which numpy_layer does not compute; use one of "
                         f"Linear, {', '.join(activations)} (or add it to numpy_layer)")
    return activations[kind](x)


def numpy_actor(params: dict, x: np.ndarray) -> np.ndarray:
    """Agent.actor_mean in float64, layer by layer as the checkpoint lists them: the mean action [B]."""
    for i, kind in enumerate(params["actor_layers"]):
        x = numpy_layer(params, i, str(kind), x)
    return x[:, 0]


def numpy_policy(params: dict, obs: np.ndarray) -> np.ndarray:
    """Agent.to_steer of the mean action for observations [B, D], in float64: official scoring uses it and the
    exported controller carries it, so both give the same costs."""
    obs = obs.astype(np.float64, copy=False)
    a = np.clip(numpy_actor(params, numpy_inputs(params, obs)), -1.0, 1.0)
    return teacher_steer(params, obs) + float(params["residual_scale"]) * a


NUMPY_POLICY = (pid_ff_steer, teacher_steer, curvature_inputs, numpy_inputs, numpy_layer, numpy_actor, numpy_policy)


def check_numpy_policy(agent: Agent, obs: torch.Tensor) -> None:
    """Refuse, naming the first part that differs, a numpy policy that does not compute what the agent does on
    these observations (float32 against float64: within 1e-4 of the largest value)."""
    params, x = agent.numpy_params(), obs.detach().float().to(agent.obs_offset.device)
    obs64 = x.double().cpu().numpy()
    with torch.no_grad():
        inputs = agent.inputs(x)
        mean = agent.actor_mean(inputs)
        steer = agent.to_steer(x, mean)
    stages = (("inputs (Agent.inputs against numpy_inputs)", inputs, lambda: numpy_inputs(params, obs64)),
              ("actor output (Agent.actor_mean against numpy_actor)", mean[:, 0],
               lambda: numpy_actor(params, inputs.double().cpu().numpy())),
              ("steer (Agent.to_steer against numpy_policy)", steer, lambda: numpy_policy(params, obs64)))
    for name, expected, numpy_value in stages:
        try:
            got = numpy_value()
        except Exception as e:  # a layer numpy does not compute, a shape that does not fit
            raise te.TinyPhysicsError(f"the numpy policy fails on the {name}: {e}; make numpy_policy compute what "
                                      "the Agent does") from None
        expected = expected.double().cpu().numpy()
        if got.shape != expected.shape:
            got = np.full(expected.shape, np.inf)
        tolerance = 1e-4 * max(1.0, float(np.nanmax(np.abs(expected), initial=0.0)))
        if not np.isclose(got, expected, rtol=0.0, atol=tolerance, equal_nan=True).all():
            gap = float(np.nanmax(np.abs(got - expected)))
            raise te.TinyPhysicsError(f"the numpy policy differs from the torch agent in the {name} by {gap:.3g} on "
                                      "real observations; make numpy_policy compute what the Agent does")


# --- The critic's warm start: the teacher's returns ----------------------------------------------
def teacher_returns(sim: te.TinyPhysicsSim, segments: te.Segments, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Observations and discounted returns of the teacher driving these segments (as the policy's step 0 does)."""
    params, observations = te.teacher_params(), []

    def act(obs: np.ndarray) -> np.ndarray:
        observations.append(obs.astype(np.float32))
        return teacher_steer(params, obs)

    te.rollout_policy(sim, segments, act)
    rewards = np.stack([sim.step_reward(t) for t in range(te.CONTROL_START_IDX, te.COST_END_IDX)]) * REWARD_SCALE
    returns, running = np.zeros_like(rewards), 0.0
    for k in reversed(range(len(rewards))):
        running = rewards[k] + gamma * running
        returns[k] = running
    return np.concatenate(observations), returns.reshape(-1)


def fit_critic(agent: Agent, sim: te.TinyPhysicsSim, segments: te.Segments, args: Args,
               device: torch.device) -> float:
    """Fit the critic to the teacher's returns (the actor is already the teacher); returns the last MSE."""
    obs, returns = teacher_returns(sim, segments, args.gamma)
    obs, returns = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (obs, returns))
    optimizer = torch.optim.Adam(agent.critic.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(WARM_START_EPOCHS):
        for idx in torch.randperm(len(obs), generator=generator).split(512):
            value_loss = ((agent.get_value(obs[idx])[:, 0] - returns[idx]) ** 2).mean()
            optimizer.zero_grad()
            value_loss.backward()
            optimizer.step()
    return value_loss.item()


# --- Rollout -----------------------------------------------------------------------------------
def exploration_actions(agent: Agent, obs: torch.Tensor, previous_noise: torch.Tensor, rho: float,
                        antithetic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Actions with AR(1) noise (rho times the previous step's plus fresh noise, opposite for environments 2j and
    2j+1 with antithetic), the carried-over offsets their log-probability is conditioned on, and the noise."""
    mean = agent.actor_mean(agent.inputs(obs))
    if antithetic:
        half = torch.randn((len(obs) // 2, 1), device=obs.device)
        fresh = torch.stack([half, -half], dim=1).reshape(len(obs), 1)
    else:
        fresh = torch.randn_like(mean)
    offsets = rho * previous_noise
    noise = offsets + agent.actor_logstd.exp() * fresh
    return mean + noise, offsets, noise


def rollout(agent: Agent, policy_step: Callable, envs: te.TinyPhysicsVectorEnv, buf: dict, next_obs: torch.Tensor,
            next_done: torch.Tensor, noise: torch.Tensor, args: Args) -> tuple:
    """Step every environment num_steps times with the stochastic policy, filling buf; returns the next
    observation, done flags and exploration noise, and the costs of the episodes that ended."""
    device, episode_costs = next_obs.device, []
    for step in range(args.num_steps):
        buf["obs"][step], buf["dones"][step] = next_obs, next_done
        with torch.no_grad():
            noise = noise * (1.0 - next_done)[:, None]  # a new episode starts its noise afresh
            action, offsets, noise = exploration_actions(agent, next_obs, noise, args.noise_correlation,
                                                         args.antithetic_noise)
            action, logprob, _, value = policy_step(next_obs, action, offsets)
        buf["noise_offsets"][step], buf["values"][step] = offsets, value.flatten()
        buf["actions"][step], buf["logprobs"][step] = action, logprob
        steer = agent.to_steer(next_obs, action)
        next_obs_np, reward, terminations, truncations, infos = envs.step(steer.double().cpu().numpy())
        buf["rewards"][step] = torch.as_tensor(reward * REWARD_SCALE, dtype=torch.float32, device=device)
        next_obs = torch.as_tensor(next_obs_np, device=device)
        next_done = torch.as_tensor(terminations | truncations, dtype=torch.float32, device=device)
        if "final_info" in infos:
            episode_costs.append({k: infos["final_info"][k] for k in ("total_cost", "lataccel_cost", "jerk_cost")})
    return next_obs, next_done, noise, episode_costs


# --- Advantages --------------------------------------------------------------------------------
def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, next_value: torch.Tensor,
                next_done: torch.Tensor, gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over [num_steps, num_envs] rollouts. dones[t] marks that obs[t] starts a
    new episode (episodes end only by termination); a rollout cut mid-episode is bootstrapped from next_value."""
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal, nextvalues = 1.0 - next_done, next_value
        else:
            nextnonterminal, nextvalues = 1.0 - dones[t + 1], values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


def segment_advantages(returns: torch.Tensor, samples_per_segment: int, group: int) -> torch.Tensor:
    """Advantages from returns [num_steps, num_envs]: environments k*K .. k*K+K-1 run one segment in lockstep, so
    each return is centred on the mean of its `group` of them (K, or 2: an antithetic pair), then divided by its
    segment's standard deviation over the rollout, so that every segment weighs alike whatever its difficulty."""
    num_steps, num_envs = returns.shape
    groups = returns.reshape(num_steps, -1, group)
    groups = (groups - groups.mean(dim=2, keepdim=True)).reshape(num_steps, -1, samples_per_segment)
    if num_steps * samples_per_segment > 1:
        groups = groups / (groups.std(dim=(0, 2), keepdim=True) + 1e-8)
    return groups.reshape(num_steps, num_envs)


def advantages_and_returns(agent: Agent, buf: dict, next_obs: torch.Tensor, next_done: torch.Tensor,
                           gamma: float, args: Args) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages (the TD(lambda) returns against the segment's other rollouts: the critic is no baseline here)
    and returns, the critic's targets."""
    with torch.no_grad():
        next_value = agent.get_value(next_obs).reshape(1, -1)[0]
        _, returns = compute_gae(buf["rewards"], buf["values"], buf["dones"], next_value, next_done, gamma,
                                 args.gae_lambda)
    group = 2 if args.antithetic_noise else args.samples_per_segment
    return segment_advantages(returns, args.samples_per_segment, group), returns


# --- The clipped PPO update ---------------------------------------------------------------------
def previous_steps(buf: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each step's previous observation and action, and whether its noise carried over from that step (not at a
    rollout's first step, nor where an episode started)."""
    prev_obs = torch.cat([buf["obs"][:1], buf["obs"][:-1]])
    prev_actions = torch.cat([buf["actions"][:1], buf["actions"][:-1]])
    carried = buf["dones"] == 0
    carried[0] = False
    return prev_obs, prev_actions, carried[..., None]


def carried_noise(agent: Agent, noise_offsets, prev_obs, prev_actions, carried, args: Args):
    """The carried-over noise under the policy being updated, rho * (a_t-1 - mean(s_t-1)) (else the stored offset),
    so that the log-probability is the AR(1) process's own density: the exact likelihood ratio."""
    if not args.noise_correlation:
        return noise_offsets
    live = args.noise_correlation * (prev_actions - agent.actor_mean(agent.inputs(prev_obs)))
    return torch.where(carried, live, noise_offsets)


def ppo_loss(agent: Agent, obs, actions, noise_offsets, logprobs, advantages, returns, values, prev_obs,
             prev_actions, carried, args: Args):
    """The clipped surrogate, value and entropy losses of a minibatch."""
    noise_offsets = carried_noise(agent, noise_offsets, prev_obs, prev_actions, carried, args)
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(obs, actions, noise_offsets)
    logratio = newlogprob - logprobs
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(-advantages * ratio,
                        -advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)).mean()
    newvalue = newvalue.view(-1)
    if args.clip_vloss:
        v_clipped = values + torch.clamp(newvalue - values, -args.clip_coef, args.clip_coef)
        v_loss = 0.5 * torch.max((newvalue - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
    return loss, pg_loss, v_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac


def ppo_update(agent: Agent, optimizer: torch.optim.Optimizer, loss_fn: Callable, buf: dict,
               advantages: torch.Tensor, returns: torch.Tensor, args: Args, world: int) -> dict:
    """update_epochs epochs of the clipped objective over shuffled minibatches; returns the losses to log."""
    device = advantages.device
    batch = {k: v.reshape(advantages.numel(), -1) for k, v in buf.items() if k not in ("rewards", "dones")}
    batch.update(advantages=advantages.reshape(-1, 1), returns=returns.reshape(-1, 1))
    batch.update(zip(("prev_obs", "prev_actions", "carried"), (x.reshape(len(batch["obs"]), -1)
                                                                for x in previous_steps(buf))))
    minibatch_size = len(batch["obs"]) // args.num_minibatches
    b_inds = np.arange(len(batch["obs"]))
    clipfracs = []
    for _epoch in range(args.update_epochs):
        np.random.shuffle(b_inds)
        for start in range(0, len(b_inds), minibatch_size):
            mb = torch.as_tensor(b_inds[start:start + minibatch_size], device=device)
            b = {k: v[mb] for k, v in batch.items()}
            loss, pg_loss, v_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac = loss_fn(
                agent, b["obs"], b["actions"], b["noise_offsets"], b["logprobs"][:, 0], b["advantages"][:, 0],
                b["returns"][:, 0], b["values"][:, 0], b["prev_obs"], b["prev_actions"], b["carried"], args)
            clipfracs.append(clipfrac.item())
            optimizer.zero_grad()
            loss.backward()
            if world > 1:
                average_gradients(agent, world)
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
        if args.target_kl is not None and mean_over_processes([approx_kl.item()], world, device)[0] > args.target_kl:
            break
    y_pred, y_true = batch["values"].cpu().numpy(), batch["returns"].cpu().numpy()
    var_y = np.var(y_true)
    return {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": entropy_loss.item(),
            "approx_kl": approx_kl.item(), "clipfrac": float(np.mean(clipfracs)),
            "explained_variance": float(np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y),
            "old_approx_kl": old_approx_kl.item()}


def learning_rate_at(global_step: int, args: Args) -> float:
    """The learning rate of the iteration that starts at global_step."""
    return args.learning_rate / (1.0 + global_step / LR_HALF_LIFE)


def gamma_at(global_step: int, args: Args) -> float:
    """The discount of the rollout that starts at global_step (see --late-gamma)."""
    gamma = args.gamma
    for late, start in zip(args.late_gamma, args.late_gamma_from):
        if global_step >= start:
            gamma = late
    return gamma


# --- Data parallelism (torchrun) ------------------------------------------------------------------
def average_gradients(agent: nn.Module, world: int) -> None:
    """All-reduce the gradients to their mean over processes, in one call over a flat buffer."""
    grads = [p.grad for p in agent.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(averaged.view_as(g))


def mean_over_processes(values: list[float], world: int, device: torch.device) -> list[float]:
    """Means over processes of a few floats (losses, costs, flags), so every process takes the same decisions."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return (t / world).tolist()


def gather_objects(obj, world: int) -> list:
    """obj from every process, in rank order (one process: [obj])."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def weights_fingerprint(agent: nn.Module) -> str:
    """sha256 of the parameters' bytes: equal on every process exactly when the replicas are identical."""
    digest = hashlib.sha256()
    for v in agent.state_dict().values():
        digest.update(v.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def replica_fingerprints(policy: nn.Module, world: int) -> list[str]:
    """Every process's weights fingerprint, refusing replicas that diverged (they must average the same updates)."""
    fingerprints = gather_objects(weights_fingerprint(policy), world)
    if len(set(fingerprints)) > 1:
        raise RuntimeError(f"the {world} replicas diverged: weight fingerprints {fingerprints}")
    return fingerprints


# --- Evaluation and logging ----------------------------------------------------------------------
def evaluate(agent: Agent, model: te.SimModel, segments: te.Segments, batch_size: int = 1024,
             progress: bool = False) -> dict[str, np.ndarray]:
    """Official-exact costs of the deterministic policy (mean action) on these segments."""
    sim = te.TinyPhysicsSim(model, official_rng=True)
    params = agent.numpy_params()
    return te.score_in_batches(segments, batch_size,
                               lambda s: te.rollout_policy(sim, s, lambda obs: numpy_policy(params, obs)), progress)


STAT_KEYS = ("global_step", "episodic_total_cost", "episodic_lataccel_cost", "episodic_jerk_cost",
             "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "explained_variance",
             "learning_rate", "sps", "eval_total_cost")
LOSS_KEYS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "explained_variance", "old_approx_kl")


def episodic_means(episode_costs: list[dict]) -> dict[str, float]:
    out = {}
    for key in ("total_cost", "lataccel_cost", "jerk_cost"):
        done_costs = [c[key] for c in episode_costs]
        out[f"episodic_{key}"] = float(np.mean(np.concatenate(done_costs))) if done_costs else np.nan
    return out


def write_scalars(writer: SummaryWriter, row: dict, global_step: int) -> None:
    """An iteration's row: the update's losses under losses/, the rest under charts/."""
    for key, value in row.items():
        if key in ("global_step", "eval_total_cost") or (key.startswith("episodic_") and np.isnan(value)):
            continue  # no episode ended in this rollout
        writer.add_scalar(f"{'losses' if key in LOSS_KEYS else 'charts'}/{'SPS' if key == 'sps' else key}", value,
                          global_step)


def evaluate_and_log(policy: Agent, model: te.SimModel, segments: te.Segments, writer: SummaryWriter,
                     global_step: int) -> float:
    """The policy's mean official cost on the validation segments, with its parts logged."""
    costs = evaluate(policy, model, segments)
    for key in ("total_cost", "lataccel_cost", "jerk_cost"):
        writer.add_scalar(f"eval/{key}", float(costs[key].mean()), global_step)
    return float(costs["total_cost"].mean())


def record_stats(stats: dict[str, list], row: dict, run_dir: Path) -> None:
    for key in STAT_KEYS:
        stats[key].append(row[key])
    te.write_atomic(run_dir / "training_stats.npz", lambda f: np.savez(
        f, **{k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}))


# --- Checkpoints and resuming --------------------------------------------------------------------
def load_agent(path: str | Path, device: str | torch.device = "cpu") -> tuple[Agent, dict]:
    """An Agent rebuilt from a checkpoint alone, and the checkpoint; bad files are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise te.TinyPhysicsError(f"{path}: no such checkpoint; pass a .pt file written by ppo_lateral.py")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # torch raises several kinds for a corrupt file
        raise te.TinyPhysicsError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                                  "it may be truncated") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != CHECKPOINT_KIND:
        raise te.TinyPhysicsError(f"{path}: not a {CHECKPOINT_KIND} checkpoint; pass one written by ppo_lateral.py")
    if checkpoint.get("version") not in (3, CHECKPOINT_VERSION):
        raise te.TinyPhysicsError(f"{path}: checkpoint version {checkpoint.get('version')} is not 3 or "
                                  f"{CHECKPOINT_VERSION}; use the matching version of ppo_lateral.py")
    if checkpoint["version"] == 3:
        checkpoint = from_version_3(checkpoint, path)
    agent = Agent(**checkpoint["agent_config"]).to(device)
    agent.load_state_dict(checkpoint["agent"])
    return agent, checkpoint


def save_checkpoint(obj: dict, path: Path) -> None:
    # Serialised in memory first: torch.save turns a full disk's OSError into an opaque RuntimeError.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    te.write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def policy_checkpoint(agent: Agent, probe_obs: torch.Tensor, **extra) -> dict:
    """What a saved policy holds: its configuration, weights and the observations it was checked on (the
    numpy policy, which scores and is exported, against the agent: a mismatch is refused here)."""
    check_numpy_policy(agent, probe_obs)
    return {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "agent_config": agent.config(),
            "agent": agent.state_dict(), "probe_obs": probe_obs.detach().float().cpu(), **extra}


# Version 3 is what commit 9e7e735 wrote, the last with the variants' flags. Its files load when they used, for
# each flag removed since, the value the recipe now has as code (and are refused otherwise).
LAST_COMMIT_WITH_VARIANTS = "9e7e735"
REMOVED_FLAGS = {"torch_deterministic": True, "amp": False, "sim_precision": "fp32", "cuda_graphs": False,
                 "fast_noise_correlation": None, "noise_logprob": "joint", "sim_dynamics": "sampled",
                 "lr_schedule": "inverse", "final_lr_fraction": 0.0, "segment_baseline": True,
                 "value_baseline": False, "segment_norm": True, "segment_norm_power": 1.0, "segment_norm_floor": 0.0,
                 "norm_reward": False, "innovation_cv": False, "smooth_coef": 0.0, "adam_beta1": 0.9,
                 "anchor_decay": 0.0, "reward_scale": REWARD_SCALE, "jerk_weight": 1.0, "expected_reward": True,
                 "ema_decay": EMA_DECAY, "action_mode": "residual", "max_delta": 0.25, "residual_scale": RESIDUAL_SCALE,
                 "critic_hidden": 0, "policy_dist": "gaussian", "learn_logstd": True, "final_logstd": None,
                 "bc_segments": WARM_START_SEGMENTS, "bc_epochs": WARM_START_EPOCHS, "eval_live": False,
                 "teacher": TEACHER, "lr_decay_steps": LR_HALF_LIFE}
ADDED_SINCE_VERSION_3 = ("track", "wandb_project_name", "wandb_entity")


def from_version_3(checkpoint: dict, path) -> dict:
    """A version-3 checkpoint with today's arguments and agent configuration. It keeps "version": 3, because
    such a run also trained on its validation segments, and goes on doing so when resumed."""
    saved, fields = checkpoint["args"], {f.name for f in dataclasses.fields(Args)}
    allowed = {flag: (value,) for flag, value in REMOVED_FLAGS.items()}
    allowed.update(pair_baseline=(saved.get("antithetic_noise"),), critic_hidden=(0, saved.get("hidden")))
    for flag in sorted(fields - set(ADDED_SINCE_VERSION_3) | set(allowed)):
        name, commit = f"--{flag.replace('_', '-')}", LAST_COMMIT_WITH_VARIANTS
        if flag not in saved:
            raise te.TinyPhysicsError(f"{path}: written before {name} existed; use the ppo_lateral.py that wrote it "
                                      f"(commit {commit} or older)")
        if saved[flag] not in allowed.get(flag, (saved[flag],)):
            raise te.TinyPhysicsError(f"{path}: trained with {name} {saved[flag]}, a variant this version no longer "
                                      f"has; use ppo_lateral.py of commit {commit}")
    return {**checkpoint, "args": {k: v for k, v in saved.items() if k in fields},
            "agent_config": {k: v for k, v in checkpoint["agent_config"].items() if k not in REMOVED_FLAGS}}


def resume_from(args: Args) -> tuple[Args, dict]:
    """The checkpoint --resume names, and the arguments its run trained with (--extend-to and --progress
    applied)."""
    _, checkpoint = load_agent(args.resume)
    if "optimizer" not in checkpoint:
        raise te.TinyPhysicsError(f"{args.resume}: a policy-only file cannot be resumed; pass a file from "
                                  "runs/<run>/checkpoints/")
    if Path(args.resume).parent.name != "checkpoints":
        raise te.TinyPhysicsError(f"{args.resume}: not inside a run folder's checkpoints/; resume from "
                                  "runs/<run>/checkpoints/checkpoint_<step>.pt (move whole run folders only)")
    saved, step = checkpoint["args"], checkpoint["global_step"]
    if args.extend_to is not None and args.extend_to < step + saved["num_envs"] * saved["num_steps"]:
        raise te.TinyPhysicsError(f"--extend-to {args.extend_to}: the checkpoint is at step {step}; extend to at "
                                  "least one more batch")
    resumed = Args(**{**saved, "resume": args.resume, "progress": args.progress, "track": args.track,
                      "total_timesteps": args.extend_to or saved["total_timesteps"]})
    print(f"resuming {checkpoint['run_name']} at step {step} with its saved arguments", file=sys.stderr)
    return resumed, checkpoint


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current iteration, write a checkpoint, exit."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nsignal {signum}: writing a checkpoint after this iteration", file=sys.stderr)


def crossed(global_step: int, batch_size: int, every: int) -> bool:
    """Whether the last batch of steps passed a multiple of `every`."""
    return global_step // every > (global_step - batch_size) // every


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_run(args: Args, checkpoint: dict | None, world: int, lead: bool,
             wandb=None) -> tuple[Path, str, SummaryWriter | None]:
    """The run's folder and name (a resumed run keeps its own) and, on rank 0, its TensorBoard writer, whose
    scalars go to Weights & Biases too with --track, as CleanRL's do."""
    if checkpoint:
        run_dir, run_name = Path(args.resume).parent.parent, checkpoint["run_name"]
    else:
        run_name = gather_objects(f"{args.exp_name}__{args.seed}__{int(time.time())}", world)[0]  # rank 0's clock
        run_dir = Path(args.runs_dir) / run_name
    if not lead:
        return run_dir, run_name, None
    writer = SummaryWriter(str(run_dir))
    if wandb:
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name,
                   dir=str(run_dir), resume="allow", id=run_name.replace("__", "-"))
        wandb.define_metric("*", step_metric="global_step")
        add_scalar = writer.add_scalar

        def mirrored(tag, value, global_step=None, *rest, **kwargs):  # logged as it is written, not synced later
            add_scalar(tag, value, global_step, *rest, **kwargs)
            wandb.log({tag: value, "global_step": global_step})
        writer.add_scalar = mirrored
    if not checkpoint:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in vars(args).items()))
    return run_dir, run_name, writer


def tracker(args: Args):
    """Weights & Biases, imported only for --track (an optional extra); None without it."""
    if not args.track:
        return None
    try:
        import wandb
    except ImportError:
        raise te.TinyPhysicsError('--track logs to Weights & Biases, which is not installed: '
                                  'pip install -e ".[track]"') from None
    return wandb


def start_episodes(args: Args, rank: int, world: int, agent: Agent, envs: te.TinyPhysicsVectorEnv,
                   model: te.SimModel, pool: te.Segments, writer: SummaryWriter | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A new run's first observations, dones and exploration noise, after rank 0's warm start of the critic,
    which every process then starts from."""
    if world > 1:  # each process its own random streams (segments, simulator noise, actions, minibatches)
        seed_everything(args.seed + rank)
    next_obs, _ = envs.reset(seed=args.seed + rank)
    if rank == 0:
        sim = te.TinyPhysicsSim(model, official_rng=False, seed=args.seed)
        picked = np.random.default_rng(args.seed).permutation(len(pool))[:WARM_START_SEGMENTS]
        writer.add_scalar("warm_start/value_mse", fit_critic(agent, sim, pool.subset(picked), args, device), 0)
    if world > 1:
        for tensor in agent.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    return (torch.as_tensor(next_obs, device=device), torch.zeros(envs.num_envs, device=device),
            torch.zeros((envs.num_envs, 1), device=device))


def restore_episodes(checkpoint: dict, rank: int, world: int, agent: Agent, optimizer: torch.optim.Optimizer,
                     envs: te.TinyPhysicsVectorEnv, seed: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Put a resumed run back where its checkpoint stopped (live weights, optimizer, this process's
    environments and random streams); returns the observations, dones and noise it stopped at."""
    agent.load_state_dict(checkpoint["live_agent"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    mine = checkpoint["ranks"][rank] if world > 1 else checkpoint
    torch.set_rng_state(mine["rng"]["torch"])
    np.random.set_state(mine["rng"]["numpy"])
    random.setstate(mine["rng"]["python"])
    envs.reset(seed=seed)
    next_obs = torch.as_tensor(envs.load_state_dict(mine["env"]), device=device)
    return next_obs, mine["next_done"].to(device), mine["noise"].to(device)


# --- Training ----------------------------------------------------------------------------------
def train(args: Args, on_iteration: Callable[[dict], None] | None = None) -> Path:
    """Train as the arguments say; returns the run folder. on_iteration(stats) is called after every
    iteration with that iteration's row of training_stats (for notebooks)."""
    checkpoint = None
    if args.resume:
        args, checkpoint = resume_from(args)

    # Environments and held-out segments: cheap checks first, so bad input fails before any work
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(args, world)
    wandb = tracker(args)
    if checkpoint and checkpoint.get("world_size", 1) != world:
        raise te.TinyPhysicsError(f"{args.resume}: written by {checkpoint.get('world_size', 1)} processes; resume "
                                  f"it with as many (torchrun --nproc-per-node), not {world}")
    model_path = te.resolve_model_path(args.sim_model_path)
    rank, world, device = init_distributed(args.cuda)
    lead = rank == 0  # only rank 0 logs, evaluates and writes files
    pool, train_segments, eval_segments = training_segments(args, rank, world, checkpoint)
    model = load_sim_model(model_path, args, device)
    envs = te.TinyPhysicsVectorEnv(args.num_envs // world, segments=train_segments, model=model,
                                   autoreset_mode="same_step", expected_reward=True,
                                   samples_per_segment=args.samples_per_segment, common_noise=args.common_noise)
    seed_everything(args.seed)
    torch.backends.cudnn.deterministic = True
    run_dir, run_name, writer = open_run(args, checkpoint, world, lead, wandb)

    # Agent and optimizer; a resumed run's state, or a new run's warm start and its score at step 0
    agent = Agent(te.OBS_DIM, args.hidden, args.init_logstd, curvature_inputs=args.curvature_inputs).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    batch_size = args.num_envs * args.num_steps  # global: all processes together
    num_iterations = args.total_timesteps // batch_size
    if checkpoint:
        next_obs, next_done, noise = restore_episodes(checkpoint, rank, world, agent, optimizer, envs, args.seed,
                                                      device)
        stats, best_eval = checkpoint["stats"], checkpoint["best_eval"]
        global_step, start_iteration = checkpoint["global_step"], checkpoint["iteration"] + 1
    else:
        next_obs, next_done, noise = start_episodes(args, rank, world, agent, envs, model, pool, writer, device)
        stats, best_eval = {k: [] for k in STAT_KEYS}, float("inf")
        global_step, start_iteration = 0, 1
    # What is evaluated and saved: a running average of the weights after each update
    ema = AveragedModel(agent, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY))
    if checkpoint:
        ema.load_state_dict(checkpoint["ema"])
    policy, probe_obs = ema.module, next_obs  # the saves check the numpy policy on probe_obs

    def save(path: Path, **extra) -> None:
        save_checkpoint(policy_checkpoint(policy, probe_obs, args=dataclasses.asdict(args), global_step=global_step,
                                          **extra), path)

    def evaluate_and_keep() -> float:
        cost = evaluate_and_log(policy, model, eval_segments, writer, global_step)
        if cost < best_eval:
            save(run_dir / "best_model.pt", eval_total_cost=cost, selection_segments=eval_segments.names)
        return cost

    if lead and not checkpoint:  # row 0: the starting policy, before any PPO update
        best_eval = evaluate_and_keep()
        for key in STAT_KEYS:
            stats[key].append({"global_step": 0, "eval_total_cost": best_eval}.get(key, np.nan))

    policy_step = torch.compile(agent.get_action_and_value) if args.compile else agent.get_action_and_value
    loss_fn = torch.compile(ppo_loss) if args.compile else ppo_loss
    shapes = {"obs": (te.OBS_DIM,), "actions": (1,), "noise_offsets": (1,), "logprobs": (), "rewards": (),
              "dones": (), "values": ()}
    buf = {k: torch.zeros((args.num_steps, envs.num_envs, *shape), device=device) for k, shape in shapes.items()}

    stop = StopRequest()
    previous_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    show_bar = lead and args.progress and sys.stderr.isatty()
    bar = tqdm(total=num_iterations * batch_size, initial=global_step, unit="step", disable=not show_bar)

    def write_checkpoint(path: Path, iteration: int) -> None:
        """Called by every process: rank 0 writes its own and the others' environment and RNG states."""
        states = gather_objects({"env": envs.state_dict(), "next_done": next_done.cpu(), "noise": noise.cpu(), "rng": {
            "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}, world)
        if lead:
            per_rank = {"ranks": states, "world_size": world} if world > 1 else {}
            save(path, optimizer=optimizer.state_dict(), live_agent=agent.state_dict(), ema=ema.state_dict(),
                 run_name=run_name, iteration=iteration, stats=stats, best_eval=best_eval, **states[0],
                 train_segments=pool.names, **per_rank)

    try:
        for iteration in range(start_iteration, num_iterations + 1):
            iteration_start = time.perf_counter()
            optimizer.param_groups[0]["lr"] = learning_rate_at(global_step, args)
            gamma = gamma_at(global_step, args)

            # Rollout (batch-64 policy steps run faster on one thread than on two beside the torch simulator)
            update_threads = torch.get_num_threads()
            if isinstance(model, te.TinyPhysicsModel):
                torch.set_num_threads(1)
            next_obs, next_done, noise, episode_costs = rollout(agent, policy_step, envs, buf, next_obs, next_done,
                                                                noise, args)
            torch.set_num_threads(update_threads)
            global_step += batch_size
            probe_obs = buf["obs"][::max(1, args.num_steps // 4)].reshape(-1, te.OBS_DIM)  # for the saves' check

            # Advantages, then the clipped update; the evaluated policy averages the weights
            advantages, returns = advantages_and_returns(agent, buf, next_obs, next_done, gamma, args)
            row = ppo_update(agent, optimizer, loss_fn, buf, advantages, returns, args, world)
            ema.update_parameters(agent)

            # Logging: means over processes (every process is equal in size), written by rank 0
            row.update(episodic_means(episode_costs))
            row["stop"] = float(stop.signum > 0)  # a signal to any process stops them all at the same iteration
            row = dict(zip(row, mean_over_processes(list(row.values()), world, device)))
            stopping = row.pop("stop") > 0
            row.update(global_step=global_step, learning_rate=optimizer.param_groups[0]["lr"], gamma=gamma,
                       eval_total_cost=np.nan, sps=batch_size / (time.perf_counter() - iteration_start))
            if lead:
                write_scalars(writer, row, global_step)

            # Evaluation and checkpoints
            if lead and (crossed(global_step, batch_size, args.eval_every) or iteration == num_iterations):
                row["eval_total_cost"] = evaluate_and_keep()
                best_eval = min(best_eval, row["eval_total_cost"])
                bar.set_postfix(eval_cost=f"{row['eval_total_cost']:.2f}", sps=f"{row['sps']:.0f}")
            if lead:
                record_stats(stats, row, run_dir)
            if crossed(global_step, batch_size, args.checkpoint_every) or stopping or iteration == num_iterations:
                write_checkpoint(run_dir / "checkpoints" / f"checkpoint_{global_step}.pt", iteration)
            bar.update(batch_size)
            if on_iteration and lead:
                on_iteration(row)
            if stopping:
                signum = stop.signum or signal.SIGTERM
                if lead:
                    print(f"stopped by signal {signum}; resume with --resume "
                          f"{run_dir / 'checkpoints' / f'checkpoint_{global_step}.pt'}", file=sys.stderr)
                raise SystemExit(128 + signum)
        fingerprints = replica_fingerprints(policy, world)
        if lead:
            save(run_dir / "final_model.pt", eval_total_cost=stats["eval_total_cost"][-1],
                 replica_fingerprints=fingerprints, selection_segments=eval_segments.names)
    finally:
        bar.close()
        if writer:
            writer.close()
        if wandb and lead:
            wandb.finish()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if world > 1:
            torch.distributed.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    te.run_cli(lambda: print(train(tyro.cli(Args))))
