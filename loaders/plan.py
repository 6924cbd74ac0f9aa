"""Which samples each rank and worker reads, in which order: a pure function of the epoch.

The order of an epoch is decided before any byte is read, from ``shards.parquet`` counts alone:

1. **Shard order** (same on every rank): the selected shards of the split, permuted by
   ``(seed, epoch)``, concatenated into one global sequence of ``N`` samples.
2. **Split by rank**: rank ``r`` takes the contiguous positions ``[r*M, (r+1)*M)`` of that
   sequence. ``M = N // world_size`` (``uneven="drop"``: the last ``N mod world_size`` samples
   of the epoch are left out) or ``ceil(N / world_size)`` (``"wrap"``: the first ones are read
   twice). Every rank therefore yields exactly the same number of batches, known in advance.
3. **Shuffle**: the rank's positions are cut into windows of ``W`` samples (a multiple of the
   batch size) and each window is permuted by ``(seed, epoch, rank, window)``. This replaces a
   streaming shuffle buffer: the emitted order is a pure function of positions, so a resume
   seeks by counts instead of replaying a buffer, and no image is decoded to skip.
4. **Batches**: batch ``j`` is emitted positions ``[j*B, (j+1)*B)`` of the rank; it lies inside
   one window. Its content does not depend on the number of DataLoader workers.
5. **Split by worker**: the batches not yet consumed are cut into ``num_workers`` contiguous
   runs; the DataLoader takes one batch from each worker in turn, so the order in which the
   batches arrive is known too (``delivery_order``), and from a count of delivered batches the
   exact set of consumed batches follows.

Assignment is at sample granularity, so there is no "fewer shards than ranks x workers" failure:
a shard may be shared by neighbouring ranks or workers. The cost is read amplification at the
boundaries: each (rank, worker) run may start inside a shard. A Parquet reader seeks to the row
group (waste below one row group per run); a tar reader has no index and streams from the start
of the shard, skipping members without decoding them (waste below one shard per run; over HTTP
these are bytes transferred, but no extra request: one GET per shard visit either way). The
hard limits are: at least one batch per rank (else ``EmptySelectionError``), and at least one
batch per worker at the start of an epoch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from stcorpus.loaders.errors import EmptySelectionError, ResumeError

STATE_FORMAT: Final = "stcorpus-loader/1"

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class ShardEntry:
    """One shard the loader may read: where it is, how many rows, which of them are selected."""

    path: str  # relative to the corpus root
    split: str
    index: int
    n_rows: int  # rows in the file (shards.parquet n_samples)
    nbytes: int  # file size (shards.parquet bytes)
    rows: IntArray | None = None  # selected rows (sorted), None = every row
    first_key: str = ""  # shards.parquet first_key / last_key: checked when those rows are read
    last_key: str = ""

    @property
    def n(self) -> int:
        """Number of selected samples."""
        return self.n_rows if self.rows is None else len(self.rows)

    def raw_rows(self, start: int, stop: int) -> IntArray:
        """File rows of the selected samples ``[start, stop)`` of this shard."""
        if self.rows is None:
            return np.arange(start, stop, dtype=np.int64)
        return self.rows[start:stop]

    def fingerprint(self) -> str:
        """Digest of what the plan depends on: path, counts and row selection."""
        digest = hashlib.sha256(f"{self.path}:{self.n_rows}".encode())
        if self.rows is not None:
            digest.update(np.ascontiguousarray(self.rows, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Segment:
    """A run of samples to read from one shard: its position in ``shards`` and file rows."""

    shard: int
    rows: IntArray


def intervals(ids: Sequence[int] | IntArray) -> list[list[int]]:
    """Sorted ids as half-open ``[start, stop)`` runs: ``[0, 1, 2, 5]`` -> ``[[0, 3], [5, 6]]``."""
    out: list[list[int]] = []
    for i in sorted(int(x) for x in ids):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        elif not out or out[-1][1] < i:
            out.append([i, i + 1])
    return out


def expand(runs: Sequence[Sequence[int]]) -> IntArray:
    """Inverse of :func:`intervals`."""
    if not runs:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs])


def worker_runs(remaining: IntArray, num_workers: int) -> list[IntArray]:
    """Cut the batches not yet consumed into ``num_workers`` contiguous, balanced runs."""
    bounds = [len(remaining) * w // num_workers for w in range(num_workers + 1)]
    return [remaining[bounds[w] : bounds[w + 1]] for w in range(num_workers)]


def delivery_order(runs: Sequence[IntArray]) -> IntArray:
    """Order in which a DataLoader (``in_order=True``) delivers the batches of these worker runs.

    It asks the workers in turn and skips a worker once it is exhausted, so the order is
    round-robin over the runs that still have batches.
    """
    longest = max((len(r) for r in runs), default=0)
    order = [int(r[t]) for t in range(longest) for r in runs if t < len(r)]
    return np.asarray(order, dtype=np.int64)


@dataclass
class ResumeReport:
    """What a loaded state means for the next iteration; logged and returned by ``load_state_dict``."""

    epoch: int
    consumed_batches: int
    remaining_batches: int
    saved_workers: int | None
    num_workers: int | None
    skipped_samples: int = 0
    repeated_samples: int = 0
    notes: list[str] = field(default_factory=list)

    def message(self) -> str:
        """One line for the log."""
        workers = ""
        if self.saved_workers is not None and self.num_workers is not None and self.saved_workers != self.num_workers:
            workers = (
                f"; saved with {self.saved_workers} workers, resuming with {self.num_workers}: the remaining "
                "batches are re-split across the new workers (same batches, new delivery order)"
            )
        return (
            f"resuming epoch {self.epoch}: {self.consumed_batches} batches already consumed, "
            f"{self.remaining_batches} to go{workers}; {self.skipped_samples} samples skipped, "
            f"{self.repeated_samples} repeated"
        )


class EpochPlan:
    """The order of one epoch on one rank (see the module docstring)."""

    def __init__(
        self,
        shards: Sequence[ShardEntry],
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        rank: int,
        world_size: int,
        batch_size: int,
        window: int,
        drop_last: bool,
        uneven: str,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if window % batch_size:
            raise ValueError(f"window {window} must be a multiple of the batch size {batch_size}")
        self.shards = tuple(shards)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.window = batch_size, window
        self.drop_last, self.uneven = drop_last, uneven
        if shuffle:
            order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(self.shards))
        else:
            order = np.arange(len(self.shards))
        self.order: IntArray = order.astype(np.int64)
        counts = np.array([self.shards[i].n for i in self.order], dtype=np.int64)
        self.cum: IntArray = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.cum[-1])
        n = self.total
        if n < world_size:
            raise EmptySelectionError(
                f"{n} samples cannot be spread over {world_size} ranks: select more data or use fewer ranks"
            )
        self.per_rank = n // world_size if uneven == "drop" else -(-n // world_size)
        self.start = rank * self.per_rank
        self.n_batches = self.per_rank // batch_size if drop_last else -(-self.per_rank // batch_size)
        if self.n_batches == 0:
            raise EmptySelectionError(
                f"each of {world_size} ranks gets {self.per_rank} samples, fewer than one batch of "
                f"{batch_size} (drop_last=True): lower batch_size, use fewer ranks or select more data"
            )
        self.n_samples = self.n_batches * batch_size if drop_last else self.per_rank
        self.dropped = n - world_size * self.per_rank if uneven == "drop" else 0
        self.repeated = world_size * self.per_rank - n if uneven == "wrap" else 0

    # -- fingerprint -------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Digest of everything that decides which samples a batch holds, except the epoch and rank."""
        parts: dict[str, Any] = {
            "shards": [s.fingerprint() for s in self.shards],
            "seed": self.seed,
            "shuffle": self.shuffle,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "window": self.window,
            "drop_last": self.drop_last,
            "uneven": self.uneven,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    # -- positions -----------------------------------------------------------------------------

    def window_of(self, batch: int) -> int:
        """The window holding batch ``batch``."""
        return batch * self.batch_size // self.window

    def window_span(self, u: int) -> tuple[int, int]:
        """Rank positions ``[start, stop)`` of window ``u``."""
        start = u * self.window
        return start, min(start + self.window, self.per_rank)

    def window_permutation(self, u: int) -> IntArray:
        """Order in which window ``u``'s positions are emitted (offsets into the window)."""
        start, stop = self.window_span(u)
        if not self.shuffle:
            return np.arange(stop - start, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, u, 0x5EED])
        return rng.permutation(stop - start).astype(np.int64)

    def batch_offsets(self, batch: int, permutation: IntArray | None = None) -> IntArray:
        """Offsets, inside the batch's window, of the samples of ``batch`` in emitted order."""
        if not 0 <= batch < self.n_batches:
            raise IndexError(f"batch {batch} is not in [0, {self.n_batches})")
        u = self.window_of(batch)
        perm = self.window_permutation(u) if permutation is None else permutation
        lo = batch * self.batch_size - u * self.window
        hi = min(lo + self.batch_size, len(perm))
        return perm[lo:hi]

    def segments(self, start: int, stop: int) -> list[Segment]:
        """Shard runs holding rank positions ``[start, stop)``, in order."""
        out: list[Segment] = []
        g, g_stop = self.start + start, self.start + stop
        while g < g_stop:
            wrapped = g % self.total  # "wrap": positions past the end start again at the front
            k = int(np.searchsorted(self.cum, wrapped, side="right")) - 1
            shard = int(self.order[k])
            lo = wrapped - int(self.cum[k])
            take = min(int(self.cum[k + 1]) - wrapped, g_stop - g)
            rows = self.shards[shard].raw_rows(lo, lo + take)
            if out and out[-1].shard == shard and len(out[-1].rows) and len(rows) and rows[0] > out[-1].rows[-1]:
                out[-1] = Segment(shard, np.concatenate([out[-1].rows, rows]))
            else:
                out.append(Segment(shard, rows))
            g += take
        return out

    # -- workers -----------------------------------------------------------------------------

    def remaining(self, done: Sequence[Sequence[int]]) -> IntArray:
        """Batch ids not in the consumed runs ``done``, ascending."""
        mask = np.ones(self.n_batches, dtype=bool)
        for a, b in done:
            if not 0 <= a <= b <= self.n_batches:
                raise ResumeError(f"consumed batches [{a}, {b}) are outside this epoch's {self.n_batches} batches")
            mask[a:b] = False
        return np.flatnonzero(mask).astype(np.int64)

    def windows_for(self, batches: IntArray) -> list[int]:
        """Windows a worker must read to build ``batches``, ascending."""
        return sorted({self.window_of(int(b)) for b in batches})


