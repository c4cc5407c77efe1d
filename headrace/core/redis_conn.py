"""Every Redis connection Headrace opens is built here, from one :class:`RedisConfig`.

The URL (``redis://[user]:password@host:port/db``, ``rediss://`` for TLS, or
``unix://``) is a secret: it is held as a :class:`~pydantic.SecretStr` and read with
``get_secret_value()`` only in :meth:`RedisConfig.connection_pool` and
:meth:`RedisConfig.client`. Both the redis-py clients and the raw-socket fast path
(:mod:`headrace.core.resp`, which reuses redis-py's connection handshake: TLS wrap,
``AUTH [user] password``, ``SELECT``) get their connections from these two methods, so
password and TLS settings apply everywhere.

:func:`auth_error` turns a refused password or a failed TLS handshake into one sentence
(``Redis authentication failed for 127.0.0.1:6390``); :meth:`RedisConfig.redact` removes
the password from any text (redis-py error messages may carry the URL).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from pydantic import SecretStr

from headrace.core.errors import OnlineStoreAuthError, missing_extra

__all__ = ["REDIS_SCHEMES", "RedisConfig", "auth_error", "client_endpoint"]

#: URL schemes redis-py accepts (``rediss``: TLS)
REDIS_SCHEMES = ("redis", "rediss", "unix")

# error texts of a refused AUTH or a command sent without one (redis 6/7, ACL and legacy)
_AUTH_MARKERS = ("WRONGPASS", "NOAUTH", "invalid password", "invalid username-password",
                 "Authentication required", "called without any password configured",
                 "Client sent AUTH, but no password is set", "Invalid Username or Password")

_REDACTED = "**********"


@dataclass(frozen=True)
class RedisConfig:
    """Where and how to connect to Redis.

    Attributes:
        url: the redis-py URL, a secret (it may hold the password).
        tls_ca: PEM file of the CA that signed the server's certificate (``rediss://``
            only); None: the system's trust store.
        tls_cert: PEM client certificate for mutual TLS (with ``tls_key``).
        tls_key: PEM private key of ``tls_cert``.
    """

    url: SecretStr
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def of(cls, target: RedisConfig | SecretStr | str) -> RedisConfig:
        """``target`` as a config (a plain URL: no TLS files)."""
        if isinstance(target, RedisConfig):
            return target
        return cls(target if isinstance(target, SecretStr) else SecretStr(target))

    @property
    def tls(self) -> bool:
        """True for a ``rediss://`` URL."""
        return urlsplit(self.url.get_secret_value()).scheme == "rediss"

    @property
    def endpoint(self) -> str:
        """``host:port`` (a socket path for ``unix://``): safe to print."""
        parts = urlsplit(self.url.get_secret_value())
        if parts.scheme == "unix":
            return parts.path
        try:
            port = parts.port or 6379
        except ValueError:
            port = 6379
        return f"{parts.hostname or 'localhost'}:{port}"

    def redact(self, text: str) -> str:
        """``text`` with the URL's password (raw and percent-encoded) replaced by stars."""
        password = urlsplit(self.url.get_secret_value()).password
        if not password:
            return text
        for form in {password, unquote(password), quote(unquote(password), safe="")}:
            if form:
                text = text.replace(form, _REDACTED)
        return text

    def _tls_kwargs(self) -> dict[str, Any]:
        if not self.tls:
            return {}
        kwargs: dict[str, Any] = {"ssl_cert_reqs": "required"}
        if self.tls_ca:
            kwargs["ssl_ca_certs"] = self.tls_ca
        if self.tls_cert:
            kwargs["ssl_certfile"] = self.tls_cert
        if self.tls_key:
            kwargs["ssl_keyfile"] = self.tls_key
        return kwargs

    def connection_pool(self, **kwargs: Any) -> Any:
        """A ``redis.ConnectionPool`` for this URL with the TLS settings; ``kwargs`` go to
        redis-py (timeouts, ``max_connections``, ``retry``)."""
        redis = _redis()
        return redis.ConnectionPool.from_url(self.url.get_secret_value(),
                                             **self._tls_kwargs(), **kwargs)

    def client(self, **kwargs: Any) -> Any:
        """A ``redis.Redis`` client for this URL with the TLS settings; ``kwargs`` go to
        redis-py (timeouts, ``retry``)."""
        redis = _redis()
        return redis.Redis.from_url(self.url.get_secret_value(), **self._tls_kwargs(),
                                    **kwargs)


def _redis() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - every deployable's extra has it
        raise missing_extra("redis", "serve") from exc
    return redis


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in out and len(out) < 8:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def auth_error(exc: BaseException, endpoint: str) -> OnlineStoreAuthError | None:
    """``exc`` as one sentence when it is a refused password or a failed TLS handshake
    (anywhere in its ``__cause__``/``__context__`` chain), else None.

    The sentence names ``endpoint`` (``host:port``) and never the password.
    """
    try:
        from redis.exceptions import AuthenticationError
    except ImportError:  # pragma: no cover - every deployable's extra has it
        AuthenticationError = ()  # type: ignore[assignment,misc]  # noqa: N806
    for err in _chain(exc):
        if isinstance(err, OnlineStoreAuthError):
            return err
        if isinstance(err, AuthenticationError) or any(m in str(err) for m in _AUTH_MARKERS):
            return OnlineStoreAuthError(f"Redis authentication failed for {endpoint}")
        if isinstance(err, ssl.SSLError):
            reason = (getattr(err, "verify_message", None) or getattr(err, "reason", None)
                      or type(err).__name__)
            return OnlineStoreAuthError(f"Redis TLS handshake failed for {endpoint} ({reason})")
    return None


def client_endpoint(client: Any) -> str:
    """``host:port`` of a redis-py client (for messages)."""
    kw = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    if "path" in kw:
        return str(kw["path"])
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
