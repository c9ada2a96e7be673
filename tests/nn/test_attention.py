"""Tests for llmlab.nn.attention: MultiHeadAttention against torch.nn.MultiheadAttention with copied weights,
naive == fused, and cached decoding == recomputing the prefix.

Comparisons run in float64 on outputs, per-head attention weights and the gradients of every parameter and
every input (of a random weighted sum of the outputs, so each output element carries its own weight). Both
sides compute the same formulas and differ only in rounding: torch scales q before Q Kᵀ, we scale the scores;
for cross-attention its in-projection is one [3d, d] matmul, ours three [d, d] ones. That is a few ulps of
O(1) values (~1e-16); through one softmax and two matmuls of width <= 16 it stays below 1e-14, so
TOL = 1e-12 keeps two orders of margin while a wrong scale (1/d instead of 1/√d), a missing mask or a
transposed head split moves values by ~1e-1.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmlab.nn.attention import KVCache, MultiHeadAttention, build_attention_mask

DT = torch.float64
TOL = 1e-12  # see module docstring
B, T, S, E, H = 3, 5, 7, 16, 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _twins(kdim=None, vdim=None, bias=True, seed=0) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    """(ours, torch's) in float64 with the same weights; ours is scrambled first so the copy matters."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=True).to(DT)
    with torch.no_grad():  # non-zero biases, so a bias that is dropped or misplaced shows
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_(std=0.5)
    ours = MultiHeadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim).to(DT)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
        if ref._qkv_same_embed_dim:
            wq, wk, wv = ref.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = ref.q_proj_weight, ref.k_proj_weight, ref.v_proj_weight
        for proj, w in zip((ours.q_proj, ours.k_proj, ours.v_proj), (wq, wk, wv), strict=True):
            proj.weight.copy_(w)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        if bias:
            for proj, bb in zip(
                (ours.q_proj, ours.k_proj, ours.v_proj), ref.in_proj_bias.chunk(3), strict=True
            ):
                proj.bias.copy_(bb)
            ours.out_proj.bias.copy_(ref.out_proj.bias)
    return ours, ref


def _inputs(kdim=None, vdim=None, seed=1):
    g = _gen(seed)
    q = torch.randn(B, T, E, dtype=DT, generator=g).requires_grad_(True)
    k = torch.randn(B, S, kdim or E, dtype=DT, generator=g).requires_grad_(True)
    v = torch.randn(B, S, vdim or E, dtype=DT, generator=g).requires_grad_(True)
    return q, k, v


def _padding(s: int = S) -> torch.Tensor:
    lengths = torch.tensor([s, 3, 1])  # one full row, one half, one with a single key
    return torch.arange(s)[None, :] >= lengths[:, None]  # [B, S] True = pad


def _ref_grads(module, out, inputs):
    g = _gen(9)
    loss = (out * torch.randn(out.shape, dtype=DT, generator=g)).sum()
    leaves = list(inputs) + list(module.parameters())
    return torch.autograd.grad(loss, leaves)


def _param_grads_in_ref_layout(ours: MultiHeadAttention, grads, n_inputs: int, same_dim: bool):
    """Our gradients regrouped as torch's parameters (in_proj stacked) for a one-to-one comparison."""
    g = dict(zip([n for n, _ in ours.named_parameters()], grads[n_inputs:], strict=True))
    out = list(grads[:n_inputs])
    if same_dim:
        out.append(torch.cat([g["q_proj.weight"], g["k_proj.weight"], g["v_proj.weight"]]))
    else:
        out += [g["q_proj.weight"], g["k_proj.weight"], g["v_proj.weight"]]
    if "q_proj.bias" in g:
        out.append(torch.cat([g["q_proj.bias"], g["k_proj.bias"], g["v_proj.bias"]]))
    out.append(g["out_proj.weight"])
    if "out_proj.bias" in g:
        out.append(g["out_proj.bias"])
    return out


def _ref_param_order(ref: nn.MultiheadAttention) -> list[str]:
    return [n for n, _ in ref.named_parameters()]


MASK_CASES = ["none", "padding", "causal", "padding+causal", "float"]


def _masks(case: str, t: int = T, s: int = S):
    pad = _padding(s) if "padding" in case else None
    attn = None
    if "causal" in case:
        attn = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t).logical_not()  # True = blocked
    if case == "float":
        attn = torch.randn(t, s, dtype=DT, generator=_gen(5))
    return pad, attn


