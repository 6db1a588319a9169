"""ncrobust: Neural Collapse under adversarial perturbation and adversarial training.

The library holds all logic of the workflow and has no Snakemake imports: every stage of
the workflow is one call into a module here (see docs/architecture.md and the README).
"""

__version__ = "0.1.0"
