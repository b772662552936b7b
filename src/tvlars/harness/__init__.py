"""The training harness: data, models, the training loop and self-supervised learning."""
