"""Training the CTR model from a training set, gating it and writing a versioned artifact.

The pipeline, each step a small function:

1. :func:`served_features` — the model's inputs are exactly the served feature names
   (registry order) that the training set has as columns; masks and label-row columns
   are never inputs. Nulls (ratios without impressions) become NaN, which LightGBM
   routes as missing — the same as a null served value.
2. :func:`~offline.evaluation.time_split` — the last 20 % of rows by ``ts`` validate.
3. :func:`offline.search.run_search` — LightGBM (CPU, ``num_threads`` = 1 by default)
   over ``search_candidates`` (default 50) combinations (:func:`offline.search.candidates`:
   the 8 of :data:`SEARCH_GRID` first, then seeded random draws), each early-stopped on
   validation log loss, within an optional wall-clock budget; the lowest validation log
   loss wins (a proper scoring rule, so calibration counts, not only ranking). The
   winner is *kept*, not refitted on all rows.
4. :func:`offline.calibration.choose_calibration` — the validation rows are halved by
   time; a Platt and an isotonic map are fitted on the EARLIER half and the one with
   the lower log loss on the LATER half is shipped (``calibration.json``) when it beats
   no map. The later half — the *evaluation rows* — is what ``metrics`` describe: the
   shipped (calibrated) model's AUC, log loss and calibration bins, which the gates
   judge; ``metrics_uncalibrated`` holds the booster's own on the same rows. (Still
   slightly optimistic: the whole validation split chose the iteration count and the
   combination.) When the halves cannot be made (one timestamp, or a half without
   both classes) no map is fitted and the evaluation rows are the whole split.
5. Baselines on the same evaluation rows: the historical-CTR lookup table
   (:mod:`offline.lookup_table`, fitted on the training rows of the 30 days before the
   cut-off), in ``metadata["baselines"]``; the cold-start model
   (:mod:`offline.coldstart_model`) on the split.
6. Under the registry lock: compare with the champion (re-scored on the *same*
   evaluation rows when it can be, see :func:`champion_ref`), apply the gates
   (:func:`offline.models.decide`), write ``MODELS_DIR/<version>/`` and record it in
   the history (:mod:`headrace.model.registry`): ``failed`` when a gate fails, else
   ``champion`` — or ``candidate`` (for a rollout, or while another version is in one).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_defs.registry import Registry
from headrace.core.errors import InputError
from headrace.core.jsonsafe import json_safe
from headrace.model.artifact import (
    ModelLoadError,
    champion_version,
    load_model,
    registry_lock,
    save_calibration,
    write_artifact,
)
from headrace.model.booster import lightgbm
from headrace.model.coldstart import ColdStartModel, save_coldstart
from headrace.model.registry import ModelRegistry, Role
from headrace.monitor.profile import build_profile, save_profile
from offline.calibration import eval_rows
from offline.coldstart_model import train_coldstart
from offline.evaluation import (
    Metrics,
    TimeSplit,
    evaluate,
    plot_calibration,
    plot_importance,
    time_split,
)
from offline.lookup_table import evaluate_lookup_table
from offline.models import DEFAULT_POLICY, ChampionRef, GateDecision, GatePolicy, decide
from offline.search import (
    BASE_PARAMS,
    DEFAULT_CANDIDATES,
    LEGACY_GRID,
    MAX_CANDIDATES,
    candidates,
    run_search,
)
from offline.training_set import label_times

if TYPE_CHECKING:
    from headrace.core.settings import CommonSettings

__all__ = ["SEARCH_GRID", "BASE_PARAMS", "TrainResult", "served_features", "feature_matrix",
           "label_vector", "search", "champion_ref", "train", "read_training_set"]

#: the 8 combinations of the old fixed search: the first candidates of every search
SEARCH_GRID: tuple[Mapping[str, Any], ...] = LEGACY_GRID


#: the string context columns whose frequencies the reference profile keeps
PROFILE_CONTEXT = ("country", "device_type", "placement", "creative_type", "publisher_id")


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced; ``role``: the version's role in the registry."""

    version: str
    path: Path
    decision: GateDecision
    metrics: Metrics
    coldstart: Metrics | None
    metadata: Mapping[str, Any]
    seconds: float
    role: Role

    def summary(self) -> dict[str, Any]:
        """The ``--json`` output of ``headrace train`` (``auc``/``logloss``: the shipped
        model on the evaluation rows; the lookup table on the same rows)."""
        meta = self.metadata
        lookup = meta["baselines"]["lookup_table"]
        raw = meta["metrics_uncalibrated"]
        return {"version": self.version, "path": str(self.path),
                "promoted": self.role is Role.CHAMPION, "role": self.role.value,
                "reasons": list(self.decision.reasons), "auc": self.metrics.auc,
                "logloss": self.metrics.logloss,
                "auc_uncalibrated": raw["auc"], "logloss_uncalibrated": raw["logloss"],
                "calibration": meta["calibration_map"]["chosen"],
                "auc_lookup_table": lookup.get("auc"),
                "logloss_lookup_table": lookup.get("logloss"),
                "eval_rows": self.metrics.rows,
                "coldstart_auc": self.coldstart.auc if self.coldstart else None,
                "features": len(meta["features"]), "rows": meta["data"]["rows"],
                "best_params": meta["search"]["best"],
                "candidates_ran": meta["search"]["ran"],
                "search_stopped": meta["search"]["stopped"],
                "seconds": round(self.seconds, 3)}


