"""The limits a server enforces and the request parameters it accepts: plain data, below everything else in
llmlab/serve (classify.py and generate.py validate requests with them, openapi.py documents them), so every
import in the package points down: app -> classify / generate -> openapi -> limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmlab.config import ConfigError


@dataclass(frozen=True)
class ServeLimits:
    """Per-request limits and batching knobs. Defaults suit a BERT-base classifier on one machine."""

    max_texts: int = 64  # texts per request
    max_chars: int = 10_000  # characters (code points) per text, checked before tokenizing
    max_body_bytes: int = 1_000_000  # request body; larger -> 413
    max_batch_size: int = 32  # texts per model call
    max_wait_ms: float = 5.0  # the most a batch waits for requests already inside the server
    max_queue: int = 1024  # texts waiting for the model; beyond -> 503 + Retry-After
    request_timeout_s: float = 30.0  # a request waiting longer gets 504

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_chars", "max_body_bytes", "max_batch_size", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        if self.max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms={self.max_wait_ms}: must be >= 0")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"request_timeout_s={self.request_timeout_s}: must be > 0")
        if self.max_queue < self.max_texts:
            raise ConfigError(
                f"max_queue={self.max_queue} < max_texts={self.max_texts}: a full-size request could never "
                "be queued"
            )


@dataclass(frozen=True)
class GenerateLimits:
    """Per-request limits of /v1/generate and its queue. Defaults suit a small model on one machine."""

    max_prompt_chars: int = 10_000  # characters (code points) per prompt, checked before tokenizing
    max_new_tokens: int = 512  # the most a request may ask for
    max_n: int = 8  # samples per request
    max_body_bytes: int = 1_000_000  # request body; larger -> 413
    max_queue: int = 32  # requests waiting behind the one being generated; beyond -> 503 + Retry-After
    request_timeout_s: float = 30.0  # a request waiting (queue + generation) longer gets 504

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_new_tokens", "max_n", "max_body_bytes", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s={self.request_timeout_s}: must be > 0")


@dataclass(frozen=True)
class Param:
    """One numeric request parameter: its JSON type, bounds and default (absent or null -> default)."""

    name: str
    type: Literal["integer", "number"]
    default: float | int | None
    minimum: float | int
    maximum: float | int
    exclusive_minimum: bool = False
    min_positive: float | None = (
        None  # when set, the minimum (0) or at least this: 0 < x < min_positive is out
    )
    description: str = ""

    def rule(self) -> str:
        low = f"> {_fmt(self.minimum)}" if self.exclusive_minimum else f">= {_fmt(self.minimum)}"
        kind = "an integer" if self.type == "integer" else "a number"
        if self.min_positive is not None:
            return (
                f"{kind}: {_fmt(self.minimum)}, or >= {_fmt(self.min_positive)} and <= {_fmt(self.maximum)}"
            )
        return f"{kind} {low} and <= {_fmt(self.maximum)}"

    def allows(self, value: float) -> bool:
        low_ok = value > self.minimum if self.exclusive_minimum else value >= self.minimum
        gap = self.min_positive is not None and self.minimum < value < self.min_positive
        return low_ok and value <= self.maximum and not gap


def _fmt(x: float | int) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"
