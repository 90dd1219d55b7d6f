"""Training: configuration, optimizer and schedules, losses, run checkpoints, distribution, logging."""
