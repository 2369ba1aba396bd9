"""Counting the calls that make the host wait for the device (on a GPU), on any device.

On the CPU nothing waits, so the calls themselves are counted: reading a tensor's value on the host (``item``,
``__bool__``, ``float``/``int``: aten ``_local_scalar_dense``; ``tolist``), shapes that depend on the data
(``nonzero``, ``masked_select``, indexing with a boolean mask, forward or backward) and tensors made from host
lists (``torch.tensor`` / ``as_tensor``: a host-to-device copy on a GPU). ``ignore`` names source folders (or
``file.py:function``) whose calls read host-side tensors only (the optimiser's step counter, kornia's
parameters drawn on the CPU).
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR = {torch.ops.aten._local_scalar_dense.default}
_DATA_SHAPED = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default}
_INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
             torch.ops.aten._index_put_impl_.default}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else None
    return isinstance(indices, (list, tuple)) and any(
        t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)


class SyncCounter:
    """``with SyncCounter() as c: ...`` then ``c.total`` and ``c.counts`` (by kind) and ``c.where`` (sites)."""

    def __init__(self, ignore: Sequence[str] = ()) -> None:
        self.ignore = tuple(ignore)
        self.counts: Counter[str] = Counter()
        self.where: Counter[str] = Counter()
        counter = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in _SCALAR:
                    counter._hit("item")
                elif func in _DATA_SHAPED:
                    counter._hit(func.__name__.split(".")[0])
                elif func in _INDEXING and _bool_index(args):
                    counter._hit("bool_index")
                return func(*args, **(kwargs or {}))

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is torch.Tensor.tolist:
                    counter._hit("tolist")
                elif func in (torch.tensor, torch.as_tensor) and args and isinstance(args[0], (list, tuple)):
                    counter._hit("tensor_from_list")
                return func(*args, **(kwargs or {}))

        self._modes = [_Function(), _Dispatch()]

    def _hit(self, kind: str) -> None:
        stack = [f for f in traceback.extract_stack() if not f.filename.endswith(("syncs.py", "_python_dispatch.py",
                                                                                "overrides.py"))]
        if any(any(part in f"{f.filename}:{f.name}" for part in self.ignore) for f in stack):
            return
        self.counts[kind] += 1
        site = next((f for f in reversed(stack) if "/pipeline/" in f.filename), stack[-1])
        self.where[f"{kind} {site.filename.split('/')[-1]}:{site.lineno}"] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> SyncCounter:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
