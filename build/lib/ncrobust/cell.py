"""A grid cell ``(dataset, model, loss, adversary, seed)``. Free of torch, so that parsing the
workflow (once per job on a cluster) does not pay for importing it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ADVERSARIES = ("st", "pgd-linf", "pgd-l2", "trades-linf", "trades-l2")


@dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    loss: str
    adversary: str
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def adversary_kind(adversary: str) -> str:
    """``st``, ``pgd`` or ``trades``."""
    if adversary not in ADVERSARIES:
        raise ValueError(f"unknown adversary {adversary!r}; allowed: {', '.join(ADVERSARIES)}")
    return adversary.split("-")[0]
