"""Training recipes judged as the project judges them: each variant of ppo_lateral.py trained on synthetic
segments only, then its final policy scored official-exactly on held-out synthetic segments (mean and
median; this decides) and on the real segments (they stand beside it), against the teacher and PID.

    python benchmark/recipes.py --eval-data-path ../shared/tinyphysics/data \\
        --sim-model-path ../shared/tinyphysics/models/tinyphysics.onnx \\
        --variant "defaults=" --variant "white_noise=--noise-correlation 0" --seeds 1 2 3

Each variant is "name=flags"; the flags are added to the headline command (--num-envs 64
--total-timesteps 1000000 unless the flags say otherwise). The evaluation during training runs on
the held-out synthetic segments, so each run's curve is on the deciding set. Prints one markdown row
per run and per variant (mean over seeds) and appends every run to a JSON-lines file.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tyro

import ppo_lateral as pl
import ppo_lateral_eval as ev
import tinyphysics_env as te

ROOT = Path(__file__).resolve().parent.parent
# Arguments that place a run rather than change its recipe: left out of an adopted run's flags.
PLUMBING = {"seed", "synthetic_train", "eval_data_path", "eval_segments", "sim_model_path", "eval_every", "exp_name",
            "runs_dir", "progress", "resume", "extend_to", "threads", "track", "wandb_project_name", "wandb_entity"}
# The headline's goal at 1M steps and the longest run's, as fractions of the teacher's held-out cost.
TARGET_RATIOS = (0.93, 0.85)


@dataclass
class Args:
    variant: tuple[str, ...] = ("defaults=",)
    """name=flags, one training recipe each (flags added to the headline command)"""
    seeds: tuple[int, ...] = (1,)
    """one training run per seed and variant"""
    eval_data_path: str | None = None
    """held-out real segments (never trained on)"""
    sim_model_path: str | None = None
    """the tinyphysics .onnx model"""
    heldout_synthetic: int = 200
    """held-out synthetic segments (generated with --heldout-seed, never trained on)"""
    heldout_seed: int = 12345
    """seed of the held-out synthetic segments (training segments use the run's --seed)"""
    synthetic_train: int = 5000
    """synthetic training segments"""
    eval_every: int = 250_000
    """evaluate on the held-out synthetic segments every this many steps (the curve)"""
    runs_dir: str = "benchmark/runs"
    """where the training runs go"""
    results: str = "benchmark/recipes.jsonl"
    """JSON-lines file each finished run is appended to"""
    replot: tuple[str, ...] = ()
    """train nothing: read the runs of these JSON-lines files (as --results writes them), print their tables and
    draw --plot"""
    adopt: tuple[str, ...] = ()
    """train nothing: score these finished runs, each "name=run_dir" (a ppo_lateral.py run on the same
    held-out segments), record them in --results and print their tables"""
    plot: str | None = None
    """also draw every run's held-out synthetic curve, with PID and the teacher as lines, into benchmark/<plot>.png"""


def controller_costs(model: te.TinyPhysicsModel, segments: te.Segments, name: str) -> np.ndarray:
    sim = te.TinyPhysicsSim(model)
    return te.score_in_batches(segments, 1024, lambda s: te.rollout_controllers(sim, s, te.BUILTIN_CONTROLLERS[name])
                               )["total_cost"]


def summary(costs: np.ndarray) -> dict:
    return {"mean": float(np.mean(costs)), "median": float(np.median(costs))}


def run_row(record: dict, teacher: dict) -> str:
    steps, costs = record["curve"]
    syn = record["synthetic"]
    return (f"| {record['variant']} | {record['seed']} | {costs[0]:.2f} | {syn['mean']:.2f} | {syn['median']:.2f} | "
            f"{syn['mean'] / teacher['synthetic']['mean']:.3f}x | {min(costs):.2f} | {record['real']['mean']:.2f} | "
            f"{record['wall_s']:.0f} |")


def plot_curves(finished: dict[str, list[dict]], baselines: dict, out: Path) -> None:
    """Left: every run with PID and the teacher as lines; right: the same, zoomed on the teacher."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.5))
    axes = fig.subplots(1, 2)
    teacher = baselines["pid_ff"]["synthetic"]["mean"]
    lowest = min(min(r["curve"][1]) for records in finished.values() for r in records)
    colors = colormaps["tab10" if len(finished) <= 10 else "tab20"]  # one colour a variant, a line style a seed
    for ax in axes:
        for i, (name, records) in enumerate(finished.items()):
            for j, r in enumerate(records):
                steps, costs = r["curve"]
                ax.plot(steps, costs, marker=".", color=colors(i % colors.N), ls=("-", "--", "-.", ":")[j % 4],
                        label=f"{name} seed {r['seed']}")
        for name, style in (("pid", "--"), ("pid_ff", ":")):
            cost = baselines[name]["synthetic"]["mean"]
            ax.axhline(cost, color="black", ls=style, label=f"{name} {cost:.2f}")
        ax.set_xlabel("environment steps")
    for ratio in TARGET_RATIOS:
        axes[1].axhline(ratio * teacher, color="grey", ls="-.", lw=1, label=f"{ratio}x pid_ff {ratio * teacher:.2f}")
    axes[0].set_ylabel("held-out synthetic total_cost (official-exact)")
    axes[1].set_ylim(min(lowest, min(TARGET_RATIOS) * teacher) - 0.3, max(teacher, lowest) + 0.5)
    axes[1].set_title("zoomed on the teacher")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the curves, not on them
    fig.savefig(out, dpi=100, bbox_inches="tight")


def recipe_flags(checkpoint: dict) -> str:
    """The flags by which a checkpoint's run differs from the defaults, as the command line takes them
    (arguments that only place a run left out)."""
    saved = asdict(pl.Args(**checkpoint["args"]))
    changed = {k: v for k, v in saved.items() if getattr(pl.Args, k, v) != v and k not in PLUMBING}

    def flag(name: str, value) -> str:
        name = name.replace("_", "-")
        if isinstance(value, bool):
            return f"--{name}" if value else f"--no-{name}"
        return " ".join([f"--{name}", *map(str, value if isinstance(value, tuple) else [value])])
    return " ".join(flag(k, v) for k, v in changed.items())


def make_record(name: str, run_dir: Path, wall: float, paths: dict, model_path: Path, baselines: dict) -> dict:
    """A finished run's JSON-lines record: its flags and seed as it saved them, its curve, and its final
    policy scored by ppo_lateral_eval.py (official-exact) on every set. The run is named by its folder alone,
    so a record holds no path of the machine that made it."""
    _, checkpoint = pl.load_agent(run_dir / "final_model.pt")
    final = {k: ev.evaluate_cli(ev.Args(model_path=str(run_dir / "final_model.pt"), data_path=str(path),
                                        num_segs=len(te.list_segment_files(Path(path))), baseline="none",
                                        sim_model_path=str(model_path), progress=False)
                                )["per_segment"]["policy:final_model.pt"]["total_cost"] for k, path in paths.items()}
    with np.load(run_dir / "training_stats.npz") as stats:
        evaluated = np.isfinite(stats["eval_total_cost"])
        curve = np.stack([stats["global_step"][evaluated], stats["eval_total_cost"][evaluated]])
    return {"variant": name, "flags": recipe_flags(checkpoint),
            "seed": checkpoint["args"]["seed"], "run": run_dir.name, "wall_s": wall, "curve": curve.tolist(),
            **{k: summary(v) for k, v in final.items()}, "per_segment_synthetic": final["synthetic"].tolist(),
            "teacher": baselines["pid_ff"], "pid": baselines["pid"]}


def wall_time(run_dir: Path) -> float:
    """Seconds from a run's start (its TensorBoard file is named for it) to its final model."""
    started = min(int(p.name.split(".")[3]) for p in run_dir.glob("events.out.tfevents.*"))
    return (run_dir / "final_model.pt").stat().st_mtime - started


def main(args: Args) -> None:
    model_path, real_path = te.resolve_model_path(args.sim_model_path), te.resolve_data_path(args.eval_data_path)
    synthetic_path = te.cached_synthetic(args.heldout_synthetic, args.heldout_seed, "heldout-")
    model = te.TinyPhysicsModel(model_path)
    paths = {"synthetic": synthetic_path, "real": real_path}
    sets = {k: te.load_segments(path) for k, path in paths.items()}
    per_segment = {name: {k: controller_costs(model, segs, name) for k, segs in sets.items()}
                   for name in ("pid", "pid_ff")}
    baselines = {name: {k: summary(v) for k, v in costs.items()} for name, costs in per_segment.items()}
    teacher = baselines["pid_ff"]
    print(f"pid_ff: synthetic {teacher['synthetic']['mean']:.2f} (median {teacher['synthetic']['median']:.2f}), "
          f"real {teacher['real']['mean']:.2f}; pid: synthetic {baselines['pid']['synthetic']['mean']:.2f}, "
          f"real {baselines['pid']['real']['mean']:.2f}", flush=True)
    print("\n| variant | seed | step 0 synthetic | final synthetic mean | median | vs pid_ff (mean) | best synthetic "
          "| final real | wall (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    finished = {}
    for path in args.replot:
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            finished.setdefault(record["variant"], []).append(record)
            print(run_row(record, teacher))

    def keep(record: dict) -> None:
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")
        finished.setdefault(record["variant"], []).append(record)
        print(run_row(record, teacher), flush=True)

    for spec in args.adopt:
        name, _, run_dir = spec.partition("=")
        keep(make_record(name, Path(run_dir), wall_time(Path(run_dir)), paths, model_path, baselines))
    for spec in args.variant if not (args.replot or args.adopt) else ():
        name, _, flags = spec.partition("=")
        for seed in args.seeds:
            command = [sys.executable, str(ROOT / "ppo_lateral.py"), "--seed", str(seed), "--num-envs", "64",
                       "--total-timesteps", "1000000", "--synthetic-train", str(args.synthetic_train),
                       "--eval-data-path", str(synthetic_path), "--eval-segments", str(args.heldout_synthetic),
                       "--sim-model-path", str(model_path), "--eval-every", str(args.eval_every),
                       "--exp-name", name, "--runs-dir", args.runs_dir, "--no-progress", *shlex.split(flags)]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
            wall = time.perf_counter() - start
            if done.returncode:
                print(f"| {name} | {seed} | failed: {done.stderr.strip().splitlines()[-1]} |", flush=True)
                continue
            keep(make_record(name, Path(done.stdout.strip().splitlines()[-1]), wall, paths, model_path, baselines))
    if args.plot:
        plot_curves(finished, baselines, ROOT / "benchmark" / f"{args.plot}.png")
    print("\n| variant | seeds | synthetic mean | vs pid_ff | synthetic median | vs pid_ff | segments better than "
          "pid_ff | real mean | wall (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    t_syn = per_segment["pid_ff"]["synthetic"]
    for name, records in finished.items():
        costs = np.array([r["per_segment_synthetic"] for r in records])  # [seeds, segments]
        mean, median = costs.mean(axis=1).mean(), np.median(costs, axis=1).mean()
        print(f"| {name} | {len(records)} | {mean:.2f} | {mean / t_syn.mean():.3f}x | {median:.2f} | "
              f"{median / np.median(t_syn):.3f}x | {100 * (costs < t_syn).mean():.0f}% | "
              f"{np.mean([r['real']['mean'] for r in records]):.2f} | {np.mean([r['wall_s'] for r in records]):.0f} |")


if __name__ == "__main__":
    te.run_cli(lambda: main(tyro.cli(Args)))
