"""``headrace labels`` and ``headrace training-set``: offline datasets from the offline store.

Both read ``HEADRACE_*`` settings (:class:`headrace.core.settings.OfflineSettings`): the store
root ``HEADRACE_OFFLINE_URI`` (``s3://bucket/prefix`` or a folder), ``HEADRACE_S3_*`` for
S3, and ``HEADRACE_PROGRESS`` for the progress bar on stderr; ``training-set`` joins the
views of ``HEADRACE_DEFINITIONS`` (or ``--definitions``). Labels come from the raw
impressions and clicks and carry every event key column, whatever the definitions.
Outputs (local paths or ``s3://`` URIs) appear atomically: after a failure nothing is left
at ``--out``. Bad input exits with status 2 and one sentence.

Both first compare the offline store with the worker's commit records in Redis
(``HEADRACE_REDIS_URL``, ``HEADRACE_REDIS_PREFIX``, the group ``--group`` or
``HEADRACE_GROUP_ID``; :mod:`offline.coverage`): a gap, unreadable records, or labels with
no positive although the range holds clicks exit 2 with one sentence; ``--allow-gaps``
proceeds instead, prints a WARNING per finding and records them in the output's Parquet
schema metadata (``headrace.coverage``).

``labels --ivt`` filters invalid traffic before labelling (:mod:`offline.ivt`, default
rules) and records the per-rule counts in the file's schema metadata (``headrace.ivt``);
it is off by default so that ``headrace labels`` keeps giving the raw join (the
TalkingData example checks its labels equal ``is_attributed`` row by row).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from feature_defs.coldstart import Priors
    from feature_defs.topology import Topology
    from headrace.core.online_store import OnlineStore
    from headrace.core.settings import OfflineSettings
    from offline.coverage import CoverageCheck

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``labels`` and ``training-set`` commands."""
    p = sub.add_parser(
        "labels", help="click labels of the impressions in a time range",
        description="One row per accepted impression with FROM <= ts < TO, labelled 1 when a "
                    "click on it has imp.ts <= click.ts <= imp.ts + ATTRIBUTION.")
    p.add_argument("--from", dest="start", required=True, metavar="T1",
                   help="first impression time, inclusive: epoch ms or ISO-8601 UTC")
    p.add_argument("--to", dest="end", required=True, metavar="T2",
                   help="end of the impression times, exclusive: epoch ms or ISO-8601 UTC")
    p.add_argument("--attribution", default="30m",
                   help="click attribution window after the impression (default 30m)")
    p.add_argument("--out", required=True, help="output Parquet file (path or s3:// URI)")
    p.add_argument("--ivt", action=argparse.BooleanOptionalAction, default=False,
                   help="filter invalid traffic first (offline.ivt default rules: clicks "
                        "under 1 s after their impression, clicks without impression, "
                        "repeated click ids, users with over 10 clicks a minute, users with "
                        "50+ impressions and CTR above 0.5); the counts go in the file's "
                        "metadata (headrace.ivt). Default off: labels stay the raw join")
    _coverage_flags(p)
    p.set_defaults(func=_labels)

    t = sub.add_parser(
        "training-set", help="labels joined with point-in-time features",
        description="Append to every label row the value of each feature as of the row's ts "
                    "(window rule and TTL exactly as served online), plus a "
                    "{view}__is_default mask per view. Rows keep their order and columns.")
    t.add_argument("--labels", required=True,
                   help="labels Parquet (path or s3:// URI) with ts and the entity key columns")
    t.add_argument("--features", default="all",
                   help="'all' or comma-separated feature names (default all)")
    t.add_argument("--out", required=True, help="output Parquet file (path or s3:// URI)")
    t.add_argument("--as-of-known", action="store_true",
                   help="also leave out events ingested after ts (_ingest_ms > ts)")
    t.add_argument("--cold-start", action="store_true",
                   help="fill values like the serving cold-start tiers (uses the row's "
                        "country and device_type columns for the segment)")
    t.add_argument("--priors", metavar="FILE",
                   help="priors JSON for --cold-start (default: computed from the 7 days "
                        "of events before the earliest label)")
    t.add_argument("--chunk-rows", type=int, default=None, metavar="N",
                   help="most label rows joined at once (default 2,000,000)")
    t.add_argument("--definitions", default=None, metavar="MODULE:ATTR",
                   help="feature definitions: module:ATTR or path/to/file.py:ATTR (default "
                        "HEADRACE_DEFINITIONS, else the shipped feature_defs.standard:VIEWS)")
    _coverage_flags(t)
    t.set_defaults(func=_training_set)


