"""Progressive rollout of a challenger model (issue 14): the shared formats and the pure
decision engine that ``serving/`` (the traffic split), the rollout controller and the
benchmarks all use.

Layer: imports :mod:`headrace.core` and :mod:`headrace.model` only (numpy allowed);
``serving/`` and the roof import it. Modules:

* :mod:`headrace.rollout.split` — the split state in Redis and the sticky assignment.
* :mod:`headrace.rollout.stats` — Beta-Binomial posteriors: P(better), lift, expected
  loss, per-segment checks.
* :mod:`headrace.rollout.policy` — the five phases, their durations and thresholds.
* :mod:`headrace.rollout.gates` — guardrails and phase-end gates: a pure function from
  per-arm counts (:class:`~headrace.rollout.gates.ArmStats`) to a decision.
* :mod:`headrace.rollout.controller` — the controller's pure step: state, counts and
  the clock in, the next state and the actions (split writes, registry moves, alerts)
  out; :mod:`headrace.rollout.runner` — the loop that reads and applies them, with
  :mod:`headrace.rollout.store` (its Redis keys and lock), :mod:`headrace.rollout.alerts`
  (webhook, metrics), :mod:`headrace.rollout.source` (where per-arm counts come from)
  and :mod:`headrace.rollout.settings`.
* :mod:`headrace.rollout.serving_counts` — the servers' per-arm counts (requests,
  errors, latency, pCTR range, publisher errors), summed in Redis by one atomic,
  idempotent Lua flush per poll, and their stats source.

The split state (one Redis string, JSON, at :func:`~headrace.rollout.split.split_key`
``f"{prefix}:rollout:split"``), written only by the controller::

    {"seq": 7,                 # strictly increasing per write
     "rollout_id": "r-…",      # salts the assignment hash (a new rollout reshuffles)
     "champion": "v3",         # informational; servers serve their CHAMPION file
     "challenger": "v4",       # null: 100 % champion
     "share": 0.03,            # challenger's share of traffic, 0 <= share <= 0.5
     "shadow": false,          # the challenger also scores the champion's requests
     "phase": 1,               # 0: none / shadow only, 1..5
     "updated_ms": 1764633600000}

Each server applies it within 1 s and acknowledges at
``f"{prefix}:rollout:ack:{server_id}"`` (JSON ``{"seq", "applied_ms", "share",
"challenger"}``, expiring after 10 s, refreshed at each poll), which is how the
controller knows when every live server serves 100 % champion after a rollback. A
server that cannot read Redis serves 100 % champion (never the challenger).

Assignment (sticky): the unit is the user id, the request id when anonymous;
``u = xxh64(f"{rollout_id}|{unit}") / 2**64``; challenger iff ``u < share``. A user in
the 3 % stays in at 10 % and beyond (monotone in the share).
"""
