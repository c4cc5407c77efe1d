"""The prediction log record, as data: what every ``Score`` answer (and every shadow
prediction) writes to the ``headrace-predictions`` topic, and its wire format.

One record per model per request: the served answer (``shadow`` false) and, in shadow
mode, the challenger's prediction of the same request (``shadow`` true, same
``prediction_id``). An ad server links its impression and click to the served record
by ``prediction_id`` (+ ``model_version``); the stream worker joins them per arm.

Wire format (one record per Kafka message)::

    byte 0      0x00                     magic (the Confluent wire format's)
    bytes 1-4   schema id, big-endian    :data:`SCHEMA_ID` (3 = :data:`PREDICTION_SCHEMA`;
                                         1 = :data:`PREDICTION_SCHEMA_1` and
                                         2 = :data:`PREDICTION_SCHEMA_2`, still read)
    bytes 5..   schemaless Avro body     of the schema with that id

Schema ids: 1, the first; 2 adds ``features`` (default ``[]``, so a record of id 1
reads with no features); 3 adds the exploration fields ``propensity`` (default null),
``explored`` (default false) and ``policy`` (default null), so a record of id 1 or 2
reads as "not logged" (null propensity and policy, not explored).

A new schema version gets a new id (added to :data:`SCHEMAS`, never edited) and keeps
old fields readable: :func:`decode_prediction` resolves an older writer schema against
the current one (Avro resolution: a field added later needs a default).

Candidates are columns in request order: candidate ``i`` is ``ad_ids[i]``,
``campaign_ids[i]``, ``p_ctr[i]`` and ``ranks[i]`` (its position in the model's
ranking, 0 = best eCPM). Columns, not an array of ``{ad_id, campaign_id, p_ctr, rank}``
records: fastavro encodes a 100-candidate record ~4x faster that way (measured ~0.1 ms
vs ~0.43 ms here), and the encoding runs in the serving process, beside the RPCs.
Building a record on the RPC path only stores references; encoding happens off it.

``features`` is the feature row the record's model scored for the candidate it ranked
first (``ranks`` 0), in the model's feature order (the booster's columns,
``LoadedModel.features``), NaN for a null value (an Avro double carries NaN): what the
drift monitor compares with the model's training profile. Empty when there is no such
row: an error record, or an answer of the cold-start model (the store could not answer,
so the booster's features were never laid out). On the RPC path it is the one row
taken from the matrix already scored (an array); it becomes a list only when encoded.

Exploration (:mod:`serving.exploration`): ``propensity`` is the probability, under the
serving policy, that the candidate the record's answer put first (rank 0 of the served
answer; for a shadow record the challenger's greedy choice) would have been put first
given this request and the model's scores, in (0, 1]; ``explored`` says the served
answer differs from the greedy one because of exploration; ``policy`` names the policy
version (``greedy``, ``eps-greedy:0.05``, ``thompson:v1``). Greedy answers (exploration
off) and shadow records log propensity 1.0 and policy ``greedy``; error records null.
``ranks`` stay the model's (greedy) ranking, so an explored served record's
``chosen_rank`` is the greedy rank of the candidate it showed first, not 0: the shown
candidate is ``ranks.index(chosen_rank)``.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import fastavro
import numpy as np

__all__ = ["Arm", "PredictionRecord", "PREDICTION_SCHEMA", "PREDICTION_SCHEMA_1",
           "PREDICTION_SCHEMA_2", "SCHEMA_ID", "SCHEMAS", "PredictionFormatError",
           "encode_prediction", "decode_prediction"]


class Arm(StrEnum):
    """Which side of the split served (or shadow-scored) a request."""

    CHAMPION = "CHAMPION"
    CHALLENGER = "CHALLENGER"


class PredictionFormatError(ValueError):
    """Bytes that are not a prediction record of a known schema."""


_OPT_STR: Final = ["null", "string"]

#: schema id 1 (``headrace.v1.Prediction``), never edited
PREDICTION_SCHEMA_1: Final[Mapping[str, Any]] = {
    "type": "record", "name": "Prediction", "namespace": "headrace.v1",
    "doc": "One model's prediction for one Score request (feature_defs/predictions.py)",
    "fields": [
        {"name": "prediction_id", "type": "string"},
        {"name": "ts", "type": "long", "doc": "request time, epoch ms UTC"},
        {"name": "user_id", "type": _OPT_STR, "default": None},
        {"name": "publisher_id", "type": _OPT_STR, "default": None},
        {"name": "country", "type": _OPT_STR, "default": None},
        {"name": "device_type", "type": _OPT_STR, "default": None},
        {"name": "placement", "type": _OPT_STR, "default": None},
        {"name": "creative_type", "type": _OPT_STR, "default": None},
        {"name": "ad_ids", "type": {"type": "array", "items": "string"}},
        {"name": "campaign_ids", "type": {"type": "array", "items": "string"}},
        {"name": "p_ctr", "type": {"type": "array", "items": "double"}},
        {"name": "ranks", "type": {"type": "array", "items": "int"},
         "doc": "per candidate, its position in this model's ranking (0 = best eCPM)"},
        {"name": "chosen_rank", "type": ["null", "int"], "default": None,
         "doc": "rank, in this model's ranking, of the candidate the answer put first "
                "(0 for the served record); null on error"},
        {"name": "arm", "type": {"type": "enum", "name": "Arm",
                                 "symbols": ["CHAMPION", "CHALLENGER"],
                                 "default": "CHAMPION"}},
        {"name": "model_version", "type": "string"},
        {"name": "shadow", "type": "boolean", "default": False},
        {"name": "latency_ms", "type": "float", "doc": "in the server, ms"},
        {"name": "error", "type": _OPT_STR, "default": None},
    ],
}
#: schema id 2: id 1 + ``features`` (see the module docstring), never edited
PREDICTION_SCHEMA_2: Final[Mapping[str, Any]] = {
    **PREDICTION_SCHEMA_1,
    "fields": [*PREDICTION_SCHEMA_1["fields"],
               {"name": "features", "type": {"type": "array", "items": "double"},
                "default": [],
                "doc": "the feature row (model feature order, NaN = null) of the "
                       "candidate this model ranked first; empty on error or cold start"}],
}
#: schema id 3, the current one: id 2 + ``propensity``, ``explored``, ``policy``
PREDICTION_SCHEMA: Final[Mapping[str, Any]] = {
    **PREDICTION_SCHEMA_2,
    "fields": [*PREDICTION_SCHEMA_2["fields"],
               {"name": "propensity", "type": ["null", "double"], "default": None,
                "doc": "probability, under the serving policy, that the candidate the "
                       "answer put first would be put first for this request and these "
                       "scores, in (0, 1]; 1.0 when greedy; null on error or before id 3"},
               {"name": "explored", "type": "boolean", "default": False,
                "doc": "the served answer differs from the greedy one because of "
                       "exploration"},
               {"name": "policy", "type": _OPT_STR, "default": None,
                "doc": "the serving policy's version: greedy, eps-greedy:0.05, "
                       "thompson:v1; null on error or before id 3"}],
}
SCHEMA_ID: Final = 3
_MAGIC: Final = 0
_HEADER = struct.Struct(">BI")
#: every schema id ever written (never edit one: add an id)
SCHEMAS: Final[Mapping[int, Any]] = {1: fastavro.parse_schema(dict(PREDICTION_SCHEMA_1)),
                                     2: fastavro.parse_schema(dict(PREDICTION_SCHEMA_2)),
                                     3: fastavro.parse_schema(dict(PREDICTION_SCHEMA))}
_CURRENT = SCHEMAS[SCHEMA_ID]


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """One prediction (see the module docstring).

    Attributes:
        prediction_id: the request id given, else the server's generated id.
        ts: request time (``context.ts_ms``, else the server clock), epoch ms UTC.
        user_id: None when anonymous. publisher_id: None when absent.
        country, device_type, placement, creative_type: the request context (None =
            unknown).
        ad_ids, campaign_ids, p_ctr, ranks: per candidate, request order.
        chosen_rank: this model's rank of the candidate the served answer put first (0
            for a greedy served record; an explored one's greedy rank); None on error.
        arm: the split arm of this prediction's model.
        model_version: the model that produced ``p_ctr``.
        shadow: a challenger's shadow prediction (not served).
        latency_ms: the prediction's time in the server, milliseconds.
        error: why it failed (``p_ctr`` then empty), or None.
        features: the model's feature row of its top-ranked candidate (model feature
            order, NaN = null); empty for an error or a cold-start answer, and for
            records of schema id 1.
        propensity: the serving policy's probability of putting this answer's first
            candidate first (see the module docstring); None on error and for records
            of schema ids 1 and 2.
        explored: the answer differs from the greedy one because of exploration.
        policy: the policy version (``greedy``, ``eps-greedy:0.05``, ``thompson:v1``);
            None on error and for records of schema ids 1 and 2.
    """

    prediction_id: str
    ts: int
    user_id: str | None
    publisher_id: str | None
    country: str | None
    device_type: str | None
    placement: str | None
    creative_type: str | None
    ad_ids: Sequence[str]
    campaign_ids: Sequence[str]
    p_ctr: Sequence[float] | np.ndarray
    ranks: Sequence[int] | np.ndarray
    chosen_rank: int | None
    arm: Arm
    model_version: str
    shadow: bool
    latency_ms: float
    error: str | None = None
    features: Sequence[float] | np.ndarray = ()
    propensity: float | None = None
    explored: bool = False
    policy: str | None = None

    def to_avro(self) -> dict[str, Any]:
        """The record as the Avro schema's dict.

        Raises:
            ValueError: the candidate columns differ in length (an error record may
                leave ``p_ctr`` and ``ranks`` empty).
        """
        p = self.p_ctr.tolist() if isinstance(self.p_ctr, np.ndarray) else list(self.p_ctr)
        r = self.ranks.tolist() if isinstance(self.ranks, np.ndarray) else list(self.ranks)
        n = len(self.ad_ids)
        scored = len(p) == len(r) == n or (self.error is not None and not p and not r)
        if len(self.campaign_ids) != n or not scored:
            raise ValueError(f"prediction {self.prediction_id}: candidate columns differ "
                             "in length")
        f = self.features
        features = f.tolist() if isinstance(f, np.ndarray) else [float(v) for v in f]
        return {"prediction_id": self.prediction_id, "ts": self.ts, "user_id": self.user_id,
                "publisher_id": self.publisher_id, "country": self.country,
                "device_type": self.device_type, "placement": self.placement,
                "creative_type": self.creative_type, "ad_ids": self.ad_ids,
                "campaign_ids": self.campaign_ids, "p_ctr": p, "ranks": r,
                "chosen_rank": self.chosen_rank, "arm": self.arm.value,
                "model_version": self.model_version, "shadow": self.shadow,
                "latency_ms": self.latency_ms, "error": self.error, "features": features,
                "propensity": None if self.propensity is None else float(self.propensity),
                "explored": bool(self.explored), "policy": self.policy}

    @classmethod
    def from_avro(cls, doc: Mapping[str, Any]) -> PredictionRecord:
        """The record of a decoded Avro dict (of the current schema)."""
        return cls(doc["prediction_id"], doc["ts"], doc["user_id"], doc["publisher_id"],
                   doc["country"], doc["device_type"], doc["placement"], doc["creative_type"],
                   tuple(doc["ad_ids"]), tuple(doc["campaign_ids"]), tuple(doc["p_ctr"]),
                   tuple(doc["ranks"]), doc["chosen_rank"], Arm(doc["arm"]),
                   doc["model_version"], doc["shadow"], doc["latency_ms"], doc["error"],
                   tuple(doc.get("features", ())), doc.get("propensity"),
                   bool(doc.get("explored", False)), doc.get("policy"))


def encode_prediction(record: PredictionRecord) -> bytes:
    """The record's message value: header (magic, :data:`SCHEMA_ID`) + Avro body.

    Raises:
        ValueError: a field does not fit the schema (candidate columns of different
            lengths, a wrong type).
    """
    buf = io.BytesIO()
    buf.write(_HEADER.pack(_MAGIC, SCHEMA_ID))
    fastavro.schemaless_writer(buf, _CURRENT, record.to_avro())
    return buf.getvalue()


def decode_prediction(value: bytes) -> PredictionRecord:
    """Decode a message value written by :func:`encode_prediction` (this or an earlier
    schema id: resolved to the current schema).

    Raises:
        PredictionFormatError: no header, an unknown schema id, or a malformed body.
    """
    if len(value) < _HEADER.size:
        raise PredictionFormatError(f"{len(value)} bytes: shorter than the header")
    magic, schema_id = _HEADER.unpack_from(value)
    if magic != _MAGIC:
        raise PredictionFormatError(f"magic byte {magic:#04x}, expected 0x00")
    writer = SCHEMAS.get(schema_id)
    if writer is None:
        raise PredictionFormatError(f"unknown schema id {schema_id} (known: "
                                    f"{', '.join(map(str, SCHEMAS))}); a newer writer?")
    buf = io.BytesIO(value)
    buf.seek(_HEADER.size)
    try:
        doc = fastavro.schemaless_reader(
            buf, writer, None if schema_id == SCHEMA_ID else _CURRENT)
    except (EOFError, ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise PredictionFormatError(f"malformed prediction body: {exc!r}") from exc
    if buf.tell() != len(value):
        raise PredictionFormatError(f"{len(value) - buf.tell()} trailing bytes")
    if not isinstance(doc, dict):
        raise PredictionFormatError("body is not a record")
    return PredictionRecord.from_avro(doc)
