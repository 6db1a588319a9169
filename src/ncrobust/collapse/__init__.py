"""Neural Collapse (NC) metrics: pure math on features, labels and classifier weights, no I/O.

Notation (Papyan, Han & Donoho 2020, "Prevalence of neural collapse during the terminal phase of
deep learning training", PNAS; Su, Zhang, Tsilivis & Kempe 2024, "On the Robustness of Neural
Collapse and the Neural Collapse of Robustness", TMLR, arXiv 2311.07444):

- features ``h_i`` in R^d (``H``: [N, d]), labels ``y_i`` in {0..C-1}, class counts ``N_c``
- class means ``mu_c = 1/N_c sum_{y_i=c} h_i`` (``M``: [C, d], one mean per row)
- global mean ``mu_G = 1/N sum_i h_i`` (the mean of all samples, = sum_c N_c/N mu_c)
- centred means ``M~ = [mu_c - mu_G]`` ([C, d], one centred mean per row)
- ``Sigma_W = 1/N sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T``      (within-class covariance, [d, d])
- ``Sigma_B = 1/C sum_c (mu_c - mu_G)(mu_c - mu_G)^T``             (between-class covariance, [d, d])
- classifier weights ``W`` ([C, d], one row ``w_c`` per class) and bias ``b`` ([C])

The modules, by role:

- :mod:`~ncrobust.collapse.checks`: input validation. Bad *input* (an empty class, a single
  class, NaN/inf features, labels out of range, mismatched shapes) raises :class:`ValueError`
  with a one-line message.
- :mod:`~ncrobust.collapse.blocks`: the row blocks that bound the float64 working memory.
- :mod:`~ncrobust.collapse.accumulate`: the per-batch float64 arithmetic, each piece once (class
  sums and means, the nearest-class-centre decision, the joint counts behind the leap matrix),
  and the streaming two-pass accumulator :class:`LayerStats` that the evaluation runs per layer.
- :mod:`~ncrobust.collapse.measure`: the metrics from the accumulated statistics (NC1-NC4, the
  class-mean geometry, the leap matrix and alignment against a reference), with the conventions.
  Degenerate geometry (for instance a dead layer whose class means coincide) does not raise: the
  affected ratios come out ``inf`` or ``nan`` so that one bad layer cannot stop a workflow.
- :mod:`~ncrobust.collapse.dense`: the same on whole feature matrices (:func:`nc_metrics`,
  :func:`perturbation_metrics`, :func:`class_means`, :func:`ncc_predict`, :func:`leap`,
  :func:`alignment`), through the accumulator's arithmetic.

Everything is accumulated in float64 whatever the input dtype (fp16 features included). No
function forms a d x d matrix: ``tr(Sigma_W Sigma_B^+)`` only needs ``Sigma_W`` projected on the
span of the centred means (at most C-1 directions), so :func:`nc_metrics` and :class:`LayerStats`
both cost O(N d C) time and O(d C) extra memory.
"""

from .accumulate import LayerStats
from .dense import alignment, class_means, leap, nc_metrics, ncc_predict, perturbation_metrics
from .measure import minority_classes

__all__ = [
    "LayerStats",
    "alignment",
    "class_means",
    "leap",
    "minority_classes",
    "nc_metrics",
    "ncc_predict",
    "perturbation_metrics",
]
