"""Checking a labels table or a training set before a model is trained on it.

Every check is a named rule; a report lists every problem at once (one sentence each,
naming the rule, the column and the numbers) and, per rule, how many rows or columns it
flagged (0 included), so the counts can go into a model's metadata. Problems block
training (:attr:`ValidationReport.ok` is False); warnings do not.

Training-set rules (:func:`validate_training_set`), keys of ``counts``:

=================  =======  ==========================================================
rule               kind     flags
=================  =======  ==========================================================
``schema``         problem  columns: ``ts`` or ``label`` missing, a requested feature
                            missing or not numeric (integer, floating or boolean)
``min_rows``       problem  rows missing to reach ``min_rows`` (0 when enough)
``label_values``   problem  rows whose label is null or not 0/1
``label_rate``     problem  rows, when every valid label is the same (rate 0 or 1)
``all_null``       problem  feature columns holding only nulls
``null_share``     problem  feature columns (not all null) whose null share is above
                            ``max_null_share``
``non_finite``     problem  rows of a floating feature holding NaN or ±inf
``range``          problem  rows outside the range the definition gives: COUNT and
                            APPROX_DISTINCT values below 0, ratios below 0, MEAN/MIN/
                            MAX/LAST of a probability field outside [0, 1]
``ratio_above_1``  warning  rows of a ratio feature above 1 (a windowed clicks /
                            impressions ratio can exceed 1 legitimately: clicks land in
                            a window after their impressions left it)
``outliers``       warning  rows with ``|x - median| > 20 * MAD`` (features whose MAD is
                            0 are skipped: no spread to judge by)
``drift``          warning  features whose PSI against ``previous`` is ``>= drift_psi``
=================  =======  ==========================================================

Ranges come from the definitions (the feature's :class:`~feature_defs.plan.OutputPlan`
ops in the registry), not from the name; a feature the registry does not define gets no
range rule (a warning says how many). PSI: 10 quantile bins of ``previous``'s non-null
values (tied edges merge bins) plus one bin for nulls; shares floored at 1e-4;
``PSI = sum((cur - prev) * ln(cur / prev))``. A drifted world is why one retrains, so
drift only warns.

Labels rules (:func:`validate_labels`): ``schema`` (``impression_id``, ``ts``,
``label``), ``min_rows``, ``null_ts``, ``duplicate_impression_id``, ``label_values``,
``label_rate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_defs.contract import PROBABILITY_FIELDS
from feature_defs.model import AggOp
from headrace.monitor import stats
from headrace.monitor.profile import numeric_profile

if TYPE_CHECKING:
    from feature_defs.registry import Registry

__all__ = ["ValidationReport", "validate_training_set", "validate_labels", "psi",
           "OUTLIER_MADS", "PSI_BINS", "PSI_FLOOR"]

#: outlier bound: this many median absolute deviations from the median
OUTLIER_MADS = 20.0
#: quantile bins of the previous training set (plus one bin for nulls)
PSI_BINS = 10
#: floor on every bin share, so an empty bin gives a finite PSI (the monitor's)
PSI_FLOOR = stats.PSI_EPSILON
_NON_NEGATIVE = frozenset({AggOp.COUNT, AggOp.APPROX_DISTINCT})
_BOUNDED_OF_FIELD = frozenset({AggOp.MEAN, AggOp.MIN, AggOp.MAX, AggOp.LAST})
_TS_RULES = ("schema", "min_rows", "label_values", "label_rate", "all_null", "null_share",
             "non_finite", "range", "ratio_above_1", "outliers", "drift")
_LABEL_RULES = ("schema", "min_rows", "null_ts", "duplicate_impression_id", "label_values",
                "label_rate")


@dataclass(frozen=True)
class ValidationReport:
    """What the rules found.

    Attributes:
        problems: one sentence per blocking finding.
        counts: per rule, the rows or columns it flagged (every rule present, 0 included).
        warnings: one sentence per non-blocking finding.
    """

    problems: tuple[str, ...]
    counts: Mapping[str, int]
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing blocks training."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``ok``, ``problems``, ``warnings``, ``counts``."""
        return {"ok": self.ok, "problems": list(self.problems),
                "warnings": list(self.warnings), "counts": dict(self.counts)}


