"""ppo_lateral_eval.py: official-exact scoring from the command line, reports, export, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ppo_lateral as pl
import ppo_lateral_eval as ev
import tinyphysics_env as te

ROOT = Path(__file__).resolve().parent.parent

BASE_CONTROLLER = '''
class BaseController:
    def update(self, target_lataccel, current_lataccel, state, future_plan):
        raise NotImplementedError
'''

# A controller that uses every argument: feedback, roll compensation and a look at the plan.
FEEDFORWARD_CONTROLLER = '''
from . import BaseController


class Controller(BaseController):
    def __init__(self):
        self.integral = 0.0

    def update(self, target_lataccel, current_lataccel, state, future_plan):
        error = target_lataccel - current_lataccel
        self.integral += error
        ahead = future_plan.lataccel[:5] or [target_lataccel]
        speed = max(state.v_ego, 1.0) + 0.0 * sum(future_plan.v_ego) + 0.0 * state.a_ego
        return 0.2 * error + 0.05 * self.integral + 0.1 * (sum(ahead) / len(ahead) - state.roll_lataccel) * 20 / speed
'''


def run_eval(tmp_path, *flags):
    return subprocess.run([sys.executable, str(ROOT / "ppo_lateral_eval.py"), "--no-progress", *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def assets_flags(model_path, real_data):
    return ["--sim-model-path", str(model_path), "--data-path", str(real_data)]


@pytest.fixture
def controllers_dir(tmp_path):
    package = tmp_path / "challenge" / "controllers"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(BASE_CONTROLLER)
    (package / "feedforward.py").write_text(FEEDFORWARD_CONTROLLER)
    (package / "nothing.py").write_text("from . import BaseController\n\nclass Other(BaseController):\n    pass\n")
    return package


@pytest.mark.parametrize("backend, rtol", [("onnx", 1e-9), ("torch", 1e-6)])
def test_builtin_controllers_reproduce_the_official_costs(tmp_path, assets_flags, official_costs, backend, rtol):
    out = tmp_path / "costs.csv"
    result = run_eval(tmp_path, *assets_flags, "--controller", "pid", "--baseline", "zero", "--results-csv", str(out),
                      "--sim-backend", backend)
    assert result.returncode == 0, result.stderr
    ours = pd.read_csv(out, dtype={"segment": str})
    assert list(ours.columns) == ["segment", "controller", "lataccel_cost", "jerk_cost", "total_cost"]
    merged = official_costs.merge(ours, on=["segment", "controller"], suffixes=("_official", ""))
    assert len(merged) == len(official_costs) == 20
    for key in ev.COST_KEYS:
        np.testing.assert_allclose(merged[key], merged[f"{key}_official"], rtol=rtol, atol=0)
    assert "73.0616" in result.stdout and "559.0647" in result.stdout  # the summary table


def test_controller_file_batched_equals_one_at_a_time(tmp_path, assets_flags, controllers_dir, model, real_segments,
                                                       eval_cli):
    outputs = []
    for batch in ("10", "1"):
        out = tmp_path / f"b{batch}.csv"
        code, stderr = eval_cli(*assets_flags, "--controller", str(controllers_dir / "feedforward.py"),
                                "--baseline", "none", "--batch-size", batch, "--results-csv", str(out))
        assert code == 0, stderr
        outputs.append(pd.read_csv(out))
    pd.testing.assert_frame_equal(outputs[0], outputs[1])
    # ... and equals the literal official-style loop, whose plan and state come straight from the rows.
    controller = te.load_controller(str(controllers_dir / "feedforward.py"))
    literal = te.reference_rollout(model, real_segments, 3, controller())
    assert outputs[0].total_cost[3] == pytest.approx(literal["total_cost"], rel=1e-12)
    # The plan really reaches it: the same controller with the plan term removed scores differently.
    blind_source = FEEDFORWARD_CONTROLLER.replace("+ 0.1 * (sum(ahead)", "+ 0.0 * (sum(ahead)")
    (controllers_dir / "blind.py").write_text(blind_source)
    blind = te.rollout_controllers(te.TinyPhysicsSim(model), real_segments,
                                   te.load_controller(str(controllers_dir / "blind.py")))
    assert not np.allclose(blind["total_cost"], outputs[0].total_cost)


def test_summary_json_and_report(tmp_path, assets_flags):
    summary, report = tmp_path / "summary.json", tmp_path / "report.html"
    result = run_eval(tmp_path, *assets_flags, "--controller", "zero", "--num-segs", "4", "--json", str(summary),
                      "--report", str(report))
    assert result.returncode == 0, result.stderr
    data = json.loads(summary.read_text())
    assert data["segments"] == 4 and set(data["controllers"]) == {"zero", "pid"} and data["beat_baseline"] is False
    assert data["controllers"]["pid"]["total_cost"] == pytest.approx(
        np.mean([100.19350754132117, 32.78912736298331, 73.30541972918505, 87.56101464891773]), rel=1e-12)
    page = report.read_text()
    header = page.split("<p>", 1)[1].split("</p>", 1)[0]  # it counts what was scored, not what was asked
    assert header.startswith("4 segments (00000 .. 00003), official-exact costs") and "first 3" in header
    assert "<table" in page and "total_cost" in page and "did not beat" in page
    assert page.count("data:image/png;base64,") == 1 + 3  # histograms + 3 sample rollouts
    assert "http" not in page.split("<body>")[1]  # self-contained


def test_fewer_segments_than_asked_are_all_scored(assets_flags, eval_cli):
    code, stderr = eval_cli(*assets_flags, "--controller", "zero", "--baseline", "none")
    assert code == 0 and "only 10 segments found; scoring all of them" in stderr


def _policy_checkpoint(path: Path, seed: int = 0, curvature: bool = False) -> Path:
    """A policy whose actions are not ~0, saved as ppo_lateral saves one."""
    torch.manual_seed(seed)
    agent = pl.Agent(te.OBS_DIM, 32, curvature_inputs=curvature)
    torch.nn.init.normal_(agent.actor_mean[-1].weight, std=0.3)
    pl.save_checkpoint(pl.policy_checkpoint(agent, _observations(), global_step=0), path)
    return path


def _observations(n: int = 64) -> torch.Tensor:
    """Observations of roughly the dataset's ranges (speeds near 20 m/s), for the check at a save."""
    obs = torch.as_tensor(np.random.default_rng(0).normal(0, 1, (n, te.OBS_DIM)), dtype=torch.float32)
    obs[:, te.obs_slices()["v_ego"]] += 20.0
    return obs


