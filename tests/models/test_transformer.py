"""Tests for llmlab.models.transformer: equal to torch.nn.Transformer (plus embeddings, sinusoidal positions
and a tied output projection) with copied weights; cached decoding equal to teacher forcing.

The twin is built here from torch.nn parts only: nn.Embedding (shared, padding_idx), the positions of §3.5
written out independently (The Annotated Transformer's formula), nn.Transformer (batch_first, dropout 0) and
an nn.Linear that shares the embedding's weight. Comparisons are in float64 on the logits and the gradients of
every parameter. Rounding differs (fused [3d, d] in-projection vs three [d, d], q scaled before vs after
Q Kᵀ); through 2+2 layers with LayerNorm that stays ~1e-14 on O(1) values, so TOL = 1e-10 leaves four
orders of margin, while a misplaced norm, a missing √d_model or a wrong mask moves logits by > 1e-2.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmlab.models.transformer import Transformer, TransformerConfig, sinusoidal_positions

pytestmark = [
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning"),
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning"),
]

DT = torch.float64
TOL = 1e-10  # see module docstring
V, PAD, B, S, T = 23, 0, 3, 7, 6


def _cfg(**kw) -> TransformerConfig:
    base = dict(d_model=16, n_heads=4, encoder_layers=2, decoder_layers=2, d_ff=24, dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _positions(n: int, d: int) -> torch.Tensor:
    """§3.5 written as The Annotated Transformer does, in float64."""
    pe = torch.zeros(n, d, dtype=DT)
    position = torch.arange(0, n, dtype=DT).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d, 2, dtype=DT) * -(math.log(10000.0) / d))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


class TorchTwin(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.d = d
        self.embed = nn.Embedding(V, d, padding_idx=PAD)
        self.core = nn.Transformer(
            d, cfg.n_heads, cfg.encoder_layers, cfg.decoder_layers, cfg.d_ff, dropout=0.0,
            activation=cfg.activation, batch_first=True, norm_first=cfg.norm_first,
        )  # fmt: skip
        if not cfg.use_final_norm:  # the paper's post-norm stacks end without an extra LayerNorm
            self.core.encoder.norm = None
            self.core.decoder.norm = None
        self.proj = nn.Linear(d, V, bias=False)
        self.proj.weight = self.embed.weight

    def forward(self, src, tgt_in, tgt_pad=None):
        pe = _positions(max(src.shape[1], tgt_in.shape[1]), self.d)
        x = self.embed(src) * math.sqrt(self.d) + pe[: src.shape[1]]
        y = self.embed(tgt_in) * math.sqrt(self.d) + pe[: tgt_in.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], dtype=DT)
        pad = src.eq(PAD)
        h = self.core(
            x, y, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad,
            tgt_key_padding_mask=tgt_pad, tgt_is_causal=True,
        )  # fmt: skip
        return self.proj(h)


def _copy_attention(ours, ref_mha) -> None:
    wq, wk, wv = ref_mha.in_proj_weight.chunk(3)
    bq, bk, bv = ref_mha.in_proj_bias.chunk(3)
    for proj, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), (wq, wk, wv), (bq, bk, bv), strict=True):
        proj.weight.copy_(w)
        proj.bias.copy_(b)
    ours.out_proj.load_state_dict(ref_mha.out_proj.state_dict())


@torch.no_grad()
def copy_from_torch(ours: Transformer, ref: TorchTwin) -> None:
    """torch.nn.Transformer's names -> ours (the mapping a converter would use)."""
    ours.src_embed.weight.copy_(ref.embed.weight)
    for mine, theirs in zip(ours.encoder.layers, ref.core.encoder.layers, strict=True):
        _copy_attention(mine.self_attn, theirs.self_attn)
        mine.ffn.fc1.load_state_dict(theirs.linear1.state_dict())
        mine.ffn.fc2.load_state_dict(theirs.linear2.state_dict())
        mine.self_attn_layer_norm.load_state_dict(theirs.norm1.state_dict())
        mine.final_layer_norm.load_state_dict(theirs.norm2.state_dict())
    for mine, theirs in zip(ours.decoder.layers, ref.core.decoder.layers, strict=True):
        _copy_attention(mine.self_attn, theirs.self_attn)
        _copy_attention(mine.encoder_attn, theirs.multihead_attn)
        mine.ffn.fc1.load_state_dict(theirs.linear1.state_dict())
        mine.ffn.fc2.load_state_dict(theirs.linear2.state_dict())
        mine.self_attn_layer_norm.load_state_dict(theirs.norm1.state_dict())
        mine.encoder_attn_layer_norm.load_state_dict(theirs.norm2.state_dict())
        mine.final_layer_norm.load_state_dict(theirs.norm3.state_dict())
    for mine, theirs in ((ours.encoder, ref.core.encoder), (ours.decoder, ref.core.decoder)):
        assert (mine.layer_norm is None) == (theirs.norm is None)
        if mine.layer_norm is not None:
            mine.layer_norm.load_state_dict(theirs.norm.state_dict())


