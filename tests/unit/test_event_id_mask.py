"""The vectorized id check of ``streams.events`` flags exactly what ``entity_id_problem``
rejects, Unicode whitespace and control characters included."""

from __future__ import annotations

import random

import pyarrow as pa

from feature_defs.layout import MAX_ID_LEN, entity_id_problem
from streams.events import _bad_id_mask, _plainly_fine

_ALPHABET = ["a", "Z", "7", "-", "_", ":", "{", "}", " ", "\t", "\n", "\x0b", "\x1c", "\x00",
             "\x7f", "\x85", "\u00a0", "\u2028", "\u3000", "é", "漢", "\U0001f600"]


def test_mask_equals_the_per_event_rule() -> None:
    rng = random.Random(11)
    values: list[str | None] = [None, "", "a" * MAX_ID_LEN, "a" * (MAX_ID_LEN + 1),
                                "é" * MAX_ID_LEN, "é" * (MAX_ID_LEN + 1)]
    for _ in range(3000):
        n = rng.choice([1, 2, 5, 12])
        pool = _ALPHABET[:5] if rng.random() < 0.6 else _ALPHABET  # mostly valid ids
        values.append("".join(rng.choice(pool) for _ in range(n)))
    col = pa.chunked_array([pa.array(values[:1000], pa.string()),
                            pa.array(values[1000:], pa.string())])
    mask = _bad_id_mask("user_id", col)
    want = [v is not None and entity_id_problem(v) is not None for v in values]
    assert any(want) and not all(want)
    assert (mask.to_pylist() if mask is not None else [False] * len(values)) == want
    clean = pa.chunked_array([pa.array([v for v, bad in zip(values, want, strict=True)
                                        if not bad], pa.string())])
    assert _bad_id_mask("event_id", clean) is None


def test_byte_prefilter_passes_clean_columns_and_never_a_bad_id() -> None:
    """The raw-buffer shortcut: clean columns (nulls, sliced chunks included) skip the
    Arrow checks; one bad id anywhere in a clean column sends it to them and is flagged."""
    clean = [f"u{i}" for i in range(500)] + ["a" * MAX_ID_LEN, "A-b_c:9.x@y"]
    with_nulls = pa.array(clean + [None] * 7, pa.string())
    sliced = pa.chunked_array([with_nulls.slice(3, 200), with_nulls.slice(250)])
    assert _plainly_fine(pa.chunked_array([with_nulls])) and _plainly_fine(sliced)
    assert _bad_id_mask("user_id", sliced) is None
    bad_ids = ["", "a" * (MAX_ID_LEN + 1), "a b", "a{", "}", "\x00", "x\x7f", "\u3000",
               "\t"]
    for bad in bad_ids:
        values = clean[:100] + [bad] + clean[100:300]
        col = pa.chunked_array([pa.array([None, *values], pa.string()).slice(1)])
        assert not _plainly_fine(col), repr(bad)
        mask = _bad_id_mask("user_id", col)
        assert mask is not None and mask.to_pylist() == [v == bad for v in values], repr(bad)
    # bytes the shortcut only suspects ("|", "~", non-ASCII) can be valid: the rule decides
    suspects = pa.chunked_array([pa.array(["a|b", "~", "é", "ok"], pa.string())])
    assert not _plainly_fine(suspects) and _bad_id_mask("user_id", suspects) is None
