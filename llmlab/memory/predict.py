"""Per-rank memory predicted before a run: parameters, gradients and optimizer states as the ZeRO paper
accounts them (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", §3.1 and §5), for the layout each strategy really uses, plus the activations of
llmlab/memory/activations.py (Korthikanti et al. 2022, §4).

For Ψ parameters the paper counts, in mixed precision with Adam, 2Ψ bytes of 16-bit parameters, 2Ψ of 16-bit
gradients and KΨ = 12Ψ of optimizer states (fp32 master weights, momentum, variance); stage 1 divides the
K term by the N ranks, stage 2 the gradients too, stage 3 the parameters too. That is DeepSpeed's bf16/fp16
mode ("zero-paper" below). Our Trainer does mixed precision with torch autocast instead, which keeps the
parameters — and so the gradients — in fp32 and casts to 16 bits per op: the states are 4Ψ + 4Ψ + 8Ψ (Adam's
two fp32 moments) in fp32 AND in bf16/fp16 ("autocast"), and the 16-bit weight casts appear among the
tensors saved for backward instead (ActivationEstimate.param_copies). Which applies:

    ddp, zero1/2/3 (ours), fsdp2 (fp32 sharded params)      autocast     4Ψ + 4Ψ + KΨ,  K = 8 (Adam), 4 (SGD)
    deepspeed stages 0-3 with bf16/fp16                     zero-paper   2Ψ + 2Ψ + (4 + K)Ψ
    any strategy in fp32                                    both         4Ψ + 4Ψ + KΨ

Sharded sizes are exact per rank, padding included (Ψ/N is only the ideal):
- ours (llmlab/parallel/zero.py): every parameter, flattened, is cut in chunks of c = ⌈numel/N⌉; rank r
  owns min(c, numel − r·c) elements (≥ 0) of parameters (stage 3) and optimizer states, while a stage-2/3
  gradient is the reduce-scatter's output buffer of c elements on every rank; stage 1 keeps full gradients;
- FSDP2: each parameter's dim 0 is cut in N row blocks of ⌈rows/N⌉ rows: parameters and gradients live in
  padded buffers (⌈rows/N⌉ · numel/rows elements on every rank), optimizer states take the unpadded rows;
- DeepSpeed: stages 1/2 flatten the parameters into one buffer padded to a multiple of N (⌈Ψ/N⌉ per rank),
  stage 3 partitions each parameter (⌈numel/N⌉); offload moves master weights and optimizer states to
  host memory.
Ours and FSDP2's (on CPU, gloo) are asserted against `state_bytes` per rank in tests/memory/; DDP's buckets
and DeepSpeed's layout are the model of those engines, not measured here (no GPU on this machine).

What is predicted is what a rank holds after an optimizer step, before the next zero_grad (gradients still
allocated; Adam's states exist from the first step on).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from llmlab.memory.activations import ActivationEstimate, ActivationShape, estimate_activations

OptimizerKind = Literal["adamw", "adam", "sgd"]
Sharding = Literal["none", "per-param", "dim0-padded", "flat"]
PrecisionModel = Literal["autocast", "zero-paper"]
Offload = Literal["none", "optimizer", "all"]

__all__ = [
    "MemoryPrediction",
    "StateLayout",
    "StatePrediction",
    "layout_for",
    "optimizer_kind",
    "optimizer_state_bytes",
    "predict_for_model",
    "predict_memory",
    "predict_states",
]


@dataclass(frozen=True)
class StateLayout:
    """How a strategy holds the training state on each of N ranks."""

    strategy: str
    stage: int  # 0 replicated; 1 optimizer states sharded; 2 + gradients; 3 + parameters
    sharding: Sharding
    precision_model: PrecisionModel
    offload: Offload = "none"  # DeepSpeed: optimizer states (+ master weights), or "all": parameters too


def layout_for(strategy: str, ds_stage: int = 2, offload: str = "none") -> StateLayout:
    """The layout of a `train.strategy` (with `train.ds_stage` and `train.offload` for deepspeed): ddp,
    zero1/2/3 (ours), fsdp2, deepspeed; also deepspeed0-3 / deepspeed3_offload as one name."""
    name = strategy.strip().lower()
    if name in ("ddp", "accelerate"):  # Accelerate's engine is DDP underneath (train/strategy_accelerate.py)
        return StateLayout("ddp", 0, "none", "autocast")
    if name in ("zero1", "zero2", "zero3"):
        return StateLayout(name, int(name[-1]), "per-param", "autocast")
    if name in ("fsdp", "fsdp2"):
        return StateLayout(name, 3, "dim0-padded", "autocast")
    m = re.fullmatch(r"(?:deepspeed|ds)[_-]?(?:zero)?[_-]?([0-3])?([_-]offload)?", name)
    if m:
        stage = int(m.group(1)) if m.group(1) else ds_stage
        off = "optimizer" if m.group(2) and offload == "none" else offload
        if stage not in (0, 1, 2, 3) or off not in ("none", "optimizer", "all"):
            raise ValueError(f"deepspeed stage {stage} / offload {off!r}: stages 0-3, none|optimizer|all")
        label = f"deepspeed{stage}" + ("" if off == "none" else f"+offload_{off}")
        return StateLayout(label, stage, "flat" if stage else "none", "zero-paper", off)  # type: ignore[arg-type]
    raise ValueError(
        f"unknown strategy {strategy!r}: ddp, accelerate, zero1, zero2, zero3, fsdp2 or deepspeed"
    )


@dataclass
class StatePrediction:
    """Bytes of training state one rank holds (device memory; `host` for offloaded states)."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    buffers: int = 0  # DDP's gradient buckets (N > 1): a second fp32 copy of the gradients
    transient: int = 0  # stage 3: a gathered unit + the root while they run (not between steps)
    host: int = 0  # offloaded optimizer states and master weights (CPU memory)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def optimizer_state_bytes(kind: OptimizerKind, momentum: float = 0.9) -> int:
    """K: bytes of optimizer state per fp32 parameter element (the paper's K, without the master copy)."""
    if kind in ("adamw", "adam"):
        return 8  # exp_avg + exp_avg_sq, fp32
    if kind == "sgd":
        return 4 if momentum else 0  # momentum_buffer
    raise ValueError(f"no state model for optimizer {kind!r} (adamw, adam, sgd)")


