"""llmlab.models.llama against HF transformers' LlamaForCausalLM on tiny random configs, float64: the
converter (the q/k permutation) both ways, logits and every gradient, the RoPE frequencies of every supported
scaling, the KV cache, generation, and `save_pretrained` directories in both directions.

Both models compute the same formulas with the same float32 steps (RMSNorm, RoPE angles) and the same
attention kernel (HF built with "sdpa", see `_hf_config`); our pairs-RoPE on P-renumbered q, k rounds exactly
as HF's halves-RoPE (the same products and sums per coordinate), so logits come out equal to the last bit and
gradients within ~1e-13 (summation order in backward). TOL = 1e-10 leaves orders of margin for such float64
rounding (~1e-16 relative, amplified by two layers and a sum over the batch), while a missing permutation, a
wrong GQA head mapping, a mis-scaled frequency or an untied head moves logits by > 1e-2 (weights are scaled
so that attention is sharp and such errors show).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from llmlab.config import ConfigError
from llmlab.models.llama import (
    LLAMA_PRESETS,
    Llama,
    LlamaConfig,
    apply_rope,
    config_from_hf,
    from_hf_state_dict,
    hf_config,
    load_hf,
    rope_inv_freq,
    save_hf,
    to_hf_state_dict,
)
from llmlab.nn.sampling import SampleConfig, generate

transformers = pytest.importorskip("transformers")

TOL = 1e-10  # see module docstring
DT = torch.float64
V = 97
ARCH = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # fmt: skip


def _hf_config(**kw):
    """HF's "sdpa" attention, the kernel ours uses: HF's "eager" path takes the softmax in float32 even in a
    float64 model (~1e-7 off). No bos / eos ids, so HF's generate never stops early."""
    base = ARCH | dict(rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    return transformers.LlamaConfig(**(base | kw))


@torch.no_grad()
def _scramble(model: torch.nn.Module, seed: int) -> None:
    """O(1) activations and sharp attention: matrices N(0, 1/fan_in), embeddings N(0, 1), RMSNorm gains and
    biases away from 1 / 0 — so a swapped, unpermuted or dropped weight shows far above TOL."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if "norm" in name:
            p.copy_(1 + 0.3 * noise)
        elif name.endswith("bias"):
            p.copy_(0.3 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            p.copy_(noise / math.sqrt(p.shape[1]))


def _hf(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_hf_config(**kw)).to(DT).eval()
    _scramble(model, seed)
    return model


def _ours_from(hf_model) -> Llama:
    cfg = config_from_hf(hf_model.config.to_dict())
    ours = Llama(cfg).to(DT)
    _scramble(ours, 99)  # scrambled: only the converter can make them equal
    ours.load_state_dict(from_hf_state_dict(hf_model.state_dict(), cfg))
    return ours


def _ids(seed: int = 1, b: int = 3, t: int = 11) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


CASES = {
    "mha-untied": dict(num_key_value_heads=4),
    "gqa-tied": dict(tie_word_embeddings=True),
    "gqa-linear-naive": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "gqa-llama3-tied": dict(
        hidden_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_parameters=LLAMA3 | {"rope_theta": 10000.0},
    ),
    "mqa-bias": dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_gradients_equal_hf(case):
    """MHA, GQA and MQA; tied and untied head; default, linear and llama3 RoPE; biases; both attention
    paths ("naive" once, with GQA: its explicit kv-head repetition)."""
    hf = _hf(**CASES[case])
    ours = _ours_from(hf)
    if case.endswith("naive"):
        ours.set_attention_impl("naive")
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == ours.cfg.tie_word_embeddings
    idx = _ids()
    logits, ref = ours(idx), hf(idx).logits
    assert _max_err(logits, ref) <= TOL
    w = torch.randn(logits.shape, dtype=DT, generator=torch.Generator().manual_seed(2))
    g_ours = dict(
        zip(
            [n for n, _ in ours.named_parameters()],
            torch.autograd.grad((logits * w).sum(), list(ours.parameters())),
            strict=True,
        )
    )
    g_hf = dict(
        zip(
            [n for n, _ in hf.named_parameters()],
            torch.autograd.grad((ref * w).sum(), list(hf.parameters())),
            strict=True,
        )
    )
    # Our gradients in HF's layout, through the same converter the weights went through (the permutation
    # renumbers parameters, so it renumbers their gradients alike).
    probe = Llama(ours.cfg).to(DT)
    probe.load_state_dict(
        g_ours | {"lm_head.weight": g_ours.get("lm_head.weight", g_ours["model.embed_tokens.weight"])}
    )
    as_hf = to_hf_state_dict(probe)
    assert set(g_hf) <= set(as_hf)
    for name, g in g_hf.items():
        assert _max_err(as_hf[name], g) <= TOL, name


@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.7}, LLAMA3],
    ids=["default", "linear", "dynamic", "llama3"],
)
def test_rope_frequencies_equal_hf_bit_for_bit(scaling):
    """θ_i of every supported rope_type equal HF's `inv_freq` exactly (the same float32 operations)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": "default"} | (scaling or {}) | {"rope_theta": 20000.0}
    hf_cfg = _hf_config(hidden_size=64, max_position_embeddings=64, rope_parameters=params)
    ours = config_from_hf(hf_cfg.to_dict())
    assert ours.rope_scaling == scaling and ours.rope_theta == 20000.0
    theta = rope_inv_freq(ours)  # [8]
    assert theta.dtype == torch.float32 and torch.equal(theta, LlamaRotaryEmbedding(hf_cfg).inv_freq)
    if scaling == LLAMA3:  # the tiny head really has all three llama3 bands (kept, smoothed, divided)
        plain = rope_inv_freq(LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=20000.0))
        ratio = plain / theta  # [8]: 1 (high frequencies), 8 (low), in between (medium)
        assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


