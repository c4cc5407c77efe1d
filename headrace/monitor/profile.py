"""The model's reference profile: histograms of its training data, written beside the
model (``MODELS_DIR/<version>/reference_profile.json``) and read by the drift monitor.

A profile holds, for the training-split rows of one model version, one histogram per
model feature (in the model's feature order), one of the model's own predictions on
those rows, and one per categorical context column (country, device type, ...).

**Binning rule** (numeric features and the prediction):

* the edges are the ``bins``-quantiles of the feature's non-null, finite training values
  (``numpy.quantile(values, [1/bins, 2/bins, ..., (bins-1)/bins], method="linear")``),
  duplicates removed — a feature with few distinct values gets fewer bins, so ``k =
  len(edges) + 1 <= bins`` value bins;
* a value ``v`` goes to value bin ``searchsorted(edges, v, side="right")``: bin ``i``
  holds ``edges[i-1] <= v < edges[i]`` (bin 0 everything below ``edges[0]``, bin
  ``k-1`` everything from ``edges[-1]`` up, infinities included);
* NaN (a null value) goes to one more bin, the last: ``counts`` has ``k + 1`` entries.

The PSI (:func:`~headrace.monitor.stats.psi`) is computed over all ``k + 1`` bins, the
null bin included, so a feature that starts arriving null drifts; the KS
(:func:`~headrace.monitor.stats.ks_binned`) over the ``k`` value bins only.

**Categorical context columns**: the :data:`MAX_CATEGORIES` (50) most frequent values
(ties by name), then :data:`OTHER` (every other value) and :data:`NULL` (None or NaN);
both are always present, possibly 0. The PSI runs over these keys; no KS (no order).

Everything is deterministic: the same rows give the same profile, byte for byte.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from headrace.core.errors import InputError

__all__ = ["PROFILE_FILE", "MAX_CATEGORIES", "OTHER", "NULL", "NumericProfile", "numeric_profile",
           "CategoricalProfile", "ReferenceProfile", "build_profile", "save_profile",
           "load_profile"]

PROFILE_FILE: Final = "reference_profile.json"
#: most categories a context column keeps by name; the rest count under :data:`OTHER`
MAX_CATEGORIES: Final = 50
#: the key of the categories not kept by name (and of values unseen in training)
OTHER: Final = "__other__"
#: the key of a null (None or NaN) context value
NULL: Final = "__null__"
#: the version of the file's layout (``format`` in the JSON)
_FORMAT: Final = 1


@dataclass(frozen=True)
class NumericProfile:
    """The histogram of one numeric column (see the module docstring's binning rule).

    Attributes:
        name: the feature's name (``"prediction"`` for the model's output).
        edges: ascending, finite interior edges; ``k = len(edges) + 1`` value bins.
        counts: ``k + 1`` counts (>= 0): the ``k`` value bins, then the null (NaN) bin.
    """

    name: str
    edges: tuple[float, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        e = np.asarray(self.edges, dtype=np.float64)
        if e.ndim != 1 or not np.isfinite(e).all() or (np.diff(e) <= 0).any():
            raise InputError(f"profile of {self.name!r}: edges are not finite and strictly "
                             "ascending")
        if len(self.counts) != len(self.edges) + 2 or any(c < 0 for c in self.counts):
            raise InputError(f"profile of {self.name!r}: {len(self.counts)} counts for "
                             f"{len(self.edges)} edges (want {len(self.edges) + 2}, >= 0)")

    def histogram(self, values: np.ndarray | Sequence[float | None]) -> np.ndarray:
        """Counts of ``values`` in this profile's bins, by the same rule.

        Args:
            values: one value per row (a 1-D array; NaN or None = null).

        Returns:
            int64 counts, ``len(edges) + 2`` of them: the value bins, then the nulls.

        Raises:
            InputError: ``values`` is not one-dimensional or not numeric.
        """
        try:
            v = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"values of {self.name!r} are not numbers: {exc}") from exc
        if v.ndim != 1:
            raise InputError(f"values of {self.name!r}: {v.ndim}-dimensional, want 1")
        null = np.isnan(v)
        k = len(self.edges) + 1
        bins = np.searchsorted(np.asarray(self.edges, dtype=np.float64), v[~null],
                               side="right")
        out = np.zeros(k + 1, dtype=np.int64)
        out[:k] = np.bincount(bins, minlength=k)
        out[k] = int(null.sum())
        return out

    @property
    def null_share(self) -> float:
        """The share of null values in [0, 1]; NaN when the profile holds no rows."""
        total = sum(self.counts)
        return self.counts[-1] / total if total else math.nan


@dataclass(frozen=True)
class CategoricalProfile:
    """The value counts of one categorical context column.

    Attributes:
        name: the column (``country``, ``device_type``, ...).
        counts: category -> count (>= 0): the kept categories, most frequent first,
            then :data:`OTHER` and :data:`NULL`.
    """

    name: str
    counts: Mapping[str, int]

    def __post_init__(self) -> None:
        if any(not isinstance(k, str) or c < 0 for k, c in self.counts.items()):
            raise InputError(f"profile of {self.name!r}: a category is not a string or "
                             "its count is negative")

    def histogram(self, values: Sequence[str | float | None]) -> dict[str, int]:
        """Counts of ``values`` under this profile's keys, in its key order.

        A value not among the keys counts under :data:`OTHER`, None (or a float NaN)
        under :data:`NULL`; either key is appended when the profile lacks it (never for
        a profile made by :func:`build_profile`, which has both).
        """
        out = dict.fromkeys(self.counts, 0)
        for value, n in Counter(map(_category, values)).items():
            if value is None:
                key = NULL
            else:  # the literal key names are not categories (as in build_profile)
                key = value if value in out and value not in (OTHER, NULL) else OTHER
            out[key] = out.get(key, 0) + n
        return out


def _category(value: object) -> str | None:
    """A context value as a category: None for None or NaN, else its string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class ReferenceProfile:
    """The training data of one model version, as histograms.

    Attributes:
        version: the model version.
        features: feature name -> its histogram, in the model's feature order.
        prediction: the histogram of the model's predictions on the same rows.
        context: context column -> its categorical counts.
        rows: the number of training rows profiled (>= 1).
    """

    version: str
    features: Mapping[str, NumericProfile]
    prediction: NumericProfile
    context: Mapping[str, CategoricalProfile]
    rows: int

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-ready data (lists keep the feature order)."""
        def num(p: NumericProfile) -> dict[str, Any]:
            return {"name": p.name, "edges": list(p.edges), "counts": list(p.counts)}

        return {"format": _FORMAT, "version": self.version, "rows": self.rows,
                "features": [num(p) for p in self.features.values()],
                "prediction": num(self.prediction),
                "context": [{"name": c.name, "counts": dict(c.counts)}
                            for c in self.context.values()]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReferenceProfile:
        """The profile of :meth:`to_dict`'s data.

        Raises:
            InputError: ``d`` is not a profile of a known format.
        """
        try:
            if d["format"] != _FORMAT:
                raise InputError(f"reference profile format {d['format']!r} is not "
                                 f"{_FORMAT}; a newer writer?")

            def num(p: Mapping[str, Any]) -> NumericProfile:
                return NumericProfile(str(p["name"]), tuple(float(e) for e in p["edges"]),
                                      tuple(_count(c) for c in p["counts"]))

            features = [num(p) for p in d["features"]]
            context = [CategoricalProfile(str(c["name"]), {
                str(k): _count(v) for k, v in c["counts"].items()}) for c in d["context"]]
            return cls(str(d["version"]), {p.name: p for p in features},
                       num(d["prediction"]), {c.name: c for c in context}, _count(d["rows"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"not a reference profile: {type(exc).__name__} {exc}") from exc


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def numeric_profile(name: str, values: np.ndarray, bins: int = 10) -> NumericProfile:
    """The profile of one numeric column by the module docstring's binning rule: the
    ``bins``-quantile edges of its finite values (ties merged), its counts in them and
    its nulls (NaN)."""
    finite = values[np.isfinite(values)]
    edges: tuple[float, ...] = ()
    if finite.size:
        q = np.quantile(finite, np.arange(1, bins) / bins, method="linear")
        edges = tuple(float(e) for e in np.unique(q))
    proto = NumericProfile(name, edges, (0,) * (len(edges) + 2))
    return NumericProfile(name, edges, tuple(int(c) for c in proto.histogram(values)))


def _categorical(name: str, values: Sequence[str | float | None]) -> CategoricalProfile:
    seen = Counter(map(_category, values))
    nulls = seen.pop(None, 0)
    ranked = sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = {k: n for k, n in ranked[:MAX_CATEGORIES] if k is not None and k not in (OTHER, NULL)}
    other = sum(seen.values()) - sum(kept.values())
    return CategoricalProfile(name, {**kept, OTHER: other, NULL: nulls})


def build_profile(version: str, x: np.ndarray, features: Sequence[str],
                  predictions: np.ndarray,
                  context: Mapping[str, Sequence[str | float | None]] | None = None, *,
                  bins: int = 10) -> ReferenceProfile:
    """The reference profile of a model's training rows.

    Args:
        version: the model version.
        x: the training rows, ``(rows, len(features))``, in the model's feature order
            (NaN = null).
        features: the model's feature names, in column order.
        predictions: the model's prediction for each row (``rows`` values).
        context: context column -> one value per row (None or NaN = null; a value
            that is not a string counts as its ``str``), optional.
        bins: the most value bins per numeric column, 1..1000 (see the module docstring).

    Raises:
        InputError: the shapes disagree, there are no rows, or ``bins`` is out of range.
    """
    x = np.asarray(x, dtype=np.float64)
    p = np.asarray(predictions, dtype=np.float64)
    if not 1 <= bins <= 1000:
        raise InputError(f"bins {bins} is out of range 1..1000")
    if x.ndim != 2 or x.shape[1] != len(features) or len(set(features)) != len(features):
        raise InputError(f"training rows of shape {x.shape} do not match the "
                         f"{len(features)} distinct feature names")
    rows = x.shape[0]
    if rows == 0:
        raise InputError(f"model {version}: no training rows to profile")
    if p.shape != (rows,):
        raise InputError(f"{p.size} predictions for {rows} training rows")
    cols = dict(context or {})
    for name, values in cols.items():
        if len(values) != rows:
            raise InputError(f"context column {name!r} has {len(values)} values for "
                             f"{rows} training rows")
    return ReferenceProfile(
        version, {f: numeric_profile(f, x[:, j], bins) for j, f in enumerate(features)},
        numeric_profile("prediction", p, bins),
        {name: _categorical(name, values) for name, values in cols.items()}, rows)


def save_profile(profile: ReferenceProfile, folder: Path) -> None:
    """Write ``folder/reference_profile.json`` (through a temporary file, replaced
    atomically).

    Raises:
        InputError: the folder cannot be written.
    """
    path = Path(folder) / PROFILE_FILE
    tmp = path.with_name(f".{PROFILE_FILE}.tmp")
    try:
        tmp.write_text(json.dumps(profile.to_dict(), indent=1, allow_nan=False) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def load_profile(models_dir: Path | str, version: str) -> ReferenceProfile | None:
    """The reference profile of ``version`` in ``models_dir``.

    Returns:
        The profile, or None when the version has no profile file (a model trained
        before profiles existed, or no such version).

    Raises:
        InputError: the file exists but cannot be read or is not a profile of
            ``version`` (the message names the path).
    """
    path = Path(models_dir) / version / PROFILE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
                         ) from exc
    try:
        profile = ReferenceProfile.from_dict(json.loads(text))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not JSON: {exc}") from exc
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc
    if profile.version != version:
        raise InputError(f"{path} holds the profile of version {profile.version!r}, "
                         f"not {version!r}")
    return profile