def _twins(cfg: TransformerConfig, seed: int = 0) -> tuple[Transformer, TorchTwin]:
    torch.manual_seed(seed)
    ref = TorchTwin(cfg).to(DT)
    with torch.no_grad():  # LayerNorm affine and biases away from their 1 / 0 init, so a swap shows
        for name, p in ref.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    ours = Transformer(cfg, V, PAD).to(DT)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()  # scrambled: only the copy can make them equal
    copy_from_torch(ours, ref)
    return ours, ref


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, V, (B, S), generator=g)
    src[1, 4:] = PAD  # padded sources of different lengths
    src[2, 2:] = PAD
    tgt = torch.randint(1, V, (B, T), generator=g)
    return src, tgt


def _named_grads(module: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


CONFIGS = {
    "post-norm (published)": dict(),
    "post-norm + final norm (torch default)": dict(final_norm=True),
    "pre-norm": dict(norm_first=True),
    "pre-norm, gelu, naive attention": dict(norm_first=True, activation="gelu", attention="naive"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_torch_transformer_forward_and_gradients(name):
    cfg = _cfg(**CONFIGS[name])
    ours, ref = _twins(cfg)
    src, tgt = _batch()
    logits, ref_logits = ours(src, tgt), ref(src, tgt)
    assert logits.shape == (B, T, V)
    assert (logits - ref_logits).abs().max() <= TOL

    w = torch.randn(logits.shape, dtype=DT, generator=torch.Generator().manual_seed(2))
    g_ours = _named_grads(ours, (logits * w).sum())
    g_ref = _named_grads(ref, (ref_logits * w).sum())
    # Every one of our parameters against the slice of torch's it was copied from. The shared embedding's
    # gradient collects the source, target and output-projection paths on both sides.
    for name, grad in g_ours.items():
        assert (grad - _ref_slice(name, g_ref)).abs().max() <= TOL, name
    assert sum(g.numel() for g in g_ours.values()) == sum(g.numel() for g in g_ref.values())
    assert all(g.abs().sum() > 0 for g in g_ours.values())  # no dead branch


_LAYER_NAMES = {
    "ffn.fc1": "linear1",
    "ffn.fc2": "linear2",
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "encoder_attn.out_proj": "multihead_attn.out_proj",
    "self_attn.out_proj": "self_attn.out_proj",
}


def _ref_slice(name: str, ref: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor of torch's model (a dict by its names) that our parameter `name` corresponds to."""
    if name == "src_embed.weight":
        return ref["embed.weight"]
    stack, _, rest = name.partition(".")  # "encoder" / "decoder", "layers.0.self_attn.q_proj.weight"
    if rest.startswith("layer_norm."):
        return ref[f"core.{stack}.norm.{rest.split('.')[-1]}"]
    _, i, sub = rest.split(".", 2)  # "layers", "0", "self_attn.q_proj.weight"
    prefix = f"core.{stack}.layers.{i}."
    module, _, kind = sub.rpartition(".")
    if module.endswith(("q_proj", "k_proj", "v_proj")):
        attn = module.split(".")[0].replace("encoder_attn", "multihead_attn")
        which = "qkv".index(module[-6])
        return ref[f"{prefix}{attn}.in_proj_{kind}"].chunk(3)[which]
    if module == "final_layer_norm":
        return ref[prefix + ("norm3" if stack == "decoder" else "norm2") + "." + kind]
    return ref[f"{prefix}{_LAYER_NAMES[module]}.{kind}"]


def test_target_padding_mask_changes_nothing_at_real_positions():
    cfg = _cfg()
    ours, ref = _twins(cfg)
    src, tgt = _batch()
    tgt_pad = torch.zeros(B, T, dtype=torch.bool)
    tgt_pad[0, 4:] = True
    tgt = tgt.masked_fill(tgt_pad, PAD)
    memory, pad = ours.encode(src)
    hidden, _ = ours.decode(tgt, memory, pad, tgt_pad_mask=tgt_pad)
    with_mask = ours.lm_head(hidden)
    assert (with_mask - ref(src, tgt, tgt_pad)).abs().max() <= TOL
    without = ours(src, tgt)
    real = ~tgt_pad
    assert (with_mask[real] - without[real]).abs().max() <= TOL


def test_positions_are_the_papers_formula():
    torch.testing.assert_close(sinusoidal_positions(50, 16), _positions(50, 16), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        sinusoidal_positions(5, 16, offset=45), _positions(50, 16)[45:], rtol=0, atol=1e-12
    )
    m = Transformer(_cfg(), V, PAD)
    long = m.positions(1000)  # grows past its initial table
    assert long.shape == (1000, 16)
    torch.testing.assert_close(long[:50].double(), _positions(50, 16), rtol=0, atol=1e-6)


def test_shared_and_tied_embeddings_are_one_tensor_and_init_is_scaled():
    torch.manual_seed(0)
    m = Transformer(_cfg(d_model=64, n_heads=4), 1000, PAD)
    assert m.src_embed.weight is m.tgt_embed.weight is m.lm_head.weight
    assert m.src_embed.weight[PAD].abs().sum() == 0
    std = m.src_embed.weight[1:].std().item()
    assert abs(std - 64**-0.5) < 0.01  # N(0, d^-1/2), not torch's N(0, 1)
    untied = Transformer(_cfg(shared_embeddings=False, tie_output=False), V, PAD)
    assert untied.src_embed.weight is not untied.tgt_embed.weight
    assert untied.lm_head.weight is not untied.tgt_embed.weight
    names = {n for n, _ in untied.named_parameters()}
    assert {"src_embed.weight", "tgt_embed.weight", "lm_head.weight"} <= names


@pytest.mark.parametrize("norm_first", [False, True])
def test_incremental_decoding_equals_teacher_forcing(norm_first):
    """Decoding token by token with KV caches gives the logits of one teacher-forced pass, at every step."""
    torch.manual_seed(0)
    m = Transformer(_cfg(norm_first=norm_first), V, PAD).to(DT).eval()
    src, tgt = _batch()
    full = torch.log_softmax(m(src, tgt), dim=-1)  # [B, T, V]
    memory, pad = m.encode(src)
    state = m.start_decoding(memory, pad)
    steps = [m.decode_step(tgt[:, t], state) for t in range(T)]
    assert state.length == T
    assert (torch.stack(steps, dim=1) - full).abs().max() <= TOL
    # Reordering rows keeps each row's own history: row order reversed == the reversed batch.
    state = m.start_decoding(memory, pad)
    m.decode_step(tgt[:, 0], state)
    state.reorder(torch.tensor([2, 1, 0]))
    nxt = m.decode_step(tgt.flip(0)[:, 1], state)
    assert (nxt - full.flip(0)[:, 1]).abs().max() <= TOL


def test_naive_and_fused_attention_give_the_same_model():
    torch.manual_seed(0)
    m = Transformer(_cfg(), V, PAD).to(DT)
    src, tgt = _batch()
    fused = m(src, tgt)
    m.set_attention_impl("naive")
    assert (m(src, tgt) - fused).abs().max() <= TOL


def test_cross_attention_weights_are_distributions_over_real_source_tokens():
    torch.manual_seed(0)
    m = Transformer(_cfg(), V, PAD).eval()
    src, tgt = _batch()
    w = m.cross_attention(src, tgt)  # [B, h, T, S]
    assert w.shape == (B, 4, T, S)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, 4, T))
    assert (w[2, :, :, 2:] == 0).all()  # padding never attended to


def test_bad_configs_are_errors():
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        TransformerConfig(dropout=1.0)
    with pytest.raises(ValueError, match="pad_id"):
        Transformer(_cfg(), V, pad_id=V)
