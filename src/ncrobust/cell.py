"""A grid cell ``(dataset, model, loss, adversary, variant, seed)``. Free of torch, so that parsing
the workflow (once per job on a cluster) does not pay for importing it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ADVERSARIES = ("st", "pgd-linf", "pgd-l2", "trades-linf", "trades-l2")
BASE_VARIANT = "base"
"""The variant without overrides (``config.variants``): the recipe as the config states it."""


@dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    loss: str
    adversary: str
    seed: int
    variant: str = BASE_VARIANT

    def as_dict(self) -> dict:
        return asdict(self)


def adversary_kind(adversary: str) -> str:
    """``st``, ``pgd`` or ``trades``."""
    if adversary not in ADVERSARIES:
        raise ValueError(f"unknown adversary {adversary!r}; allowed: {', '.join(ADVERSARIES)}")
    return adversary.split("-")[0]
