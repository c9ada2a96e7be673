"""A sequence classifier for serving: an HF model directory, an llmlab run directory, or a Hub id.

Wraps `AutoTokenizer` + `AutoModelForSequenceClassification` (HF transformers) behind one call,
`classify(texts) -> [{"label", "score", "scores"}]`, run as a single padded batch in eval mode under
`torch.inference_mode()`. The attention mask always goes to the model, so a text's scores do not depend on
which (longer) texts share its batch: that is what lets the server batch requests from different clients.
Texts longer than `max_length` tokens are truncated (the normal behaviour of a BERT-style classifier).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# "name" or "namespace/name": the only shapes a Hub id can take. Anything else is a local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded. The message names the path or id and what was looked for."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local HF model directory, or a Hub id handed to from_pretrained."""

    location: str
    is_local: bool
    given: str  # what the user passed, for error messages and the model's name


def resolve_model_source(path: str | Path) -> ModelSource:
    """An HF model dir (has config.json), an llmlab run dir (has model/config.json), or a Hub id.

    A path that exists but holds neither, or that looks like a path (absolute, ./, ~, several slashes, or a
    first part that is a local folder, as in runs/NAME) and does not exist, is an error here: such a string
    never goes to the Hub, where it would fail slowly (network retries) with a confusing message.
    """
    given = str(path)
    local = Path(given).expanduser()
    if local.is_dir():
        hf_config, run_config = local / "config.json", local / "model" / "config.json"
        # A run directory has its own (llmlab) config.json next to model/, so model/ is looked at first.
        if run_config.is_file():
            return ModelSource(str(local / "model"), True, given)
        if hf_config.is_file():
            if _is_transformers_config(hf_config):
                return ModelSource(str(local), True, given)
            raise ModelLoadError(
                f"{given}: {hf_config} is not a transformers model config (it has no model_type) and "
                f"{run_config} does not exist: a run directory of a recipe that saves no HF model?"
            )
        raise ModelLoadError(
            f"{given}: not a model directory: looked for {hf_config} (an HF model directory) "
            f"and {run_config} (an llmlab run directory); found neither"
        )
    if local.exists():
        raise ModelLoadError(f"{given}: is a file; expected an HF model directory or an llmlab run directory")
    # "runs/agnews-bert-x" looks like a Hub id too; when its first part is a local folder, it is a path typo.
    looks_local = given.startswith((".", "~")) or (local.parent != Path(".") and local.parent.is_dir())
    if isinstance(path, Path) or not _HUB_ID.match(given) or looks_local:
        raise ModelLoadError(
            f"{given}: no such directory (expected an HF model directory with config.json, "
            "or an llmlab run directory with model/config.json)"
        )
    return ModelSource(given, False, given)


def _is_transformers_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return dev


class TextClassifier:
    """A tokenizer and a sequence-classification model, in eval mode on one device.

    `labels` come from the model config's id2label (index order); `max_length` is the token cap applied
    by truncation: the given cap, else the smaller of the tokenizer's model_max_length and the model's
    max_position_embeddings.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        name: str,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
    ):
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.name = name
        id2label = getattr(model.config, "id2label", None) or {}
        num_labels = int(getattr(model.config, "num_labels", len(id2label)))
        self.labels: list[str] = [str(id2label.get(i, f"LABEL_{i}")) for i in range(num_labels)]
        natural = _natural_max_length(tokenizer, model.config)
        if max_length is not None:
            if max_length < 2:
                raise ValueError(f"max_length={max_length}: must be at least 2 (room for [CLS] and [SEP])")
            natural = min(natural, max_length) if natural else max_length
        if not natural:
            raise ValueError(
                f"{name}: neither the tokenizer nor the model config states a maximum length; pass max_length"
            )
        self.max_length: int = natural

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        max_length: int | None = None,
        local_files_only: bool = False,
    ) -> TextClassifier:
        """Load from an HF model dir, an llmlab run dir (uses RUN_DIR/model/), or a Hub id.

        `local_files_only=True` keeps a Hub id to the local HF cache (no network), failing fast offline.
        """
        source = resolve_model_source(path)  # path errors before the slow transformers import

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        where = source.location
        kwargs = {} if source.is_local else {"local_files_only": local_files_only}
        what = "the directory" if source.is_local else "the Hugging Face Hub (and the local HF cache)"
        hint = "" if source.is_local else f"; no local directory {where!r} exists either"
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"{source.given}: could not load a tokenizer from {what} at {where!r} (looked for "
                f"tokenizer.json / vocab.txt and tokenizer_config.json): {_first_line(err)}{hint}"
            ) from err
        try:
            model = AutoModelForSequenceClassification.from_pretrained(where, **kwargs)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"{source.given}: could not load a sequence-classification model from {what} at {where!r} "
                "(looked for config.json and model.safetensors / pytorch_model.bin): "
                f"{_first_line(err)}{hint}"
            ) from err
        name = Path(where).parent.name if source.is_local and Path(where).name == "model" else None
        name = name or (Path(where).name if source.is_local else source.given)
        return cls(model, tokenizer, name=name, device=device, max_length=max_length)

    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        """One forward pass over all texts (padded to the longest, truncated to max_length)."""
        if not texts:
            return []
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        # The attention mask is what keeps padding out of the result; a tokenizer that omits it would
        # make a text's scores depend on its batch neighbours.
        if "attention_mask" not in enc:
            raise RuntimeError(f"{self.name}: the tokenizer returned no attention_mask")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            logits = self.model(**enc).logits  # (batch, num_labels)
            probs = torch.softmax(logits.float(), dim=-1).cpu()  # (batch, num_labels)
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(
                {
                    "label": self.labels[best],
                    "score": row[best],
                    "scores": {label: p for label, p in zip(self.labels, row, strict=True)},
                }
            )
        return out

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "labels": list(self.labels),
            "max_length": self.max_length,
            "device": str(self.device),
        }


def _natural_max_length(tokenizer: Any, config: Any) -> int | None:
    candidates = []
    # Tokenizers saved without a stated limit report a huge sentinel (int(1e30)); ignore it.
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        candidates.append(tok_max)
    pos_max = getattr(config, "max_position_embeddings", None)
    if isinstance(pos_max, int) and pos_max > 0:
        candidates.append(pos_max)
    return min(candidates) if candidates else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__