@pytest.mark.parametrize("curvature", [False, True])
def test_exported_controller_scores_like_the_checkpoint(tmp_path, assets_flags, controllers_dir, model, real_segments,
                                                        eval_cli, curvature):
    checkpoint = _policy_checkpoint(tmp_path / "policy.pt", curvature=curvature)
    from_checkpoint = tmp_path / "checkpoint.csv"
    code, stderr = eval_cli(*assets_flags, "--model-path", str(checkpoint), "--baseline", "none", "--results-csv",
                            str(from_checkpoint), "--export-controller", str(controllers_dir / "ppo.py"))
    assert code == 0, stderr
    assert (controllers_dir / "ppo.npz").is_file()
    source = (controllers_dir / "ppo.py").read_text()
    assert "import torch" not in source and "tinyphysics_env" not in source  # numpy only, standalone

    from_export = tmp_path / "export.csv"
    code, stderr = eval_cli(*assets_flags, "--controller", str(controllers_dir / "ppo.py"), "--baseline", "none",
                            "--results-csv", str(from_export))
    assert code == 0, stderr
    a, b = pd.read_csv(from_checkpoint), pd.read_csv(from_export)
    np.testing.assert_array_equal(a.total_cost, b.total_cost)
    assert a.total_cost.std() > 0
    # The official-style literal loop drives the exported file exactly as tinyphysics.py would.
    literal = te.reference_rollout(model, real_segments, 2, te.load_controller(str(controllers_dir / "ppo.py"))())
    assert literal["total_cost"] == pytest.approx(a.total_cost[2], rel=1e-12)


DRIVE_THE_CONTROLLER = """
import json, sys
from collections import namedtuple
sys.path[:0] = [sys.argv[1], sys.argv[2]]  # the numpy-only folder, the folder that holds controllers/
from controllers.ppo import Controller
State = namedtuple("State", "roll_lataccel v_ego a_ego")
Plan = namedtuple("Plan", "lataccel roll_lataccel v_ego a_ego")
calls = json.loads(open(sys.argv[3]).read())
controller = Controller()
steers = [controller.update(c["target"], c["current"], State(*c["state"]), Plan(*c["plan"])) for c in calls]
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "tinyphysics_env", "ppo_lateral", "pandas")]
print(json.dumps(steers))
"""


