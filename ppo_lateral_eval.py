"""Official-exact scoring of a trained policy or an official-interface controller, an HTML report,
and export of a policy as a controller for the official repository.

    python ppo_lateral_eval.py --model-path runs/<run>/best_model.pt --report report.html
    python ppo_lateral_eval.py --controller controllers/my_controller.py --num-segs 100
    python ppo_lateral_eval.py --model-path runs/<run>/best_model.pt --export-controller controllers/ppo.py
"""

from __future__ import annotations

import base64
import builtins
import dis
import html
import inspect
import io
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import tyro

import ppo_lateral as pl
import tinyphysics_env as te

COST_KEYS = ("lataccel_cost", "jerk_cost", "total_cost")


@dataclass
class Args:
    model_path: str | None = None
    """a checkpoint written by ppo_lateral.py (final_model.pt, best_model.pt or a checkpoint): score its
    deterministic policy"""
    controller: str | None = None
    """score this official-interface controller instead: pid, pid_ff, zero, or a .py file in a controllers/ package"""
    baseline: str = "pid"
    """controller scored on the same segments for comparison (pid, pid_ff, zero, a .py file, or none)"""
    data_path: str | None = None
    """segment CSVs (else $TINYPHYSICS_DATA, ../data, or a download)"""
    sim_model_path: str | None = None
    """the tinyphysics .onnx model (else $TINYPHYSICS_MODEL, ../models/tinyphysics.onnx, or a download)"""
    num_segs: int = te.NUM_EVAL_SEGMENTS
    """score the first N segments in sorted order (the official eval uses 5,000)"""
    results_csv: str | None = None
    """write one row per segment and controller: segment,controller,lataccel_cost,jerk_cost,total_cost"""
    json: str | None = None
    """write the summary table as JSON"""
    report: str | None = None
    """write a self-contained HTML report (tables, histograms, sample rollouts)"""
    export_controller: str | None = None
    """with --model-path: write the policy as an official controller file (numpy only; weights in a .npz beside it)"""
    batch_size: int = 1024
    """segments simulated in lockstep"""
    threads: int = 0
    """ONNX Runtime threads (0: one per core)"""
    sim_backend: Literal["auto", "onnx", "torch"] = "auto"
    """simulator model: onnx, torch (the plain-torch port, sampling on its device), auto (onnx on CPU, torch on
    CUDA); both give the official scores"""
    cuda: bool = True
    """run the torch simulator backend on CUDA when it is present"""
    compile: bool = False
    """torch backend: torch.compile the simulator model (scores stay official-exact)"""
    progress: bool = True
    """show progress bars (only on a terminal)"""


# --- What is scored -----------------------------------------------------------------------------
@dataclass
class Scorer:
    """A named thing to score: a rollout over a batch of segments returning costs, with the simulator
    left holding the histories of the last batch."""

    name: str
    rollout: object  # Callable[[TinyPhysicsSim, Segments], dict]


def policy_scorer(model_path: str) -> Scorer:
    agent, checkpoint = pl.load_agent(model_path)
    params = agent.numpy_params()
    return Scorer(f"policy:{Path(model_path).name}",
                  lambda sim, segs: te.rollout_policy(sim, segs, lambda obs: pl.numpy_policy(params, obs)))


def controller_scorer(name_or_file: str) -> Scorer:
    controller = te.load_controller(name_or_file)
    label = name_or_file if name_or_file in te.BUILTIN_CONTROLLERS else Path(name_or_file).stem
    return Scorer(label, lambda sim, segs: te.rollout_controllers(sim, segs, controller, name_or_file))


def score(scorer: Scorer, model: te.SimModel, segments: te.Segments, batch_size: int,
          progress: bool = False) -> dict[str, np.ndarray]:
    """Official-exact per-segment costs, in batches."""
    sim = te.TinyPhysicsSim(model, official_rng=True)
    return te.score_in_batches(segments, batch_size, lambda s: scorer.rollout(sim, s), progress,
                               desc=f"scoring {scorer.name}")


def sample_rollouts(scorer: Scorer, model: te.SimModel, segments: te.Segments) -> dict[str, np.ndarray]:
    """Target, actual lateral acceleration and steer over the controlled steps, for plotting."""
    sim = te.TinyPhysicsSim(model, official_rng=True)
    scorer.rollout(sim, segments)
    window = slice(te.CONTROL_START_IDX, te.COST_END_IDX)
    return {"target": sim.target[:, window], "current": sim.current[:, window], "steer": sim.actions[:, window]}


