"""Tests for llmlab.nn.lora: LoRA against PEFT's `get_peft_model` on a tiny random HF LlamaForCausalLM, and
adapter files exchanged with PEFT in both directions.

Models run in float64. Our LoRALinear performs PEFT's operations in PEFT's order (base(x), then
lora_B(lora_A(dropout(x))) * scaling added to it), so logits and gradients come out bit-identical (measured
max error 0). PEFT_TOL = 1e-12 still leaves room for a future reordering of the sums (a few ulps of O(1)
values, ~1e-15, through two layers) while the errors it must catch are large: the LoRA branch moves the
logits by ~0.1 here, so a wrong scale (α/r vs α/√r is a factor √r = 2), a transposed or swapped factor, or a
missing dropout rescaling all change them by > 1e-2.

Merging computes x (W + sBA)ᵀ instead of x Wᵀ + s (x Aᵀ) Bᵀ: the same linear map, summed in another order,
so merged logits differ from unmerged by rounding only (~1e-16 per product in float64, a few products deep).
MERGE_TOL = 1e-12 keeps three orders of margin over that and still catches a merge with the wrong sign,
scale or transpose (~1e-1). Unmerging is checked element-wise in float32 against the bound of its two
roundings (see test_unmerge_restores_within_two_roundings).

LoRA weights are drawn at random (B ≠ 0) and copied across, so agreement depends on the copy; the base models
are deep copies of one seeded model.
"""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llmlab.nn.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LoRAConfig,
    LoRALinear,
    compute_base_checksum,
    find_lora_targets,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

DT = torch.float64
PEFT_TOL = 1e-12  # see module docstring
MERGE_TOL = 1e-12  # see module docstring

TARGETS = ["q_proj", "v_proj", "down_proj"]  # three different shapes: 32->32, 32->16, 64->32
R, ALPHA = 4, 8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _llama(seed: int = 0, intermediate_size: int = 64) -> nn.Module:
    """A 2-layer Llama with GQA (4 query heads, 2 key/value heads), float64, eval mode."""
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(DT).eval()


def _embeds(seed: int = 1) -> torch.Tensor:
    """inputs_embeds [B=2, T=5, d=32], so the input gradient is a float tensor we can compare."""
    return torch.randn(2, 5, 32, dtype=DT, generator=_gen(seed))


def _logits(model: nn.Module, emb: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=emb).logits


def _scramble_lora(model: nn.Module, seed: int = 2) -> None:
    """A and B of every LoRA layer ~ 0.3 N(0, 1): B ≠ 0, so the adapter really changes the outputs."""
    g = _gen(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=g))


def _peft_twin(base: nn.Module, **kw) -> nn.Module:
    args = dict(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0) | kw
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**args))