@dataclass
class _Findings:
    rules: tuple[str, ...]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = dict.fromkeys(self.rules, 0)

    def problem(self, rule: str, n: int, text: str) -> None:
        self.counts[rule] += n
        self.problems.append(f"{rule}: {text}")

    def warning(self, rule: str, n: int, text: str) -> None:
        self.counts[rule] += n
        self.warnings.append(f"{rule}: {text}")

    def report(self) -> ValidationReport:
        return ValidationReport(tuple(self.problems), MappingProxyType(dict(self.counts)),
                                tuple(self.warnings))


def _is_numeric(typ: pa.DataType) -> bool:
    return bool(pa.types.is_integer(typ) or pa.types.is_floating(typ)
                or pa.types.is_boolean(typ))


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as float64 with NaN for null."""
    if pa.types.is_boolean(col.type):
        col = col.cast(pa.int8())
    return np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), np.float64)


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f} %" if whole else "n/a"


def _check_rows(f: _Findings, n: int, min_rows: int) -> None:
    if n < min_rows:
        f.problem("min_rows", min_rows - n, f"{n:,} rows, fewer than the {min_rows:,} required")


def _check_label(f: _Findings, table: pa.Table) -> None:
    y = _floats(table.column("label"))
    valid = (y == 0) | (y == 1)
    bad = int((~valid).sum())
    if bad:
        nulls = int(np.isnan(y).sum())
        f.problem("label_values", bad, f"{bad:,} of {y.size:,} labels are null or not 0/1 "
                  f"({nulls:,} null)")
    good = int(valid.sum())
    if good:
        positives = int((y[valid] == 1).sum())
        if positives in (0, good):
            f.problem("label_rate", good, f"the label rate is {positives / good:g} "
                      f"({positives:,} positives in {good:,} rows): the model would learn "
                      "a constant")


def _label_numeric(f: _Findings, table: pa.Table) -> bool:
    typ = table.schema.field("label").type
    if _is_numeric(typ):
        return True
    f.problem("schema", 1, f"the label column has type {typ}, not a number")
    return False


def _range_of(name: str, registry: Registry) -> tuple[str, str] | None:
    """``(kind, why)`` of a feature's range rule: kind ``count``, ``ratio`` or ``prob``."""
    found = registry.by_feature.get(name)
    if found is None:
        return None
    plan, out = found
    if out.is_ratio:
        if all(op in _NON_NEGATIVE for op in out.ops):
            return "ratio", "a ratio of " + " / ".join(op.value for op in out.ops)
        return None
    op = out.ops[0]
    if op in _NON_NEGATIVE:
        return "count", f"a {op.value}"
    if op in _BOUNDED_OF_FIELD:
        measure = plan.measures[out.slots[0]]
        if measure.field in PROBABILITY_FIELDS:
            return "prob", f"a {op.value} of the probability {measure.field}"
    return None


def _check_feature(f: _Findings, name: str, col: pa.ChunkedArray, max_null_share: float,
                   registry: Registry) -> bool:
    """Per-feature rules; returns whether the registry defines ``name``."""
    n = len(col)
    nulls = col.null_count
    if n and nulls == n:
        f.problem("all_null", 1, f"feature {name} is null in all {n:,} rows")
        return name in registry.by_feature
    if n and nulls / n > max_null_share:
        f.problem("null_share", 1, f"feature {name} is null in {nulls:,} of {n:,} rows "
                  f"({_pct(nulls, n)}), above the {max_null_share:g} allowed")
    x = _floats(col)
    present = ~pc.is_null(col).to_numpy(zero_copy_only=False)
    nonfinite = present & ~np.isfinite(x)
    if nonfinite.any():
        k = int(nonfinite.sum())
        f.problem("non_finite", k, f"feature {name} holds {k:,} NaN or infinite values")
    v = x[present & np.isfinite(x)]
    rule = _range_of(name, registry)
    if rule is not None:
        kind, why = rule
        low = int((v < 0).sum())
        high = int((v > 1).sum()) if kind == "prob" else 0
        if low or high:
            bound = "[0, 1]" if kind == "prob" else ">= 0"
            f.problem("range", low + high, f"feature {name} ({why}) has {low + high:,} "
                      f"values outside {bound} (min {v.min():g}, max {v.max():g})")
        above = int((v > 1).sum()) if kind == "ratio" else 0
        if above:
            f.warning("ratio_above_1", above, f"ratio feature {name} ({why}) is above 1 in "
                      f"{above:,} rows (max {v.max():g})")
    if v.size:
        med = float(np.median(v))
        mad = float(np.median(np.abs(v - med)))
        if mad > 0:
            out = int((np.abs(v - med) > OUTLIER_MADS * mad).sum())
            if out:
                f.warning("outliers", out, f"feature {name} has {out:,} values more than "
                          f"{OUTLIER_MADS:g} MAD from its median {med:g} (MAD {mad:g}, "
                          f"max {v.max():g})")
    return rule is not None or name in registry.by_feature