def served_features(columns: Sequence[str], registry: Registry) -> list[str]:
    """Served feature names of ``registry`` present in ``columns``, in registry order.

    Raises:
        InputError: none is present.
    """
    names = registry.feature_names()
    found = [n for n in names if n in set(columns)]
    if not found:
        raise InputError(f"the training set has none of the {len(names)} served feature "
                         f"columns (e.g. {names[0]}); build it with headrace training-set")
    return found


def feature_matrix(table: pa.Table, features: Sequence[str]) -> np.ndarray:
    """``(rows, features)`` float64 matrix; nulls → NaN.

    Raises:
        InputError: a column is missing or not numeric.
    """
    cols = []
    for name in features:
        if name not in table.column_names:
            raise InputError(f"the rows have no '{name}' column")
        col = table.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
                or pa.types.is_boolean(col.type) or pa.types.is_null(col.type)):
            raise InputError(f"feature column '{name}' has type {col.type}; expected a number")
        cols.append(np.asarray(col.cast(pa.float64()).to_numpy(), dtype=np.float64))
    return np.column_stack(cols) if cols else np.empty((table.num_rows, 0))


def label_vector(table: pa.Table) -> np.ndarray:
    """The ``label`` column as float64 0/1. Raises InputError on nulls or other values."""
    if "label" not in table.column_names:
        raise InputError("the training set has no 'label' column")
    col = table.column("label")
    if col.null_count:
        raise InputError(f"the label column has {col.null_count} null value(s)")
    try:
        y = np.asarray(col.cast(pa.float64()).to_numpy(), dtype=np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"the label column has type {col.type}; expected 0/1") from exc
    if not np.isin(y, (0.0, 1.0)).all():
        raise InputError("the label column holds values other than 0 and 1")
    return y


def search(x: np.ndarray, y: np.ndarray, split: TimeSplit, features: Sequence[str], *,
           grid: Sequence[Mapping[str, Any]] = SEARCH_GRID, seed: int = 0,
           num_threads: int = 1) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    """Fit every combination of ``grid`` (over :data:`BASE_PARAMS`), no budget; return
    (best booster, its params, all results). :func:`offline.search.run_search` is the
    full form."""
    out = run_search(x, y, split, features, grid=[{**BASE_PARAMS, **c} for c in grid],
                     seed=seed, num_threads=num_threads)
    return out.booster, out.params, out.results


def champion_ref(models_dir: Path, table: pa.Table, y: np.ndarray, split: TimeSplit
                 ) -> ChampionRef | None:
    """The champion's AUC (and log loss), on the candidate's evaluation rows
    (``split.valid``) when fair.

    Re-scoring (with the champion's calibration map, as served) is used when the
    champion's features are all columns of ``table`` and its training rows all precede
    ``split.cutoff_ms`` (it never trained on these rows);
    otherwise its stored validation AUC. An unreadable champion counts as below the floor
    (NaN AUC), so a good model can replace it.
    """
    version = champion_version(models_dir)
    if version is None:
        return None
    try:
        champ = load_model(models_dir, version)
    except ModelLoadError as exc:
        return ChampionRef(version, math.nan, f"unreadable: {exc}")
    train_max = champ.metadata.get("data", {}).get("train", {}).get("max_ts_ms")
    if (set(champ.features) <= set(table.column_names) and train_max is not None
            and train_max < split.cutoff_ms):
        rows = table.take(pa.array(split.valid))
        p = champ.predict(feature_matrix(rows, champ.features))
        m = evaluate(y[split.valid], p)
        return ChampionRef(version, m.auc, "same validation rows", m.logloss)
    stored = champ.metadata.get("metrics", {}).get("auc")
    return ChampionRef(version, math.nan if stored is None else float(stored), "stored metadata")