def _owned(numel: int, ranks: int, rank: int) -> int:
    """Elements rank `rank` owns of a parameter in our ZeRO: min(c, numel − rank·c), c = ⌈numel/N⌉."""
    c = max(1, math.ceil(numel / ranks))
    return max(0, min(c, numel - rank * c))


def _chunk(numel: int, ranks: int) -> int:
    return max(1, math.ceil(numel / ranks))  # c: the padded chunk every rank's buffers have


def _dim0_padded(shape: Sequence[int], ranks: int) -> int:
    rows = shape[0] if shape else 1
    per_row = math.prod(shape) // rows if rows else 0
    return math.ceil(rows / ranks) * per_row  # FSDP2: ⌈rows/N⌉ rows of numel/rows elements


def _dim0_owned(shape: Sequence[int], ranks: int, rank: int) -> int:
    rows = shape[0] if shape else 1
    per_row = math.prod(shape) // rows if rows else 0
    return _owned(rows, ranks, rank) * per_row  # torch.chunk's rows for this rank, unpadded


def predict_states(
    shapes: Sequence[Sequence[int]],
    layout: StateLayout,
    ranks: int = 1,
    rank: int = 0,
    precision: str = "fp32",
    optimizer: OptimizerKind = "adamw",
    momentum: float = 0.9,
    units: Sequence[Sequence[int]] = (),
    frozen: Sequence[int] = (),
) -> StatePrediction:
    """Bytes of parameters, gradients and optimizer states on rank `rank` of `ranks`.

    `shapes`: every distinct parameter's shape (a tied weight once); `units` (stage 3): indices into
    `shapes` of each block gathered at a time (the rest is the root, gathered from forward to the step);
    `frozen`: indices of parameters that are not trained (LoRA's base): they have no gradient and no
    optimizer state."""
    if ranks < 1 or not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} of {ranks} ranks")
    numels = [math.prod(s) for s in shapes]
    psi = sum(numels)  # Ψ
    trained = [i for i in range(len(numels)) if i not in set(frozen)]
    t_numels, t_shapes = [numels[i] for i in trained], [shapes[i] for i in trained]
    psi_t = sum(t_numels)  # Ψ of the trained parameters
    n_tensors = len(numels)
    k = optimizer_state_bytes(optimizer, momentum)
    # Adam's 0-dim fp32 `step` per tensor it steps (DeepSpeed steps a few flat partitions: left out)
    adam = optimizer in ("adam", "adamw") and layout.precision_model == "autocast"
    step_bytes = 4 * len(trained) if adam else 0
    out = StatePrediction()
    paper = layout.precision_model == "zero-paper" and precision in ("bf16", "fp16")
    p_bytes, g_bytes = (2, 2) if paper else (4, 4)  # paper: 16-bit params and grads; else fp32
    stage, n = layout.stage, ranks
    # + the fp32 master copy in the optimizer states: the paper's mixed precision, and DeepSpeed at stages
    # 1-3 even in fp32 (its optimizer steps a flat fp32 copy of the partition, then copies it back; measured)
    master = paper or (layout.sharding == "flat" and stage >= 1)
    k_total = k + 4 if master else k

    # Elements this rank holds of sharded parameters, gradients and optimizer states (per element of Ψ)
    def elements(numels: list[int], shapes: Sequence[Sequence[int]]) -> tuple[int, int, int]:
        total = sum(numels)
        if layout.sharding == "none":
            return total, total, total
        if layout.sharding == "flat":  # DeepSpeed: one buffer padded to N parts (stage 3: per parameter)
            flat = sum(_chunk(x, n) for x in numels) if stage == 3 else math.ceil(total / n)
            return flat, flat, flat
        if layout.sharding == "per-param":  # ours: owned chunks; gradients in c-element reduce-scatter bufs
            owned = sum(_owned(x, n, rank) for x in numels)
            return owned, sum(_chunk(x, n) for x in numels), owned
        # FSDP2: padded row blocks for parameters and gradients, the unpadded rows for optimizer states
        padded = sum(_dim0_padded(s, n) for s in shapes)
        return padded, padded, sum(_dim0_owned(s, n, rank) for s in shapes)

    p_el = elements(numels, shapes)[0]
    _, g_el, o_el = elements(t_numels, t_shapes)

    sharded = layout.sharding != "none"
    out.params = p_bytes * (p_el if sharded and stage >= 3 else psi)
    out.grads = g_bytes * (g_el if sharded and stage >= 2 else psi_t)
    opt = k_total * (o_el if sharded and stage >= 1 else psi_t) + step_bytes
    if layout.offload != "none":  # ZeRO-Offload: the optimizer (master weights included) on the host
        out.host, opt = opt, 0
        if layout.offload == "all":  # ZeRO-Infinity's parameter offload (stage 3)
            out.host, out.params = out.host + out.params, 0
        moved = "optimizer states" + (" and parameters" if layout.offload == "all" else "")
        out.notes.append(f"offload={layout.offload}: {moved} in host memory")
    out.optimizer = opt
    if layout.strategy == "ddp" and n > 1:
        out.buffers = 4 * psi_t
        out.notes.append("DDP keeps gradient buckets beside the gradients (gradient_as_bucket_view off): +4Ψ")
    if stage == 3 and units:
        in_units = {i for u in units for i in u}
        root = sum(numels[i] for i in range(n_tensors) if i not in in_units)
        largest = max(sum(numels[i] for i in u) for u in units)
        out.transient = p_bytes * (root + largest)
        out.notes.append("stage 3 gathers the root (embeddings, final norm, head) and one block at a time")
        if layout.strategy.startswith("deepspeed"):
            out.notes.append(
                "DeepSpeed ZeRO-3: the saved-tensor meter undercounts activations (autograd releases part "
                "of the packed tensors during the forward under its hooks); RSS / CUDA peak are the reference"
            )
    if paper:
        out.notes.append("DeepSpeed-style mixed precision: 16-bit params and grads, fp32 master + states")
    elif master:
        out.notes.append("DeepSpeed stages 1-3 step a flat fp32 copy of the partition (+4Ψ/N) even in fp32")
    elif precision in ("bf16", "fp16"):
        out.notes.append("torch autocast keeps fp32 params and grads; its 16-bit weight casts are saved")
    return out