def _peft_lora(peft_model: nn.Module, name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """(A, B) of PEFT's layer `name`: its in-memory names carry the adapter name, lora_A.default.weight."""
    layer = peft_model.base_model.model.get_submodule(name)
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _copy_to_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            a, b = _peft_lora(peft_model, name)
            assert not torch.equal(b, layer.lora_B.weight)  # PEFT starts at B = 0: the copy matters
            a.copy_(layer.lora_A.weight)
            b.copy_(layer.lora_B.weight)


def _ours(base: nn.Module, **kw) -> tuple[nn.Module, LoRAConfig]:
    cfg = LoRAConfig(**(dict(r=R, alpha=ALPHA, target_modules=TARGETS) | kw))
    model = copy.deepcopy(base)
    inject_lora(model, cfg)
    _scramble_lora(model)
    return model, cfg


def _has_no_lora(model: nn.Module) -> bool:
    return not list(lora_layers(model)) and all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# Config and the layer itself
# ----------------------------------------------------------------------------------------------------------
def test_config_validation_and_scaling():
    for kw in (
        dict(r=0),
        dict(r=2.0),
        dict(alpha=0),
        dict(dropout=1.0),
        dict(dropout=-0.1),
        dict(bias="all"),
        dict(init="pissa"),
        dict(target_modules=[]),
        dict(target_modules=[""]),
        dict(target_modules="("),  # not a regex
        dict(target_modules=""),
    ):
        with pytest.raises(ValueError):
            LoRAConfig(**kw)
    assert LoRAConfig(r=4, alpha=8).scaling == 2.0  # α / r
    assert LoRAConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0  # α / √r
    assert LoRAConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_is_the_papers_formula(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(6, 5).to(DT)  # with a bias: it belongs to the base and is not touched
    layer = LoRALinear(base, r=3, alpha=5.0, use_rslora=use_rslora)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 7, 6, dtype=DT, generator=_gen(1))
    w, b, a, bb = base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight
    s = 5.0 / (math.sqrt(3) if use_rslora else 3)
    # h = W0 x + s B A x, associated as x (W0 + s B A)ᵀ: another summation order, so MERGE_TOL
    assert _max_abs(layer(x), x @ (w + s * bb @ a).t() + b) <= MERGE_TOL
    assert _max_abs(layer.delta_weight(), s * bb @ a) <= MERGE_TOL
    assert layer.lora_A.weight.shape == (3, 6) and layer.lora_B.weight.shape == (5, 3)
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_init_is_kaiming_uniform_a_sqrt5_and_b_zero():
    base = nn.Linear(40, 7)
    torch.manual_seed(3)
    layer = LoRALinear(base, r=4, alpha=8)
    torch.manual_seed(3)
    expected = nn.init.kaiming_uniform_(torch.empty(4, 40), a=math.sqrt(5))
    assert torch.equal(layer.lora_A.weight, expected)  # the same draws, bit for bit
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(40)  # U(-1/√in, 1/√in)
    assert torch.equal(layer.lora_B.weight, torch.zeros(7, 4))
    torch.manual_seed(3)
    gauss = LoRALinear(base, r=4, alpha=8, init="gaussian")
    torch.manual_seed(3)
    assert torch.equal(gauss.lora_A.weight, torch.empty(4, 40).normal_(0, 1 / 4))  # N(0, 1/r²)


def test_zero_b_gives_the_base_model_exactly():
    base = _llama()
    model = copy.deepcopy(base)
    names = inject_lora(model, LoRAConfig(r=R, alpha=ALPHA, target_modules=TARGETS))
    assert len(names) == 6
    emb = _embeds()
    # B = 0: the branch adds exact zeros, so not even rounding differs
    assert torch.equal(_logits(model, emb), _logits(base, emb))


def test_16bit_base_gets_float32_factors_and_keeps_its_output_dtype():
    layer = LoRALinear(nn.Linear(8, 4).to(torch.bfloat16), r=2, alpha=4)
    assert layer.lora_A.weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype default
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert LoRALinear(nn.Linear(8, 4), 2, 4, adapter_dtype=torch.float64).lora_B.weight.dtype == DT


# ----------------------------------------------------------------------------------------------------------
# Equivalence with PEFT: forward and gradients
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "use_rslora,dropout", [(False, 0.0), (True, 0.0), (False, 0.1)], ids=["lora", "rslora", "dropout-eval"]
)
def test_forward_and_gradients_match_peft(use_rslora, dropout):
    base = _llama()
    ours, _ = _ours(base, use_rslora=use_rslora, dropout=dropout)
    ref = _peft_twin(base, use_rslora=use_rslora, lora_dropout=dropout)
    _copy_to_peft(ours, ref)
    ours.eval()
    ref.eval()  # dropout > 0 is the identity in eval mode, in both

    emb = _embeds()
    x, x_ref = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    out, out_ref = _logits(ours, x), _logits(ref, x_ref)
    assert _max_abs(out, out_ref) <= PEFT_TOL
    assert _max_abs(out, _logits(base, emb)) > 1e-2  # the adapter matters

    weights = torch.randn(out.shape, dtype=DT, generator=_gen(5))  # every logit carries its own weight
    (out * weights).sum().backward()
    (out_ref * weights).sum().backward()
    assert _max_abs(x.grad, x_ref.grad) <= PEFT_TOL
    for name, layer in lora_layers(ours):
        a, b = _peft_lora(ref, name)
        assert _max_abs(layer.lora_A.weight.grad, a.grad) <= PEFT_TOL, name
        assert _max_abs(layer.lora_B.weight.grad, b.grad) <= PEFT_TOL, name
        assert layer.lora_A.weight.grad.abs().max() > 0  # B ≠ 0, so A gets a gradient
    assert all(p.grad is None for n, p in ours.named_parameters() if ".lora_" not in n)  # frozen base


