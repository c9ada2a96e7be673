"""The training engine: the one Trainer, its configs, checkpoints, callbacks and run-record helpers."""
