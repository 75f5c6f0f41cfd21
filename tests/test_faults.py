"""Faults a user meets in practice: damaged caches, misbehaving controllers, full disks, moved runs,
file permissions, and the Gymnasium spaces' bounds."""

import dataclasses
import errno
import io
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import ppo_lateral as pl
import ppo_lateral_eval as ev
import tinyphysics_env as te

ROOT = Path(__file__).resolve().parent.parent
REAL_FDOPEN = os.fdopen


def _cache_files(data: Path) -> tuple[Path, Path]:
    cache = te._segment_cache_dir(data)
    return next(cache.glob("segments-*.npy")), next(cache.glob("segments-*.json"))


@pytest.fixture
def csv_folder(tmp_path, real_data):
    folder = tmp_path / "data"
    shutil.copytree(real_data, folder)
    return folder


# --- 1, 2: the segment cache --------------------------------------------------------------------
@pytest.mark.parametrize("damage, why", [
    ("truncate", "ValueError"),
    ("pickled", "ValueError"),
    ("other names", "other segment names"),
    ("wrong shape", "shape"),
    ("wrong dtype", "dtype float32"),
    ("not json", "JSONDecodeError"),
])
def test_a_damaged_cache_is_noted_and_rebuilt(csv_folder, capsys, damage, why):
    expected = te.load_segments(csv_folder)
    array_file, meta_file = _cache_files(csv_folder)
    if damage == "truncate":
        array_file.write_bytes(array_file.read_bytes()[:5000])
    elif damage == "pickled":
        np.save(array_file, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif damage == "other names":
        meta_file.write_text(meta_file.read_text().replace('"00003"', '"99999"'))
    elif damage == "wrong shape":
        np.save(array_file, np.zeros((3, 5, te.ROWS_USED)))
    elif damage == "wrong dtype":
        np.save(array_file, np.zeros((10, 5, te.ROWS_USED), np.float32))
    else:
        meta_file.write_text("{not json")
    capsys.readouterr()
    again = te.load_segments(csv_folder)
    note = capsys.readouterr().err.strip()
    assert note.startswith("note: segment cache") and "rebuilding it from the CSVs" in note and why in note, note
    assert note.count("\n") == 0
    np.testing.assert_array_equal(again.target_lataccel, expected.target_lataccel)
    assert again.names == expected.names
    capsys.readouterr()
    te.load_segments(csv_folder)  # rebuilt: the next load is quiet and reads the cache
    assert capsys.readouterr().err == ""


def test_a_read_only_cache_never_stops_a_run(csv_folder, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setenv("TINYPHYSICS_CACHE", str(locked))
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions; a file where the folder must go does not
            locked.chmod(0o700)
            shutil.rmtree(locked)
            locked.write_text("not a folder")
        segments = te.load_segments(csv_folder)
    finally:
        if locked.is_dir():
            locked.chmod(0o700)
    assert len(segments) == 10 and "note: segment cache not written" in capsys.readouterr().err


def test_two_processes_building_one_cache_both_succeed(csv_folder, tmp_path):
    """The torchrun case: two processes load the same uncached folder at the same moment."""
    script = ("import sys, tinyphysics_env as te\n"
              "s = te.load_segments(sys.argv[1])\n"
              "print(len(s), float(s.target_lataccel.sum()))\n")
    env = {**os.environ, "TINYPHYSICS_CACHE": str(tmp_path / "shared-cache")}
    outputs = []
    for _ in range(3):  # a few rounds, each from an empty cache, to give the race its chances
        shutil.rmtree(tmp_path / "shared-cache", ignore_errors=True)
        procs = [subprocess.Popen([sys.executable, "-c", script, str(csv_folder)], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            assert "damaged" not in err, err
            outputs.append(out)
    assert len(set(outputs)) == 1
    cache = te._segment_cache_dir(csv_folder)
    cache = tmp_path / "shared-cache" / cache.relative_to(te.cache_dir())
    assert len(list(cache.glob("segments-*.npy"))) == 1 and len(list(cache.glob("segments-*.json"))) == 1
    assert not list(cache.glob(".*.part"))
    key = next(cache.glob("segments-*.npy")).stem.removeprefix("segments-")
    names = [f.stem for f in te.list_segment_files(csv_folder)]
    assert te._read_cache(cache, key, names) is not None  # the cache they leave is valid


# --- 3: misbehaving controllers -------------------------------------------------------------------
BAD_CONTROLLERS = {
    "nan": "return float('nan')",
    "inf": "return float('-inf') if self.n > 150 else 0.0",
    "text": "return 'left'",
    "none": "return None if self.n > 120 else 0.1",
}


def _controller_package(tmp_path: Path, body: str) -> Path:
    package = tmp_path / "challenge" / "controllers"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("class BaseController:\n    pass\n")
    (package / "bad.py").write_text(
        "from . import BaseController\n\n\nclass Controller(BaseController):\n    def __init__(self):\n"
        "        self.n = 0\n\n    def update(self, target_lataccel, current_lataccel, state, future_plan):\n"
        f"        self.n += 1\n        {body}\n")
    return package / "bad.py"


def _eval_flags(tmp_path, model_path, real_data) -> list[str]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return ["--sim-model-path", str(model_path), "--data-path", str(real_data), "--num-segs", "10", "--results-csv",
            str(out / "r.csv"), "--json", str(out / "s.json"), "--report", str(out / "r.html")]


def _eval(tmp_path, model_path, real_data, *flags):
    result = subprocess.run([sys.executable, str(ROOT / "ppo_lateral_eval.py"), "--no-progress",
                             *_eval_flags(tmp_path, model_path, real_data), *flags],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return result, list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("kind", list(BAD_CONTROLLERS))
def test_a_controller_answering_no_finite_number_is_a_one_line_error(tmp_path, model_path, real_data, eval_cli,
                                                                      kind):
    controller = _controller_package(tmp_path, BAD_CONTROLLERS[kind])
    code, stderr = eval_cli(*_eval_flags(tmp_path, model_path, real_data), "--controller", str(controller))
    assert code == 2 and stderr.count("\n") == 1, stderr
    step = {"nan": 100, "inf": 170, "text": 100, "none": 140}[kind]  # call n (from 1) is at step 19 + n
    assert f"{controller}: update() returned" in stderr and f"at step {step} of segment 00000" in stderr
    assert "must return a finite number" in stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_a_raising_controller_shows_its_traceback_then_names_where(tmp_path, model_path, real_data):
    controller = _controller_package(tmp_path, "return 1 / (self.n - 200)")
    result, written = _eval(tmp_path, model_path, real_data, "--controller", str(controller))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Traceback") and "bad.py" in result.stderr and "ZeroDivisionError" in result.stderr
    assert lines[-1] == (f"error: {controller}: update() raised ZeroDivisionError at step 219 of segment 00000 "
                         "(its traceback is above)")
    assert written == []


def test_non_finite_policy_weights_are_a_one_line_error(tmp_path, model_path, real_data, eval_cli):
    agent = pl.Agent(te.OBS_DIM, 8)
    with torch.no_grad():
        agent.actor_mean[-1].bias.fill_(float("nan"))
    pl.save_checkpoint(pl.policy_checkpoint(agent, torch.zeros((4, te.OBS_DIM)), global_step=0), tmp_path / "nan.pt")
    code, stderr = eval_cli(*_eval_flags(tmp_path, model_path, real_data), "--model-path", str(tmp_path / "nan.pt"))
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "the policy's steer is nan at step 100 of segment 00000" in stderr
    assert list((tmp_path / "out").iterdir()) == []


def _small_run(tmp_path, model_path, real_data, **overrides) -> pl.Args:
    base = dict(sim_model_path=str(model_path), eval_data_path=str(real_data), synthetic_train=16, eval_segments=1,
                num_envs=4, samples_per_segment=2, num_steps=20, num_minibatches=2, update_epochs=1,
                checkpoint_every=80, runs_dir=str(tmp_path / "runs"), progress=False)
    return pl.Args(**{**base, **overrides})


# --- 4: a full disk ----------------------------------------------------------------------------
class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, fd: int, room: int):
        self.f, self.room = REAL_FDOPEN(fd, "wb"), room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def close(self):
        self.f.close()
        super().close()


@pytest.fixture
def full_disk(monkeypatch):
    def fill(room: int = 100):
        monkeypatch.setattr(te.os, "fdopen", lambda fd, mode: _FullDisk(fd, room))
    return fill


@pytest.mark.parametrize("what", ["checkpoint", "training_stats", "report"])
def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, full_disk, what):
    path = tmp_path / {"checkpoint": "checkpoint_100.pt", "training_stats": "training_stats.npz",
                       "report": "report.html"}[what]
    write = {
        "checkpoint": lambda: pl.save_checkpoint({"weights": torch.zeros(1000)}, path),
        "training_stats": lambda: te.write_atomic(path, lambda f: np.savez(f, step=np.arange(1000))),
        "report": lambda: ev.write_text_atomic(str(path), "<html>" + "x" * 5000),
    }[what]
    path.write_bytes(b"the previous complete file")
    full_disk(100)
    with pytest.raises(te.TinyPhysicsError) as raised:
        write()
    message = str(raised.value)
    assert message.startswith(f"{path}: writing it failed (No space left on device)") and "\n" not in message
    assert "the previous file is untouched" in message and "free some disk space" in message
    assert path.read_bytes() == b"the previous complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_a_full_disk_during_training_stops_with_one_line(tmp_path, model_path, real_data, full_disk, capsys):
    args = _small_run(tmp_path, model_path, real_data, total_timesteps=160)
    full_disk(10)
    with pytest.raises(SystemExit) as stopped:
        te.run_cli(lambda: pl.train(args))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "writing it failed (No space left on device)" in err[-1]
    assert not list((tmp_path / "runs").rglob("*.part"))


# --- 5: resuming after things moved ------------------------------------------------------------
@pytest.fixture
def finished_run(tmp_path, model_path, real_data):
    data = tmp_path / "train"
    te.synthesize_segments(8, seed=3, out_dir=data)
    args = _small_run(tmp_path, model_path, real_data, synthetic_train=0, data_path=str(data), total_timesteps=160)
    return pl.train(args), data


def test_a_moved_run_folder_resumes_where_it_now_is(finished_run, tmp_path):
    run_dir, _ = finished_run
    moved = tmp_path / "elsewhere" / "my-run"
    moved.parent.mkdir()
    shutil.move(run_dir, moved)
    resumed = pl.train(pl.Args(resume=str(moved / "checkpoints" / "checkpoint_80.pt"), progress=False))
    assert resumed == moved and (moved / "final_model.pt").is_file() and not run_dir.exists()


def test_a_checkpoint_outside_its_run_folder_is_refused(finished_run, tmp_path):
    run_dir, _ = finished_run
    loose = tmp_path / "loose.pt"
    shutil.copy(run_dir / "checkpoints" / "checkpoint_80.pt", loose)
    with pytest.raises(te.TinyPhysicsError, match="not inside a run folder's checkpoints/"):
        pl.train(pl.Args(resume=str(loose), progress=False))


def test_resuming_without_the_training_segments_names_what_is_missing(finished_run):
    run_dir, data = finished_run
    (data / "00005.csv").unlink()
    with pytest.raises(te.TinyPhysicsError) as raised:
        pl.train(pl.Args(resume=str(run_dir / "checkpoints" / "checkpoint_80.pt"), progress=False))
    message = str(raised.value)
    assert "1 of its 8 training segments are missing from --data-path" in message and "(first: 00005)" in message
    assert "start a new run" in message and "\n" not in message


# --- 6: file modes -----------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_usual_permissions(tmp_path, model_path, real_data, umask, mode):
    previous = os.umask(umask)
    try:
        run_dir = pl.train(_small_run(tmp_path, model_path, real_data, total_timesteps=80))
        report = tmp_path / "report.html"
        ev.write_text_atomic(str(report), "<html></html>")
    finally:
        os.umask(previous)
    files = [run_dir / "final_model.pt", run_dir / "best_model.pt", run_dir / "training_stats.npz",
             run_dir / "checkpoints" / "checkpoint_80.pt", report]
    for f in files:
        assert f.stat().st_mode & 0o777 == mode, f


# --- 7: Gymnasium bounds ----------------------------------------------------------------------
def test_check_env_passes_without_warnings(model, real_segments):
    env = te.TinyPhysicsEnv(segments=real_segments, model=model)
    space = env.observation_space
    assert np.isfinite(space.low).all() and np.isfinite(space.high).all()
    parts = te.obs_slices()
    assert (space.low[parts["past_actions"]] == -2).all() and (space.high[parts["past_actions"]] == 2).all()
    assert space.high[parts["roll_lataccel"]][0] == np.float32(te.ACC_G)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "infinity" in m or "bound" in m or "not within" in m], messages
    # The one recommendation left: the action is the official steer command, in its own range [-2, 2].
    assert all("symmetric and normalized space" in m for m in messages), messages
    env.reset(seed=0, options={"segment": 4})
    done = False
    while not done:  # every observation of a whole episode lies inside the declared bounds
        obs, _, done, _, _ = env.step(env.action_space.sample())
        assert space.contains(obs), np.flatnonzero((obs < space.low) | (obs > space.high))


def test_bounds_hold_for_targets_beyond_the_tokenizer_range(model, real_segments):
    """A log whose target exceeds +-5 m/s^2: the simulated acceleration starts there and moves back inside
    at most 0.5 a step, and the bounds still contain it."""
    wild = dataclasses.replace(real_segments.subset([0, 1]))
    wild.target_lataccel = wild.target_lataccel * 4.0
    env = te.TinyPhysicsVectorEnv(2, segments=wild, model=model)
    obs, _ = env.reset(seed=1)
    space = env.single_observation_space
    while True:
        assert all(space.contains(o) for o in obs)
        obs, _, terminated, _, _ = env.step(np.full((2, 1), 2.0))
        if terminated.all():
            break
