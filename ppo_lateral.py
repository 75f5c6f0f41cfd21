"""PPO for lateral control on the Controls Challenge v2 simulator, CleanRL-style, in one file.

    python ppo_lateral.py --num-envs 64 --total-timesteps 1000000
    torchrun --nproc-per-node 2 ppo_lateral.py --num-envs 128   # data-parallel, 64 envs per process

Reads top to bottom in the order PPO runs: arguments, environments, the agent, (optional)
behaviour-cloning warm start, then per iteration: rollout, GAE, the clipped update, logging,
evaluation and checkpoints. The simulator facts live in tinyphysics_env.py.
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
# ONNX Runtime sessions that run between them: measured, that halves the simulator's speed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import tyro  # noqa: E402
from torch.distributions.normal import Normal  # noqa: E402
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import tinyphysics_env as te  # noqa: E402

CHECKPOINT_KIND = "ppo_lateral"
CHECKPOINT_VERSION = 3  # 2: the observation gained error_integral; 3: prev_error, residual policies


@dataclass
class Args:
    exp_name: str = "ppo_lateral"
    """the name of this experiment (the run folder is runs/<exp_name>__<seed>__<time>)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """torch.backends.cudnn.deterministic (on CPU results are deterministic for a fixed thread count)"""
    cuda: bool = True
    """use CUDA for the agent when it is present"""
    compile: bool = False
    """torch.compile the policy step, the PPO loss and, with --sim-backend torch, the simulator model (works on
    CPU too; the first iteration compiles)"""
    amp: bool = False
    """autocast to bfloat16 on CUDA; ignored on CPU"""
    progress: bool = True
    """show a progress bar (only on a terminal)"""
    runs_dir: str = "runs"
    """where run folders are written"""
    resume: str | None = None
    """continue the run of this checkpoint, runs/<run>/checkpoints/checkpoint_<step>.pt, with its saved arguments,
    in the run folder that holds it (a moved run folder resumes where it now is). It needs the same training
    segments: with other data, start a new run instead"""
    extend_to: int | None = None
    """with --resume: train on to this many steps in all instead of the saved run's --total-timesteps (a
    finished run continues from the checkpoint its last iteration writes). Only where nothing depends on the
    budget (--lr-schedule inverse or constant, no --final-logstd): the extended run then trains, step for step,
    the weights that budget would have (its records keep the shorter run's final evaluation as one more row)"""

    # Assets and segments
    sim_model_path: str | None = None
    """the tinyphysics .onnx model (else $TINYPHYSICS_MODEL, ../models/tinyphysics.onnx, or a download)"""
    data_path: str | None = None
    """training segments (else $TINYPHYSICS_DATA, ../data, or a download); with no --eval-data-path the
    first 5,000 are held out for evaluation and the rest are trained on"""
    eval_data_path: str | None = None
    """held-out segments to evaluate on (all of --data-path is then trained on)"""
    synthetic_train: int = 0
    """train on this many generated synthetic segments instead of --data-path"""
    eval_segments: int = 100
    """how many held-out segments each evaluation scores (the first ones in sorted order)"""
    threads: int = 0
    """ONNX Runtime threads for the simulator (0: one per core, shared out among the processes of a machine)"""
    sim_backend: Literal["auto", "onnx", "torch"] = "auto"
    """simulator model: onnx (ONNX Runtime), torch (plain-torch port on the agent's device, sampling there
    too), auto (measured fastest: onnx on CPU, torch on CUDA)"""
    sim_precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """torch backend: tf32/bf16 speed up training steps on GPUs but are not score-exact (evaluation stays fp32)"""
    cuda_graphs: bool = False
    """torch backend on CUDA: capture the per-step simulator call as a CUDA graph (torch.compile reduce-overhead)"""

    # Algorithm
    total_timesteps: int = 1_000_000
    """total environment steps"""
    num_envs: int = 64
    """segments stepped in parallel, over all processes: under torchrun each of the N processes steps
    num_envs / N of them, so the batch per update (num_envs * num_steps) is global"""
    num_steps: int = 100
    """steps per environment per rollout (an episode is 400 steps)"""
    samples_per_segment: int = 4
    """K: run each training segment K times side by side in one batch (num_envs / K segments at a time), so
    that --segment-baseline can compare the K rollouts of one segment (measured, 1M steps, 200 held-out
    synthetic segments, 3 seeds: 4 51.09, median 41.26, against 8 51.22, median 41.47: twice the segments
    per batch for a baseline of 4 rollouts instead of 8)"""
    common_noise: bool = True
    """give the K rollouts of a segment the same simulator noise (common random numbers): they then differ
    only by the policy's own exploration"""
    antithetic_noise: bool = True
    """pair the K rollouts of a segment (K even) and give each pair opposite exploration noise, +e and -e: what
    the noise costs whatever its sign (the jerk it adds) then cancels out of their comparison (measured with
    --learning-rate 2e-4, 1M steps, 200 held-out synthetic segments, seed 1: 52.85 against 53.10 without)"""
    noise_correlation: float = 0.9
    """rho: exploration noise as an AR(1) process within each episode, noise_t = rho * noise_{t-1} + fresh
    Gaussian noise of the policy's std (so --init-logstd sets the fresh part; the noise's own std is that over
    sqrt(1 - rho^2)). Slowly varying noise moves the lateral acceleration more for the jerk it adds than white
    noise does. 0: white noise (measured, 1M steps, 200 held-out synthetic segments, seed 1: 0.9 53.82 against
    white 54.32; 0.9 with --init-logstd -3.5 54.06, best 53.72 at 750k). Slow noise barely probes the
    step-to-step part of the steer, so past 1M the jerk walks up; faster noise holds it and learns the tracking
    more slowly (on the present defaults, seed 1: 0.75 51.72 at 1M, 51.27 at 2M; 0.5 52.98, 51.88, and 51.38 at
    4M, still falling, its jerk flat to 2M; 0.9 50.83, 51.26, 51.62))"""
    fast_noise_correlation: float | None = None
    """a second, faster noise process beside --noise-correlation's: the second antithetic pair of each
    segment's rollouts (with --samples-per-segment 4, rollouts 3 and 4; with 8, pairs 2 and 4) explores with
    this rho instead, so every batch probes both the slow part of the steer, where the tracking is won, and its
    step-to-step part, where the jerk is. Each rollout's noise stays one AR(1) process, so its likelihood ratio
    stays exact. None: every rollout uses --noise-correlation (measured with 0.5, 200 held-out synthetic
    segments: seed 1, 51.87, 51.05, 51.33 at 1M, 2M, 4M; with --gamma 0.95, seeds 1 and 2, 52.37, 51.19, 50.76,
    each longer run lower and the lowest 4M mean of any recipe, but 1.6 above the defaults at 1M: half the
    rollouts probing slowly learn the tracking more slowly, and the jerk's climb comes later, not never)"""
    noise_logprob: Literal["conditioned", "joint"] = "joint"
    """correlated noise's log-probability in the PPO ratio. joint: the AR(1) process's own density, the
    carried-over part rho * (previous action - previous mean) recomputed under the policy being updated (the
    exact likelihood ratio, for all but each rollout's first step, whose previous step is in the batch before;
    one more actor pass per minibatch); conditioned: given the carried-over part as it was in the rollout, a
    biased gradient that credits a step's mean with the later steps' actions too. A smooth change of the mean
    barely moves the joint ratio, so it wants a tighter --clip-coef (measured, 1M steps, 200 held-out synthetic
    segments, 3 seeds: joint with --clip-coef 0.05 51.80, median 42.05, against conditioned with 0.2 52.65,
    median 42.97; seed 1, joint with 0.2: unstable, 56.37 at 750k)"""
    sim_dynamics: Literal["sampled", "expected"] = "sampled"
    """training dynamics: sampled (the official simulator) or expected (the next lateral acceleration is the
    mean of the model's clipped token distribution, no sampling noise). expected is a TRAINING mode whose
    training costs are not official-exact; evaluation is always official-exact. It takes two thirds of the
    noise out of an antithetic pair's difference (benchmark/advantage_noise.py) but learns other dynamics than
    it is scored on: measured on the defaults, 1M steps, seed 1, 55.07 and 56.01 at 250k and 500k, worse than
    the teacher)"""
    learning_rate: float = 4e-4
    """Adam learning rate, at the start of --lr-schedule (measured, 1M steps, 200 held-out synthetic segments,
    3 seeds: with the inverse schedule 4e-4 50.79, see --lr-schedule; under the linear one 2e-4 with
    --antithetic-noise 52.65 against 1e-4 without 52.93; seed 1, correlated noise: 2e-4 53.10, 1e-4 53.47;
    with white noise 1e-4 54.32, 3e-4 54.54, 1e-3 54.70 at 500k; pid_ff itself 54.66). Under torchrun it
    applies to the gradient averaged over processes, so the same global batch trains as one process would: do
    not scale it with the process count"""
    lr_schedule: Literal["linear", "cosine", "constant", "inverse"] = "inverse"
    """learning-rate decay over the run: linear to zero, cosine to --final-lr-fraction, none, or inverse:
    --learning-rate / (1 + step / --lr-decay-steps), whatever the budget, so a longer run continues a shorter
    one and the noise's random walk (the sum of the squared rates) stays bounded while the signal (their sum)
    keeps growing (measured, 1M steps, 200 held-out synthetic segments, 3 seeds: inverse from 4e-4 with the
    other defaults 50.79, median 41.23, real 37.33; constant 4e-4 with them 50.89; linear from 2e-4 without
    --ema-decay, --expected-reward and --pair-baseline, the previous defaults, 51.09, median 41.26, real
    37.07. Past 1M none of them keeps improving: at 4M, seed 1, inverse reaches 50.83 at 1M and then turns
    up as the others do, the jerk climbing)"""
    lr_decay_steps: int = 500_000
    """inverse schedule: the step at which the learning rate has halved"""
    final_lr_fraction: float = 0.0
    """cosine schedule: the last learning rate as a fraction of --learning-rate"""
    gamma: float = 0.9
    """discount factor, until --late-gamma-from (measured at 1M steps: 0.9 beat 0.95 and 0.99; a step's steer
    matters for about a second. On the present defaults, 200 held-out synthetic segments, seeds 1 and 2: 0.95
    51.10 at 1M, 50.83 at 2M, 50.99 at 4M (median 39.88 there) against 0.9's 50.76 and 51.25 at 1M and 2M
    (51.70 at 4M); 0.97, seed 1, 51.57, 51.64. 0.95 keeps improving the tracking past 1M, where 0.9 stops, but
    misses the 1M headline: 51.04 over seeds 1-3 against 50.79; at 4M, seeds 1-3, 50.87 against 0.9's 51.70,
    hence --late-gamma; seeds 1-3 run on to 16M: 50.83 at 8M, 50.69 at 16M (0.927x the teacher), seed 1 alone
    51.10 at 16M against 51.08 at 1M)"""
    late_gamma: tuple[float, ...] = (0.95, 0.98)
    """from the steps in --late-gamma-from on, discount with these instead of --gamma, one per step (none:
    --gamma throughout): a short horizon learns fastest and then stops buying tracking, a longer one buys
    more for a while (0.98 gains little past 8M, and 0.99 from 8M did not start a new gain). The switches
    depend on the step, not the budget, so a longer run still continues a shorter one, and a 1M run's last
    rollout starts before the first (measured, 200 held-out synthetic segments, seeds 1-3: at 4M, 0.95 from
    1M 50.11, median 40.63, real 38.11, against 0.9 throughout 51.70 (seeds 1 and 2) and 0.95 throughout
    50.87; at 8M, 0.98 from 4M 49.57, median 40.15, real 37.23, against 0.95 on 50.30, median 40.62, real
    38.43, each seed lower and 66% of segments better; at 16M 50.04, median 39.88, real 37.59, 55-60% of
    segments better than at 8M, the mean above 8M's by one standing-car segment of one seed)"""
    late_gamma_from: tuple[int, ...] = (1_000_000, 4_000_000)
    """the steps, in increasing order, from which each --late-gamma discounts (the first rollout that starts
    at or after it)"""
    gae_lambda: float = 1.0
    """GAE lambda. 1: the advantage is the discounted return (minus V(s_t) with --value-baseline), so the
    critic, which explains little here, biases it only through the bootstrap at the rollout's end (measured
    with --value-baseline, 1M steps, 200 held-out synthetic segments, 3 seeds: 1.0 51.44, median 41.64,
    against 0.95 51.80, median 42.05)"""
    num_minibatches: int = 4
    """minibatches per update epoch (under torchrun each process splits its share the same way, and a global
    minibatch is the union of theirs)"""
    update_epochs: int = 4
    """epochs over each batch (measured: 4 learns as well as 10 here, at 6,000 instead of 5,000 SPS)"""
    norm_adv: bool = True
    """normalize advantages per minibatch"""
    segment_baseline: bool = True
    """centre the advantages over the K rollouts of each segment at each step (needs --samples-per-segment 2
    or more): the segment's difficulty cancels out"""
    pair_baseline: bool = True
    """centre each advantage on its antithetic pair's mean instead of the mean over the segment's K rollouts
    (the pair's mean is even in the exploration noise, so it carries no gradient signal; but a term common to
    both members meets their opposite scores and mostly cancels anyway). Measured, 1M steps, 200 held-out
    synthetic segments, seed 1: 51.01 against 51.01, ahead early (52.71, 51.42 at 250k, 500k against 52.88,
    51.52); with K=2 (32 segments per rollout) 51.43; on by default as part of the combination measured under
    --lr-schedule)"""
    value_baseline: bool = False
    """subtract the critic's V(s_t) from the return to make the advantage. Off, the advantage is the return
    itself and the mean over the segment's K rollouts (--segment-baseline) is the only baseline: the critic,
    whose explained variance has a median of -1 to -6 over a run, only bootstraps the rollout's end and adds
    no noise of its own (measured, 1M steps, 200 held-out synthetic segments, 3 seeds: off 51.22, median
    41.47, against on 51.44, median 41.64)"""
    segment_norm: bool = True
    """divide each segment's advantages by their own standard deviation in the rollout, so every segment
    weighs alike whatever its difficulty (measured with --noise-correlation 0.9, seed 1: 53.47 against 53.82
    without; with white noise it ties, 54.30 against 54.32; on the present defaults, seed 1, 50.82 against
    51.11 at 1M and 51.62 against 52.00 at 4M: the late turn is not the hardest segments' low weight)"""
    segment_norm_power: float = 1.0
    """--segment-norm divides by the standard deviation to this power: 1 weighs every segment alike, 0.5
    leaves a segment with 4x the spread 2x the weight (measured, 2M steps, seed 1: 0.5 drifts up late as 1
    does, 54.29 against 54.12 at the end)"""
    segment_norm_floor: float = 0.0
    """--segment-norm divides by at least this quantile of the segments' standard deviations in the batch (0.5:
    the median; 0: no floor), so a segment whose K rollouts barely differ, where the differences are mostly
    simulator noise, keeps less than full weight; under torchrun each process takes its own quantile
    (measured, 2M steps, 200 held-out synthetic segments, seed 1: 0.5 51.33 against 51.53 without, a tie)"""
    norm_reward: bool = False
    """divide rewards by a running standard deviation of the discounted return"""
    innovation_cv: bool = False
    """subtract from every return a control variate on the simulator's sampling: the discounted sum of each
    later step's innovation features (the sampled lateral acceleration minus its expectation, times what was
    known before the draw; see tinyphysics_env.TinyPhysicsSim.innovation_features), which have expectation
    zero, weighted by least squares against the segments' centred returns in earlier batches only, so the
    gradient stays unbiased. Needs --segment-baseline and --sim-dynamics sampled (measured, 200 held-out
    synthetic segments, seeds 1 and 2: it takes 20-34% of that variance away and learns no better, 51.14 at 1M
    against 50.76, and 50.48 at 8M from the defaults' 4M checkpoints against 50.29; level on typical segments)"""
    clip_coef: float = 0.05
    """the surrogate clipping coefficient (and the value clip's, in the returns' units; measured with the joint
    --noise-logprob, 1M steps, seed 1: 0.05 52.29, 0.05 without value clipping 52.38, 0.2 unstable)"""
    clip_vloss: bool = True
    """clip the value loss as in the PPO paper's implementation"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    smooth_coef: float = 0.0
    """weight of a penalty on the deterministic policy's squared steer change between consecutive steps (in
    steer units), a low-noise gradient against the jerk that noisy updates add to the policy's mean (measured,
    200 held-out synthetic segments, seed 1: 100 51.69 at 500k against 51.52, 1000 57.48 at 250k: it slows
    the learning more than it smooths)"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient norm clip"""
    adam_beta1: float = 0.9
    """Adam's first-moment decay. Where a coordinate's gradient is mostly noise, Adam's step there is a fixed
    fraction of the learning rate whatever the noise's size (about sqrt((1 - b1) / (1 + b1)): 0.23 at 0.9,
    0.07 at 0.99), so the weights random-walk at a pace a larger batch does not slow; a longer average
    shrinks the noise's steps and keeps the signal's (measured, 200 held-out synthetic segments, seed 1: 0.99
    at 1M 52.40, 51.20 at 250k, 500k against 52.88, 51.52, ending level at 51.03, median 40.72 against 41.47;
    at 4M best 50.93 at 750k, then it turns as 0.9 does, 51.45 at the end against 51.66)"""
    anchor_decay: float = 0.0
    """after every optimizer step, move the actor's weights back towards their step-0 values (the warm start:
    with --action-mode residual, the teacher) by the learning rate x this of the distance: weight decay around
    the start instead of around zero. A restoring force against the random walk that minibatch noise drives
    (see --adam-beta1), which otherwise keeps adding jerk past 1M steps; the gradient's signal outweighs it
    where the policy truly improves on the start. 0: off (measured, 200 held-out synthetic segments: 2 at 1M,
    seed 1, 51.11 against 51.01, 5 51.35; at 2M, seed 2, 50.89 against 51.23; at 4M, seed 1, best 51.03 at
    1.5M, 51.45 at the end against 51.66, the jerk still climbing: it slows the turn, it does not stop it)"""
    target_kl: float | None = None
    """stop the epochs of an update early when approx_kl exceeds this"""
    reward_scale: float = 0.1
    """rewards (minus the official per-step cost) are multiplied by this"""
    jerk_weight: float = 1.0
    """multiply the jerk term of the training reward by this (the official total weighs it 1 against 50 for the
    lateral acceleration): past 1M steps the evaluated jerk creeps up while the tracking stops improving, so a
    price above 1 tests whether training drifts towards more jerk than the official objective wants (measured,
    1M steps, 200 held-out synthetic segments, seeds 1 and 2: 1.2 51.12 and 51.03 against 51.01 and 51.06, its
    jerk lower and its tracking worse: the policy moves along the trade-off, not past it)"""
    expected_reward: bool = True
    """pay each step's expected cost over the simulator's sampling instead of the sampled one (same
    objective, less noise; measured on the defaults, 1M steps, seed 1: 51.03 against 51.01, ahead early, 52.57
    and 51.39 at 250k and 500k against 52.88 and 51.52; on by default as part of the combination measured
    under --lr-schedule)"""
    ema_decay: float = 0.97
    """Polyak averaging: the policy that is evaluated and saved (best, final and checkpoint models, so also the
    exported one) is an exponential moving average of the weights after each iteration's update, with this
    decay (about 1 / (1 - decay) iterations averaged), while the rollouts keep the live weights; a minibatch's
    gradient is mostly noise, and the average cancels part of the random walk it drives (--eval-live also
    scores the live weights). 0: off (measured, 1M steps, 200 held-out
    synthetic segments: 0.9, seed 1, 50.98 against the same run's live 51.02; with --lr-schedule constant,
    0.95, 3 seeds, 50.98, median 41.43, against the previous defaults' 51.09, median 41.26: the average trails the live
    weights while they improve and is level or a little ahead at the end; 0.97 is part of the default
    combination measured under --lr-schedule)"""

    # Control design
    action_mode: Literal["residual", "delta", "absolute"] = "residual"
    """residual: steer = the --teacher's steer (computed from the observation) + --residual-scale x the
    action, and the actor's output starts at exactly zero, so the step-0 policy is the teacher; delta: the
    action moves the previous steer by at most --max-delta; absolute: the action is the steer"""
    teacher: Literal["pid", "pid_ff"] = "pid_ff"
    """the controller the policy starts from: the residual's base, or what the warm start clones (pid: the
    official baseline; pid_ff: PID plus a feedforward of the plan and the roll, see
    tinyphysics_env.PIDFeedforwardController; on 200 held-out synthetic segments pid_ff scores 54.66, its
    delta-mode clone 56.97, PID 109.65)"""
    residual_scale: float = 0.25
    """residual mode: the largest correction the actor adds to the teacher's steer"""
    max_delta: float = 0.25
    """largest steer change per step in delta mode"""
    hidden: int = 64
    """width of the two hidden layers of the actor"""
    critic_hidden: int = 0
    """width of the critic's two hidden layers (0: --hidden)"""
    curvature_inputs: bool = True
    """give the actor and the critic (lataccel - roll) / max(v^2, 1) (a curvature, in 1 / (100 m), clipped at
    +-5) of the current and the target lateral acceleration and of the plan's rows, computed from the
    observation: lateral acceleration is speed squared times curvature, a product the small MLPs would
    otherwise have to build (the best pure-PPO entry of the challenge fed it; measured, 1M steps, 200 held-out
    synthetic segments, 3 seeds: 46.97, median 39.61, against 47.41, median 40.23 without; 4M: 46.74, median
    39.74, against 47.16, median 40.21; 16M, 2 seeds: 45.95 against 46.14, level segment by segment)"""
    policy_dist: Literal["gaussian", "tanh"] = "gaussian"
    """gaussian: a Gaussian action clipped to [-1, 1]; tanh: a Gaussian squashed by tanh, so the action is
    bounded without clipping and the deterministic policy is tanh(mean) (tanh(0) = 0 keeps the residual's step
    0 the teacher)"""
    init_logstd: float = -4.0
    """initial log standard deviation of the policy (in action units, where [-1, 1] spans the range; measured
    with the residual policy: -3 makes the noisy training episodes cost 72-106 against 54 without noise, the
    jerk the noise adds dominating the gradient, and PPO then gains nothing; -4 gains)"""
    learn_logstd: bool = True
    """train the policy's log standard deviation with the rest; off, it stays at --init-logstd, so exploration
    keeps its size however long the run (measured, 4M steps, 200 held-out synthetic segments, seed 1: held
    51.62, best 50.85 at 750k, against learned 51.66, best 51.12 at 1.25M, its std 28% smaller at the end;
    both turn up after 1.5M)"""
    final_logstd: float | None = None
    """anneal exploration: the policy's log standard deviation goes linearly from --init-logstd to this over
    the run instead of being learned (measured, 1M steps, 200 held-out synthetic segments, seed 1: -3.5 to
    -4.0 reaches 52.40, 51.29 at 250k, 500k against the defaults' 52.88, 51.52, then ends at 51.32 against
    51.01: faster early, worse at the end, as a fixed -3.5 was)"""
    bc_segments: int = 256
    """warm start on this many training segments (0: none): the critic is fitted to the teacher's returns and,
    outside residual mode, the actor clones the teacher's steer"""
    bc_epochs: int = 30
    """warm start: epochs over the teacher's data"""

    # Evaluation and checkpoints
    eval_every: int = 100_000
    """score the deterministic policy on held-out segments every this many steps (and at the end)"""
    eval_live: bool = False
    """with --ema-decay, also score the live weights at each evaluation (eval/live_total_cost beside the
    average's eval/total_cost): a diagnostic that doubles the evaluation's cost"""
    checkpoint_every: int = 200_000
    """write a resumable checkpoint every this many steps"""


