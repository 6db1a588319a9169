"""The empirical neural tangent kernel of a classifier and its dynamics over training.

- :mod:`~ncrobust.kernel.ntk`: the kernel itself, ``empirical_ntk(model, x1, x2=None, kind=...)``
  (the logit-summed ``trace`` kernel [N1, N2] or the ``full`` per-logit kernel [N1 * C, N2 * C]),
  built blockwise over samples, logits and parameter chunks within a ``memory_bytes`` budget;
  :func:`plan_ntk` states the blocks and the estimated peak bytes, or refuses in one line.
- :mod:`~ncrobust.kernel.dynamics`: pure functions on kernels: the eigendecomposition, the
  top-eigenvalue mass, kernel-target alignment, Fort et al.'s kernel distance and velocity,
  Tsilivis & Kempe's polar view and eigen-feature accuracy.

Following Tsilivis & Kempe 2022 ("What Can the Neural Tangent Kernel Tell Us About Adversarial
Robustness?", NeurIPS): the trace kernel of a fixed batch of training images at every checkpoint.
"""

from .dynamics import (
    eigen_feature_accuracy,
    eigendecomposition,
    kernel_distance,
    kernel_similarity,
    kernel_target_alignment,
    kernel_velocity,
    polar_view,
    top_eigenvalue_mass,
)
from .ntk import DEFAULT_MEMORY_BYTES, KINDS, NTKPlan, empirical_ntk, logit_trace, plan_ntk

__all__ = [
    "DEFAULT_MEMORY_BYTES",
    "KINDS",
    "NTKPlan",
    "eigen_feature_accuracy",
    "eigendecomposition",
    "empirical_ntk",
    "kernel_distance",
    "kernel_similarity",
    "kernel_target_alignment",
    "kernel_velocity",
    "logit_trace",
    "plan_ntk",
    "polar_view",
    "top_eigenvalue_mass",
]
