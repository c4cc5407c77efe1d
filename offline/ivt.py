"""Invalid-traffic (IVT) filtering: behavioural rules over raw impressions and clicks.

:func:`filter_ivt` is a pure function of the events it is given. Every rule is evaluated
on the whole input independently; an event flagged by several rules is counted once per
rule (``IvtReport.counts``) and dropped once. What each rule flags, and so drops:

========================  ===============================================================
rule                      flags (dropped)
========================  ===============================================================
click_without_impression  a click whose ``impression_id`` is null or matches no
                          impression's ``event_id`` in the input: the click
click_too_fast            a click less than ``min_click_delay_ms`` after its impression
                          (before it included): the click only; the impression stays,
                          labelled by its other clicks
duplicate_click_id        a click repeating an earlier click's ``event_id`` (earliest
                          ``ts`` first, then input order): the repeats, the first stays
user_click_burst          every event (impressions and clicks) of a user in a UTC minute
                          (``floor(ts / 60 s)``) in which that user has more than
                          ``max_user_clicks_per_minute`` clicks
ip_burst                  every event of an ``ip`` in a UTC minute in which that ip has
                          more than ``max_ip_events_per_minute`` events (impressions plus
                          clicks); only where the tables have an ``ip`` column and the
                          rule is set
impossible_ctr            every event of a user with at least
                          ``impossible_ctr_min_impressions`` impressions in the input and
                          clicks / impressions above ``impossible_ctr``
========================  ===============================================================

A user is the event's own ``user_id`` (clicks carry it too); null users are never
flagged by the user rules, nor null ips by the ip rule.

Why ``max_ip_events_per_minute`` is off (None) by default: the input contract
(:mod:`feature_defs.contract`) has no ip field, so the offline store holds none; the
one source that has an ip, TalkingData, maps it to ``user_id`` (:mod:`streams.csv_replay`)
where the user rules already see it. A caller holding an ip column sets a limit (the
``bench ivt`` benchmark uses 60 events per minute on TalkingData's ip: one click a
second sustained for a minute by one address).

Online features are NOT filtered: the stream worker applies all traffic, as the ad server
sees all traffic when it scores. A model trained on features computed from filtered
events would see, at serving time, features computed from unfiltered ones (the
training/serving skew the shared window code exists to prevent). Only the labels, and so
the training rows, are filtered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from headrace.core.errors import InputError

__all__ = ["IvtRules", "IvtReport", "RULES", "DEFAULT_RULES", "filter_ivt", "merge_reports"]

#: the rules, in report order
RULES = ("click_too_fast", "click_without_impression", "duplicate_click_id",
         "user_click_burst", "ip_burst", "impossible_ctr")
_MINUTE_MS = 60_000


@dataclass(frozen=True)
class IvtRules:
    """Thresholds of the IVT rules (see the module docstring).

    Attributes:
        min_click_delay_ms: a click less than this many ms after its impression is
            invalid (≥ 0; 0 flags only clicks before their impression).
        max_user_clicks_per_minute: most clicks a user may make in one UTC minute (≥ 1).
        max_ip_events_per_minute: most events one ip may send in one UTC minute (≥ 1),
            None = rule off.
        impossible_ctr_min_impressions: fewest impressions before a user's CTR is judged
            (≥ 1).
        impossible_ctr: a user's clicks / impressions above this is invalid (> 0).
    """

    min_click_delay_ms: int = 1000
    max_user_clicks_per_minute: int = 10
    max_ip_events_per_minute: int | None = None
    impossible_ctr_min_impressions: int = 50
    impossible_ctr: float = 0.5

    def __post_init__(self) -> None:
        bad = [f"min_click_delay_ms must be >= 0, got {self.min_click_delay_ms}"
               if self.min_click_delay_ms < 0 else "",
               f"max_user_clicks_per_minute must be >= 1, got "
               f"{self.max_user_clicks_per_minute}" if self.max_user_clicks_per_minute < 1
               else "",
               f"max_ip_events_per_minute must be >= 1 or None, got "
               f"{self.max_ip_events_per_minute}" if self.max_ip_events_per_minute is not None
               and self.max_ip_events_per_minute < 1 else "",
               f"impossible_ctr_min_impressions must be >= 1, got "
               f"{self.impossible_ctr_min_impressions}"
               if self.impossible_ctr_min_impressions < 1 else "",
               f"impossible_ctr must be > 0, got {self.impossible_ctr}"
               if not self.impossible_ctr > 0 else ""]
        problems = [b for b in bad if b]
        if problems:
            raise InputError("bad IVT rules: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The thresholds, JSON-ready."""
        return {"min_click_delay_ms": self.min_click_delay_ms,
                "max_user_clicks_per_minute": self.max_user_clicks_per_minute,
                "max_ip_events_per_minute": self.max_ip_events_per_minute,
                "impossible_ctr_min_impressions": self.impossible_ctr_min_impressions,
                "impossible_ctr": self.impossible_ctr}


