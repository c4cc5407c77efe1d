"""Who may call the gRPC API: bearer tokens (:class:`TokenInterceptor`) and TLS
(:func:`server_credentials`).

With ``HEADRACE_GRPC_TOKENS`` set, every RPC except the health service
(``grpc.health.v1.Health``: load balancers and orchestrators probe it without secrets)
must carry ``authorization: Bearer <token>`` metadata naming one of the listed tokens.
Reflection follows the same rule as the services. A refusal answers ``UNAUTHENTICATED``
and counts in ``headrace_serving_auth_failures_total`` by reason (``missing``,
``malformed``, ``wrong``), never by token; no token is ever logged.

The check runs once per call before the handler, on the metadata gRPC has already
parsed: one scan of a few header tuples and one :func:`hmac.compare_digest` per accepted
token (a few microseconds against a Score p99 of milliseconds).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from headrace.core.errors import InputError
from headrace.core.settings import ServeSettings
from serving.metrics import ServingMetrics

__all__ = ["TokenInterceptor", "server_credentials", "AUTH_REASONS", "EXEMPT_PREFIXES"]

#: the ``reason`` label values of ``headrace_serving_auth_failures_total``
AUTH_REASONS = ("missing", "malformed", "wrong")
#: method-name prefixes answered without a token (the health service)
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)

_Continuation = Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None]
_MESSAGES = {
    "missing": "missing bearer token: send metadata 'authorization: Bearer <token>'",
    "malformed": "malformed authorization metadata: expected 'Bearer <token>'",
    "wrong": "the bearer token is not accepted",
}


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without an accepted bearer token (``UNAUTHENTICATED``).

    Put it first among the server's interceptors, so a refused call never reaches
    the others (nor is decoded or timed).

    Args:
        tokens: the accepted tokens (rotation: old and new at once); non-empty.
        metrics: the server's metrics (``auth_failures``; default: a new
            :class:`ServingMetrics` of its own).
        exempt: method-name prefixes that need no token (default: the health service).

    Raises:
        ValueError: ``tokens`` is empty (no check is "no interceptor", not this one).
    """

    def __init__(self, tokens: Sequence[str], metrics: ServingMetrics | None = None, *,
                 exempt: Sequence[str] = EXEMPT_PREFIXES) -> None:
        if not tokens:
            raise ValueError("TokenInterceptor needs at least one token")
        # the whole header value is compared, so no slicing or copy per call
        self._accepted = tuple(f"Bearer {t}".encode() for t in tokens)
        self._exempt = tuple(exempt)
        counter = (ServingMetrics() if metrics is None else metrics).auth_failures
        self._count = {r: counter.labels(reason=r).inc for r in AUTH_REASONS}
        self._denied: dict[tuple[str, str], grpc.RpcMethodHandler] = {}

    def reason(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """Why ``metadata`` is refused: ``missing``, ``malformed``, ``wrong``; None: accepted.

        Args:
            metadata: the call's invocation metadata (key, value) pairs.
        """
        value: str | bytes | None = None
        for key, v in metadata or ():
            if key == "authorization":  # gRPC lower-cases metadata keys
                value = v
                break
        if value is None:
            return "missing"
        raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
        if raw[:7].lower() != b"bearer " or len(raw) <= 7:
            return "malformed"
        raw = b"Bearer " + raw[7:] if raw[:7] != b"Bearer " else raw
        ok = False
        for accepted in self._accepted:  # every token compared: timing names none
            ok |= hmac.compare_digest(raw, accepted)
        return None if ok else "wrong"

    def intercept_service(self, continuation: _Continuation,
                          handler_call_details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(self._exempt):
            return continuation(handler_call_details)
        why = self.reason(handler_call_details.invocation_metadata)
        if why is None:
            return continuation(handler_call_details)
        self._count[why]()
        return self._deny(method, why, continuation, handler_call_details)

    def _deny(self, method: str, why: str, continuation: _Continuation,
              details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        cached = self._denied.get((method, why))
        if cached is not None:
            return cached
        handler = continuation(details)  # only for the method's kind (unary, streaming)
        if handler is None:
            return None  # UNIMPLEMENTED, as without tokens
        denied = _refusing(handler, _MESSAGES[why])
        self._denied[(method, why)] = denied
        return denied


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that aborts every call with UNAUTHENTICATED,
    without decoding the request."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc


def server_credentials(settings: ServeSettings) -> grpc.ServerCredentials | None:
    """The server's TLS credentials from ``grpc_tls_cert``/``grpc_tls_key`` (and
    ``grpc_tls_client_ca`` for mutual TLS), or None for plaintext (neither set).

    Raises:
        InputError: only one of cert and key given, a client CA without them, or a
            file that cannot be read (named).
    """
    cert, key, client_ca = settings.grpc_tls_cert, settings.grpc_tls_key, \
        settings.grpc_tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise InputError("HEADRACE_GRPC_TLS_CLIENT_CA (mutual TLS) needs "
                             "HEADRACE_GRPC_TLS_CERT and HEADRACE_GRPC_TLS_KEY")
        return None
    if cert is None or key is None:
        raise InputError("HEADRACE_GRPC_TLS_CERT and HEADRACE_GRPC_TLS_KEY go together "
                         "(both for TLS, neither for plaintext)")
    pair = [(_read(key, "HEADRACE_GRPC_TLS_KEY"), _read(cert, "HEADRACE_GRPC_TLS_CERT"))]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=_read(client_ca, "HEADRACE_GRPC_TLS_CLIENT_CA"),
        require_client_auth=True)
