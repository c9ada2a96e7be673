"""Our LLaMA loaded through bitsandbytes itself (transformers' `BitsAndBytesConfig`, 8-bit and 4-bit, which
run on the CPU with bitsandbytes >= 0.45) against the same model quantized by llmlab.nn.quant; and a smoke run
of benchmarks/quant_table.py, so the quantization table cannot rot.

References: LLM.int8() (Dettmers, Lewis, Belkada & Zettlemoyer 2022), QLoRA / NF4 and double quantization
(Dettmers, Pagnoni, Holtzman & Zettlemoyer 2023), bitsandbytes (0.50) and its transformers integration.

A tiny random LLaMA of ours (hidden 64, 2 layers, 4 query heads over 2 key/value heads, vocabulary 100) is
written with `save_hf` and loaded with `LlamaForCausalLM.from_pretrained(..., quantization_config=...)`.
bitsandbytes replaces the 14 projections and keeps `lm_head`; ours is
`quantize_model(..., skip=("lm_head",))`. Two kinds of checks:
(a) the quantized weights bitsandbytes holds equal ours, bit for bit, once HF's q/k row order is mapped back
    to ours with llama.py's converter (`from_hf_state_dict`);
(b) the logits of bitsandbytes' model against our quantized model's, with tolerances stated where used, each
    far below the quantization error itself (the unquantized model's logits must fall outside).
Where bitsandbytes' CPU path computes differently from ours (fp16 activations in LLM.int8, bf16 in 4-bit
inference on AVX512-BF16 CPUs) the test says so and measures that difference.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

import bitsandbytes.functional as bnbF  # noqa: E402

from benchmarks.quant_table import CONFIGS, main  # noqa: E402
from llmlab.models.llama import Llama, LlamaConfig, from_hf_state_dict, save_hf  # noqa: E402
from llmlab.nn.quant import (  # noqa: E402
    DYNAMIC_MAP_8BIT,
    Int8Linear,
    LLMInt8Linear,
    quantize_model,
    quantize_nf4,
    unpack_4bit,
)
from llmlab.runner import run  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
LUT_BIN = 2.0 / 65535  # bnb's CPU 8-bit quantizer rounds through a 65,536-entry table over [-1, 1]
OUTLIER_DIM = 5

NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}
BNB_CONFIGS = {
    "int8": {"load_in_8bit": True},
    "nf4": NF4,
    "nf4-dq": {**NF4, "bnb_4bit_use_double_quant": True},
}


@pytest.fixture(autouse=True)
def _quiet():
    """bnb logs "inputs will be cast from float32 to float16" at every LLM.int8 call; transformers draws a
    progress bar per load."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Llama, Path, Tensor]:
    """(our fp32 model, its save_hf directory, token ids [2, 16]).

    Sizes: every in_features (64 or 128) is a multiple of NF4's block of 64, so each block lies inside one
    row and permuting rows (HF's q/k order vs ours) permutes whole blocks: the two layouts quantize to the
    same blocks, and bnb's codes and absmax map back to ours exactly. With hidden 32 a block would span two
    rows, the permutation would pair different rows in a block, and the absmax (hence every code) would
    differ: no like-for-like comparison. k_proj / v_proj have 2 x 16 = 32 rows, the multiple of 32 bnb's
    AVX512-BF16 CPU repacking of 4-bit weights needs (it fails on 16 rows).
    Weights are rounded to fp16-exact values: bnb quantizes the fp16 cast of the weight for LLM.int8 (and the
    activations, see below), so its int8 codes and ours come from the very same numbers.
    One systematic outlier feature (the LLM.int8 paper's emergent features: a few hidden dimensions with
    large magnitude in nearly every token): embedding column 5 is 0.5 for every token, 25x the others' std
    0.02, so after RMSNorm it is ~7.6 > threshold 6 in every row, in the inputs of q/k/v/gate/up of both
    layers.
    Being above the threshold in every row, bnb and ours take the same outlier columns and row scales.
    """
    cfg = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, OUTLIER_DIM] = 0.5
        for p in model.parameters():
            p.copy_(p.half().float())
    folder = save_hf(model, tmp_path_factory.mktemp("tiny-llama") / "hf")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, folder, ids


