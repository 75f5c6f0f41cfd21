"""The comma.ai Controls Challenge v2 simulator ("tinyphysics"), batched, and its Gymnasium environments.

This module is the project's one home of simulator facts: constants, tokenizer, asset and
segment loading, the batched simulator that reproduces the official `tinyphysics.py` scores
to the last digit, official-interface controllers, costs, the Gymnasium environments and what a
policy reads from their observations (the normalization, the pid_ff teacher, path curvatures).
The behaviour follows SPEC.md of the project's assets; the order of floating-point operations
is the official program's wherever it decides a sampled token or a cost.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import traceback
import urllib.error
import urllib.request
import zipfile
from collections import namedtuple
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

# --- Simulator constants (SPEC.md "Constants") ------------------------------------------------
DT = 0.1
CONTEXT_LENGTH = 20
CONTROL_START_IDX = 100
COST_END_IDX = 500
COST_STEPS = COST_END_IDX - CONTROL_START_IDX
VOCAB_SIZE = 1024
LATACCEL_RANGE = (-5.0, 5.0)
STEER_RANGE = (-2.0, 2.0)
MAX_ACC_DELTA = 0.5
TEMPERATURE = 0.8
LAT_ACCEL_COST_MULTIPLIER = 50.0
ACC_G = 9.81
FUTURE_PLAN_STEPS = 50  # the plan holds rows t+1 .. t+49
FUTURE_LEN = FUTURE_PLAN_STEPS - 1
# The rollout stops after step 499, so no row past 548 is ever read.
ROWS_USED = COST_END_IDX + FUTURE_LEN
NUM_EVAL_SEGMENTS = 5000  # the official evaluation scores the first 5,000 segments in sorted order

# --- Assets -----------------------------------------------------------------------------------
MODEL_URL = "https://raw.githubusercontent.com/commaai/controls_challenge/master/models/tinyphysics.onnx"
MODEL_SHA256 = "5beca7f07a3e9b183b4aa0402c780ddbc985416fe50ca788017b09705b4d0705"
DATASET_URL = "https://huggingface.co/datasets/commaai/commaSteeringControl/resolve/main/data/SYNTHETIC_V0.zip"
CSV_COLUMNS = ("t", "vEgo", "aEgo", "roll", "targetLateralAcceleration", "steerCommand")
# The official command line names segments "data/NNNNN.csv"; the seed hashes that string.
OFFICIAL_PATH_FORMAT = "data/{}.csv"

State = namedtuple("State", ["roll_lataccel", "v_ego", "a_ego"])
FuturePlan = namedtuple("FuturePlan", ["lataccel", "roll_lataccel", "v_ego", "a_ego"])


class TinyPhysicsError(Exception):
    """A problem with the user's input; its message is one line naming the problem and the fix."""


class ControllerFailed(TinyPhysicsError):
    """A user's controller raised: the message names the controller, segment and step, and the
    controller's own exception is kept as the cause so that its traceback can be shown."""


def run_cli(main: Callable[[], Any]) -> Any:
    """Run a script's main, turning a TinyPhysicsError into a one-line message and exit code 2 (after
    the traceback of a failing controller, which is the user's own code)."""
    try:
        return main()
    except TinyPhysicsError as e:
        if isinstance(e, ControllerFailed) and e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# --- Tokenizer --------------------------------------------------------------------------------
BINS = np.linspace(LATACCEL_RANGE[0], LATACCEL_RANGE[1], VOCAB_SIZE)


def encode(lataccel: np.ndarray) -> np.ndarray:
    """Token of each lateral acceleration: the i with bins[i-1] < x <= bins[i], after clipping."""
    return np.digitize(np.clip(lataccel, *LATACCEL_RANGE), BINS, right=True)


def decode(token: np.ndarray) -> np.ndarray:
    return BINS[token]


# --- Finding the model and the data -----------------------------------------------------------
def cache_dir() -> Path:
    """Where downloads and segment caches live: $TINYPHYSICS_CACHE, else the user cache folder."""
    if os.environ.get("TINYPHYSICS_CACHE"):
        return Path(os.environ["TINYPHYSICS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tinyphysics"


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to read it would
    leave a moment in which another thread's new files get no umask at all)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """write(file) into a temporary file beside path, then rename it over path: a file that is there is
    whole; on any failure nothing is left behind, and the file that was there before is untouched. The
    file gets the permissions open() would give (0666 less the umask), not the temporary file's 0600.
    A full disk or another write error is a TinyPhysicsError naming the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as e:
        raise TinyPhysicsError(f"{path}: cannot be written ({e.strerror}); check the folder's permissions") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp_name, path)
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:  # not the disk's fault (a download's network error, say)
            raise
        kept = "the previous file is untouched" if path.exists() else "nothing was written"
        fix = "free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the disk"
        raise TinyPhysicsError(f"{path}: writing it failed ({e.strerror}); {kept}; {fix} and run again") from None
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def download(url: str, dest: Path, sha256: str | None = None) -> Path:
    """Fetch url into dest with a progress bar; dest appears whole and verified, or not at all."""

    def fetch(f) -> None:
        digest, size = hashlib.sha256(), 0
        with urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        if total and size != total:
            raise TinyPhysicsError(f"download of {url} stopped at {size} of {total} bytes; run again")
        if sha256 and digest.hexdigest() != sha256:
            raise TinyPhysicsError(f"{url} has sha256 {digest.hexdigest()}, expected {sha256}; check the address")

    try:
        write_atomic(dest, fetch)
    except (urllib.error.URLError, OSError) as e:
        raise TinyPhysicsError(f"could not download {url} ({e}); pass local files with "
                               "--sim-model-path / --data-path instead") from None
    return dest


def _neighbour_checkout() -> Path:
    """A controls_challenge checkout around this project: its models/ and data/ sit one folder up."""
    return Path(__file__).resolve().parent.parent


def resolve_model_path(flag: str | None = None) -> Path:
    """--sim-model-path, else $TINYPHYSICS_MODEL, else ../models/tinyphysics.onnx, else a download
    into the cache ($TINYPHYSICS_MODEL_URL overrides the official address, the hash is checked)."""
    for source, value in (("--sim-model-path", flag), ("TINYPHYSICS_MODEL", os.environ.get("TINYPHYSICS_MODEL"))):
        if value:
            if not Path(value).is_file():
                raise TinyPhysicsError(f"{source}={value}: no such file; point it at tinyphysics.onnx")
            return Path(value)
    neighbour = _neighbour_checkout() / "models" / "tinyphysics.onnx"
    if neighbour.is_file():
        return neighbour
    cached = cache_dir() / "models" / "tinyphysics.onnx"
    if not cached.is_file():
        print(f"tinyphysics model not found locally; downloading it to {cached}", file=sys.stderr)
        url = os.environ.get("TINYPHYSICS_MODEL_URL", MODEL_URL)
        download(url, cached, sha256=os.environ.get("TINYPHYSICS_MODEL_SHA256", MODEL_SHA256))
    return cached


def resolve_data_path(flag: str | None = None) -> Path:
    """--data-path, else $TINYPHYSICS_DATA, else ../data, else the official dataset zip downloaded
    and unpacked into the cache ($TINYPHYSICS_DATA_URL overrides the official address)."""
    for source, value in (("--data-path", flag), ("TINYPHYSICS_DATA", os.environ.get("TINYPHYSICS_DATA"))):
        if value:
            if not Path(value).exists():
                raise TinyPhysicsError(f"{source}={value}: no such file or folder; point it at the segment CSVs")
            return Path(value)
    neighbour = _neighbour_checkout() / "data"
    if neighbour.is_dir() and any(neighbour.glob("*.csv")):
        return neighbour
    cached = cache_dir() / "data"
    if not cached.is_dir():
        print(f"tinyphysics data not found locally; downloading it to {cached}", file=sys.stderr)
        fetch_dataset(os.environ.get("TINYPHYSICS_DATA_URL", DATASET_URL), cached)
    return cached


def fetch_dataset(url: str, dest: Path) -> Path:
    """Download the dataset zip and unpack its CSVs flat into dest; dest appears complete or not at all."""
    zip_path = download(url, dest.parent / "dataset.zip")
    unpack = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part"))
    try:
        try:
            with zipfile.ZipFile(zip_path) as z:
                members = [m for m in z.infolist() if m.filename.endswith(".csv") and not m.is_dir()]
                if not members:
                    raise TinyPhysicsError(f"{url} holds no CSV files; check TINYPHYSICS_DATA_URL")
                for m in tqdm(members, desc="unpacking", unit="file"):
                    (unpack / Path(m.filename).name).write_bytes(z.read(m))
        except zipfile.BadZipFile:
            raise TinyPhysicsError(f"{url} is not a valid zip file; check the address or run again") from None
        os.replace(unpack, dest)
    finally:
        shutil.rmtree(unpack, ignore_errors=True)
        zip_path.unlink(missing_ok=True)
    return dest


# --- Segments ---------------------------------------------------------------------------------
@dataclass
class Segments:
    """Segments as arrays of shape (N, ROWS_USED), rows past a segment's end repeating its last row.

    steer_command is already in the simulator's sign (the log's steerCommand negated) and
    roll_lataccel is sin(roll) * g, as the official program reads them.
    """

    names: list[str]
    lengths: np.ndarray
    roll_lataccel: np.ndarray
    v_ego: np.ndarray
    a_ego: np.ndarray
    target_lataccel: np.ndarray
    steer_command: np.ndarray

    FIELDS = ("roll_lataccel", "v_ego", "a_ego", "target_lataccel", "steer_command")

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Segments:
        idx = np.asarray(idx, dtype=np.int64)
        return Segments([self.names[i] for i in idx], self.lengths[idx],
                        *(np.ascontiguousarray(getattr(self, f)[idx]) for f in self.FIELDS))

    def first(self, n: int) -> Segments:
        """The first n segments (all of them when there are fewer)."""
        return self.subset(np.arange(min(n, len(self))))


def _read_segment_csv(path: Path) -> np.ndarray:
    """One segment as a (5, ROWS_USED) float64 array in the simulator's units, checked."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except Exception as e:  # pandas raises many kinds for a broken file
        raise TinyPhysicsError(f"{path}: cannot be read as CSV ({type(e).__name__}); replace the file") from None
    missing = [c for c in CSV_COLUMNS[1:] if c not in df.columns]
    if missing:
        raise TinyPhysicsError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(CSV_COLUMNS)}")
    n = len(df)
    if n < COST_END_IDX:
        raise TinyPhysicsError(f"{path}: {n} rows, the simulator needs at least {COST_END_IDX}; remove the file")
    used = min(n, ROWS_USED)
    out = np.empty((5, ROWS_USED))
    columns = {
        "roll_lataccel": np.sin(df["roll"].to_numpy(np.float64)) * ACC_G,
        "v_ego": df["vEgo"].to_numpy(np.float64),
        "a_ego": df["aEgo"].to_numpy(np.float64),
        "target_lataccel": df["targetLateralAcceleration"].to_numpy(np.float64),
        "steer_command": -df["steerCommand"].to_numpy(np.float64),
    }
    for i, (name, values) in enumerate(columns.items()):
        needed = CONTROL_START_IDX if name == "steer_command" else used
        bad = np.flatnonzero(~np.isfinite(values[:needed]))
        if bad.size:
            raise TinyPhysicsError(f"{path}: {name} is NaN or empty at row {bad[0]}, inside the rows the "
                                   "simulator uses; replace the file")
        out[i, :used] = values[:used]
        out[i, used:] = values[used - 1]
    return out


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _segment_cache_dir(data_dir: Path) -> Path:
    """In the user cache, keyed by the data folder's path, so that data folders stay untouched."""
    return cache_dir() / "segments" / hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]


