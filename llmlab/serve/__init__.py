"""Serving sequence classifiers (stage 4): model loading, dynamic micro-batching, a Flask API on waitress.

    llmlab predict RUN_DIR "some text"        # label and score per text
    llmlab serve RUN_DIR --port 8000          # POST /v1/classify {"texts": [...]}; API at /openapi.json

Names are imported lazily so that `import llmlab.serve` (e.g. by the CLI parser) costs neither Flask nor
transformers until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TextClassifier": "llmlab.serve.model",
    "ModelLoadError": "llmlab.serve.model",
    "MicroBatcher": "llmlab.serve.batching",
    "Overloaded": "llmlab.serve.batching",
    "BatcherClosed": "llmlab.serve.batching",
    "ServeLimits": "llmlab.serve.app",
    "ServerHandle": "llmlab.serve.app",
    "create_app": "llmlab.serve.app",
    "start_server": "llmlab.serve.app",
    "serve": "llmlab.serve.app",
    "openapi_document": "llmlab.serve.openapi",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmlab.serve' has no attribute {name!r}")
