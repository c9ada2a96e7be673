"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), with rsLoRA scaling
(Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA") as an option, and
adapters saved and loaded in PEFT's format.

The idea (LoRA §4.1): fine-tuning changes a pretrained weight W0 [out, in] by an update ΔW that has low
"intrinsic rank", so write it as a product and train only the factors,

    h = W0 x + ΔW x = W0 x + s · B A x,     A [r, in],  B [out, r],  r << min(in, out)

with W0 frozen. A starts random and B at zero, so ΔW = 0 and training starts exactly at the pretrained
model. The scale s = α / r (the paper's "α/r", so that changing r does not force retuning the learning
rate); rsLoRA shows that α / r makes the update's contribution vanish as r grows and that s = α / √r keeps
it rank-stable. Like PEFT we initialise A as nn.Linear does (Kaiming-uniform with a = √5, i.e.
U(−1/√in, 1/√in), the choice of Microsoft's reference loralib) or, optionally, A ~ N(0, 1/r²); B = 0.
Dropout (p = `dropout`) is applied to the input of the LoRA branch only.

Because the update is linear, it can be merged: W = W0 + s · B A gives the same outputs with no extra
latency (LoRA §4.1, "No Additional Inference Latency"); `merge()` / `unmerge()` do it in place and back.
They go through `LoRALinear._base_weight` / `_write_base_weight`, which read and write a quantized base
(llmlab/nn/quant.py) through its `dequantized_weight()` / `set_weight()`: dequantize → add → requantize.

Names and files follow PEFT (huggingface/peft, tested against 0.21):
- a wrapped layer keeps the original at `<name>.base_layer` and holds `<name>.lora_A.weight` [r, in] and
  `<name>.lora_B.weight` [out, r] — PEFT's in-memory names without its adapter-name level
  (`lora_A.default.weight`), i.e. exactly the names in PEFT's saved files;
- target selection as PEFT's `check_target_module_exists`: a list entry matches a module whose name equals
  it or ends with "." + it; a string is a regular expression that must match the whole name;
- `save_adapter` writes `adapter_config.json` (LoraConfig's fields) and `adapter_model.safetensors` with
  keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, which `peft.PeftModel.from_pretrained`
  loads; `load_adapter` reads PEFT's own saves. Only safetensors is read, never a pickle.
- our file also carries a checksum of the base weights it was trained on, in the safetensors metadata
  (which PEFT ignores); `load_adapter` refuses a base with other shapes always and other weights unless
  `check_base=False`, so an adapter is never silently applied to the wrong model.

Models whose parameter names differ from their HF twin's pass `key_map`, a function from our parameter
names to HF's (applied to `<module>.weight`); target names are then matched against the HF names, and file
keys use them. Models whose weights are the HF twin's up to a permutation of output rows (our LLaMA: q_proj
and k_proj rows in rotary pairs, HF's in halves) pass `row_map(module, B, to_file)`, which permutes lora_B's
rows the same way when saving (to_file=True) and back when loading: B's rows are the update's output rows,
and A (input side) is untouched. The tests (tests/nn/test_lora.py) prove forward and gradients equal to
`peft.get_peft_model` on a Llama, and adapters interchangeable with PEFT in both directions.

Shapes: in / out = the base layer's in_features / out_features, r = rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LoRAConfig",
    "LoRAFactor",
    "LoRALinear",
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_KEY_PREFIX",
    "checksum_of_targets",
    "compute_base_checksum",
    "find_lora_targets",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "merge_lora",
    "remove_lora",
    "save_adapter",
    "unmerge_lora",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the HF model)
CHECKSUM_KEY = "llmlab.base_sha256"  # in the safetensors metadata; PEFT reads only "format"

RowMap = Callable[[str, Tensor, bool], Tensor]  # (HF module name, lora_B, to_file) -> lora_B
KeyMap = Callable[[str], str]


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class LoRAConfig:
    """What to adapt and how. Field names are ours; `to_peft_dict` / `from_peft_dict` translate to PEFT's.

    r: rank of the update; alpha: PEFT's `lora_alpha`; scaling = alpha / r, or alpha / √r with `use_rslora`.
    target_modules: a list of module names (each matches a name equal to it or ending in "." + it) or one
    regular expression matched against whole names. The default is the paper's choice (§7.1, Wq and Wv).
    init: how A starts — "kaiming" (Kaiming-uniform a=√5, PEFT's `init_lora_weights=True`) or "gaussian"
    (N(0, 1/r²), PEFT's "gaussian"); B always starts at 0.
    bias: only "none" (no bias is trained), PEFT's default.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    bias: Literal["none"] = "none"
    init: Literal["kaiming", "gaussian"] = "kaiming"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"alpha must be a number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r}: only 'none' is supported (no bias is trained)")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"init={self.init!r}: 'kaiming' or 'gaussian'")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ValueError("target_modules is an empty regular expression")
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"target_modules={targets!r} is not a valid regular expression: {e}") from e
        else:
            if isinstance(targets, set | frozenset):  # PEFT keeps a set; a JSON list is written sorted
                targets = self.target_modules = sorted(targets)
            elif isinstance(targets, tuple):
                targets = self.target_modules = list(targets)
            if not isinstance(targets, list) or not targets:
                raise ValueError(
                    f"target_modules must be a non-empty list of names or a regex, got {targets!r}"
                )
            if not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"target_modules entries must be non-empty strings, got {targets!r}")

    @property
    def scaling(self) -> float:
        """s in h = W0 x + s · B A x: alpha / r (LoRA §4.1) or alpha / √r (rsLoRA)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """The fields of PEFT's LoraConfig that describe this adapter; the others keep PEFT's defaults."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "exclude_modules": None,
            "use_rslora": self.use_rslora,
            "bias": self.bias,
            "lora_bias": False,
            "fan_in_fan_out": False,
            "init_lora_weights": True if self.init == "kaiming" else "gaussian",
            "use_dora": False,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        """Read a PEFT `adapter_config.json`; refuse any feature this module does not implement."""
        if d.get("peft_type") != "LORA":
            raise ValueError(f"adapter peft_type={d.get('peft_type')!r}: only 'LORA' adapters are supported")
        for key in ("r", "lora_alpha", "target_modules"):
            if d.get(key) is None:
                raise ValueError(f"adapter config has no {key!r}")
        if d.get("fan_in_fan_out"):
            raise ValueError("fan_in_fan_out=True (Conv1D-style [in, out] weights) is not supported")
        unsupported = {
            k: v
            for k, v in d.items()
            if k not in _PEFT_KEYS_UNDERSTOOD and v not in (None, False, {}, [], "", 0)
        }
        if unsupported:
            raise ValueError(
                f"adapter config uses PEFT features this LoRA does not implement: {unsupported} "
                "(e.g. DoRA, rank/alpha patterns, modules_to_save, layer selection, LoRA biases)"
            )
        init = d.get("init_lora_weights", True)
        if init not in (True, False, "gaussian"):
            # PiSSA/OLoRA/LoftQ/... change the base weights themselves: the adapter alone is not the update
            raise ValueError(
                f"init_lora_weights={init!r}: adapters that also modify the base are not supported"
            )
        targets = d["target_modules"]
        return cls(
            r=d["r"],
            alpha=d["lora_alpha"],
            dropout=d.get("lora_dropout", 0.0),
            target_modules=targets if isinstance(targets, str) else sorted(targets),
            use_rslora=d.get("use_rslora", False),
            bias=d.get("bias", "none"),
            init="gaussian" if init == "gaussian" else "kaiming",
        )


# Keys of PEFT's LoraConfig that from_peft_dict reads, or that do not change what the saved adapter computes
# (bookkeeping, defaults of unused machinery, configs used only to *initialise* A and B). Any other key with a
# non-empty value is refused.
_PEFT_KEYS_UNDERSTOOD = frozenset(
    {
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "use_rslora",
        "bias",
        "init_lora_weights",
        "fan_in_fan_out",
        "base_model_name_or_path",
        "revision",
        "peft_version",
        "inference_mode",
        "auto_mapping",
        "layers_pattern",  # only used together with layers_to_transform, which is refused
        "megatron_core",  # a module name, default "megatron.core"; megatron_config (refused) switches it on
        "qalora_group_size",  # default 16; used only with use_qalora (refused)
        "loftq_config",  # {} unless init_lora_weights="loftq" (refused)
        "eva_config",  # initialisation of A only; the saved A is what it is
        "corda_config",  # only with init_lora_weights="corda" (refused)
        "lora_ga_config",  # only with init_lora_weights="lora_ga" (refused)
        "ensure_weight_tying",
        "runtime_config",
    }
)


# ----------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------
class LoRAFactor(nn.Module):
    """One LoRA factor, a `weight` Parameter [out, in] in nn.Linear's layout (so its key reads `lora_A.weight`
    as in PEFT). Deliberately not an nn.Linear: it must never be taken for a layer to adapt."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _adapter_dtype(base_dtype: torch.dtype, adapter_dtype: torch.dtype | None) -> torch.dtype:
    """float32 / float64 bases keep their dtype; 16-bit and quantized bases get float32 factors (PEFT's
    default `autocast_adapter_dtype=True`: tiny updates to A and B would round away in bf16)."""
    if adapter_dtype is not None:
        return adapter_dtype
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


class LoRALinear(nn.Module):
    """y = base(x) + s · (dropout(x) Aᵀ) Bᵀ, with the base layer frozen and kept at `.base_layer`.

    `base` is any module with `in_features`, `out_features` and a `weight` (nn.Linear, or a quantized linear
    of llmlab.nn.quant, read with `dequantized_weight()` and written with `set_weight()`; other kinds subclass
    this and override `_base_weight` / `_write_base_weight`). After `merge()` the base alone
    computes y (W = W0 + s B A) until `unmerge()`. Do not train while merged: A and B get no gradient then.

    x: [..., in] -> y: [..., out]
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: Literal["kaiming", "gaussian"] = "kaiming",
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        cfg = LoRAConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)  # validates
        for attr in ("in_features", "out_features", "weight"):
            if not hasattr(base, attr):
                raise TypeError(f"LoRALinear needs a base with `{attr}`; {type(base).__name__} has none")
        self.base_layer = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = cfg.scaling
        weight = base.weight
        dtype = _adapter_dtype(weight.dtype, adapter_dtype)
        self.lora_A = LoRAFactor(self.in_features, r, dtype, weight.device)  # weight [r, in]
        self.lora_B = LoRAFactor(r, self.out_features, dtype, weight.device)  # weight [out, r]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: Literal["kaiming", "gaussian"] = "kaiming") -> None:
        """A as nn.Linear initialises its weight (or N(0, 1/r²)), B = 0, so that ΔW = 0 (LoRA §4.1)."""
        a = self.lora_A.weight
        if init == "kaiming":
            # Kaiming-uniform with negative slope a=√5 (He et al. 2015): gain = √(2/(1+a²)) = √(1/3),
            # bound = gain·√(3/fan_in) = 1/√in. The same expression order as nn.init.kaiming_uniform_, so
            # the same RNG state gives bit-identical values.
            gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
            bound = math.sqrt(3.0) * (gain / math.sqrt(self.in_features))
            a.uniform_(-bound, bound)
        elif init == "gaussian":
            a.normal_(0.0, 1.0 / self.r)
        else:
            raise ValueError(f"init={init!r}: 'kaiming' or 'gaussian'")
        self.lora_B.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)  # [..., out]
        if self.merged:
            return result  # the update is inside the base weight
        a, b = self.lora_A.weight, self.lora_B.weight
        h = self.lora_dropout(x.to(a.dtype))  # [..., in]
        # (h Aᵀ) Bᵀ: two thin products, never the [out, in] matrix B A. The order of operations is PEFT's
        # (lora_B(lora_A(dropout(x))) * scaling), so both round alike.
        return (result + F.linear(F.linear(h, a), b) * self.scaling).to(result.dtype)

    def delta_weight(self) -> Tensor:
        """ΔW = s · B A, [out, in], in the factors' dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    # -- the two hooks a quantized base overrides ----------------------------------------------------------
    def _base_weight(self) -> Tensor:
        """The base weight as a dense floating-point tensor [out, in] (a quantized base: dequantize)."""
        dequantized = getattr(self.base_layer, "dequantized_weight", None)  # llmlab.nn.quant's layers
        return dequantized() if dequantized is not None else self.base_layer.weight.detach()

    def _write_base_weight(self, weight: Tensor) -> None:
        """Store a dense [out, in] `weight` as the base's weight (a quantized base: requantize). A quantized
        layer's `weight` is a fresh dequantized tensor, so copying into it would silently change nothing:
        such layers are written through their `set_weight`."""
        set_weight = getattr(self.base_layer, "set_weight", None)
        with torch.no_grad():
            if set_weight is not None:
                set_weight(weight)
            else:
                self.base_layer.weight.copy_(weight)

    # -- merging ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _add_delta(self, sign: int) -> None:
        """W <- W + sign · ΔW, summed in the wider of the two dtypes and rounded once to the base's dtype
        (a bf16 base with float32 factors: ΔW is not rounded to bf16 before the addition)."""
        w, delta = self._base_weight(), self.delta_weight()
        wide = torch.promote_types(w.dtype, delta.dtype)
        w_wide, delta = w.to(wide), delta.to(wide)
        self._write_base_weight((w_wide + delta if sign > 0 else w_wide - delta).to(w.dtype))

    def merge(self) -> None:
        """W0 <- W0 + s B A. Rounds once per element; `unmerge` undoes it up to that rounding."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        self._add_delta(+1)
        self.merged = True

    def unmerge(self) -> None:
        """W0 <- W0 - s B A (the same ΔW as `merge` added, if A and B were not changed in between)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        self._add_delta(-1)
        self.merged = False

    def extra_repr(self) -> str:
        s = f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"
        return s + (", rslora" if self.use_rslora else "") + (", merged" if self.merged else "")


# ----------------------------------------------------------------------------------------------------------
# Selecting and wrapping layers
# ----------------------------------------------------------------------------------------------------------
def _mapped_module_name(name: str, key_map: KeyMap | None) -> str:
    """Our module name -> the HF twin's, through the parameter-name map applied to `<name>.weight`."""
    if key_map is None:
        return name
    mapped = key_map(f"{name}.weight" if name else "weight")
    if not isinstance(mapped, str) or not (mapped == "weight" or mapped.endswith(".weight")):
        raise ValueError(f"key_map({name + '.weight'!r}) = {mapped!r}: a parameter name ending in '.weight'")
    return mapped[: -len(".weight")] if mapped != "weight" else ""


def _matches(target: str, name: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, layer) for every LoRALinear in `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _linear_sites(model: nn.Module, linear_types: tuple[type[nn.Module], ...]) -> dict[str, nn.Module]:
    """{name: module} of the places LoRA can adapt: linear layers, and LoRALinears standing where one was
    (not the base layers inside them, nor the factors)."""
    sites = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) or (
            isinstance(m, linear_types) and not isinstance(m, LoRAFactor) and not name.endswith(".base_layer")
        ):
            sites[name] = m
    return sites


def _select(target_modules: list[str] | str, names: list[str]) -> tuple[list[str], list[str]]:
    """(selected names, target entries that select nothing), with PEFT's matching rules."""
    if isinstance(target_modules, str):
        selected = [n for n in names if re.fullmatch(target_modules, n)]
        return selected, [] if selected else [target_modules]
    selected = [n for n in names if any(_matches(t, n) for t in target_modules)]
    return selected, [t for t in target_modules if not any(_matches(t, n) for n in names)]


def find_lora_targets(
    model: nn.Module,
    target_modules: list[str] | str,
    key_map: KeyMap | None = None,
    linear_types: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> dict[str, nn.Module]:
    """{our name: layer} of the linear layers `target_modules` selects, matching the (key_map-ped) names with
    PEFT's rules. Each list entry (or the regex) must select at least one linear layer, else ValueError
    listing the linear layers that exist. Changes nothing."""
    linears = {n: m for n, m in _linear_sites(model, linear_types).items() if not isinstance(m, LoRALinear)}
    to_ours = {_mapped_module_name(n, key_map): n for n in linears}
    selected, unmatched = _select(target_modules, list(to_ours))
    if unmatched:
        examples: dict[str, str] = {}
        for hf in to_ours:
            examples.setdefault(hf.rsplit(".", 1)[-1], hf)
        listing = ", ".join(f"{s} (e.g. {examples[s]})" for s in sorted(examples)) or "none"
        raise ValueError(
            f"LoRA target_modules {unmatched} match no linear layer of {type(model).__name__}. "
            f"Its linear layers, by last name: {listing}"
        )
    return {to_ours[hf]: linears[to_ours[hf]] for hf in selected}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject_lora(
    model: nn.Module,
    cfg: LoRAConfig,
    key_map: KeyMap | None = None,
    adapter_dtype: torch.dtype | None = None,
    linear_types: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> list[str]:
    """Wrap every linear layer `cfg.target_modules` selects in a LoRALinear, in place; freeze every other
    parameter of the model. Returns the wrapped layers' names. Trainable parameters: r·(in + out) per layer.
    A model that already has LoRA layers is refused (remove_lora first)."""
    if not isinstance(cfg, LoRAConfig):
        raise TypeError(f"cfg must be a LoRAConfig, got {type(cfg).__name__}")
    existing = [n for n, _ in lora_layers(model)]
    if existing:
        raise ValueError(f"model already has LoRA layers ({existing[:3]}...); call remove_lora first")
    targets = find_lora_targets(model, cfg.target_modules, key_map, linear_types)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in targets.items():
        wrapped = LoRALinear(
            layer, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init, adapter_dtype=adapter_dtype
        )
        _set_submodule(model, name, wrapped)
    return list(targets)


def merge_lora(model: nn.Module) -> list[str]:
    """Merge every not-yet-merged LoRA layer into its base weight; returns their names."""
    names = []
    for name, layer in lora_layers(model):
        if not layer.merged:
            layer.merge()
            names.append(name)
    return names


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo `merge_lora` on every merged LoRA layer; returns their names."""
    names = []
    for name, layer in lora_layers(model):
        if layer.merged:
            layer.unmerge()
            names.append(name)
    return names


def remove_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Put each base layer back in place of its LoRALinear, in place: with `merge` it carries the update
    (the model a merged export saves, with the original parameter names), without it the original weights.
    Parameters stay frozen as inject_lora left them. Returns the names of the replaced layers."""
    names = []
    for name, layer in list(lora_layers(model)):
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------------------------
# Base checksum
# ----------------------------------------------------------------------------------------------------------
def _checksum(weights: dict[str, Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each weight, in name order. The bytes are the base
    layer's `weight` as stored (a quantized base: its quantized form), before and after injection alike."""
    sha = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach()
        sha.update(f"{name}|{str(w.dtype).removeprefix('torch.')}|{list(w.shape)}\n".encode())
        sha.update(w.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def compute_base_checksum(model: nn.Module, key_map: KeyMap | None = None) -> str:
    """Checksum of the base weights under the model's LoRA layers (unmerged), keyed by HF module names."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers")
    if any(layer.merged for _, layer in layers):
        raise ValueError("LoRA layers are merged, so the base weights include the update: unmerge_lora first")
    return _checksum({_mapped_module_name(n, key_map): layer.base_layer.weight for n, layer in layers})


def checksum_of_targets(
    model: nn.Module,
    target_modules: list[str] | str,
    key_map: KeyMap | None = None,
    linear_types: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> str:
    """The checksum `compute_base_checksum` will give once LoRA is injected into the layers `target_modules`
    selects: taken before injection (e.g. of a float base that is then quantized for QLoRA)."""
    targets = find_lora_targets(model, target_modules, key_map, linear_types)
    return _checksum({_mapped_module_name(n, key_map): layer.weight for n, layer in targets.items()})


# ----------------------------------------------------------------------------------------------------------
# Adapter files (PEFT's format)
# ----------------------------------------------------------------------------------------------------------
def _key(module: str, factor: Literal["A", "B"]) -> str:
    return f"{PEFT_KEY_PREFIX}{module}.lora_{factor}.weight"


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    cfg: LoRAConfig,
    base_model_name_or_path: str | None = None,
    base_checksum: str | None = None,
    key_map: KeyMap | None = None,
    linear_types: tuple[type[nn.Module], ...] = (nn.Linear,),
    row_map: RowMap | None = None,
) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` as PEFT's `save_pretrained` does.

    `cfg` must be what the LoRA layers were made with: r, alpha and rsLoRA are checked, and its target_modules
    must select exactly the wrapped layers (by their key_map-ped names), so that PEFT adapts the same ones.
    `base_checksum` defaults to the checksum of the current base weights (pass one to record, e.g., the
    checksum of an unquantized base). Returns `out_dir`.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers to save")
    for name, layer in layers:
        if (layer.r, layer.scaling, layer.use_rslora) != (cfg.r, cfg.scaling, cfg.use_rslora):
            raise ValueError(
                f"{name}: r={layer.r}, alpha={layer.alpha}, use_rslora={layer.use_rslora} differ from the "
                f"config's r={cfg.r}, alpha={cfg.alpha}, use_rslora={cfg.use_rslora}"
            )
    if base_checksum is None:
        base_checksum = compute_base_checksum(model, key_map)  # refuses merged layers
    elif any(layer.merged for _, layer in layers):
        raise ValueError("LoRA layers are merged: unmerge_lora first")

    mapped = {name: _mapped_module_name(name, key_map) for name, _ in layers}
    # will PEFT (and load_adapter) select exactly the wrapped layers on the HF twin with these targets?
    sites = [_mapped_module_name(n, key_map) for n in _linear_sites(model, linear_types)]
    selected, unmatched = _select(cfg.target_modules, sites)
    if unmatched or set(selected) != set(mapped.values()):
        raise ValueError(
            f"cfg.target_modules={cfg.target_modules!r} would adapt {sorted(selected)} "
            f"(unmatched entries: {unmatched}), but the model's LoRA layers are {sorted(mapped.values())}: "
            "pass the config they were made with"
        )
    peft_cfg = cfg.to_peft_dict(base_model_name_or_path)

    tensors = {}
    for name, layer in layers:
        tensors[_key(mapped[name], "A")] = layer.lora_A.weight.detach().cpu().contiguous()
        b = layer.lora_B.weight.detach().cpu()
        tensors[_key(mapped[name], "B")] = (row_map(mapped[name], b, True) if row_map else b).contiguous()

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt", CHECKSUM_KEY: base_checksum}
    )
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n")
    return out


