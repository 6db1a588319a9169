"""Host synchronisations, counted on the CPU.

On a GPU, a call that reads a tensor's value back to the host (``.item()``, ``bool(t)``,
``torch.bincount``, which sizes its output from the input's maximum, a boolean mask, ...) waits
for every queued kernel: inside a per-batch loop it keeps the GPU idle while Python launches the
next kernels. ``torch.cuda.set_sync_debug_mode`` only sees them on a GPU; :class:`HostSyncs`
records the calls that would synchronise there from any device, so a CPU test can check that a
loop's synchronisations do not grow with its number of batches. ``.to(device)`` is not counted:
on the CPU it cannot tell a move to the host from a move to the data's own device; a tensor made
from host data (a list, an array) on an explicit ``device`` is (a host-to-device copy).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# Calls whose result depends on a tensor's values on the host, or whose output size does.
SYNCING = {
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
    "nonzero", "argwhere", "bincount", "unique", "unique_consecutive", "masked_select",
    "repeat_interleave", "equal", "allclose", "is_nonzero",
}


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncs(TorchFunctionMode):
    """Within ``with HostSyncs() as syncs:``, ``syncs.calls`` lists the name of every call that
    would synchronise with a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in SYNCING:
            self.calls.append(name)
        elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None and not isinstance(args[0], torch.Tensor):
            self.calls.append(f"{name}(host data, device=...)")  # a copy from pageable host memory waits
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1 and _bool_index(args[1]):
            self.calls.append(f"{name}[bool mask]")
        return func(*args, **kwargs)