# ----------------------------------------------------------------------------------------------------------
# Equal to torch.nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["naive", "fused"])
@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize(
    "dims", [(None, None, True), (12, 10, True), (None, None, False)], ids=["same", "kvdim", "nobias"]
)
def test_equals_torch_multihead_attention(impl, case, dims):
    kdim, vdim, bias = dims
    ours, ref = _twins(kdim, vdim, bias)
    ours.impl = impl
    q, k, v = _inputs(kdim, vdim)
    pad, attn = _masks(case)
    out_ref, w_ref = ref(
        q, k, v, key_padding_mask=pad, attn_mask=attn, need_weights=True, average_attn_weights=False
    )
    out, _ = ours(q, k, v, key_padding_mask=pad, attn_mask=attn)
    _, w = ours(q, k, v, key_padding_mask=pad, attn_mask=attn, need_weights=True)
    assert (out - out_ref).abs().max() <= TOL
    assert (w - w_ref).abs().max() <= TOL

    g_ref = _ref_grads(ref, out_ref, (q, k, v))
    g_ours = _ref_grads(ours, out, (q, k, v))
    g_ours = _param_grads_in_ref_layout(ours, g_ours, 3, ref._qkv_same_embed_dim)
    names = ["query", "key", "value"] + _ref_param_order(ref)
    assert len(g_ours) == len(g_ref)
    for name, a, b in zip(names, g_ours, g_ref, strict=True):
        assert (a - b).abs().max() <= TOL, name


@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_self_attention_with_is_causal_equals_explicit_mask(impl):
    ours, ref = _twins()
    ours.impl = impl
    x = torch.randn(B, T, E, dtype=DT, generator=_gen(3))
    causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=DT)  # float: 0 / -inf
    out_ref, _ = ref(x, x, x, attn_mask=causal, is_causal=True)
    out, _ = ours(x, is_causal=True)
    assert (out - out_ref).abs().max() <= TOL


@pytest.mark.parametrize("impl", ["naive", "fused"])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_stacked_qkv_equals_torch_forward_and_backward(impl, bias):
    """Self-attention (key and value are the query) takes the stacked [3d, d] GEMM: against torch's
    in_proj, every gradient regrouped, including the input's (which sums three paths)."""
    ours, ref = _twins(bias=bias)
    ours.impl = impl
    x = torch.randn(B, T, E, dtype=DT, generator=_gen(3)).requires_grad_(True)
    causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=DT)
    out_ref, _ = ref(x, x, x, attn_mask=causal)
    out, _ = ours(x, is_causal=True)
    assert (out - out_ref).abs().max() <= TOL
    g_ref = _ref_grads(ref, out_ref, (x,))
    g_ours = _param_grads_in_ref_layout(ours, _ref_grads(ours, out, (x,)), 1, True)
    for name, a, b in zip(["x"] + _ref_param_order(ref), g_ours, g_ref, strict=True):
        assert (a - b).abs().max() <= TOL, name


@pytest.mark.parametrize("cached", [False, True])
def test_stacked_qkv_equals_three_projections(cached):
    """`fused_qkv=False` calls q_proj, k_proj, v_proj one by one: the same outputs, gradients and cache."""
    torch.manual_seed(0)
    m = MultiHeadAttention(E, H).to(DT)
    x = torch.randn(B, T, E, dtype=DT, generator=_gen(4)).requires_grad_(True)
    results = []
    for fused in (True, False):
        m.fused_qkv = fused
        cache = KVCache() if cached else None
        out = m(x[:, :2], is_causal=True, cache=cache)[0]
        if cached:  # a prompt, then one new position after it
            out = torch.cat([out, m(x[:, 2:3], is_causal=True, cache=cache)[0]], dim=1)
        results.append((out, _ref_grads(m, out, (x,)), cache))
    (a, ga, ca), (b, gb, cb) = results
    assert (a - b).abs().max() <= TOL
    for u, w in zip(ga, gb, strict=True):
        assert (u - w).abs().max() <= TOL
    if cached:
        assert (ca.k - cb.k).abs().max() <= TOL and (ca.v - cb.v).abs().max() <= TOL


