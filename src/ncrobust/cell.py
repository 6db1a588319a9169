"""A grid cell ``(dataset, model, loss, adversary, variant, seed)`` and its training adversary.
Free of torch, so that parsing the workflow (once per job on a cluster) does not pay for
importing it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ADVERSARIES = ("st", "pgd-linf", "pgd-l2", "trades-linf", "trades-l2")
"""The adversaries' names: ``st`` (standard training) and ``{kind}-{norm}``."""
BASE_VARIANT = "base"
"""The variant without overrides (``config.variants``): the recipe as the config states it."""


@dataclass(frozen=True)
class Adversary:
    """How a cell trains: ``kind`` ``st`` (standard training, no attack), ``pgd`` (PGD adversarial
    training) or ``trades`` (TRADES), and the ``norm`` of the threat model it attacks in
    (``linf`` or ``l2``; None for ``st``, which has no threat model of its own)."""

    kind: str
    norm: str | None = None

    def __post_init__(self) -> None:
        if self.name not in ADVERSARIES:
            raise ValueError(f"no adversary of kind {self.kind!r} and norm {self.norm!r}; allowed: {', '.join(ADVERSARIES)}")

    @classmethod
    def parse(cls, name: str) -> Adversary:
        """The adversary named ``name`` (one of :data:`ADVERSARIES`)."""
        if name not in ADVERSARIES:
            raise ValueError(f"unknown adversary {name!r}; allowed: {', '.join(ADVERSARIES)}")
        kind, _, norm = name.partition("-")
        return cls(kind, norm or None)

    @property
    def name(self) -> str:
        return self.kind if self.norm is None else f"{self.kind}-{self.norm}"


@dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    loss: str
    adversary: str
    seed: int
    variant: str = BASE_VARIANT

    @property
    def parsed_adversary(self) -> Adversary:
        """The adversary that ``adversary`` (a name, as the workflow's wildcards give it) names."""
        return Adversary.parse(self.adversary)

    def as_dict(self) -> dict:
        return asdict(self)