def test_dropout_in_training_matches_peft_with_the_same_seed():
    # both apply nn.Dropout to each target's input once, in module order: on CPU the same seed draws the
    # same masks (relies on torch's CPU draw order, as test_rnn's dropout test)
    base = _llama()
    ours, _ = _ours(base, dropout=0.3)
    ref = _peft_twin(base, lora_dropout=0.3)
    _copy_to_peft(ours, ref)
    ours.train()
    ref.train()
    emb = _embeds()
    torch.manual_seed(11)
    out = _logits(ours, emb)
    torch.manual_seed(11)
    assert _max_abs(out, _logits(ref, emb)) <= PEFT_TOL
    assert _max_abs(out, _logits(ours.eval(), emb)) > 1e-3  # dropout is really applied in training


def test_only_lora_parameters_train_and_the_base_does_not_move():
    base = _llama()
    model, _ = _ours(base)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.zero_()  # as injected: B moves off zero through its gradient only
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(re.search(r"\.lora_[AB]\.weight$", n) for n in trainable)
    # r·(in + out) per target: q 32->32, v 32->16 (2 KV heads of 8), down 64->32; two layers
    assert sum(p.numel() for p in trainable.values()) == 2 * R * ((32 + 32) + (32 + 16) + (64 + 32)) == 1664
    ref = _peft_twin(base)
    assert sum(p.numel() for p in ref.parameters() if p.requires_grad) == 1664

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)  # all parameters, decay included
    model.train()
    model(inputs_embeds=_embeds(), labels=torch.randint(0, 100, (2, 5), generator=_gen(6))).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # no gradient, so AdamW skips it, weight decay and all
    assert all(layer.lora_B.weight.abs().max() > 0 for _, layer in lora_layers(model))  # B moved off zero


# ----------------------------------------------------------------------------------------------------------
# Merge, unmerge, remove
# ----------------------------------------------------------------------------------------------------------
def test_merged_equals_unmerged_and_uses_only_the_base():
    model, _ = _ours(_llama())
    emb = _embeds()
    unmerged = _logits(model, emb)
    assert merge_lora(model) == [n for n, _ in lora_layers(model)]
    assert _max_abs(_logits(model, emb), unmerged) <= MERGE_TOL
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    h = torch.randn(3, 32, dtype=DT, generator=_gen(7))
    assert torch.equal(layer(h), layer.base_layer(h))  # merged: the base alone computes y
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(ValueError, match="merged"):
        compute_base_checksum(model)
    unmerge_lora(model)
    assert _max_abs(_logits(model, emb), unmerged) <= MERGE_TOL
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_unmerge_restores_within_two_roundings():
    # float32, where rounding is visible. merge stores fl(W + Δ) = (W + Δ)(1 + δ1), unmerge then
    # fl(fl(W + Δ) - Δ) = (W + δ1 (W + Δ))(1 + δ2), |δi| <= u = 2^-24, so element-wise
    # |W' - W| <= u (|W + Δ| + |W|) (1 + u). A wrong sign or scale in unmerge misses W by |Δ| ~ 1 instead.
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    with torch.no_grad():
        base.weight.normal_()
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=8, alpha=16)
    with torch.no_grad():
        layer.lora_A.weight.normal_()
        layer.lora_B.weight.normal_(0, 0.1)
    delta = layer.delta_weight().detach()
    layer.merge()
    layer.unmerge()
    u = 2.0**-24
    err = (base.weight - w0).abs()
    bound = u * ((w0 + delta).abs() + w0.abs()) * (1 + u)
    assert (err <= bound).all(), (err - bound).max()
    assert (
        err.max() > 0
    )  # exercised: ~1/4 of the elements do not round-trip exactly (up to 0.94 of the bound)