def validate(args: Args, world: int = 1) -> None:
    """Refuse bad arguments before any work, with a one-line reason each (world: processes under torchrun)."""
    late_gammas, late_froms = " ".join(map(str, args.late_gamma)), " ".join(map(str, args.late_gamma_from))
    checks = [
        (args.extend_to is None or args.resume, "--extend-to continues a run: add --resume "
                                                 "runs/<run>/checkpoints/checkpoint_<step>.pt"),
        (args.num_envs >= 1, f"--num-envs {args.num_envs}: need at least 1"),
        (args.num_envs % world == 0, f"--num-envs {args.num_envs} does not split over {world} processes; use a "
                                     "multiple of --nproc-per-node (times --nnodes)"),
        (args.num_steps >= 1, f"--num-steps {args.num_steps}: need at least 1"),
        (args.num_minibatches >= 1, f"--num-minibatches {args.num_minibatches}: need at least 1"),
        (args.update_epochs >= 1, f"--update-epochs {args.update_epochs}: need at least 1"),
        ((args.num_envs // world * args.num_steps) % args.num_minibatches == 0,
         f"--num-minibatches {args.num_minibatches} does not divide the batch of "
         f"{args.num_envs // world * args.num_steps} (num_envs * num_steps per process); pick a divisor"),
        (args.total_timesteps >= args.num_envs * args.num_steps,
         f"--total-timesteps {args.total_timesteps} is less than one batch ({args.num_envs * args.num_steps})"),
        (args.eval_segments >= 1, f"--eval-segments {args.eval_segments}: need at least 1"),
        (args.eval_every >= 1 and args.checkpoint_every >= 1, "--eval-every and --checkpoint-every must be positive"),
        (args.max_delta > 0, f"--max-delta {args.max_delta}: must be positive"),
        (args.residual_scale > 0, f"--residual-scale {args.residual_scale}: must be positive"),
        (args.jerk_weight >= 0, f"--jerk-weight {args.jerk_weight}: cannot be negative"),
        (0.0 <= args.ema_decay < 1.0, f"--ema-decay {args.ema_decay}: must be in [0, 1) (0: off)"),
        (0.0 <= args.adam_beta1 < 1.0, f"--adam-beta1 {args.adam_beta1}: must be in [0, 1)"),
        (0.0 <= args.anchor_decay * args.learning_rate <= 1.0,
         f"--anchor-decay {args.anchor_decay} x --learning-rate {args.learning_rate} must be in [0, 1] (above 1 "
         "a step would pull the weights past their start)"),
        (args.hidden >= 1 and args.critic_hidden >= 0, f"--hidden {args.hidden}, --critic-hidden "
                                                       f"{args.critic_hidden}: need at least 1 (critic: 0 or more)"),
        (args.samples_per_segment >= 1 and (args.num_envs // world) % args.samples_per_segment == 0,
         f"--samples-per-segment {args.samples_per_segment} must divide the {args.num_envs // world} environments "
         "of each process"),
        (args.samples_per_segment > 1 or not (args.segment_baseline or args.common_noise),
         f"--samples-per-segment {args.samples_per_segment} leaves no rollouts to compare: add "
         f"--no-segment-baseline --value-baseline --no-common-noise"
         f"{' --no-antithetic-noise' if args.antithetic_noise else ''}, or use K >= 2"),
        (args.samples_per_segment % 2 == 0 or not args.antithetic_noise,
         f"--antithetic-noise pairs the K rollouts of a segment: --samples-per-segment {args.samples_per_segment} "
         "must be even (or add --no-antithetic-noise)"),
        (not args.innovation_cv or args.segment_baseline,
         "--innovation-cv fits its weights on each segment's centred returns: it needs --segment-baseline"),
        (args.segment_baseline or args.value_baseline,
         "--no-segment-baseline with --no-value-baseline leaves the advantage without a baseline; add "
         "--value-baseline"),
        (not args.pair_baseline or (args.antithetic_noise and args.segment_baseline),
         "--pair-baseline centres each rollout on its antithetic pair: it needs --antithetic-noise and "
         "--segment-baseline"),
        (args.smooth_coef >= 0, f"--smooth-coef {args.smooth_coef}: cannot be negative"),
        (0 <= args.noise_correlation < 1, f"--noise-correlation {args.noise_correlation}: must be in [0, 1)"),
        (args.fast_noise_correlation is None or 0 <= args.fast_noise_correlation < 1,
         f"--fast-noise-correlation {args.fast_noise_correlation}: must be in [0, 1)"),
        (args.fast_noise_correlation is None or (args.antithetic_noise and args.samples_per_segment >= 4),
         "--fast-noise-correlation gives each segment's second antithetic pair the faster noise; it needs "
         "--antithetic-noise and --samples-per-segment 4 or more"),
        (0 < args.segment_norm_power <= 1, f"--segment-norm-power {args.segment_norm_power}: must be in (0, 1] "
                                           "(turn the normalisation off with --no-segment-norm)"),
        (0 <= args.segment_norm_floor < 1, f"--segment-norm-floor {args.segment_norm_floor}: must be in [0, 1) "
                                           "(0 sets no floor)"),
        (args.lr_decay_steps >= 1, f"--lr-decay-steps {args.lr_decay_steps}: need at least 1"),
        (0 <= args.final_lr_fraction <= 1, f"--final-lr-fraction {args.final_lr_fraction}: must be in [0, 1]"),
        (0 < args.gamma <= 1 and 0 <= args.gae_lambda <= 1, "--gamma must be in (0, 1] and --gae-lambda in [0, 1]"),
        (all(0 < g <= 1 for g in args.late_gamma), f"--late-gamma {late_gammas}: each must be in (0, 1]"),
        (len(args.late_gamma) == len(args.late_gamma_from),
         f"--late-gamma {late_gammas} --late-gamma-from {late_froms}: give one step for each discount"),
        (list(args.late_gamma_from) == sorted(set(args.late_gamma_from)) and min(args.late_gamma_from, default=0) >= 0,
         f"--late-gamma-from {late_froms}: the steps must be increasing and not negative"),
        (args.synthetic_train >= 0 and args.bc_segments >= 0, "--synthetic-train and --bc-segments cannot be negative"),
    ]
    for ok, message in checks:
        if not ok:
            raise te.TinyPhysicsError(message)


# --- Environments ------------------------------------------------------------------------------
def pick_device(cuda: bool) -> torch.device:
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


# --- Data parallelism (torchrun) ------------------------------------------------------------------
def init_distributed(cuda: bool) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; (0, 1, pick_device) without torchrun.

    Each process owns one device (cuda:LOCAL_RANK with NCCL on GPUs, the CPU with gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(cuda)
    device = pick_device(cuda)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


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


def load_splits(args: Args) -> tuple[te.Segments, te.Segments]:
    """(training, held-out evaluation) segments as the arguments ask."""
    def load(path):
        return te.load_segments(path, progress=args.progress)

    if args.synthetic_train:
        train = load(te.cached_synthetic(args.synthetic_train, args.seed))
        held_out = load(te.resolve_data_path(args.eval_data_path or args.data_path))
        if not args.eval_data_path:
            held_out = held_out.first(te.NUM_EVAL_SEGMENTS)
    elif args.eval_data_path:
        train = load(te.resolve_data_path(args.data_path))
        held_out = load(te.resolve_data_path(args.eval_data_path))
    else:
        everything = load(te.resolve_data_path(args.data_path))
        train_idx, eval_idx = te.split_segments(len(everything))
        train, held_out = everything.subset(train_idx), everything.subset(eval_idx)
    return train, held_out.first(args.eval_segments)


# --- Agent -------------------------------------------------------------------------------------
def observation_normalizer() -> tuple[np.ndarray, np.ndarray]:
    """Fixed (offset, scale) per observation entry, from the dataset's typical ranges: speeds are
    centred on 20 m/s over 10 m/s, steer is doubled, the error integral (tens over an episode) is divided
    by 10, accelerations are left as they are."""
    offset, scale = np.zeros(te.OBS_DIM, np.float32), np.ones(te.OBS_DIM, np.float32)
    for name, part in te.obs_slices().items():
        if "v_ego" in name:
            offset[part], scale[part] = 20.0, 0.1
        elif name == "past_actions":
            scale[part] = 2.0
        elif name == "error_integral":
            scale[part] = 0.1
    return offset, scale


PREV_STEER_INDEX = te.obs_slices()["past_actions"].stop - 1


def teacher_params(teacher: str) -> dict[str, float]:
    """A built-in controller's gains, and where the observation holds what it reads, for `teacher_steer`
    (pid is pid_ff without feedforward)."""
    controller = te.BUILTIN_CONTROLLERS[teacher]()
    where = te.obs_slices()
    params = {"teacher_p": controller.p, "teacher_i": controller.i, "teacher_d": controller.d,
              "teacher_kf": getattr(controller, "kf", 0.0), "teacher_kr": getattr(controller, "kr", 0.0),
              "teacher_lookahead": getattr(controller, "lookahead", 1)}
    for name in ("target_lataccel", "current_lataccel", "roll_lataccel", "future_lataccel", "error_integral",
                 "prev_error"):
        params[f"obs_{name}"] = where[name].start
    return params


def teacher_steer(params: dict, obs):
    """The teacher's steer from the observation alone, for a batch [B, D] (numpy or torch).

    On float64 numpy observations this is PIDFeedforwardController's arithmetic in its order, so it
    equals the official-interface controller bit for bit; the exported controller carries it."""
    def column(name):
        return obs[:, int(params[f"obs_{name}"])]

    error = column("target_lataccel") - column("current_lataccel")
    future = int(params["obs_future_lataccel"])
    planned = obs[:, future:future + int(params["teacher_lookahead"])].mean(axis=-1)
    feedback = (float(params["teacher_p"]) * error + float(params["teacher_i"]) * column("error_integral")
                + float(params["teacher_d"]) * (error - column("prev_error")))
    return feedback + float(params["teacher_kf"]) * planned - float(params["teacher_kr"]) * column("roll_lataccel")


CURVATURE_SCALE = 100.0  # in 1 / (100 m): a 100 m radius reads 1
CURVATURE_CLIP = 5.0  # near standstill max(v^2, 1) is small and the quotient meaningless: keep it bounded


def curvature_params() -> dict[str, float]:
    """Where the observation holds what `curvature_inputs` reads."""
    where = te.obs_slices()
    names = ("target_lataccel", "current_lataccel", "roll_lataccel", "v_ego", "future_lataccel",
             "future_roll_lataccel", "future_v_ego")
    return {f"obs_{name}": where[name].start for name in names} | {
        "plan_rows": te.FUTURE_LEN, "curvature_scale": CURVATURE_SCALE, "curvature_clip": CURVATURE_CLIP}


def curvature_inputs(params: dict, obs) -> list:
    """[the current lateral acceleration's [B, 1] and the target's [B, 1] curvature under the present roll and
    speed, each planned row's under its own [B, plan_rows]] for a batch of observations [B, D] (numpy or torch;
    the caller joins them, with its own library)."""
    def rows(name, n=1):
        start = int(params[f"obs_{name}"])
        return obs[:, start:start + n]

    def curvature(lataccel, roll, v):
        bound = float(params["curvature_clip"])
        return ((lataccel - roll) / (v * v).clip(1.0, None) * float(params["curvature_scale"])).clip(-bound, bound)

    n = int(params["plan_rows"])
    roll, v = rows("roll_lataccel"), rows("v_ego")
    return [curvature(rows("current_lataccel"), roll, v), curvature(rows("target_lataccel"), roll, v),
            curvature(rows("future_lataccel", n), rows("future_roll_lataccel", n), rows("future_v_ego", n))]


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Separate actor and critic MLPs (tanh) on the normalized observation (and the curvature inputs, if
    asked); a Gaussian policy, clipped or tanh-squashed to [-1, 1], whose action is mapped to steer by
    `to_steer`. `config()` rebuilds it without this script's defaults, so a checkpoint describes its own
    policy and observation pipeline. In residual mode the actor's last layer starts at zero, so the
    deterministic policy starts as the teacher itself."""

    def __init__(self, obs_dim: int, hidden: int, action_mode: str, max_delta: float, init_logstd: float = 0.0,
                 obs_offset=None, obs_scale=None, critic_hidden: int = 0, teacher: str = "pid_ff",
                 residual_scale: float = 0.25, policy_dist: str = "gaussian", curvature_inputs: bool = False):
        super().__init__()
        offset, scale = observation_normalizer() if obs_offset is None else (obs_offset, obs_scale)
        self.register_buffer("obs_offset", torch.as_tensor(np.asarray(offset), dtype=torch.float32))
        self.register_buffer("obs_scale", torch.as_tensor(np.asarray(scale), dtype=torch.float32))
        self.action_mode, self.max_delta, self.hidden = action_mode, max_delta, hidden
        self.critic_hidden, self.teacher, self.residual_scale = critic_hidden or hidden, teacher, residual_scale
        self.teacher_params = teacher_params(teacher)
        self.policy_dist = policy_dist
        self.curvature_params = curvature_params() if curvature_inputs else None
        in_dim = obs_dim + (2 + self.curvature_params["plan_rows"] if curvature_inputs else 0)

        def mlp(width: int, out_std: float) -> nn.Sequential:
            return nn.Sequential(layer_init(nn.Linear(in_dim, width)), nn.Tanh(),
                                 layer_init(nn.Linear(width, width)), nn.Tanh(),
                                 layer_init(nn.Linear(width, 1), std=out_std))

        self.critic = mlp(self.critic_hidden, 1.0)
        self.actor_mean = mlp(hidden, 0.0 if action_mode == "residual" else 0.01)
        self.actor_logstd = nn.Parameter(torch.full((1, 1), float(init_logstd)))

    def config(self) -> dict:
        return {"obs_dim": int(self.obs_offset.numel()), "hidden": self.hidden, "action_mode": self.action_mode,
                "max_delta": self.max_delta, "obs_offset": self.obs_offset.tolist(),
                "obs_scale": self.obs_scale.tolist(), "critic_hidden": self.critic_hidden, "teacher": self.teacher,
                "residual_scale": self.residual_scale, "policy_dist": self.policy_dist,
                "curvature_inputs": self.curvature_params is not None}

    def inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """What the MLPs read: the normalized observation, then the curvature inputs if the policy has them."""
        x = (obs - self.obs_offset) * self.obs_scale
        if self.curvature_params is None:
            return x
        return torch.cat([x, *curvature_inputs(self.curvature_params, obs)], dim=1)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.inputs(obs))

    def get_action_and_value(self, obs: torch.Tensor, action: torch.Tensor | None = None,
                             noise_offset: torch.Tensor | None = None):
        """noise_offset shifts the sampling distribution's mean (correlated exploration noise: the part
        carried over from the previous step), so the log-probability is conditioned on it."""
        x = self.inputs(obs)
        mean = self.actor_mean(x)
        if noise_offset is not None:
            mean = mean + noise_offset
        probs = Normal(mean, self.actor_logstd.expand_as(mean).exp())
        if action is None:
            action = probs.sample()
        logprob = probs.log_prob(action).sum(1)
        if self.policy_dist == "tanh":
            # The stored action is the pre-squash sample; log|d tanh(u)/du| = 2 (log 2 - u - softplus(-2u)).
            # It cancels in the PPO ratio; the entropy stays the pre-squash Gaussian's (no closed form after).
            logprob = logprob - (2.0 * (np.log(2.0) - action - nn.functional.softplus(-2.0 * action))).sum(1)
        return action, logprob, probs.entropy().sum(1), self.critic(x)

    def to_steer(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Steer command for an action: the teacher's steer plus a bounded correction, the previous steer
        moved by at most max_delta, or the action scaled to the steer range."""
        a = action[:, 0].tanh() if self.policy_dist == "tanh" else action[:, 0].clamp(-1.0, 1.0)
        if self.action_mode == "residual":
            return teacher_steer(self.teacher_params, obs) + self.residual_scale * a
        if self.action_mode == "delta":
            return obs[:, PREV_STEER_INDEX] + self.max_delta * a
        return te.STEER_RANGE[1] * a

    def to_action(self, obs: torch.Tensor, steer: torch.Tensor) -> torch.Tensor:
        """The action (before clipping) that `to_steer` maps to this steer, for behaviour cloning."""
        if self.action_mode == "residual":
            a = (steer - teacher_steer(self.teacher_params, obs)) / self.residual_scale
        elif self.action_mode == "delta":
            a = (steer - obs[:, PREV_STEER_INDEX]) / self.max_delta
        else:
            a = steer / te.STEER_RANGE[1]
        if self.policy_dist == "tanh":
            return torch.atanh(a.clamp(-1.0 + 1e-6, 1.0 - 1e-6))[:, None]
        return a.clamp(-1.0, 1.0)[:, None]

    def numpy_params(self) -> dict[str, np.ndarray]:
        """The deterministic policy as float64 arrays for `numpy_policy` (and the exported controller)."""
        layers = [m for m in self.actor_mean if isinstance(m, nn.Linear)]
        params = {f"{kind}{i}": getattr(layer, kind).detach().cpu().double().numpy()
                  for i, layer in enumerate(layers) for kind in ("weight", "bias")}
        params.update(obs_offset=self.obs_offset.cpu().double().numpy(),
                      obs_scale=self.obs_scale.cpu().double().numpy(),
                      action_mode=np.array(self.action_mode), max_delta=np.array(self.max_delta),
                      residual_scale=np.array(self.residual_scale), policy_dist=np.array(self.policy_dist),
                      steer_max=np.array(te.STEER_RANGE[1]), prev_steer_index=np.array(PREV_STEER_INDEX),
                      curvature_inputs=np.array(self.curvature_params is not None),
                      **{k: np.array(v) for k, v in (self.teacher_params | (self.curvature_params or {})).items()})
        return params


def numpy_policy(params: dict, obs: np.ndarray) -> np.ndarray:
    """Steer of the deterministic policy (mean action) for float64 observations [B, D], in float64 numpy.

    Official scoring of a policy uses this, and the exported controller carries this very function
    (and `teacher_steer` and `curvature_inputs`), so both give the same steer and the same costs. Mirrors
    Agent.inputs, Agent.actor_mean and Agent.to_steer."""
    obs = obs.astype(np.float64, copy=False)
    x = (obs - params["obs_offset"]) * params["obs_scale"]
    if bool(params["curvature_inputs"]):
        x = np.concatenate([x, *curvature_inputs(params, obs)], axis=1)
    x = np.tanh(x @ params["weight0"].T + params["bias0"])
    x = np.tanh(x @ params["weight1"].T + params["bias1"])
    a = (x @ params["weight2"].T + params["bias2"])[:, 0]
    a = np.tanh(a) if str(params["policy_dist"]) == "tanh" else np.clip(a, -1.0, 1.0)
    mode = str(params["action_mode"])
    if mode == "residual":
        return teacher_steer(params, obs) + float(params["residual_scale"]) * a
    if mode == "delta":
        return obs[:, int(params["prev_steer_index"])] + float(params["max_delta"]) * a
    return float(params["steer_max"]) * a


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
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise te.TinyPhysicsError(f"{path}: checkpoint version {checkpoint.get('version')} is not "
                                  f"{CHECKPOINT_VERSION}; use the matching version of ppo_lateral.py")
    agent = Agent(**checkpoint["agent_config"]).to(device)
    agent.load_state_dict(checkpoint["agent"])
    return agent, checkpoint


def save_checkpoint(obj: dict, path: Path) -> None:
    # Serialised in memory first: torch.save turns a full disk's OSError into an opaque RuntimeError.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    te.write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def policy_checkpoint(agent: Agent, **extra) -> dict:
    return {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "agent_config": agent.config(),
            "agent": agent.state_dict(), **extra}


# --- Warm start: behaviour cloning of a controller --------------------------------------------
def teacher_demonstrations(sim: te.TinyPhysicsSim, segments: te.Segments, teacher: str, gamma: float,
                           reward_scale: float):
    """Observations, steer and discounted returns of a built-in controller driving these segments, one
    instance for the whole batch (arrays in, arrays out). It is called from step 20, as the official
    program does, so a PID's integral is the official one."""
    sim.reset(segments)
    controller = te.BUILTIN_CONTROLLERS[teacher]()
    d = sim.data

    def act(t: int) -> np.ndarray:
        plan = slice(t + 1, t + te.FUTURE_PLAN_STEPS)
        return np.clip(controller.update(sim.target[:, t], sim.current[:, t - 1],
                                         te.State(d["roll_lataccel"][:, t], d["v_ego"][:, t], d["a_ego"][:, t]),
                                         te.FuturePlan(*(d[f][:, plan] for f in ("target_lataccel", "roll_lataccel",
                                                                                  "v_ego", "a_ego")))),
                       *te.STEER_RANGE)

    for t in range(te.CONTEXT_LENGTH, te.CONTROL_START_IDX):
        act(t)
        sim.step(None)
    observations, steers, rewards = [], [], []
    while sim.t < te.COST_END_IDX:
        t = sim.t
        observations.append(te.observe(sim))
        steers.append(act(t))
        sim.step(steers[-1])
        rewards.append(sim.step_reward(t) * reward_scale)
    returns, running = np.zeros_like(np.array(rewards)), 0.0
    for k in reversed(range(len(rewards))):
        running = rewards[k] + gamma * running
        returns[k] = running
    flat = lambda x: np.asarray(x).reshape(-1, *np.asarray(x).shape[2:])  # noqa: E731
    return flat(observations), flat(steers), flat(returns)


def behaviour_clone(agent: Agent, sim: te.TinyPhysicsSim, segments: te.Segments, args: Args,
                    device: torch.device) -> dict:
    """Fit the critic to the teacher's returns and, unless the policy is already the teacher (residual
    mode, whose actor must stay exactly zero), the actor's mean to the teacher's actions."""
    obs, steer, returns = teacher_demonstrations(sim, segments, args.teacher, args.gamma, args.reward_scale)
    obs, steer, returns = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (obs, steer, returns))
    target = agent.to_action(obs, steer)
    clone_actor = agent.action_mode != "residual"
    optimizer = torch.optim.Adam(agent.parameters() if clone_actor else agent.critic.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.bc_epochs):
        for idx in torch.randperm(len(obs), generator=generator).split(512):
            x = agent.inputs(obs[idx])
            actor_loss = ((agent.actor_mean(x) - target[idx]) ** 2).mean()
            value_loss = ((agent.critic(x)[:, 0] - returns[idx]) ** 2).mean()
            optimizer.zero_grad()
            (actor_loss + value_loss if clone_actor else value_loss).backward()
            optimizer.step()
    return {"bc/actor_mse": actor_loss.item(), "bc/value_mse": value_loss.item()}


# --- Evaluation ------------------------------------------------------------------------------
def evaluate(agent: Agent, model: te.SimModel, segments: te.Segments, batch_size: int = 1024,
             progress: bool = False) -> dict[str, np.ndarray]:
    """Official-exact costs of the deterministic policy (mean action) on these segments."""
    sim = te.TinyPhysicsSim(model, official_rng=True)
    params = agent.numpy_params()
    return te.score_in_batches(segments, batch_size,
                               lambda s: te.rollout_policy(sim, s, lambda obs: numpy_policy(params, obs)), progress)


# --- GAE ------------------------------------------------------------------------------------
def compute_gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, next_value: torch.Tensor,
                next_done: torch.Tensor, gamma: float, gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over [num_steps, num_envs] rollouts.

    dones[t] marks that obs[t] starts a new episode (the step before it terminated), so no value is
    bootstrapped across it. Episodes end only by termination (the cost window's end), and a rollout
    cut mid-episode is bootstrapped from next_value."""
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


def segment_advantages(advantages: torch.Tensor, samples_per_segment: int, center: bool,
                       norm_power: float, norm_floor: float = 0.0, center_group: int = 0) -> torch.Tensor:
    """Advantages [num_steps, num_envs] with a per-segment baseline: environments k*K .. k*K+K-1 run
    the same segment in lockstep (see TinyPhysicsVectorEnv), so `center` subtracts, at every step, the
    mean over those K copies, and a `norm_power` p > 0 divides each group by its own standard deviation
    over the rollout to the power p (p = 1: each segment then weighs alike, whatever its difficulty; p
    between 0 and 1 keeps some of the hard segments' weight). A `norm_floor` q > 0 raises every standard
    deviation below the q-quantile of the groups' to that quantile before dividing. A `center_group` of 2
    centres on each antithetic pair (environments 2j, 2j+1) instead of on all K copies."""
    num_steps, num_envs = advantages.shape
    groups = advantages.reshape(num_steps, num_envs // samples_per_segment, samples_per_segment)
    if center:
        size = center_group or samples_per_segment
        sub = groups.reshape(num_steps, -1, size)
        groups = (sub - sub.mean(dim=2, keepdim=True)).reshape(groups.shape)
    if norm_power and num_steps * samples_per_segment > 1:
        spread = groups.std(dim=(0, 2), keepdim=True)
        if norm_floor:
            spread = spread.clamp(min=torch.quantile(spread, norm_floor))
        groups = groups / (spread**norm_power + 1e-8)
    return groups.reshape(num_steps, num_envs)


CV_MEMORY = 0.9  # earlier batches fade from --innovation-cv's fit by this per batch (0.8 to 0.97 measured alike)


def discounted_innovations(innovations: torch.Tensor, dones: torch.Tensor, gamma: float) -> torch.Tensor:
    """[num_steps, num_envs, F]: each step's discounted sum of the innovation features from that step to the end
    of its episode or of the rollout (past that, the return is the critic's bootstrap, fixed before those draws)."""
    num_steps, num_envs, width = innovations.shape
    flat = innovations.reshape(num_steps, num_envs * width)
    zeros = torch.zeros_like(flat[0])
    sums, _ = compute_gae(flat, torch.zeros_like(flat), dones.repeat_interleave(width, dim=1), zeros, zeros, gamma, 1.0)
    return sums.reshape(num_steps, num_envs, width)


class InnovationControlVariate:
    """--innovation-cv: weights for `discounted_innovations`, by least squares against each segment's centred
    returns (centred as the advantages are, each segment scaled by its spread as --segment-norm weighs it),
    from earlier batches only: a batch's control variate is fixed before its own returns are seen."""

    def __init__(self, num_features: int, samples_per_segment: int, center_group: int):
        self.xtx, self.xty = np.zeros((num_features, num_features)), np.zeros(num_features)
        self.samples_per_segment, self.center_group = samples_per_segment, center_group
        self.removed = np.nan  # the share of the last batch's scaled, centred return variance it took away

    def weights(self) -> np.ndarray:
        return np.linalg.lstsq(self.xtx, self.xty, rcond=None)[0]  # zeros until a batch has been seen

    def __call__(self, returns: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        """The returns less the control variate; then this batch joins the fit."""
        weights = self.weights()
        num_steps, num_envs, width = sums.shape
        k = self.samples_per_segment

        def centred(x: torch.Tensor) -> np.ndarray:
            x = segment_advantages(x, k, center=True, norm_power=0.0, center_group=self.center_group)
            return x.double().cpu().numpy()

        y = centred(returns)
        x = np.stack([centred(sums[..., f]) for f in range(width)], axis=-1)
        spread = y.reshape(num_steps, num_envs // k, k).std(axis=(0, 2))
        scale = np.repeat(1.0 / (spread + 1e-8), k)[None, :]
        y, x = (y * scale).reshape(-1), (x * scale[..., None]).reshape(-1, width)
        self.removed = 1.0 - float(np.var(y - x @ weights) / max(np.var(y), 1e-30))
        self.xtx = CV_MEMORY * self.xtx + x.T @ x
        self.xty = CV_MEMORY * self.xty + x.T @ y
        return returns - sums @ torch.as_tensor(weights, dtype=sums.dtype, device=sums.device)

    def state_dict(self) -> dict:
        return {"xtx": self.xtx.copy(), "xty": self.xty.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.xtx, self.xty = state["xtx"].copy(), state["xty"].copy()


class RewardNormalizer:
    """Divides rewards by a running standard deviation of the discounted return (as Gymnasium's
    NormalizeReward does), on the host; its state goes into checkpoints."""

    def __init__(self, num_envs: int, gamma: float):
        self.gamma, self.returns = gamma, np.zeros(num_envs)
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def __call__(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + reward
        batch_mean, batch_var, n = float(self.returns.mean()), float(self.returns.var()), len(self.returns)
        total = self.count + n
        delta = batch_mean - self.mean
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total
        self.returns = np.where(done, 0.0, self.returns)
        return reward / np.sqrt(self.var + 1e-8)

    def state_dict(self) -> dict:
        return {"returns": self.returns.copy(), "mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.returns, self.mean, self.var, self.count = (state[k] for k in ("returns", "mean", "var", "count"))


# --- The clipped PPO loss -----------------------------------------------------------------------
def joint_noise_offsets(agent: Agent, noise_offsets, prev_obs, prev_actions, carried,
                        noise_correlation: float | torch.Tensor):
    """The carried-over part of correlated noise under the current policy, rho * (a_{t-1} - mean(s_{t-1})),
    where a step carried noise from an earlier step of its rollout; elsewhere the stored offset. rho: a
    number, or one per step [B, 1]."""
    live = noise_correlation * (prev_actions - agent.actor_mean(agent.inputs(prev_obs)))
    return torch.where(carried, live, noise_offsets)


def steer_change_penalty(agent: Agent, obs, prev_obs, carried) -> torch.Tensor:
    """Mean squared change of the deterministic policy's steer from the previous step to this one, over the
    steps whose previous step is in the same rollout and episode (the teacher's part carries no gradient)."""
    steer = agent.to_steer(obs, agent.actor_mean(agent.inputs(obs)))
    prev_steer = agent.to_steer(prev_obs, agent.actor_mean(agent.inputs(prev_obs)))
    weight = carried[:, 0].float()
    return ((steer - prev_steer) ** 2 * weight).sum() / weight.sum().clamp(min=1.0)


def ppo_loss(agent: Agent, obs, actions, noise_offsets, logprobs, advantages, returns, values, clip_coef: float,
             norm_adv: bool, clip_vloss: bool, ent_coef: float, vf_coef: float, previous: tuple | None = None,
             noise_correlation: float | torch.Tensor = 0.0, joint: bool = True, smooth_coef: float = 0.0):
    """previous: (prev_obs, prev_actions, carried), for --noise-logprob joint and --smooth-coef."""
    if joint and previous is not None:
        noise_offsets = joint_noise_offsets(agent, noise_offsets, *previous, noise_correlation)
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(obs, actions, noise_offsets)
    logratio = newlogprob - logprobs
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()
    if norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)).mean()
    newvalue = newvalue.view(-1)
    if clip_vloss:
        v_clipped = values + torch.clamp(newvalue - values, -clip_coef, clip_coef)
        v_loss = 0.5 * torch.max((newvalue - returns) ** 2, (v_clipped - returns) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - returns) ** 2).mean()
    entropy_loss = entropy.mean()
    loss = pg_loss - ent_coef * entropy_loss + v_loss * vf_coef
    if smooth_coef:
        loss = loss + smooth_coef * steer_change_penalty(agent, obs, previous[0], previous[2])
    return loss, pg_loss, v_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac


# --- Training ----------------------------------------------------------------------------------
STAT_KEYS = ("global_step", "episodic_total_cost", "episodic_lataccel_cost", "episodic_jerk_cost",
             "policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "explained_variance",
             "learning_rate", "sps", "eval_total_cost")


def crossed(global_step: int, batch_size: int, every: int) -> bool:
    """Whether the last batch of steps passed a multiple of `every`."""
    return global_step // every > (global_step - batch_size) // every


class _StopRequest:
    """Ctrl-C or SIGTERM: finish the current iteration, write a checkpoint, exit."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nsignal {signum}: writing a checkpoint after this iteration", file=sys.stderr)


def check_same_training_segments(saved: list[str], found: list[str], args: Args) -> None:
    """A resumed run's environments index its training segments: refuse other data, naming what is missing."""
    if saved == found:
        return
    where = f"--synthetic-train {args.synthetic_train}" if args.synthetic_train else \
        f"--data-path {te.resolve_data_path(args.data_path)}"
    missing = sorted(set(saved) - set(found))
    what = (f"{len(missing)} of its {len(saved)} training segments are missing from {where} (first: {missing[0]})"
            if missing else f"{where} holds other training segments than it was trained on ({len(found)}, not "
            f"{len(saved)})")
    raise te.TinyPhysicsError(f"{args.resume}: {what}; a run resumes only on its own segments, so restore them or "
                              "start a new run")


def learning_rate_at(iteration: int, num_iterations: int, args: Args) -> float:
    """The learning rate of an iteration (1-based) under --lr-schedule."""
    progress = (iteration - 1.0) / num_iterations
    if args.lr_schedule == "linear":
        return (1.0 - progress) * args.learning_rate
    if args.lr_schedule == "cosine":
        floor = args.final_lr_fraction * args.learning_rate
        return floor + (args.learning_rate - floor) * 0.5 * (1.0 + np.cos(np.pi * progress))
    if args.lr_schedule == "inverse":
        return args.learning_rate / (1.0 + (iteration - 1) * args.num_envs * args.num_steps / args.lr_decay_steps)
    return args.learning_rate


def gamma_at(global_step: int, args: Args) -> float:
    """The discount of the rollout that starts at global_step (see --late-gamma)."""
    gamma = args.gamma
    for late, start in zip(args.late_gamma, args.late_gamma_from):
        if global_step >= start:
            gamma = late
    return gamma


def logstd_at(iteration: int, num_iterations: int, args: Args) -> float:
    """The exploration log-std of an iteration (1-based) under --final-logstd: linear from --init-logstd."""
    progress = (iteration - 1.0) / num_iterations
    return args.init_logstd + (args.final_logstd - args.init_logstd) * progress


def new_rollout_buffers(num_steps: int, num_envs: int, device: torch.device,
                        innovations: bool = False) -> dict[str, torch.Tensor]:
    shapes = {"obs": (te.OBS_DIM,), "actions": (1,), "noise_offsets": (1,), "logprobs": (), "rewards": (),
              "dones": (), "values": ()}
    if innovations:
        shapes["innovations"] = (te.NUM_INNOVATION_FEATURES,)
    return {k: torch.zeros((num_steps, num_envs, *shape), device=device) for k, shape in shapes.items()}


def noise_correlations(args: Args, num_envs: int, device: torch.device) -> torch.Tensor:
    """Each environment's rho, [num_envs, 1]: --noise-correlation, or --fast-noise-correlation for the odd
    antithetic pairs of each segment's samples_per_segment rollouts."""
    rho = torch.full((num_envs, 1), args.noise_correlation, device=device)
    if args.fast_noise_correlation is not None:
        pair_in_segment = (torch.arange(num_envs, device=device) // 2) % (args.samples_per_segment // 2)
        rho[pair_in_segment % 2 == 1] = args.fast_noise_correlation
    return rho


def batch_noise_correlations(args: Args, buf: dict) -> torch.Tensor:
    """rho of every step of a rollout, flattened as the batch is, [num_steps * num_envs, 1]."""
    num_steps, num_envs = buf["rewards"].shape
    rho = noise_correlations(args, num_envs, buf["rewards"].device)
    return rho.expand(num_steps, num_envs, 1).reshape(-1, 1)


def exploration_actions(agent: Agent, obs: torch.Tensor, previous_noise: torch.Tensor, rho: float | torch.Tensor,
                        antithetic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy samples under --antithetic-noise (environments 2j and 2j+1 get opposite fresh noise around
    their own means) and correlated noise (each environment's noise carries rho times its previous step's;
    rho: a number, or one per environment [num_envs, 1]); returns the actions, the carried-over noise
    offsets their log-probability is conditioned on, and this step's noise."""
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
            next_done: torch.Tensor, noise: torch.Tensor, args: Args, reward_norm: RewardNormalizer | None,
            autocast) -> tuple:
    """Step every environment num_steps times with the stochastic policy, filling buf; returns the next
    observation, done flags and exploration noise, and the costs of the episodes that ended."""
    device, episode_costs = next_obs.device, []
    rho = noise_correlations(args, len(next_obs), device)
    for step in range(args.num_steps):
        buf["obs"][step], buf["dones"][step] = next_obs, next_done
        with torch.no_grad(), autocast:
            if args.antithetic_noise or args.noise_correlation:
                noise = noise * (1.0 - next_done)[:, None]  # a new episode starts its noise afresh
                action, offsets, noise = exploration_actions(agent, next_obs, noise, rho, args.antithetic_noise)
                action, logprob, _, value = policy_step(next_obs, action, offsets)
                buf["noise_offsets"][step] = offsets.float()
            else:
                action, logprob, _, value = policy_step(next_obs)
        buf["values"][step] = value.flatten().float()
        buf["actions"][step], buf["logprobs"][step] = action.float(), logprob.float()
        steer = agent.to_steer(next_obs, action.float())
        next_obs_np, reward, terminations, truncations, infos = envs.step(steer.double().cpu().numpy())
        done = terminations | truncations
        if reward_norm is not None:
            reward = reward_norm(reward, done)
        buf["rewards"][step] = torch.as_tensor(reward * args.reward_scale, dtype=torch.float32, device=device)
        if "innovations" in buf:
            buf["innovations"][step] = torch.as_tensor(envs.last_innovations, dtype=torch.float32, device=device)
        next_obs = torch.as_tensor(next_obs_np, device=device)
        next_done = torch.as_tensor(done, dtype=torch.float32, device=device)
        if "final_info" in infos:
            episode_costs.append({k: infos["final_info"][k] for k in ("total_cost", "lataccel_cost", "jerk_cost")})
    return next_obs, next_done, noise, episode_costs


def advantages_and_returns(agent: Agent, buf: dict, next_obs: torch.Tensor, next_done: torch.Tensor,
                           gamma: float, args: Args, innovation_cv: InnovationControlVariate | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE, less the --innovation-cv control variate where given (from the advantages and from the returns, the
    critic's target: it has expectation zero from any state), then the per-segment baseline the arguments ask
    for."""
    with torch.no_grad():
        next_value = agent.get_value(next_obs).reshape(1, -1)[0]
        advantages, returns = compute_gae(buf["rewards"], buf["values"], buf["dones"], next_value, next_done,
                                          gamma, args.gae_lambda)
    if innovation_cv is not None:
        corrected = innovation_cv(returns, discounted_innovations(buf["innovations"], buf["dones"], gamma))
        advantages, returns = advantages - (returns - corrected), corrected
    if not args.value_baseline:
        advantages = returns.clone()
    if args.segment_baseline or args.segment_norm:
        advantages = segment_advantages(advantages, args.samples_per_segment, args.segment_baseline,
                                        args.segment_norm_power if args.segment_norm else 0.0,
                                        args.segment_norm_floor, 2 if args.pair_baseline else 0)
    return advantages, returns


def previous_steps(buf: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each step's previous observation and action in the rollout, and whether its noise carried over from
    that step (not at a rollout's first step, nor where an episode started)."""
    prev_obs = torch.cat([buf["obs"][:1], buf["obs"][:-1]])
    prev_actions = torch.cat([buf["actions"][:1], buf["actions"][:-1]])
    carried = buf["dones"] == 0
    carried[0] = False
    return prev_obs, prev_actions, carried[..., None]


def pull_towards(module: nn.Module, anchor: dict[str, torch.Tensor], rate: float) -> None:
    """Move each parameter of module the fraction rate of the way to its anchor (decoupled weight decay, as
    AdamW's, around the anchor instead of zero)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.lerp_(anchor[name], rate)


def ppo_update(agent: Agent, optimizer: torch.optim.Optimizer, loss_fn: Callable, buf: dict,
               advantages: torch.Tensor, returns: torch.Tensor, args: Args, world: int, autocast,
               anchor: dict[str, torch.Tensor] | None = None) -> dict:
    """update_epochs epochs of the clipped objective over shuffled minibatches, each step followed by the
    --anchor-decay pull of the actor towards anchor; returns the last minibatch's losses and the mean clip
    fraction."""
    device = advantages.device
    b_obs, b_actions = buf["obs"].reshape(-1, te.OBS_DIM), buf["actions"].reshape(-1, 1)
    b_offsets = buf["noise_offsets"].reshape(-1, 1)
    b_logprobs, b_advantages = buf["logprobs"].reshape(-1), advantages.reshape(-1)
    b_returns, b_values = returns.reshape(-1), buf["values"].reshape(-1)
    b_rho = batch_noise_correlations(args, buf)
    joint = args.noise_logprob == "joint" and bool(b_rho.any())
    b_previous = [x.reshape(len(b_obs), -1) for x in previous_steps(buf)] if joint or args.smooth_coef else None
    batch = len(b_obs)
    minibatch_size = batch // args.num_minibatches
    b_inds = np.arange(batch)
    clipfracs = []
    for _epoch in range(args.update_epochs):
        np.random.shuffle(b_inds)
        for start in range(0, batch, minibatch_size):
            mb = torch.as_tensor(b_inds[start:start + minibatch_size], device=device)
            with autocast:
                loss, pg_loss, v_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac = loss_fn(
                    agent, b_obs[mb], b_actions[mb], b_offsets[mb], b_logprobs[mb], b_advantages[mb],
                    b_returns[mb], b_values[mb], args.clip_coef, args.norm_adv, args.clip_vloss, args.ent_coef,
                    args.vf_coef, [x[mb] for x in b_previous] if b_previous else None, b_rho[mb],
                    joint, args.smooth_coef)
            clipfracs.append(clipfrac.item())
            optimizer.zero_grad()
            loss.backward()
            if world > 1:
                average_gradients(agent, world)
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            if anchor is not None:
                pull_towards(agent.actor_mean, anchor, optimizer.param_groups[0]["lr"] * args.anchor_decay)
        if args.target_kl is not None and mean_over_processes([approx_kl.item()], world, device)[0] > args.target_kl:
            break
    y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
    var_y = np.var(y_true)
    return {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": entropy_loss.item(),
            "approx_kl": approx_kl.item(), "clipfrac": float(np.mean(clipfracs)),
            "explained_variance": float(np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y),
            "old_approx_kl": old_approx_kl.item()}


def episodic_means(episode_costs: list[dict]) -> dict[str, float]:
    out = {}
    for key in ("total_cost", "lataccel_cost", "jerk_cost"):
        done_costs = [c[key] for c in episode_costs]
        out[f"episodic_{key}"] = float(np.mean(np.concatenate(done_costs))) if done_costs else np.nan
    return out


def write_scalars(writer: SummaryWriter, row: dict, global_step: int) -> None:
    for key in ("total_cost", "lataccel_cost", "jerk_cost"):
        if np.isfinite(row[f"episodic_{key}"]):
            writer.add_scalar(f"charts/episodic_{key}", row[f"episodic_{key}"], global_step)
    writer.add_scalar("charts/learning_rate", row["learning_rate"], global_step)
    writer.add_scalar("charts/gamma", row["gamma"], global_step)
    writer.add_scalar("charts/SPS", row["sps"], global_step)
    for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "explained_variance",
                "old_approx_kl"):
        writer.add_scalar(f"losses/{key}", row[key], global_step)


def write_eval(writer: SummaryWriter, costs: dict, global_step: int) -> float:
    for key in ("total_cost", "lataccel_cost", "jerk_cost"):
        writer.add_scalar(f"eval/{key}", float(costs[key].mean()), global_step)
    return float(costs["total_cost"].mean())


# Flags added after checkpoints were first written, with the value that reproduces how a run without them trained.
FLAGS_BEFORE_THEY_EXISTED = {"noise_correlation": 0.0, "segment_norm_power": 1.0,
                             "noise_logprob": "conditioned", "segment_norm_floor": 0.0,
                             "value_baseline": True, "pair_baseline": False, "smooth_coef": 0.0,
                             "final_logstd": None, "ema_decay": 0.0,
                             "jerk_weight": 1.0, "adam_beta1": 0.9, "anchor_decay": 0.0,
                             "lr_decay_steps": 500_000, "late_gamma": (), "late_gamma_from": (),
                             "curvature_inputs": False}


def saved_args(checkpoint: dict, **overrides) -> Args:
    """The arguments a checkpoint's run trained with (a flag newer than the checkpoint takes the value that
    reproduces the run, not today's default), with overrides."""
    saved = {**FLAGS_BEFORE_THEY_EXISTED, **checkpoint["args"]}
    if not isinstance(saved["late_gamma"], (tuple, list)):  # saved when --late-gamma took one value or None
        one = saved["late_gamma"] is not None
        saved["late_gamma"] = (saved["late_gamma"],) if one else ()
        saved["late_gamma_from"] = (saved["late_gamma_from"],) if one else ()
    return Args(**{**saved, **overrides})


def extended_budget(checkpoint: dict, extend_to: int | None) -> dict:
    """The saved arguments that --extend-to changes: none, or the budget where no schedule depends on it."""
    if extend_to is None:
        return {}
    saved, step = saved_args(checkpoint), checkpoint["global_step"]
    budgeted = ("--final-logstd" if saved.final_logstd is not None else
                f"--lr-schedule {saved.lr_schedule}" if saved.lr_schedule in ("linear", "cosine") else None)
    if budgeted:
        raise te.TinyPhysicsError(f"--extend-to: this run's {budgeted} schedule is laid out over its budget, so a "
                                  "longer run would have trained differently; start a new run with "
                                  "--total-timesteps instead")
    if extend_to < step + saved.num_envs * saved.num_steps:
        raise te.TinyPhysicsError(f"--extend-to {extend_to}: the checkpoint is at step {step}; extend to at least "
                                  "one more batch")
    return {"total_timesteps": extend_to}


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
    resumed = saved_args(checkpoint, resume=args.resume, progress=args.progress,
                         **extended_budget(checkpoint, args.extend_to))
    print(f"resuming {checkpoint['run_name']} at step {checkpoint['global_step']} with its saved arguments",
          file=sys.stderr)
    return resumed, checkpoint


def training_segments(args: Args, rank: int, world: int,
                      checkpoint: dict | None) -> tuple[te.Segments, te.Segments, te.Segments]:
    """Every training segment (the warm start's pool: rank 0 clones on them all, as one process would), this
    process's disjoint share of them, and the held-out segments."""
    if rank > 0:  # rank 0 writes the synthetic segments and the segment cache; the others then read them
        torch.distributed.barrier()
    pool, eval_segments = load_splits(args)
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    if checkpoint:
        check_same_training_segments(checkpoint["train_segments"], pool.names, args)
    share = pool.subset(np.arange(rank, len(pool), world)) if world > 1 else pool
    if args.num_envs // world // args.samples_per_segment > len(share):
        raise te.TinyPhysicsError(f"--num-envs {args.num_envs} / --samples-per-segment {args.samples_per_segment} "
                                  f"is more than the {len(share) * world} training segments; use fewer "
                                  "envs or more segments")
    return pool, share, eval_segments


def load_sim_models(args: Args, model_path: Path, device: torch.device) -> tuple[te.SimModel, te.SimModel]:
    """The simulator that trains, and the one that scores: the same, unless --sim-precision lowers the first
    (scores are official-exact in fp32 only)."""
    # The processes of one machine share its cores.
    threads = args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    model = te.load_sim_model(model_path, args.sim_backend, device.type, threads, args.sim_precision,
                              args.compile, args.cuda_graphs)
    eval_model = model if args.sim_precision == "fp32" else te.load_sim_model(
        model_path, args.sim_backend, device.type, threads, "fp32", args.compile)
    return model, eval_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_run(args: Args, checkpoint: dict | None, world: int, lead: bool) -> tuple[Path, str, SummaryWriter | None]:
    """The run's folder and name (a resumed run keeps its own) and, on rank 0, its TensorBoard writer."""
    if checkpoint:
        run_dir, run_name = Path(args.resume).parent.parent, checkpoint["run_name"]
    else:
        run_name = gather_objects(f"{args.exp_name}__{args.seed}__{int(time.time())}", world)[0]  # rank 0's clock
        run_dir = Path(args.runs_dir) / run_name
    writer = SummaryWriter(str(run_dir)) if lead else None
    if lead and not checkpoint:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in vars(args).items()))
    return run_dir, run_name, writer


def start_episodes(args: Args, rank: int, world: int, agent: Agent, envs: te.TinyPhysicsVectorEnv,
                   model: te.SimModel, bc_pool: te.Segments, writer: SummaryWriter | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A new run's first observations, dones and exploration noise, after rank 0's warm start (behaviour
    cloning, when --bc-segments asks for it), which every process then starts from."""
    if world > 1:  # each process its own random streams (segments, simulator noise, actions, minibatches)
        seed_everything(args.seed + rank)
    next_obs, _ = envs.reset(seed=args.seed + rank)
    if args.bc_segments and rank == 0:
        bc_sim = te.TinyPhysicsSim(model, official_rng=False, seed=args.seed)
        bc_idx = np.random.default_rng(args.seed).permutation(len(bc_pool))[:args.bc_segments]
        for k, v in behaviour_clone(agent, bc_sim, bc_pool.subset(bc_idx), args, device).items():
            writer.add_scalar(k, v, 0)
    if world > 1:
        for tensor in agent.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    return (torch.as_tensor(next_obs, device=device), torch.zeros(envs.num_envs, device=device),
            torch.zeros((envs.num_envs, 1), device=device))


def restore_episodes(checkpoint: dict, rank: int, world: int, agent: Agent, optimizer: torch.optim.Optimizer,
                     envs: te.TinyPhysicsVectorEnv, reward_norm: RewardNormalizer | None,
                     innovation_cv: InnovationControlVariate | None, seed: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Put a resumed run back where its checkpoint stopped (weights, optimizer, this process's environments,
    random streams and running statistics); returns the observations, dones and noise it stopped at."""
    agent.load_state_dict(checkpoint.get("live_agent") or checkpoint["agent"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    mine = checkpoint["ranks"][rank] if world > 1 else checkpoint
    torch.set_rng_state(mine["rng"]["torch"])
    np.random.set_state(mine["rng"]["numpy"])
    random.setstate(mine["rng"]["python"])
    envs.reset(seed=seed)
    next_obs = torch.as_tensor(envs.load_state_dict(mine["env"]), device=device)
    if reward_norm is not None:
        reward_norm.load_state_dict(mine["reward_norm"])
    if innovation_cv is not None and mine.get("innovation_cv"):  # none in a run that turns it on when resumed
        innovation_cv.load_state_dict(mine["innovation_cv"])
    return next_obs, mine["next_done"].to(device), mine.get("noise", torch.zeros((envs.num_envs, 1))).to(device)


def actor_anchor(args: Args, agent: Agent, checkpoint: dict | None, device: torch.device) -> dict | None:
    """The --anchor-decay pull's target: the actor as PPO first found it (kept in checkpoints for resuming)."""
    if not args.anchor_decay:
        return None
    if checkpoint:
        return {k: v.to(device) for k, v in checkpoint["anchor"].items()}
    return {k: v.detach().clone() for k, v in agent.actor_mean.named_parameters()}


def evaluate_and_keep(policy: Agent, eval_model: te.SimModel, eval_segments: te.Segments, writer: SummaryWriter,
                      global_step: int, best_eval: float, run_dir: Path, args: Args) -> float:
    """The policy's mean official cost on the held-out segments, logged; saved as best_model.pt when it beats
    best_eval."""
    cost = write_eval(writer, evaluate(policy, eval_model, eval_segments), global_step)
    if cost < best_eval:
        save_checkpoint(policy_checkpoint(policy, args=dataclasses.asdict(args), global_step=global_step,
                                          eval_total_cost=cost), run_dir / "best_model.pt")
    return cost


def record_stats(stats: dict[str, list], row: dict, run_dir: Path) -> None:
    for key in STAT_KEYS:
        stats[key].append(row[key])
    te.write_atomic(run_dir / "training_stats.npz", lambda f: np.savez(
        f, **{k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}))


def save_final_model(policy: Agent, args: Args, global_step: int, stats: dict[str, list], world: int,
                     run_dir: Path | None) -> None:
    """Every replica must hold the same weights (so the same average): the final model, written by rank 0 (the
    one given a run_dir), records the fingerprints of what each would save."""
    fingerprints = gather_objects(weights_fingerprint(policy), world)
    if len(set(fingerprints)) > 1:
        raise RuntimeError(f"the {world} replicas diverged: weight fingerprints {fingerprints}")
    if run_dir:
        save_checkpoint(policy_checkpoint(policy, args=dataclasses.asdict(args), global_step=global_step,
                                          eval_total_cost=stats["eval_total_cost"][-1],
                                          replica_fingerprints=fingerprints), run_dir / "final_model.pt")


def train(args: Args, on_iteration: Callable[[dict], None] | None = None) -> Path:
    """Train as the arguments say; returns the run folder. on_iteration(stats) is called after every
    iteration with that iteration's row of training_stats (for notebooks)."""
    checkpoint = None
    if args.resume:
        args, checkpoint = resume_from(args)

    # Environments and held-out segments: cheap checks first, so bad input fails before any work
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(args, world)
    if checkpoint and checkpoint.get("world_size", 1) != world:
        raise te.TinyPhysicsError(f"{args.resume}: written by {checkpoint.get('world_size', 1)} processes; resume "
                                  f"it with as many (torchrun --nproc-per-node), not {world}")
    model_path = te.resolve_model_path(args.sim_model_path)
    rank, world, device = init_distributed(args.cuda)
    lead = rank == 0  # only rank 0 logs, evaluates and writes files
    bc_pool, train_segments, eval_segments = training_segments(args, rank, world, checkpoint)
    model, eval_model = load_sim_models(args, model_path, device)
    envs = te.TinyPhysicsVectorEnv(args.num_envs // world, segments=train_segments, model=model,
                                   autoreset_mode="same_step", expected_reward=args.expected_reward,
                                   samples_per_segment=args.samples_per_segment, common_noise=args.common_noise,
                                   dynamics=args.sim_dynamics, jerk_weight=args.jerk_weight,
                                   innovations=args.innovation_cv)
    reward_norm = RewardNormalizer(envs.num_envs, args.gamma) if args.norm_reward else None
    innovation_cv = InnovationControlVariate(te.NUM_INNOVATION_FEATURES, args.samples_per_segment,
                                             2 if args.pair_baseline else 0) if args.innovation_cv else None

    seed_everything(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.amp and device.type != "cuda":
        print("note: --amp is ignored on CPU (autocast is used on CUDA only)", file=sys.stderr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")
    run_dir, run_name, writer = open_run(args, checkpoint, world, lead)

    # Agent and optimizer; a resumed run's state, or a new run's warm start and its score at step 0
    agent = Agent(te.OBS_DIM, args.hidden, args.action_mode, args.max_delta, args.init_logstd,
                  critic_hidden=args.critic_hidden, teacher=args.teacher, residual_scale=args.residual_scale,
                  policy_dist=args.policy_dist, curvature_inputs=args.curvature_inputs).to(device)
    agent.actor_logstd.requires_grad_(args.learn_logstd and args.final_logstd is None)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, 0.999), eps=1e-5)
    batch_size = args.num_envs * args.num_steps  # global: all processes together
    num_iterations = args.total_timesteps // batch_size
    if checkpoint:
        next_obs, next_done, noise = restore_episodes(checkpoint, rank, world, agent, optimizer, envs, reward_norm,
                                                      innovation_cv, args.seed, device)
        stats, best_eval = checkpoint["stats"], checkpoint["best_eval"]
        global_step, start_iteration = checkpoint["global_step"], checkpoint["iteration"] + 1
    else:
        next_obs, next_done, noise = start_episodes(args, rank, world, agent, envs, model, bc_pool, writer, device)
        stats, best_eval = {k: [] for k in STAT_KEYS}, float("inf")
        global_step, start_iteration = 0, 1
        if lead:
            best_eval = evaluate_and_keep(agent, eval_model, eval_segments, writer, 0, best_eval, run_dir, args)
            for key in STAT_KEYS:  # row 0: the starting policy, before any PPO update
                stats[key].append({"global_step": 0, "eval_total_cost": best_eval}.get(key, np.nan))
    anchor = actor_anchor(args, agent, checkpoint, device)

    # What is evaluated and saved: the live weights, or their running average (--ema-decay)
    ema = AveragedModel(agent, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay)) if args.ema_decay else None
    if ema and checkpoint:
        ema.load_state_dict(checkpoint["ema"])
    policy = ema.module if ema else agent

    policy_step = torch.compile(agent.get_action_and_value) if args.compile else agent.get_action_and_value
    loss_fn = torch.compile(ppo_loss) if args.compile else ppo_loss
    buf = new_rollout_buffers(args.num_steps, envs.num_envs, device, innovations=args.innovation_cv)

    stop = _StopRequest()
    previous_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    show_bar = lead and args.progress and sys.stderr.isatty()
    bar = tqdm(total=num_iterations * batch_size, initial=global_step, unit="step", disable=not show_bar)

    def write_checkpoint(path: Path, iteration: int) -> None:
        """Called by every process: rank 0 writes its own and the others' environment and RNG states."""
        states = gather_objects({"env": envs.state_dict(), "next_done": next_done.cpu(), "noise": noise.cpu(), "rng": {
            "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "reward_norm": reward_norm.state_dict() if reward_norm else None,
            "innovation_cv": innovation_cv.state_dict() if innovation_cv else None}, world)
        if lead:
            per_rank = {"ranks": states, "world_size": world} if world > 1 else {}
            kept = {"live_agent": agent.state_dict(), "ema": ema.state_dict()} if ema else {}
            if anchor:
                kept["anchor"] = {k: v.cpu() for k, v in anchor.items()}
            save_checkpoint(policy_checkpoint(
                policy, optimizer=optimizer.state_dict(), **kept, args=dataclasses.asdict(args), run_name=run_name,
                global_step=global_step, iteration=iteration, stats=stats, best_eval=best_eval, **states[0],
                train_segments=bc_pool.names, **per_rank), path)

    try:
        for iteration in range(start_iteration, num_iterations + 1):
            iteration_start = time.perf_counter()
            optimizer.param_groups[0]["lr"] = learning_rate_at(iteration, num_iterations, args)
            if args.final_logstd is not None:
                agent.actor_logstd.data.fill_(logstd_at(iteration, num_iterations, args))
            gamma = gamma_at(global_step, args)
            if reward_norm is not None:
                reward_norm.gamma = gamma

            # Rollout (batch-64 policy steps run faster on one thread than on two beside the torch simulator)
            update_threads = torch.get_num_threads()
            if isinstance(model, te.TinyPhysicsModel):
                torch.set_num_threads(1)
            next_obs, next_done, noise, episode_costs = rollout(agent, policy_step, envs, buf, next_obs, next_done,
                                                                noise, args, reward_norm, autocast)
            torch.set_num_threads(update_threads)
            global_step += batch_size

            # GAE (and the per-segment baseline), then the clipped update
            advantages, returns = advantages_and_returns(agent, buf, next_obs, next_done, gamma, args, innovation_cv)
            row = ppo_update(agent, optimizer, loss_fn, buf, advantages, returns, args, world, autocast, anchor)
            if ema:
                ema.update_parameters(agent)

            # Logging: means over processes (every process is equal in size), written by rank 0
            row.update(episodic_means(episode_costs))
            row["stop"] = float(stop.signum > 0)  # a signal to any process stops them all at the same iteration
            row = dict(zip(row, mean_over_processes(list(row.values()), world, device)))
            stopping = row.pop("stop") > 0
            row.update(global_step=global_step, learning_rate=optimizer.param_groups[0]["lr"], gamma=gamma,
                       eval_total_cost=np.nan,
                       sps=batch_size / (time.perf_counter() - iteration_start))
            if lead:
                write_scalars(writer, row, global_step)
                if innovation_cv is not None:
                    writer.add_scalar("losses/innovation_cv_removed", innovation_cv.removed, global_step)

            # Evaluation and checkpoints
            if lead and (crossed(global_step, batch_size, args.eval_every) or iteration == num_iterations):
                row["eval_total_cost"] = evaluate_and_keep(policy, eval_model, eval_segments, writer, global_step,
                                                           best_eval, run_dir, args)
                best_eval = min(best_eval, row["eval_total_cost"])
                if ema and args.eval_live:
                    live = evaluate(agent, eval_model, eval_segments)["total_cost"].mean()
                    writer.add_scalar("eval/live_total_cost", float(live), global_step)
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
        save_final_model(policy, args, global_step, stats, world, run_dir if lead else None)
    finally:
        bar.close()
        if writer:
            writer.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if world > 1:
            torch.distributed.destroy_process_group()
    return run_dir


if __name__ == "__main__":
    te.run_cli(lambda: print(train(tyro.cli(Args))))
