"""The automated retraining pipeline (``headrace pipeline run|status|schedule``).

Layer "pipeline": imports :mod:`headrace.core`, :mod:`feature_defs`, :mod:`headrace.model`,
:mod:`headrace.rollout` and :mod:`offline`; the roof imports it. Modules:

* :mod:`headrace.pipeline.settings` — :class:`~headrace.pipeline.settings.PipelineSettings`.
* :mod:`headrace.pipeline.record` — the run records (``MODELS_DIR/pipeline/<run_id>/
  run.json``, rewritten atomically) and the one-run-at-a-time ``flock``.
* :mod:`headrace.pipeline.runner` — the step runner: resume after the last finished
  step, retries of transient failures, the early ends (invalid data, rejected model).
* :mod:`headrace.pipeline.steps` — the eight steps, labels to the rollout's start.
* :mod:`headrace.pipeline.launch` — starting a rollout, shared with ``rollout start``.
* :mod:`headrace.pipeline.trigger` — when ``schedule`` starts a run (pure) and the
  monitor's alerts stream; :mod:`headrace.pipeline.service` — :func:`run_once` and the
  scheduler loop; :mod:`headrace.pipeline.metrics` — the Prometheus metrics.
"""

from __future__ import annotations

__all__: list[str] = []