def test_remove_lora_gives_a_plain_model_with_the_original_names():
    base = _llama()
    model, _ = _ours(base)
    emb = _embeds()
    expected = _logits(model, emb)
    assert remove_lora(model, merge=True) == [n for n, _ in lora_layers(_ours(base)[0])]
    assert not list(lora_layers(model))
    assert list(model.state_dict()) == list(base.state_dict())  # what a merged export saves
    assert _max_abs(_logits(model, emb), expected) <= MERGE_TOL
    fresh = _llama(seed=9)
    fresh.load_state_dict(model.state_dict())  # strict: same keys, same shapes
    assert torch.equal(_logits(fresh, emb), _logits(model, emb))

    unmerged, _ = _ours(base)
    merge_lora(unmerged)
    remove_lora(unmerged, merge=False)  # unmerges first, then drops the factors
    for n, p in unmerged.state_dict().items():
        assert _max_abs(p, base.state_dict()[n]) <= MERGE_TOL, n


class _ScaledInt8Linear(nn.Module):
    """A stand-in for a quantized linear: int8 weight, one float scale per output row."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", torch.zeros(weight.shape, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(weight.shape[0], 1, dtype=DT))
        self.quantize(weight)

    def quantize(self, w: torch.Tensor) -> None:
        self.scale.copy_(w.abs().amax(dim=1, keepdim=True) / 127)
        self.weight.copy_(torch.round(w / self.scale).to(torch.int8))

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(DT) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dequantize().t()


class _QuantLoRALinear(LoRALinear):
    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.dequantize()

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        self.base_layer.quantize(weight)


def test_merge_goes_through_the_overridable_base_weight_hooks():
    base = _ScaledInt8Linear(torch.randn(6, 10, dtype=DT, generator=_gen(0)))
    layer = _QuantLoRALinear(base, r=2, alpha=2, adapter_dtype=DT)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1, generator=_gen(1))
    x = torch.randn(3, 10, dtype=DT, generator=_gen(2))
    before = layer(x)
    layer.merge()
    # requantizing W0 + ΔW moves each weight by at most half a step, scale/2 (scales are recomputed from
    # the merged rows): |y_merged - y| <= Σ_i |x_i| · scale_o / 2. Skipping the hooks would fail outright.
    assert base.weight.dtype == torch.int8
    bound = x.abs().sum(dim=1, keepdim=True) * base.scale.t() / 2
    assert ((layer(x) - before).abs() <= bound + 1e-12).all()
    assert _max_abs(layer(x), before) > 0  # the update is in the int8 weights now (no exact match)


# ----------------------------------------------------------------------------------------------------------
# Target selection
# ----------------------------------------------------------------------------------------------------------
def test_targets_follow_peft_matching_rules():
    model = _llama()
    by_list = set(find_lora_targets(model, ["self_attn.q_proj", "v_proj"]))
    by_regex = set(find_lora_targets(model, r"model\.layers\.\d+\.self_attn\.(q|v)_proj"))
    assert by_list == by_regex == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"}
    assert set(find_lora_targets(model, ["lm_head"])) == {"lm_head"}  # equal to the entry
    with pytest.raises(ValueError):
        find_lora_targets(model, ["proj"])  # a suffix counts after a "." only: "q_proj" does not match
    with pytest.raises(ValueError):
        find_lora_targets(model, r"q_proj")  # a regex must match the whole name


def test_targets_that_match_nothing_list_the_linear_layers():
    model = _llama()
    with pytest.raises(ValueError) as info:
        inject_lora(model, LoRAConfig(target_modules=["q_proj", "qproj"]))
    msg = str(info.value)
    assert "['qproj']" in msg  # names the entry that matched nothing, not the one that did
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert suffix in msg
    assert msg.count("e.g. model.layers.0.self_attn.q_proj") == 1  # de-duplicated by last name
    with pytest.raises(ValueError, match="match no linear layer"):
        inject_lora(model, LoRAConfig(target_modules=r".*self_attn"))  # matches attention blocks, not linears
    assert _has_no_lora(model)  # refused before anything was changed
    inject_lora(model, LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoRAConfig(target_modules=["k_proj"]))


# ----------------------------------------------------------------------------------------------------------
# Adapter files, both ways with PEFT
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(use_rslora=True, alpha=6.0), dict(target_modules=r".*\.(q_proj|v_proj|down_proj)")],
    ids=["lora", "rslora", "regex"],
)
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, kw):
    base = _llama()
    ours, cfg = _ours(base, **kw)
    save_adapter(ours, tmp_path / "ad", cfg, base_model_name_or_path="tiny-llama")
    written = json.loads((tmp_path / "ad" / ADAPTER_CONFIG_NAME).read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (R, cfg.alpha, cfg.use_rslora)
    assert written["target_modules"] == cfg.target_modules  # they select exactly the wrapped layers
    assert written["base_model_name_or_path"] == "tiny-llama"

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    emb = _embeds()
    assert _max_abs(_logits(loaded, emb), _logits(ours, emb)) <= PEFT_TOL
    # the same tensor names PEFT itself writes for this config
    ref = _peft_twin(base, use_rslora=cfg.use_rslora, lora_alpha=cfg.alpha, target_modules=cfg.target_modules)
    ref.save_pretrained(tmp_path / "peft")
    peft_keys = set(load_file(tmp_path / "peft" / ADAPTER_WEIGHTS_NAME))
    assert set(load_file(tmp_path / "ad" / ADAPTER_WEIGHTS_NAME)) == peft_keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in peft_keys


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(use_rslora=True, lora_dropout=0.05), dict(target_modules=r".*\.(q_proj|v_proj|down_proj)")],
    ids=["lora", "rslora-dropout", "regex"],
)
def test_peft_adapter_loads_in_ours_with_the_same_logits(tmp_path, kw):
    base = _llama()
    ref = _peft_twin(base, **kw)
    g = _gen(3)
    with torch.no_grad():  # random A and B ≠ 0 in PEFT's model: ours starts elsewhere, the file decides
        for n, p in ref.named_parameters():
            if ".lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=g))
    ref.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    cfg = load_adapter(ours, tmp_path / "peft")  # no checksum in PEFT's file: shapes are still checked
    assert (cfg.r, cfg.alpha, cfg.use_rslora) == (R, ALPHA, kw.get("use_rslora", False))
    assert cfg.dropout == kw.get("lora_dropout", 0.0)
    assert len(list(lora_layers(ours))) == 6
    emb = _embeds()
    assert _max_abs(_logits(ours.eval(), emb), _logits(ref.eval(), emb)) <= PEFT_TOL
    assert _max_abs(_logits(ours, emb), _logits(base, emb)) > 1e-2


class _Renamed(nn.Module):
    """A model whose parameter names differ from its HF twin's: everything under `net.`."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.net = hf

    def forward(self, **kw):
        return self.net(**kw)


