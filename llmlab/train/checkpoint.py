"""Checkpoints: atomic, verifiable, and loaded without unpickling anything.

Layout of one checkpoint (a folder `checkpoints/step_00000420/`):
  model.safetensors   the model's state_dict
  state.safetensors   every other tensor (optimizer moments, RNG states, ...)
  state.json          the rest of the state as JSON, tensors replaced by {"__tensor__": key}
  manifest.json       size and sha256 of the three files above, written last

The folder is written under a temporary name and renamed into place, then `checkpoints/latest` (a one-line
text file) is replaced atomically, so a process killed at any moment leaves either the previous checkpoint or
the new one, never half of one. Loading verifies the manifest first, so a truncated or corrupt file is a
clear CheckpointError rather than a failure deep inside torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmlab.fileio import atomic_path, atomic_write_text

FILES = ("model.safetensors", "state.safetensors", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or corrupt."""


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace every tensor in a nested dict/list by a reference, collecting tensors into `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = prefix.rstrip(".")
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            # JSON keys are strings: remember int keys (optimizer state is keyed by param index).
            jk = f"__int__{k}" if isinstance(k, int) else str(k)
            out[jk] = flatten_state(v, tensors, f"{prefix}{k}.")
        return out
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{prefix}{i}.") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        if isinstance(obj, float) and obj != obj:  # NaN is not JSON
            return {"__float__": "nan"}
        if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
            return {"__float__": str(obj)}
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix!r}")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {
            (int(k[7:]) if k.startswith("__int__") else k): unflatten_state(v, tensors)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path, step: int, model_state: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint `root/step_{step}` atomically, point `root/latest` at it, keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # Tied weights share storage, which safetensors refuses: store each tensor as its own copy.
    save_file(
        {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items()},
        tmp / "model.safetensors",
    )
    tensors: dict[str, torch.Tensor] = {}
    tree = flatten_state(state, tensors, "")
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(tree))
    manifest = {"step": step, "files": {}}
    for fname in FILES:
        _fsync(tmp / fname)
        manifest["files"][fname] = {"size": (tmp / fname).stat().st_size, "sha256": sha256_file(tmp / fname)}
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
    if final.exists():  # a re-run of the same step after a crash: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    atomic_write_text(root / "latest", name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    latest = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    for old in steps[:-keep]:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `root/latest` points at (or the newest complete one when the pointer is missing)."""
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if not path.is_dir():
            raise CheckpointError(f"{pointer} points at {path.name}, which does not exist")
        return path
    complete = [p for p in list_checkpoints(root) if (p / "manifest.json").exists()]
    return complete[-1] if complete else None


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the manifest; return the manifest."""
    hint = (
        f"Delete {path} to resume from an earlier checkpoint"
        f" (available: {', '.join(p.name for p in list_checkpoints(path.parent)) or 'none'})."
    )
    mpath = path / "manifest.json"
    if not mpath.exists():
        raise CheckpointError(f"checkpoint {path} is incomplete: manifest.json missing. {hint}")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has a corrupt manifest.json ({err}). {hint}") from err
    for fname in FILES:
        fpath, meta = path / fname, files.get(fname)
        if meta is None or not fpath.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {fname} missing. {hint}")
        size = fpath.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {fname} has {size} bytes, expected {meta['size']}"
                f" (truncated?). {hint}"
            )
        if sha256_file(fpath) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {fname} fails its sha256 check. {hint}")
    return manifest


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(model_state, state) of a verified checkpoint. No pickle is involved: safetensors + JSON."""
    verify_checkpoint(path)
    try:
        model_state = load_file(path / "model.safetensors", device=str(map_location))
        tensors = load_file(path / "state.safetensors", device=str(map_location))
        tree = json.loads((path / "state.json").read_text())
    except (SafetensorError, json.JSONDecodeError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err}") from err
    return model_state, unflatten_state(tree, tensors)


def save_weights(
    path: Path, model_state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """A model's weights alone (the run's final `model.safetensors`), written atomically."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_state.items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=metadata)


def load_weights(path: Path | str, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path} not found")
    try:
        return load_file(path, device=map_location)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"weights file {path} is corrupt or truncated: {err}") from err


def load_run_weights(run_dir: Path, model: torch.nn.Module, map_location: str = "cpu") -> None:
    """Load a run's final weights (model.safetensors, else its latest checkpoint) into `model`; a run with
    neither, or weights of another shape, is a CheckpointError."""
    weights = run_dir / "model.safetensors"
    if weights.exists():
        state = load_weights(weights, map_location=map_location)
    else:
        ckpts = run_dir / "checkpoints"
        last = latest_checkpoint(ckpts) if ckpts.is_dir() else None
        if last is None:
            raise CheckpointError(f"{run_dir} has neither model.safetensors nor a checkpoint")
        state, _ = load_checkpoint(last, map_location=map_location)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{run_dir}: the weights do not fit the run's model config: {err}") from err
