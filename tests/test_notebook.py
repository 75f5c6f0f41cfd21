"""notebooks/ppo_lateral.ipynb runs end to end on CPU with a tiny step budget."""

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "ppo_lateral.ipynb"


def test_notebook_is_saved_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_notebook_trains_scores_and_exports(tmp_path, monkeypatch, model_path, real_data):
    runs = tmp_path / "runs"
    for key, value in {"PPO_NOTEBOOK_STEPS": "800", "PPO_NOTEBOOK_ENVS": "8", "PPO_NOTEBOOK_SYNTHETIC": "16",
                       "PPO_NOTEBOOK_EVAL_SEGMENTS": "2", "PPO_NOTEBOOK_RUNS": str(runs),
                       "TINYPHYSICS_MODEL": str(model_path), "TINYPHYSICS_DATA": str(real_data)}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    (run_dir,) = runs.iterdir()
    for name in ("best_model.pt", "final_model.pt", "report.html", "ppo.py", "ppo.npz"):
        assert (run_dir / name).is_file(), name
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "beat PID: True" in printed or "beat PID: False" in printed
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 2  # the live curve and the rollouts
    assert "<table" in (run_dir / "report.html").read_text()
