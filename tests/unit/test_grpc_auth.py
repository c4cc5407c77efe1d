"""The bearer-token interceptor and the gRPC security settings (no network)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import grpc
import pytest
from prometheus_client import generate_latest
from pydantic import SecretStr

from headrace.core.errors import InputError
from headrace.core.settings import ServeSettings
from serving.auth import AUTH_REASONS, TokenInterceptor, server_credentials
from serving.client import FeatureClient, Unauthenticated, _translate
from serving.metrics import ServingMetrics

TOKENS = ("old-token-1A", "new-token-2B")
SCORE = "/headrace.v1.ScoringService/Score"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


class Details(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class Aborted(Exception):
    """What the fake context raises on abort."""


class Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted


def _ok(request: Any, context: Any) -> str:
    return "answered"


def continuation(kind: str = "unary") -> Callable[[Any], grpc.RpcMethodHandler]:
    def cont(details: Any) -> grpc.RpcMethodHandler:
        if kind == "stream":
            return grpc.stream_stream_rpc_method_handler(_ok)
        return grpc.unary_unary_rpc_method_handler(_ok)
    return cont


def call(icpt: TokenInterceptor, metadata: tuple[tuple[str, str], ...], method: str = SCORE,
         kind: str = "unary") -> tuple[str | None, Context]:
    handler = icpt.intercept_service(continuation(kind), Details(method, metadata))
    assert handler is not None
    ctx = Context()
    behavior = handler.unary_unary if kind == "unary" else handler.stream_stream
    assert behavior is not None
    try:
        return behavior(b"request", ctx), ctx
    except Aborted:
        return None, ctx


@pytest.fixture
def metrics() -> ServingMetrics:
    return ServingMetrics()


@pytest.fixture
def icpt(metrics: ServingMetrics) -> TokenInterceptor:
    return TokenInterceptor(TOKENS, metrics)


def failures(m: ServingMetrics) -> dict[str, float]:
    return {r: m.value("headrace_serving_auth_failures_total", reason=r) for r in AUTH_REASONS}


@pytest.mark.parametrize("token", TOKENS)
def test_each_listed_token_is_accepted(icpt: TokenInterceptor, metrics: ServingMetrics,
                                       token: str) -> None:
    out, ctx = call(icpt, (("user-agent", "x"), ("authorization", f"Bearer {token}")))
    assert out == "answered" and ctx.code is None
    assert failures(metrics) == dict.fromkeys(AUTH_REASONS, 0.0)


def test_scheme_is_case_insensitive(icpt: TokenInterceptor) -> None:
    assert call(icpt, (("authorization", f"bearer {TOKENS[0]}"),))[0] == "answered"


@pytest.mark.parametrize(("metadata", "reason"), [
    ((), "missing"),
    ((("x-other", "Bearer old-token-1A"),), "missing"),
    ((("authorization", "old-token-1A"),), "malformed"),
    ((("authorization", "Basic b2xkOnRva2Vu"),), "malformed"),
    ((("authorization", "Bearer "),), "malformed"),
    ((("authorization", "Bearer old-token-1"),), "wrong"),
    ((("authorization", "Bearer old-token-1A "),), "wrong"),
    ((("authorization", "Bearer nope"),), "wrong"),
])
def test_refusals_are_unauthenticated_and_counted_by_reason(
        icpt: TokenInterceptor, metrics: ServingMetrics,
        metadata: tuple[tuple[str, str], ...], reason: str) -> None:
    out, ctx = call(icpt, metadata)
    assert out is None and ctx.code == grpc.StatusCode.UNAUTHENTICATED
    assert not any(t in ctx.details for t in TOKENS)
    want = dict.fromkeys(AUTH_REASONS, 0.0)
    want[reason] = 1.0
    assert failures(metrics) == want
    call(icpt, metadata)  # the cached refusal counts too
    assert failures(metrics)[reason] == 2.0


def test_health_is_exempt_and_reflection_is_not(icpt: TokenInterceptor,
                                                metrics: ServingMetrics) -> None:
    assert call(icpt, (), "/grpc.health.v1.Health/Check")[0] == "answered"
    out, ctx = call(icpt, (), REFLECTION, kind="stream")
    assert out is None and ctx.code == grpc.StatusCode.UNAUTHENTICATED
    assert failures(metrics)["missing"] == 1.0
    out, _ = call(icpt, (("authorization", f"Bearer {TOKENS[1]}"),), REFLECTION, "stream")
    assert out == "answered"


def test_unknown_method_stays_unimplemented(icpt: TokenInterceptor) -> None:
    assert icpt.intercept_service(lambda d: None, Details("/x.Y/Z", ())) is None


def test_metrics_never_carry_a_token(icpt: TokenInterceptor, metrics: ServingMetrics) -> None:
    for value in ("Bearer old-token-1", "Bearer wrong-token-xyz", "old-token-1A"):
        call(icpt, (("authorization", value),))
    text = generate_latest(metrics.registry).decode()
    assert "headrace_serving_auth_failures_total" in text
    for secret in (*TOKENS, "old-token-1", "wrong-token-xyz"):
        assert secret not in text


def test_no_tokens_is_not_this_interceptor() -> None:
    with pytest.raises(ValueError, match="at least one"):
        TokenInterceptor(())


def test_token_settings_parse_and_stay_secret() -> None:
    s = ServeSettings.from_env({"HEADRACE_GRPC_TOKENS": f" {TOKENS[0]}, ,{TOKENS[1]},",
                                "HEADRACE_GRPC_TOKEN": TOKENS[0],
                                "HEADRACE_GRPC_TLS_CA": "/etc/ca.pem"})
    assert s.grpc_token_list() == TOKENS
    assert isinstance(s.grpc_tokens, SecretStr) and isinstance(s.grpc_token, SecretStr)
    assert s.grpc_tls_ca == "/etc/ca.pem"
    for shown in (repr(s), str(s), s.model_dump_json()):
        assert not any(t in shown for t in TOKENS)


def test_unset_or_empty_tokens_mean_no_check() -> None:
    assert ServeSettings.from_env({}).grpc_token_list() == ()
    empty = ServeSettings.from_env({"HEADRACE_GRPC_TOKENS": "", "HEADRACE_GRPC_TOKEN": "",
                                    "HEADRACE_GRPC_TLS_CERT": "", "HEADRACE_GRPC_TLS_KEY": ""})
    assert empty.grpc_tokens is None and empty.grpc_token is None
    assert empty.grpc_tls_cert is None and server_credentials(empty) is None


@pytest.mark.parametrize("value", [" , ", "good,bad token", "tab\there"])
def test_malformed_token_lists_name_no_token(value: str) -> None:
    s = ServeSettings.from_env({"HEADRACE_GRPC_TOKENS": value})
    with pytest.raises(InputError, match="HEADRACE_GRPC_TOKENS") as info:
        s.grpc_token_list()
    assert "bad" not in str(info.value) and "here" not in str(info.value)


@pytest.mark.parametrize(("env", "match"), [
    ({"HEADRACE_GRPC_TLS_CERT": "c.pem"}, "go together"),
    ({"HEADRACE_GRPC_TLS_KEY": "k.pem"}, "go together"),
    ({"HEADRACE_GRPC_TLS_CLIENT_CA": "ca.pem"}, "needs"),
    ({"HEADRACE_GRPC_TLS_CERT": "/nonexistent/c.pem", "HEADRACE_GRPC_TLS_KEY": "k.pem"},
     "HEADRACE_GRPC_TLS_KEY: cannot read"),
])
def test_incomplete_or_unreadable_tls_settings(env: dict[str, str], match: str) -> None:
    with pytest.raises(InputError, match=match):
        server_credentials(ServeSettings.from_env(env))


class RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_client_maps_unauthenticated_to_exit_2() -> None:
    err = _translate(RpcError(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not "
                                                               "accepted"), "h:1")
    assert isinstance(err, Unauthenticated) and err.exit_code == 2
    assert "UNAUTHENTICATED" in str(err) and str(err).count(". ") == 0


def test_client_checks_token_and_ca(tmp_path: Any) -> None:
    with pytest.raises(InputError, match="printable ASCII") as info:
        FeatureClient("127.0.0.1:1", token=SecretStr("has space"))
    assert "space" not in str(info.value).split("without")[0]
    with pytest.raises(InputError, match="--tls-ca: cannot read"):
        FeatureClient("127.0.0.1:1", tls_ca=str(tmp_path / "none.pem"))
    with FeatureClient("127.0.0.1:1", token="ok-token") as client:
        assert client.call.keywords == {"metadata": (("authorization", "Bearer ok-token"),)}