def list_segment_files(data_path: Path) -> list[Path]:
    data_path = Path(data_path)
    files = [data_path] if data_path.is_file() else sorted(data_path.glob("*.csv"))
    if not files:
        raise TinyPhysicsError(f"{data_path}: no .csv segments there; pass --data-path pointing at the data folder")
    return files


def load_segments(data_path: str | Path, progress: bool = True) -> Segments:
    """Every CSV segment under data_path (a folder or one file), in sorted order.

    Parsing thousands of CSVs is slow, so a folder's arrays are cached as a memory-mapped .npy
    file in the user cache, rebuilt whenever a file's name, size or mtime changes.
    """
    files = list_segment_files(Path(data_path))
    names = [f.stem for f in files]
    if len(files) == 1:
        arrays = _read_segment_csv(files[0])[None]
        lengths = np.array([_count_rows(files[0])])
    else:
        cache = _segment_cache_dir(files[0].parent)
        key = _fingerprint(files)
        cached = _read_cache(cache, key, names)
        if cached is not None:
            arrays, lengths = cached
        else:
            arrays = np.stack([_read_segment_csv(f) for f in tqdm(files, desc="reading segments", unit="file",
                                                                   disable=not progress or len(files) < 200)])
            lengths = np.array([_count_rows(f) for f in files])
            _write_cache(cache, key, arrays, {"names": names, "lengths": lengths.tolist()})
    return Segments(names, lengths, *(arrays[:, i] for i in range(5)))


