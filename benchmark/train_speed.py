"""What the learner costs: training steps/s of ppo_lateral.py against the raw simulator's steps/s at
the same batch size, measured side by side in one run, several times, medians reported.

The raw figure steps the same vector environment (observations included, and the defaults' expected
reward and K copies with shared noise) with a fixed steer and no policy; the training figure is the
per-iteration SPS that ppo_lateral.py logs (rollout + GAE + update), skipping the first iteration
(warm-up, and compilation with --compile).

    python benchmark/train_speed.py --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx
"""

import tempfile
import time
from dataclasses import dataclass

import numpy as np
import tyro
from common import compare, median_training_sps

import ppo_lateral as pl
import tinyphysics_env as te


@dataclass
class Args:
    sim_model_path: str | None = None
    """the tinyphysics .onnx model (else $TINYPHYSICS_MODEL, ../models, or a download)"""
    eval_data_path: str | None = None
    """held-out segments (else $TINYPHYSICS_DATA, ../data, or a download)"""
    num_envs: int = 64
    """batch size of both measurements"""
    iterations: int = 8
    """training iterations per training measurement"""
    repeats: int = 3
    """alternating raw/training measurements; medians are reported"""
    compile: bool = False
    """measure ppo_lateral.py --compile"""
    sim_backend: str = "auto"
    """simulator backend of both measurements (onnx, torch, auto)"""


def raw_steps_per_second(envs: te.TinyPhysicsVectorEnv, steps: int) -> float:
    envs.reset(seed=0)
    actions = np.zeros((envs.num_envs, 1))
    start = time.perf_counter()
    for _ in range(steps):
        envs.step(actions)
    return envs.num_envs * steps / (time.perf_counter() - start)


def training_steps_per_second(args: Args, runs_dir: str) -> float:
    train_args = pl.Args(sim_model_path=args.sim_model_path, eval_data_path=args.eval_data_path, synthetic_train=512,
                         num_envs=args.num_envs, total_timesteps=args.num_envs * 100 * args.iterations,
                         eval_every=10**12, checkpoint_every=10**12, eval_segments=1,
                         runs_dir=runs_dir, progress=False, compile=args.compile,
                         sim_backend=args.sim_backend)
    return median_training_sps(pl.train(train_args))


def main(args: Args) -> None:
    model = te.load_sim_model(te.resolve_model_path(args.sim_model_path), args.sim_backend, "cpu",
                              compile=args.compile)
    with tempfile.TemporaryDirectory() as folder:
        te.synthesize_segments(512, seed=0, out_dir=folder)
        # The raw measurement steps the environment as training configures it by default (its reward and
        # the K copies' shared noise are the simulator's work), so the difference is the learner's alone.
        defaults = pl.Args()
        envs = te.TinyPhysicsVectorEnv(args.num_envs, segments=te.load_segments(folder, progress=False), model=model,
                                       autoreset_mode="same_step", expected_reward=True,
                                       samples_per_segment=defaults.samples_per_segment,
                                       common_noise=defaults.common_noise)
        raw, trained = [], []
        for _ in range(args.repeats):
            raw.append(raw_steps_per_second(envs, 400))
            trained.append(training_steps_per_second(args, folder + "/runs"))
    r, t = compare(f"num_envs={args.num_envs} compile={args.compile} repeats={args.repeats}",
                   ("raw simulator (vector env, no policy), steps/s:", raw),
                   ("ppo_lateral.py training, steps/s:", trained), ",.0f")
    print(f"learner cost: {100 * (1 - t / r):.0f}% of the raw simulator's throughput")


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
