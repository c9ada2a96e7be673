"""Checkpoints: exact round trip, atomic pointer, pruning, and clear errors for damaged files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from llmlab.train import checkpoint as ckpt


def _model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_is_exact(tmp_path):
    model, opt = _model_and_optimizer()
    state = {
        "optimizer": opt.state_dict(),
        "counters": {"step": 7, "nan": float("nan")},
        "rng": torch.get_rng_state(),
    }
    path = ckpt.save_checkpoint(tmp_path, 7, model.state_dict(), state)
    assert path.name == "step_00000007" and ckpt.latest_checkpoint(tmp_path) == path
    model_state, loaded = ckpt.load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(model_state[k], v)
    assert loaded["counters"]["step"] == 7 and loaded["counters"]["nan"] != loaded["counters"]["nan"]
    assert torch.equal(loaded["rng"], torch.get_rng_state())
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)  # tuples survive
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.5)
    opt2.load_state_dict(loaded["optimizer"])
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(opt2.state_dict()["state"][0][key], value)
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "state.json",
        "state.safetensors",
    ]


def test_keeps_the_newest_and_cleans_half_written(tmp_path):
    model, _ = _model_and_optimizer()
    (tmp_path / ".tmp-step_00000002-999").mkdir(parents=True)  # as a killed writer leaves it
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model.state_dict(), {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not list(tmp_path.glob(".tmp-*"))
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"


def test_tied_weights_are_saved(tmp_path):
    a = nn.Linear(3, 3, bias=False)
    b = nn.Linear(3, 3, bias=False)
    b.weight = a.weight  # shared storage, as tied embeddings
    model = nn.Sequential(a, b)
    path = ckpt.save_checkpoint(tmp_path, 1, model.state_dict(), {})
    state, _ = ckpt.load_checkpoint(path)
    assert torch.equal(state["0.weight"], state["1.weight"])


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_gives_a_clear_error(tmp_path, damage):
    model, opt = _model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 3, model.state_dict(), {"optimizer": opt.state_dict()})
    target = path / "state.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (path / "manifest.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "Delete" in message


def test_latest_pointer_to_missing_checkpoint(tmp_path):
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.latest_checkpoint(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path / "nowhere") is None


def test_weights_file_round_trip_and_corruption(tmp_path):
    model, _ = _model_and_optimizer()
    path = tmp_path / "model.safetensors"
    ckpt.save_weights(path, model.state_dict(), metadata={"step": "3"})
    loaded = ckpt.load_weights(path)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load_weights(path)


def test_unsupported_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot checkpoint"):
        ckpt.save_checkpoint(tmp_path, 1, {}, {"fn": object()})


def test_state_json_has_no_pickle(tmp_path):
    model, opt = _model_and_optimizer()
    path = ckpt.save_checkpoint(tmp_path, 1, model.state_dict(), {"optimizer": opt.state_dict()})
    tree = json.loads((path / "state.json").read_text())
    assert tree["optimizer"]["state"]["__int__0"]["exp_avg"] == {"__tensor__": "optimizer.state.0.exp_avg"}