# --- Outputs ----------------------------------------------------------------------------------
def summary_table(results: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    rows = [{"controller": name, "segments": len(c["total_cost"]), **{k: float(np.mean(c[k])) for k in COST_KEYS}}
            for name, c in results.items()]
    return pd.DataFrame(rows).set_index("controller")


def results_frame(results: dict[str, dict[str, np.ndarray]], names: list[str]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({"segment": names, "controller": name, **{k: c[k] for k in COST_KEYS}})
                      for name, c in results.items()], ignore_index=True)


def _figure(rows: int, cols: int, size: tuple[float, float], **kw):
    """A figure outside pyplot, so that a report leaves the caller's plotting backend (a notebook's) alone."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    return fig, fig.subplots(rows, cols, **kw)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def report_html(table: pd.DataFrame, results: dict, rollouts: dict, names: list[str], test: str,
                baseline: str | None, scored: list[str]) -> str:
    """A self-contained page: summary table, cost histograms, sample rollouts (of `names`), verdict, for the
    `scored` segments."""
    fig, axes = _figure(1, 3, (15, 3.6))
    for ax, key in zip(axes, COST_KEYS):
        top = max(np.quantile(c[key], 0.99) for c in results.values())
        for name, c in results.items():
            ax.hist(np.clip(c[key], 0, top), bins=40, range=(0, top), alpha=0.55, label=name)
        ax.set_title(key)
        ax.set_xlabel("cost per segment")
        ax.legend()
    histograms = _png(fig)

    samples = []
    for i, segment in enumerate(names):
        fig, (top_ax, bottom_ax) = _figure(2, 1, (11, 5), sharex=True)
        steps = np.arange(te.CONTROL_START_IDX, te.COST_END_IDX)
        first = next(iter(rollouts.values()))
        top_ax.plot(steps, first["target"][i], color="black", lw=1.6, label="target")
        for name, r in rollouts.items():
            top_ax.plot(steps, r["current"][i], lw=1, label=f"{name}")
            bottom_ax.plot(steps, r["steer"][i], lw=1, label=f"{name}")
        top_ax.set_ylabel("lateral accel (m/s²)")
        top_ax.legend(loc="upper right", fontsize=8)
        bottom_ax.set_ylabel("steer")
        bottom_ax.set_xlabel("step")
        top_ax.set_title(f"segment {segment}")
        samples.append(_png(fig))

    verdict = ""
    if baseline is not None:
        t, b = table.loc[test, "total_cost"], table.loc[baseline, "total_cost"]
        verdict = (f"<p class='verdict'><b>{html.escape(test)}</b> {'beat' if t < b else 'did not beat'} "
                   f"<b>{html.escape(baseline)}</b>: mean total cost {t:.3f} vs {b:.3f} "
                   f"({100 * (t - b) / b:+.1f}%).</p>")
    images = "".join(f"<img src='data:image/png;base64,{s}'>" for s in samples)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Controls Challenge report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}img{{max-width:100%;display:block;margin:1em 0}}
.verdict{{font-size:1.2em}}</style></head><body>
<h1>Controls Challenge v2 evaluation</h1>
<p>{len(scored)} segments ({html.escape(scored[0])} .. {html.escape(scored[-1])}), official-exact costs; sample
rollouts of the first {len(names)}.</p>
{verdict}
<h2>Mean costs</h2>{table.to_html(float_format=lambda x: f"{x:.4f}")}
<h2>Cost distributions</h2><img src='data:image/png;base64,{histograms}'>
<h2>Sample rollouts</h2>{images}
</body></html>"""


def write_text_atomic(path: str, text: str) -> None:
    te.write_atomic(Path(path), lambda f: f.write(text.encode()))


