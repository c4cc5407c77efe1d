"""Redis URLs with passwords and TLS: parsing, redaction, the one-sentence auth error,
and the RESP AUTH handshake of the raw-socket fast path against a fake socket."""

from __future__ import annotations

import logging
import socket
import ssl
import threading

import hiredis
import pytest
import redis
from pydantic import SecretStr, ValidationError

from headrace.cli import build_parser
from headrace.core.errors import OnlineStoreAuthError, OnlineStoreError
from headrace.core.online_store import MemoryOnlineStore, RedisOnlineStore, RetryingOnlineStore
from headrace.core.redis_conn import RedisConfig, auth_error
from headrace.core.resp import ErrorReply
from headrace.core.retry import Backoff, Outage
from headrace.core.settings import ServeSettings, WorkerSettings

PASSWORD = "s3cr3t-Pa55"
URL = f"redis://alice:{PASSWORD}@127.0.0.1:6390/0"


def test_redis_url_is_redacted_everywhere() -> None:
    s = WorkerSettings.from_env({"HEADRACE_REDIS_URL": URL, "HEADRACE_S3_SECRET": PASSWORD})
    assert s.redis_url.get_secret_value() == URL
    for text in (repr(s), str(s), str(s.model_dump()), s.model_dump_json(),
                 repr(s.redis_config())):
        assert PASSWORD not in text
    assert s.redis_config().endpoint == "127.0.0.1:6390"


def test_legacy_password_and_tls_urls() -> None:
    legacy = RedisConfig.of(f"redis://:{PASSWORD}@redis:6379/1")
    assert legacy.endpoint == "redis:6379" and not legacy.tls
    assert legacy.redact(f"error for redis://:{PASSWORD}@redis") == \
        "error for redis://:**********@redis"
    tls = WorkerSettings.from_env({"HEADRACE_REDIS_URL": "rediss://:pw@h:6380/0",
                                   "HEADRACE_REDIS_TLS_CA": "/ca.pem"}).redis_config()
    assert tls.tls and tls.tls_ca == "/ca.pem" and tls.endpoint == "h:6380"


def test_tls_settings_reach_the_redis_py_pool() -> None:
    cfg = RedisConfig(SecretStr("rediss://:pw@127.0.0.1:6380/0"), "/ca.pem", "/c.pem", "/k.pem")
    pool = cfg.connection_pool(socket_timeout=1.0)
    assert issubclass(pool.connection_class, redis.SSLConnection)
    kw = pool.connection_kwargs
    assert (kw["ssl_ca_certs"], kw["ssl_certfile"], kw["ssl_keyfile"]) == (
        "/ca.pem", "/c.pem", "/k.pem")
    assert kw["password"] == "pw"
    plain = RedisConfig.of("redis://:pw@127.0.0.1:6380/0").connection_pool()
    assert not issubclass(plain.connection_class, redis.SSLConnection)


def test_bad_redis_settings_name_no_secret() -> None:
    for env in ({"HEADRACE_REDIS_URL": f"http://:{PASSWORD}@h"},
                {"HEADRACE_REDIS_URL": f"redis://:{PASSWORD}@h",
                 "HEADRACE_REDIS_TLS_CA": "/ca.pem"},
                {"HEADRACE_REDIS_URL": f"rediss://:{PASSWORD}@h",
                 "HEADRACE_REDIS_TLS_CERT": "/c.pem"}):
        with pytest.raises(ValidationError) as info:
            WorkerSettings.from_env(env)
        assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("exc", [
    redis.exceptions.AuthenticationError("invalid username-password pair"),
    ErrorReply("WRONGPASS invalid username-password pair or user is disabled."),
    ErrorReply("NOAUTH Authentication required."),
    redis.exceptions.ResponseError("NOAUTH Authentication required."),
])
def test_auth_failures_are_one_sentence(exc: Exception) -> None:
    err = auth_error(exc, "127.0.0.1:6390")
    assert isinstance(err, OnlineStoreAuthError)
    assert str(err) == "Redis authentication failed for 127.0.0.1:6390"
    assert err.exit_code == 2 and not err.transient


def test_tls_failure_is_one_sentence() -> None:
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "certificate verify failed")
        except OSError as inner:
            raise redis.exceptions.ConnectionError("Error 1 connecting") from inner
    except redis.exceptions.ConnectionError as exc:
        err = auth_error(exc, "h:6380")
    assert err is not None and str(err).startswith("Redis TLS handshake failed for h:6380")
    assert auth_error(redis.exceptions.ConnectionError("refused"), "h:1") is None