@dataclass
class MemoryPrediction:
    """Everything predicted for one rank of one run configuration."""

    strategy: str
    ranks: int
    rank: int
    precision: str
    device: str
    optimizer: str
    n_params: int
    states: StatePrediction
    activations: ActivationEstimate | None

    def components(self) -> dict[str, int]:
        """Bytes per component, the names memory.json and the tables use."""
        out = {"params": self.states.params, "grads": self.states.grads, "optimizer": self.states.optimizer}
        if self.activations is not None:
            out["activations"] = self.activations.stored
            out["activations_peak"] = self.activations.peak
            out["param_copies"] = self.activations.param_copies
        out["buffers"] = self.states.buffers
        out["transient"] = self.states.transient
        out["host"] = self.states.host
        return out

    @property
    def total(self) -> int:
        """Device bytes at the peak of a step: states, buffers, the activations' peak, the weight casts and
        stage 3's gathered parameters (gradient and temporary buffers of single ops are not counted)."""
        c = self.components()
        return (
            c["params"] + c["grads"] + c["optimizer"] + c["buffers"] + c["transient"]
            + c.get("activations_peak", 0) + c.get("param_copies", 0)
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "strategy": self.strategy,
            "ranks": self.ranks,
            "rank": self.rank,
            "precision": self.precision,
            "device": self.device,
            "optimizer": self.optimizer,
            "n_params": self.n_params,
            "bytes": self.components(),
            "total_bytes": self.total,
            "notes": list(self.states.notes),
        }
        if self.activations is not None:
            a = self.activations
            out["activation_shape"] = asdict(a.shape)
            out["activation_terms"] = {
                "per_layer": [asdict(t) | {"bytes": t.bytes} for t in a.layer],
                "per_model": [asdict(t) | {"bytes": t.bytes} for t in a.model + a.checkpoint_inputs],
            }
        return out