@dataclass(frozen=True)
class IvtReport:
    """What :func:`filter_ivt` flagged: per rule the events it flagged (an event flagged
    by two rules counts in both), and the events in and out (each dropped once)."""

    counts: Mapping[str, int]
    impressions_in: int
    impressions_out: int
    clicks_in: int
    clicks_out: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``counts`` and the four in/out totals."""
        return {"counts": {r: int(self.counts.get(r, 0)) for r in RULES},
                "impressions_in": self.impressions_in, "impressions_out": self.impressions_out,
                "clicks_in": self.clicks_in, "clicks_out": self.clicks_out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IvtReport:
        """The inverse of :meth:`to_dict`."""
        counts = data.get("counts", {})
        return cls(MappingProxyType({r: int(counts.get(r, 0)) for r in RULES}),
                   int(data["impressions_in"]), int(data["impressions_out"]),
                   int(data["clicks_in"]), int(data["clicks_out"]))


def merge_reports(reports: Iterable[IvtReport]) -> IvtReport:
    """The sum of reports of disjoint inputs (e.g. one per labelled day)."""
    counts = dict.fromkeys(RULES, 0)
    totals = [0, 0, 0, 0]
    for r in reports:
        for rule in RULES:
            counts[rule] += int(r.counts.get(rule, 0))
        for i, v in enumerate((r.impressions_in, r.impressions_out, r.clicks_in,
                               r.clicks_out)):
            totals[i] += v
    return IvtReport(MappingProxyType(counts), *totals)


def _ms(table: pa.Table, what: str) -> np.ndarray:
    col = table.column("ts")
    typ = col.type
    if pa.types.is_timestamp(typ):
        col = col.cast(pa.timestamp("ms", tz=typ.tz), safe=False).cast(pa.int64())
    elif not pa.types.is_integer(typ):
        raise InputError(f"the {what}' ts column has type {typ}; expected a timestamp or "
                         "int64 epoch milliseconds")
    if col.null_count:
        raise InputError(f"the {what}' ts column has {col.null_count} null value(s)")
    return np.asarray(col.to_numpy(), np.int64)


def _require(table: pa.Table, what: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(f"the {what} have no '{missing[0]}' column, which IVT filtering "
                         "needs")


def _codes(*cols: pa.ChunkedArray | pa.Array | None, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Shared integer codes of string columns (-1 for null; a None column is all null)."""
    arrays = [pa.nulls(n, pa.string()) if c is None else
              (c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c).cast(pa.string())
              for c, n in zip(cols, sizes, strict=True)]
    joined = pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())
    codes = np.asarray(pc.fill_null(pc.dictionary_encode(joined).indices, -1).to_numpy(
        zero_copy_only=False), np.int64)
    out, at = [], 0
    for n in sizes:
        out.append(codes[at:at + n])
        at += n
    return out


