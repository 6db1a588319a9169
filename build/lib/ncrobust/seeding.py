"""Seeded random streams: every random draw of a job comes from a generator named by its purpose
(``(seed, "epoch", e)``, ``(seed, "evaluate", epoch, split, perturbation)``, ...), so a result does
not depend on which other draws ran before it, in this process or another."""

from __future__ import annotations

import hashlib

import torch


def stream_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (strings, ints): same parts, same stream, any process."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded by ``stream_seed(*parts)``."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(*parts))
    return g
