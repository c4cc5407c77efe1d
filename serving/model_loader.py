"""The champion model as the scorer uses it, and its hot reload.

:class:`ScoringModel` is a loaded version compiled for serving: for every column of the
booster (its feature order) where the value comes from — an online feature of one
entity (read through a :class:`~serving.reader.ReadPlan` of exactly the model's features
of that entity), the request time (``hour_of_day``, ``day_of_week``, UTC), the request
context (a categorical whose codes the model's metadata stores under ``categories``) or
the candidate's ``bid_cpm``. A model that needs anything else cannot be served and is
refused at load time (the previous one keeps serving).

:class:`ModelWatcher` polls ``MODELS_DIR/CHAMPION`` (one small file read) every
``poll_s`` seconds in a daemon thread. When it names a new version, the version is
loaded *fully* (booster, cold-start model, compilation, one warm-up prediction) while
requests keep using the current one; then one attribute is rebound. A version with a
``calibration.json`` (:class:`~headrace.model.artifact.CalibrationMap`) has it applied to
every booster prediction in :meth:`ScoringModel.predict` (one vectorised expression); a
version without one predicts the booster's probability unchanged. A request reads
:attr:`ModelWatcher.current` once and keeps that object to the end, so a swap never
splits a request between two models and never drops one. A version that fails to load
is logged, reported through ``on_error`` and not retried (versions are immutable); a
CHAMPION file that disappears keeps the current model.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from feature_defs.registry import Registry
from headrace.core.errors import InputError
from headrace.model.artifact import (
    CalibrationMap,
    LoadedModel,
    ModelLoadError,
    champion_version,
    load_model,
)
from headrace.model.booster import lightgbm
from headrace.model.coldstart import CONTEXT_CATEGORICAL, ColdStartModel
from serving.periodic import Periodic
from serving.reader import ReadPlan, compile_read_plan

__all__ = ["TIME_FEATURES", "BID_FEATURE", "PER_CANDIDATE_KEYS", "EntityPart", "ScoringModel",
           "ModelWatcher", "OneThread"]

log = logging.getLogger(__name__)

TIME_FEATURES = ("hour_of_day", "day_of_week")
BID_FEATURE = "bid_cpm"
#: entity keys that differ per candidate; the others (user_id, publisher_id) are per request
PER_CANDIDATE_KEYS = ("ad_id", "campaign_id")
_REQUEST_KEYS = ("user_id", "publisher_id")


class OneThread:
    """A booster whose predictions run on one thread: LightGBM's default (every core
    through OpenMP) costs more in thread wake-ups than it saves on 100 rows, and its
    tail latency grows with the machine's load."""

    __slots__ = ("booster",)

    def __init__(self, booster: Any) -> None:
        self.booster = booster

    def predict(self, x: np.ndarray, **kwargs: Any) -> np.ndarray:
        return np.asarray(self.booster.predict(x, num_threads=1, **kwargs), dtype=np.float64)


@dataclass(frozen=True)
class EntityPart:
    """The model's features of one entity.

    Attributes:
        entity: entity name. key: its id field (``user_id``, ``ad_id``, ...).
        plan: read plan of exactly these features, in model order.
        columns: model column of each ``plan.names`` entry.
        field_index: positions of ``plan.fields`` in :attr:`ScoringModel.fields`.
        per_candidate: the id differs per candidate (ads, campaigns).
    """

    entity: str
    key: str
    plan: ReadPlan
    columns: np.ndarray
    field_index: tuple[int, ...]
    per_candidate: bool


@dataclass(frozen=True)
class ScoringModel:
    """A champion compiled for scoring (see the module docstring). Immutable."""

    version: str
    booster: OneThread
    features: tuple[str, ...]
    parts: tuple[EntityPart, ...]
    fields: tuple[str, ...]  # union of the parts' view fields: one HMGET per key
    time_columns: tuple[int | None, int | None]  # hour_of_day, day_of_week
    bid_column: int | None
    categorical: tuple[tuple[int, str, Mapping[str, int]], ...]  # (column, context, codes)
    coldstart: ColdStartModel | None
    metadata: Mapping[str, Any]
    calibration: CalibrationMap | None = None  # applied to the booster's probability

    @classmethod
    def compile(cls, model: LoadedModel, registry: Registry) -> ScoringModel:
        """Compile and warm up ``model``.

        Raises:
            ModelLoadError: a feature the scorer cannot produce, or a prediction failure.
        """
        by_entity: dict[str, list[tuple[int, str]]] = {}
        time_cols: list[int | None] = [None, None]
        bid_col = None
        cats: list[tuple[int, str, Mapping[str, int]]] = []
        codes = model.metadata.get("categories") or {}
        unknown = []
        for j, name in enumerate(model.features):
            found = registry.by_feature.get(name)
            if found is not None:
                by_entity.setdefault(found[0].view.entity.name, []).append((j, name))
            elif name in TIME_FEATURES:
                time_cols[TIME_FEATURES.index(name)] = j
            elif name == BID_FEATURE:
                bid_col = j
            elif name in CONTEXT_CATEGORICAL and name in codes:
                cats.append((j, name, {str(v): i for i, v in enumerate(codes[name])}))
            else:
                unknown.append(name)
        if unknown:
            raise ModelLoadError(
                f"model {model.version} uses feature(s) the scorer cannot produce: "
                f"{', '.join(unknown[:5])} (it serves online features, "
                f"{', '.join(TIME_FEATURES)}, {BID_FEATURE} and context categoricals "
                "with codes in metadata.json)")
        parts, fields = _parts(registry, by_entity, model.version)
        coldstart = model.coldstart
        if coldstart is not None:
            coldstart = dataclasses.replace(coldstart, booster=OneThread(coldstart.booster))
        compiled = cls(model.version, OneThread(model.booster), model.features, parts, fields,
                       (time_cols[0], time_cols[1]), bid_col, tuple(cats), coldstart,
                       model.metadata, model.calibration)
        compiled.warm_up()
        return compiled

    def warm_up(self) -> None:
        """One prediction of each model, so the first request pays no lazy set-up."""
        lgb = lightgbm()
        try:
            self.predict(np.full((1, len(self.features)), np.nan))
            if self.coldstart is not None:
                self.coldstart.predict_context([{}])
        except (ValueError, TypeError, lgb.basic.LightGBMError) as exc:
            raise ModelLoadError(f"model {self.version} cannot predict: {exc}") from exc

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Click probabilities of a ``(rows, len(features))`` matrix: ONE LightGBM call,
        then the version's calibration map when it has one."""
        p = self.booster.predict(x)
        return p if self.calibration is None else self.calibration.apply(p)


