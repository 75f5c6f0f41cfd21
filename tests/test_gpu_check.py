"""benchmark/gpu_check.py runs end to end without CUDA: it says so, measures the CPU paths, and writes its
table and JSON (on a GPU machine the same command measures the CUDA paths)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_check_runs_on_cpu_and_reports(tmp_path, assets):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "benchmark" / "gpu_check.py"), "--assets", str(assets),
                           "--out", str(out), "--no-compile-variants", "--exact-segments", "2", "--sim-steps", "3",
                           "--cpu-batch-sizes", "8", "--cpu-train-envs", "8", "--train-iterations", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "CUDA is not available: measuring the CPU paths only, at small sizes"
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["environment"]["device"] == "cpu"
    for label in ("pid eager", "zero eager"):  # the torch simulator reproduces the official costs
        result = data["exactness"]["official_costs"][label]
        assert result["segments_within_1e-6"] == result["segments"] == 2, result
    assert data["exactness"]["tokens_vs_onnx_cpu"]["differing_steps"] == 0
    assert data["exactness"]["tf32_off_for_fp32"] is True
    assert {(r["mode"], r["precision"]) for r in data["throughput"]} == {("eager", p) for p in ("fp32", "tf32", "bf16")}
    assert all(r["batch"] == 8 and r["steps_per_s"] > 0 and r["onnx_cpu_steps_per_s"] > 0 for r in data["throughput"])
    (training,) = data["training"]
    assert training["num_envs"] == 8 and training["training_sps"] > 0 and training["wall_to_1M_s"] > 0
    assert "not measured" in data["torchrun"]
    table = (out / "gpu_check.md").read_text()
    assert "CUDA was not available" in table and "| 8 | eager | fp32 |" in table
