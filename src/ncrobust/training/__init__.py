"""Training: the recipe, the per-kind training steps, the training-stream Neural Collapse, mixup."""