def _parts(registry: Registry, by_entity: Mapping[str, list[tuple[int, str]]],
           version: str) -> tuple[tuple[EntityPart, ...], tuple[str, ...]]:
    plans = []
    for entity, cols in by_entity.items():
        key = registry.entities[entity].key
        if key not in PER_CANDIDATE_KEYS + _REQUEST_KEYS:
            raise ModelLoadError(f"model {version} uses features of {entity!r}, whose key "
                                 f"{key!r} a Score request does not carry")
        plan = compile_read_plan(registry, entity, [n for _, n in cols])
        plans.append((entity, key, plan, np.array([j for j, _ in cols], dtype=np.intp)))
    fields = tuple(dict.fromkeys(f for _, _, plan, _ in plans for f in plan.fields))
    parts = tuple(EntityPart(entity, key, plan, columns,
                             tuple(fields.index(f) for f in plan.fields),
                             key in PER_CANDIDATE_KEYS)
                  for entity, key, plan, columns in plans)
    return parts, fields


class _Versioned(Protocol):
    @property
    def version(self) -> str: ...


T = TypeVar("T", bound=_Versioned)


class ModelWatcher(Generic[T]):
    """The current prepared champion, swapped atomically when ``CHAMPION`` changes.

    Args:
        models_dir: the models folder (``MODELS_DIR``).
        prepare: turns a loaded version into what requests use (compile + warm up);
            raises :class:`~headrace.core.errors.InputError` when it cannot be served.
        poll_s: seconds between polls of ``CHAMPION``.
        load: loads one version (default :func:`headrace.model.artifact.load_model`).
        on_swap: called with (new, old) after each swap (metrics).
        on_error: called with the message of each failed load (metrics).
    """

    def __init__(
        self,
        models_dir: Path | str,
        prepare: Callable[[LoadedModel], T],
        *,
        poll_s: float = 2.0,
        load: Callable[[Path, str], LoadedModel] = load_model,
        on_swap: Callable[[T, T | None], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.poll_s = poll_s
        self._prepare = prepare
        self._load = load
        self._on_swap = on_swap
        self._on_error = on_error
        self._current: T | None = None
        self._failed: str | None = None
        self.problem: str | None = "not started"
        self._lock = threading.Lock()  # one refresh at a time (poller vs. explicit calls)
        self._loop = Periodic("model-reload", poll_s, self.refresh,
                              "model reload failed unexpectedly; retrying at the next poll")

    @property
    def current(self) -> T | None:
        """The model to use; read it ONCE per request and keep the object."""
        return self._current

    def load(self, version: str) -> T:
        """Load and prepare any version of ``models_dir`` the way the champion is (the
        split's challenger uses it); the current model is not touched.

        Raises:
            InputError: the version is missing, unreadable or cannot be served
                (:class:`~headrace.model.artifact.ModelLoadError` included).
        """
        return self._prepare(self._load(self.models_dir, version))

    def refresh(self) -> bool:
        """Load the champion if it changed. Returns True when a new model was swapped in;
        never raises for a missing, unreadable or unservable model (see ``problem``)."""
        with self._lock:
            try:
                version = champion_version(self.models_dir)
            except ModelLoadError as exc:
                return self._fail(str(exc), None)
            current = self._current
            if version is None:
                if current is None:
                    self.problem = (f"no champion model in {self.models_dir} (no "
                                    f"{self.models_dir / 'CHAMPION'}); train one with "
                                    f"`headrace train --out {self.models_dir}`")
                return False
            if (current is not None and current.version == version) or version == self._failed:
                return False
            try:
                prepared = self.load(version)
            except InputError as exc:  # ModelLoadError included
                return self._fail(f"champion {version} could not be loaded: {exc}", version)
            self._current = prepared  # the swap: one reference, atomic for readers
            self.problem = None
            log.info("serving model %s (was %s)", version, current and current.version)
            if self._on_swap is not None:
                self._on_swap(prepared, current)
            return True

    def _fail(self, message: str, version: str | None) -> bool:
        self._failed = version
        if self._current is None:
            self.problem = message
        log.error("%s%s", message,
                  f"; still serving {self._current.version}" if self._current else "")
        if self._on_error is not None:
            self._on_error(message)
        return False

    def start(self) -> None:
        """Load once now, then poll every ``poll_s`` seconds in a daemon thread."""
        self.refresh()
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
