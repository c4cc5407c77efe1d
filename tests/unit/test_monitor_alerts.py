"""AlertSink: the webhook POST (a local HTTP server), the stream entry's JSON, a Redis
failure keeping the entry pending until the next flush, and the read-back."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from headrace.monitor.alerts import AlertSink
from headrace.monitor.rules import Alert
from headrace.rollout.alerts import WebhookAlerter

ALERT = Alert("drift", "v1", "f1", 0.5, 0.25, "1h", 3_600_000, "PSI 0.5")


class FakeStream:
    """xadd / xrevrange of one Redis stream; fails the first ``failures`` xadds."""

    def __init__(self, failures: int = 0) -> None:
        self.entries: list[tuple[str, dict[str, Any], int, bool]] = []
        self.failures = failures

    def xadd(self, key: str, fields: dict[str, Any], maxlen: int, approximate: bool) -> str:
        if self.failures:
            self.failures -= 1
            raise RedisConnectionError("down")
        self.entries.append((key, fields, maxlen, approximate))
        return f"{len(self.entries)}-0"

    def xrevrange(self, key: str, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        return [(b"1-0", {b"alert": f["alert"].encode()}) for k, f, _, _ in
                reversed(self.entries) if k == key][:count] + [(b"0-1", {b"x": b"y"})]


def test_webhook_stream_and_retry() -> None:
    bodies: list[dict[str, Any]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.handle_request, daemon=True).start()
    redis = FakeStream(failures=1)
    counted: list[str] = []
    sink = AlertSink(redis, "hrx", WebhookAlerter(f"http://127.0.0.1:{server.server_port}/"),
                     on_alert=counted.append, clock=lambda: 12.5)
    sink.send([ALERT])
    server.server_close()
    assert counted == ["drift"] and len(bodies) == 1 and "f1" in bodies[0]["text"]
    assert redis.entries == [] and len(sink.pending) == 1  # Redis down: kept
    assert sink.flush()
    ((key, fields, maxlen, approx),) = redis.entries
    assert (key, maxlen, approx) == ("hrx:monitor:alerts", 10_000, True)
    assert json.loads(fields["alert"]) == {
        "at_ms": 12_500, "signal": "drift", "model_version": "v1", "feature": "f1",
        "value": 0.5, "threshold": 0.25, "window": "1h", "window_start_ms": 3_600_000,
        "detail": "PSI 0.5"}
    assert sink.already_sent() == [("drift", "v1", "f1", "1h", 3_600_000)]
