"""Seeding, deterministic mode and the RNG snapshot a checkpoint carries."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from llmlab.train.checkpoint import flatten_state, unflatten_state
from llmlab.train.rng import get_rng_state, seed_everything, set_deterministic, set_rng_state


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_repeats_all_three_generators():
    seed_everything(5)
    first = _draws()
    seed_everything(5)
    assert _draws() == first


def test_rng_state_survives_a_json_and_safetensors_round_trip():
    seed_everything(1)
    _draws()
    tensors: dict = {}
    tree = json.loads(json.dumps(flatten_state(get_rng_state(), tensors, "")))
    expected = _draws()
    seed_everything(99)
    set_rng_state(unflatten_state(tree, tensors))
    assert _draws() == expected


def test_deterministic_mode_toggles_torch():
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()
