"""Training utilities for main.py: one concept per module (device, amp, data, optim, engine, checkpoint, logger)."""