def test_store_errors_never_show_the_password() -> None:
    store = RedisOnlineStore(URL)
    try:
        err = store._error("redis error", redis.exceptions.ConnectionError(
            f"cannot reach {URL}"))
        assert PASSWORD not in str(err) and err.transient
        denied = store._error("redis error", redis.exceptions.AuthenticationError("x"))
        assert isinstance(denied, OnlineStoreAuthError)
    finally:
        store.close()


class _FakeRedis:
    """The far end of a socketpair speaking RESP: answers AUTH or HELLO ... AUTH (OK or
    ``auth_reply``),
    CLIENT/SELECT with +OK and HMGET with one bulk value per field."""

    def __init__(self, auth_reply: bytes = b"+OK\r\n") -> None:
        self.client_end, self._server = socket.socketpair()
        self.commands: list[list[bytes]] = []
        self._auth_reply = auth_reply
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        reader = hiredis.Reader()
        while True:
            try:
                data = self._server.recv(65536)
            except OSError:
                return
            if not data:
                return
            reader.feed(data)
            while (cmd := reader.gets()) is not False:
                self.commands.append(cmd)
                name = cmd[0].upper()
                if name == b"AUTH" or (name == b"HELLO" and b"AUTH" in cmd):
                    reply = self._auth_reply
                    if name == b"HELLO" and reply == b"+OK\r\n":  # a RESP3 map
                        reply = b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n"
                elif name == b"HMGET":
                    reply = b"*%d\r\n" % (len(cmd) - 2) + b"$1\r\nv\r\n" * (len(cmd) - 2)
                else:
                    reply = b"+OK\r\n"
                self._server.sendall(reply)

    def close(self) -> None:
        self._server.close()


def _store_on(fake: _FakeRedis, monkeypatch: pytest.MonkeyPatch) -> RedisOnlineStore:
    monkeypatch.setattr(redis.connection.Connection, "_connect",
                        lambda self: fake.client_end)
    return RedisOnlineStore(URL, timeout_ms=2000)


def test_raw_path_sends_auth_user_password(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRedis()
    store = _store_on(fake, monkeypatch)
    try:
        assert store.read_hashes(["k"], ["f"]) == [[b"v"]]
        first = fake.commands[0]  # AUTH user password, or HELLO 3 AUTH user password (RESP3)
        auth = first.index(b"AUTH")
        assert first[auth:] == [b"AUTH", b"alice", PASSWORD.encode()]
        assert fake.commands[-1] == [b"HMGET", b"k", b"f"]
    finally:
        store.close()
        fake.close()


def test_raw_path_wrong_password_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRedis(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    store = _store_on(fake, monkeypatch)
    try:
        with pytest.raises(OnlineStoreAuthError) as info:
            store.read_hashes(["k"], ["f"])
        assert str(info.value) == "Redis authentication failed for 127.0.0.1:6390"
    finally:
        store.close()
        fake.close()


def test_worker_store_retries_auth_errors_with_one_error_line(
        caplog: pytest.LogCaptureFixture) -> None:
    class Denying(MemoryOnlineStore):
        left = 3

        def get(self, key: str) -> bytes | None:
            if self.left:
                self.left -= 1
                raise OnlineStoreAuthError("Redis authentication failed for h:1")
            return b"ok"

    store = RetryingOnlineStore(Denying(), Outage("redis"), Backoff(initial_s=0.01, max_s=0.01),
                                sleep=lambda _s: None)
    with caplog.at_level(logging.WARNING):
        assert store.get("k") == b"ok"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "Redis authentication failed for h:1" in errors[0].getMessage()
    wrong = MemoryOnlineStore()
    wrong.set("x", b"a string")  # other errors that are not transient: raised at once
    with pytest.raises(OnlineStoreError, match="WRONGTYPE"):
        RetryingOnlineStore(wrong, Outage("redis")).read_hashes(["x"], ["f"])


def test_serve_binds_loopback_by_default() -> None:
    assert ServeSettings.from_env({}).host == "127.0.0.1"
    assert ServeSettings.from_env({"HEADRACE_HOST": "0.0.0.0"}).host == "0.0.0.0"
    args = build_parser().parse_args(["serve"])
    assert args.host is None  # falls back to settings.host
