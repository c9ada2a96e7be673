"""The recurrent classifier: unpacked BiRNN with per-sequence reversal equals torch on packed input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from llmlab.models.rnn import (
    RNNClassifierConfig,
    build_rnn_classifier,
    convert_torch_rnn_state_dict,
    reverse_padded,
)

# float64 throughout: the two computations do the same arithmetic in the same order per step, so they agree
# to rounding (~1e-15); 1e-10 leaves room and still catches any real difference (padding leaking in is ~1e-2).
TOL = dict(rtol=0, atol=1e-10)


def _batch(b=5, t=9, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 3, 7, 1, 5])[:b]
    tokens = torch.randint(2, vocab, (b, t), generator=g)
    tokens[torch.arange(t)[None, :] >= lengths[:, None]] = 0
    return tokens, lengths


def test_reverse_padded_reverses_within_each_length_and_is_its_own_inverse():
    x = torch.arange(12).view(3, 4)
    lengths = torch.tensor([4, 2, 1])
    assert reverse_padded(x, lengths).tolist() == [[3, 2, 1, 0], [5, 4, 6, 7], [8, 9, 10, 11]]
    assert torch.equal(reverse_padded(reverse_padded(x, lengths), lengths), x)


def _ours(ref_name: str) -> str:
    """torch's multi-layer name → ours: weight_ih_l1_reverse → rnn.1.bwd.weight_ih_l0 (spelled out here, not
    taken from convert_torch_rnn_state_dict, so that a mix-up there cannot hide in both)."""
    base, _, layer = ref_name.rpartition("_l")
    k, _, reverse = layer.partition("_")
    return f"rnn.{k}.{'bwd' if reverse else 'fwd'}.{base}_l0"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_outputs_final_states_and_every_gradient_equal_torch_on_packed_sequences(cell, layers):
    torch.manual_seed(0)
    cfg = RNNClassifierConfig(cell=cell, vocab_size=50, embed_dim=6, hidden=4, layers=layers, dropout=0.0)
    model = build_rnn_classifier(cfg).double().eval()
    ref = (nn.LSTM if cell == "lstm" else nn.GRU)(
        6, 4, num_layers=layers, bidirectional=True, batch_first=True
    ).double()
    with torch.no_grad():  # scramble first, so that the copy below is what makes them equal
        for p in model.rnn.parameters():
            p.normal_()
    loaded = model.load_state_dict(convert_torch_rnn_state_dict(ref.state_dict(), layers, True), strict=False)
    assert not loaded.unexpected_keys
    assert set(loaded.missing_keys) == {"embedding.weight", "classifier.weight", "classifier.bias"}
    tokens, lengths = _batch()
    emb = model.embedding(tokens)  # the same embedding feeds torch's RNN: its gradient is the input gradient
    packed_out, state = ref(pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False))
    expected, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=tokens.shape[1])
    h_n = state[0] if cell == "lstm" else state
    expected_final = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # the last layer's forward and reverse states
    out, final = model.encode(tokens, lengths)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(final, expected_final, **TOL)

    # Every gradient, of a random weighted sum of all outputs and final states (each element carries its own
    # weight): each RNN parameter of every layer and both directions, and the embedding (the input).
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, dtype=out.dtype, generator=g)
    w_final = torch.randn(final.shape, dtype=final.dtype, generator=g)
    ours = {"embedding.weight": model.embedding.weight, **dict(model.rnn.named_parameters(prefix="rnn"))}
    theirs = {"embedding.weight": model.embedding.weight} | {_ours(n): p for n, p in ref.named_parameters()}
    assert ours.keys() == theirs.keys() and len(ours) == 1 + layers * 2 * 4  # 4 tensors per direction
    grads = torch.autograd.grad((out * w_out).sum() + (final * w_final).sum(), list(ours.values()))
    loss_ref = (expected * w_out).sum() + (expected_final * w_final).sum()
    grads_ref = torch.autograd.grad(loss_ref, list(theirs.values()))
    for name, ours_grad, ref_grad in zip(ours, grads, grads_ref, strict=True):
        assert ref_grad.abs().max() > 1e-3, name  # every gradient is really exercised
        torch.testing.assert_close(ours_grad, ref_grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("pooling", ["max", "mean", "max+mean", "last"])
def test_scratch_layers_give_the_fused_layers_logits_and_gradients(pooling):
    torch.manual_seed(0)
    cfg = RNNClassifierConfig(
        cell="lstm", vocab_size=50, embed_dim=6, hidden=4, layers=2, dropout=0.0, pooling=pooling
    )
    fused = build_rnn_classifier(cfg).double()
    scratch = build_rnn_classifier(RNNClassifierConfig(**{**cfg.__dict__, "impl": "scratch"})).double()
    scratch.load_state_dict(fused.state_dict())
    tokens, lengths = _batch()
    y = torch.tensor([0, 1, 1, 0, 1])
    losses = [nn.functional.cross_entropy(m(tokens, lengths), y) for m in (fused, scratch)]
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(fused.named_parameters(), scratch.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)


def test_extra_padding_changes_nothing():
    torch.manual_seed(0)
    model = build_rnn_classifier(
        RNNClassifierConfig(vocab_size=50, embed_dim=6, hidden=4, dropout=0.0)
    ).eval()
    tokens, lengths = _batch()
    wider = torch.cat([tokens, torch.zeros(5, 6, dtype=tokens.dtype)], dim=1)
    torch.testing.assert_close(model(wider, lengths), model(tokens, lengths), rtol=0, atol=1e-6)


def test_max_plus_mean_pooling_is_the_max_and_the_mean_features_side_by_side():
    """max+mean's classifier, split in its two halves, gives the max model's logits plus the mean model's
    (same embedding and RNN weights). Swapping the halves, or letting padding into either pool, moves the
    logits by 0.6 to 1.7 here; float64 and the same arithmetic keep the rest at rounding (TOL)."""
    torch.manual_seed(0)
    both = build_rnn_classifier(
        RNNClassifierConfig(vocab_size=50, embed_dim=6, hidden=4, dropout=0.0, pooling="max+mean")
    )
    both = both.double().eval()
    half = 2 * 4  # D*H
    assert both.classifier.in_features == 2 * half
    with torch.no_grad():
        both.classifier.weight.normal_()  # every weight matters, in its own half
    logits = []
    for pooling, cols, bias in (
        ("max", slice(0, half), both.classifier.bias),
        ("mean", slice(half, None), None),
    ):
        one = (
            build_rnn_classifier(RNNClassifierConfig(**{**both.cfg.__dict__, "pooling": pooling}))
            .double()
            .eval()
        )
        state = {k: v for k, v in both.state_dict().items() if not k.startswith("classifier")}
        state["classifier.weight"] = both.classifier.weight[:, cols]
        state["classifier.bias"] = bias if bias is not None else torch.zeros_like(both.classifier.bias)
        one.load_state_dict(state)
        logits.append(one(*_batch()))
    torch.testing.assert_close(both(*_batch()), logits[0] + logits[1], **TOL)


def test_converter_rejects_foreign_keys():
    with pytest.raises(ValueError, match="unknown"):
        convert_torch_rnn_state_dict({"weight_ih_l0": torch.zeros(1), "bogus": torch.zeros(1)}, 1, False)


def test_lstm_forget_gate_bias_starts_at_one():
    model = build_rnn_classifier(RNNClassifierConfig(vocab_size=50, embed_dim=6, hidden=4, layers=2))
    for layer in model.rnn:
        for rnn in (layer.fwd, layer.bwd):
            assert torch.all(rnn.bias_ih_l0[4:8] == 1) and torch.all(rnn.bias_hh_l0[4:8] == 0)
            assert not torch.all(rnn.bias_ih_l0[:4] == 1)  # the other gates keep torch's init
    gru = build_rnn_classifier(RNNClassifierConfig(cell="gru", vocab_size=50, embed_dim=6, hidden=4))
    assert not torch.all(gru.rnn[0].fwd.bias_ih_l0[4:8] == 1)


def test_word_type_dropout_drops_every_occurrence_of_a_word_and_keeps_the_expectation():
    """embed_dropout: in training a word is dropped everywhere in the batch or kept everywhere, scaled by
    1/(1 − p); in evaluation the embeddings are untouched. Element-wise dropout (a different mask per
    position) fails the first check, a missing 1/(1 − p) the second, dropping in evaluation the last."""
    p, vocab = 0.25, 2000
    torch.manual_seed(0)
    cfg = RNNClassifierConfig(vocab_size=vocab, embed_dim=8, hidden=4, embed_dropout=p)
    model = build_rnn_classifier(cfg)
    tokens = torch.randint(1, vocab, (16, 300))  # [B, T]: most words occur several times
    emb = model.embedding(tokens)  # [B, T, E]
    model.train()
    x = model.embed(tokens)  # [B, T, E]
    ratio = (x / emb)[..., 0]  # [B, T]: 0 where dropped, 1/(1 − p) where kept
    assert ((ratio == 0) | torch.isclose(ratio, torch.tensor(1 / (1 - p)))).all()
    torch.testing.assert_close(x, emb * ratio[..., None], rtol=1e-6, atol=0)
    dropped = {}
    for word, r in zip(tokens.flatten().tolist(), ratio.flatten().tolist(), strict=True):
        assert dropped.setdefault(word, r == 0) == (r == 0), word  # the same fate at every occurrence
    # the share of dropped words is p: sd sqrt(p(1 − p)/n) ≈ 0.01 over n ≈ 1,800 distinct words; 5 sd
    assert abs(sum(dropped.values()) / len(dropped) - p) < 0.05
    # the expectation is kept: the mean over 400 masks is within 4 sd (sd = |e| sqrt(p/(1 − p)/400))
    mean = torch.stack([model.embed(tokens[:1, :20]) for _ in range(400)]).mean(0)  # [1, 20, E]
    e = emb[:1, :20]
    assert ((mean - e).abs() <= 4 * e.abs() * (p / (1 - p) / 400) ** 0.5 + 1e-6).all()
    model.eval()
    assert torch.equal(model.embed(tokens), emb)
    with pytest.raises(ValueError, match="embed_dropout"):
        RNNClassifierConfig(embed_dropout=1.0)
