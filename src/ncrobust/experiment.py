"""From a validated config to the objects of one grid cell.

A cell is ``(dataset, model, loss, adversary, seed)``; everything a stage needs about it (the
model's constructor options, the threat model, the training recipe) is resolved here, so that
every stage reads the config the same way and an output depends only on its config slice.
"""

from __future__ import annotations

import hashlib
import torch

from .attacks import ThreatModel
from .cell import ADVERSARIES, Cell, adversary_kind  # noqa: F401  (re-exported)
from .models import create_model


def threat_model(config: dict, cell: Cell) -> ThreatModel:
    """The cell's threat model: the adversary's norm, or the dataset's default norm for ``st``."""
    ds = config["datasets"][cell.dataset]
    norm = ds["norm"] if adversary_kind(cell.adversary) == "st" else cell.adversary.split("-")[1]
    if norm not in ds["threat"]:
        raise ValueError(f"datasets.{cell.dataset}.threat has no {norm!r} entry (needed by adversary {cell.adversary})")
    t = ds["threat"][norm]
    return ThreatModel(norm=norm, eps=float(t["eps"]), step_size=float(t["step_size"]), steps=int(t["steps"]))


def build_model(config: dict, cell: Cell, data: dict) -> torch.nn.Module:
    """The cell's model with the seed's initialisation (seeded here, so init is reproducible)."""
    torch.manual_seed(cell.seed)
    x = data["x_train"]
    return create_model(
        cell.model,
        num_classes=len(data["classes"]),
        in_chans=x.shape[1],
        image_size=x.shape[-1],
        mean=data["mean"],
        std=data["std"],
        **config.get("models", {}).get(cell.model, {}),
    )


def stream_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (strings, ints): same parts, same stream, any process."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded by ``stream_seed(*parts)``."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(*parts))
    return g


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but torch sees no GPU; use device: auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda")
    return torch.device(name)