def test_rotating_halves_is_rotating_pairs_renumbered():
    """The identity behind the converter, on one head: HF's rotate_half RoPE applied to P x equals P applied
    to our pairs RoPE of x, where P sends pair i's coordinates (2i, 2i+1) to (i, d_h/2 + i). Exactly equal:
    the same products and sums per coordinate."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d_h, t = 8, 5
    x = torch.randn(1, 1, t, d_h, dtype=DT, generator=torch.Generator().manual_seed(0))  # [B, h, T, d_h]
    theta = rope_inv_freq(LlamaConfig(hidden_size=32, num_attention_heads=4))  # [4]
    angles = torch.arange(t).float()[:, None] * theta  # [T, 4]
    cos, sin = angles.cos().to(DT), angles.sin().to(DT)  # [T, 4]
    perm = torch.cat([torch.arange(0, d_h, 2), torch.arange(1, d_h, 2)])  # HF coordinate j holds ours perm[j]
    ours = apply_rope(x, cos, sin)[..., perm]  # P · RoPE_pairs(x)
    hf_cos, hf_sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]  # [1, T, d_h]
    theirs, _ = apply_rotary_pos_emb(x[..., perm], x[..., perm], hf_cos, hf_sin)  # RoPE_halves(P x)
    assert torch.equal(ours, theirs)
    assert _max_err(apply_rope(x, cos, sin), x) > 0.1  # and it is not the identity


def test_without_the_permutation_the_model_is_another_one():
    """Copy HF's weights by name alone, skipping P⁻¹ on q_proj / k_proj: every tensor has the right shape and
    loads, but each head now rotates the wrong coordinate pairs, so the scores and the logits differ (by O(1)
    here). Only the first position is unaffected: at position 0 nothing is rotated, and a query alone attends
    to itself with weight 1."""
    hf = _hf(4)
    ours = _ours_from(hf)
    idx = _ids()
    assert _max_err(ours(idx), hf(idx).logits) <= TOL
    naive = Llama(ours.cfg).to(DT)
    naive.load_state_dict(hf.state_dict())
    err = (naive(idx) - hf(idx).logits).abs().amax(dim=(0, 2))  # [T]: per position
    assert err[0] <= TOL and err[1:].min() > 1e-2


def test_scores_depend_only_on_relative_position():
    """⟨R_m q, R_n k⟩ = ⟨R_{m+c} q, R_{n+c} k⟩. The angles m·θ_i are float32 (as Meta's and HF's): at
    positions < 32 their rounding is < 2e-6 rad, moving a score of |q||k| ~ 16 by < 1e-4 (the tolerance); a
    position-dependent error, e.g. rotating only q, moves it by O(1) (the guard)."""
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4)
    theta = rope_inv_freq(cfg)  # [8]
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=DT, generator=torch.Generator().manual_seed(0))  # [1, 1, 1, d_h]

    def rot(x: torch.Tensor, m: int) -> torch.Tensor:
        angles = torch.tensor([float(m)])[:, None] * theta  # [1, 8]
        return apply_rope(x, angles.cos().to(DT), angles.sin().to(DT)).flatten()  # [d_h]

    for m, n, c in [(0, 3, 7), (5, 2, 20), (1, 9, 13)]:
        assert abs(rot(q, m) @ rot(k, n) - rot(q, m + c) @ rot(k, n + c)) < 1e-4
    assert abs(rot(q, 0) @ rot(k, 3) - rot(q, 0) @ rot(k, 9)) > 0.1  # another distance, another score


def test_converter_round_trips_and_ties_the_head():
    for kw in (dict(tie_word_embeddings=True), dict(attention_bias=True, num_key_value_heads=1)):
        hf = _hf(3, **kw)
        ours = _ours_from(hf)
        back = to_hf_state_dict(ours)
        assert set(back) == set(hf.state_dict())
        assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())
        again = from_hf_state_dict(back, ours.cfg)
        assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())
        # LlamaModel's names (no `model.` prefix, no head) load too when the head is tied
        if ours.cfg.tie_word_embeddings:
            body = {k.removeprefix("model."): v for k, v in back.items() if k != "lm_head.weight"}
            assert torch.equal(from_hf_state_dict(body, ours.cfg)["lm_head.weight"], back["lm_head.weight"])


@pytest.mark.parametrize(
    "arch",
    [
        dict(tie_word_embeddings=True, rope_scaling=LLAMA3, hidden_size=64, max_position_embeddings=64),
        dict(
            num_key_value_heads=4,
            attention_bias=True,
            mlp_bias=True,
            rope_theta=500000.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ],
    ids=["tied-llama3", "untied-bias-linear"],
)
def test_our_export_loads_in_transformers(tmp_path, arch):
    cfg = LlamaConfig(**(ARCH | arch))
    ours = Llama(cfg).to(DT).eval()
    _scramble(ours, 0)
    save_hf(ours, tmp_path / "export")
    loaded = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "export", dtype=DT, attn_implementation="sdpa"
    ).eval()
    assert loaded.config.rope_parameters["rope_type"] == cfg.rope_scaling["rope_type"]
    assert loaded.config.rope_parameters["rope_theta"] == cfg.rope_theta
    idx = _ids()
    assert _max_err(loaded(idx).logits, ours(idx)) <= TOL


@pytest.mark.parametrize("shards", [False, True], ids=["one-file", "sharded"])
def test_an_hf_directory_loads_in_ours(tmp_path, shards):
    hf = _hf(5, rope_parameters=LLAMA3 | {"rope_theta": 10000.0}, hidden_size=64, max_position_embeddings=64)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if shards else "50GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == shards
    mine = load_hf(tmp_path / "hf")
    assert mine.model.embed_tokens.weight.dtype == DT  # the checkpoint's dtype
    assert mine.lm_head.weight.device.type == "cpu"  # not left on the meta device
    idx = _ids()
    assert _max_err(mine(idx), hf(idx).logits) <= TOL


def test_hf_configs_of_both_transformers_versions_read_alike_and_unsupported_ones_are_refused():
    v5 = _hf_config(rope_parameters=LLAMA3 | {"rope_theta": 500000.0}).to_dict()
    legacy_scaling = {("type" if k == "rope_type" else k): v for k, v in LLAMA3.items()}  # pre-4.45 key name
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}  # transformers 4 wrote these two instead:
    v4 |= {"rope_theta": 500000.0, "rope_scaling": legacy_scaling}
    assert config_from_hf(v4) == config_from_hf(v5)
    assert config_from_hf(v5).rope_scaling == LLAMA3
    ours = config_from_hf(v5)
    assert config_from_hf(hf_config(ours)) == ours  # and hf_config is what config_from_hf reads back
    for bad, match in [
        (dict(model_type="mistral"), "not a Llama"),
        (dict(hidden_act="gelu"), "silu"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "default, linear"),
        (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}), "partial_rotary"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "divisible by num_key_value_heads"),
    ]:
        with pytest.raises(ValueError, match=match):
            config_from_hf({**v5, **bad})


def test_bad_configs_are_clear_errors():
    for bad, match in [
        (dict(num_attention_heads=4, num_key_value_heads=3), "not divisible by num_key_value_heads"),
        (dict(hidden_size=30, num_attention_heads=4), "not divisible by num_attention_heads"),
        (dict(head_dim=7), "must be even"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not supported.*llama3"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs low_freq_factor"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 0.5}), "must be >= 1"),
        (dict(rope_scaling={"factor": 2.0}), "None is not supported"),
        (dict(attention_dropout=1.0), "attention_dropout"),
        (dict(attention="flash"), "naive or fused"),
        (dict(num_hidden_layers=0), ">= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            LlamaConfig(**bad)
    with pytest.raises(ValueError, match="vocab_size must be set"):
        Llama(LlamaConfig(vocab_size=0, hidden_size=8, num_attention_heads=2, num_hidden_layers=1))


def _model(seed: int = 0, **kw) -> Llama:
    """Ours alone, float64, with `_scramble`'s weights: sharp attention and peaky next-token distributions
    (the 0.02 init gives near-uniform ones), so a wrong mask or position changes the tokens chosen."""
    m = Llama(LlamaConfig(**(ARCH | dict(max_position_embeddings=48) | kw))).double().eval()
    _scramble(m, seed)
    return m


def test_cache_equals_recomputing_the_prefix():
    """Logits of a prefix run at once, then chunks and single tokens on the cache, equal the full forward:
    the cached keys keep their rotation, new positions continue after them, and the end-aligned causal mask
    lets a chunk see the cache and its own past only. Different kernels (masked vs is_causal), so rounding
    may differ, ~1e-16; TOL as above, against O(1) errors from a wrong position or mask."""
    model = _model(0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    idx = _ids(t=20)
    with torch.no_grad():
        full = model(idx)  # [B, 20, V]
        caches = model.new_caches()
        parts = [model(idx[:, :7], caches), model(idx[:, 7:12], caches)]
        parts += [model(idx[:, i : i + 1], caches) for i in range(12, 20)]
    assert caches[0].k.shape == (3, 2, 20, 8)  # [B, h_kv, T, d_h]: the cache holds the 2 kv heads only
    assert _max_err(torch.cat(parts, dim=1), full) <= TOL
    prompt = idx[:2, :5]
    for cfg in (SampleConfig(max_new_tokens=15, temperature=0), SampleConfig(max_new_tokens=15, top_k=10)):
        a = generate(model, prompt, cfg, generator=torch.Generator().manual_seed(3), use_cache=True)
        b = generate(model, prompt, cfg, generator=torch.Generator().manual_seed(3), use_cache=False)
        assert a.shape == (2, 20) and torch.equal(a, b)


def _hf_twin(model: Llama):
    config = {k: v for k, v in hf_config(model.cfg).items() if k != "architectures"}
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**config, bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    )
    hf.load_state_dict(to_hf_state_dict(model))
    return hf.double().eval()


PROMPT = torch.tensor([[5, 17, 3, 42, 8], [9, 9, 60, 2, 31]])
SETTINGS = [
    SampleConfig(max_new_tokens=20, temperature=0.0),
    SampleConfig(max_new_tokens=20, temperature=0.8),
    SampleConfig(max_new_tokens=20, temperature=1.0, top_k=5),
    SampleConfig(max_new_tokens=20, temperature=1.3, top_p=0.7),
    SampleConfig(max_new_tokens=20, temperature=0.9, top_k=10, top_p=0.9, repetition_penalty=1.5),
]


@pytest.mark.parametrize("cfg", SETTINGS, ids=["greedy", "T0.8", "topk5", "topp0.7", "all+rep1.5"])
def test_generate_equals_hf_generate(cfg):
    """Greedy, and sampled from the same torch RNG state: llmlab.nn.sampling processes logits in HF's order
    with HF's arithmetic (tests/nn/test_sampling.py), so on equal logits the same tokens come out."""
    model = _model(1)  # untied: a tied head with O(1) embeddings mostly predicts the current token again
    hf = _hf_twin(model)
    torch.manual_seed(11)
    ours = generate(model, PROMPT, cfg)
    torch.manual_seed(11)
    kwargs = dict(do_sample=cfg.temperature > 0, max_new_tokens=cfg.max_new_tokens, pad_token_id=0)
    if cfg.temperature > 0:
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or 0, top_p=cfg.top_p or 1.0)
    if cfg.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = cfg.repetition_penalty
    theirs = hf.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), **kwargs)
    assert torch.equal(ours, theirs)
    assert len(set(ours[0, 5:].tolist())) > 5  # not one token repeated