def _coverage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-gaps", action="store_true",
                   help="proceed when the offline store misses parts the commit records "
                        "vouch for (or they cannot be read): print a WARNING and record the "
                        "gaps in the output's metadata (headrace.coverage)")
    p.add_argument("--group", default=None,
                   help="the worker's consumer group whose commit records are compared "
                        "(default HEADRACE_GROUP_ID)")


def _settings() -> OfflineSettings:

    from headrace.core.settings import OfflineSettings

    return OfflineSettings.load()


def _online_store(settings: OfflineSettings) -> OnlineStore:
    """Where the commit records are read (short timeouts: a dead Redis fails fast)."""
    from headrace.core.online_store import RedisOnlineStore

    return RedisOnlineStore(settings.redis_config(), timeout_ms=5000.0, connect_timeout_ms=2000.0)


def _group(args: argparse.Namespace) -> str:

    from headrace.core.settings import WorkerSettings

    if args.group:
        return str(args.group)
    return WorkerSettings.load().group_id  # the worker's settings own HEADRACE_GROUP_ID


def _coverage(args: argparse.Namespace, settings: OfflineSettings, topology: Topology,
              online: OnlineStore) -> CoverageCheck:
    from offline.coverage import CoverageCheck

    command = args.command

    def warn(message: str) -> None:
        print(f"headrace {command}: WARNING: {message}", file=sys.stderr)

    return CoverageCheck(online=online, prefix=settings.redis_prefix, group=_group(args),
                         topic_prefix=settings.topic_prefix, partitions=settings.partitions,
                         sources=dict(topology.source_kinds), allow_gaps=args.allow_gaps,
                         warn=warn)


def _labels(args: argparse.Namespace) -> int:
    from feature_defs.registry import registry_for
    from headrace.core.timeparse import parse_duration, parse_time
    from offline.ivt import IvtRules
    from offline.labels import write_labels
    from offline.store import OfflineStore

    start, end = parse_time(args.start), parse_time(args.end)
    attribution = parse_duration(args.attribution)
    settings = _settings()
    online = _online_store(settings)
    try:
        check = _coverage(args, settings, registry_for(settings).topology, online)
        rows, positives = write_labels(OfflineStore.from_settings(settings), args.out, start,
                                       end, attribution, settings, coverage=check,
                                       ivt=IvtRules() if args.ivt else None)
    finally:
        online.close()
    print(f"wrote {rows} labels ({positives} clicked) to {args.out}")
    if args.ivt:
        _print_ivt(args.out, settings)
    return 0


def _print_ivt(uri: str, settings: OfflineSettings) -> None:
    """One line: what IVT filtering dropped, read back from the labels file."""
    import pyarrow.parquet as pq

    from offline.labels import ivt_report_of
    from offline.store import resolve_uri

    fs, path = resolve_uri(uri, settings)
    report = ivt_report_of(pq.read_schema(path, filesystem=fs))
    if report is None:
        return
    rules = ", ".join(f"{k} {v}" for k, v in report.to_dict()["counts"].items())
    print(f"IVT dropped {report.impressions_in - report.impressions_out} of "
          f"{report.impressions_in} impressions and {report.clicks_in - report.clicks_out} "
          f"of {report.clicks_in} clicks; events flagged per rule: {rules}")


def _training_set(args: argparse.Namespace) -> int:
    from feature_defs.registry import registry_for
    from headrace.core.errors import InputError
    from offline.training_set import DEFAULT_CHUNK_ROWS, write_training_set

    priors = None
    if args.priors:
        if not args.cold_start:
            raise InputError("--priors only applies with --cold-start")
        priors = _read_priors(args.priors)
    if args.chunk_rows is not None and args.chunk_rows < 1:
        raise InputError("--chunk-rows must be at least 1")
    settings = _settings()
    registry = registry_for(settings, args.definitions)
    online = _online_store(settings)
    try:
        rows = write_training_set(
            args.labels, args.out, args.features, settings, as_of_known=args.as_of_known,
            cold_start=args.cold_start, priors=priors, registry=registry,
            chunk_rows=args.chunk_rows or DEFAULT_CHUNK_ROWS,
            coverage=_coverage(args, settings, registry.topology, online))
    finally:
        online.close()
    print(f"wrote {rows} rows to {args.out}")
    return 0


def _read_priors(path: str) -> Priors:
    from feature_defs.coldstart import Priors
    from headrace.core.errors import InputError

    try:
        with open(path, encoding="utf-8") as fh:
            return Priors.from_json(fh.read())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the priors file {path}: {exc}") from exc