def iter_window_batches(plan: EpochPlan, batches: IntArray) -> Iterator[tuple[int, list[int]]]:
    """``(window, [batch ids])`` for the worker's batches, window by window (ascending)."""
    current: int | None = None
    group: list[int] = []
    for b in sorted(int(x) for x in batches):
        u = plan.window_of(b)
        if current is not None and u != current:
            yield current, group
            group = []
        current = u
        group.append(b)
    if current is not None:
        yield current, group


@dataclass
class ResumePoint:
    """Where an interrupted epoch continues: the consumed batches and, when known, each worker's rest.

    ``runs`` (intervals per worker) is rotated so that worker 0 delivers next: a DataLoader with
    as many workers then delivers the remaining batches in exactly the order the interrupted one
    would have. With another number of workers the remaining batches are re-split instead.
    """

    epoch: int
    done: list[list[int]]
    runs: list[list[list[int]]] | None = None

    def worker_runs(self, plan: EpochPlan, num_workers: int) -> list[IntArray]:
        """The batches of each of ``num_workers`` workers."""
        if self.runs is not None and len(self.runs) == num_workers:
            return [expand(r) for r in self.runs]
        return worker_runs(plan.remaining(self.done), num_workers)


def advance(runs: Sequence[IntArray], delivered: int) -> tuple[IntArray, list[IntArray] | None]:
    """After ``delivered`` batches of these worker runs: the consumed ids and the rotated rest.

    The rest is None if no rotation of the remaining runs reproduces the delivery order (it
    always does for round-robin delivery; the check guards the assumption).
    """
    order = delivery_order(runs)
    consumed = order[:delivered]
    taken = set(consumed.tolist())
    rest = [run[sum(1 for b in run.tolist() if b in taken) :] for run in runs]
    if delivered >= len(order):
        return consumed, [np.zeros(0, dtype=np.int64) for _ in runs]
    nxt = int(order[delivered])
    p = next(w for w, run in enumerate(runs) if nxt in set(run.tolist()))
    rotated = rest[p:] + rest[:p]
    if not np.array_equal(delivery_order(rotated), order[delivered:]):
        return consumed, None
    return consumed, rotated
