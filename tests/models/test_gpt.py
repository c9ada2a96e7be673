"""llmlab.models.gpt against HF transformers' GPT2LMHeadModel on tiny random configs, float64: the converter
both ways, logits and every gradient, and a `save_pretrained` directory in both directions.

Both compute the same formulas; they differ in rounding only (HF's fused [d, 3d] Conv1D vs our three [d, d]
Linear layers; addmm vs matmul + bias), ~1e-16 relative, so TOL = 1e-10 leaves orders of margin while a
missing transpose, a wrong q/k/v split or an untied head moves logits by > 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from llmlab.models.gpt import (
    GPT,
    GPTConfig,
    config_from_hf,
    from_hf_state_dict,
    load_hf,
    save_hf,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")

TOL = 1e-10
DT = torch.float64


def _hf(seed: int = 0, **kw):
    cfg = transformers.GPT2Config(
        vocab_size=61, n_positions=24, n_embd=16, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, attn_implementation="eager", **kw,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).to(DT)
    with torch.no_grad():  # LayerNorms and biases away from 1 / 0, so a swap or a dropped bias shows
        for name, p in model.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _ours_from(hf_model) -> GPT:
    cfg = config_from_hf(hf_model.config.to_dict())
    ours = GPT(cfg).to(DT)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()  # scrambled: only the converter can make them equal
    ours.load_state_dict(from_hf_state_dict(hf_model.state_dict(), cfg))
    return ours


def _ids(seed: int = 1, b: int = 3, t: int = 11) -> torch.Tensor:
    return torch.randint(0, 61, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("impl", "activation"), [("fused", "gelu_new"), ("naive", "gelu_new"), ("fused", "gelu")]
)
def test_logits_and_gradients_equal_hf(impl, activation):
    """Both attention paths, and both MLP activations (GPT-2's tanh "gelu_new", nanoGPT's exact "gelu": the
    two differ by up to 5e-4, far above TOL, so reading the wrong one from the config fails)."""
    hf = _hf(activation_function=activation)
    ours = _ours_from(hf)
    ours.set_attention_impl(impl)
    idx = _ids()
    logits, ref = ours(idx), hf(idx).logits
    assert (logits - ref).abs().max() <= TOL
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
    # Our gradients in HF's layout, through the same converter the weights went through.
    probe = GPT(ours.cfg).to(DT)
    probe.load_state_dict(
        {k: v for k, v in g_ours.items()} | {"lm_head.weight": g_ours["transformer.wte.weight"]}
    )
    as_hf = to_hf_state_dict(probe)
    for name, g in g_hf.items():
        assert (as_hf[name] - g).abs().max() <= TOL, name


def test_converter_round_trips_and_ties_the_head():
    hf = _hf(3)
    ours = _ours_from(hf)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    back = to_hf_state_dict(ours)
    for name, value in hf.state_dict().items():
        if name.endswith("attn.masked_bias") or name.endswith("attn.bias"):
            continue  # HF buffers of older checkpoints, not weights
        assert torch.equal(back[name], value), name


def test_our_export_loads_in_transformers_and_an_hf_directory_loads_in_ours(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=4, n_embd=16)).to(DT)
    save_hf(ours, tmp_path / "export")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export", torch_dtype=DT).eval()
    idx = _ids()
    assert (loaded(idx).logits - ours.eval()(idx)).abs().max() <= TOL

    hf = _hf(5)
    hf.save_pretrained(tmp_path / "hf")
    mine = load_hf(tmp_path / "hf")
    assert mine.transformer.wte.weight.dtype == DT  # the checkpoint's dtype
    assert (mine(idx) - hf.eval()(idx).logits).abs().max() <= TOL


def test_unsupported_hf_configs_are_refused():
    base = _hf().config.to_dict()
    for bad in (dict(model_type="llama"), dict(n_inner=7), dict(activation_function="relu"),
                dict(scale_attn_by_inverse_layer_idx=True)):  # fmt: skip
        with pytest.raises(ValueError):
            config_from_hf({**base, **bad})


def test_init_follows_gpt2_and_sequences_longer_than_the_block_are_errors():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=500, block_size=16, n_layer=4, n_head=4, n_embd=64))
    assert abs(m.transformer.wte.weight.std().item() - 0.02) < 0.002
    assert abs(m.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / (2 * 4) ** 0.5) < 0.001
    assert m.n_params == sum(p.numel() for p in m.parameters())
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_activation_checkpointing_changes_no_loss_or_gradient():
    """Checkpointed blocks re-run their forward in backward with the saved RNG state, so even with dropout
    (masks drawn twice) the loss and every gradient are those of the plain model: equal to the last bit
    (same ops, same order), asserted at 1e-12 in float64. A recomputation with fresh dropout masks would
    differ by ~1e-1 (the guard)."""
    cfg = GPTConfig(vocab_size=61, block_size=24, n_embd=16, n_layer=3, n_head=4, dropout=0.2)
    torch.manual_seed(0)
    model = GPT(cfg).to(DT).train()
    idx = torch.randint(0, 61, (3, 20))

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
    model.eval()  # generation never checkpoints (no grad, caches)
    with torch.no_grad():
        assert model(idx).shape == (3, 20, 61)
