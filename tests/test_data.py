"""Segment loading, its cache, splits, synthetic segments, and finding or downloading the assets."""

import hashlib
import http.server
import io
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tinyphysics_env as te


def test_loads_official_format_in_simulator_units(real_segments, real_data):
    df = pd.read_csv(real_data / "00001.csv")
    assert real_segments.names[:2] == ["00000", "00001"]
    assert sorted(real_segments.lengths.tolist()) == sorted(
        len(pd.read_csv(f)) for f in sorted(real_data.glob("*.csv")))
    assert set(real_segments.lengths.tolist()) == {599, 600}
    assert real_segments.target_lataccel.shape == (10, te.ROWS_USED)
    np.testing.assert_array_equal(real_segments.roll_lataccel[1, :549], np.sin(df.roll[:549]) * 9.81)
    np.testing.assert_array_equal(real_segments.steer_command[1, :100], -df.steerCommand[:100])


def test_cache_is_used_and_rebuilt_when_a_file_changes(tmp_path):
    te.synthesize_segments(3, seed=1, out_dir=tmp_path)
    first = te.load_segments(tmp_path)
    cached = list(te._segment_cache_dir(tmp_path).glob("segments-*.npy"))
    assert len(cached) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.csv", "00001.csv", "00002.csv"]  # data untouched
    again = te.load_segments(tmp_path)
    assert isinstance(again.v_ego.base, np.memmap) or isinstance(again.v_ego, np.memmap)
    np.testing.assert_array_equal(first.v_ego, again.v_ego)

    df = pd.read_csv(tmp_path / "00001.csv")
    df.loc[:, "vEgo"] = 7.0
    df.to_csv(tmp_path / "00001.csv", index=False)
    changed = te.load_segments(tmp_path)
    assert np.all(changed.v_ego[1] == 7.0)
    assert len(list(te._segment_cache_dir(tmp_path).glob("segments-*.npy"))) == 1


@pytest.mark.parametrize("breakage, message", [
    (lambda df: df.drop(columns="roll"), "missing column(s) roll"),
    (lambda df: df.iloc[:450], "450 rows"),
    (lambda df: df.assign(vEgo=df.vEgo.where(df.index != 300)), "v_ego is NaN or empty at row 300"),
    (lambda df: df.assign(steerCommand=df.steerCommand.where(df.index != 50)),
     "steer_command is NaN or empty at row 50"),
])
def test_malformed_segment_is_named(tmp_path, breakage, message):
    te.synthesize_segments(3, seed=2, out_dir=tmp_path)
    breakage(pd.read_csv(tmp_path / "00002.csv")).to_csv(tmp_path / "00002.csv", index=False)
    with pytest.raises(te.TinyPhysicsError) as e:
        te.load_segments(tmp_path)
    assert "00002.csv" in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_nan_outside_used_rows_is_fine(tmp_path):
    te.synthesize_segments(1, seed=3, out_dir=tmp_path)
    df = pd.read_csv(tmp_path / "00000.csv")
    df.loc[len(df) - 1, "vEgo"] = np.nan  # row 598/599 is never read
    df.to_csv(tmp_path / "00000.csv", index=False)
    assert len(te.load_segments(tmp_path)) == 1


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(te.TinyPhysicsError, match="no .csv segments"):
        te.load_segments(tmp_path)


def test_splits():
    train, evaluation = te.split_segments(20000)
    np.testing.assert_array_equal(evaluation, np.arange(5000))
    np.testing.assert_array_equal(train, np.arange(5000, 20000))
    train, evaluation = te.split_segments(10, verbose=False)
    assert set(train) | set(evaluation) == set(range(10)) and not set(train) & set(evaluation)
    assert len(train) == 5
    with pytest.raises(te.TinyPhysicsError):
        te.split_segments(1)