def _to_hf(name: str) -> str:
    return name.removeprefix("net.")


def test_key_map_translates_names_both_ways(tmp_path):
    base = _llama()
    ours = _Renamed(copy.deepcopy(base))
    cfg = LoRAConfig(r=R, alpha=ALPHA, target_modules=[f"model.layers.{i}.mlp.up_proj" for i in (0, 1)])
    inject_lora(ours, cfg, key_map=_to_hf)  # targets are HF names: full names match only through the map
    _scramble_lora(ours)
    save_adapter(ours, tmp_path / "ad", cfg, key_map=_to_hf)
    assert all(
        k.startswith("base_model.model.model.layers.")
        for k in load_file(tmp_path / "ad" / ADAPTER_WEIGHTS_NAME)
    )
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad")
    emb = _embeds()
    assert _max_abs(_logits(loaded, emb), _logits(ours, emb)) <= PEFT_TOL

    back = _Renamed(copy.deepcopy(base))
    # without the map, "model.layers.0.mlp.up_proj" still selects net.model.layers.0.mlp.up_proj (a suffix),
    # but the file's keys name HF's modules, not ours
    with pytest.raises(ValueError, match=r"missing keys \['base_model\.model\.net\.model"):
        load_adapter(back, tmp_path / "ad")
    load_adapter(back, tmp_path / "ad", key_map=_to_hf)  # the checksum is over HF names: it matches
    assert _max_abs(_logits(back, emb), _logits(ours, emb)) <= PEFT_TOL


