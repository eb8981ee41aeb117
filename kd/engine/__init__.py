"""The training engine: the one loop (trainer), a run's state (run), evaluation, device and precision
(runtime), atomic files and checkpoints (checkpoint), and torch.distributed (distributed)."""