def _read_cache(cache: Path, key: str, names: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (arrays, lengths) if the cache is whole and describes exactly these files; None if there is
    none, and, with a one-line note, if it is damaged or does not match (the caller rebuilds it)."""
    array_file, meta_file = cache / f"segments-{key}.npy", cache / f"segments-{key}.json"
    if not (array_file.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        arrays = np.load(array_file, mmap_mode="r", allow_pickle=False)
        lengths = np.asarray(meta["lengths"], dtype=np.int64)
        problem = next((why for ok, why in (
            (arrays.dtype == np.float64, f"dtype {arrays.dtype}"),
            (arrays.shape == (len(names), 5, ROWS_USED), f"shape {arrays.shape}"),
            (meta["names"] == names, "other segment names"),
            (lengths.shape == (len(names),) and (lengths >= COST_END_IDX).all(), "bad segment lengths"),
        ) if not ok), None)
    except (OSError, ValueError, KeyError, TypeError) as e:  # truncated, overwritten, pickled, not JSON
        problem = f"{type(e).__name__}: {e}".splitlines()[0]
    if problem is None:
        return arrays, lengths
    print(f"note: segment cache {array_file} is damaged ({problem}); rebuilding it from the CSVs", file=sys.stderr)
    return None


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip()) - 1


def _write_cache(cache: Path, key: str, arrays: np.ndarray, meta: dict) -> None:
    """Replace any older cache with this one; a failure to write only costs the next reload time."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        ours = {f"segments-{key}.npy", f"segments-{key}.json"}
        for old in cache.glob("segments-*"):
            if old.name not in ours:  # another process may be writing this very cache: leave its files
                old.unlink(missing_ok=True)
        # The .json goes last: its presence says the .npy beside it is complete. Two processes building
        # the same cache at once each rename a whole file into place, so either pair is valid.
        write_atomic(cache / f"segments-{key}.npy", lambda f: np.save(f, arrays))
        write_atomic(cache / f"segments-{key}.json", lambda f: f.write(json.dumps(meta).encode()))
    except (OSError, TinyPhysicsError) as e:
        print(f"note: segment cache not written ({e}); the next run reads the CSVs again", file=sys.stderr)


def split_segments(n: int, eval_count: int = NUM_EVAL_SEGMENTS, verbose: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices by sorted order: eval is the first eval_count (the official evaluation
    set), train everything after. With no segment left for training, the first half is eval and
    the second half train, and that choice is printed."""
    if n > eval_count:
        return np.arange(eval_count, n), np.arange(eval_count)
    if n < 2:
        raise TinyPhysicsError(f"only {n} segment(s): need two or more to split into train and eval; "
                               "pass a separate --eval-data-path")
    half = (n + 1) // 2
    if verbose:
        print(f"note: only {n} segments (the official eval set alone is {eval_count}): evaluating on the "
              f"first {half}, training on the other {n - half}", file=sys.stderr)
    return np.arange(half, n), np.arange(half)


# --- Synthetic segments -----------------------------------------------------------------------
STANDSTILL_FADE_SPEED = 5.0  # m/s; see standstill_fade
# Written into each cached folder of synthetic segments; a folder of another version is made again.
# 2: the lateral acceleration fades out towards standstill (version 1, before it: no marker).
SYNTHETIC_VERSION = 2


def steer_gain(v_ego: np.ndarray) -> np.ndarray:
    """Lateral acceleration per unit steer in the synthetic segments, rising with speed as in the real
    logs (about 0.6 at standstill to 1.8 at highway speed)."""
    return 0.6 + 1.2 * np.clip(v_ego / 35.0, 0.0, 1.0)


def standstill_fade(v_ego: np.ndarray) -> np.ndarray:
    """Share of a synthetic segment's lateral acceleration kept at each speed: none at standstill, all from
    STANDSTILL_FADE_SPEED up. Lateral acceleration is speed times yaw rate, and the real logs' target is 0
    wherever the car stands; without the fade a standing car was asked to corner, which no steer can do
    (such a segment cost every controller 250-480, 1-2 points of a 200-segment mean on its own)."""
    return np.clip(v_ego / STANDSTILL_FADE_SPEED, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, n: int, tau_steps: float, order: int = 2) -> np.ndarray:
    """Zero-mean unit-variance noise low-passed `order` times with time constant tau_steps."""
    alpha = 1.0 / tau_steps
    x = rng.standard_normal(n + 200)
    for _ in range(order):
        y = np.empty_like(x)
        acc = 0.0
        for i, v in enumerate(x):
            acc += alpha * (v - acc)
            y[i] = acc
        x = y
    x = x[200:]
    return (x - x.mean()) / (x.std() + 1e-12)


def synthesize_segments(n: int, seed: int, out_dir: str | Path) -> list[Path]:
    """Write n official-format segment CSVs (00000.csv ...) with the real dataset's statistics.

    Speeds 0-43 m/s (mean about 23, sd about 9), smooth accelerations, road roll within about
    +-0.17 rad, smooth target lateral acceleration with sd about 0.46 m/s^2 overall (fading out towards
    standstill, see `standstill_fade`), and a logged steer for the first 100 rows consistent with the
    target through a speed-dependent gain.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        rows = int(rng.choice([599, 600]))
        v0 = float(np.clip(rng.normal(23.4, 9.2), 0.5, 42.0))
        a_ego = rng.lognormal(np.log(0.3), 0.6) * _smooth_noise(rng, rows, rng.uniform(10, 40))
        v_ego = np.clip(v0 + np.cumsum(a_ego) * DT, 0.0, 43.0)
        a_ego = np.where((v_ego <= 0.0) | (v_ego >= 43.0), 0.0, a_ego)
        roll = np.clip(rng.normal(0.01, 0.03) + rng.lognormal(np.log(0.01), 0.6) * _smooth_noise(rng, rows, 30.0),
                       -0.17, 0.17)
        # Lateral acceleration is v^2 * curvature: small at walking pace. Larger swings come slower,
        # which keeps the per-step change within what the real logs show.
        amplitude = min(rng.lognormal(np.log(0.3), 0.6), 1.0) * np.clip(v_ego.mean() / 15.0, 0.2, 1.0)
        tau = rng.uniform(5, 20) * max(1.0, amplitude / 0.3)
        target = np.clip(amplitude * _smooth_noise(rng, rows, tau) + rng.normal(0.0, 0.1), -4.0, 4.0)
        target = target * standstill_fade(v_ego)
        roll_lataccel = np.sin(roll) * ACC_G
        steer = (target - roll_lataccel) / steer_gain(v_ego) + rng.normal(0.0, 0.005, rows)
        steer_command = np.full(rows, np.nan)
        steer_command[:CONTROL_START_IDX] = -steer[:CONTROL_START_IDX]
        path = out_dir / f"{i:05d}.csv"
        table = np.column_stack([np.arange(rows) * DT, v_ego, a_ego, roll, target, steer_command])
        with open(path, "w") as f:
            f.write(",".join(CSV_COLUMNS) + "\n")
            for row in table:
                f.write(",".join("" if np.isnan(x) else repr(float(x)) for x in row) + "\n")
        paths.append(path)
    return paths


def cached_synthetic(n: int, seed: int, kind: str = "") -> Path:
    """The cache's folder of `synthesize_segments(n, seed)`, written once. The segments are made in a
    private folder and renamed into place whole, so that two runs started side by side never read the
    other's half-written files (the loser of the rename discards its copy: both are the same). A folder
    made by another SYNTHETIC_VERSION of the generator is made again."""
    folder = cache_dir() / "synthetic" / f"{kind}n{n}-seed{seed}"
    marker = "SYNTHETIC_VERSION"

    def whole() -> bool:
        version = folder / marker
        return (len(list(folder.glob("*.csv"))) == n and version.is_file()
                and version.read_text().strip() == str(SYNTHETIC_VERSION))

    if whole():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        synthesize_segments(n, seed, private)
        (private / marker).write_text(f"{SYNTHETIC_VERSION}\n")
        if folder.exists() and not whole():  # left by an interrupted or an older generator's write
            shutil.rmtree(folder, ignore_errors=True)
        private.rename(folder)
    except OSError:
        if not whole():  # not another run's finished copy: a real failure
            raise
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return folder


# --- The model --------------------------------------------------------------------------------
class TinyPhysicsModel:
    """The official ONNX model under ONNX Runtime: CPU, or CUDA when both CUDA and the provider exist.

    On the CPU a row's logits are bit-identical alone or inside a batch of any size, which is what
    lets one batched call per step reproduce the official one-segment-at-a-time scores exactly. It
    also lets a large batch be split across one single-threaded session per thread, run side by
    side: on 2 cores that beats one session with 2 intra-op threads by about a third. The graph is
    cut to compute the output head for the last position only (the only one sampled), which gives
    the same logits bit for bit and saves the head's work on the other 19.
    """

    MAX_ROWS_PER_CALL = 64  # measured: larger calls fall out of cache (batch 1024: 4,900 -> 7,500 steps/s)

    def __init__(self, path: str | Path, threads: int = 0, cuda: bool | None = None):
        import onnxruntime as ort

        if cuda is None:
            cuda = "CUDAExecutionProvider" in ort.get_available_providers() and _torch_cuda_available()
        self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        threads = threads or os.cpu_count() or 1
        self.path = Path(path)
        try:
            graph = _last_position_graph(self.path)
            self.sessions = [ort.InferenceSession(graph, self._options(), providers=self.providers)
                             for _ in range(1 if cuda else threads)]
        except Exception as e:  # onnx and onnxruntime raise their own exception types for a bad file
            raise TinyPhysicsError(f"{path}: not a loadable tinyphysics ONNX model ({type(e).__name__}); "
                                   "pass the official tinyphysics.onnx with --sim-model-path") from None
        self._full_session = None
        self._pool = None
        if len(self.sessions) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(len(self.sessions) - 1)

    @staticmethod
    def _options():
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return options

    def full_logits(self, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Logits of all 20 positions from the unmodified graph (for the literal reference loop)."""
        if self._full_session is None:
            import onnxruntime as ort

            self._full_session = ort.InferenceSession(str(self.path), self._options(), providers=self.providers)
        return self._full_session.run(None, {"states": states, "tokens": tokens})[0]

    def last_logits(self, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Logits (float32, [B, 1024]) of the last context position for states [B,20,4] and tokens [B,20]."""
        n = len(states)
        # Every session gets work as soon as there is a row for it (measured: splitting pays from batch 4
        # on 2 cores), and no call is larger than MAX_ROWS_PER_CALL.
        chunks = max(min(len(self.sessions), n), -(-n // self.MAX_ROWS_PER_CALL))
        if chunks == 1:
            return self._run(self.sessions[0], states, tokens)
        bounds = np.linspace(0, n, chunks + 1).astype(int)
        pieces = [(states[lo:hi], tokens[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
        per_session = [pieces[i::len(self.sessions)] for i in range(len(self.sessions))]

        def work(session, mine):
            return [self._run(session, *piece) for piece in mine]

        # onnxruntime releases the GIL while it runs, so the sessions really run in parallel.
        futures = [self._pool.submit(work, session, mine) for session, mine in zip(self.sessions[1:], per_session[1:])
                   if mine]
        results = [work(self.sessions[0], per_session[0])] + [f.result() for f in futures]
        ordered = [results[i % len(self.sessions)][i // len(self.sessions)] for i in range(chunks)]
        return np.concatenate(ordered)

    @staticmethod
    def _run(session, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return session.run(None, {"states": states, "tokens": tokens})[0][:, -1]

    def sample(self, states: np.ndarray, tokens: np.ndarray, uniforms: np.ndarray,
               with_probs: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Sampled next tokens [B] (and the probabilities [B, 1024] if asked) for float32 states
        [B,20,4], int64 tokens [B,20] and one uniform in [0, 1) per row."""
        probs = softmax_probs(self.last_logits(states, tokens))
        return sample_tokens(probs, uniforms), (probs if with_probs else None)

    @staticmethod
    def uniform_stream(seed: int | None) -> UniformStream:
        return UniformStream(seed)


def _last_position_graph(path: Path) -> bytes:
    """The model's graph with a Slice of the last position inserted before its final MatMul (the output head)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    head = graph.node[-1]
    if head.op_type != "MatMul" or list(head.output) != ["output"]:
        raise ValueError("the graph does not end in the output head MatMul")
    graph.initializer.extend(helper.make_tensor(name, TensorProto.INT64, [1], [value])
                             for name, value in (("last_pos_start", -1), ("last_pos_end", 2**62), ("last_pos_axis", 1)))
    graph.node.insert(len(graph.node) - 1, helper.make_node(
        "Slice", [head.input[0], "last_pos_start", "last_pos_end", "last_pos_axis"], ["last_pos_hidden"]))
    head.input[0] = "last_pos_hidden"
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    return model.SerializeToString()


class UniformStream:
    """Training-mode uniforms on the host: numpy's PCG64 (not the official per-segment streams)."""

    def __init__(self, seed: int | None):
        self.generator = np.random.default_rng(seed)

    def random(self, n: int, repeat: int = 1) -> np.ndarray:
        """n uniforms, each repeated `repeat` times in a row."""
        return np.repeat(self.generator.random(n), repeat)

    def get_state(self) -> Any:
        return self.generator.bit_generator.state

    def set_state(self, state: Any) -> None:
        self.generator.bit_generator.state = state


# --- The model in plain torch ------------------------------------------------------------------
SIM_BACKENDS = ("auto", "onnx", "torch")
SIM_PRECISIONS = ("fp32", "tf32", "bf16")
LAYER_NORM_EPS = 1e-5  # the graph's layer norms add this before the square root


def onnx_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The model's weights, read from the .onnx file and named by role.

    The exporter numbered the matrices of its MatMul nodes (onnx::MatMul_540 ...); each is named
    here after the node that uses it (h.0.attn.c_attn.weight, lm_head.weight for the output head),
    so no number of this particular export is written down. The other initializers keep their
    module names without the "transformer." prefix; the causal masks (attn.bias) are left out.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weights = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in arrays:
            role = "lm_head" if node.output[0] == "output" else node.output[0].strip("/").rsplit("/", 1)[0]
            weights[role.replace("/", ".") + ".weight"] = arrays[node.input[1]]
    for name, value in arrays.items():
        if name.startswith("transformer.") and not name.endswith("attn.bias"):
            weights[name.removeprefix("transformer.")] = value
    return {k: np.array(v, order="C") for k, v in weights.items()}  # writable copies, for torch


def attention_heads(path: str | Path) -> int:
    """Number of attention heads, from the scale 1/sqrt(head width) the graph multiplies scores by."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    scale = next(float(constants[n.input[1]]) for n in graph.node
                 if n.op_type == "Mul" and n.input[0].endswith("/attn/MatMul_output_0"))
    width = next(i.dims[1] for i in graph.initializer if i.name == "transformer.wp_embedding.weight")
    return width // round(scale**-2)


def gpt_last_logits(w: dict, states, tokens, heads: int, token_embedding=None):
    """The tinyphysics GPT in plain torch: logits [B, 1024] of the last of the 20 positions.

    Same operations as the graph: state projection (4 -> 64) next to the token embedding
    (1024 x 64), plus a position embedding; pre-norm blocks of causal self-attention and a
    tanh-GELU MLP; a final norm and the output head. The last block computes its query, its
    MLP and the head for the last position only: nothing after it reads the other 19. A `token_embedding`
    [B, 20, 64] replaces the tokens' embedding rows (a differentiable stand-in for pathwise gradients).
    """
    import torch
    import torch.nn.functional as F

    if token_embedding is None:
        token_embedding = w["wt2_embedding.weight"][tokens]
    x = torch.cat([states @ w["wt_embedding.weight"] + w["wt_embedding.bias"], token_embedding], -1)
    batch, length, width = x.shape
    x = x + w["wp_embedding.weight"][:length]
    layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("h."))
    for i in range(layers):
        last = i == layers - 1
        h = F.layer_norm(x, (width,), w[f"h.{i}.attn.layer_norm.weight"], w[f"h.{i}.attn.layer_norm.bias"],
                         LAYER_NORM_EPS)
        q, k, v = (h @ w[f"h.{i}.attn.c_attn.weight"]).split(width, -1)
        if last:
            q, x = q[:, -1:], x[:, -1:]
        q, k, v = (z.reshape(batch, -1, heads, width // heads).transpose(1, 2) for z in (q, k, v))
        # The last block's one query may see every position; the others see only earlier ones.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=not last)
        x = x + y.transpose(1, 2).reshape(batch, -1, width) @ w[f"h.{i}.attn.c_proj.weight"]
        h = F.layer_norm(x, (width,), w[f"h.{i}.mlp.layer_norm.weight"], w[f"h.{i}.mlp.layer_norm.bias"],
                         LAYER_NORM_EPS)
        x = x + F.gelu(h @ w[f"h.{i}.mlp.c_fc.weight"], approximate="tanh") @ w[f"h.{i}.mlp.c_proj.weight"]
    x = F.layer_norm(x[:, -1], (width,), w["layer_norm_f.weight"], w["layer_norm_f.bias"], LAYER_NORM_EPS)
    return x @ w["lm_head.weight"]


def torch_sample(logits, uniforms):
    """SPEC.md's sampling on the logits' device: temperature softmax in float32, then the first
    index whose float64 cumulative sum (normalised by its last element) exceeds the uniform."""
    import torch

    probs = torch.softmax(logits.float() / TEMPERATURE, dim=-1)
    return torch_inverse_cdf(probs, uniforms), probs


def torch_inverse_cdf(probs, uniforms):
    """`sample_tokens` in torch: the number of normalised float64 cumulative sums <= u."""
    import torch

    cdf = torch.cumsum(probs.double(), dim=-1)
    cdf = cdf / cdf[:, -1:]
    return torch.searchsorted(cdf, uniforms.double().reshape(-1, 1).contiguous(), right=True)[:, 0]


class TorchTinyPhysicsModel:
    """The official model ported to plain torch (`gpt_last_logits`), with sampling on its device.

    The weights come from the .onnx file itself. The logits equal ONNX Runtime's to about 1e-5,
    not bit for bit, so a sampled token can differ where a uniform falls within that distance of a
    bin edge; with the official uniforms the scores match the official ones (tested on every
    asset segment). Only the sampled tokens (and, if asked, the probabilities) leave the device.

    precision: fp32 (default, the one that is score-exact), tf32 (TF32 matmuls on CUDA; on CPU
    the same as fp32) or bf16 (autocast): both faster on GPUs and NOT score-exact.
    compile: torch.compile the model and sampler; cuda_graphs: compile with CUDA-graph capture
    of the whole per-step call (mode="reduce-overhead"), CUDA only.
    """

    def __init__(self, path: str | Path, device: str = "cpu", precision: str = "fp32", compile: bool = False,
                 cuda_graphs: bool = False):
        import torch

        if precision not in SIM_PRECISIONS:
            raise TinyPhysicsError(f"--sim-precision {precision}: use one of {', '.join(SIM_PRECISIONS)}")
        self.device = torch.device(device)
        if cuda_graphs and self.device.type != "cuda":
            raise TinyPhysicsError("--cuda-graphs needs a CUDA device: drop it, or run with --cuda on a GPU")
        self.path = Path(path)
        try:
            self.heads = attention_heads(self.path)
            self.weights = {k: torch.from_numpy(v).to(self.device) for k, v in onnx_weights(self.path).items()}
        except Exception as e:  # onnx raises its own exception types for a bad file
            raise TinyPhysicsError(f"{path}: not a loadable tinyphysics ONNX model ({type(e).__name__}); "
                                   "pass the official tinyphysics.onnx with --sim-model-path") from None
        self.precision = precision
        self._step = self._eager_step
        if compile or cuda_graphs:
            self._step = torch.compile(self._eager_step, mode="reduce-overhead" if cuda_graphs else None)

    def _set_matmul_precision(self) -> None:
        """TF32 is a process-wide switch: set before every call (outside any compiled code), so that an fp32
        model, such as the score-exact evaluation twin, never runs in the TF32 mode a tf32 model beside it
        asked for."""
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.precision == "tf32"

    def _logits(self, states, tokens):
        import torch

        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            return gpt_last_logits(self.weights, states, tokens, self.heads).float()

    def _eager_step(self, states, tokens, uniforms):
        return torch_sample(self._logits(states, tokens), uniforms)

    def _inputs(self, states: np.ndarray, tokens: np.ndarray):
        import torch

        return (torch.as_tensor(states, dtype=torch.float32).to(self.device, non_blocking=True),
                torch.as_tensor(tokens, dtype=torch.int64).to(self.device, non_blocking=True))

    def last_logits(self, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Logits (float32 numpy, [B, 1024]) of the last position, as `TinyPhysicsModel.last_logits`."""
        import torch

        self._set_matmul_precision()
        with torch.inference_mode():
            return self._logits(*self._inputs(states, tokens)).cpu().numpy()

    def sample(self, states: np.ndarray, tokens: np.ndarray, uniforms,
               with_probs: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """As `TinyPhysicsModel.sample`; `uniforms` may be a numpy array or a tensor on the device."""
        import torch

        self._set_matmul_precision()
        with torch.inference_mode():
            u = torch.as_tensor(uniforms).to(self.device)
            sampled, probs = self._step(*self._inputs(states, tokens), u)
            return sampled.cpu().numpy(), (probs.cpu().numpy() if with_probs else None)

    def uniform_stream(self, seed: int | None) -> TorchUniformStream:
        return TorchUniformStream(seed, self.device)


class TorchUniformStream:
    """Training-mode uniforms drawn on the device by a torch generator."""

    def __init__(self, seed: int | None, device):
        import torch

        self.generator = torch.Generator(device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def random(self, n: int, repeat: int = 1):
        import torch

        u = torch.rand(n, generator=self.generator, device=self.generator.device, dtype=torch.float64)
        return u.repeat_interleave(repeat) if repeat > 1 else u

    def get_state(self) -> Any:
        return self.generator.get_state()

    def set_state(self, state: Any) -> None:
        self.generator.set_state(state)


SimModel = TinyPhysicsModel | TorchTinyPhysicsModel  # either backend: last_logits, sample, uniform_stream


def default_sim_backend(device: str) -> str:
    """Measured (benchmark/sim_speed.py): ONNX Runtime is about twice the plain torch port on a CPU;
    on a GPU the torch port keeps the model and the sampling on the device."""
    return "torch" if str(device).startswith("cuda") else "onnx"


def load_sim_model(path: str | Path, backend: str = "auto", device: str = "cpu", threads: int = 0,
                   precision: str = "fp32", compile: bool = False, cuda_graphs: bool = False):
    """The simulator model of the chosen backend (auto: `default_sim_backend` of the device)."""
    if backend not in SIM_BACKENDS:
        raise TinyPhysicsError(f"--sim-backend {backend}: use one of {', '.join(SIM_BACKENDS)}")
    if backend == "auto":
        backend = default_sim_backend(device)
    if backend == "torch":
        return TorchTinyPhysicsModel(path, device=device, precision=precision, compile=compile,
                                     cuda_graphs=cuda_graphs)
    if precision != "fp32" or cuda_graphs:
        raise TinyPhysicsError("--sim-precision and --cuda-graphs apply to --sim-backend torch only")
    return TinyPhysicsModel(path, threads=threads, cuda=None if str(device).startswith("cuda") else False)


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def softmax_probs(logits: np.ndarray) -> np.ndarray:
    """Sampling probabilities in float32, with the official program's operations and their order."""
    x = logits / np.float32(TEMPERATURE)
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def sample_tokens(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """numpy's legacy choice(1024, p) per row, given its uniform draw: searchsorted(cdf, u, 'right')
    on the float64 cumulative sum normalised by its last element."""
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    cdf /= cdf[:, -1:]
    return np.sum(cdf <= uniforms[:, None], axis=-1)


def official_seed(name: str) -> int:
    """Seed the official program gives segment `name` (a file stem): md5 of its path string, mod 10^4."""
    return int(hashlib.md5(OFFICIAL_PATH_FORMAT.format(name).encode()).hexdigest(), 16) % 10**4


def official_uniforms(names: Sequence[str]) -> np.ndarray:
    """[B, 480]: the random numbers the official rollout draws at steps 20..499, one per step."""
    return np.stack([np.random.RandomState(official_seed(n)).random_sample(COST_END_IDX - CONTEXT_LENGTH)
                     for n in names])


# --- The batched simulator --------------------------------------------------------------------
class TinyPhysicsSim:
    """B segments stepped in lockstep with one model call per step (SPEC.md "One rollout").

    Histories are arrays over steps 0..499; `t` is the next step to run. With `official_rng`
    the random stream of each segment is the official one and scores are official-exact;
    otherwise a fast numpy Generator seeded with `seed` draws the uniforms, and the scores are
    NOT official-exact (the sampled noise differs), which is what training wants.

    A training-only mode, not official-exact: `noise_group=K` gives each run of K consecutive rows the
    same uniform at every step (common random numbers, for K rollouts of one segment).
    """

    def __init__(self, model: SimModel, official_rng: bool = True, seed: int | None = None,
                 expected_reward: bool = False, noise_group: int = 1):
        if official_rng and noise_group != 1:
            raise TinyPhysicsError("official scoring samples every segment's own stream: shared noise is for "
                                   "training only")
        self.model = model
        self.official_rng = official_rng
        self.seed(seed)
        self.expected_reward = expected_reward
        self.noise_group = noise_group

    def reset(self, segments: Segments) -> None:
        """Load a batch of segments and fill steps 0..19 from the data."""
        self.segments = segments
        self.data = {f: np.ascontiguousarray(getattr(segments, f), dtype=np.float64) for f in Segments.FIELDS}
        b = len(segments)
        self.target = self.data["target_lataccel"]
        self.actions = np.zeros((b, COST_END_IDX))
        self.current = np.zeros((b, COST_END_IDX))
        self.actions[:, :CONTEXT_LENGTH] = self.data["steer_command"][:, :CONTEXT_LENGTH]
        self.current[:, :CONTEXT_LENGTH] = self.target[:, :CONTEXT_LENGTH]
        self.uniforms = official_uniforms(segments.names) if self.official_rng else None
        # Mean and variance of each step's clipped prediction, for `expected_reward`.
        self.pred_mean = np.zeros((b, COST_END_IDX))
        self.pred_var = np.zeros((b, COST_END_IDX))
        self.t = CONTEXT_LENGTH

    @property
    def batch_size(self) -> int:
        return len(self.segments)

    def step(self, action: np.ndarray | None) -> None:
        """Run step t with this steer per segment (ignored before step 100, where the log's steer is used)."""
        t = self.t
        if t >= COST_END_IDX:
            raise RuntimeError("the rollout is over after step 499; call reset")
        if t < CONTROL_START_IDX:
            # The model's prediction is discarded before step 100; skipping it changes no score,
            # and indexing the uniforms by step keeps the random stream aligned.
            self.actions[:, t] = self.data["steer_command"][:, t]
            self.current[:, t] = self.target[:, t]
        else:
            self.actions[:, t] = np.clip(action, *STEER_RANGE)
            previous = self.current[:, t - 1]
            low, high = previous - MAX_ACC_DELTA, previous + MAX_ACC_DELTA
            sampled, probs = self._sample(t)
            if self.expected_reward:  # the step's moments come from its probs
                self.pred_mean[:, t], self.pred_var[:, t] = clipped_moments(probs, low, high)
            self.current[:, t] = np.clip(decode(sampled), low, high)
        self.t = t + 1

    def warm_up(self) -> None:
        """Run the logged steps up to step 100, where control starts."""
        while self.t < CONTROL_START_IDX:
            self.step(None)

    def _sample(self, t: int) -> tuple[np.ndarray, np.ndarray | None]:
        window = slice(t - CONTEXT_LENGTH + 1, t + 1)
        states = np.stack([self.actions[:, window], self.data["roll_lataccel"][:, window],
                           self.data["v_ego"][:, window], self.data["a_ego"][:, window]], axis=-1)
        tokens = encode(self.current[:, t - CONTEXT_LENGTH:t])
        if self.official_rng:
            uniforms = self.uniforms[:, t - CONTEXT_LENGTH]
        else:
            uniforms = self.rng.random(self.batch_size // self.noise_group, repeat=self.noise_group)
        return self.model.sample(states.astype(np.float32), tokens.astype(np.int64), uniforms,
                                 with_probs=self.expected_reward)

    def seed(self, seed: int | None) -> None:
        """Restart the training-mode random stream (on the model's device for the torch backend)."""
        self.rng = self.model.uniform_stream(seed)

    def step_reward(self, t: int) -> np.ndarray:
        """Minus step t's share of the official total cost (see `TinyPhysicsEnv`).

        With `expected_reward`, minus its expectation over the step's sampled prediction instead:
        (target - m)^2 + var and ((m - current_{t-1})^2 + var) / dt^2 for the prediction's mean m and
        variance var. Same expected return, without the sampling noise of the step itself."""
        lat_weight = LAT_ACCEL_COST_MULTIPLIER * 100.0 / COST_STEPS
        jerk_weight = 100.0 / (COST_STEPS - 1)
        if self.expected_reward:
            mean, var = self.pred_mean[:, t], self.pred_var[:, t]
            reward = -lat_weight * ((self.target[:, t] - mean) ** 2 + var)
            if t > CONTROL_START_IDX:
                reward -= jerk_weight * ((mean - self.current[:, t - 1]) ** 2 + var) / DT**2
            return reward
        reward = -lat_weight * (self.target[:, t] - self.current[:, t]) ** 2
        if t > CONTROL_START_IDX:
            reward -= jerk_weight * ((self.current[:, t] - self.current[:, t - 1]) / DT) ** 2
        return reward

    def costs(self) -> dict[str, np.ndarray]:
        """Official lataccel, jerk and total cost per segment over steps 100..499."""
        if self.t < COST_END_IDX:
            raise RuntimeError("costs need a rollout that reached step 499")
        return compute_costs(self.target[:, CONTROL_START_IDX:COST_END_IDX],
                             self.current[:, CONTROL_START_IDX:COST_END_IDX])


def clipped_moments(probs: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance per row of the decoded token clipped to [low, high], under probs [B, 1024]."""
    outcomes = np.clip(BINS, low[:, None], high[:, None])
    p = probs.astype(np.float64)
    mean = np.sum(p * outcomes, axis=1)
    return mean, np.maximum(np.sum(p * outcomes**2, axis=1) - mean**2, 0.0)


def compute_costs(target: np.ndarray, current: np.ndarray) -> dict[str, np.ndarray]:
    """Official costs of [B, 400] target and actual lateral accelerations, row by row as the official
    program sums them."""
    lataccel = np.array([np.mean((tg - cu) ** 2) * 100 for tg, cu in zip(target, current)])
    jerk = np.array([np.mean((np.diff(cu) / DT) ** 2) * 100 for cu in current])
    return {"lataccel_cost": lataccel, "jerk_cost": jerk, "total_cost": lataccel * LAT_ACCEL_COST_MULTIPLIER + jerk}


# --- Official-interface controllers ------------------------------------------------------------
class BaseController:
    """The official controller interface."""

    def update(self, target_lataccel, current_lataccel, state, future_plan):
        raise NotImplementedError


class PIDController(BaseController):
    """The official baseline PID."""

    def __init__(self, p: float = 0.195, i: float = 0.100, d: float = -0.053):
        self.p, self.i, self.d = p, i, d
        self.error_integral = 0.0
        self.prev_error = 0.0

    def update(self, target_lataccel, current_lataccel, state, future_plan):
        error = target_lataccel - current_lataccel
        self.error_integral += error
        error_diff = error - self.prev_error
        self.prev_error = error
        return self.p * error + self.i * self.error_integral + self.d * error_diff


class PIDFeedforwardController(PIDController):
    """The official PID plus a feedforward from the plan: kf times the mean target over the next
    `lookahead` rows, minus kr times the current roll. Gains picked on 128 synthetic segments (total
    cost there: PID 184.5, this 122.0). Works on one segment (lists, as the official program calls
    it) or on a batch (arrays, a row per segment)."""

    def __init__(self, kf: float = 0.4, kr: float = 0.6, lookahead: int = 6):
        super().__init__()
        self.kf, self.kr, self.lookahead = kf, kr, lookahead

    def update(self, target_lataccel, current_lataccel, state, future_plan):
        ahead = np.asarray(future_plan.lataccel, dtype=np.float64)[..., :self.lookahead]
        planned = ahead.mean(axis=-1) if ahead.shape[-1] else target_lataccel  # no plan left: the target
        error = target_lataccel - current_lataccel
        self.error_integral += error
        prev_error, self.prev_error = self.prev_error, error
        return pid_ff_steer(error, self.error_integral, prev_error, planned, np.asarray(state.roll_lataccel),
                            self.gains())

    def gains(self) -> dict[str, float]:
        return {"p": self.p, "i": self.i, "d": self.d, "kf": self.kf, "kr": self.kr}


def pid_ff_steer(error, error_integral, prev_error, planned, roll_lataccel, gains: dict[str, float]):
    """PIDFeedforwardController's steer from what it knows (numbers, numpy or torch arrays): the PID of the
    lateral-acceleration error, plus kf times the planned target, minus kr times the roll. The one copy of
    this arithmetic: the residual policy's teacher and its exported controller call it too. It uses nothing
    but its arguments, so the exporter can copy it as it is."""
    feedback = gains["p"] * error + gains["i"] * error_integral + gains["d"] * (error - prev_error)
    return feedback + gains["kf"] * planned - gains["kr"] * roll_lataccel


class ZeroController(BaseController):
    def update(self, target_lataccel, current_lataccel, state, future_plan):
        return 0.0


BUILTIN_CONTROLLERS = {"pid": PIDController, "pid_ff": PIDFeedforwardController, "zero": ZeroController}


def load_controller(name_or_file: str) -> type:
    """The controller class for a built-in name (pid, pid_ff, zero) or a .py file inside an official-style
    `controllers/` package, imported as the official program does: `controllers.<stem>` with the
    package's parent on sys.path, so that `from . import BaseController` works."""
    if name_or_file in BUILTIN_CONTROLLERS:
        return BUILTIN_CONTROLLERS[name_or_file]
    path = Path(name_or_file)
    if path.suffix != ".py" or not path.is_file():
        raise TinyPhysicsError(f"controller {name_or_file!r}: not {' or '.join(BUILTIN_CONTROLLERS)} and not an "
                               "existing .py file; pass a built-in name or controllers/<name>.py")
    package = path.resolve().parent
    if not (package / "__init__.py").is_file():
        raise TinyPhysicsError(f"{path}: its folder has no __init__.py; put the file in a controllers/ package "
                               "whose __init__.py defines BaseController")
    root = str(package.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module_name = f"{package.name}.{path.stem}"
    try:
        loaded = sys.modules.get(package.name)
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent != package:
            # Another package of the same name was imported first (e.g. a second controllers/ folder).
            for key in [k for k in sys.modules if k == package.name or k.startswith(package.name + ".")]:
                del sys.modules[key]
        module = importlib.import_module(module_name)
    except Exception as e:
        raise TinyPhysicsError(f"{path}: importing it as {module_name} failed ({type(e).__name__}: {e})") from None
    if not hasattr(module, "Controller"):
        raise TinyPhysicsError(f"{path}: defines no class named Controller; the official program needs one")
    return module.Controller


def controller_label(make_controller: Callable[[], Any]) -> str:
    """The file a controller class comes from (its name for the built-in ones), for error messages."""
    for name, cls in BUILTIN_CONTROLLERS.items():
        if make_controller is cls:
            return name
    module = sys.modules.get(getattr(make_controller, "__module__", ""))
    return getattr(module, "__file__", None) or repr(make_controller)


def checked_steer(value: Any, label: str, segment: str, t: int) -> float:
    """A controller's answer as a float, or a one-line error naming the controller, segment and step
    (the official program fails on these too, deep inside the model's sampling)."""
    if not isinstance(value, str | bytes):
        try:
            steer = float(value)
        except (TypeError, ValueError):
            steer = None
        if steer is not None and np.isfinite(steer):
            return steer
    raise TinyPhysicsError(f"{label}: update() returned {value!r} at step {t} of segment {segment}; a controller "
                           "must return a finite number")


def rollout_controllers(sim: TinyPhysicsSim, segments: Segments, make_controller: Callable[[], Any],
                        label: str | None = None) -> dict:
    """Score one controller instance per segment, called at every step from step 20 with the
    official arguments; returns the official costs per segment. A controller that raises or returns
    something other than a finite number (from step 100, where its answer is used) is a
    TinyPhysicsError naming `label` (default: its file), the segment and the step."""
    label = label or controller_label(make_controller)
    sim.reset(segments)
    controllers = [make_controller() for _ in range(len(segments))]
    columns = {f: getattr(segments, f).tolist() for f in ("roll_lataccel", "v_ego", "a_ego", "target_lataccel")}
    ends = [min(n, ROWS_USED) for n in segments.lengths.tolist()]
    for t in range(CONTEXT_LENGTH, COST_END_IDX):
        actions = np.zeros(len(controllers))
        current = sim.current[:, t - 1].tolist()
        for i, controller in enumerate(controllers):
            roll, v, a, target = (columns[f][i] for f in ("roll_lataccel", "v_ego", "a_ego", "target_lataccel"))
            future = slice(t + 1, min(t + FUTURE_PLAN_STEPS, ends[i]))
            try:
                value = controller.update(target[t], current[i], State(roll[t], v[t], a[t]),
                                          FuturePlan(target[future], roll[future], v[future], a[future]))
            except Exception as e:
                raise ControllerFailed(f"{label}: update() raised {type(e).__name__} at step {t} of segment "
                                       f"{segments.names[i]} (its traceback is above)") from e
            if t >= CONTROL_START_IDX:  # before, the simulator uses the logged steer, as the official one does
                actions[i] = checked_steer(value, label, segments.names[i], t)
        sim.step(actions)
    return sim.costs()


def rollout_policy(sim: TinyPhysicsSim, segments: Segments, act: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Score a policy that maps a batch of float64 observations (see `observe`) to steer, from step 100."""
    sim.reset(segments)
    sim.warm_up()
    while sim.t < COST_END_IDX:
        steer = act(observe(sim, np.float64))
        bad = np.flatnonzero(~np.isfinite(steer))
        if bad.size:
            raise TinyPhysicsError(f"the policy's steer is {steer[bad[0]]} at step {sim.t} of segment "
                                   f"{segments.names[bad[0]]}; its weights are not finite, use an earlier checkpoint")
        sim.step(steer)
    return sim.costs()


def score_in_batches(segments: Segments, batch_size: int, rollout: Callable[[Segments], dict],
                     progress: bool = False, desc: str = "scoring") -> dict[str, np.ndarray]:
    """Run `rollout` over consecutive batches of segments and join the per-segment costs."""
    parts = []
    with tqdm(total=len(segments), desc=desc, unit="seg", disable=not progress) as bar:
        for lo in range(0, len(segments), batch_size):
            parts.append(rollout(segments.subset(range(lo, min(lo + batch_size, len(segments))))))
            bar.update(min(batch_size, len(segments) - lo))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def reference_rollout(model: TinyPhysicsModel, segments: Segments, index: int, controller: Any) -> dict:
    """SPEC.md's rollout of one segment written out literally, as the official program runs it:
    Python lists, the model at every step from 20 to the last row, softmax over all 20 positions
    and numpy's legacy `choice`. Slow on purpose of faithfulness; the baseline that benchmarks
    compare with and an independent check of `TinyPhysicsSim` in the tests."""
    rng = np.random.RandomState(official_seed(segments.names[index]))
    n = int(segments.lengths[index])
    roll, v, a, target, steer = (getattr(segments, f)[index].tolist() for f in Segments.FIELDS)
    roll, v, a, target = (c + [c[-1]] * (n - len(c)) for c in (roll, v, a, target))  # rows past ROWS_USED
    states = [(roll[i], v[i], a[i]) for i in range(CONTEXT_LENGTH)]
    actions, currents = steer[:CONTEXT_LENGTH], target[:CONTEXT_LENGTH]
    current = currents[-1]
    for t in range(CONTEXT_LENGTH, n):
        states.append((roll[t], v[t], a[t]))
        end = t + FUTURE_PLAN_STEPS
        plan = FuturePlan(target[t + 1:end], roll[t + 1:end], v[t + 1:end], a[t + 1:end])
        action = controller.update(target[t], current, State(*states[t]), plan)
        if t < CONTROL_START_IDX:
            action = steer[t]
        actions.append(np.clip(action, *STEER_RANGE))
        model_states = np.column_stack([actions[-CONTEXT_LENGTH:], states[-CONTEXT_LENGTH:]])
        tokens = encode(np.array(currents[-CONTEXT_LENGTH:]))
        logits = model.full_logits(model_states[None].astype(np.float32), tokens[None].astype(np.int64))
        probs = softmax_probs(logits)
        pred = np.clip(decode(rng.choice(VOCAB_SIZE, p=probs[0, -1])), current - MAX_ACC_DELTA, current + MAX_ACC_DELTA)
        current = pred if t >= CONTROL_START_IDX else target[t]
        currents.append(current)
    window = slice(CONTROL_START_IDX, COST_END_IDX)
    return {k: v[0] for k, v in compute_costs(np.array([target[window]]), np.array([currents[window]])).items()}


# --- Observations and the Gymnasium environments -----------------------------------------------
OBS_HISTORY = CONTEXT_LENGTH
OBS_LAYOUT = (
    ("target_lataccel", 1), ("current_lataccel", 1), ("roll_lataccel", 1), ("v_ego", 1), ("a_ego", 1),
    ("past_actions", OBS_HISTORY), ("past_lataccel", OBS_HISTORY),
    ("future_lataccel", FUTURE_LEN), ("future_roll_lataccel", FUTURE_LEN),
    ("future_v_ego", FUTURE_LEN), ("future_a_ego", FUTURE_LEN), ("error_integral", 1), ("prev_error", 1),
)
OBS_DIM = sum(n for _, n in OBS_LAYOUT)
# Bounds (`observation_space`): steer commands lie in STEER_RANGE (the simulator clips them; 0 before step
# 100) and roll_lataccel = g * sin(roll) in [-g, g], whatever the data. The log's own columns (target,
# v_ego, a_ego) have no documented range, so an environment's bounds for them are its segment pool's
# minimum and maximum. The simulated lateral acceleration starts from the log's target and then moves
# at most MAX_ACC_DELTA a step towards LATACCEL_RANGE, so it stays within L = max(5, largest |target|);
# an error is at most |target| + L, and the integral sums at most one error per controller call.


def observation_space(pool: Segments) -> gym.spaces.Box:
    """The finite bounds of every observation of segments from `pool` (see the comment above)."""
    data = {f: np.asarray(getattr(pool, f)) for f in ("target_lataccel", "v_ego", "a_ego")}
    span = {f: (float(x.min()), float(x.max())) for f, x in data.items()}
    target = float(np.abs(data["target_lataccel"]).max())
    lataccel = max(LATACCEL_RANGE[1], target)
    error = target + lataccel
    known = {"roll_lataccel": (-ACC_G, ACC_G), "past_actions": STEER_RANGE,
             "current_lataccel": (-lataccel, lataccel), "past_lataccel": (-lataccel, lataccel),
             "error_integral": (-error * (COST_END_IDX - CONTEXT_LENGTH), error * (COST_END_IDX - CONTEXT_LENGTH)),
             "prev_error": (-error, error)}
    known.update({"future_roll_lataccel": known["roll_lataccel"], "future_lataccel": span["target_lataccel"],
                  "future_v_ego": span["v_ego"], "future_a_ego": span["a_ego"]})
    low, high = np.empty(OBS_DIM, np.float32), np.empty(OBS_DIM, np.float32)
    for name, part in obs_slices().items():
        low[part], high[part] = known.get(name) or span[name]
    return gym.spaces.Box(low, high, (OBS_DIM,), np.float32)


def obs_slices() -> dict[str, slice]:
    """Where each named part of the observation vector sits."""
    out, start = {}, 0
    for name, n in OBS_LAYOUT:
        out[name] = slice(start, start + n)
        start += n
    return out


def observe(sim: TinyPhysicsSim, dtype=np.float32) -> np.ndarray:
    """[B, OBS_DIM] observation before the action of step t (layout in OBS_LAYOUT), float32 for the
    Gymnasium spaces; scoring asks for float64 so that a policy can recompute a PID from it exactly.

    It holds exactly what an official-interface controller can know, so that a policy on it can be
    exported as one: target_lataccel, roll_lataccel, v_ego, a_ego of step t; current_lataccel, the
    latest (step t-1); past_actions and past_lataccel of steps t-20..t-1 (the last entry is the
    previous steer), where steer before step 100 reads 0, since the simulator replaced the
    controller's answers there with the log's, which a controller never sees; the future rows
    t+1..t+49, repeating the segment's last row where it ends sooner; and error_integral, the sum of
    target - current lateral acceleration over every controller call so far (steps 20..t, as a PID
    accumulates it: target of step k minus the latest current at k), summed in step order; and
    prev_error, that error at the previous call (a PID's derivative term needs it).
    """
    t = sim.t
    d = sim.data
    past_actions = sim.actions[:, t - OBS_HISTORY:t].copy()
    past_actions[:, :max(0, CONTROL_START_IDX - (t - OBS_HISTORY))] = 0.0
    now = [d["target_lataccel"][:, t:t + 1], sim.current[:, t - 1:t]] + \
          [d[f][:, t:t + 1] for f in ("roll_lataccel", "v_ego", "a_ego")]
    future = [d[f][:, t + 1:t + FUTURE_PLAN_STEPS] for f in ("target_lataccel", "roll_lataccel", "v_ego", "a_ego")]
    if t + FUTURE_PLAN_STEPS > ROWS_USED:  # the terminal observation (step 500) reaches past the rows kept
        future = [np.pad(x, ((0, 0), (0, FUTURE_LEN - x.shape[1])), mode="edge") for x in future]
    errors = d["target_lataccel"][:, CONTEXT_LENGTH:t + 1] - sim.current[:, CONTEXT_LENGTH - 1:t]
    integral = np.cumsum(errors, axis=1)[:, -1:]  # cumsum adds in order, as a controller's running sum does
    previous = errors[:, -2:-1]
    return np.concatenate(now + [past_actions, sim.current[:, t - OBS_HISTORY:t]] + future + [integral, previous],
                          axis=1).astype(dtype)


# --- What a policy reads from an observation: the normalization, the teacher, the curvatures ------------
def observation_normalizer() -> tuple[np.ndarray, np.ndarray]:
    """Fixed (offset, scale) per observation entry, from the dataset's typical ranges: speeds are centred on
    20 m/s over 10 m/s, steer is doubled, the error integral (tens over an episode) is divided by 10."""
    offset, scale = np.zeros(OBS_DIM, np.float32), np.ones(OBS_DIM, np.float32)
    for name, part in obs_slices().items():
        if "v_ego" in name:
            offset[part], scale[part] = 20.0, 0.1
        elif name == "past_actions":
            scale[part] = 2.0
        elif name == "error_integral":
            scale[part] = 0.1
    return offset, scale


def teacher_params() -> dict[str, float]:
    """PIDFeedforwardController's gains, and where the observation holds what it reads, for `teacher_steer`."""
    controller, where = PIDFeedforwardController(), obs_slices()
    params = {f"teacher_{k}": v for k, v in controller.gains().items()} | {"teacher_lookahead": controller.lookahead}
    for name in ("target_lataccel", "current_lataccel", "roll_lataccel", "future_lataccel", "error_integral",
                 "prev_error"):
        params[f"obs_{name}"] = where[name].start
    return params


def teacher_steer(params: dict, obs):
    """PIDFeedforwardController's steer from a batch of observations [B, D] (numpy or torch), through
    `pid_ff_steer`: on float64 observations it equals the controller's bit for bit. It uses nothing but its
    arguments and `pid_ff_steer`, so an exported controller can carry it."""
    def column(name):
        return obs[:, int(params[f"obs_{name}"])]

    future = int(params["obs_future_lataccel"])
    planned = obs[:, future:future + int(params["teacher_lookahead"])].mean(axis=-1)
    gains = {k: float(params[f"teacher_{k}"]) for k in ("p", "i", "d", "kf", "kr")}
    return pid_ff_steer(column("target_lataccel") - column("current_lataccel"), column("error_integral"),
                        column("prev_error"), planned, column("roll_lataccel"), gains)


CURVATURE_SCALE = 100.0  # in 1 / (100 m): a 100 m radius reads 1
CURVATURE_CLIP = 5.0  # near standstill max(v^2, 1) is small and the quotient meaningless: keep it bounded


def curvature_params() -> dict[str, float]:
    """Where the observation holds what `curvature_inputs` reads, and its units."""
    where = obs_slices()
    names = ("target_lataccel", "current_lataccel", "roll_lataccel", "v_ego", "future_lataccel",
             "future_roll_lataccel", "future_v_ego")
    return {f"obs_{name}": where[name].start for name in names} | {
        "plan_rows": FUTURE_LEN, "curvature_scale": CURVATURE_SCALE, "curvature_clip": CURVATURE_CLIP}


def curvature_inputs(params: dict, obs) -> list:
    """The path curvature (lataccel - roll) / max(v^2, 1) of the current lateral acceleration [B, 1], of the
    target [B, 1] and of each planned row [B, plan_rows], for observations [B, D] (numpy or torch; the caller
    joins them with its own library). Lateral acceleration is speed squared times curvature, a product that
    small MLPs would otherwise have to build."""
    def rows(name, n=1):
        start = int(params[f"obs_{name}"])
        return obs[:, start:start + n]

    def curvature(lataccel, roll, v):
        bound = float(params["curvature_clip"])
        return ((lataccel - roll) / (v * v).clip(1.0, None) * float(params["curvature_scale"])).clip(-bound, bound)

    n = int(params["plan_rows"])
    roll, v = rows("roll_lataccel"), rows("v_ego")
    return [curvature(rows("current_lataccel"), roll, v), curvature(rows("target_lataccel"), roll, v),
            curvature(rows("future_lataccel", n), rows("future_roll_lataccel", n), rows("future_v_ego", n))]


def episode_info(costs: dict[str, np.ndarray], segments: Segments) -> dict[str, Any]:
    return {**costs, "segment": np.array(segments.names)}


class TinyPhysicsEnv(gym.Env):
    """One segment per episode: the 400 controlled steps 100..499 of the official rollout.

    Action: the steer command, clipped to [-2, 2]. Observation: OBS_DIM float32 values laid out
    as in `OBS_LAYOUT` (see `observe`). The reward of the action at step t is minus that step's
    share of the official cost:

        r_t = -(50 * 100 / 400) * (target_t - current_t)^2
              - [t > 100] * (100 / 399) * ((current_t - current_{t-1}) / 0.1)^2

    so the undiscounted return of an episode is -total_cost. The episode terminates after step
    499 (nothing later counts), and the final `info` holds lataccel_cost, jerk_cost, total_cost.
    With official_rng=True a segment's noise is the official one and the costs are official-exact.
    """

    metadata = {"render_modes": []}

    def __init__(self, model_path: str | None = None, data_path: str | None = None, segments: Segments | None = None,
                 official_rng: bool = False, threads: int = 0, model: SimModel | None = None):
        self.model = model or TinyPhysicsModel(resolve_model_path(model_path), threads=threads)
        self.pool = segments if segments is not None else load_segments(resolve_data_path(data_path))
        self.sim = TinyPhysicsSim(self.model, official_rng=official_rng)
        self.observation_space = observation_space(self.pool)
        self.action_space = gym.spaces.Box(*STEER_RANGE, (1,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """options={"segment": i} picks segment i of the pool; otherwise one is drawn at random."""
        super().reset(seed=seed)
        if seed is not None:
            self.sim.seed(seed)
        index = (options or {}).get("segment", int(self.np_random.integers(len(self.pool))))
        self.sim.reset(self.pool.subset([index]))
        self.sim.warm_up()
        return observe(self.sim)[0], {"segment": self.pool.names[index]}

    def step(self, action):
        t = self.sim.t
        self.sim.step(np.asarray(action, dtype=np.float64).reshape(1))
        reward = float(self.sim.step_reward(t)[0])
        terminated = self.sim.t == COST_END_IDX
        info = {k: v[0] for k, v in episode_info(self.sim.costs(), self.sim.segments).items()} if terminated else {}
        return observe(self.sim)[0], reward, terminated, False, info


class TinyPhysicsVectorEnv(gym.vector.VectorEnv):
    """num_envs segments stepped in lockstep by one `TinyPhysicsSim` (one model call per step).

    Same observation, action and reward as `TinyPhysicsEnv`. Every episode lasts 400 steps, so all
    sub-environments end together. Autoreset follows Gymnasium 1.x: with "next_step" (the default)
    the step after the end resets every sub-environment, ignores the actions and returns reward 0;
    with "same_step" the end step already returns the next episode's first observation, the
    last one being in info["final_obs"] and the end-of-episode info in info["final_info"].
    Training segments are drawn as a reshuffled cycle through the pool; reset(options={"segments":
    [...]}) picks them explicitly (as evaluation does). expected_reward=True pays each step's
    expected cost over the simulator's sampling instead of the sampled one (see
    `TinyPhysicsSim.step_reward`): the same objective with less noise; info costs stay the real ones.

    samples_per_segment=K runs each drawn segment in K consecutive sub-environments (num_envs / K
    segments at a time), so that their K returns can serve as each other's baseline; common_noise
    gives those K the same simulator noise (training-only, see `TinyPhysicsSim`).
    """

    def __init__(self, num_envs: int = 1, model_path: str | None = None, data_path: str | None = None,
                 segments: Segments | None = None, official_rng: bool = False, threads: int = 0,
                 autoreset_mode: str | gym.vector.AutoresetMode = "next_step", model: SimModel | None = None,
                 expected_reward: bool = False, samples_per_segment: int = 1, common_noise: bool = False):
        if num_envs < 1:
            raise TinyPhysicsError(f"num_envs={num_envs}: need at least one environment")
        if samples_per_segment < 1 or num_envs % samples_per_segment:
            raise TinyPhysicsError(f"--samples-per-segment {samples_per_segment} must be at least 1 and divide "
                                   f"the {num_envs} environments")
        self.num_envs, self.samples_per_segment = num_envs, samples_per_segment
        self.model = model or TinyPhysicsModel(resolve_model_path(model_path), threads=threads)
        self.pool = segments if segments is not None else load_segments(resolve_data_path(data_path))
        self.sim = TinyPhysicsSim(self.model, official_rng=official_rng, expected_reward=expected_reward,
                                  noise_group=samples_per_segment if common_noise else 1)
        if isinstance(autoreset_mode, str):
            autoreset_mode = gym.vector.AutoresetMode[autoreset_mode.upper()]
        if autoreset_mode == gym.vector.AutoresetMode.DISABLED:
            raise TinyPhysicsError("autoreset_mode: use next_step or same_step; episodes always end together")
        self.autoreset_mode = autoreset_mode
        self.metadata = {"autoreset_mode": self.autoreset_mode}
        self.single_observation_space = observation_space(self.pool)
        self.single_action_space = gym.spaces.Box(*STEER_RANGE, (1,), np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self._order: list[int] = []
        self._needs_reset = False

    def _draw_segments(self) -> np.ndarray:
        picked = []
        while len(picked) < self.num_envs // self.samples_per_segment:
            if not self._order:
                self._order = self.np_random.permutation(len(self.pool)).tolist()
            picked.append(self._order.pop())
        return np.repeat(picked, self.samples_per_segment)

    def _start_episodes(self, indices: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        self._indices = self._draw_segments() if indices is None else np.asarray(indices)
        self.sim.reset(self.pool.subset(self._indices))
        self.sim.warm_up()
        self._needs_reset = False
        return observe(self.sim), {"segment": np.array(self.sim.segments.names)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.sim.seed(seed)
            self._order = []
        segments = (options or {}).get("segments")
        if segments is not None and len(segments) != self.num_envs:
            raise TinyPhysicsError(f"reset got {len(segments)} segments for {self.num_envs} environments")
        return self._start_episodes(segments)

    def step(self, actions):
        b = self.num_envs
        if self._needs_reset:
            obs, info = self._start_episodes()
            return obs, np.zeros(b), np.zeros(b, bool), np.zeros(b, bool), info
        t = self.sim.t
        self.sim.step(np.asarray(actions, dtype=np.float64).reshape(b))
        rewards = self.sim.step_reward(t)
        done = self.sim.t == COST_END_IDX
        terminated, truncated = np.full(b, done), np.zeros(b, bool)
        if not done:
            return observe(self.sim), rewards, terminated, truncated, {}
        info = episode_info(self.sim.costs(), self.sim.segments)
        info.update({"_" + k: np.ones(b, bool) for k in list(info)})
        final_obs = observe(self.sim)  # at step 500: what a controller would see next
        if self.autoreset_mode == gym.vector.AutoresetMode.SAME_STEP:
            obs, reset_info = self._start_episodes()
            reset_info.update({"final_obs": final_obs, "_final_obs": np.ones(b, bool),
                               "final_info": info, "_final_info": np.ones(b, bool)})
            return obs, rewards, terminated, truncated, reset_info
        self._needs_reset = True
        return final_obs, rewards, terminated, truncated, info


    def state_dict(self) -> dict:
        """Everything needed to continue exactly where this env is (for resumable training)."""
        return {"indices": self._indices.copy(), "t": self.sim.t, "actions": self.sim.actions.copy(),
                "current": self.sim.current.copy(), "sim_rng": self.sim.rng.get_state(),
                "np_random": self.np_random.bit_generator.state, "order": list(self._order),
                "needs_reset": self._needs_reset}

    def load_state_dict(self, state: dict) -> np.ndarray:
        """Restore a `state_dict`; returns the current observation."""
        self.sim.reset(self.pool.subset(state["indices"]))
        self._indices = np.asarray(state["indices"])
        self.sim.t, self.sim.actions[:], self.sim.current[:] = state["t"], state["actions"], state["current"]
        self.sim.rng.set_state(state["sim_rng"])
        self.np_random.bit_generator.state = state["np_random"]
        self._order, self._needs_reset = list(state["order"]), state["needs_reset"]
        return observe(self.sim)


gym.register(id="TinyPhysics-v0", entry_point=TinyPhysicsEnv, vector_entry_point=TinyPhysicsVectorEnv)