# --- Export ------------------------------------------------------------------------------------
CONTROLLER_TEMPLATE = '''"""A PPO steering policy exported by ppo_lateral_eval.py: a controller for the official
Controls Challenge repository. Copy this file and {weights} into controls_challenge/controllers/
and run `python tinyphysics.py --controller {stem}` (or eval.py). Needs numpy only."""

from pathlib import Path

import numpy as np

from . import BaseController

WEIGHTS = Path(__file__).with_name("{weights}")
PLAN = ("lataccel", "roll_lataccel", "v_ego", "a_ego")  # the fields of future_plan, in order


{functions}


def plan_rows(values, fallback, n):
    """The plan's first n rows, its last row repeated where the segment ends sooner (as in training)."""
    values = list(values)[:n] or [fallback]
    return values + [values[-1]] * (n - len(values))


class Controller(BaseController):
    """Builds, from the arguments of update(), the observation the policy was trained on, in the layout that
    the weights file lists."""

    def __init__(self):
        with np.load(WEIGHTS) as f:
            self.params = {{k: f[k] for k in f.files}}
        p = self.params
        self.layout = list(zip(p["obs_names"].tolist(), p["obs_sizes"].tolist()))
        known = {{"target_lataccel", "current_lataccel", "roll_lataccel", "v_ego", "a_ego", "past_actions",
                 "past_lataccel", "error_integral", "prev_error"}} | {{"future_" + name for name in PLAN}}
        unknown = [name for name, _ in self.layout if name not in known]
        if unknown:
            raise ValueError(f"{{WEIGHTS.name}} asks for observation parts {{unknown}} this controller does not build")
        self.step, self.control_start = int(p["first_step"]), int(p["control_start"])
        self.steer_range = (float(p["steer_min"]), float(p["steer_max"]))
        self.past_actions, self.past_lataccel = [], []
        self.error_integral, self.error = 0.0, 0.0

    def update(self, target_lataccel, current_lataccel, state, future_plan):
        t = self.step
        self.step += 1
        self.past_lataccel.append(current_lataccel)
        prev_error, self.error = self.error, target_lataccel - current_lataccel
        self.error_integral += self.error
        if t < self.control_start:
            # The simulator replaces answers before control starts with the logged steer; the policy reads 0.
            self.past_actions.append(0.0)
            return 0.0
        now = {{"target_lataccel": target_lataccel, "current_lataccel": current_lataccel,
               "roll_lataccel": state.roll_lataccel, "v_ego": state.v_ego, "a_ego": state.a_ego,
               "error_integral": self.error_integral, "prev_error": prev_error}}
        size = dict(self.layout)
        parts = {{name: [value] for name, value in now.items()}}
        parts["past_actions"] = self.past_actions[-size["past_actions"]:]
        parts["past_lataccel"] = self.past_lataccel[-size["past_lataccel"]:]
        for name, values in zip(PLAN, future_plan):
            fallback = target_lataccel if name == "lataccel" else now[name]
            parts["future_" + name] = plan_rows(values, fallback, size["future_" + name])
        obs = np.array([x for name, _ in self.layout for x in parts[name]], dtype=np.float64)
        steer = float(np.clip(numpy_policy(self.params, obs[None])[0], *self.steer_range))
        self.past_actions.append(steer)
        return steer
'''


def global_names(code: types.CodeType) -> set[str]:
    """The module-level names a function's code (and the functions defined inside it) reads."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    return names.union(*(global_names(c) for c in code.co_consts if isinstance(c, types.CodeType)))


def exported_source(functions: tuple) -> str:
    """The functions' source, for a file that imports numpy alone: each may use numpy, builtins and the others."""
    allowed = {"np", *dir(builtins), *(f.__name__ for f in functions)}
    for f in functions:
        foreign = sorted(global_names(f.__code__) - allowed)
        if foreign:
            raise te.TinyPhysicsError(f"{f.__name__} reads {', '.join(foreign)}, which the exported controller does "
                                      "not have; pass it in params (numpy_params) or compute it inside")
    return "\n\n".join(inspect.getsource(f) for f in functions)


def start_observations(model: te.SimModel, segments: te.Segments) -> torch.Tensor:
    """Real observations without a model call: each segment's at step 100, where control starts."""
    sim = te.TinyPhysicsSim(model, official_rng=True)
    sim.reset(segments)
    sim.warm_up()
    return torch.as_tensor(te.observe(sim))


def export_controller(model_path: str, out_path: str, model: te.SimModel | None = None,
                      segments: te.Segments | None = None) -> tuple[Path, Path]:
    """Write <stem>.py and <stem>.npz: the deterministic policy as an official-interface controller, its numpy
    policy checked against the torch agent first, on the observations the checkpoint was saved with and on
    these segments' (with the model that steps them), where given."""
    out = Path(out_path)
    if out.suffix != ".py":
        raise te.TinyPhysicsError(f"--export-controller {out_path}: must name a .py file, e.g. controllers/ppo.py")
    if not out.parent.is_dir():
        raise te.TinyPhysicsError(f"--export-controller {out_path}: folder {out.parent} does not exist; create it")
    agent, checkpoint = pl.load_agent(model_path)
    probes = [checkpoint["probe_obs"]] if "probe_obs" in checkpoint else []
    if segments is not None:
        probes.append(start_observations(model, segments.first(64)))
    if not probes:
        raise te.TinyPhysicsError(f"{model_path}: saved without the observations its export is checked on; export "
                                  "it with ppo_lateral_eval.py --model-path ... --export-controller")
    pl.check_numpy_policy(agent, torch.cat(probes))
    source = CONTROLLER_TEMPLATE.format(weights=out.with_suffix(".npz").name, stem=out.stem,
                                        functions=exported_source(pl.NUMPY_POLICY))
    names, sizes = zip(*te.OBS_LAYOUT)
    params = {**agent.numpy_params(), "obs_names": np.array(names), "obs_sizes": np.array(sizes),
              "first_step": np.array(te.CONTEXT_LENGTH), "control_start": np.array(te.CONTROL_START_IDX),
              "steer_min": np.array(te.STEER_RANGE[0]), "steer_max": np.array(te.STEER_RANGE[1])}
    te.write_atomic(out.with_suffix(".npz"), lambda f: np.savez(f, **params))
    write_text_atomic(str(out), source)
    return out, out.with_suffix(".npz")


