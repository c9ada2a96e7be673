"""agnews-bert runs: the run's RUN_DIR/model/ is already a Hugging Face model directory (`save_pretrained`:
config.json with the class names as id2label, model.safetensors, the tokenizer files), so the export is that
folder, checked first: config.json must be a transformers config and the weights a readable safetensors
file (read without pickle) whose tensors fit the config's model (`AutoModelForSequenceClassification`, the
loader `llmlab serve` uses, llmlab/serve/model.py). Reference: transformers' "Sharing" guide
(https://huggingface.co/docs/transformers/model_sharing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llmlab.export.run import RunExport

MODEL_DIR = "model"


def check_model_dir(folder: Path) -> dict:
    """config.json of the HF classifier in `folder`, after its weights were loaded strictly into the model
    the config describes; CheckpointError when anything is missing, corrupt or does not fit."""
    from llmlab.train.checkpoint import CheckpointError, load_weights

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}/config.json cannot be read ({err})") from err
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{folder}/config.json is not a transformers config (no model_type)")
    weights = load_weights(folder / "model.safetensors")  # CheckpointError: missing, truncated
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(str(folder)))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or wrong:
        raise CheckpointError(
            f"{folder}/model.safetensors does not fit its config.json: missing {missing[:5]}, other shapes "
            f"{wrong[:5]}"
        )
    return config


def export_hf_classifier(run: RunExport, out: Path) -> None:
    """The exporter of agnews-bert."""
    folder = run.final_file(MODEL_DIR, "saved model (model/)")
    config = check_model_dir(folder)
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.endswith((".bin", ".pt", ".pth", ".pkl")):  # never a pickle
            shutil.copyfile(path, out / path.name)
            run.files[path.name] = _what(path.name)
    labels = [config.get("id2label", {}).get(str(i)) for i in range(len(config.get("id2label", {})))]
    arch = (config.get("architectures") or ["BertForSequenceClassification"])[0]
    layers, hidden = config.get("num_hidden_layers"), config.get("hidden_size")
    run.kind, run.library, run.task = "transformers", "transformers", "text-classification"
    run.architecture = (
        f"transformers' `{arch}` ({layers} layers, hidden size {hidden}) with a linear head over "
        f"{len(labels)} classes: {', '.join(map(str, labels))}"
    )
    run.tags += ["bert", "text-classification"]
    model_cfg = getattr(run.cfg, "model", None)
    if getattr(model_cfg, "tiny_random", False):
        run.limitations.append(
            "The encoder started from RANDOM weights (model.tiny_random=true: a tiny BERT, no pretraining): "
            "its accuracy shows the pipeline learns, not what a pretrained BERT reaches."
        )
    elif getattr(model_cfg, "name_or_path", None):
        run.base = model_cfg.name_or_path if not Path(model_cfg.name_or_path).exists() else None
    max_length = getattr(model_cfg, "max_length", None)
    if max_length:
        run.limitations.append(f"Trained on articles cut to {max_length} tokens; longer inputs are cut too.")
    run.usage = f"""With transformers:

```python
from transformers import pipeline

classifier = pipeline("text-classification", model={run.ref!r})
print(classifier("Stocks rallied after the central bank held interest rates."))
```

or `AutoTokenizer.from_pretrained(...)` with `AutoModelForSequenceClassification.from_pretrained(...)`; and
served over HTTP by llmlab: `llmlab serve {run.ref}`."""


def _what(name: str) -> str:
    return {
        "config.json": "transformers config (architecture, id2label)",
        "model.safetensors": "the weights (safetensors)",
        "tokenizer.json": "the tokenizer (fast, `tokenizers` format)",
        "tokenizer_config.json": "tokenizer settings (max length: the training truncation)",
        "vocab.txt": "the WordPiece vocabulary",
        "special_tokens_map.json": "special tokens",
    }.get(name, "saved with the model by save_pretrained")
