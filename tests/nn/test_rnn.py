"""Tests for llmlab.nn.rnn: LSTM and GRU against torch.nn.LSTM / torch.nn.GRU with copied weights.

Every comparison is in float64, on outputs, final states and the gradients of every parameter, of the input
and of the initial states (of a random weighted sum of all outputs and final states, so every element of
every output carries its own weight into the gradient). Both implementations compute the same formulas;
they differ only in rounding (summation order inside matrix products, fused vs separate additions), a few
ulps of O(1) values, ~1e-16. Six time steps and three layers amplify that by little (all gates and tanh
have derivatives <= 1), so OUT_TOL = 1e-12 for forward values and GRAD_TOL = 1e-10 for gradients keep
four to six orders of margin, while any wrong term, gate order or masking error changes values by ~1e-2.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from llmlab.nn import GRU, LSTM

DT = torch.float64
OUT_TOL = 1e-12  # see module docstring
GRAD_TOL = 1e-10  # see module docstring

IN, H, B, T = 4, 3, 4, 6
LENGTHS = [3, 5, 1, 4]  # unsorted (exercises sorted_indices), max < T (an all-padding last step), one of 1

MODES = {"LSTM": (LSTM, nn.LSTM), "GRU": (GRU, nn.GRU)}
CONFIGS = [
    dict(num_layers=1, bidirectional=False, batch_first=False, bias=True, init=False),
    dict(num_layers=2, bidirectional=False, batch_first=True, bias=True, init=True),
    dict(num_layers=1, bidirectional=True, batch_first=True, bias=False, init=True),
    dict(num_layers=2, bidirectional=True, batch_first=False, bias=True, init=True),
    dict(num_layers=3, bidirectional=True, batch_first=True, bias=False, init=False),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def _twins(mode: str, seed: int = 0, **kw) -> tuple[nn.Module, nn.Module]:
    """(ours, torch's) in float64 with the same weights, copied across with load_state_dict."""
    ours_cls, ref_cls = MODES[mode]
    torch.manual_seed(seed)
    ref = ref_cls(IN, H, **kw).to(DT)
    ours = ours_cls(IN, H, **kw).to(DT)
    with torch.no_grad():  # scramble first, so that the copy below is what makes them equal
        for p in ours.parameters():
            p.normal_()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _states(mode: str, h_n):
    return h_n if mode == "LSTM" else (h_n,)


def _inputs(mode: str, cfg: dict, seed: int = 1):
    """x (padded, in the config's layout) and hx (or None), all leaves that require grad."""
    g = _gen(seed)
    shape = (B, T, IN) if cfg["batch_first"] else (T, B, IN)
    x = torch.randn(shape, dtype=DT, generator=g).requires_grad_(True)
    hx = None
    if cfg["init"]:
        n = cfg["num_layers"] * (2 if cfg["bidirectional"] else 1)
        states = [torch.randn(n, B, H, dtype=DT, generator=g).requires_grad_(True) for _ in range(2)]
        hx = tuple(states) if mode == "LSTM" else states[0]
    return x, hx


def _weighted_sum(out: torch.Tensor, states: tuple[torch.Tensor, ...], seed: int = 2) -> torch.Tensor:
    """sum(out * R0) + sum(h_n * R1) (+ sum(c_n * R2)) with fixed random weights R."""
    g = _gen(seed)
    loss = (out * torch.randn(out.shape, dtype=DT, generator=g)).sum()
    for s in states:
        loss = loss + (s * torch.randn(s.shape, dtype=DT, generator=g)).sum()
    return loss


def _grads(loss, module: nn.Module, x, hx) -> dict[str, torch.Tensor]:
    leaves = {"x": x}
    if hx is not None:
        for name, s in zip(("h0", "c0"), hx if isinstance(hx, tuple) else (hx,), strict=False):
            leaves[name] = s
    leaves.update(dict(module.named_parameters()))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def _assert_grads_equal(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for name in ours:
        assert _max_abs(ours[name], ref[name]) <= GRAD_TOL, name


def _cfg_id(cfg: dict) -> str:
    return "L{num_layers}-{d}-{bf}-{b}-{i}".format(
        num_layers=cfg["num_layers"],
        d="bi" if cfg["bidirectional"] else "uni",
        bf="bf" if cfg["batch_first"] else "tf",
        b="bias" if cfg["bias"] else "nobias",
        i="h0" if cfg["init"] else "zero",
    )


def _module_kw(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "init"}


# ----------------------------------------------------------------------------------------------------------
# Equivalence with torch: (a) full-length padded, (b) PackedSequence, (c) padded + lengths
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("mode", list(MODES))
def test_full_length_matches_torch(mode, cfg):
    ours, ref = _twins(mode, **_module_kw(cfg))
    x, hx = _inputs(mode, cfg)
    out, h_n = ours(x, hx)
    out_ref, h_n_ref = ref(x, hx)
    assert _max_abs(out, out_ref) <= OUT_TOL
    for s, s_ref in zip(_states(mode, h_n), _states(mode, h_n_ref), strict=True):
        assert _max_abs(s, s_ref) <= OUT_TOL
    g = _grads(_weighted_sum(out, _states(mode, h_n)), ours, x, hx)
    g_ref = _grads(_weighted_sum(out_ref, _states(mode, h_n_ref)), ref, x, hx)
    _assert_grads_equal(g, g_ref)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("mode", list(MODES))
def test_packed_sequence_matches_torch(mode, cfg):
    ours, ref = _twins(mode, **_module_kw(cfg))
    x, hx = _inputs(mode, cfg)
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), cfg["batch_first"], enforce_sorted=False)
    # the same PackedSequence (values and indices) for both; a second pack of x gives torch a graph of its own
    packed_ref = pack_padded_sequence(x, torch.tensor(LENGTHS), cfg["batch_first"], enforce_sorted=False)
    assert torch.equal(packed.data, packed_ref.data)
    out, h_n = ours(packed, hx)
    out_ref, h_n_ref = ref(packed_ref, hx)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, out_ref.batch_sizes)
    assert torch.equal(out.sorted_indices, out_ref.sorted_indices)
    assert torch.equal(out.unsorted_indices, out_ref.unsorted_indices)
    assert _max_abs(out.data, out_ref.data) <= OUT_TOL
    for s, s_ref in zip(_states(mode, h_n), _states(mode, h_n_ref), strict=True):
        assert _max_abs(s, s_ref) <= OUT_TOL  # also checks they come back in the caller's batch order
    g = _grads(_weighted_sum(out.data, _states(mode, h_n)), ours, x, hx)
    g_ref = _grads(_weighted_sum(out_ref.data, _states(mode, h_n_ref)), ref, x, hx)
    _assert_grads_equal(g, g_ref)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("mode", list(MODES))
