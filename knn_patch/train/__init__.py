"""Fine-tuning: the recipe config, its data, the loop, checkpoints and the loss."""
