"""The retraining pipeline's steps, each a small function of its
:class:`~headrace.pipeline.runner.StepContext` (order: :data:`STEP_NAMES`).

1. ``labels`` — click labels of the impressions in ``[created - lookback, created -
   attribution)`` from the offline store, invalid traffic filtered out
   (:class:`offline.ivt.IvtRules`, the recommended rules), to ``<run>/labels.parquet``.
2. ``validate_labels`` — :func:`offline.validation.validate_labels`.
3. ``training_set`` — point-in-time features of every served feature, cold-start mode
   (as ``headrace training-set --cold-start``), to ``<run>/training_set.parquet``.
4. ``validate_training_set`` — :func:`offline.validation.validate_training_set` against
   the previous finished run's training set, when there is one (drift warnings).
5. ``train`` — :func:`offline.train.train` with the search (``HEADRACE_PIPELINE_
   CANDIDATES``, ``_SEARCH_BUDGET_S``, ``_SEED``), ``candidate=True`` and ``source=
   "pipeline:<run_id>"``; on a redo the version with that source is found again (and
   recorded in the history if the crash came between its folder and its history line).
6. ``gates`` — the offline gates' decision (:func:`offline.models.decide`, applied by
   ``train``): a rejected model ends the run ``rejected``.
7. ``register`` — the version becomes the registry's challenger (after the refusals of
   :func:`~headrace.pipeline.launch.check_start`); a model gated against another
   champion than today's (a promotion while the run waited) ends the run ``rejected``.
8. ``start_rollout`` — :func:`~headrace.pipeline.launch.start_rollout` with the
   controller lock released at once: a ``headrace rollout run`` drives it. Skipped when
   the rollout state already holds this run's rollout.

Every output file is written atomically (a temporary name, then a rename); outputs and
inputs are recorded in ``run.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from feature_defs.registry import Registry
from headrace.core.errors import InputError
from headrace.model.artifact import list_versions
from headrace.model.registry import ModelRegistry, Role, RoleEvent
from headrace.pipeline.launch import check_start, running, start_rollout
from headrace.pipeline.record import RunRecord, RunStatus, RunStore
from headrace.pipeline.runner import Rejected, Step, StepContext, ValidationFailed
from headrace.pipeline.settings import PipelineSettings
from headrace.rollout.policy import Policy
from headrace.rollout.runner import Runner
from headrace.rollout.source import StatsSource
from headrace.rollout.store import RolloutStore, Stored

__all__ = ["STEP_NAMES", "Pipeline", "rollout_id_for", "source_tag", "find_trained"]

log = logging.getLogger(__name__)

STEP_NAMES = ("labels", "validate_labels", "training_set", "validate_training_set", "train",
              "gates", "register", "start_rollout")
LABELS_FILE = "labels.parquet"
TRAINING_SET_FILE = "training_set.parquet"


def rollout_id_for(run_id: str) -> str:
    """The rollout id of a run (``p-…`` -> ``r-…``): fixed, so a redo finds it."""
    return "r-" + run_id.removeprefix("p-")


def source_tag(run_id: str) -> str:
    """The ``source`` the train step records in the model's metadata."""
    return f"pipeline:{run_id}"


def find_trained(models: ModelRegistry, run_id: str) -> str | None:
    """The version whose metadata's ``data.source`` is this run's, or None."""
    tag = source_tag(run_id)
    for version in reversed(list_versions(models.models_dir)):
        data = models.metadata(version).get("data")
        if isinstance(data, dict) and data.get("source") == tag:
            return version
    return None