def test_init_presets_and_sequences_longer_than_the_block_are_errors():
    torch.manual_seed(0)
    m = Llama(LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16))  # fmt: skip
    assert abs(m.model.embed_tokens.weight.std().item() - 0.02) < 0.002  # HF's initializer_range
    assert abs(m.model.layers[1].mlp.down_proj.weight.std().item() - 0.02) < 0.002  # no depth scaling
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in m.named_parameters() if "norm" in n)
    assert m.n_params == sum(p.numel() for p in m.parameters())
    with pytest.raises(ValueError, match="block_size=16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    caches = m.new_caches()
    m(torch.zeros(1, 16, dtype=torch.long), caches)
    with pytest.raises(ValueError, match="17 tokens is longer than block_size"):
        m(torch.zeros(1, 1, dtype=torch.long), caches)  # position 16 does not exist either after a cache
    # The presets have their published sizes (built on the meta device: no memory)
    with torch.device("meta"):
        sizes = {name: Llama(LLAMA_PRESETS[name]).n_params for name in ("llama2-7b", "tinyllama-1.1b")}
    assert sizes == {"llama2-7b": 6_738_415_616, "tinyllama-1.1b": 1_100_048_384}


def test_activation_checkpointing_changes_no_loss_or_gradient():
    """Checkpointed blocks re-run their forward in backward with the saved RNG state, so even with attention
    dropout (masks drawn twice) the loss and every gradient are those of the plain model: equal to the last
    bit (same ops, same order), asserted at 1e-12 in float64. A recomputation with fresh dropout masks would
    differ by ~1e-1 (the guard)."""
    model = _model(0, attention_dropout=0.3).train()
    idx = _ids(t=20)

    def loss_and_grads(checkpointing: bool, seed: int = 5):
        model.set_activation_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(seed)
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain = loss_and_grads(False)
    ckpt_loss, ckpt = loss_and_grads(True)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=1e-12)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=0, atol=1e-12, msg=name)
    other_loss, _ = loss_and_grads(False, seed=6)  # guard: other dropout masks give another loss
    assert (other_loss - plain_loss).abs() > 1e-3
    assert len(model.shard_units()) == 2