def _burst(keys: list[np.ndarray], ts: list[np.ndarray], weights: list[np.ndarray],
           limit: int) -> list[np.ndarray]:
    """Per table, the rows whose (key, UTC minute) has a weight sum above ``limit``
    (rows with key -1 never)."""
    key = np.concatenate(keys)
    minute = np.concatenate(ts) // _MINUTE_MS
    weight = np.concatenate(weights)
    flagged = np.zeros(key.size, bool)
    ok = key >= 0
    if ok.any():
        pairs = np.stack([key[ok], minute[ok]], axis=1)
        _, inverse = np.unique(pairs, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        sums = np.bincount(inverse, weights=weight[ok])
        flagged[ok] = sums[inverse] > limit
    out, at = [], 0
    for k in keys:
        out.append(flagged[at:at + k.size])
        at += k.size
    return out


#: the default thresholds (``IvtRules()``)
DEFAULT_RULES = IvtRules()


def filter_ivt(impressions: pa.Table, clicks: pa.Table, rules: IvtRules = DEFAULT_RULES
               ) -> tuple[pa.Table, pa.Table, IvtReport]:
    """Drop invalid traffic (rules in the module docstring); rows keep their order.

    Args:
        impressions: with ``event_id``, ``ts`` (timestamp or int64 epoch ms) and
            ``user_id``; an ``ip`` column is used by the ip rule.
        clicks: with ``event_id``, ``ts``, ``impression_id`` and ``user_id``; ``ip``
            likewise.

    Returns:
        ``(impressions kept, clicks kept, report)``.

    Raises:
        InputError: a needed column missing, or a ts of another type or with nulls.
    """
    _require(impressions, "impressions", ("event_id", "ts", "user_id"))
    _require(clicks, "clicks", ("event_id", "ts", "impression_id", "user_id"))
    ni, nc = impressions.num_rows, clicks.num_rows
    imp_ts, clk_ts = _ms(impressions, "impressions"), _ms(clicks, "clicks")
    flags_i = {r: np.zeros(ni, bool) for r in RULES}
    flags_c = {r: np.zeros(nc, bool) for r in RULES}

    imp_id, clk_imp = _codes(impressions.column("event_id"), clicks.column("impression_id"),
                             sizes=(ni, nc))
    first = np.full(int(max(imp_id.max(initial=-1), clk_imp.max(initial=-1))) + 2, -1,
                    np.int64)
    uniq, first_at = np.unique(imp_id, return_index=True)  # first impression of each id
    first[uniq + 1] = first_at
    pos = np.where(clk_imp >= 0, first[clk_imp + 1], -1)
    flags_c["click_without_impression"] = pos < 0
    joined = pos >= 0
    flags_c["click_too_fast"][joined] = (clk_ts[joined] - imp_ts[pos[joined]]
                                         < rules.min_click_delay_ms)

    (clk_id,) = _codes(clicks.column("event_id"), sizes=(nc,))
    order = np.lexsort((np.arange(nc), clk_ts))  # by ts, then input order
    ids_sorted = clk_id[order]
    _, first_at = np.unique(ids_sorted, return_index=True)  # first of each id (stable)
    repeat = np.ones(nc, bool)
    repeat[first_at] = False
    repeat[ids_sorted < 0] = False
    flags_c["duplicate_click_id"][order] = repeat

    users_i, users_c = _codes(impressions.column("user_id"), clicks.column("user_id"),
                              sizes=(ni, nc))
    flags_i["user_click_burst"], flags_c["user_click_burst"] = _burst(
        [users_i, users_c], [imp_ts, clk_ts], [np.zeros(ni), np.ones(nc)],
        rules.max_user_clicks_per_minute)
    if rules.max_ip_events_per_minute is not None:
        ip_i, ip_c = _codes(impressions.column("ip") if "ip" in impressions.column_names
                            else None,
                            clicks.column("ip") if "ip" in clicks.column_names else None,
                            sizes=(ni, nc))
        flags_i["ip_burst"], flags_c["ip_burst"] = _burst(
            [ip_i, ip_c], [imp_ts, clk_ts], [np.ones(ni), np.ones(nc)],
            rules.max_ip_events_per_minute)

    n_users = int(max(users_i.max(initial=-1), users_c.max(initial=-1))) + 1
    imps_of = np.bincount(users_i[users_i >= 0], minlength=n_users)
    clicks_of = np.bincount(users_c[users_c >= 0], minlength=n_users)
    bad_user = (imps_of >= rules.impossible_ctr_min_impressions) & \
        (clicks_of > rules.impossible_ctr * np.maximum(imps_of, 1))
    flags_i["impossible_ctr"] = (users_i >= 0) & bad_user[np.maximum(users_i, 0)] \
        if n_users else np.zeros(ni, bool)
    flags_c["impossible_ctr"] = (users_c >= 0) & bad_user[np.maximum(users_c, 0)] \
        if n_users else np.zeros(nc, bool)

    drop_i = np.logical_or.reduce([flags_i[r] for r in RULES]) if ni else np.zeros(0, bool)
    drop_c = np.logical_or.reduce([flags_c[r] for r in RULES]) if nc else np.zeros(0, bool)
    counts = {r: int(flags_i[r].sum() + flags_c[r].sum()) for r in RULES}
    kept_i = impressions.filter(pa.array(~drop_i)) if drop_i.any() else impressions
    kept_c = clicks.filter(pa.array(~drop_c)) if drop_c.any() else clicks
    report = IvtReport(MappingProxyType(counts), ni, kept_i.num_rows, nc, kept_c.num_rows)
    return kept_i, kept_c, report
