"""``headrace evaluate-policy``: off-policy evaluation of a model's policy on the
prediction log (IPS, SNIPS, DR with 95 % intervals).

``headrace evaluate-policy --log FROM..TO --model V [--policy greedy|eps:E|logged]
[--clip M] [--attribution 30m] [--json]`` reads the prediction-log topic
(``{HEADRACE_TOPIC_PREFIX}headrace-predictions``) over ``[FROM, TO)`` and the clicks
topic (``{HEADRACE_TOPIC_PREFIX}clicks``) over ``[FROM, TO + attribution)`` with
confluent-kafka (:func:`headrace.commands.drift.read_range`: from
``offsets_for_times(FROM)`` in every partition, each partition read until its end or
its first message whose Kafka timestamp is at or after the range's end + ``--grace``,
60 s, the log's delivery delay). The served decisions of ``[FROM, TO)`` (record time
``ts``) are joined to model V's records of the same prediction ids (served or shadow)
and to the clicks of their shown ad (:mod:`offline.ope_policies`), and estimated by
:func:`offline.ope.evaluate`. Clicks are decoded by the stream worker's decoder
(any wire encoding); a click counts when it carries the decision's ``prediction_id``
and the shown ``ad_id`` and ``ts <= click ts <= ts + attribution``.

Output (``--json``): ``decisions``, ``coverage``, ``logged_ctr``, ``ips``/``snips``/``dr``
(each ``{value, ci_low, ci_high}``), ``ess``, ``clip``, ``ci_method``, ``policy``,
``model``, plus ``served``, ``skipped``, ``clicked``, ``support``, ``differs_share``,
``max_weight``, ``logged_policies``, ``attribution_ms``, ``from_ms``, ``to_ms``,
``undecodable``.

Exit 2 with one sentence, nothing written: an unparseable or empty range, an unknown
policy, a model with no record in the range, decisions without a logging propensity,
too little overlap between the target and the logger (``--min-support``), an ESS below
``--min-ess``, a topic that does not exist.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from typing import Any

from headrace.core.errors import InputError

__all__ = ["register", "handler", "parse_range", "read_clicks", "read_predictions",
           "evaluate_range"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate-policy", help="off-policy evaluation (IPS, SNIPS, DR) of a model's policy",
        description="Estimate the CTR a model's policy would have had on the decisions of "
        "the prediction log over [FROM, TO), from the logged propensities and the clicks "
        "(inverse propensity scoring, self-normalised IPS, doubly robust; 95 % intervals).")
    p.add_argument("--log", required=True, metavar="FROM..TO",
                   help="the decisions' range [FROM, TO): epoch ms or ISO-8601 with a zone")
    p.add_argument("--model", required=True, metavar="V",
                   help="the model version whose scores drive the target policy")
    p.add_argument("--policy", default="greedy", metavar="P",
                   help="greedy (V's first choice), eps:E (1-E greedy + E uniform) or "
                        "logged (the logging policy itself); default greedy")
    p.add_argument("--clip", type=float, default=None, metavar="M",
                   help="clip importance weights at M (default: none)")
    p.add_argument("--attribution", default="30m", metavar="DURATION",
                   help="click attribution window after the decision (default 30m)")
    p.add_argument("--min-ess", type=float, default=None, metavar="N",
                   help="refuse below this effective sample size (default 100)")
    p.add_argument("--min-support", type=float, default=None, metavar="S",
                   help="refuse when the log supports less than this share of the target's "
                        "probability mass (default 0.99)")
    p.add_argument("--grace", default="60s", metavar="DURATION",
                   help="read this long past each range's end in Kafka time (default 60s)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="give up when Kafka answers nothing for S seconds (default 30)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=handler)


def parse_range(text: str) -> tuple[int, int]:
    """``FROM..TO`` as epoch ms ``(from, to)``, ``from < to``.

    Raises:
        InputError: no ``..``, an unparseable time, or ``to <= from``.
    """
    from headrace.core.timeparse import parse_time

    start, sep, end = text.partition("..")
    if not sep or not start.strip() or not end.strip():
        raise InputError(f"--log expects FROM..TO, got '{text}'")
    t1, t2 = parse_time(start), parse_time(end)
    if t2 <= t1:
        raise InputError(f"the range {text} is empty: TO must be after FROM")
    return t1, t2


def _consumer_conf(settings: Any) -> dict[str, Any]:
    conf = settings.confluent_consumer(f"headrace-evaluate-policy.{time.time_ns()}")
    conf.pop("session.timeout.ms", None)  # assign only: no group is joined
    conf.pop("heartbeat.interval.ms", None)
    return dict(conf)


def read_predictions(settings: Any, from_ms: int, to_ms: int, grace_ms: int,
                     timeout_s: float) -> tuple[list[Any], int]:
    """Every decodable prediction record of the log's messages up to ``to_ms + grace``
    (Kafka time), and the count of undecodable ones."""
    from feature_defs.layout import TOPIC_PREDICTIONS
    from feature_defs.predictions import PredictionFormatError, decode_prediction
    from headrace.commands.drift import read_range

    records, undecodable = [], 0
    for values in read_range(_consumer_conf(settings), settings.topic(TOPIC_PREDICTIONS),
                             from_ms, to_ms + grace_ms, timeout_s):
        for v in values:
            try:
                records.append(decode_prediction(v or b""))
            except PredictionFormatError:
                undecodable += 1
    return records, undecodable


def read_clicks(settings: Any, from_ms: int, to_ms: int, timeout_s: float,
                ) -> dict[tuple[str, str], list[int]]:
    """Click times (epoch ms) per ``(prediction_id, ad_id)`` of the clicks topic's
    messages up to ``to_ms`` (Kafka time); clicks without a prediction id are left out,
    undecodable or invalid ones too (the worker dead-letters them)."""
    from feature_defs.layout import TOPIC_CLICKS
    from headrace.commands.drift import read_range
    from streams.codec import RawMessage, decode_batch

    topic = settings.topic(TOPIC_CLICKS)
    out: dict[tuple[str, str], list[int]] = {}

    def batches() -> Iterator[list[bytes | None]]:
        try:
            yield from read_range(_consumer_conf(settings), topic, from_ms, to_ms, timeout_s)
        except InputError as exc:
            raise InputError(f"the clicks topic {topic} does not exist (is the prefix "
                             "right?)") from exc

    for values in batches():
        table = decode_batch("click", [RawMessage(v) for v in values],
                             now_ms=max(time.time_ns() // 1_000_000, to_ms),
                             max_future_ms=365 * 86_400_000).table
        pids = table.column("prediction_id").to_pylist()
        ads = table.column("ad_id").to_pylist()
        ts = table.column("ts").cast("int64").to_pylist()
        for pid, ad, t in zip(pids, ads, ts, strict=True):
            if pid is not None:
                out.setdefault((pid, ad), []).append(int(t))
    return out


def evaluate_range(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """The report of ``headrace evaluate-policy`` (module docstring) as a dict.

    Raises:
        InputError: module docstring, "Exit 2".
    """
    from headrace.core.timeparse import parse_duration
    from offline.ope import DEFAULT_MIN_ESS, DEFAULT_MIN_SUPPORT, evaluate
    from offline.ope_policies import build_log, parse_policy

    t1, t2 = parse_range(args.log)
    policy = parse_policy(args.policy)
    attribution, grace = parse_duration(args.attribution), parse_duration(args.grace)
    if args.timeout <= 0:
        raise InputError("--timeout must be positive")
    min_ess = DEFAULT_MIN_ESS if args.min_ess is None else args.min_ess
    min_support = DEFAULT_MIN_SUPPORT if args.min_support is None else args.min_support
    if not 0.0 <= min_support <= 1.0:
        raise InputError(f"--min-support must be in [0, 1], got {min_support:g}")
    if min_ess < 0:
        raise InputError(f"--min-ess must be at least 0, got {min_ess:g}")
    if args.clip is not None and not args.clip > 0:
        raise InputError(f"--clip must be positive, got {args.clip:g}")
    version = str(args.model)
    span = f"[{args.log.partition('..')[0]}, {args.log.partition('..')[2]})"
    records, undecodable = read_predictions(settings, t1, t2, grace, args.timeout)
    log = build_log(records, version, policy, {}, from_ms=t1, to_ms=t2,
                    attribution_ms=attribution)
    if log.served == 0:
        raise InputError(f"the prediction log holds no served decision in {span}: the "
                         "range is empty")
    if log.model_records == 0:
        raise InputError(f"unknown model {version}: the prediction log holds no record of "
                         f"it (served or shadow) around {span}")
    if not len(log.log.rewards):
        raise InputError(f"none of the {log.served} decisions in {span} has a usable record "
                         f"of model {version} ({log.no_model_record} without one, "
                         f"{log.mismatched} scoring other ads)")
    clicks = read_clicks(settings, t1, t2 + attribution + grace, args.timeout)
    log = build_log(records, version, policy, clicks, from_ms=t1, to_ms=t2,
                    attribution_ms=attribution)
    rep = evaluate(log.log, clip=args.clip, min_ess=min_ess, min_support=min_support)

    def est(e: Any) -> dict[str, float]:
        return {"value": e.value, "ci_low": e.ci_low, "ci_high": e.ci_high}

    return {"model": version, "policy": policy.name, "decisions": rep.decisions,
            "served": log.served, "coverage": log.coverage,
            "skipped": {"no_model_record": log.no_model_record,
                        "mismatched": log.mismatched, "duplicates": log.duplicates},
            "clicked": log.clicked, "logged_ctr": rep.logged_ctr, "ips": est(rep.ips),
            "snips": est(rep.snips), "dr": est(rep.dr), "ess": rep.ess, "clip": rep.clip,
            "max_weight": rep.max_weight, "support": rep.support,
            "differs_share": rep.differs_share, "ci_method": rep.ci_method,
            "logged_policies": log.policies, "attribution_ms": attribution,
            "from_ms": t1, "to_ms": t2, "undecodable": undecodable}


def handler(args: argparse.Namespace) -> int:
    """Run ``headrace evaluate-policy`` (module docstring)."""

    from headrace.core.jsonsafe import json_safe
    from headrace.core.settings import CommonSettings

    settings = CommonSettings.load()
    report = evaluate_range(args, settings)
    if args.json:
        print(json.dumps(json_safe(report), allow_nan=False, sort_keys=True))
        return 0
    print(f"model {report['model']}, policy {report['policy']}: {report['decisions']} "
          f"decisions (coverage {report['coverage']:.1%}), logged CTR "
          f"{report['logged_ctr']:.5f}")
    for name in ("ips", "snips", "dr"):
        e = report[name]
        print(f"  {name:<6} {e['value']:.5f}  95% [{e['ci_low']:.5f}, {e['ci_high']:.5f}]")
    print(f"  ess {report['ess']:.1f}, support {report['support']:.1%}, clip "
          f"{report['clip']}, max weight {report['max_weight']:.3g}")
    print(f"  intervals: {report['ci_method']}")
    return 0
