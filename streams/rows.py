"""Records and row-level helpers of the stream engine (:mod:`streams.engine`): consumed
messages, per-partition progress, fence positions, entity codes, and the de-duplication
of replayed rows inside one batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_defs.state import NO_TS

__all__ = ["RawMessage", "PartitionProgress", "positions", "concat", "column_codes",
           "not_repeated", "BEHIND", "admitted_by"]

#: column of accepted rows of a source whose views allow different lateness: how far (ms)
#: the row's ts was behind its partition's watermark on arrival (see
#: :class:`feature_defs.topology.Topology`); a view of allowed lateness L applies the
#: rows with ``BEHIND <= L`` (null: the row is not behind)
BEHIND = "_behind_ms"


@dataclass(frozen=True)
class RawMessage:
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass
class PartitionProgress:
    """Progress of one assigned partition (source or repartition topic)."""

    topic: str
    partition: int
    source: str | None  # source name for source topics, None for repartition topics
    next: int = 0  # next offset to process
    max_ts: int = NO_TS  # max accepted event time (watermark + lateness)
    online_next: int = 0
    offline_next: int = 0
    offline_wm: int = NO_TS
    buffer: list[pa.Table] = field(default_factory=list)
    gap_seeks: int = 0  # re-seeks requested for the current gap
    seek_at: float = float("-inf")  # monotonic time of the last seek requested or made
    #: (next, the first offset at or after it that the log holds, None: unknown)
    probed: tuple[int, int | None] | None = None
    #: a detached offline part of this partition is being written (no second part is
    #: detached until it is durable and recorded: both would start at offline_next)
    offline_busy: bool = False
    #: side outputs (late, dead letters) below this offset were published already (an
    #: online rebuild replays them: not again)
    sides_next: int = 0

    def buffered_rows(self) -> int:
        """Events buffered for the next offline part."""
        return sum(t.num_rows for t in self.buffer)

    def commit_mapping(self) -> dict[str, int]:
        return {"online_next": self.next, "online_wm": self.max_ts}


def positions(offsets: Any, indexes: Any) -> np.ndarray:
    """Fence positions (offset, index-in-message) as int64, see ``fence_pos``."""
    off = pc.cast(offsets, pa.int64()).to_numpy()
    idx = pc.cast(indexes, pa.int64()).to_numpy()
    return (off << 20) | idx


def concat(tables: list[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="default")


def column_codes(col: pa.ChunkedArray | pa.Array) -> tuple[list[str], np.ndarray]:
    """(distinct ids, per row the index of its id among them), encoded by Arrow."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    enc = pc.dictionary_encode(col)
    return enc.dictionary.to_pylist(), enc.indices.to_numpy().astype(np.int64)


def not_repeated(codes: np.ndarray, fkeys: np.ndarray, pos: np.ndarray) -> np.ndarray | None:
    """Rows to keep so that one batch applies like its messages one after another.

    A state's fence per (entity, fence key) holds the last applied position; rows at or
    below it are replays. Within a batch that must also hold against *earlier rows of the
    batch*: a row is dropped when an earlier row of the same (entity, fence key) had a
    position >= its own (a replayed forward). ``codes`` are the rows' entity codes.
    Returns None when no row is dropped (the usual case, checked vectorized), else the
    boolean keep mask.
    """
    n = len(codes)
    if n < 2:
        return None
    group = codes * (int(fkeys.max()) + 1) + fkeys  # fence keys are small non-negative ints
    order = np.argsort(group, kind="stable")
    g, p = group[order], pos[order]
    if not ((g[1:] == g[:-1]) & (p[1:] <= p[:-1])).any():
        return None
    keep = np.ones(n, dtype=bool)
    best: dict[int, int] = {}
    for r, (gr, pr) in enumerate(zip(group.tolist(), pos.tolist(), strict=True)):
        if pr <= best.get(gr, -1):
            keep[r] = False
        else:
            best[gr] = pr
    return keep


def admitted_by(table: pa.Table, lateness_ms: int) -> np.ndarray | None:
    """Rows of ``table`` not late for a view allowing ``lateness_ms`` (boolean mask), or
    None when all are (no :data:`BEHIND` column, or nothing that far behind)."""
    if BEHIND not in table.column_names:
        return None
    behind = pc.fill_null(table[BEHIND], 0).to_numpy()
    ok = behind <= lateness_ms
    return None if ok.all() else ok