def test_padded_with_lengths_matches_torch_on_packed(mode, cfg):
    bf = cfg["batch_first"]
    ours, ref = _twins(mode, **_module_kw(cfg))
    x, hx = _inputs(mode, cfg)
    lengths = torch.tensor(LENGTHS)
    pad = torch.arange(T).unsqueeze(1) >= lengths  # [T, B] True at padded positions
    pad = pad.t() if bf else pad  # in x's layout
    with torch.no_grad():
        x[pad] = float("nan")  # padding may hold anything: it must reach neither values nor gradients

    out, h_n = ours(x, hx, lengths=lengths)
    out_ref_packed, h_n_ref = ref(pack_padded_sequence(x, lengths, bf, enforce_sorted=False), hx)
    out_ref, _ = pad_packed_sequence(out_ref_packed, bf, total_length=T)
    assert out.shape == out_ref.shape  # our output keeps the input's padded length T
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))  # exactly zero, like pad_packed_sequence
    assert _max_abs(out, out_ref) <= OUT_TOL
    for s, s_ref in zip(_states(mode, h_n), _states(mode, h_n_ref), strict=True):
        assert _max_abs(s, s_ref) <= OUT_TOL

    g = _grads(_weighted_sum(out, _states(mode, h_n)), ours, x, hx)
    g_ref = _grads(_weighted_sum(out_ref, _states(mode, h_n_ref)), ref, x, hx)
    assert torch.equal(g["x"][pad], torch.zeros_like(g["x"][pad]))  # no NaN, no gradient into padding
    _assert_grads_equal(g, g_ref)