# ----------------------------------------------------------------------------------------------------------
# naive == fused, weights, masks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MASK_CASES)
def test_naive_equals_fused_forward_and_backward(case):
    torch.manual_seed(0)
    naive = MultiHeadAttention(E, H, impl="naive").to(DT)
    fused = MultiHeadAttention(E, H, impl="fused").to(DT)
    fused.load_state_dict(naive.state_dict())
    q, k, v = _inputs()
    pad, attn = _masks(case)
    outs, grads = [], []
    for m in (naive, fused):
        out, _ = m(q, k, v, key_padding_mask=pad, attn_mask=attn, is_causal=False)
        outs.append(out)
        grads.append(_ref_grads(m, out, (q, k, v)))
    assert (outs[0] - outs[1]).abs().max() <= TOL
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() <= TOL


def test_weights_are_probabilities_that_respect_the_masks():
    m = MultiHeadAttention(E, H, impl="fused").to(DT)
    q, k, v = _inputs()
    pad = _padding()
    _, w = m(q, k, v, key_padding_mask=pad, need_weights=True)  # weights force the naive path
    assert w.shape == (B, H, T, S)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, T, dtype=DT), rtol=0, atol=1e-12)
    assert (w.masked_select(pad[:, None, None, :].expand_as(w)) == 0).all()
    x = torch.randn(B, T, E, dtype=DT)
    _, w = m(x, is_causal=True, need_weights=True)
    assert (w.triu(diagonal=1) == 0).all()


def test_dropout_is_active_in_training_only():
    m = MultiHeadAttention(E, H, dropout=0.5, impl="naive").to(DT)
    q, k, v = _inputs()
    m.eval()
    a, _ = m(q, k, v)
    b, _ = m(q, k, v)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(0)
    c, _ = m(q, k, v)
    assert not torch.allclose(a, c)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="impl"):
        MultiHeadAttention(8, 2, impl="flash")
    m = MultiHeadAttention(E, H)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(torch.randn(B, T, E), key_padding_mask=torch.zeros(B, T + 1, dtype=torch.bool), need_weights=True)


def test_causal_mask_is_aligned_to_the_end_of_the_keys():
    # 2 new queries after 3 cached keys: query 0 is absolute position 3 and sees keys 0..3.
    mask = build_attention_mask(1, 1, 2, 5, is_causal=True, dtype=DT)
    allowed = mask == 0
    assert allowed.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


# ----------------------------------------------------------------------------------------------------------
# KV cache: token by token == the whole prefix at once
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_cached_self_attention_equals_recomputing_the_prefix(impl):
    torch.manual_seed(0)
    m = MultiHeadAttention(E, H, impl=impl).to(DT).eval()
    x = torch.randn(B, T, E, dtype=DT, generator=_gen(4))
    full, _ = m(x, is_causal=True)  # [B, T, E]: every position recomputed over its whole prefix
    cache = KVCache()
    steps = [m(x[:, t : t + 1], is_causal=True, cache=cache)[0] for t in range(T)]
    assert len(cache) == T
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOL
    # Several new positions at once after a cached prefix (a prompt, then tokens) also agree.
    cache = KVCache()
    first, _ = m(x[:, :2], is_causal=True, cache=cache)
    rest, _ = m(x[:, 2:], is_causal=True, cache=cache)
    assert (torch.cat([first, rest], dim=1) - full).abs().max() <= TOL


@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_cached_cross_attention_projects_the_memory_once(impl):
    torch.manual_seed(0)
    m = MultiHeadAttention(E, H, impl=impl).to(DT).eval()
    x = torch.randn(B, T, E, dtype=DT)
    memory = torch.randn(B, S, E, dtype=DT)
    pad = _padding()
    full, _ = m(x, memory, key_padding_mask=pad)
    cache = KVCache()
    steps = []
    for t in range(T):
        # After the first step the memory is not even needed: the cache holds its keys and values.
        mem = memory if t == 0 else memory[:, :0]
        steps.append(m(x[:, t : t + 1], mem, key_padding_mask=pad, cache=cache, static_kv=True)[0])
    assert len(cache) == S
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOL


def test_cache_reorder_follows_the_index():
    cache = KVCache()
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 5)
    cache.append(k, k + 10)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.k[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0]
    assert cache.v[:, 0, 0, 0].tolist() == [12.0, 12.0, 10.0]
