"""Checkpoints: atomic, pickle-free, verifiable, one file per rank.

Layout of a checkpoint directory:

    step-00000120/rank-0000.npz    rank 0: model, optimizer, schedule, step, its own run state
    step-00000120/rank-0001.npz    other ranks: their own run state (RNG, compression memory)
    latest                         text: the name of the newest complete step directory

Every file is written to a temporary name, flushed to disk and renamed, so a
killed write leaves the previous checkpoint intact; `latest` moves only after
every rank has finished (a barrier), so it never points at a partial step.
Nested state (dicts, lists, numbers, strings, numpy arrays) is stored as npz
arrays plus a JSON manifest that records each array's SHA-256: a truncated or
tampered file raises CheckpointError naming the file and the entry. Loading
uses `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CheckpointError", "save_state", "load_state", "step_dir", "commit_latest",
           "latest_step_dir"]

_FORMAT = "distad-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, tampered with or of the wrong shape."""


# ---- nested state <-> (arrays, JSON) -----------------------------------------------------

def _encode(obj: Any, arrays: dict[str, np.ndarray], path: str) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        key = f"a{len(arrays)}"
        arrays[key] = np.asarray(obj)
        return {"__array__": key, "at": path}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k, path), _encode(v, arrays, f"{path}/{k}")]
                             for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__" if isinstance(obj, list) else "__tuple__":
                [_encode(v, arrays, f"{path}/{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store {type(obj).__name__} at {path or '/'} "
                    "(only arrays, numbers, strings, lists and dicts; never pickle)")


def _key(k: Any, path: str) -> Any:
    if isinstance(k, (bool, int, str)):
        return k
    if isinstance(k, np.integer):
        return int(k)
    raise TypeError(f"checkpoint: dict key {k!r} at {path or '/'} must be an int or str")


def _decode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if "__array__" in obj:
            return arrays[obj["__array__"]]
        if "__dict__" in obj:
            return {k: _decode(v, arrays) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_decode(v, arrays) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, arrays) for v in obj["__tuple__"])
    return obj


def _digest(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


# ---- files -------------------------------------------------------------------------------

def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` (nested dicts/lists of arrays and plain values) atomically to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(state, arrays, "")
    manifest = {"format": _FORMAT, "tree": tree,
                "sha256": {k: _digest(a) for k, a in arrays.items()}}
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a state written by `save_state`, verifying every array against its SHA-256."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable (truncated or corrupted): {e}") \
            from None
    if "manifest" not in arrays:
        raise CheckpointError(f"checkpoint {path}: no manifest (not a distad checkpoint)")
    try:
        manifest = json.loads(arrays.pop("manifest").tobytes())
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: corrupted manifest: {e}") from None
    if manifest.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {manifest.get('format')!r}")
    sums = manifest["sha256"]
    if set(sums) != set(arrays):
        raise CheckpointError(f"checkpoint {path}: entries {sorted(set(sums) ^ set(arrays))} "
                              "missing or unexpected")
    for k, a in arrays.items():
        if _digest(a) != sums[k]:
            raise CheckpointError(f"checkpoint {path}: entry {_where(manifest['tree'], k)} fails "
                                  "its SHA-256 check (tampered or corrupted)")
    return _decode(manifest["tree"], arrays)


def _where(tree: Any, key: str) -> str:
    stack = [tree]
    while stack:
        t = stack.pop()
        if isinstance(t, dict):
            if t.get("__array__") == key:
                return t.get("at") or key
            stack.extend(t.values())
        elif isinstance(t, list):
            stack.extend(t)
    return key


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def rank_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank-{rank:04d}.npz"


def commit_latest(root: str | Path, step: int) -> None:
    """Point `latest` at step's directory (atomically); call after every rank has saved."""
    root = Path(root)
    tmp = root / f".latest.tmp-{os.getpid()}"
    tmp.write_text(step_dir(root, step).name + "\n")
    os.replace(tmp, root / "latest")
    _fsync_dir(root)


def latest_step_dir(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory under root, or None if there is none."""
    marker = Path(root) / "latest"
    if not marker.exists():
        return None
    d = Path(root) / marker.read_text().strip()
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {marker}: points at missing directory {d}")
    return d


def check_identity(directory: str | Path, saved: dict[str, Any], expected: dict[str, Any]
                   ) -> None:
    """Raise if the run settings a checkpoint was written with differ from this run's."""
    if saved != expected:
        diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
        raise CheckpointError(f"checkpoint {directory}: written by a different run; differing "
                              f"settings (checkpoint, now): {diff}")
