"""Evaluation of a checkpoint: every perturbation, split and layer through one pass, and the strong evaluation."""
