"""A gRPC server in a child process for latency benchmarks, with an empty echo method.

Benchmarks measure client-observed latency over loopback with client and server in
separate processes; the echo method on the same server is the same-run RPC floor.
Run as ``python -m bench.server_child MEMO_ENTRIES`` (settings from ``HEADRACE_*``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ServerChild", "pct", "serve_child", "bench_main"]

_ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], q: float) -> float:
    """The q-quantile of durations in seconds, in milliseconds (3 decimals)."""
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 3)


def serve_child(memo_entries: int) -> None:
    """Run the server (settings from HEADRACE_*) plus an echo method until SIGTERM."""
    import gc

    import grpc

    from headrace.core.settings import ServeSettings
    from serving.server import build_server

    echo = grpc.method_handlers_generic_handler(
        "headrace.bench.Echo",
        {"Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"",
                                                     lambda b: b, lambda b: b)})
    server = build_server(ServeSettings(), port=0, host="127.0.0.1", extra_handlers=[echo],
                          memo_entries=memo_entries)
    server.start()
    gc.freeze()  # as `headrace serve` does
    print(json.dumps({"port": server.port}), flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(0)


class ServerChild:
    """The server child process plus this process's feature client and echo stub."""

    def __init__(self, env: dict[str, str], memo_entries: int, timeout_s: float = 1.0) -> None:
        import grpc

        from serving.client import FeatureClient

        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # sigwait
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.server_child", str(memo_entries)],
                cwd=_ROOT, env={**env, "PYTHONPATH": str(_ROOT)}, stdout=subprocess.PIPE,
                text=True)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("server child failed to start")
        address = f"127.0.0.1:{json.loads(line)['port']}"
        self.client = FeatureClient(address, timeout_s=timeout_s)
        self.client.wait_ready()
        self.channel = grpc.insecure_channel(address)
        self.echo = self.channel.unary_unary("/headrace.bench.Echo/Ping",
                                             request_serializer=lambda b: b,
                                             response_deserializer=lambda b: b)

    def stop(self) -> None:
        self.client.close()
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


def bench_main(run: Callable[..., dict[str, Any]], argv: list[str] | None = None) -> None:
    """``python -m bench.NAME key=value …``: run a benchmark and print its JSON."""
    argv = sys.argv[1:] if argv is None else argv
    kwargs: dict[str, Any] = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        kwargs[key] = float(value) if "." in value else int(value)
    print(json.dumps(run(**kwargs), indent=2))


if __name__ == "__main__":
    serve_child(int(sys.argv[1]) if len(sys.argv) > 1 else 8192)