# ----------------------------------------------------------------------------------------------------------
# Refusals: the wrong base, broken files
# ----------------------------------------------------------------------------------------------------------
def test_an_adapter_for_another_base_is_refused(tmp_path):
    base = _llama()
    ours, cfg = _ours(base)
    save_adapter(ours, tmp_path / "ad", cfg)
    with safe_open(str(tmp_path / "ad" / ADAPTER_WEIGHTS_NAME), "pt") as f:
        assert f.metadata()["llmlab.base_sha256"] == compute_base_checksum(ours)

    other_shapes = _llama(intermediate_size=48)
    with pytest.raises(
        ValueError, match=re.escape("model.layers.0.mlp.down_proj was trained on a base")
    ) as e:
        load_adapter(other_shapes, tmp_path / "ad")
    assert "[32, 64]" in str(e.value) and "[32, 48]" in str(e.value)  # both shapes, [out, in]
    assert _has_no_lora(other_shapes)

    other_weights = _llama(seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match="other base weights"):
        load_adapter(other_weights, tmp_path / "ad")
    assert _has_no_lora(other_weights)
    load_adapter(other_weights, tmp_path / "ad", check_base=False)  # the caller's decision
    assert len(list(lora_layers(other_weights))) == 6

    same = copy.deepcopy(base)
    with torch.no_grad():  # one weight nudged by one ulp is another base too
        w = same.get_submodule("model.layers.1.self_attn.v_proj").weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(1.0, dtype=DT))
    with pytest.raises(ValueError, match="other base weights"):
        load_adapter(same, tmp_path / "ad")