def test_derived_head_sizes_follow_later_overrides():
    """head_dim / num_key_value_heads left unset are derived when used, so a recipe override of hidden_size
    or of the heads (llmlab's `model.hidden_size=...`) re-derives them instead of keeping a stale value."""
    from llmlab.config import apply_overrides

    @dataclasses.dataclass
    class Holder:
        model: LlamaConfig = dataclasses.field(
            default_factory=lambda: LlamaConfig(vocab_size=50, hidden_size=32, num_attention_heads=4)
        )

    cfg = apply_overrides(Holder(), ["model.hidden_size=64", "model.num_attention_heads=8"])
    assert cfg.model.d_head == 8 and cfg.model.kv_heads == 8
    assert cfg.model.head_dim is None and cfg.model.num_key_value_heads is None
    with pytest.raises(ConfigError, match="divisible"):
        apply_overrides(Holder(), ["model.num_key_value_heads=3"])


# --------------------------------------------------------------------------------------------- LoRA adapters
def test_lora_adapters_move_between_ours_and_peft_with_the_row_permutation(tmp_path):
    """A LoRA update of q_proj / k_proj has the weight's output rows, so it needs the converter's permutation
    too (lora_row_map). Both ways: our adapter on our LLaMA = PEFT loading it onto the HF twin; PEFT's adapter
    on the HF model = ours loading it onto our twin. Without the map, our adapter on the HF model is another
    model (> 1e-2 off), which is what a loader by names alone would silently give."""
    peft = pytest.importorskip("peft")
    from llmlab.models.llama import lora_row_map
    from llmlab.nn.lora import LoRAConfig, inject_lora, load_adapter, lora_layers, save_adapter

    hf = _hf(seed=5)
    ours = _ours_from(hf)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    inject_lora(ours, cfg)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            layer.lora_B.weight.copy_(0.3 * torch.randn(layer.lora_B.weight.shape, generator=g, dtype=DT))
    row_map = lora_row_map(ours.cfg)
    save_adapter(ours, tmp_path / "ours", cfg, row_map=row_map)
    save_adapter(ours, tmp_path / "unmapped", cfg)
    ids = _ids()
    expected = ours(ids)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    assert _max_err(loaded(ids).logits, expected) <= TOL
    wrong = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "unmapped").eval()
    assert _max_err(wrong(ids).logits, expected) > 1e-2

    # PEFT's adapter (trained on HF's layout) into our twin
    loaded.save_pretrained(tmp_path / "peft")
    twin = _ours_from(hf)
    load_adapter(twin, tmp_path / "peft", row_map=row_map)
    assert _max_err(twin(ids), expected) <= TOL
