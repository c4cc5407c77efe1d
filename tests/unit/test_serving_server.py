"""The one error translation point, the client's decoding, the fake store, CLI helpers."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest

from headrace.api.v1 import features_pb2 as pb
from headrace.core.errors import InvalidArgument, OnlineStoreError, UsageError
from headrace.core.online_store import MemoryOnlineStore
from headrace.core.resp import pack_hmget
from headrace.core.timeparse import parse_time_ms
from serving.client import OnlineFeatures, build_request
from serving.metrics import ServingMetrics
from serving.server import ErrorInterceptor, status_of


class Aborted(Exception):
    pass


class FakeContext:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted


class Details:
    method = "/headrace.v1.FeatureService/GetOnlineFeatures"


def _handler(behavior: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(behavior)


def test_interceptor_maps_invalid_argument_and_caches_the_wrapper() -> None:
    def behavior(request: Any, context: Any) -> Any:
        raise InvalidArgument("ids[3]", "contains a brace, whitespace or a control character")

    metrics = ServingMetrics()
    interceptor = ErrorInterceptor(metrics)
    wrapped = interceptor.intercept_service(lambda d: _handler(behavior), Details())
    assert wrapped is not None
    ctx = FakeContext()
    with pytest.raises(Aborted):
        wrapped.unary_unary(object(), ctx)
    assert ctx.code is grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.details == "ids[3]: contains a brace, whitespace or a control character"
    assert interceptor.intercept_service(lambda d: None, Details()) is wrapped
    # a failed call is timed too, and counted by its status code
    assert metrics.value("headrace_serving_request_seconds_count",
                         method="GetOnlineFeatures") == 1
    assert metrics.value("headrace_serving_errors_total", method="GetOnlineFeatures",
                         code="INVALID_ARGUMENT") == 1


def test_interceptor_passes_answers_and_streams_through() -> None:
    metrics = ServingMetrics()
    interceptor = ErrorInterceptor(metrics)
    wrapped = interceptor.intercept_service(lambda d: _handler(lambda r, c: r * 2), Details())
    assert wrapped is not None and wrapped.unary_unary(21, FakeContext()) == 42
    assert wrapped.unary_unary(1, FakeContext()) == 2
    assert metrics.value("headrace_serving_request_seconds_count",
                         method="GetOnlineFeatures") == 2
    stream = grpc.stream_stream_rpc_method_handler(lambda it, c: it)

    class Other:
        method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

    assert interceptor.intercept_service(lambda d: stream, Other()) is stream


def test_status_of_our_errors() -> None:
    assert status_of(InvalidArgument("ids", "x")) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(OnlineStoreError("down")) is grpc.StatusCode.UNAVAILABLE
    assert status_of(UsageError("x")) is grpc.StatusCode.INTERNAL


def test_client_decodes_the_columnar_answer() -> None:
    resp = pb.GetOnlineFeaturesResponse(
        feature_names=["f", "g"], ids=["a", "b"], tiers=[pb.PERSONALIZED, pb.GLOBAL],
        values=[1.5, math.nan, 0.25, 3.0], is_null=[False, True, False, False],
        statuses=[pb.PRESENT, pb.PRESENT, pb.DEFAULT, pb.STALE], as_of_ms=7,
    )
    answer = OnlineFeatures.from_pb("user", resp)
    a, b = answer.entities
    assert a.values == {"f": 1.5, "g": None} and a.tier == "PERSONALIZED"
    assert b.values == {"f": 0.25, "g": 3.0} and b.statuses == {"f": "DEFAULT", "g": "STALE"}
    line = answer.to_json_lines()[1]
    assert line["entity"] == "user" and line["id"] == "b" and line["as_of"] == 7


def test_build_request() -> None:
    req = build_request("user", ["u1"], ["f"], as_of_ms=0, country="US", device_type="tv")
    assert req.WhichOneof("selection") == "feature_names" and req.HasField("as_of_ms")
    assert (req.context.country, req.context.device_type) == ("US", "tv")
    assert not build_request("user", ["u1"]).HasField("as_of_ms")
    with pytest.raises(ValueError):
        build_request("user", ["u1"], ["f"], feature_set="all")


def test_pack_hmget_is_resp() -> None:
    assert pack_hmget(["k{1}"], ["v@1", "w@1"]) == (
        b"*4\r\n$5\r\nHMGET\r\n$4\r\nk{1}\r\n$3\r\nv@1\r\n$3\r\nw@1\r\n"
    )
    assert pack_hmget(["é"], ["f"]).count(b"$2\r\n\xc3\xa9") == 1  # byte lengths


def test_fake_store_contract_basics() -> None:
    store = MemoryOnlineStore()
    store.hset("k1", "a", b"1")
    assert store.read_hashes(["k1", "k2"], ["a", "b"]) == [[b"1", None], [None, None]]
    assert store.get("nothing") is None
    store.fail = "down"
    with pytest.raises(OnlineStoreError):
        store.read_hashes(["k1"], ["a"])


@pytest.mark.parametrize(
    ("text", "ms"),
    [("1700000000000", 1_700_000_000_000), ("2023-11-14T22:13:20Z", 1_700_000_000_000),
     ("2023-11-14T22:13:20+00:00", 1_700_000_000_000), ("2023-11-14T22:13:20", 1_700_000_000_000),
     ("2023-11-14T23:13:20.5+01:00", 1_700_000_000_500)],
)
def test_parse_time_ms(text: str, ms: int) -> None:
    assert parse_time_ms(text) == ms


def test_parse_time_ms_rejects_garbage() -> None:
    with pytest.raises(UsageError):
        parse_time_ms("yesterday")


# ------------------------------------------------------------------ request decoding
def _decoding_handler(seen: list[Any]) -> grpc.RpcMethodHandler:
    def behavior(request: Any, context: Any) -> Any:
        seen.append(request)
        return pb.GetOnlineFeaturesResponse(ids=request.ids)

    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=pb.GetOnlineFeaturesRequest.FromString,
        response_serializer=pb.GetOnlineFeaturesResponse.SerializeToString)


def test_interceptor_decodes_the_request_itself() -> None:
    seen: list[Any] = []
    metrics = ServingMetrics()
    wrapped = ErrorInterceptor(metrics).intercept_service(lambda d: _decoding_handler(seen),
                                                          Details())
    assert wrapped is not None
    assert wrapped.request_deserializer is None  # gRPC hands over the raw bytes
    assert wrapped.response_serializer is pb.GetOnlineFeaturesResponse.SerializeToString
    raw = pb.GetOnlineFeaturesRequest(entity_type="user", ids=["u1", "é"]).SerializeToString()
    assert list(wrapped.unary_unary(raw, FakeContext()).ids) == ["u1", "é"]
    assert seen == [pb.GetOnlineFeaturesRequest.FromString(raw)]
    assert metrics.value("headrace_serving_request_seconds_count",
                         method="GetOnlineFeatures") == 1


@pytest.mark.parametrize(
    ("raw", "cause"),
    [
        (b"\x0a\x04user\x12\x02\xff\xfe", "UTF-8"),  # ids=[b"\xff\xfe"]: not UTF-8
        (b"\x0a\x04user\x12\x01\xc3", "UTF-8"),  # a truncated 2-byte sequence
        (b"garbage bytes!!", "corrupt"),
        (b"\xff\xff\xff\xff", "corrupt"),
    ],
)
def test_undecodable_request_is_invalid_argument(raw: bytes, cause: str) -> None:
    seen: list[Any] = []
    metrics = ServingMetrics()
    wrapped = ErrorInterceptor(metrics).intercept_service(lambda d: _decoding_handler(seen),
                                                          Details())
    assert wrapped is not None
    ctx = FakeContext()
    with pytest.raises(Aborted):
        wrapped.unary_unary(raw, ctx)
    assert ctx.code is grpc.StatusCode.INVALID_ARGUMENT
    assert ctx.details.startswith("request: cannot be decoded")
    assert "headrace.v1.GetOnlineFeaturesRequest" in ctx.details and cause in ctx.details
    assert seen == []  # the service never saw it
    assert metrics.value("headrace_serving_request_seconds_count",
                         method="GetOnlineFeatures") == 1