def predict_memory(
    model_cfg: Any,
    *,
    micro_batch: int,
    seq_len: int | None = None,
    precision: str = "fp32",
    device: str = "cpu",
    strategy: str | StateLayout = "ddp",
    ranks: int = 1,
    rank: int = 0,
    checkpointing: bool = False,
    optimizer: OptimizerKind = "adamw",
    momentum: float = 0.9,
) -> MemoryPrediction:
    """The prediction for a language model (a GPTConfig or LlamaConfig with its vocab_size set; activations
    for GPT only) trained on micro-batches of `micro_batch` sequences of `seq_len` tokens (default:
    block_size) per rank. The model is built on the meta device: shapes only, nothing allocated, so a 124M
    (or 7B) model costs nothing to predict."""
    import torch

    from llmlab.models.causal_lm import build_lm

    if model_cfg.vocab_size < 1:
        raise ValueError("model vocab_size must be set (the tokenizer's) to predict memory")
    with torch.device("meta"):
        model = build_lm(model_cfg)
    model.set_activation_checkpointing(checkpointing)
    return predict_for_model(
        model, micro_batch=micro_batch, seq_len=seq_len or model_cfg.block_size, precision=precision,
        device=device, strategy=strategy, ranks=ranks, rank=rank, optimizer=optimizer, momentum=momentum,
    )  # fmt: skip


def optimizer_kind(optimizer: Any) -> tuple[OptimizerKind, float]:
    """(kind, momentum) of a torch optimizer (or a wrapper with an `.optimizer`, e.g. our ZeRO)."""
    import torch

    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw", 0.0
    if isinstance(optimizer, torch.optim.Adam):
        return "adam", 0.0
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd", float(optimizer.defaults.get("momentum", 0.0))
    raise ValueError(f"no state model for optimizer {type(optimizer).__name__} (AdamW, Adam, SGD)")


def predict_for_model(
    model: Any,
    *,
    micro_batch: int,
    seq_len: int,
    precision: str,
    device: str,
    strategy: str | StateLayout = "ddp",
    ranks: int = 1,
    rank: int = 0,
    optimizer: OptimizerKind = "adamw",
    momentum: float = 0.9,
) -> MemoryPrediction:
    """The prediction for a live model (a run in progress): states from its parameters' shapes (whatever the
    model), activations when it is our GPT (its config, attention path and checkpointing switch)."""
    from llmlab.models.gpt import GPT

    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    units = [[index[id(p)] for p in u.parameters()] for u in getattr(model, "shard_units", list)()]
    shapes = [tuple(getattr(p, "ds_shape", None) or p.shape) for p in params]  # DeepSpeed-3: ds_shape
    layout = strategy if isinstance(strategy, StateLayout) else layout_for(strategy)
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    states = predict_states(shapes, layout, ranks, rank, precision, optimizer, momentum, units, frozen)
    activations = None
    if isinstance(model, GPT):
        cfg = model.cfg
        shape = ActivationShape(
            batch=micro_batch, seq=seq_len, hidden=cfg.n_embd, heads=cfg.n_head, layers=cfg.n_layer,
            vocab=cfg.vocab_size, dropout=cfg.dropout, attention=model.transformer.h[0].attn.impl,
            precision=precision,  # type: ignore[arg-type]
            device="cuda" if str(device).startswith("cuda") else "cpu",
            checkpointing=bool(model.activation_checkpointing),
            fused_qkv=all(block.attn.fused_qkv for block in model.transformer.h),
        )  # fmt: skip
        activations = estimate_activations(shape)
        if layout.precision_model == "zero-paper" and precision != "fp32":
            activations.param_copies = 0  # DeepSpeed's 16-bit mode: the weights are 16-bit, nothing to cast
    return MemoryPrediction(
        strategy=layout.strategy, ranks=ranks, rank=rank, precision=precision,
        device="cuda" if str(device).startswith("cuda") else "cpu", optimizer=optimizer,
        n_params=sum(p.numel() for p in params), states=states, activations=activations,
    )  # fmt: skip