def test_exported_controller_runs_in_an_interpreter_with_numpy_alone(tmp_path, assets_flags, controllers_dir,
                                                                    real_segments, eval_cli):
    """The exported file imports numpy and nothing else: in a fresh interpreter whose path holds only the
    controller's folder and numpy, it steers as it does here."""
    checkpoint = _policy_checkpoint(tmp_path / "p.pt", curvature=True)
    code, stderr = eval_cli(*assets_flags, "--model-path", str(checkpoint), "--baseline", "none", "--num-segs", "1",
                            "--export-controller", str(controllers_dir / "ppo.py"))
    assert code == 0, stderr
    numpy_only = tmp_path / "numpy_only"
    numpy_only.mkdir()
    for name in ("numpy", "numpy.libs"):  # numpy.libs: the wheels' bundled BLAS, where there is one
        if (Path(np.__file__).parent.parent / name).exists():
            (numpy_only / name).symlink_to(Path(np.__file__).parent.parent / name)
    seg = real_segments.first(1)
    rows = {f: np.asarray(getattr(seg, f))[0] for f in ("target_lataccel", "roll_lataccel", "v_ego", "a_ego")}
    calls = [{"target": rows["target_lataccel"][t], "current": rows["target_lataccel"][t - 1] + 0.01 * np.sin(t),
              "state": [rows[f][t] for f in ("roll_lataccel", "v_ego", "a_ego")],
              "plan": [list(rows[f][t + 1:t + 50]) for f in ("target_lataccel", "roll_lataccel", "v_ego", "a_ego")]}
             for t in range(te.CONTEXT_LENGTH, 160)]
    (tmp_path / "calls.json").write_text(json.dumps(calls, default=float))
    calls = json.loads((tmp_path / "calls.json").read_text())
    done = subprocess.run([sys.executable, "-I", "-S", "-c", DRIVE_THE_CONTROLLER, str(numpy_only),
                           str(controllers_dir.parent), str(tmp_path / "calls.json")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    here = te.load_controller(str(controllers_dir / "ppo.py"))()
    expected = [here.update(c["target"], c["current"], te.State(*c["state"]), te.FuturePlan(*c["plan"]))
                for c in calls]
    assert json.loads(done.stdout) == expected and np.ptp(expected[80:]) > 0


@pytest.mark.parametrize("case, message", [
    ("missing checkpoint", "no such checkpoint"),
    ("corrupt checkpoint", "not a readable checkpoint"),
    ("other kind", "not a ppo_lateral checkpoint"),
    ("no Controller class", "defines no class named Controller"),
    ("num-segs 0", "--num-segs 0: need at least 1"),
    ("no csv", "no .csv segments there"),
    ("both", "pass exactly one of --model-path"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, assets_flags, controllers_dir, eval_cli, case, message):
    good = _policy_checkpoint(tmp_path / "good.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:200])
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    (tmp_path / "empty").mkdir()
    flags = {
        "missing checkpoint": ["--model-path", str(tmp_path / "nope.pt")],
        "corrupt checkpoint": ["--model-path", str(corrupt)],
        "other kind": ["--model-path", str(other)],
        "no Controller class": ["--controller", str(controllers_dir / "nothing.py")],
        "num-segs 0": ["--controller", "pid", "--num-segs", "0"],
        "no csv": ["--controller", "pid", "--data-path", str(tmp_path / "empty")],
        "both": ["--controller", "pid", "--model-path", str(good)],
    }[case]
    outputs = [tmp_path / "out" / name for name in ("r.csv", "s.json", "report.html")]
    outputs[0].parent.mkdir()
    code, stderr = eval_cli(*assets_flags, *flags, "--results-csv", str(outputs[0]), "--json", str(outputs[1]),
                            "--report", str(outputs[2]))
    assert code == 2
    assert message in stderr and stderr.count("\n") == 1, stderr
    assert not any(p.exists() for p in outputs) and not list((tmp_path / "out").iterdir())