def psi(previous: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of ``current`` against ``previous`` (float arrays, NaN
    = null), binned and floored exactly as the drift monitor does
    (:func:`headrace.monitor.profile.numeric_profile`: ``bins`` quantile bins of
    ``previous``'s values, tied edges merged, plus a null bin;
    :func:`headrace.monitor.stats.psi`: shares floored at :data:`PSI_FLOOR`). 0 for
    identical distributions; NaN when either side has no rows."""
    ref = numeric_profile("previous", previous, bins)
    return stats.psi(ref.counts, ref.histogram(current))


def validate_training_set(table: pa.Table, features: Sequence[str], *,
                          previous: pa.Table | None = None, min_rows: int = 1000,
                          max_null_share: float = 0.99, drift_psi: float = 0.25,
                          registry: Registry | None = None) -> ValidationReport:
    """Check a training set (rules in the module docstring); never raises on bad data.

    Args:
        table: the training set (``ts``, ``label`` and the feature columns).
        features: the feature columns the model will use.
        previous: the previous training set, for the drift rule (features it lacks, or
            holds as non-numeric columns, are skipped).
        min_rows: fewest rows accepted (≥ 0).
        max_null_share: largest null share of a feature accepted, in [0, 1].
        drift_psi: PSI from which a feature's drift is reported (> 0).
        registry: the definitions giving the features' ranges (default: the shipped
            definitions, :data:`feature_defs.registry.DEFAULT_DEFINITIONS`).
    """
    from feature_defs.registry import load_registry

    reg = registry if registry is not None else load_registry()
    f = _Findings(_TS_RULES)
    names = set(table.column_names)
    for column in ("ts", "label"):
        if column not in names:
            f.problem("schema", 1, f"the training set has no '{column}' column")
    checked: list[str] = []
    for name in dict.fromkeys(features):
        if name not in names:
            f.problem("schema", 1, f"feature {name} is not a column of the training set")
        elif not _is_numeric(table.schema.field(name).type):
            f.problem("schema", 1, f"feature {name} has type {table.schema.field(name).type}, "
                      "not a number")
        else:
            checked.append(name)
    _check_rows(f, table.num_rows, min_rows)
    if "label" in names and _label_numeric(f, table):
        _check_label(f, table)
    unknown = [n for n in checked
               if not _check_feature(f, n, table.column(n), max_null_share, reg)]
    if unknown:
        f.warnings.append(f"range: {len(unknown)} feature(s) have no definition in the "
                          f"registry, so their ranges were not checked (e.g. {unknown[0]})")
    if previous is not None:
        for name in checked:
            if name not in previous.column_names or \
                    not _is_numeric(previous.schema.field(name).type):
                continue
            value = psi(_floats(previous.column(name)), _floats(table.column(name)))
            if value >= drift_psi:
                f.warning("drift", 1, f"feature {name} drifted from the previous training "
                          f"set: PSI {value:.3f} >= {drift_psi:g}")
    return f.report()


def validate_labels(table: pa.Table, *, min_rows: int = 1000) -> ValidationReport:
    """Check a labels table (``headrace labels`` output; rules in the module docstring)."""
    f = _Findings(_LABEL_RULES)
    names = set(table.column_names)
    for column in ("impression_id", "ts", "label"):
        if column not in names:
            f.problem("schema", 1, f"the labels have no '{column}' column")
    _check_rows(f, table.num_rows, min_rows)
    if "ts" in names and table.column("ts").null_count:
        k = table.column("ts").null_count
        f.problem("null_ts", k, f"{k:,} labels have a null ts")
    if "impression_id" in names and table.num_rows:
        ids = table.column("impression_id")
        distinct = pc.count_distinct(ids, mode="all").as_py()
        dup = table.num_rows - int(distinct)
        if dup:
            f.problem("duplicate_impression_id", dup, f"{dup:,} labels repeat an earlier "
                      "row's impression_id")
    if "label" in names and _label_numeric(f, table):
        _check_label(f, table)
    return f.report()
