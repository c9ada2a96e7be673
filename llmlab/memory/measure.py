"""Measuring what one rank of a training run holds, to set beside the prediction (llmlab/memory/predict.py):
the tensors autograd saves for backward, counted with saved-tensor hooks (PyTorch's
`torch.autograd.graph.saved_tensors_hooks`, the mechanism of its "Hooks for saved tensors" tutorial), the
storages of parameters, gradients and optimizer states, the process's RSS high-water mark and, on CUDA, the
caching allocator's `max_memory_allocated`.

What counts as memory is a storage, not a tensor: views share one (Q, K and V of the fused path are views of
three projections; the out_proj input is a view of the SDPA output), so each storage is counted once, at its
full size, for as long as any saved reference to it lives. A storage that belongs to a parameter (the
`weight.t()` every Linear saves) is not an activation; autocast's 16-bit cast of a weight (a tensor whose
autograd history is cast/view steps back to a parameter) is reported apart as a parameter copy.
"""

from __future__ import annotations

import resource
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from llmlab.parallel.zero import StateBytes

if TYPE_CHECKING:
    from llmlab.memory.predict import MemoryPrediction

__all__ = [
    "GOALS",
    "MEMORY_FILE",
    "SavedTensorMeter",
    "StateBytes",
    "compare",
    "cuda_peak_bytes",
    "rss_peak_bytes",
    "state_bytes",
    "storage_key",
    "write_memory_record",
]

# Single-input autograd nodes that only cast or re-view a tensor: followed back to a parameter.
_CAST_OR_VIEW = {
    "ToCopyBackward0",
    "TBackward0",
    "ViewBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "ExpandBackward0",
    "AliasBackward0",
    "UnsafeViewBackward0",
}


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2 parameters and gradients); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and hasattr(t, "device_mesh") else t


def storage_key(t: Tensor) -> int:
    """An identity of the storage behind `t`, the same for all its views and across resizes (ZeRO-3)."""
    return _local(t).untyped_storage()._cdata


def _storage_bytes(t: Tensor) -> int:
    return _local(t).untyped_storage().nbytes()


def _param_derived(t: Tensor) -> bool:
    """Whether `t` is made of nn.Parameters by casts, views and concatenations only: autocast's 16-bit weight
    copies, and the stacked q/k/v weight of llmlab's attention (`torch.cat` of three parameters)."""
    return t.grad_fn is not None and _from_params(t.grad_fn, depth=8)


def _from_params(fn: Any, depth: int) -> bool:
    name = type(fn).__name__
    if name == "AccumulateGrad":
        return isinstance(getattr(fn, "variable", None), nn.Parameter)
    if depth == 0 or (name not in _CAST_OR_VIEW and name != "CatBackward0"):
        return False
    nexts = [f for f, _ in fn.next_functions if f is not None]
    if len(nexts) != 1 and name != "CatBackward0":
        return False
    return bool(nexts) and all(_from_params(f, depth - 1) for f in nexts)


class _Held:
    """What autograd keeps instead of the tensor: the tensor, and a release callback when it is dropped."""

    __slots__ = ("tensor", "key", "kind", "meter")

    def __init__(self, tensor: Tensor, key: int, kind: str, meter: SavedTensorMeter) -> None:
        self.tensor, self.key, self.kind, self.meter = tensor, key, kind, meter

    def __del__(self) -> None:
        self.meter._release(self.key, self.kind)


@dataclass
class SavedRecord:
    """One distinct storage saved for backward (kept with `record=True`, for diagnostics)."""

    kind: str  # "activation" or "param_copy"
    shape: tuple[int, ...]
    dtype: str
    bytes: int


class SavedTensorMeter:
    """Counts the bytes of tensors saved for backward while the context is active, storage by storage.

    `current[kind]` follows the saved storages that are alive (they are released as backward consumes them),
    `peak[kind]` is the most seen at once; kinds are "activation" and "param_copy". Storages of `params`
    (and of any nn.Parameter, or a view of one) are not counted. Use it around forward (and backward):

        with SavedTensorMeter(model.parameters()) as meter:
            loss = task.step(model, batch).loss
            loss.backward()
        meter.peak_activations      # bytes

    Tensors saved inside a non-reentrant `torch.utils.checkpoint` region are the checkpoint's business (it
    installs its own hooks): the meter sees each checkpoint's saved input, not the recomputation."""

    def __init__(self, params: Iterable[Tensor] = (), record: bool = False) -> None:
        self._params = list(params)
        self._record = record
        self._lock = threading.RLock()  # a release may run (garbage collection) while a pack holds it
        self._refs: dict[int, int] = {}  # storage key -> live saved references
        self._size: dict[int, int] = {}  # storage key -> bytes counted for it
        self.current = {"activation": 0, "param_copy": 0}
        self.peak = {"activation": 0, "param_copy": 0}
        self.peak_total = 0
        self.records: list[SavedRecord] = []
        self._hooks: Any = None

    @property
    def peak_activations(self) -> int:
        return self.peak["activation"]

    @property
    def peak_param_copies(self) -> int:
        return self.peak["param_copy"]

    def __enter__(self) -> SavedTensorMeter:
        self._param_keys = {storage_key(p) for p in self._params}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)  # what was saved stays counted until autograd releases it

    def _pack(self, t: Tensor) -> Any:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t
        try:
            key, size = storage_key(t), _storage_bytes(t)
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage: count its elements
            key, size = id(t), t.numel() * t.element_size()
        if key in self._param_keys or size == 0:
            return t
        kind = "param_copy" if _param_derived(t) else "activation"
        with self._lock:
            refs = self._refs.get(key, 0)
            self._refs[key] = refs + 1
            if refs == 0:
                self._size[key] = size
                self.current[kind] += size
                self.peak[kind] = max(self.peak[kind], self.current[kind])
                self.peak_total = max(self.peak_total, sum(self.current.values()))
                if self._record:
                    self.records.append(SavedRecord(kind, tuple(t.shape), str(t.dtype), size))
        return _Held(t, key, kind, self)

    @staticmethod
    def _unpack(held: Any) -> Tensor:
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, key: int, kind: str) -> None:
        with self._lock:
            refs = self._refs.get(key, 0) - 1
            if refs > 0:
                self._refs[key] = refs
                return
            self._refs.pop(key, None)
            self.current[kind] -= self._size.pop(key, 0)