def test_synthetic_statistics_match_the_real_segments(tmp_path, real_segments):
    synthetic = te.load_segments(te.synthesize_segments(300, seed=0, out_dir=tmp_path)[0].parent)
    window = slice(te.CONTROL_START_IDX, te.COST_END_IDX)
    v, tgt = synthetic.v_ego[:, :600], synthetic.target_lataccel[:, window]
    assert v.min() >= 0 and v.max() <= 43
    assert abs(v.mean() - 23.4) < 2.5 and abs(v.std() - 9.2) < 2.0  # the full dataset's figures
    assert abs(tgt.mean()) < 0.08 and abs(tgt.std() - 0.46) < 0.1
    lo, hi = np.quantile(tgt, [0.005, 0.995])
    assert -2.3 < lo < -1.0 and 1.0 < hi < 2.3
    roll = np.arcsin(synthetic.roll_lataccel / te.ACC_G)
    assert np.abs(roll).max() <= 0.17 + 1e-9
    assert set(synthetic.lengths.tolist()) == {599, 600}

    # The warm-up steer explains the target through a gain of the same size as in the real logs.
    def gains(s):
        out = []
        for i in range(len(s)):
            a = np.c_[s.steer_command[i, :100], s.roll_lataccel[i, :100], np.ones(100)]
            # A single gain is ill-posed near standstill, where it changes within the segment.
            if np.ptp(s.steer_command[i, :100]) > 0.02 and s.v_ego[i, :100].mean() > 5.0:
                out.append((s.v_ego[i, :100].mean(), np.linalg.lstsq(a, s.target_lataccel[i, :100], rcond=None)[0][0]))
        return np.array(out)

    real, syn = gains(real_segments), gains(synthetic)
    assert np.all((syn[:, 1] > 0.5) & (syn[:, 1] < 1.9))
    assert np.corrcoef(syn[:, 0], syn[:, 1])[0, 1] > 0.8  # rising with speed
    # The real segments' gains sit near the synthetic gain curve at their speeds.
    assert np.median(np.abs(real[:, 1] / te.steer_gain(real[:, 0]) - 1)) < 0.35
    # Smoothness: the target's per-step change is of the real logs' size.
    def roughness(s):
        return np.median(np.std(np.diff(s.target_lataccel[:, window], axis=1), axis=1))
    assert 0.33 < roughness(synthetic) / roughness(real_segments) < 3
    # A standing car is not asked to corner: the real logs' target is 0 there, and the synthetic one fades
    # out towards standstill (before, such a segment cost every controller 250-480).
    def standing(s):
        return s.target_lataccel[:, :600][s.v_ego[:, :600] < 0.5]
    assert standing(real_segments).size > 100 and np.abs(standing(real_segments)).max() < 0.01
    assert standing(synthetic).size > 100 and np.abs(standing(synthetic)).max() < 0.4
    every_row = synthetic.target_lataccel[:, :600]  # v (above) holds the same rows' speeds
    assert np.all(every_row[v == 0] == 0) and np.all(np.abs(every_row) <= 4.0 * te.standstill_fade(v))


def test_synthetic_segments_are_reproducible(tmp_path):
    te.synthesize_segments(2, seed=9, out_dir=tmp_path / "a")
    te.synthesize_segments(2, seed=9, out_dir=tmp_path / "b")
    assert (tmp_path / "a" / "00001.csv").read_bytes() == (tmp_path / "b" / "00001.csv").read_bytes()


def test_cached_synthetic_folder_is_whole_whenever_it_is_visible(monkeypatch, tmp_path):
    """Two runs side by side used to write the same cache folder in place, and one read the other's
    half-written CSVs. Now the folder, whenever it exists, holds all n segments; runs racing to make it
    both get it, and nothing is left behind."""
    monkeypatch.setenv("TINYPHYSICS_CACHE", str(tmp_path))
    n, folder = 40, tmp_path / "synthetic" / "n40-seed3"
    seen, results = [], []
    makers = [threading.Thread(target=lambda: results.append(te.cached_synthetic(n, 3))) for _ in range(2)]
    for m in makers:
        m.start()
    while any(m.is_alive() for m in makers):
        if folder.exists():
            seen.append(len(list(folder.glob("*.csv"))))
    for m in makers:
        m.join()
    assert results == [folder, folder] and len(te.load_segments(folder, progress=False)) == n
    assert set(seen) <= {n}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["n40-seed3"]
    assert (folder / "SYNTHETIC_VERSION").read_text().strip() == str(te.SYNTHETIC_VERSION)
    expected = tmp_path / "direct"
    te.synthesize_segments(n, 3, expected)
    assert (folder / "00039.csv").read_bytes() == (expected / "00039.csv").read_bytes()
    # a partial folder (an interrupted older write) is replaced, not trusted
    for f in sorted(folder.glob("*.csv"))[1:]:
        f.unlink()
    assert te.cached_synthetic(n, 3) == folder and len(list(folder.glob("*.csv"))) == n
    # so is a whole one written by another version of the generator (the first wrote no marker)
    for stale in ("1\n", None):
        (folder / "00039.csv").write_text("stale")
        if stale is None:
            (folder / "SYNTHETIC_VERSION").unlink()
        else:
            (folder / "SYNTHETIC_VERSION").write_text(stale)
        assert te.cached_synthetic(n, 3) == folder
        assert (folder / "00039.csv").read_bytes() == (expected / "00039.csv").read_bytes()
        assert (folder / "SYNTHETIC_VERSION").read_text().strip() == str(te.SYNTHETIC_VERSION)


# --- Finding the assets -------------------------------------------------------------------------
def test_flag_and_variable_precedence(monkeypatch, model_path, tmp_path):
    monkeypatch.setenv("TINYPHYSICS_MODEL", str(model_path))
    assert te.resolve_model_path(None) == model_path
    other = tmp_path / "m.onnx"
    other.write_bytes(b"x")
    assert te.resolve_model_path(str(other)) == other
    with pytest.raises(te.TinyPhysicsError, match="--sim-model-path=/nope: no such file"):
        te.resolve_model_path("/nope")
    monkeypatch.setenv("TINYPHYSICS_DATA", "/nowhere")
    with pytest.raises(te.TinyPhysicsError, match="TINYPHYSICS_DATA=/nowhere"):
        te.resolve_data_path(None)


