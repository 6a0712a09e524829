"""Training utilities: data pipeline, checkpointing and the training loop."""