def state_bytes(model: nn.Module, optimizer: Any = None) -> StateBytes:
    """Bytes of storage this process holds now for parameters, gradients and optimizer states.

    Counted by storage, each once: a tied weight, a ZeRO stage-1/2 chunk (a view of its parameter) and a
    stage-1 chunk's gradient (a view of the full gradient) add nothing; a DTensor counts its local shard; a
    ZeRO-3 parameter between uses (storage resized to 0) counts 0. The optimizer may be a wrapper with an
    `.optimizer` (our ZeRO, DeepSpeed's): the tensors it steps that are not the model's are parameters when
    they have the model's dtype (ZeRO-3's chunks), optimizer states otherwise (fp32 master weights of 16-bit
    training, as the ZeRO paper counts them); everything in its `state` is an optimizer state."""
    seen: set[int] = set()

    def size(t: Tensor | None) -> int:
        if t is None:
            return 0
        key = storage_key(t)
        if key in seen:
            return 0
        seen.add(key)
        return _storage_bytes(t)

    out = StateBytes()
    params = list(model.parameters())
    dtypes = {p.dtype for p in params}
    for p in params:
        out.params += size(p)
    for p in params:
        out.grads += size(p.grad)
    inner = optimizer
    while inner is not None and not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if inner is None:
        return out
    for group in inner.param_groups:
        for p in group["params"]:
            b = size(p)
            if p.dtype in dtypes:
                out.params += b
            else:
                out.optimizer += b
            out.grads += size(p.grad)
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                out.optimizer += size(v)
    return out


def rss_peak_bytes() -> int:
    """The process's resident-set high-water mark (getrusage ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def cuda_peak_bytes(device: torch.device | str | None = None) -> int | None:
    """torch.cuda.max_memory_allocated (the caching allocator's peak of live tensors), or None off CUDA."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated(device))


# ------------------------------------------------------------------------------------------------ the record
MEMORY_FILE = "memory.json"
GOALS = {"states": 0.05, "activations": 0.15}  # the targets: |measured / predicted − 1|


def _rel(predicted: int | None, measured: int | None) -> float | None:
    if predicted is None or measured is None:
        return None
    if predicted == 0:
        return 0.0 if measured == 0 else None
    return (measured - predicted) / predicted


def compare(prediction: MemoryPrediction, measured: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (component, predicted, measured, relative error, goal) for what was measured."""
    c = prediction.components()
    rows: list[dict[str, Any]] = []

    def add(key: str, label: str, pred: int | None, meas: int | None, goal: float | None) -> None:
        rel = _rel(pred, meas)
        rows.append({"component": key, "label": label, "predicted": pred, "measured": meas,
                     "rel_error": rel, "goal": goal})  # fmt: skip

    names = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer states"}
    for key, label in names.items():
        add(key, label, c[key], measured.get(key), GOALS["states"])
    have = [measured.get(k) for k in names]
    add("states", "states (total)", prediction.states.total,
        sum(have) if all(v is not None for v in have) else None, GOALS["states"])  # fmt: skip
    if "activations" in c:
        add("activations", "activations (saved for backward)", c["activations"], measured.get("activations"),
            GOALS["activations"])  # fmt: skip
        add("param_copies", "autocast weight casts (saved)", c["param_copies"], measured.get("param_copies"),
            None)  # fmt: skip
    if measured.get("cuda_max_allocated") is not None:
        add("total", "device peak (CUDA max allocated)", prediction.total, measured["cuda_max_allocated"],
            None)  # fmt: skip
    return rows


def write_memory_record(
    run_dir: Path | str,
    prediction: MemoryPrediction,
    measured: dict[str, Any],
    step: int | None = None,
    name: str = MEMORY_FILE,
    section: bool = True,
) -> dict[str, Any]:
    """Write `memory.json` (predicted vs measured, per component, with relative errors) into the run
    directory, and the report section `sections/memory.md`; returns the record."""
    from llmlab.fileio import atomic_write_text
    from llmlab.memory.report import SECTION_FILE, memory_section
    from llmlab.train.record import write_json

    run_dir = Path(run_dir)
    record = {
        "step": step,
        "predicted": prediction.to_dict(),
        "measured": measured,
        "comparison": compare(prediction, measured),
        "goals": GOALS,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / name, record)
    if section:
        (run_dir / SECTION_FILE).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / SECTION_FILE, memory_section(record))
    return record