def _read_adapter(adapter_dir: Path) -> tuple[LoRAConfig, dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG_NAME, adapter_dir / ADAPTER_WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: not an adapter folder")
    if not weights_path.is_file():
        pickled = [p.name for p in adapter_dir.glob("adapter_model.*")]
        extra = (
            f" (found {pickled}: pickled weights are never loaded; re-save with safetensors)"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"{weights_path} not found{extra}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    cfg = LoRAConfig.from_peft_dict(raw)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from e
    return cfg, tensors, metadata


def load_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    key_map: KeyMap | None = None,
    check_base: bool = True,
    adapter_dtype: torch.dtype | None = None,
    linear_types: tuple[type[nn.Module], ...] = (nn.Linear,),
    row_map: RowMap | None = None,
) -> LoRAConfig:
    """Inject LoRA layers as an adapter folder (ours or PEFT's) says and load its A and B; return its config.

    Everything is checked before the model is touched, so a refused adapter leaves the model as it was:
    the config must describe plain LoRA; the file's keys must be exactly the selected layers' lora_A/lora_B;
    every tensor floating-point, finite, A [r, in] and B [out, r] with the model's in/out (a base of other
    shapes is named with both shapes); and, when the file records a base checksum, the model's base weights
    must match it unless `check_base=False`.
    """
    adapter_dir = Path(adapter_dir)
    cfg, tensors, metadata = _read_adapter(adapter_dir)
    existing = [n for n, _ in lora_layers(model)]
    if existing:
        raise ValueError(f"model already has LoRA layers ({existing[:3]}...); call remove_lora first")
    targets = find_lora_targets(model, cfg.target_modules, key_map, linear_types)
    mapped = {name: _mapped_module_name(name, key_map) for name in targets}

    expected = {_key(mapped[n], f) for n in targets for f in ("A", "B")}
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{adapter_dir / ADAPTER_WEIGHTS_NAME} does not fit the layers its config selects: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    for name, layer in targets.items():
        a, b = tensors[_key(mapped[name], "A")], tensors[_key(mapped[name], "B")]
        for key, t in ((_key(mapped[name], "A"), a), (_key(mapped[name], "B"), b)):
            if not t.is_floating_point():
                raise ValueError(f"{key}: dtype {t.dtype}, expected a floating-point tensor")
            if t.dim() != 2:
                raise ValueError(f"{key}: shape {list(t.shape)}, expected a matrix")
            if not torch.isfinite(t).all():
                raise ValueError(f"{key}: contains NaN or infinite values")
        base_shape = [int(layer.out_features), int(layer.in_features)]
        if [b.shape[0], a.shape[1]] != base_shape:
            raise ValueError(
                f"adapter does not fit this base model: {mapped[name]} was trained on a base weight of shape "
                f"[out, in] = {[b.shape[0], a.shape[1]]}, the model's is {base_shape}"
            )
        if a.shape[0] != cfg.r or b.shape[1] != cfg.r:
            raise ValueError(
                f"{mapped[name]}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not have the config's "
                f"rank r={cfg.r} (expected [r, in] and [out, r])"
            )
    recorded = metadata.get(CHECKSUM_KEY)
    if check_base and recorded is not None:
        actual = _checksum({mapped[n]: layer.weight for n, layer in targets.items()})
        if actual != recorded:
            raise ValueError(
                f"adapter {adapter_dir} was trained on other base weights (sha256 {recorded[:12]}..., "
                f"this model's {actual[:12]}...): wrong or modified base model. "
                "Pass check_base=False to load anyway."
            )

    inject_lora(model, cfg, key_map, adapter_dtype, linear_types)
    with torch.no_grad():
        for name in targets:
            layer = model.get_submodule(name)
            layer.lora_A.weight.copy_(tensors[_key(mapped[name], "A")])
            b = tensors[_key(mapped[name], "B")]
            layer.lora_B.weight.copy_(row_map(mapped[name], b, False) if row_map else b)
    return cfg