def _break_weights(tmp_path, how: str) -> None:
    path = tmp_path / "ad" / ADAPTER_WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    sd = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if how == "missing":
        del sd[key]
    elif how == "unexpected":
        sd["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = sd[key].clone()
    elif how == "dtype":
        sd[key] = sd[key].to(torch.int32)
    elif how == "nan":
        sd[key][0, 0] = float("nan")
    elif how == "rank":
        sd[key] = sd[key][:2]
    save_file(sd, path, metadata=metadata)


@pytest.mark.parametrize(
    "how,error,match",
    [
        ("missing", ValueError, r"missing keys \['base_model\.model\.model\.layers\.0\.self_attn\.q_proj"),
        (
            "unexpected",
            ValueError,
            r"unexpected keys \['base_model\.model\.model\.layers\.0\.self_attn\.k_proj",
        ),
        ("dtype", ValueError, "dtype torch.int32"),
        ("nan", ValueError, "NaN"),
        ("rank", ValueError, "rank r=4"),
        ("truncated", ValueError, "not a readable safetensors"),
        ("pickle-only", FileNotFoundError, "pickled weights are never loaded"),
        ("no-config", FileNotFoundError, "adapter_config.json"),
        ("bad-json", ValueError, "not valid JSON"),
        ("dora", ValueError, "use_dora"),
        ("rank-pattern", ValueError, "rank_pattern"),
        ("ia3", ValueError, "only 'LORA'"),
        ("fan-in-fan-out", ValueError, "fan_in_fan_out"),
        ("pissa", ValueError, "modify the base"),
    ],
)
def test_malformed_adapters_are_refused(tmp_path, how, error, match):
    base = _llama()
    ours, cfg = _ours(base)
    save_adapter(ours, tmp_path / "ad", cfg)
    weights, config = tmp_path / "ad" / ADAPTER_WEIGHTS_NAME, tmp_path / "ad" / ADAPTER_CONFIG_NAME
    edits = {
        "dora": {"use_dora": True},
        "rank-pattern": {"rank_pattern": {"q_proj": 8}},
        "ia3": {"peft_type": "IA3"},
        "fan-in-fan-out": {"fan_in_fan_out": True},
        "pissa": {"init_lora_weights": "pissa"},
    }
    if how in ("missing", "unexpected", "dtype", "nan", "rank"):
        _break_weights(tmp_path, how)
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "pickle-only":
        torch.save(load_file(weights), tmp_path / "ad" / "adapter_model.bin")
        weights.unlink()
    elif how == "no-config":
        config.unlink()
    elif how == "bad-json":
        config.write_text("{not json")
    else:
        config.write_text(json.dumps(json.loads(config.read_text()) | edits[how]))
    model = copy.deepcopy(base)
    with pytest.raises(error, match=match):
        load_adapter(model, tmp_path / "ad")
    assert _has_no_lora(model)  # refused before anything was changed


def test_save_checks_the_config_against_the_layers(tmp_path):
    ours, cfg = _ours(_llama())
    with pytest.raises(ValueError, match="differ from the config"):
        save_adapter(ours, tmp_path / "ad", LoRAConfig(r=8, alpha=ALPHA, target_modules=TARGETS))
    merge_lora(ours)
    with pytest.raises(ValueError, match="merged"):
        save_adapter(ours, tmp_path / "ad", cfg)
    unmerge_lora(ours)
    with pytest.raises(ValueError, match="would adapt"):  # PEFT would adapt k_proj too
        save_adapter(ours, tmp_path / "ad", LoRAConfig(r=R, alpha=ALPHA, target_modules=[*TARGETS, "k_proj"]))
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(_llama(), tmp_path / "none", cfg)


@pytest.mark.parametrize("kind", ["int8", "nf4", "nf4-double"])
def test_merging_into_our_quantized_layers_requantizes_the_update(kind):
    """A quantized layer's `weight` is a fresh dequantized tensor: merging by copying into it would change
    nothing and silently drop the update (found so: a QLoRA model merged into its NF4 base scored as the
    untrained base). The merge must requantize W + ΔW: each stored weight then lies within half a
    quantization step of it — int8: the row's scale / 2; NF4: half the widest gap between levels (0.304,
    between -1 and -0.696) times the block's constant (+ that constant's own rounding) — while keeping the
    old base would miss by ΔW itself."""
    from llmlab.nn.quant import Int8Linear, NF4Linear, nf4_levels

    linear = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=_gen(0)) / 8)
    base = (
        Int8Linear.from_linear(linear)
        if kind == "int8"
        else NF4Linear.from_linear(linear, double_quant=kind == "nf4-double")
    )
    torch.manual_seed(0)  # A's Kaiming init
    layer = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.copy_(0.2 * torch.randn(32, 4, generator=_gen(1)))
    w0 = base.dequantized_weight().clone()
    target = w0 + layer.delta_weight().detach()  # [32, 64]
    layer.merge()
    merged = base.dequantized_weight()
    err = (merged - target).abs()
    if kind == "int8":
        bound = base.weight_scale.reshape(-1, 1) / 2 * (1 + 1e-6)  # [32, 1]
    else:
        # + |a - a'|, the stored block constant a' vs the true absmax a of W + ΔW: 0 in float32, the
        # 8-bit rounding of the constant with double quantization (an element at ±a lands on ±a')
        gap = nf4_levels().diff().max().item()
        stored = base.nf4_weight().block_absmax()  # [32 * 64 / 64]
        true = target.reshape(-1, 64).abs().amax(dim=1)
        per_block = gap / 2 * stored * (1 + 1e-6) + (true - stored).abs() + 1e-7  # (+ float32 rounding)
        bound = per_block.repeat_interleave(64).reshape(32, 64)
    assert (err <= bound).all()
    assert err.norm() < 0.5 * (target - w0).norm()  # the update arrived (the old base misses it fully)
    layer.unmerge()
    assert (base.dequantized_weight() - w0).abs().max() <= 2 * bound.max()  # back, up to two roundings