def test_invalid_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(te.TinyPhysicsError, match="not a loadable tinyphysics ONNX model"):
        te.TinyPhysicsModel(bad)


class _Server:
    """A local HTTP server on 127.0.0.1 serving files from a dict; a path listed in `truncate`
    announces more bytes than it sends."""

    def __init__(self, files: dict[str, bytes], truncate: tuple[str, ...] = ()):
        outer = self
        self.files, self.truncate = files, truncate

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (100 if self.path in outer.truncate else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """No flag, no variable, no neighbouring checkout: resolution must fall through to the download."""
    for var in ("TINYPHYSICS_MODEL", "TINYPHYSICS_DATA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TINYPHYSICS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(te, "_neighbour_checkout", lambda: tmp_path / "no-checkout")
    return tmp_path / "cache"


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".part" in p.name] if folder.exists() else []


def test_model_download_checks_the_hash(fresh_cache, monkeypatch, model_path):
    body = model_path.read_bytes()
    assert hashlib.sha256(body).hexdigest() == te.MODEL_SHA256
    server = _Server({"/tinyphysics.onnx": body, "/wrong.onnx": body[:-1] + b"\0"})
    try:
        monkeypatch.setenv("TINYPHYSICS_MODEL_URL", server.url + "/wrong.onnx")
        with pytest.raises(te.TinyPhysicsError, match="sha256"):
            te.resolve_model_path(None)
        assert not (fresh_cache / "models" / "tinyphysics.onnx").exists() and not _leftovers(fresh_cache)

        monkeypatch.setenv("TINYPHYSICS_MODEL_URL", server.url + "/tinyphysics.onnx")
        path = te.resolve_model_path(None)
        assert path == fresh_cache / "models" / "tinyphysics.onnx" and path.read_bytes() == body
        te.TinyPhysicsModel(path)  # loads
        server.files.clear()  # a second resolution must not download again
        assert te.resolve_model_path(None) == path
    finally:
        server.close()


def test_truncated_download_leaves_nothing(fresh_cache, monkeypatch):
    server = _Server({"/m.onnx": b"x" * 1000}, truncate=("/m.onnx",))
    try:
        monkeypatch.setenv("TINYPHYSICS_MODEL_URL", server.url + "/m.onnx")
        with pytest.raises(te.TinyPhysicsError, match="could not download|stopped at"):
            te.resolve_model_path(None)
        assert not (fresh_cache / "models" / "tinyphysics.onnx").exists() and not _leftovers(fresh_cache)
    finally:
        server.close()


def test_dataset_download_unpacks_a_zip(fresh_cache, monkeypatch, tmp_path):
    te.synthesize_segments(3, seed=4, out_dir=tmp_path / "made")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for f in sorted((tmp_path / "made").glob("*.csv")):
            z.write(f, f"data/{f.name}")  # nested inside the zip, as the official one is
    server = _Server({"/data.zip": buffer.getvalue(), "/broken.zip": b"PK not really a zip"})
    try:
        monkeypatch.setenv("TINYPHYSICS_DATA_URL", server.url + "/broken.zip")
        with pytest.raises(te.TinyPhysicsError, match="not a valid zip"):
            te.resolve_data_path(None)
        assert not (fresh_cache / "data").exists() and not _leftovers(fresh_cache)
        assert not (fresh_cache / "dataset.zip").exists()

        monkeypatch.setenv("TINYPHYSICS_DATA_URL", server.url + "/data.zip")
        data = te.resolve_data_path(None)
        assert sorted(p.name for p in data.iterdir()) == ["00000.csv", "00001.csv", "00002.csv"]
        assert len(te.load_segments(data)) == 3
        assert not (fresh_cache / "dataset.zip").exists()
    finally:
        server.close()


def test_unreachable_server_is_a_one_line_error(fresh_cache, monkeypatch):
    server = _Server({})
    server.close()
    monkeypatch.setenv("TINYPHYSICS_MODEL_URL", server.url + "/gone.onnx")
    with pytest.raises(te.TinyPhysicsError, match="could not download .* --sim-model-path"):
        te.resolve_model_path(None)


def test_neighbouring_checkout_is_found(monkeypatch, tmp_path, model_path):
    for var in ("TINYPHYSICS_MODEL", "TINYPHYSICS_DATA"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "models").mkdir()
    os.symlink(model_path, tmp_path / "models" / "tinyphysics.onnx")
    te.synthesize_segments(1, seed=0, out_dir=tmp_path / "data")
    monkeypatch.setattr(te, "_neighbour_checkout", lambda: tmp_path)
    assert te.resolve_model_path(None) == tmp_path / "models" / "tinyphysics.onnx"
    assert te.resolve_data_path(None) == tmp_path / "data"
