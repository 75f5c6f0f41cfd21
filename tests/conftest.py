"""Shared fixtures: the challenge assets (../shared/tinyphysics, or $TINYPHYSICS_ASSETS) and synthetic segments."""

import importlib.util
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

import ppo_lateral_eval as pe
import tinyphysics_env as te

ROOT = Path(__file__).resolve().parent.parent


def _assets_dir() -> Path | None:
    candidate = Path(os.environ.get("TINYPHYSICS_ASSETS", ROOT.parent / "shared" / "tinyphysics"))
    return candidate if (candidate / "models" / "tinyphysics.onnx").is_file() else None


@pytest.fixture(scope="session")
def assets() -> Path:
    found = _assets_dir()
    if found is None:
        message = "challenge assets not found: set TINYPHYSICS_ASSETS to a folder with models/, data/, reference/"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def benchmark_script():
    """Loads a script of benchmark/ (not a package) as a module, by name, with benchmark/ importable as
    running the script makes it (for its shared `common`)."""
    if str(ROOT / "benchmark") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmark"))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmark" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture(scope="session")
def model_path(assets) -> Path:
    return assets / "models" / "tinyphysics.onnx"


@pytest.fixture(scope="session")
def real_data(assets) -> Path:
    return assets / "data"


@pytest.fixture(scope="session")
def model(model_path) -> te.TinyPhysicsModel:
    return te.TinyPhysicsModel(model_path, threads=2)


@pytest.fixture(scope="session")
def real_segments(real_data) -> te.Segments:
    return te.load_segments(real_data)


@pytest.fixture(scope="session")
def official_costs(assets) -> pd.DataFrame:
    return pd.read_csv(assets / "reference" / "official_costs.csv", dtype={"segment": str})


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    te.synthesize_segments(64, seed=0, out_dir=out)
    return out


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never touch the user's cache."""
    os.environ["TINYPHYSICS_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def eval_cli(tmp_path, monkeypatch, capsys):
    """ppo_lateral_eval.py's command line run inside this process, from tmp_path: (exit code, stderr). It is
    the script's own main; only the interpreter's start-up, seconds per call, is left out."""
    def run(*argv: str) -> tuple[int, str]:
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        try:
            pe.main(["--no-progress", *argv])
            code = 0
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err
    return run
