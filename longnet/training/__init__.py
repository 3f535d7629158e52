"""Training, evaluation, generation, checkpoints and data: the `longnet train/eval/generate` jobs."""
