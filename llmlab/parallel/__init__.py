"""Parallelism written from scratch over torch.distributed: ZeRO data parallelism (stage 6)."""
