"""What reading and scoring a LightGBM model needs: the module, and category codes.

Shared by training (:mod:`offline`) and serving: a model artifact written by one is read
by the other, so the code that maps string categories to LightGBM's integer codes exists
once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from headrace.core.errors import missing_extra

__all__ = ["CategoryCodes", "lightgbm"]


def lightgbm() -> Any:
    """The ``lightgbm`` module, or the "install the extra" error."""
    try:
        import lightgbm as lgb
    except ModuleNotFoundError as exc:
        raise missing_extra("lightgbm", "offline or serve") from exc
    return lgb



@dataclass(frozen=True)
class CategoryCodes:
    """String categories → LightGBM integer codes, fitted on training rows only.

    Per column the ``max_categories`` most frequent values seen at least ``min_count``
    times get codes 0, 1, … (frequency order, ties by value); anything else — unseen,
    rare or null — encodes as NaN, which LightGBM treats as missing.
    """

    categories: Mapping[str, tuple[str, ...]]

    @classmethod
    def fit(cls, table: pa.Table, columns: Sequence[str], *, max_categories: int = 1000,
            min_count: int = 1) -> CategoryCodes:
        cats: dict[str, tuple[str, ...]] = {}
        for name in columns:
            counts = pc.value_counts(table.column(name).cast(pa.string()).drop_null())
            pairs = [(c["counts"], c["values"]) for c in counts.to_pylist()
                     if c["counts"] >= min_count]
            pairs.sort(key=lambda vc: (-vc[0], vc[1]))
            cats[name] = tuple(v for _, v in pairs[:max_categories])
        return cls(cats)

    def encode(self, name: str, values: pa.Array | pa.ChunkedArray | Sequence[Any]) -> np.ndarray:
        """Codes of ``values`` for column ``name`` as float64 (NaN = missing)."""
        arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(
            [None if v is None else str(v) for v in values], pa.string())
        idx = pc.index_in(arr.cast(pa.string()),
                          value_set=pa.array(self.categories[name], pa.string()))
        return np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.float64)

    def matrix(self, table: pa.Table) -> np.ndarray:
        """One float64 column of codes per fitted column, in fit order."""
        cols = [self.encode(name, table.column(name)) for name in self.categories]
        return np.column_stack(cols) if cols else np.empty((table.num_rows, 0))

    def to_json(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.categories.items()}

    @classmethod
    def from_json(cls, d: Mapping[str, Sequence[str]]) -> CategoryCodes:
        return cls({k: tuple(v) for k, v in d.items()})
