"""The empirical neural tangent kernel of a classifier, built blockwise within a memory budget.

For logits ``f_c(x; theta)`` (Jacot et al. 2018; the empirical, finite-width kernel of Tsilivis &
Kempe 2022, "What Can the Neural Tangent Kernel Tell Us About Adversarial Robustness?", NeurIPS):

- ``kind="full"``: ``K[(n, c), (m, d)] = <d f_c(x_n)/d theta, d f_d(x'_m)/d theta>``, returned as one
  matrix ``[N1 * C, N2 * C]`` whose row ``n * C + c`` is sample ``n``, logit ``c``
  (``K.view(N1, C, N2, C)[n, c, m, d]``): the layout of the product ``J J^T``, so no copy is made.
- ``kind="trace"``: ``K[n, m] = sum_c <d f_c(x_n)/d theta, d f_c(x'_m)/d theta>`` (the trace of the
  full kernel over the logits), ``[N1, N2]``; Tsilivis & Kempe's per-epoch kernel.

``theta`` is every parameter with ``requires_grad`` (frozen parameters and buffers are constants).
The model runs in eval mode (BatchNorm on its running statistics) and every submodule's flag is
restored afterwards (:func:`ncrobust.models.base.eval_mode`).

How it is built (Novak et al. 2022, "Fast Finite Width Neural Tangent Kernel", the Jacobian
contraction): the parameters are cut into chunks (whole tensors packed together, a tensor larger
than a chunk cut into flat slices); per chunk and per group of logits, the per-sample Jacobian
``[n, logits, chunk]`` of every sample is computed with ``torch.func`` (``vmap`` over the samples of a
block of ``jacrev`` of ``functional_call``), stored in float64, and contracted into the kernel by
``addmm_`` (``K += P1 P2^T``; for ``K(x, x)`` only the bands from the diagonal rightwards, mirrored at
the end: about half the flops, and a kernel symmetric to the bit). The kernel is the sum over chunks, accumulated in float64; the
Jacobians are in the model's dtype (float32 products are exact in float64, so only the sums round).
:func:`plan_ntk` picks the chunks, the sample block and the logit group so that the estimated peak
(the kernel, the stored Jacobian panel, twice the working set of one vmapped Jacobian pass, and a
5% margin) stays within ``memory_bytes``: fewest chunks first (each chunk costs a backward pass per
sample and logit), then fewest passes. A budget too small for the kernel and the smallest pass is
a one-line ``ValueError`` that says how many samples would fit.

Deterministic: a fixed plan fixes every block and every summation order, so the same inputs give
the same bits on the CPU (on CUDA, with ``torch.use_deterministic_algorithms(True)``). A kernel
built with other blocks differs by rounding in the model's dtype: per-sample gradients computed in
batches of another size, or a backward pass stopped at another layer, round differently (float32:
relative differences of about 1e-7; a float64 model: about 1e-15).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ncrobust.models.base import eval_mode

KINDS = ("trace", "full")
DEFAULT_MEMORY_BYTES = 2 << 30  # 2 GiB
_F64 = 8  # bytes per float64 element
_MAX_SAMPLE_BLOCK = 256
_ROW_BLOCK = 64  # rows per band of a symmetric kernel's triangular product (measured: 64 keeps the matrix product's rate)
# The planner's estimate of one pass: the forward's saved activations of the block, plus, per
# (sample, logit) cotangent, the gradients of those activations (counted in full: a bound, not the
# live peak), the chunk's whole-tensor Jacobians and _COPIES more of its largest tensor's (a
# per-sample weight gradient is made and copied into jacrev's output while the next one is made).
# The pass is counted _PASSES times: an allocator keeps freed blocks for reuse (glibc's heap on the
# CPU, the caching allocator on a GPU), so between passes up to about one pass of freed memory stays
# resident next to the panel. Measured on PreActResNet18 on the CPU: with one pass counted, the peak
# growth of resident memory exceeded the estimate by up to 10% (allocator retention); with two it
# stays below. The first call in a process adds about 90 MiB once (the runtime's lazily made kernels
# and pools), outside any plan.
_COPIES = 3
_PASSES = 2
_MARGIN = 20  # the plan keeps 1/20 (5%) of its panel and pass estimate as a margin, within the budget
Piece = tuple[str, int, int]  # a parameter's flat slice: (name, start, stop)


@dataclass(frozen=True)
class NTKPlan:
    """How :func:`empirical_ntk` builds one kernel, and what it is estimated to hold at its peak.

    ``chunks``: the parameter chunks, each a tuple of flat slices ``(name, start, stop)``;
    ``sample_block`` samples and ``logit_block`` logits per vmapped Jacobian pass; bytes are
    estimates on the model's device: ``kernel_bytes`` (the result), ``panel_bytes`` (the largest
    chunk's float64 Jacobians of all samples), ``work_bytes`` (one pass), ``peak_bytes`` the kernel,
    the panel and two passes (one for what the allocator keeps) at the largest chunk, plus a 5%
    margin on the last two: ``<= memory_bytes``."""

    kind: str
    n1: int
    n2: int
    symmetric: bool
    num_classes: int
    num_params: int
    sample_block: int
    logit_block: int
    chunks: tuple[tuple[Piece, ...], ...]
    activation_bytes_per_sample: int
    kernel_bytes: int
    panel_bytes: int
    work_bytes: int
    peak_bytes: int
    memory_bytes: int

    @property
    def passes(self) -> int:
        """Vmapped Jacobian passes: chunks x logit groups x sample blocks (of both input sets)."""
        blocks = math.ceil(self.n1 / self.sample_block) + (0 if self.symmetric else math.ceil(self.n2 / self.sample_block))
        return len(self.chunks) * math.ceil(self.num_classes / self.logit_block) * blocks

    def describe(self) -> str:
        """One line: what is built, in how many pieces, and the bound it keeps."""
        shape = f"{self.n1}x{self.n2}" if self.kind == "trace" else f"{self.n1 * self.num_classes}x{self.n2 * self.num_classes}"
        return (f"{self.kind} NTK {shape} over {self.num_params:,} parameters: {len(self.chunks)} parameter chunk(s), "
                f"{self.sample_block} sample(s) x {self.logit_block} logit(s) per pass, {self.passes} passes; "
                f"estimated peak {_mib(self.peak_bytes)} (kernel {_mib(self.kernel_bytes)}, Jacobian panel "
                f"{_mib(self.panel_bytes)}, pass {_mib(self.work_bytes)} counted twice) "
                f"within memory_bytes={self.memory_bytes:,}")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


# --------------------------------------------------------------------------------------------
# Validation and the model's figures
# --------------------------------------------------------------------------------------------


def _check_inputs(model, x1, x2, kind, memory_bytes) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if kind not in KINDS:
        raise ValueError(f"unknown NTK kind {kind!r}; allowed: {', '.join(KINDS)}")
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 1:
        raise ValueError(f"memory_bytes must be an integer >= 1, got {memory_bytes!r}")
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None and name == "x2":
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty floating-point batch [N, ...], got "
                             f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"x1 and x2 must hold samples of one shape, got {tuple(x1.shape[1:])} and {tuple(x2.shape[1:])}")


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no parameter with requires_grad: its NTK is zero")
    return params


def _probe(model: nn.Module, sample: torch.Tensor) -> tuple[int, int]:
    """``(num_classes, bytes saved for backward by one sample's forward)`` (the saved activations,
    parameters excluded), measured on one forward pass in eval mode."""
    params = _trainable(model)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if t.untyped_storage().data_ptr() not in param_ptrs:
            saved += t.numel() * t.element_size()
        return t

    first = next(iter(params.values()))
    with eval_mode(model), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(sample[:1].detach().to(first.device, first.dtype))
    if out.ndim != 2 or out.shape[0] != 1:
        raise ValueError(f"model(x) must return logits [N, C], got shape {tuple(out.shape)} for one sample")
    return int(out.shape[1]), saved


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def _chunks(sizes: list[tuple[str, int]], cap: int, slice_cap) -> list[list[Piece]]:
    """Whole tensors packed in order into chunks of at most ``cap`` elements; a tensor of more than
    ``cap`` elements is cut into flat slices of ``slice_cap(numel)`` elements, each its own chunk."""
    chunks: list[list[Piece]] = []
    current: list[Piece] = []
    filled = 0
    for name, numel in sizes:
        if numel > cap:
            step = slice_cap(numel)
            chunks.extend([[(name, s, min(numel, s + step))] for s in range(0, numel, step)])
            continue
        if filled + numel > cap:
            chunks.append(current)
            current, filled = [], 0
        current.append((name, 0, numel))
        filled += numel
    if current:
        chunks.append(current)
    return chunks


def _costs(chunk: list[Piece], numels: dict[str, int], *, rows, logits, block, act, itemsize):
    """``(panel_bytes, work_bytes)`` of one chunk: the float64 Jacobians of all ``rows`` samples,
    and one pass of ``block`` samples and ``logits`` logits (saved activations, their gradients per
    cotangent, the touched tensors' whole per-sample Jacobians in the model's dtype)."""
    width = sum(stop - start for _, start, stop in chunk)
    names = {name for name, _, _ in chunk}
    touched = sum(numels[name] for name in names)
    largest = max(numels[name] for name in names)
    panel = rows * logits * width * _F64
    work = block * act + block * logits * (act + (touched + _COPIES * largest) * itemsize)
    return panel, work


def plan_ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    kind: str = "trace",
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    sample_block: int | None = None,
    logit_block: int | None = None,
    max_chunk_numel: int | None = None,
) -> NTKPlan:
    """The plan :func:`empirical_ntk` follows for ``K(x1, x2)`` (``x2=None``: ``K(x1, x1)``, whose
    Jacobians are computed once), with its estimated peak bytes on the model's device.

    Runs the model once on one sample (to read ``C`` and the activation bytes a sample saves for
    backward). ``sample_block``, ``logit_block`` (trace kind only; the full kind needs all ``C``
    logits of a sample together) and ``max_chunk_numel`` fix those choices instead of searching
    them (tests, benchmarks); the plan must still fit ``memory_bytes``. Raises a one-line
    ``ValueError`` naming the budget, what the smallest plan needs and how many samples would fit.
    """
    _check_inputs(model, x1, x2, kind, memory_bytes)
    for name, v in (("sample_block", sample_block), ("logit_block", logit_block), ("max_chunk_numel", max_chunk_numel)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}")
    num_classes, act = _probe(model, x1)
    if kind == "full" and logit_block not in (None, num_classes):
        raise ValueError(f"the full kernel takes all {num_classes} logits of a sample per pass, got logit_block={logit_block}")
    params = _trainable(model)
    sizes = [(name, p.numel()) for name, p in params.items()]
    itemsize = next(iter(params.values())).element_size()
    symmetric = x2 is None
    n1 = x1.shape[0]
    n2 = n1 if symmetric else x2.shape[0]
    best = _search(sizes, n1, n2, symmetric, num_classes, kind, act, itemsize, memory_bytes,
                   sample_block, logit_block, max_chunk_numel)
    if best is None:
        raise ValueError(_refusal(sizes, n1, n2, symmetric, num_classes, kind, act, itemsize, memory_bytes))
    block, logits, chunks, panel, work, kernel = best
    return NTKPlan(kind=kind, n1=n1, n2=n2, symmetric=symmetric, num_classes=num_classes,
                   num_params=sum(n for _, n in sizes), sample_block=block, logit_block=logits,
                   chunks=tuple(tuple(c) for c in chunks), activation_bytes_per_sample=act, kernel_bytes=kernel,
                   panel_bytes=panel, work_bytes=work, peak_bytes=_peak(kernel, panel, work), memory_bytes=memory_bytes)


def _peak(kernel: int, panel: int, work: int) -> int:
    return kernel + panel + _PASSES * work + (panel + _PASSES * work) // _MARGIN


def _kernel_bytes(n1, n2, num_classes, kind) -> int:
    return n1 * n2 * _F64 * (num_classes**2 if kind == "full" else 1)


def _halvings(n: int, top: int) -> list[int]:
    """``min(n, top)``, then halved down to 1."""
    out, v = [], min(n, top)
    while v >= 1:
        out.append(v)
        v = v // 2 if v > 1 else 0
    return out


def _search(sizes, n1, n2, symmetric, num_classes, kind, act, itemsize, memory_bytes,
            sample_block=None, logit_block=None, max_chunk_numel=None):
    """The feasible (sample block, logit group, chunks) with the fewest chunks, then the fewest
    passes; ``None`` when nothing fits."""
    numels = dict(sizes)
    rows = n1 if symmetric else n1 + n2
    kernel = _kernel_bytes(n1, n2, num_classes, kind)
    blocks = [sample_block] if sample_block else _halvings(max(n1, n2), _MAX_SAMPLE_BLOCK)
    if kind == "full":
        groups = [num_classes]
    else:
        groups = [logit_block] if logit_block else _halvings(num_classes, num_classes)
    best, best_key = None, None
    for logits in groups:
        logits = min(logits, num_classes)
        for block in blocks:
            room = (memory_bytes - kernel) * _MARGIN // (_MARGIN + 1) - _PASSES * (block * act + block * logits * act)
            if room <= 0:
                continue
            per_element = _PASSES * (1 + _COPIES) * block * logits * itemsize  # of a tensor, in the passes
            cap = room // (rows * logits * _F64 + per_element)
            if max_chunk_numel:
                cap = min(cap, max_chunk_numel)
            if cap < 1:
                continue

            def slice_cap(numel, logits=logits, room=room, cap=cap, per_element=per_element):
                return max(0, min(cap, (room - per_element * numel) // (rows * logits * _F64)))

            if any(numel > cap and slice_cap(numel) < 1 for _, numel in sizes):
                continue
            chunks = _chunks(sizes, cap, slice_cap)
            costs = [_costs(c, numels, rows=rows, logits=logits, block=block, act=act, itemsize=itemsize) for c in chunks]
            panel, work = max(costs, key=sum)
            if _peak(kernel, panel, work) > memory_bytes:  # not by construction; kept as the bound's check
                continue
            sample_blocks = math.ceil(n1 / block) + (0 if symmetric else math.ceil(n2 / block))
            key = (len(chunks), len(chunks) * math.ceil(num_classes / logits) * sample_blocks)  # chunks, then passes
            if best_key is None or key < best_key:
                best, best_key = (block, logits, chunks, panel, work, kernel), key
    return best


def _refusal(sizes, n1, n2, symmetric, num_classes, kind, act, itemsize, memory_bytes) -> str:
    """The one-line refusal: what the smallest plan needs and how many samples would fit."""
    largest = max(n for _, n in sizes)
    logits = num_classes if kind == "full" else 1
    kernel = _kernel_bytes(n1, n2, num_classes, kind)
    rows = n1 if symmetric else n1 + n2
    smallest = _peak(kernel, rows * logits * _F64, act + logits * (act + (1 + _COPIES) * largest * itemsize))
    lo, hi = 0, max(n1, n2)
    while lo < hi:  # the largest symmetric n whose smallest plan fits
        mid = (lo + hi + 1) // 2
        if _search(sizes, mid, mid, True, num_classes, kind, act, itemsize, memory_bytes) is not None:
            lo = mid
        else:
            hi = mid - 1
    shape = f"{n1}x{n2}" if kind == "trace" else f"{n1 * num_classes}x{n2 * num_classes}"
    fit = f"at most {lo} samples fit (a symmetric {kind} kernel)" if lo else "not even one sample fits"
    return (f"the {kind} NTK {shape} does not fit in memory_bytes={memory_bytes:,}: the kernel alone is "
            f"{kernel:,} bytes and the smallest plan (one sample, {logits} logit(s), the largest parameter tensor of "
            f"{largest:,} elements) needs about {smallest:,}; {fit}")


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------


def empirical_ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None = None,
    *,
    kind: str = "trace",
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    plan: NTKPlan | None = None,
) -> torch.Tensor:
    """The empirical NTK ``K(x1, x2)`` of ``model`` (``x2=None``: ``K(x1, x1)``, symmetric to the
    bit), float64 on the model's device: ``[N1, N2]`` for ``kind="trace"``, ``[N1 * C, N2 * C]``
    (row ``n * C + c``) for ``kind="full"`` (module docstring).

    Inputs are cast to the parameters' dtype and device. ``plan`` (from :func:`plan_ntk` on the same
    model and input shapes) is used as given; otherwise one is made within ``memory_bytes``.
    """
    if plan is None:
        plan = plan_ntk(model, x1, x2, kind=kind, memory_bytes=memory_bytes)
    else:
        _check_inputs(model, x1, x2, plan.kind, plan.memory_bytes)
        if (plan.n1, plan.n2, plan.symmetric) != (x1.shape[0], (x1 if x2 is None else x2).shape[0], x2 is None):
            raise ValueError(f"the plan is for {plan.n1} x {plan.n2} samples (symmetric={plan.symmetric}), "
                             f"got {x1.shape[0]} x {(x1 if x2 is None else x2).shape[0]} (symmetric={x2 is None})")
    params = {name: p.detach() for name, p in _trainable(model).items()}
    first = next(iter(params.values()))
    constants = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    constants.update(dict(model.named_buffers()))
    sets = [x1.detach().to(first.device, first.dtype)]
    if x2 is not None:
        sets.append(x2.detach().to(first.device, first.dtype))
    C = plan.num_classes
    K = torch.zeros(plan.n1 * (C if plan.kind == "full" else 1), plan.n2 * (C if plan.kind == "full" else 1),
                    dtype=torch.float64, device=first.device)
    # one buffer per input set, sized for the widest chunk and reused (no page faults per chunk)
    widest = max(sum(stop - start for _, start, stop in chunk) for chunk in plan.chunks)
    buffers = [torch.empty(x.shape[0] * plan.logit_block * widest, dtype=torch.float64, device=first.device) for x in sets]
    with eval_mode(model):
        for chunk in plan.chunks:
            width = sum(stop - start for _, start, stop in chunk)
            for g0 in range(0, C, plan.logit_block):
                logits = slice(g0, min(C, g0 + plan.logit_block))
                g = logits.stop - logits.start
                panels = []
                for x, buffer in zip(sets, buffers):
                    panel = buffer[: x.shape[0] * g * width].view(x.shape[0], g, width)
                    for b0 in range(0, x.shape[0], plan.sample_block):
                        xb = x[b0 : b0 + plan.sample_block]
                        jac = _jacobian(model, params, constants, chunk, xb, logits)
                        offset = 0
                        for name, start, stop in chunk:
                            panel[b0 : b0 + len(xb), :, offset : offset + stop - start].copy_(
                                jac[name].flatten(2)[..., start:stop])
                            offset += stop - start
                        del jac
                    panels.append(panel)
                cols = g * width if plan.kind == "trace" else width  # full: rows (n, c) of [n * C, width]
                left, right = panels[0].view(-1, cols), panels[-1].view(-1, cols)
                if x2 is None:
                    _add_upper_(K, left)
                else:
                    K.addmm_(left, right.T)
                del panels, left, right
    del buffers
    if x2 is None:
        _mirror_upper_(K)
    return K


def _jacobian(model, params, constants, chunk, xb, logits: slice) -> dict[str, torch.Tensor]:
    """Per-sample Jacobians ``{name: [B, g, *shape]}`` of logits ``logits`` with respect to the
    tensors that ``chunk`` touches (whole tensors: autograd cannot give part of a weight's
    gradient); the other parameters enter as constants, so backward stops where the chunk does."""
    names = list(dict.fromkeys(name for name, _, _ in chunk))
    wrt = {name: params[name] for name in names}
    rest = {name: p for name, p in params.items() if name not in wrt}

    def logits_of(p, xi):
        return functional_call(model, (p, rest, constants), (xi.unsqueeze(0),))[0, logits]

    return vmap(jacrev(logits_of), in_dims=(None, 0))(wrt, xb)


def _add_upper_(K: torch.Tensor, P: torch.Tensor, rows: int = _ROW_BLOCK) -> None:
    """``K += P P^T`` on the bands of rows from the diagonal rightwards only (about half the flops
    of the whole product; the band's diagonal block is whole): :func:`_mirror_upper_` completes it."""
    n = K.shape[0]
    for a in range(0, n, rows):
        b = min(n, a + rows)
        K[a:b, a:].addmm_(P[a:b], P[a:].T)


def _mirror_upper_(K: torch.Tensor, rows: int = 256) -> None:
    """Copies the upper triangle onto the lower one, a band at a time: ``K`` symmetric to the bit."""
    n = K.shape[0]
    for a in range(0, n, rows):
        b = min(n, a + rows)
        K[a:b, a:b] = K[a:b, a:b].triu() + K[a:b, a:b].triu(1).T
        K[b:, a:b] = K[a:b, b:].T


def logit_trace(K_full: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The trace kernel ``[N1, N2]`` of a full kernel ``[N1 * C, N2 * C]``: ``sum_c K[(n, c), (m, c)]``
    (what ``kind="trace"`` gives directly, for the label-based measures of a full kernel)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if K_full.ndim != 2 or K_full.shape[0] % num_classes or K_full.shape[1] % num_classes:
        raise ValueError(f"a full kernel has shape [N1 * C, N2 * C] with C={num_classes}, got {tuple(K_full.shape)}")
    n1, n2 = K_full.shape[0] // num_classes, K_full.shape[1] // num_classes
    return K_full.view(n1, num_classes, n2, num_classes).diagonal(dim1=1, dim2=3).sum(dim=-1)
