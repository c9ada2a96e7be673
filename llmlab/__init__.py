"""llmlab: a hands-on lab for large-model engineering, from an MLP to tensor parallelism."""

__version__ = "0.1.0"
