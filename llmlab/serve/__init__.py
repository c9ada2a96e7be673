"""Serving models over HTTP (stage 4 classifiers, stage 6 language models): loading, a Flask API on waitress.

    llmlab predict RUN_DIR "some text"        # label and score per text
    llmlab serve RUN_DIR --port 8000          # a classifier: POST /v1/classify {"texts": [...]}
    llmlab serve LM_RUN_DIR --port 8000       # a language model: POST /v1/generate {"prompt": "..."}
                                              # API (every bound) at /openapi.json

Names are imported lazily so that `import llmlab.serve` (e.g. by the CLI parser) costs neither Flask nor
transformers until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TextClassifier": "llmlab.serve.model",
    "ModelLoadError": "llmlab.serve.model",
    "RunLanguageModel": "llmlab.serve.lm",
    "detect_model_kind": "llmlab.serve.lm",
    "load_language_model": "llmlab.serve.lm",
    "MicroBatcher": "llmlab.serve.batching",
    "Overloaded": "llmlab.serve.batching",
    "BatcherClosed": "llmlab.serve.batching",
    "Classifier": "llmlab.serve.classify",
    "ServeLimits": "llmlab.serve.classify",
    "LanguageModel": "llmlab.serve.generate",
    "GenerateLimits": "llmlab.serve.generate",
    "Completion": "llmlab.serve.generate",
    "ServerHandle": "llmlab.serve.app",
    "create_app": "llmlab.serve.app",
    "start_server": "llmlab.serve.app",
    "serve": "llmlab.serve.app",
    "openapi_document": "llmlab.serve.openapi",
    "generate_openapi_document": "llmlab.serve.openapi",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmlab.serve' has no attribute {name!r}")
