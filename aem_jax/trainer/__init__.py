"""Training: loop, algorithms, sharding, checkpoints, metrics."""