@pytest.mark.parametrize("mode", list(MODES))
def test_full_lengths_equal_no_lengths_exactly(mode):
    # lengths that mark everything valid select the same numbers through torch.where: bit-identical results
    ours, _ = _twins(mode, num_layers=2, bidirectional=True)
    x, hx = _inputs(mode, dict(num_layers=2, bidirectional=True, batch_first=False, init=True))
    out, h_n = ours(x, hx)
    out2, h_n2 = ours(x, hx, lengths=[T] * B)
    assert torch.equal(out, out2)
    for s, s2 in zip(_states(mode, h_n), _states(mode, h_n2), strict=True):
        assert torch.equal(s, s2)


@pytest.mark.parametrize("mode", list(MODES))
def test_unbatched_input_matches_torch(mode):
    ours, ref = _twins(mode, num_layers=2, bidirectional=True)
    x = torch.randn(T, IN, dtype=DT, generator=_gen(3))
    h0 = torch.randn(4, H, dtype=DT, generator=_gen(4))
    hx = (h0, h0.flip(0)) if mode == "LSTM" else h0
    out, h_n = ours(x, hx)
    out_ref, h_n_ref = ref(x, hx)
    assert out.shape == (T, 2 * H)
    assert _max_abs(out, out_ref) <= OUT_TOL
    for s, s_ref in zip(_states(mode, h_n), _states(mode, h_n_ref), strict=True):
        assert s.shape == (4, H) and _max_abs(s, s_ref) <= OUT_TOL


# ----------------------------------------------------------------------------------------------------------
# Parameters: names, shapes, order, initialisation, state_dict both ways
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "kw", [dict(), dict(num_layers=3, bidirectional=True), dict(num_layers=2, bias=False)]
)
def test_same_seed_gives_identical_parameters(mode, kw):
    ours_cls, ref_cls = MODES[mode]
    torch.manual_seed(7)
    ref = ref_cls(5, 6, **kw)
    torch.manual_seed(7)
    ours = ours_cls(5, 6, **kw)
    sd, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(sd_ref)  # same names in the same order
    for name in sd:
        assert sd[name].shape == sd_ref[name].shape, name
        assert torch.equal(sd[name], sd_ref[name]), name  # bit-identical draws


def test_parameter_shapes_and_gate_sizes():
    lstm = LSTM(5, 6, num_layers=2, bidirectional=True)
    assert lstm.weight_ih_l0.shape == (24, 5) and lstm.weight_hh_l0_reverse.shape == (24, 6)
    assert lstm.weight_ih_l1.shape == (24, 12)  # layer 1 reads both directions of layer 0
    gru = GRU(5, 6, bias=False)
    assert [n for n, _ in gru.named_parameters()] == ["weight_ih_l0", "weight_hh_l0"]
    assert gru.weight_ih_l0.shape == (18, 5)


@pytest.mark.parametrize("mode", list(MODES))
def test_state_dict_loads_into_torch(mode):
    ours_cls, ref_cls = MODES[mode]
    ours = ours_cls(IN, H, num_layers=2, bidirectional=True).to(DT)
    ref = ref_cls(IN, H, num_layers=2, bidirectional=True).to(DT)
    ref.load_state_dict(ours.state_dict())  # strict by default: same key set
    x = torch.randn(T, B, IN, dtype=DT, generator=_gen(5))
    assert _max_abs(ours(x)[0], ref(x)[0]) <= OUT_TOL


