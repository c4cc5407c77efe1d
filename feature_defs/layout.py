"""Names shared by every runtime: topics, Redis keys and fields, offline paths, partitions.

Redis (online, overwrite): one hash per entity holding every view of that entity, so
all features of an entity are one round trip (HGETALL / HMGET)::

    key   {prefix}:{entity}:{<id>}        e.g.  hr:user:{u123}   (hash tag = the id,
                                                                   Redis-Cluster safe)
    field {view}@{version}                e.g.  user_activity@1
    value ViewState.encode() bytes        (tiles, latest event, replay fences)

Stream progress per consumer group and source partition (one hash each)::

    {prefix}:commit:{<group>}:{topic}:{partition}
        offline_next / offline_wm   first offset not yet durable offline, watermark there
        online_next  / online_wm    first offset whose side outputs are not yet published

Offline (append-only Parquet under HEADRACE_OFFLINE_URI)::

    events/{kind}/date=YYYY-MM-DD/{topic}-p{partition:03d}-{chunk:012d}.parquet
    views/{view}@{version}/date=YYYY-MM-DD/{topic}-p{partition:03d}-{chunk:012d}.parquet

``chunk`` is the first source offset a part covers. Parts have no fixed size: a part
ends where the worker's time or size trigger, or a pause in the input, cut it. A worker
that restarts resumes the partition at its recorded ``offline_next`` and writes its next
part under that offset's name, so a part written but not yet recorded is overwritten.
"""

from __future__ import annotations

import re

import xxhash

__all__ = [
    "TOPIC_IMPRESSIONS",
    "TOPIC_CLICKS",
    "TOPIC_DLQ",
    "TOPIC_LATE",
    "TOPIC_PREDICTIONS",
    "repartition_topic",
    "entity_key",
    "commit_key",
    "epoch_key",
    "priors_key",
    "partition_for",
    "entity_id_problem",
    "events_dir",
    "view_dir",
    "chunk_file",
    "MAX_ID_LEN",
]

TOPIC_IMPRESSIONS = "impressions"
TOPIC_CLICKS = "clicks"
TOPIC_DLQ = "headrace-dlq"
TOPIC_LATE = "headrace-late"
#: every Score answer and shadow prediction (:mod:`feature_defs.predictions`)
TOPIC_PREDICTIONS = "headrace-predictions"
MAX_ID_LEN = 256
_BAD_ID = re.compile(r"[{}\s\x00-\x1f\x7f]")


def repartition_topic(entity: str) -> str:
    """Internal topic carrying accepted events re-keyed by ``entity``."""
    return f"headrace-repartition-{entity}"


def entity_key(prefix: str, entity: str, entity_id: str) -> str:
    return f"{prefix}:{entity}:{{{entity_id}}}"


def commit_key(prefix: str, group: str, topic: str, partition: int) -> str:
    return f"{prefix}:commit:{{{group}}}:{topic}:{partition}"


def epoch_key(prefix: str, group: str) -> str:
    """The consumer group's epoch marker: a token the workers write when the group's
    progress starts (or is rebuilt) and check while they run; gone, Redis lost its data
    (:mod:`streams.progress_guard`)."""
    return f"{prefix}:epoch:{{{group}}}"


def priors_key(prefix: str) -> str:
    return f"{prefix}:priors"


def partition_for(key: str, partitions: int) -> int:
    """The partition of a routing key (xxh64 of its UTF-8 bytes, modulo the count)."""
    return xxhash.xxh64_intdigest(key.encode("utf-8")) % partitions


def entity_id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid entity id, or None when it is.

    Valid ids are non-empty strings of at most 256 characters without braces (they would
    break the Redis-Cluster hash tag), whitespace or control characters.
    """
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_LEN:
        return f"longer than {MAX_ID_LEN} characters"
    if _BAD_ID.search(value):
        return "contains a brace, whitespace or a control character"
    return None


def events_dir(root: str, kind: str) -> str:
    return f"{root.rstrip('/')}/events/{kind}"


def view_dir(root: str, view_id: str) -> str:
    return f"{root.rstrip('/')}/views/{view_id}"


def chunk_file(topic: str, partition: int, chunk: int, end: int | None = None) -> str:
    """The file name of a part of (``topic``, ``partition``) over offsets ``[chunk,
    end)``: ``{topic}-p{partition:03d}-{chunk:012d}-{end:012d}.parquet``. Without
    ``end``, the name earlier workers wrote (the first offset only), still read."""
    if end is None:
        return f"{topic}-p{partition:03d}-{chunk:012d}.parquet"
    return f"{topic}-p{partition:03d}-{chunk:012d}-{end:012d}.parquet"
