"""llmlab's language-model runs behind generate.py's `LanguageModel` protocol: loading, encoding, sampling.

`RunLanguageModel` wraps a decoder-only model that `llmlab.nn.sampling.generate` drives (`cfg.block_size`,
`new_caches()`, `model(idx, caches)`: GPT today) and a run's text tokenizer (llmlab/data/lm_tokenizers.py).
Sampling is exactly `Generator.sample`'s (llmlab/recipes/gpt_lm.py): `n` copies of the prompt as one batch,
one `torch.Generator` seeded with `seed`, so the server and `llmlab generate --seed S --num-samples N` give
the same texts — but it keeps the token ids, to count them and to end a sample at the tokenizer's
end-of-text token (GPT-2's <|endoftext|>; the char and trained-BPE tokenizers have none).

`detect_model_kind(path)` tells a language-model run (an llmlab run directory without an HF `model/`) from a
classifier without loading anything; `load_language_model` loads one through the loaders in `LM_LOADERS`
(the next stage's LLaMA runs add theirs there).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from llmlab.nn.sampling import SampleConfig, generate
from llmlab.serve.generate import Completion, GenerationCancelled
from llmlab.serve.model import ModelLoadError, _resolve_device

ModelKind = Literal["classifier", "language-model"]


def detect_model_kind(path: str | Path) -> ModelKind:
    """ "language-model" for an llmlab run directory (config.json naming a recipe) that holds no HF model
    (model/config.json); "classifier" for everything else (TextClassifier.from_path reports what is wrong)."""
    local = Path(path).expanduser()
    run_config = local / "config.json"
    if not local.is_dir() or (local / "model" / "config.json").is_file() or not run_config.is_file():
        return "classifier"
    try:
        stored = json.loads(run_config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "classifier"
    is_run = isinstance(stored, dict) and "recipe" in stored and "model_type" not in stored
    return "language-model" if is_run else "classifier"


class _StopBeforeNextToken:
    """The model, as `generate` uses it, except that each forward pass first asks `should_stop()`."""

    def __init__(self, model: torch.nn.Module, should_stop: Callable[[], bool]) -> None:
        self._model = model
        self._should_stop = should_stop

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._should_stop():
            raise GenerationCancelled("generation stopped: its request was given up")
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # cfg, new_caches, eval, train, training, parameters
        return getattr(self._model, name)


class RunLanguageModel:
    """A trained language model and its tokenizer, in eval mode on one device (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self.tokenizer_name: str = tokenizer.name
        self.vocab_size: int = tokenizer.vocab_size
        self.context_length: int = int(model.cfg.block_size)
        eos = getattr(tokenizer, "eot_id", None)
        self.eos_id: int | None = int(eos) if eos is not None else None

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> RunLanguageModel:
        return load_language_model(run_dir, device)

    def encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text)
        except ValueError as err:
            chars = getattr(self.tokenizer, "chars", None)
            if not isinstance(chars, str):
                raise
            known = set(chars)
            unknown = Counter(c for c in text if c not in known)
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c, _ in unknown.most_common(10))
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            what = f"{len(unknown)} characters are" if len(unknown) > 1 else "1 character is"
            raise ValueError(
                f"{what} not in its vocabulary of {len(chars)} characters ({self.tokenizer_name}, the "
                f"characters of its training text): {shown}{more}; GET /v1/model lists the characters it "
                "knows"
            ) from err

    def info(self) -> dict[str, Any]:
        tokenizer: dict[str, Any] = {"kind": getattr(self.tokenizer, "kind", None)}
        chars = getattr(self.tokenizer, "chars", None)
        if isinstance(chars, str):
            tokenizer["characters"] = chars
        return {"tokenizer": tokenizer}

    def generate(
        self,
        prompt_ids: list[int],
        cfg: SampleConfig,
        n: int = 1,
        seed: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Completion]:
        idx = torch.tensor([list(prompt_ids)] * n, device=self.device)  # [n, T]
        g = torch.Generator(device=self.device).manual_seed(seed)
        model = self.model if should_stop is None else _StopBeforeNextToken(self.model, should_stop)
        out = generate(model, idx, cfg, generator=g)  # [n, T + new]
        completions = []
        for row in out[:, len(prompt_ids) :].tolist():
            if cfg.eos_id is not None and cfg.eos_id in row:
                end = row.index(cfg.eos_id)
                completions.append(Completion(self.tokenizer.decode(row[:end]), end + 1, "stop"))
            else:
                completions.append(Completion(self.tokenizer.decode(row), len(row), "length"))
        return completions


def _load_gpt_run(run_dir: Path, device: torch.device) -> RunLanguageModel:
    from llmlab.recipes.gpt_lm import Generator

    gen = Generator.from_run(run_dir, device=str(device))
    return RunLanguageModel(gen.model, gen.tok, name=run_dir.resolve().name)


# Loaders of language-model runs, tried in order; each raises RunDirError for a run that is not its kind.
LM_LOADERS: list[Callable[[Path, torch.device], RunLanguageModel]] = [_load_gpt_run]


def load_language_model(path: str | Path, device: str | torch.device = "cpu") -> RunLanguageModel:
    """The language model of an llmlab run directory; ModelLoadError saying why it cannot be served."""
    from llmlab.config import ConfigError
    from llmlab.data.store import DataCorruptError
    from llmlab.data.subword import TokenizerError
    from llmlab.report import RunDirError
    from llmlab.train.checkpoint import CheckpointError

    run_dir = Path(path).expanduser()
    dev = _resolve_device(device)
    not_lm: list[str] = []
    for loader in LM_LOADERS:
        try:
            return loader(run_dir, dev)
        except RunDirError as err:
            not_lm.append(str(err))
        except (CheckpointError, TokenizerError, ConfigError, DataCorruptError, OSError) as err:
            # OSError: also DataMissingError (a file a recipe reads to rebuild its model), unreadable files
            raise ModelLoadError(f"{path}: cannot load its language model: {err}") from err
    raise ModelLoadError(
        f"{path}: cannot serve it: {'; '.join(not_lm)}. llmlab serve serves text classifiers (an HF model "
        "directory, or a run with model/, e.g. agnews-bert) and language-model runs (e.g. shakespeare-gpt)"
    )
