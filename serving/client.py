"""A small synchronous client of the feature server (FeatureService and ScoringService).

    with FeatureClient("127.0.0.1:50051") as client:
        answer = client.get("user", ["u1", "u2"], features=["user__ctr_24h"])
        answer.entities[0].values["user__ctr_24h"], answer.entities[0].statuses[...]
        ranked = client.score("u1", [{"ad_id": "a1", "campaign_id": "c1", "bid_cpm": 2.0}],
                              context={"country": "US", "device_type": "mobile"})
        ranked[0]["ad_id"], ranked[0]["p_ctr"], ranked[0]["ecpm"]

Errors: INVALID_ARGUMENT becomes :class:`~headrace.core.errors.InvalidArgument` (with the
field the server named); UNAUTHENTICATED (no or a wrong bearer token) becomes
:class:`Unauthenticated` (exit 2 in the CLI); an unreachable server, an expired deadline or
a failed TLS handshake becomes :class:`~headrace.core.errors.BackendError`.

A secured server (see README, "Security: the gRPC API")::

    FeatureClient("feat.internal:50051", tls_ca="ca.pem", token=SecretStr("..."))
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import SecretStr

from headrace.api.v1 import features_pb2 as pb
from headrace.api.v1 import features_pb2_grpc as pb_grpc
from headrace.api.v1 import scoring_pb2 as spb
from headrace.api.v1 import scoring_pb2_grpc as spb_grpc
from headrace.core.errors import BackendError, HeadraceError, InputError, InvalidArgument

__all__ = ["FeatureClient", "Unauthenticated", "EntityFeatures", "OnlineFeatures", "build_request",
           "build_score_request", "ranked_candidates", "CONTEXT_FIELDS"]

#: keys of a Score request's context (``ts_ms``: epoch milliseconds)
CONTEXT_FIELDS = ("country", "device_type", "placement", "creative_type", "publisher_id",
                  "ts_ms")
_CANDIDATE_FIELDS = ("ad_id", "campaign_id", "bid_cpm")


@dataclass(frozen=True)
class EntityFeatures:
    """One entity of an answer: values (None = null) and status names by feature."""

    id: str
    tier: str
    values: dict[str, float | None]
    statuses: dict[str, str]


@dataclass(frozen=True)
class OnlineFeatures:
    """A decoded answer."""

    entity_type: str
    feature_names: list[str]
    as_of_ms: int
    fallback_reason: str
    entities: list[EntityFeatures]

    @classmethod
    def from_pb(cls, entity_type: str, resp: pb.GetOnlineFeaturesResponse) -> OnlineFeatures:
        names = list(resp.feature_names)
        width = len(names)
        status_name = pb.FeatureStatus.Name
        tier_name = pb.ColdStartTier.Name
        entities = []
        for i, eid in enumerate(resp.ids):
            lo = i * width
            vals = resp.values[lo : lo + width]
            nulls = resp.is_null[lo : lo + width]
            sts = resp.statuses[lo : lo + width]
            row = zip(names, vals, nulls, strict=True)
            entities.append(
                EntityFeatures(
                    id=eid,
                    tier=tier_name(resp.tiers[i]),
                    values={n: None if z else v for n, v, z in row},
                    statuses={n: status_name(s) for n, s in zip(names, sts, strict=True)},
                )
            )
        return cls(entity_type, names, resp.as_of_ms,
                   pb.FallbackReason.Name(resp.fallback_reason), entities)

    def to_json_lines(self) -> list[dict[str, Any]]:
        """One JSON-ready object per entity."""
        return [
            {
                "entity": self.entity_type,
                "id": e.id,
                "as_of": self.as_of_ms,
                "tier": e.tier,
                "fallback_reason": self.fallback_reason,
                "features": e.values,
                "statuses": e.statuses,
            }
            for e in self.entities
        ]


def build_request(
    entity_type: str,
    ids: Sequence[str],
    features: Sequence[str] | None = None,
    feature_set: str | None = None,
    as_of_ms: int | None = None,
    country: str | None = None,
    device_type: str | None = None,
) -> pb.GetOnlineFeaturesRequest:
    """The request message (``features`` and ``feature_set`` are exclusive)."""
    if features is not None and feature_set is not None:
        raise ValueError("give features or feature_set, not both")
    req = pb.GetOnlineFeaturesRequest(entity_type=entity_type, ids=list(ids))
    if features is not None:
        req.feature_names.SetInParent()  # selected even when empty (the server rejects it)
        req.feature_names.names.extend(features)
    elif feature_set is not None:
        req.feature_set = feature_set
    if as_of_ms is not None:
        req.as_of_ms = as_of_ms
    if country or device_type:
        req.context.country = country or ""
        req.context.device_type = device_type or ""
    return req


class Unauthenticated(HeadraceError):
    """The server answered UNAUTHENTICATED: no bearer token, or one it does not accept
    (exit 2: a configuration problem, retrying cannot help)."""

    exit_code = 2


class FeatureClient:
    """Client of ``headrace.v1.FeatureService`` and ``headrace.v1.ScoringService``.

    Args:
        address: ``host:port``.
        timeout_s: deadline of each call in seconds.
        tls_ca: PEM file of the CA that signed the server's certificate; given, the
            channel uses TLS (``HEADRACE_GRPC_TLS_CA`` in the CLI). None: plaintext.
        token: bearer token sent as ``authorization: Bearer <token>`` with every call
            (``HEADRACE_GRPC_TOKEN`` in the CLI); None: none sent.
        tls_cert, tls_key: PEM client certificate and its key, presented to a server
            that requires mutual TLS (``HEADRACE_GRPC_TLS_CLIENT_CERT``/``_KEY`` in the
            CLI); they need ``tls_ca``.

    Raises:
        InputError: a TLS file cannot be read, a client certificate without its key or
            without ``tls_ca``, or a ``token`` that cannot travel in a header (not
            visible ASCII; the token is not shown).
    """

    def __init__(self, address: str, timeout_s: float = 1.0, *,
                 tls_ca: str | None = None, token: SecretStr | str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        if bool(tls_cert) != bool(tls_key):
            raise InputError("--tls-cert and --tls-key go together")
        if tls_cert and tls_ca is None:
            raise InputError("--tls-cert needs --tls-ca (a client certificate is sent over "
                             "TLS only)")
        if tls_ca is None:
            self._channel = grpc.insecure_channel(address)
        else:
            roots = _read_pem("--tls-ca", tls_ca)
            chain = _read_pem("--tls-cert", tls_cert) if tls_cert else None
            key = _read_pem("--tls-key", tls_key) if tls_key else None
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(
                root_certificates=roots, private_key=key, certificate_chain=chain))
        self._stub = pb_grpc.FeatureServiceStub(self._channel)
        call: Any = self._stub.GetOnlineFeatures
        score_call: Any = spb_grpc.ScoringServiceStub(self._channel).Score
        metadata = _auth_metadata(token)
        if metadata is not None:  # bound once: the raw calls carry it too
            call = functools.partial(call, metadata=metadata)
            score_call = functools.partial(score_call, metadata=metadata)
        self.call = call  # raw: request message -> response message
        self.score_call = score_call  # raw, likewise

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the channel is connected.

        Raises:
            BackendError: not connected within ``timeout_s``.
        """
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError as exc:
            raise BackendError(f"feature server at {self.address} not reachable") from exc

    def get_pb(
        self, request: pb.GetOnlineFeaturesRequest, timeout_s: float | None = None
    ) -> pb.GetOnlineFeaturesResponse:
        """Send a request message; errors translated (see the module docstring)."""
        try:
            return self.call(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address) from exc

    def get(
        self,
        entity_type: str,
        ids: Sequence[str],
        features: Sequence[str] | None = None,
        *,
        feature_set: str | None = None,
        as_of_ms: int | None = None,
        country: str | None = None,
        device_type: str | None = None,
        timeout_s: float | None = None,
    ) -> OnlineFeatures:
        """Online features of ``ids`` (see :func:`build_request` for the arguments)."""
        req = build_request(entity_type, ids, features, feature_set, as_of_ms, country,
                            device_type)
        return OnlineFeatures.from_pb(entity_type, self.get_pb(req, timeout_s))

    def score_pb(
        self, request: spb.ScoreRequest, timeout_s: float | None = None
    ) -> spb.ScoreResponse:
        """Send a Score request message; errors translated (see the module docstring)."""
        try:
            return self.score_call(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address) from exc

    def score(
        self,
        user_id: str | None,
        candidates: Sequence[Mapping[str, Any]],
        context: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> list[dict[str, Any]]:
        """Rank ``candidates`` for ``user_id`` (None/"" = anonymous) by eCPM, best first.

        Args:
            user_id: the viewer.
            candidates: mappings with ``ad_id``, ``campaign_id`` and ``bid_cpm``.
            context: any of :data:`CONTEXT_FIELDS`.

        Returns:
            One dict per candidate (see :func:`ranked_candidates`), sorted by eCPM.

        Raises:
            InvalidArgument: a bad field, named (found here or by the server).
            BackendError: the server is unreachable, or has no model (FAILED_PRECONDITION).
        """
        request = build_score_request(user_id, candidates, context)
        return ranked_candidates(request, self.score_pb(request, timeout_s))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_score_request(
    user_id: str | None,
    candidates: Sequence[Mapping[str, Any]],
    context: Mapping[str, Any] | None = None,
) -> spb.ScoreRequest:
    """The Score request message.

    Raises:
        InvalidArgument: an unknown key or a value of the wrong type (the field named as
            the server would: ``candidates[2].bid_cpm``, ``context.ts_ms``).
    """
    req = spb.ScoreRequest(user_id=user_id or "")
    for key, value in (context or {}).items():
        _set(req.context, key, value, f"context.{key}", CONTEXT_FIELDS)
    add = req.candidates.add
    for i, cand in enumerate(candidates):
        msg = add()
        for key, value in cand.items():
            _set(msg, key, value, f"candidates[{i}].{key}", _CANDIDATE_FIELDS)
    return req


def _set(msg: Any, key: str, value: Any, where: str, known: Sequence[str]) -> None:
    if key not in known:
        raise InvalidArgument(where, f"unknown field (known: {', '.join(known)})")
    if value is None:
        return
    try:
        setattr(msg, key, value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(where, f"bad value {value!r}: {exc}") from exc


def ranked_candidates(request: spb.ScoreRequest, resp: spb.ScoreResponse
                      ) -> list[dict[str, Any]]:
    """One dict per ranked candidate, best eCPM first: ``rank`` (1-based), ``index`` (in
    the request), ``ad_id``, ``campaign_id``, ``bid_cpm``, ``p_ctr``, ``ecpm``, ``tier``,
    ``model_version``, ``source`` and ``fallback_reason``."""
    cands = request.candidates
    tier_name = pb.ColdStartTier.Name
    version = resp.model_version
    source = spb.ScoreSource.Name(resp.source)
    reason = pb.FallbackReason.Name(resp.fallback_reason)
    out = []
    for k, (i, p, e, t) in enumerate(zip(resp.order, resp.p_ctr, resp.ecpm, resp.tiers,
                                         strict=True)):
        c = cands[i]
        out.append({"rank": k + 1, "index": i, "ad_id": c.ad_id, "campaign_id": c.campaign_id,
                    "bid_cpm": c.bid_cpm, "p_ctr": p, "ecpm": e, "tier": tier_name(t),
                    "model_version": version, "source": source, "fallback_reason": reason})
    return out


def _read_pem(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{option}: cannot read {path}: {exc.strerror or exc}") from exc


def _auth_metadata(token: SecretStr | str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata carrying ``token``, or None without one."""
    if token is None:
        return None
    text = token.get_secret_value() if isinstance(token, SecretStr) else token
    if not text or not all("!" <= c <= "~" for c in text):
        raise InputError("--token / HEADRACE_GRPC_TOKEN must be printable ASCII without "
                         "spaces (not shown: it is a secret)")
    return (("authorization", f"Bearer {text}"),)


def _translate(exc: grpc.RpcError, address: str) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(f"feature server at {address} answered UNAUTHENTICATED "
                               f"({details}); give an accepted token with --token or "
                               "HEADRACE_GRPC_TOKEN")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, message = (details or "").partition(": ")
        return InvalidArgument(field, message) if sep else InvalidArgument("request", details)
    name = code.name if code is not None else "UNKNOWN"
    return BackendError(f"feature server at {address}: {name}: {details}")
