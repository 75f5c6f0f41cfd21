"""The GPU path, measured in one command: exactness of the torch simulator on CUDA, its throughput at large
batches (eager, compiled, CUDA graphs; fp32, tf32, bf16; peak memory), ONNX Runtime on the machine's CPU
cores for the ratio, training speed with the torch simulator, and torchrun where there are 2+ GPUs.

    python benchmark/gpu_check.py --assets ../shared/tinyphysics --out gpu_check_out

Writes gpu_check.md (one markdown table per part) and gpu_check.json into --out ($OUT when set). Without
CUDA it says so in one line and measures the CPU paths only, at small sizes (the suite runs it so). Each
part checks the clock against --budget-s and records what it had to skip, so the command ends in time.

On a lent device machine (its Python lacks tyro and gymnasium: carry them as wheels, see the device
tool's README), copy the model, data/ and reference/ into an ignored folder of the checkout and carry it:

    python benchmark/gpu_check.py --assets .gpu_assets --out $OUT
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import tyro

import tinyphysics_env as te

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    assets: str = str(ROOT.parent / "shared" / "tinyphysics")
    """folder with models/tinyphysics.onnx, data/*.csv and reference/official_costs.csv"""
    out: str = os.environ.get("OUT", "gpu_check_out")
    """where gpu_check.md and gpu_check.json go"""
    exact_segments: int = 10
    """asset segments scored against official_costs.csv and compared token by token with ONNX Runtime (the
    suite uses fewer: the whole set is already scored in tests/test_eval.py)"""
    batch_sizes: tuple[int, ...] = (1024, 4096, 16384, 65536)
    """simulator batch sizes measured on CUDA"""
    cpu_batch_sizes: tuple[int, ...] = (64,)
    """batch sizes measured without CUDA (and for ONNX Runtime on the CPU cores)"""
    sim_steps: int = 40
    """timed simulator steps per figure (after warm-up steps that compile and capture)"""
    train_envs: tuple[int, ...] = (64, 4096)
    """--num-envs of the training measurements on CUDA"""
    cpu_train_envs: int = 64
    """--num-envs of the training measurement without CUDA"""
    train_iterations: int = 3
    """training iterations per training measurement (the first is warm-up; wall time to 1M is extrapolated)"""
    budget_s: float = 450.0
    """stop starting new measurements after this many seconds, and record what was skipped"""
    compile_variants: bool = True
    """also measure --compile and CUDA graphs (the suite turns this off on CPU: compiling there takes minutes)"""


@dataclass
class Report:
    started: float = field(default_factory=time.perf_counter)
    tables: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def left(self, budget: float) -> float:
        return budget - (time.perf_counter() - self.started)

    def table(self, title: str, header: list[str], rows: list[list]) -> None:
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.tables.append("\n".join(lines))

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        te.write_atomic(out / "gpu_check.json", lambda f: f.write(json.dumps(self.data, indent=2).encode()))
        text = "# GPU check\n\n" + "\n\n".join(self.tables) + "\n"
        te.write_atomic(out / "gpu_check.md", lambda f: f.write(text.encode()))


def environment(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "cpu_cores": os.cpu_count(),
            "gpus": torch.cuda.device_count() if device == "cuda" else 0}
    if device == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(0)
    return info


# --- 1. Exactness ------------------------------------------------------------------------------
def eval_costs(assets: Path, controller: str, backend: str, compile: bool, folder: Path,
               num_segs: int) -> pd.DataFrame:
    """Per-segment costs from the real command line, ppo_lateral_eval.py."""
    csv = folder / f"{controller}-{backend}-{'compiled' if compile else 'eager'}.csv"
    command = [sys.executable, str(ROOT / "ppo_lateral_eval.py"), "--controller", controller, "--baseline", "none",
               "--sim-model-path", str(assets / "models" / "tinyphysics.onnx"), "--data-path", str(assets / "data"),
               "--sim-backend", backend, "--results-csv", str(csv), "--no-progress", "--num-segs", str(num_segs)]
    done = subprocess.run(command + (["--compile"] if compile else []), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ppo_lateral_eval.py failed: {done.stderr.strip().splitlines()[-1]}")
    return pd.read_csv(csv, dtype={"segment": str})


def token_differences(assets: Path, device: str, num_segs: int) -> dict:
    """PID on the asset segments with the official streams: the torch simulator on `device` against ONNX
    Runtime on the CPU, compared step by step (a differing token changes every later step)."""
    segments = te.load_segments(assets / "data", progress=False)
    segments = segments.first(num_segs)
    path = assets / "models" / "tinyphysics.onnx"
    histories = {}
    for name, model in (("onnx-cpu", te.TinyPhysicsModel(path)),
                        ("torch", te.TorchTinyPhysicsModel(path, device=device))):
        sim = te.TinyPhysicsSim(model)
        te.rollout_controllers(sim, segments, te.PIDController)
        histories[name] = sim.current[:, te.CONTROL_START_IDX:].copy()
    differ = histories["onnx-cpu"] != histories["torch"]
    first = [int(np.argmax(row)) + te.CONTROL_START_IDX for row in differ if row.any()]
    return {"segments_with_a_different_token": int(differ.any(axis=1).sum()), "differing_steps": int(differ.sum()),
            "first_differing_step": min(first) if first else None}


def tf32_is_off_for_fp32(path: Path, device: str) -> bool:
    """The fp32 model turns TF32 off itself, even after a tf32 model in the same process turned it on."""
    tf32 = te.TorchTinyPhysicsModel(path, device=device, precision="tf32")
    fp32 = te.TorchTinyPhysicsModel(path, device=device)
    states, tokens = np.zeros((2, te.CONTEXT_LENGTH, 4), np.float32), np.zeros((2, te.CONTEXT_LENGTH), np.int64)
    tf32.last_logits(states, tokens)
    on_after_tf32 = torch.backends.cuda.matmul.allow_tf32
    fp32.last_logits(states, tokens)
    return on_after_tf32 and not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def check_exactness(args: Args, report: Report, device: str) -> None:
    assets = Path(args.assets)
    reference = pd.read_csv(assets / "reference" / "official_costs.csv", dtype={"segment": str})
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for compile in (False, True) if args.compile_variants else (False,):
            for controller in ("pid", "zero"):
                if report.left(args.budget_s) < 60:
                    rows.append([controller, "compiled" if compile else "eager", "skipped (time)", "", ""])
                    continue
                costs = eval_costs(assets, controller, "torch", compile, Path(folder), args.exact_segments)
                ours = costs.set_index("segment").total_cost
                official = reference[reference.controller == controller].set_index("segment").total_cost.loc[ours.index]
                relative = float((np.abs(ours - official) / official).max())
                agree = int((np.abs(ours - official) <= 1e-6 * official).sum())
                label = f"{controller} {'compiled' if compile else 'eager'}"
                results[label] = {"max_relative_difference": relative, "segments_within_1e-6": agree,
                                  "segments": len(official)}
                rows.append([controller, "compiled" if compile else "eager", f"{agree}/{len(official)}",
                             f"{relative:.1e}", "yes" if agree == len(official) else "NO"])
    tokens = token_differences(assets, device, args.exact_segments)
    tf32_off = tf32_is_off_for_fp32(assets / "models" / "tinyphysics.onnx", device)
    report.data["exactness"] = {"official_costs": results, "tokens_vs_onnx_cpu": tokens, "tf32_off_for_fp32": tf32_off}
    report.table(f"Exactness: ppo_lateral_eval.py --sim-backend torch on {device}, against official_costs.csv",
                 ["controller", "simulator", "segments within 1e-6", "max relative difference", "exact"], rows)
    report.tables.append(f"Tokens against ONNX Runtime on the CPU (PID, official streams): "
                         f"{tokens['segments_with_a_different_token']} segments with a differing token, "
                         f"{tokens['differing_steps']} differing steps (first: {tokens['first_differing_step']}). "
                         f"TF32 off inside fp32 scoring, after a tf32 model turned it on: {tf32_off}.")


# --- 2. Simulator throughput ---------------------------------------------------------------------
def sim_steps_per_second(sim: te.TinyPhysicsSim, pool: te.Segments, batch: int, steps: int, device: str) -> float:
    """Zero-steer training-mode steps of `batch` segments (the pool tiled): warm-up steps first (they
    compile and capture), then `steps` timed ones."""
    sim.reset(pool.subset(np.arange(batch) % len(pool)))
    sim.warm_up()
    zeros = np.zeros(batch)
    for _ in range(3):
        sim.step(zeros)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        sim.step(zeros)  # the sampled tokens come back to the host each step: that synchronises
    return batch * steps / (time.perf_counter() - start)


def check_throughput(args: Args, report: Report, device: str) -> None:
    assets = Path(args.assets)
    path = assets / "models" / "tinyphysics.onnx"
    pool = te.load_segments(assets / "data", progress=False)
    sizes = args.batch_sizes if device == "cuda" else args.cpu_batch_sizes
    modes = {"eager": {}}
    if args.compile_variants:
        modes["compile"] = {"compile": True}
        if device == "cuda":
            modes["cuda-graphs"] = {"cuda_graphs": True}
    onnx = te.TinyPhysicsModel(path, threads=os.cpu_count() or 1)
    cpu = {b: sim_steps_per_second(te.TinyPhysicsSim(onnx, official_rng=False, seed=0), pool, b, args.sim_steps,
                                   "cpu") for b in sizes}
    rows, results = [], []
    for mode, options in modes.items():
        for precision in te.SIM_PRECISIONS:
            # One model per mode and precision, reused over the batch sizes (a compiled one then compiles once
            # for a static and once for a dynamic batch dimension).
            model = te.TorchTinyPhysicsModel(path, device=device, precision=precision, **options)
            for batch in sizes:
                if report.left(args.budget_s) < 30:
                    rows.append([batch, mode, precision, "skipped (time)", "", "", ""])
                    continue
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                rate = sim_steps_per_second(te.TinyPhysicsSim(model, official_rng=False, seed=0), pool, batch,
                                            args.sim_steps, device)
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
                results.append({"batch": batch, "mode": mode, "precision": precision, "steps_per_s": rate,
                                "peak_gib": peak, "onnx_cpu_steps_per_s": cpu[batch]})
                rows.append([batch, mode, precision, f"{rate:,.0f}", f"{peak:.2f}", f"{cpu[batch]:,.0f}",
                             f"{rate / cpu[batch]:.2f}x"])
    report.data["throughput"] = results
    report.table(f"Simulator model steps/s, torch backend on {device} ({args.sim_steps} timed steps each) against "
                 f"ONNX Runtime on {os.cpu_count()} CPU cores", ["B", "torch mode", "precision", "steps/s",
                                                                 "peak GPU GiB", "ONNX Runtime CPU steps/s",
                                                                 "ratio"], rows)


# --- 3. Training -------------------------------------------------------------------------------
def training_sps(args: Args, num_envs: int, compile: bool, runs: Path) -> float:
    """Median per-iteration SPS of the real command line (its defaults run each segment 8 times; large batches
    run each of 64 synthetic segments num_envs / 64 times, which changes no per-step work)."""
    command = [sys.executable, str(ROOT / "ppo_lateral.py"), "--sim-backend", "torch", "--num-envs", str(num_envs),
               "--total-timesteps", str(num_envs * 100 * args.train_iterations), "--synthetic-train", "64",
               "--samples-per-segment", str(max(8, num_envs // 64)),
               "--eval-data-path", str(Path(args.assets) / "data"), "--eval-segments", "1",
               "--eval-every", str(10**12), "--checkpoint-every", str(10**12),
               "--sim-model-path", str(Path(args.assets) / "models" / "tinyphysics.onnx"), "--runs-dir", str(runs),
               "--no-progress"] + (["--compile"] if compile else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ppo_lateral.py failed: {done.stderr.strip().splitlines()[-1]}")
    with np.load(Path(done.stdout.strip().splitlines()[-1]) / "training_stats.npz") as stats:
        return float(np.median(stats["sps"][2:]))  # row 0 is the start, row 1 the warm-up iteration


def check_training(args: Args, report: Report, device: str) -> None:
    path = Path(args.assets) / "models" / "tinyphysics.onnx"
    pool = te.load_segments(Path(args.assets) / "data", progress=False)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as folder:
        for num_envs in args.train_envs if device == "cuda" else (args.cpu_train_envs,):
            raw = sim_steps_per_second(te.TinyPhysicsSim(te.TorchTinyPhysicsModel(path, device=device),
                                                         official_rng=False, seed=0), pool, num_envs,
                                       args.sim_steps, device)
            for compile in (False, True) if args.compile_variants else (False,):
                if report.left(args.budget_s) < 60:
                    rows.append([num_envs, compile, "skipped (time)", "", "", ""])
                    continue
                sps = training_sps(args, num_envs, compile, Path(folder))
                results.append({"num_envs": num_envs, "compile": compile, "training_sps": sps, "raw_sim_sps": raw,
                                "learner_share": 1 - sps / raw, "wall_to_1M_s": 1e6 / sps})
                rows.append([num_envs, compile, f"{sps:,.0f}", f"{raw:,.0f}", f"{100 * (1 - sps / raw):.0f}%",
                             f"{1e6 / sps / 60:.1f} min"])
    report.data["training"] = results
    report.table(f"Training with --sim-backend torch on {device} (median per-iteration SPS; wall time to 1M "
                 "steps extrapolated from it)", ["num_envs", "--compile", "training steps/s", "raw simulator steps/s",
                                                 "learner share", "wall to 1M steps"], rows)


def check_torchrun(report: Report, device: str) -> None:
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    note = (f"torchrun: {gpus} GPUs; run `torchrun --nproc-per-node {gpus} ppo_lateral.py --sim-backend torch ...` "
            "by hand (not measured here)" if gpus >= 2 else
            f"torchrun: not measured, this machine has {gpus} GPU{'s' if gpus != 1 else ''} (needs 2 or more)")
    report.data["torchrun"] = note
    report.tables.append(note)


def main(args: Args) -> None:
    for need in ("models/tinyphysics.onnx", "data", "reference/official_costs.csv"):
        if not (Path(args.assets) / need).exists():
            raise te.TinyPhysicsError(f"--assets {args.assets}: {need} is missing; point it at the challenge assets")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = Report()
    report.data["environment"] = environment(device)
    if device == "cpu":
        print("CUDA is not available: measuring the CPU paths only, at small sizes", flush=True)
        report.tables.append("CUDA was not available: these are the CPU paths only, at small sizes.")
    if shutil.which("nvidia-smi") and device == "cuda":
        report.data["environment"]["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                                                                  text=True).stdout.strip()
    for part in (check_exactness, check_throughput, check_training):
        shown = len(report.tables)
        part(args, report, device)
        report.write(Path(args.out))  # what is done so far survives a later failure or a time-out
        print("\n\n".join(report.tables[shown:]), flush=True)
    check_torchrun(report, device)
    report.data["wall_s"] = time.perf_counter() - report.started
    report.write(Path(args.out))
    print(f"\nwrote {Path(args.out) / 'gpu_check.md'} and gpu_check.json in {report.data['wall_s']:.0f} s")


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