def _read(path: str, what: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read the {what} {path}: {exc}") from exc


@dataclass(frozen=True)
class Pipeline:
    """The real steps and what they need; the command builds it.

    Attributes:
        settings: the pipeline's settings.
        definitions: the served feature definitions (the model's inputs).
        rollout_store: the rollout controller's Redis keys.
        stats_source: rollout id -> where the controller reads the arms' counts.
        make_runner: the controller runner of a rollout (its tick, lock TTL, alerts).
        policy: the rollout policy; shadow_s: its shadow phase (0: none);
            stats_file: recorded for ``rollout run``.
    """

    settings: PipelineSettings
    definitions: Registry
    rollout_store: Callable[[], RolloutStore]
    stats_source: Callable[[str], StatsSource]
    make_runner: Callable[[RolloutStore, ModelRegistry, StatsSource, Stored], Runner]
    policy: Policy
    shadow_s: float = 0.0
    stats_file: str | None = None

    @property
    def models(self) -> ModelRegistry:
        """The models folder's registry."""
        return ModelRegistry(Path(self.settings.models_dir))

    def steps(self) -> list[Step]:
        """The steps, in :data:`STEP_NAMES` order."""
        fns = {"labels": self.labels, "validate_labels": self.validate_labels,
               "training_set": self.training_set,
               "validate_training_set": self.validate_training_set, "train": self.train,
               "gates": self.gates, "register": self.register,
               "start_rollout": self.start_rollout}
        return [Step(name, fns[name]) for name in STEP_NAMES]

    # ------------------------------------------------------------------ data
    def labels(self, ctx: StepContext) -> Mapping[str, Any]:
        """Step 1 (module docstring)."""
        from offline.ivt import IvtRules
        from offline.labels import ivt_report_of, write_labels
        from offline.store import OfflineStore

        s = self.settings
        end = ctx.run.created_ms - s.attribution_ms
        start = ctx.run.created_ms - s.lookback_ms
        out = ctx.folder / LABELS_FILE
        rules = IvtRules()
        ctx.record_inputs(start_ms=start, end_ms=end, attribution_ms=s.attribution_ms,
                          offline_uri=s.offline_uri, ivt=rules.to_dict())
        offline = s.offline()
        rows, positives = write_labels(OfflineStore.from_settings(offline), str(out), start,
                                       end, s.attribution_ms, offline, ivt=rules)
        report = ivt_report_of(pq.read_schema(out))
        return {"path": str(out), "rows": rows, "positives": positives,
                "ivt": None if report is None else report.to_dict()}

    def validate_labels(self, ctx: StepContext) -> Mapping[str, Any]:
        """Step 2: stop the run (``invalid``) on any problem of the labels."""
        from offline.validation import validate_labels

        path = ctx.run.output("labels")["path"]
        ctx.record_inputs(path=path, min_rows=self.settings.pipeline_min_rows)
        report = validate_labels(_read(path, "labels"), min_rows=self.settings.pipeline_min_rows)
        if not report.ok:
            raise ValidationFailed("labels", report.problems)
        return {"report": report.to_dict()}

    def training_set(self, ctx: StepContext) -> Mapping[str, Any]:
        """Step 3 (module docstring)."""
        from offline.training_set import write_training_set

        labels = ctx.run.output("labels")["path"]
        out = ctx.folder / TRAINING_SET_FILE
        ctx.record_inputs(labels=labels, features="all", cold_start=True,
                          definitions=self.settings.definitions)
        rows = write_training_set(labels, str(out), "all", self.settings.offline(),
                                  cold_start=True, registry=self.definitions)
        return {"path": str(out), "rows": rows}

    def validate_training_set(self, ctx: StepContext) -> Mapping[str, Any]:
        """Step 4: stop the run (``invalid``) on any problem of the training set."""
        from offline.validation import validate_training_set

        path = ctx.run.output("training_set")["path"]
        previous = _previous_training_set(RunStore(self.settings.models_dir), ctx.run)
        features = self.definitions.feature_names()
        ctx.record_inputs(path=path, previous=previous, features=len(features),
                          min_rows=self.settings.pipeline_min_rows)
        report = validate_training_set(
            _read(path, "training set"), features,
            previous=None if previous is None else _read(previous, "previous training set"),
            min_rows=self.settings.pipeline_min_rows, registry=self.definitions)
        if not report.ok:
            raise ValidationFailed("training set", report.problems)
        for warning in report.warnings:
            log.warning("pipeline %s: training set: %s", ctx.run.run_id, warning)
        return {"report": report.to_dict()}

    # ------------------------------------------------------------------ the model
    def train(self, ctx: StepContext) -> Mapping[str, Any]:
        """Step 5 (module docstring): never a second version for one run."""
        from offline.train import read_training_set, train

        s, models = self.settings, self.models
        path = ctx.run.output("training_set")["path"]
        ctx.record_inputs(training_set=path, search_candidates=s.pipeline_candidates,
                          search_budget_s=s.pipeline_search_budget_s, seed=s.pipeline_seed,
                          source=source_tag(ctx.run.run_id))
        found = find_trained(models, ctx.run.run_id)
        if found is not None:
            return _trained(models, found, redo=True)
        result = train(read_training_set(path), models.models_dir, seed=s.pipeline_seed,
                       num_threads=s.pipeline_threads, registry=self.definitions,
                       source=source_tag(ctx.run.run_id), candidate=True,
                       search_candidates=s.pipeline_candidates,
                       search_budget_s=s.pipeline_search_budget_s)
        return {**_trained(models, result.version, redo=False), "seconds":
                round(result.seconds, 3)}

    def gates(self, ctx: StepContext) -> Mapping[str, Any]:
        """Step 6: the offline gates' decision; a rejected model ends the run."""
        trained = ctx.run.output("train")
        ctx.record_inputs(version=trained["version"])
        gate = self.models.metadata(trained["version"]).get("gate") or {}
        reasons = [str(r) for r in gate.get("reasons", [])]
        out = {"version": trained["version"], "promote": gate.get("promote") is True,
               "reasons": reasons}
        if gate.get("promote") is not True:
            raise Rejected([f"model {trained['version']} failed the offline gates", *reasons],
                           out)
        return out

    def register(self, ctx: StepContext) -> Mapping[str, Any]:
        """Step 7: the version becomes the challenger (once)."""
        version = ctx.run.output("train")["version"]
        rid = rollout_id_for(ctx.run.run_id)
        ctx.record_inputs(version=version, rollout_id=rid)
        models, store = self.models, self.rollout_store()
        if models.challenger() == version:
            return {"version": version, "rollout_id": rid, "redo": True}
        stored = store.load()
        if stored is not None and stored.state.rollout_id == rid:
            return {"version": version, "rollout_id": rid, "redo": True}
        champion = check_start(store, models, version)
        gate = models.metadata(version).get("gate") or {}
        gated = (gate.get("champion") or {}).get("version")
        if gated != champion:  # a promotion since training: the gates judged another
            raise Rejected([f"model {version} was gated against champion {gated or 'none'}, "
                            f"but {champion} is the champion now; the next run trains and "
                            "gates against it"], {"version": version, "rollout_id": None})
        gates = ctx.run.output("gates")
        models.transition(version, Role.CHALLENGER, f"pipeline run {ctx.run.run_id}: "
                          f"passed the offline gates, challenger of {champion} in rollout "
                          f"{rid}", {"reasons": gates.get("reasons", [])}, actor="rollout",
                          rollout_id=rid)
        return {"version": version, "rollout_id": rid, "champion": champion, "redo": False}

    def start_rollout(self, ctx: StepContext) -> Mapping[str, Any]:
        """Step 8: write the controller state and the first split (exactly once)."""
        version = ctx.run.output("register")["version"]
        rid = rollout_id_for(ctx.run.run_id)
        ctx.record_inputs(version=version, rollout_id=rid, shadow_s=self.shadow_s,
                          policy_time_scale=self.policy.time_scale)
        models, store = self.models, self.rollout_store()
        stored = store.load()
        if stored is not None and (stored.state.rollout_id == rid or (
                running(stored) and stored.state.challenger == version)):
            return {**_rollout(stored), "redo": True}
        source = self.stats_source(rid)
        runner, first = start_rollout(
            store, models, source,
            lambda doc: self.make_runner(store, models, source, doc),
            version=version, rollout_id=rid, policy=self.policy, shadow_s=self.shadow_s,
            stats_file=self.stats_file)
        runner.release()  # `headrace rollout run` drives it from here
        return {**_rollout(Stored(first, self.policy, self.stats_file)), "redo": False}


def _previous_training_set(runs: RunStore, current: RunRecord) -> str | None:
    """The training set of the newest earlier run that got past its validation."""
    for run in reversed(runs.runs()):
        if run.run_id == current.run_id or run.status not in (RunStatus.SUCCEEDED,
                                                              RunStatus.REJECTED):
            continue
        path = run.output("training_set").get("path")
        if path and Path(path).is_file():
            return str(path)
    return None


def _trained(models: ModelRegistry, version: str, *, redo: bool) -> dict[str, Any]:
    """The train step's outputs for ``version``; a version without a history line (the
    process died between its folder and its line) is recorded now, as ``train`` would."""
    meta = models.metadata(version)
    gate = meta.get("gate") or {}
    if not any(isinstance(e, RoleEvent) for e in models.history(version)):
        ok = gate.get("promote") is True
        models.transition(version, Role.CANDIDATE if ok else Role.FAILED,
                          ("passed the offline gates, not promoted (--candidate)" if ok
                           else "failed the offline gates") + " (recorded on a resume)",
                          gate, actor="train")
    metrics = meta.get("metrics") or {}
    return {"version": version, "path": str(models.models_dir / version),
            "role": models.roles()[version].value, "promote": gate.get("promote") is True,
            "auc": metrics.get("auc"), "logloss": metrics.get("logloss"), "redo": redo}


def _rollout(stored: Stored) -> dict[str, Any]:
    s = stored.state
    return {"rollout_id": s.rollout_id, "champion": s.champion, "challenger": s.challenger,
            "phase": s.phase, "status": s.status.value, "split_seq": s.split_seq}