# --- Main ----------------------------------------------------------------------------------------
def validate(args: Args) -> None:
    if (args.model_path is None) == (args.controller is None):
        raise te.TinyPhysicsError("pass exactly one of --model-path (a checkpoint) or --controller (pid, pid_ff, "
                                  "zero or a .py file)")
    if args.export_controller and not args.model_path:
        raise te.TinyPhysicsError("--export-controller needs --model-path: it exports a trained policy")
    if args.num_segs < 1:
        raise te.TinyPhysicsError(f"--num-segs {args.num_segs}: need at least 1 segment")
    if args.batch_size < 1:
        raise te.TinyPhysicsError(f"--batch-size {args.batch_size}: need at least 1")
    for flag, value in (("--results-csv", args.results_csv), ("--json", args.json), ("--report", args.report)):
        if value and not Path(value).resolve().parent.is_dir():
            raise te.TinyPhysicsError(f"{flag} {value}: folder {Path(value).parent} does not exist; create it")


def evaluate_cli(args: Args) -> dict:
    """Score as the arguments say, print the summary, write the requested files; returns the summary
    (as written by --json) with the per-segment costs under "per_segment"."""
    validate(args)
    test = policy_scorer(args.model_path) if args.model_path else controller_scorer(args.controller)
    baseline = None if args.baseline == "none" else controller_scorer(args.baseline)
    if baseline is not None and baseline.name == test.name:
        baseline.name += " (baseline)"
    segments = te.load_segments(te.resolve_data_path(args.data_path), progress=args.progress)
    if len(segments) < args.num_segs:
        print(f"note: only {len(segments)} segments found; scoring all of them (--num-segs {args.num_segs})",
              file=sys.stderr)
    segments = segments.first(args.num_segs)
    device = pl.pick_device(args.cuda).type
    if args.compile and (args.sim_backend if args.sim_backend != "auto" else te.default_sim_backend(device)) != "torch":
        raise te.TinyPhysicsError("--compile compiles the torch simulator: add --sim-backend torch")
    model = te.load_sim_model(te.resolve_model_path(args.sim_model_path), args.sim_backend, device, args.threads,
                              compile=args.compile)
    show = args.progress and sys.stderr.isatty()

    scorers = [test] + ([baseline] if baseline else [])
    results = {s.name: score(s, model, segments, args.batch_size, show) for s in scorers}
    table = summary_table(results)
    print(table.to_string(float_format=lambda x: f"{x:.4f}"))
    summary = {"segments": len(segments), "first_segment": segments.names[0], "last_segment": segments.names[-1],
               "controllers": {name: {"segments": int(row.segments), **{k: row[k] for k in COST_KEYS}}
                               for name, row in table.iterrows()},
               "test": test.name, "baseline": baseline.name if baseline else None}
    if baseline:
        summary["beat_baseline"] = bool(table.loc[test.name, "total_cost"] < table.loc[baseline.name, "total_cost"])

    if args.results_csv:
        write_text_atomic(args.results_csv, results_frame(results, segments.names).to_csv(index=False))
    if args.json:
        write_text_atomic(args.json, json.dumps(summary, indent=2))
    if args.report:
        shown = segments.first(3)
        rollouts = {s.name: sample_rollouts(s, model, shown) for s in scorers}
        write_text_atomic(args.report, report_html(table, results, rollouts, shown.names, test.name,
                                                   baseline.name if baseline else None, segments.names))
    if args.export_controller:
        py, npz = export_controller(args.model_path, args.export_controller, model, segments)
        print(f"exported {py} and {npz}")
    return {**summary, "per_segment": results}


def main(argv: list[str] | None = None) -> None:
    """The command line (argv: its arguments, sys.argv's by default); bad input exits 2 with one line."""
    te.run_cli(lambda: evaluate_cli(tyro.cli(Args, args=argv)))


if __name__ == "__main__":
    main()
