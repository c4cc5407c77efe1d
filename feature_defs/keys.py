"""Entity ids from events: single and composite keys, and the derived key fields.

An :class:`~feature_defs.model.Entity` is keyed by one event field (``user`` by
``user_id``: the id is the field's value) or by several (``Entity("arm_publisher",
key=("model_version", "publisher_id"))``: a *composite* key). A composite id is its
parts' values joined by :data:`SEPARATOR`, in key order (``v4}{p01``; the Redis key is
then ``hr:arm_publisher:{v4}{p01}``). Ids cannot contain braces
(:func:`feature_defs.layout.entity_id_problem`), so the separator never occurs inside a
part and an id splits back into its parts unambiguously. An event whose part is null, or
a part that is not a valid id (only possible for fields the contract does not check as
ids, e.g. ``device_type``), has no id for that entity: it does not touch its views, as an
anonymous user does not touch the user views. Side effect worth knowing: the Redis
Cluster hash tag of a composite key is its *first* part, so the keys of one arm share a
slot (one node answers a read of all of an arm's segments).

Derived key fields (:data:`DERIVED_FIELDS`) are computed from one contract field and may
be used as key parts (or as a whole key); today one: ``p_ctr_bucket``, the label of the
predicted-CTR bucket of ``p_ctr`` over the fixed :data:`PCTR_EDGES`.

Buckets: ``[PCTR_EDGES[i], PCTR_EDGES[i+1])`` for i < 9 and the last one closed,
``[0.5, 1]``; labels ``"{low:g}-{high:g}"`` (``"0-0.001"`` ... ``"0.5-1"``). A null
``p_ctr`` (or one outside [0, 1], which the input contract dead-letters anyway) has no
bucket.

One implementation for every runtime: the stream worker and the offline writer call
:func:`entity_ids` (vectorized, Arrow; pyarrow is imported when first called), serving and
``headrace get`` check and build ids with :func:`id_problem` and :func:`join_id`.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from feature_defs.contract import ID_FIELDS
from feature_defs.layout import entity_id_problem
from feature_defs.model import Entity

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["SEPARATOR", "PCTR_EDGES", "PCTR_BUCKET_LABELS", "DERIVED_FIELDS", "key_fields",
           "is_composite", "event_fields", "pctr_bucket", "bucket_bounds", "join_id",
           "split_id", "id_problem", "event_entity_id", "entity_ids"]

#: joins the parts of a composite id; ids cannot contain braces, so it is unambiguous
SEPARATOR: Final = "}{"
#: predicted-CTR bucket edges (pCTR units); the buckets are [e_i, e_i+1), the last closed
PCTR_EDGES: Final[tuple[float, ...]] = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
                                        0.2, 0.5, 1.0)
#: the bucket labels, in edge order
PCTR_BUCKET_LABELS: Final[tuple[str, ...]] = tuple(
    f"{lo:g}-{hi:g}" for lo, hi in zip(PCTR_EDGES[:-1], PCTR_EDGES[1:], strict=True))
_INNER: Final = PCTR_EDGES[1:-1]
#: derived key field -> the contract field it is computed from
DERIVED_FIELDS: Final[Mapping[str, str]] = MappingProxyType({"p_ctr_bucket": "p_ctr"})


def key_fields(entity: Entity) -> tuple[str, ...]:
    """The key parts of ``entity`` (one for a single key)."""
    return (entity.key,) if isinstance(entity.key, str) else tuple(entity.key)


def is_composite(entity: Entity) -> bool:
    """Whether ``entity`` is keyed by several fields."""
    return not isinstance(entity.key, str)


def event_fields(entity: Entity) -> tuple[str, ...]:
    """The contract fields the key of ``entity`` reads (a derived part: its base field)."""
    return tuple(dict.fromkeys(DERIVED_FIELDS.get(f, f) for f in key_fields(entity)))


def pctr_bucket(p_ctr: float | None) -> str | None:
    """The bucket label of ``p_ctr`` (None for None, NaN or outside [0, 1])."""
    if p_ctr is None or not 0.0 <= p_ctr <= 1.0:
        return None
    return PCTR_BUCKET_LABELS[bisect.bisect_right(_INNER, p_ctr)]


def bucket_bounds(label: str) -> tuple[float, float]:
    """``(low, high)`` of a bucket label. Raises ``KeyError`` for an unknown label."""
    try:
        i = PCTR_BUCKET_LABELS.index(label)
    except ValueError:
        raise KeyError(f"unknown p_ctr bucket {label!r}") from None
    return PCTR_EDGES[i], PCTR_EDGES[i + 1]


def join_id(parts: Sequence[str | None]) -> str | None:
    """The id of key parts ``parts`` (None when any is None or not a valid id)."""
    if any(p is None or entity_id_problem(p) is not None for p in parts):
        return None
    return SEPARATOR.join(p for p in parts if p is not None)


def split_id(entity: Entity, entity_id: str) -> tuple[str, ...]:
    """The key parts of ``entity_id`` (one for a single key; no validation)."""
    return tuple(entity_id.split(SEPARATOR)) if is_composite(entity) else (entity_id,)


def id_problem(entity: Entity, entity_id: object) -> str | None:
    """Why ``entity_id`` is not an id of ``entity``, or None when it is."""
    if not is_composite(entity) or not isinstance(entity_id, str):
        return entity_id_problem(entity_id)
    names = key_fields(entity)
    parts = entity_id.split(SEPARATOR)
    if len(parts) != len(names):
        return (f"must be {len(names)} parts ({', '.join(names)}) joined by "
                f"{SEPARATOR!r}, got {len(parts)}")
    for name, part in zip(names, parts, strict=True):
        problem = entity_id_problem(part)
        if problem is not None:
            return f"part {name}: {problem}"
    return None


def _part_value(name: str, event: Mapping[str, Any]) -> str | None:
    if name in DERIVED_FIELDS:
        return pctr_bucket(event.get(DERIVED_FIELDS[name]))
    value = event.get(name)
    return value if isinstance(value, str) else None


def event_entity_id(entity: Entity, event: Mapping[str, Any]) -> str | None:
    """The id of ``entity`` for one decoded event (None: the event has none)."""
    names = key_fields(entity)
    if len(names) == 1 and names[0] not in DERIVED_FIELDS:
        value = event.get(names[0])
        return value if isinstance(value, str) else None
    return join_id([_part_value(n, event) for n in names])


def _column(name: str, table: pa.Table) -> pa.Array:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if name in DERIVED_FIELDS:  # the only one: p_ctr_bucket
        col = table[DERIVED_FIELDS[name]]
        values = np.asarray(pc.fill_null(col, np.nan).to_numpy(), dtype=np.float64)
        bad = ~((values >= 0.0) & (values <= 1.0))  # NaN (null) included
        idx = np.searchsorted(np.asarray(_INNER), np.where(bad, 0.0, values), side="right")
        labels = np.asarray(PCTR_BUCKET_LABELS, dtype=object)[idx]
        return pa.array(labels, type=pa.string(), mask=bad)
    col = table[name]
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if name in ID_FIELDS or col.null_count == len(col):
        return col  # the contract checked every value as an id
    # a field not checked as an id (device_type, country): a value that is not a valid
    # id has no id part; the distinct values are few, each checked once
    enc = pc.dictionary_encode(col)
    ok = pa.array([entity_id_problem(v) is None for v in enc.dictionary.to_pylist()],
                  type=pa.bool_())
    keep = pc.fill_null(pc.take(ok, enc.indices), False)
    if pc.all(keep).as_py():
        return col
    return pc.if_else(keep, col, pa.scalar(None, pa.string()))


def entity_ids(entity: Entity, table: pa.Table) -> pa.Array | pa.ChunkedArray:
    """Per row of ``table`` (accepted events, or rows with the key's event fields), the
    id of ``entity`` (null: the row has none). A single plain key is its column as is."""
    import pyarrow.compute as pc

    names = key_fields(entity)
    if len(names) == 1 and names[0] not in DERIVED_FIELDS:
        return table[names[0]]
    cols = [_column(n, table) for n in names]
    if len(cols) == 1:
        return cols[0]
    return pc.binary_join_element_wise(*cols, SEPARATOR, null_handling="emit_null")