def _load_bnb(folder: Path, kind: str) -> nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(
        folder, quantization_config=transformers.BitsAndBytesConfig(**BNB_CONFIGS[kind]), dtype=torch.float32
    ).eval()


def _ours(model: Llama, method: str, double_quant: bool = False) -> Llama:
    q = copy.deepcopy(model)
    quantize_model(q, method, skip=("lm_head",), double_quant=double_quant)
    return q


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]


def _to_our_rows(per_layer: dict[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    """Tensors whose dim 0 follows a layer's output rows in HF's order ({layer name: tensor}) in our order:
    q_proj / k_proj rows go through the converter's P^-1, the others stay as they are."""
    hf = {f"{n}.weight": t for n, t in per_layer.items()}
    hf["lm_head.weight"] = torch.zeros(1)  # from_hf_state_dict wants the untied head; not used here
    ours = from_hf_state_dict(hf, cfg)
    return {n: ours[f"{n}.weight"] for n in per_layer}


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(input_ids=ids) if isinstance(model, transformers.PreTrainedModel) else model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_bnb_keeps_the_head_and_quantizes_our_linears(tiny):
    model, folder, _ = tiny
    names = _linear_names(model)
    assert len(names) == 14
    for kind, cls in (("int8", bnb.nn.Linear8bitLt), ("nf4", bnb.nn.Linear4bit)):
        hf = _load_bnb(folder, kind)
        assert [n for n, m in hf.named_modules() if isinstance(m, cls)] == names  # the skip list we mirror
        assert type(hf.lm_head) is nn.Linear
        assert torch.equal(hf.lm_head.weight, model.lm_head.weight)


# ----------------------------------------------------------------------------------------------------------
# LLM.int8
# ----------------------------------------------------------------------------------------------------------
def test_bnb_int8_weights_equal_ours(tiny):
    model, folder, _ = tiny
    hf = _load_bnb(folder, "int8")  # no forward yet: afterwards bnb moves SCB from the weight to its state
    ours = _ours(model, "llm.int8")
    names = _linear_names(model)
    codes = _to_our_rows({n: hf.get_submodule(n).weight.data for n in names}, model.cfg)
    absmax = _to_our_rows({n: hf.get_submodule(n).weight.SCB for n in names}, model.cfg)
    for n in names:
        layer = ours.get_submodule(n)
        assert codes[n].dtype == torch.int8
        assert torch.equal(codes[n], layer.weight_codes)
        assert torch.equal(absmax[n] / 127, layer.weight_scale)  # bnb stores the absmax, we absmax / 127


def test_bnb_int8_dequantized_model_equals_ours_weight_only(tiny):
    """In training mode bnb 0.50's CPU path (`MatMul8bitFp`) multiplies by the dequantized int8 weight without
    rounding the activations: the same model as our weight-only `Int8Linear`. Tolerance 1e-5 relative: the
    dequantized weights agree to 2.5 eps each (tests/nn/test_quant.py), the rest is float32 reassociation
    (measured 1.2e-7). Int8 rounding itself moves this model's logits by 0.3%, and a scale of absmax / 128
    instead of / 127 would move them by 0.4%: both far outside."""
    model, folder, ids = tiny
    hf = _load_bnb(folder, "int8").train()  # no dropout in this model: train() only selects bnb's path
    ours = _ours(model, "int8")
    assert all(type(ours.get_submodule(n)) is Int8Linear for n in _linear_names(model))
    got, want, fp32 = _logits(hf, ids), _logits(ours, ids), _logits(model, ids)
    assert _rel(got, want) < 1e-5
    assert _rel(fp32, want) > 100 * 1e-5  # the unquantized model is outside the tolerance


class _Fp16Activations(nn.Module):
    """Our LLMInt8Linear fed what bitsandbytes' CPU LLM.int8 quantizes: the input rounded to fp16 (bnb casts A
    to float16 before `int8_vectorwise_quant`), except in outlier columns, which bnb multiplies from the
    original float32 input."""

    def __init__(self, layer: LLMInt8Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        outlier = (x.abs() >= self.layer.threshold).reshape(-1, x.shape[-1]).any(dim=0)  # [in]
        return self.layer(torch.where(outlier, x, x.half().float()))


def test_bnb_llm_int8_model_equals_ours(tiny):
    """bnb's eval-mode LLM.int8 (int8 x int8 products, outlier feature 5 in float32) against ours.

    Plain ours differs from bnb by 0.13% of the logits, a third of the whole int8 error (0.36%): bnb rounds
    the activations to fp16 before quantizing them, which flips a few int8 codes in the first layer, and from
    then on the two models' activations differ, so later roundings are partly independent draws. Feeding ours
    the same fp16-rounded activations (`_Fp16Activations`) makes the first layers' int8 products identical;
    what is left is bnb's rescaling constant (6.200124e-05 for 1/127^2, 1.8e-5 relative; see
    tests/nn/test_quant.py) and float32 rounding, which at the next layers change the fp16 rounding of ~1% of
    the activations by one fp16 step and so a few codes: measured 1.8e-4. Tolerance 5e-4: the unquantized
    model (3.6e-3) and ours without the outlier decomposition (threshold 0: the 7.6 outliers set every row's
    scale, 4.4e-3) fall outside.
    """
    model, folder, ids = tiny
    hf = _load_bnb(folder, "int8")
    ours = _ours(model, "llm.int8")
    for n in _linear_names(model):
        parent, _, child = n.rpartition(".")
        setattr(ours.get_submodule(parent), child, _Fp16Activations(ours.get_submodule(n)))
    got, want = _logits(hf, ids), _logits(ours, ids)
    assert hf.model.layers[0].self_attn.q_proj.state.idx.tolist() == [OUTLIER_DIM]  # bnb saw the outlier
    tol = 5e-4
    assert _rel(got, want) < tol
    assert _rel(got, _logits(model, ids)) > 4 * tol
    no_decomposition = copy.deepcopy(model)
    quantize_model(no_decomposition, "llm.int8", skip=("lm_head",), threshold=0.0)
    assert _rel(got, _logits(no_decomposition, ids)) > 4 * tol


# ----------------------------------------------------------------------------------------------------------
# NF4
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nf4", "nf4-dq"])
def test_bnb_nf4_weights_equal_ours(tiny, kind):
    model, folder, _ = tiny
    double_quant = kind == "nf4-dq"
    hf = _load_bnb(folder, kind)  # no forward: bnb's CPU inference may repack the weight at the first one
    ours = _ours(model, "nf4", double_quant=double_quant)
    names = _linear_names(model)
    layers = {n: ours.get_submodule(n) for n in names}
    shape = {n: (layers[n].out_features, layers[n].in_features) for n in names}
    states = {n: hf.get_submodule(n).weight.quant_state for n in names}
    assert all(s.blocksize == 64 and s.nested == double_quant for s in states.values())
    # codes and dequantized weights as [out, in] matrices, block statistics as [out, in / 64]: row-shaped
    codes = _to_our_rows(
        {
            n: unpack_4bit(hf.get_submodule(n).weight.data, shape[n][0] * shape[n][1]).view(shape[n])
            for n in names
        },
        model.cfg,
    )
    deq = _to_our_rows(
        {n: bnbF.dequantize_4bit(hf.get_submodule(n).weight.data, states[n]) for n in names}, model.cfg
    )
    stat = _to_our_rows({n: states[n].absmax.view(shape[n][0], -1) for n in names}, model.cfg)
    for n in names:
        layer = layers[n]
        assert torch.equal(codes[n], unpack_4bit(layer.weight_packed, codes[n].numel()).view(shape[n]))
        if not double_quant:
            assert torch.equal(stat[n].reshape(-1), layer.absmax)
            assert torch.equal(deq[n], layer.dequantized_weight())
            continue
        # Double quantization: the fp32 block constants (the same set in both orders) are centred on their
        # mean and quantized with the dynamic map, one nested block (<= 256 constants per layer here). The
        # mean is a float32 sum in another order: equal to an ulp or two; the nested scale follows from it.
        state = states[n]
        assert abs(state.offset.item() - layer.absmax_offset.item()) <= 2 * EPS32 * layer.absmax_offset.item()
        assert torch.allclose(state.state2.absmax, layer.absmax_scale, rtol=4 * EPS32, atol=0)
        # Nested codes: ours is the nearest code; bnb's CPU kernel looks it up in a 65,536-entry table, so it
        # may take the neighbour when v is within one table bin of a midpoint (tests/nn/test_quant.py): its
        # code is then at most LUT_BIN farther from v. Measured: 0-2 of 64-128 codes per layer.
        true_absmax = quantize_nf4(model.get_submodule(n).weight.detach()).absmax  # ours order, fp32
        v = (true_absmax - layer.absmax_offset) / layer.absmax_scale
        code = DYNAMIC_MAP_8BIT
        bnb_codes = stat[n].reshape(-1).long()
        d_ours, d_bnb = (v - code[layer.absmax_codes.long()]).abs(), (v - code[bnb_codes]).abs()
        assert (d_bnb <= d_ours + LUT_BIN + 4 * EPS32).all()
        assert (bnb_codes != layer.absmax_codes.long()).sum() <= 0.05 * bnb_codes.numel()
        same = (bnb_codes == layer.absmax_codes.long()).repeat_interleave(64).view(shape[n])
        assert torch.equal(deq[n][same], layer.dequantized_weight()[same])


def _fp32_4bit_path(hf: nn.Module) -> nn.Module:
    """Turn off bnb 0.50's CPU repacking: on a CPU with AVX512-BF16, `Linear4bit` in eval mode without
    gradients converts its weight at the first forward to a layout with bfloat16 block constants and
    multiplies in bfloat16, whatever bnb_4bit_compute_dtype says. Without it (as on other CPUs) it
    dequantizes to the compute dtype and runs F.linear."""
    for m in hf.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return hf


@pytest.mark.parametrize("kind, tol", [("nf4", 1e-5), ("nf4-dq", 1e-3)])
def test_bnb_nf4_model_equals_ours(tiny, kind, tol):
    """float32 path: the same dequantized weights (test above) through the same float32 F.linear, so the
    logits agree to float32 reassociation, 1e-5 (measured 1.5e-7). With double quantization, the 1-2 nested
    codes per layer that bnb's table rounds to a neighbour move one block constant by one gap of the dynamic
    map (here <= 1e-4 of constants ~0.05): 1e-3 (measured 1.2e-5). NF4 moves this model's logits by ~4%:
    the unquantized model, and any wrong block constant or code, is far outside."""
    model, folder, ids = tiny
    hf = _fp32_4bit_path(_load_bnb(folder, kind))
    ours = _ours(model, "nf4", double_quant=kind == "nf4-dq")
    got, want = _logits(hf, ids), _logits(ours, ids)
    assert _rel(got, want) < tol
    assert _rel(_logits(model, ids), want) > 0.02


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq"])
def test_bnb_nf4_default_cpu_path_within_bf16_rounding(tiny, kind):
    """bnb's 4-bit inference as it runs by default. On an AVX512-BF16 CPU (this one) it computes in bfloat16
    with bf16 block constants (`_fp32_4bit_path`): every activation and block constant rounded to 2^-9
    relative. 1e-2 is what those roundings would give if all 28 (an input and a set of constants per layer)
    added in quadrature at full size (sqrt(28) x 2^-9 = 1.0%); measured 0.13%. On other CPUs this is the
    float32 path above. NF4's own error on this model, ~4%, must stay outside: the fp32 model fails."""
    model, folder, ids = tiny
    hf = _load_bnb(folder, kind)
    ours = _ours(model, "nf4", double_quant=kind == "nf4-dq")
    got, want = _logits(hf, ids), _logits(ours, ids)
    assert _rel(got, want) < 1e-2
    assert _rel(_logits(model, ids), want) > 3 * 1e-2


# ----------------------------------------------------------------------------------------------------------
# benchmarks/quant_table.py
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quant_table_on_a_smoke_run(tmp_path):
    """The table of a `llama-pretrain --preset smoke` run, widened to hidden 64 / SwiGLU 128: the preset's
    hidden 32 gives k_proj 16 rows, which bnb's 4-bit CPU repacking cannot take (it needs multiples of 32), so
    the bitsandbytes NF4 rows would hold errors. Every row must come back with figures; the bytes must follow
    the formats; the small losses must hold the known order (measured on this model after 50 or 150 steps:
    KL from fp32 ~7e-7 for int8, ~6e-6 for bf16 / LLM.int8, ~1.3e-4 for NF4; |delta loss| <= 1e-3)."""
    out = tmp_path / "run"
    overrides = [
        "model.hidden_size=64",
        "model.intermediate_size=128",
        "samples.count=0",
        "train.max_steps=50",  # of the preset's 150: the order below does not need a trained model
        "train.eval_every=0",
    ]
    run("llama-pretrain", "smoke", overrides, out=out, device="cpu")
    assert main([str(out), "--batches", "2", "--out", str(tmp_path / "table.json")]) == 0
    result = json.loads((tmp_path / "table.json").read_text())
    rows = {(r["config"], r["impl"]): r for r in result["rows"]}
    assert list(rows) == [(c.name, c.impl) for c in CONFIGS]
    assert not [r["error"] for r in rows.values() if "error" in r]
    assert result["val_batches"] == 2 and len(result["quantized_layers"]) == 14

    # bytes: ours and bnb store the same; per format, from the shapes (out, in) of one block's 7 projections
    for name, impl in (("fp32", "transformers"), ("LLM.int8 (t=6)", "bitsandbytes"), ("NF4", "bitsandbytes"),
                       ("NF4 + double quant", "bitsandbytes")):  # fmt: skip
        assert rows[(name, "ours")]["weight_bytes"] == rows[(name, impl)]["weight_bytes"]
        assert rows[(name, "ours")]["linear_bytes"] == rows[(name, impl)]["linear_bytes"]
    d, f, kv = 64, 128, 32  # hidden, SwiGLU width, k/v rows (2 key/value heads of 16)
    shapes = 2 * [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]  # q k v o gate up down, 2 layers
    n, out_rows = sum(o * i for o, i in shapes), sum(o for o, _ in shapes)
    blocks = n // 64  # every in_features divides by 64: no partial block; <= 256 blocks per layer
    linear = {key: r["linear_bytes"] for key, r in rows.items()}
    assert linear[("fp32", "ours")] == 4 * n and linear[("bf16", "ours")] == 2 * n
    assert linear[("int8 absmax/row", "ours")] == linear[("LLM.int8 (t=6)", "ours")] == n + 4 * out_rows
    assert linear[("NF4", "ours")] == n // 2 + 4 * blocks  # 2 codes per byte + fp32 absmax per block
    # + uint8 absmax codes, one fp32 nested scale and one fp32 mean per layer
    assert linear[("NF4 + double quant", "ours")] == n // 2 + blocks + 14 * (4 + 4)
    embedding = rows[("fp32", "ours")]["weight_bytes"] - linear[("fp32", "ours")]  # + norms, head tied
    assert all(
        r["weight_bytes"] - r["linear_bytes"] == embedding for key, r in rows.items() if key[0] != "bf16"
    )

    # quality: fp32 through transformers is our model; bf16 and int8 stay close; NF4 moves more than int8
    fp32_hf = rows[("fp32", "transformers")]
    assert abs(fp32_hf["delta_loss"]) < 1e-5 and abs(fp32_hf["kl_vs_fp32"]) < 1e-7
    close = [
        ("bf16", "ours"),
        ("int8 absmax/row", "ours"),
        ("LLM.int8 (t=6)", "ours"),
        ("LLM.int8 (t=6)", "bitsandbytes"),
    ]
    nf4 = [key for key in rows if key[0].startswith("NF4")]
    assert all(abs(rows[key]["delta_loss"]) < 0.01 for key in close)  # measured <= 5e-4
    assert all(abs(rows[key]["delta_loss"]) < 0.05 for key in nf4)  # measured <= 1e-3
    assert min(rows[key]["kl_vs_fp32"] for key in nf4) > 3 * max(rows[key]["kl_vs_fp32"] for key in close)
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
