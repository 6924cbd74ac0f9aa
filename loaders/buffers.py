"""Reusable array memory for the loader's per-batch arrays.

Every batch needs fresh arrays: the decoded views (``(B, H, W, 3)`` uint8), the batch's sparse
expression (gene indices and counts) and, with the compiled Parquet decoder, each row group's
decoded lists. Allocated anew, each is a large block that the allocator maps from the
kernel and the first write faults in page by page: at 3,000 genes with niche about 25 page faults
a sample, 50-80 us of system time against a ~340 us JPEG decode (bench/README.md, issue 16).

:class:`ArrayPool` hands out views of byte buffers it keeps, and hands a buffer out again only
when nothing else refers to it any more (every view of it, and every tensor made from one, has
been dropped, or a DataLoader worker copied the batch into shared memory), so reuse is safe by
construction: a consumer that keeps a batch keeps its buffers. The pool is per process: pickled
(a worker started by spawn or forkserver) it arrives empty; a forked worker inherits a copy, in
which a buffer referred to at the fork stays referred to and is never handed out.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import numpy.typing as npt


class ArrayPool:
    """Buffers for per-batch arrays, reused once nothing refers to them.

    ``get`` returns a C-contiguous array of the asked shape and dtype (uninitialised, like
    ``np.empty``) that is a view of one of the pool's buffers: the smallest free one that holds
    it, else a new one with some slack (an eighth, so that batches of slightly different sizes
    share buffers). At most ``size`` buffers are kept; past that the pool forgets its smallest free
    buffer, or its oldest one when none is free (that one lives on, with whoever holds it).
    """

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self.buffers: list[npt.NDArray[np.uint8]] = []
        self._lock = threading.Lock()
        # What ``sys.getrefcount`` reports for a buffer that only the pool refers to, measured by
        # the same loop that tests the buffers (the figure differs between Python versions).
        self.buffers.append(np.empty(0, dtype=np.uint8))
        (self._free_refs,) = self._refcounts()
        self.buffers.clear()

    def get(self, shape: int | tuple[int, ...], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
        """An uninitialised ``shape`` array of ``dtype`` that nothing else refers to."""
        dt = np.dtype(dtype)
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        n = dt.itemsize * int(np.prod(dims, dtype=np.int64))
        with self._lock:
            free = self._free()
            fitting = [i for i in free if len(self.buffers[i]) >= n]
            if fitting:
                buffer = self.buffers[min(fitting, key=lambda i: len(self.buffers[i]))]
            else:
                if len(self.buffers) >= self.size:
                    self.buffers.pop(min(free, key=lambda i: len(self.buffers[i])) if free else 0)
                buffer = np.empty(max(n + n // 8, 64), dtype=np.uint8)
                self.buffers.append(buffer)
            # A view of a view keeps the owning buffer as its base, so the buffer's reference
            # count reflects every array and tensor made from what is returned here.
            return buffer[:n].view(dt).reshape(dims)

    def _refcounts(self) -> list[int]:
        counts: list[int] = []
        for buffer in self.buffers:
            counts.append(sys.getrefcount(buffer))
        return counts

    def _free(self) -> list[int]:
        """Indices of the buffers nothing else refers to."""
        return [i for i, count in enumerate(self._refcounts()) if count <= self._free_refs]

    def __len__(self) -> int:
        return len(self.buffers)

    def __getstate__(self) -> dict[str, object]:
        return {"size": self.size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(int(state["size"]))  # type: ignore[misc]