# ----------------------------------------------------------------------------------------------------------
# Inter-layer dropout
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_dropout_eval_is_identity_and_train_matches_torch(mode):
    ours, ref = _twins(mode, num_layers=3, dropout=0.4, bidirectional=True)
    x = torch.randn(T, B, IN, dtype=DT, generator=_gen(6))
    ours.eval()
    ref.eval()
    out_eval = ours(x)[0]
    assert _max_abs(out_eval, ref(x)[0]) <= OUT_TOL
    no_drop, _ = _twins(mode, num_layers=3, dropout=0.0, bidirectional=True)
    assert torch.equal(out_eval, no_drop(x)[0])  # eval mode: dropout is exactly the identity

    ours.train()
    ref.train()
    torch.manual_seed(11)
    out_train = ours(x)[0]
    torch.manual_seed(11)
    out_train_ref = ref(x)[0]
    assert _max_abs(out_train, out_eval) > 1e-3  # dropout is really applied in training
    # On CPU, F.dropout on each layer's [T, B, D*H] output makes the same Bernoulli draws as torch's
    # RNN, so with the same seed even training mode agrees. (Relies on torch's CPU draw order; the
    # layer-by-layer test below checks the placement of dropout without that assumption.)
    assert _max_abs(out_train, out_train_ref) <= OUT_TOL


@pytest.mark.parametrize("mode", list(MODES))
def test_dropout_only_between_layers(mode):
    """A 2-layer net in training == layer 0, F.dropout (same seed), layer 1 -- and nothing after layer 1."""
    ours_cls, _ = MODES[mode]
    torch.manual_seed(0)
    two = ours_cls(IN, H, num_layers=2, dropout=0.5, bidirectional=True).to(DT).train()
    first = ours_cls(IN, H, bidirectional=True).to(DT)
    second = ours_cls(2 * H, H, bidirectional=True).to(DT)
    sd = two.state_dict()
    first.load_state_dict({k: v for k, v in sd.items() if "_l0" in k})
    second.load_state_dict({k.replace("_l1", "_l0"): v for k, v in sd.items() if "_l1" in k})
    x = torch.randn(T, B, IN, dtype=DT, generator=_gen(7))

    torch.manual_seed(3)
    out = two(x)[0]
    torch.manual_seed(3)
    expected = second(F.dropout(first(x)[0], 0.5, training=True))[0]
    assert torch.equal(out, expected)  # the same ops on the same numbers: bit-identical
    # and the layer-0 mask really mattered
    assert _max_abs(out, second(first(x)[0])[0]) > 1e-3


@pytest.mark.parametrize("mode", list(MODES))
def test_single_layer_dropout_warns_and_does_nothing(mode):
    ours_cls, _ = MODES[mode]
    with pytest.warns(UserWarning, match="num_layers=1"):
        rnn = ours_cls(IN, H, dropout=0.5).to(DT)
    x = torch.randn(T, B, IN, dtype=DT, generator=_gen(8))
    out_train = rnn.train()(x)[0]
    assert torch.equal(out_train, rnn.eval()(x)[0])  # never applied to the last layer's output
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours_cls(IN, H, num_layers=2, dropout=0.5)  # no warning when it has an effect


# ----------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------
def test_bad_arguments_raise():
    for kw in (dict(hidden_size=0), dict(num_layers=0), dict(dropout=1.5), dict(input_size=2.0)):
        args = dict(input_size=IN, hidden_size=H) | kw
        with pytest.raises(ValueError):
            LSTM(**args)
    lstm = LSTM(IN, H)
    x = torch.randn(T, B, IN)
    with pytest.raises(ValueError, match="lengths"):
        lstm(x, lengths=[T + 1] * B)
    with pytest.raises(ValueError, match="lengths"):
        lstm(x, lengths=[T] * (B + 1))
    with pytest.raises(ValueError, match="not both"):
        lstm(pack_padded_sequence(x, [T] * B), lengths=[T] * B)
    with pytest.raises(ValueError, match="h0"):
        lstm(x, (torch.zeros(2, B, H), torch.zeros(1, B, H)))
    with pytest.raises(ValueError, match="input_size"):
        lstm(torch.randn(T, B, IN + 1))
