"""Training: configs, trainer loop, checkpoints, data."""
