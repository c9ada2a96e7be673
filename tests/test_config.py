"""Dotted overrides: parsed against the field types, unknown keys rejected with suggestions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from llmlab.config import ConfigError, apply_overrides, flatten, from_dict, to_dict, valid_keys


@dataclass
class Inner:
    lr: float = 0.1
    steps: int | None = None
    name: Literal["sgd", "adamw"] = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    nesterov: bool = False

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


@dataclass
class Outer:
    seed: int = 0
    tag: str = "x"
    optim: Inner = field(default_factory=Inner)


def test_overrides_are_parsed_by_type():
    cfg = apply_overrides(
        Outer(),
        [
            "seed=3",
            "optim.lr=0.05",
            "optim.steps=1e3",
            "optim.name=adamw",
            "optim.betas=0.8,0.95",
            "optim.nesterov=true",
            "tag=hello=world",
        ],
    )
    assert cfg.seed == 3 and cfg.optim.lr == 0.05 and cfg.optim.steps == 1000
    assert cfg.optim.name == "adamw" and cfg.optim.betas == (0.8, 0.95) and cfg.optim.nesterov is True
    assert cfg.tag == "hello=world"
    assert apply_overrides(cfg, ["optim.steps=none"]).optim.steps is None


def test_original_config_is_not_mutated():
    cfg = Outer()
    apply_overrides(cfg, ["optim.lr=0.5"])
    assert cfg.optim.lr == 0.1


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "did you mean: optim.lr"),
        ("lr=0.1", "optim.lr"),
        ("optim=3", "unknown config key 'optim'"),
        ("seed.x=1", "unknown config key"),
        ("seed=abc", "seed='abc': expected an integer"),
        ("seed=1.5", "expected an integer"),
        ("optim.lr=fast", "expected a number"),
        ("optim.name=rmsprop", "expected one of sgd, adamw"),
        ("optim.nesterov=maybe", "expected a boolean"),
        ("optim.betas=0.9", "expected 2 comma-separated values"),
        ("optim.lr=-1", "lr must be > 0"),
        ("novalue", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Outer(), [override])
    assert message.lower() in str(err.value).lower()


def test_round_trip_through_json_dict():
    cfg = apply_overrides(Outer(), ["optim.betas=0.5,0.6", "optim.steps=7"])
    again = from_dict(Outer, to_dict(cfg))
    assert again == cfg
    assert flatten(cfg)["optim.betas"] == [0.5, 0.6]
    assert "optim.lr" in valid_keys(cfg)
    with pytest.raises(ConfigError, match="unknown config keys"):
        from_dict(Outer, {"bogus": 1})


def test_dict_fields_take_a_json_object_and_errors_name_the_section():
    """LLaMA's rope_scaling is a dict (HF's format): it is overridden as a JSON object; anything else, and a
    scaling the model refuses, is a ConfigError naming the key or the section (no traceback)."""
    from llmlab.runner import resolve_config

    _, cfg, _ = resolve_config(
        "llama-pretrain", "smoke", ['model.rope_scaling={"rope_type": "linear", "factor": 2.0}']
    )
    assert cfg.model.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ConfigError, match="expected a JSON object"):
        resolve_config("llama-pretrain", "smoke", ["model.rope_scaling=[1, 2]"])
    with pytest.raises(ConfigError, match=r"^model: .*rope"):
        resolve_config("llama-pretrain", "smoke", ['model.rope_scaling={"rope_type": "yarn2"}'])
    _, cfg, _ = resolve_config("llama-pretrain", "smoke", ["model.rope_scaling=none"])
    assert cfg.model.rope_scaling is None