def _span(ts: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")

    lo, hi = int(ts.min()), int(ts.max())
    return {"rows": int(ts.size), "positives": int(y.sum()), "min_ts_ms": lo, "max_ts_ms": hi,
            "min_ts": iso(lo), "max_ts": iso(hi)}


def train(table: pa.Table, out_dir: Path | str, *, policy: GatePolicy = DEFAULT_POLICY,
          seed: int = 0, clock: Callable[[], datetime] = _utcnow,
          grid: Sequence[Mapping[str, Any]] | None = None, num_threads: int = 1,
          valid_fraction: float = 0.2, registry: Registry,
          source: str | None = None, candidate: bool = False,
          search_candidates: int = DEFAULT_CANDIDATES, search_budget_s: float | None = None,
          progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train, evaluate, gate and save a model from a training-set table.

    Args:
        table: training-set rows (``ts``, ``label``, served feature columns, context).
        out_dir: the models folder (created if needed).
        policy: gate thresholds. seed: LightGBM seed and the search's draws.
        clock: UTC time of the version name.
        grid: explicit hyperparameter combinations (each over :data:`BASE_PARAMS`): exactly
            these are searched and ``search_candidates`` is ignored; None: the search of
            :func:`offline.search.candidates`.
        num_threads: LightGBM threads.
        valid_fraction: share of the latest rows held out. source: recorded in metadata.
        candidate: a model that passes the gates stays ``candidate`` (for a rollout).
        registry: the definitions served (the model's inputs are their feature names);
            the command passes ``registry_for(settings, --definitions)``.
        search_candidates: how many candidates to search (1–200) when ``grid`` is None.
        search_budget_s: wall-clock seconds after which no new candidate starts (the
            first always runs); None: no budget.
        progress: called with one human-readable line per candidate (stderr in the CLI).

    Returns:
        The version written (promoted or not) with its decision and metrics.

    Raises:
        InputError: bad columns or labels, a split without both classes, a folder that
            cannot be written, a search size or budget out of range.
    """
    started = time.monotonic()
    out = Path(out_dir)
    if grid is None and not 1 <= search_candidates <= MAX_CANDIDATES:
        raise InputError(f"the search needs 1 to {MAX_CANDIDATES} candidates, "
                         f"not {search_candidates}")
    if search_budget_s is not None and not search_budget_s >= 0:
        raise InputError("the search budget must be >= 0 seconds")
    features = served_features(table.column_names, registry)
    y = label_vector(table)
    if "ts" not in table.column_names:
        raise InputError("the training set has no 'ts' column")
    ts = label_times(table.column("ts"))
    x = feature_matrix(table, features)
    split = time_split(ts, valid_fraction)
    for part, idx in (("training", split.train), (f"validation (last {valid_fraction:.0%} by "
                                                  "time)", split.valid)):
        pos = int(y[idx].sum())
        if pos == 0 or pos == idx.size:
            raise InputError(f"the {part} part has only {'negative' if pos == 0 else 'positive'}"
                             f" labels ({idx.size} rows); AUC and training need both")
    combos = (candidates(search_candidates, seed) if grid is None
              else [{**BASE_PARAMS, **c} for c in grid])
    found = run_search(x, y, split, features, grid=combos, seed=seed, num_threads=num_threads,
                       budget_s=search_budget_s, progress=progress)
    booster, params = found.booster, found.params
    p_valid = booster.predict(x[split.valid], num_iteration=booster.best_iteration)
    rows = eval_rows(p_valid, y, ts, split)
    cal = rows.choice.map if rows.choice is not None else None
    p_eval = booster.predict(x[rows.eval], num_iteration=booster.best_iteration)
    raw_metrics = evaluate(y[rows.eval], p_eval)
    metrics = raw_metrics if cal is None else evaluate(y[rows.eval], cal.apply(p_eval))
    valid_raw = evaluate(y[split.valid], p_valid)
    p_train = booster.predict(x[split.train], num_iteration=booster.best_iteration)
    fit = evaluate(y[split.train], p_train)
    # the drift monitor's reference: the training rows and the scores served for them
    profile_context = {c: table.column(c).take(pa.array(split.train)).to_pylist()
                       for c in PROFILE_CONTEXT if c in table.column_names
                       and (pa.types.is_string(table.column(c).type)
                            or pa.types.is_large_string(table.column(c).type))}
    gains = booster.feature_importance(importance_type="gain", iteration=booster.best_iteration)
    importance = dict(sorted(zip(features, map(float, gains), strict=True),
                             key=lambda kv: -kv[1]))
    lookup = _lookup_baseline(table, split, rows.eval)
    cold: ColdStartModel | None = None
    cold_metrics, cold_error = None, None
    try:
        cold, cold_metrics = train_coldstart(table, ts, y, split, seed=seed,
                                             num_threads=num_threads)
    except InputError as exc:
        cold_error = str(exc)
    train_seconds = time.monotonic() - started
    eval_split = TimeSplit(split.train, rows.eval, split.cutoff_ms)
    with registry_lock(out):
        decision = decide(metrics, champion_ref(out, table, y, eval_split), policy)
        metadata: dict[str, Any] = {}

        def fill(folder: Path, version: str) -> None:
            metadata.update(json_safe({
                "version": version, "created_at": clock().astimezone(UTC).isoformat(),
                "model": "lightgbm-binary", "lightgbm_version": lightgbm().__version__,
                "features": features, "label": "label",
                "metrics": metrics.to_dict(),
                "metrics_rows": {"rows": rows.note, **_span(ts[rows.eval], y[rows.eval])},
                "metrics_uncalibrated": raw_metrics.to_dict(),
                "metrics_valid_uncalibrated": {"rows": "all validation rows",
                                               "auc": valid_raw.auc,
                                               "logloss": valid_raw.logloss},
                "calibration_map": (rows.choice.to_dict() if rows.choice is not None else
                                    {"chosen": "none", "map": None, "reason": rows.note}),
                "baselines": {"lookup_table": lookup},
                "train_metrics": {"auc": fit.auc, "logloss": fit.logloss},
                "importance_gain": importance,
                "data": {"source": source, "rows": int(y.size), "valid_fraction": valid_fraction,
                         "cutoff_ms": split.cutoff_ms, "train": _span(ts[split.train],
                                                                      y[split.train]),
                         "valid": _span(ts[split.valid], y[split.valid])},
                "params": params, "best_iteration": int(booster.best_iteration),
                "search": found.to_dict(),
                "gate": decision.to_dict(),
                "coldstart": {"trained": cold is not None, "error": cold_error,
                              "metrics": cold_metrics.to_dict() if cold_metrics else None},
                "calibration_bins": "predicted-probability deciles (equal row counts) of "
                                    "the shipped model on the evaluation rows",
                "training_seconds": round(train_seconds, 3),
            }))
            booster.save_model(str(folder / "model.txt"), num_iteration=booster.best_iteration)
            if cal is not None:
                save_calibration(cal, folder)
            (folder / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n",
                                                  encoding="utf-8")
            plot_calibration(metrics.calibration, policy, folder / "calibration.png")
            plot_importance(importance, folder / "importance.png")
            if cold is not None:
                save_coldstart(cold, folder / "coldstart")
            save_profile(build_profile(version, x[split.train], features,
                                       p_train if cal is None else cal.apply(p_train),
                                       profile_context), folder)

        version, path = write_artifact(out, clock(), fill)
        role = _record(ModelRegistry(out, clock=lambda: int(clock().timestamp() * 1000)),
                       version, decision, metrics, candidate)
    return TrainResult(version, path, decision, metrics, cold_metrics, metadata,
                       time.monotonic() - started, role)


def _lookup_baseline(table: pa.Table, split: TimeSplit, eval_idx: np.ndarray
                     ) -> dict[str, Any]:
    """The lookup table fitted on the training rows of the 30 days before the cut-off,
    scored on the evaluation rows; ``{"error": ...}`` when it cannot be fitted."""
    try:
        return evaluate_lookup_table(table.take(pa.array(split.train)),
                                     table.take(pa.array(eval_idx)), cutoff_ms=split.cutoff_ms)
    except InputError as exc:
        return {"error": str(exc)}


def _record(models: ModelRegistry, version: str, decision: GateDecision, metrics: Metrics,
            candidate: bool) -> Role:
    """Record the gate decision in the history (actor ``train``); returns the role."""
    hold = "--candidate" if candidate else models.challenger() and "a rollout is running"
    if not decision.promote:
        role, why = Role.FAILED, "failed the offline gates"
    else:
        role = Role.CANDIDATE if hold else Role.CHAMPION
        why = f"passed the offline gates{f', not promoted ({hold})' if hold else ''}"
    gates = {**decision.to_dict(), "auc": metrics.auc, "logloss": metrics.logloss}
    models.transition(version, role, f"{why}: {'; '.join(decision.reasons)}", gates,
                      actor="train")
    return role


def read_training_set(uri: str, settings: CommonSettings | None = None) -> pa.Table:
    """Read a training-set Parquet file (local path or ``s3://``).

    Raises:
        InputError: missing, unreadable or empty.
    """
    from offline.store import resolve_uri

    fs, path = resolve_uri(uri, settings)
    try:
        table = pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot read the training set {uri}: {first}") from exc
    if table.num_rows == 0:
        raise InputError(f"the training set {uri} has no rows")
    return table
