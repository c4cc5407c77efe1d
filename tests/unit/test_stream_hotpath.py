"""Hot-path shortcuts of the stream worker keep their observable behaviour."""

from __future__ import annotations

import pyarrow as pa

from feature_defs.layout import partition_for
from streams.online import RedisOnlineStore, StateWrite
from streams.sides import KafkaSideOutputs


def _commands(buf: bytes) -> list[list[bytes]]:
    """Parse RESP arrays of bulk strings (what the store sends)."""
    out, i = [], 0
    while i < len(buf):
        assert buf[i : i + 1] == b"*"
        j = buf.index(b"\r\n", i)
        n, i = int(buf[i + 1 : j]), j + 2
        args = []
        for _ in range(n):
            assert buf[i : i + 1] == b"$"
            j = buf.index(b"\r\n", i)
            size, i = int(buf[i + 1 : j]), j + 2
            args.append(buf[i : i + size])
            assert buf[i + size : i + size + 2] == b"\r\n"
            i += size + 2
        out.append(args)
    return out


class _Conn:
    def __init__(self, log: list) -> None:
        self.log = log
        self.unread = 0

    def send_packed_command(self, chunks: list[bytes]) -> None:
        for cmd in _commands(b"".join(chunks)):
            name, key = cmd[0].decode().lower(), cmd[1].decode()
            self.log.append((name, key, int(cmd[2])) if name == "expire" else (name, key))
            self.unread += 1

    def read_response(self) -> int:
        assert self.unread > 0, "more replies read than commands sent"
        self.unread -= 1
        return 1

    def disconnect(self) -> None:
        pass


class _Pool:
    def __init__(self, log: list) -> None:
        self.conn = _Conn(log)

    def get_connection(self) -> _Conn:
        return self.conn

    def release(self, conn: _Conn) -> None:
        assert conn.unread == 0, "connection released with replies unread"


class _Client:
    def __init__(self) -> None:
        self.log: list = []
        self.connection_pool = _Pool(self.log)


def _store() -> RedisOnlineStore:
    st = RedisOnlineStore.__new__(RedisOnlineStore)
    st._client, st._batch, st._expiry = _Client(), 2000, {}
    return st


def test_expire_issued_once_per_refresh_window() -> None:
    st = _store()
    day = 86400
    w = [StateWrite("k1", "v1", b"x", day), StateWrite("k1", "v2", b"y", day),
         StateWrite("k2", "v1", b"z", day)]
    st.write(w, {})
    assert [e for e in st._client.log if e[0] == "expire"] == [
        ("expire", "k1", day), ("expire", "k2", day)]
    st._client.log.clear()
    st.write(w, {})
    assert not [e for e in st._client.log if e[0] == "expire"]
    assert len([e for e in st._client.log if e[0] == "hset"]) == 3
    # a much longer TTL than the one set is applied at once; past the window, refreshed
    st._client.log.clear()
    st.write([StateWrite("k1", "v1", b"x", 30 * day)], {})
    assert ("expire", "k1", 30 * day) in st._client.log
    st._expiry = {k: v - 1000 for k, v in st._expiry.items()}
    st._client.log.clear()
    st.write(w[2:], {})
    assert ("expire", "k2", day) in st._client.log


def test_short_ttls_always_expire() -> None:
    st = _store()
    st.write([StateWrite("k", "v", b"x", 60)], {})
    st.write([StateWrite("k", "v", b"x", 60)], {})
    assert [e for e in st._client.log if e[0] == "expire"] == [("expire", "k", 60)] * 2


def test_forward_partitions_like_partition_for() -> None:
    sides = KafkaSideOutputs.__new__(KafkaSideOutputs)
    sides._partitions, sides._topic = 5, lambda t: t
    sent: list = []
    sides._produce = lambda topic, value, headers=None, partition=None, key=None: sent.append(
        (partition, value))
    ids = [f"ad-{i % 37}" for i in range(500)]
    rows = pa.table({"entity_id": ids, "n": list(range(500))})
    sides.forward("ad", rows)
    seen = []
    for p, value in sent:
        got = pa.ipc.open_stream(value).read_all()
        assert all(partition_for(i, 5) == p for i in got["entity_id"].to_pylist())
        n = got["n"].to_pylist()
        assert n == sorted(n)  # arrival order kept within a partition
        seen.extend(n)
    assert sorted(seen) == list(range(500))
    assert len({p for p, _ in sent}) == len(sent)


def _events(n: int) -> pa.Table:
    day = 86_400_000
    return pa.table({
        "ts": pa.array([1_700_000_000_000 + (i % 5) * day for i in range(n)], pa.timestamp("ms")),
        "event_id": [f"e{i}" for i in range(n)],
        "_offset": list(range(n)),
    })


def test_offline_parts_parallel_equal_sequential(tmp_path) -> None:
    import os

    import pyarrow.parquet as pq

    from streams.offline_writer import OfflineWriter, resolve_filesystem

    out = {}
    for par in (1, 8):
        fs, root = resolve_filesystem(str(tmp_path / f"p{par}"), None)
        w = OfflineWriter(fs, root, parallel=par)
        written = w.write_part("impressions", "impression", "impressions", 2, 40, _events(300), [])
        assert written == 5
        files = sorted(os.path.relpath(os.path.join(d, f), root)
                       for d, _, fs_ in os.walk(root) for f in fs_)
        out[par] = {f: pq.read_table(os.path.join(root, f)).to_pylist() for f in files}
    assert out[1] == out[8] and len(out[8]) == 5


def test_offline_parallel_write_error_surfaces(tmp_path) -> None:
    import pytest

    from headrace.errors import OfflineStoreError
    from streams.offline_writer import OfflineWriter, resolve_filesystem

    fs, root = resolve_filesystem(str(tmp_path), None)
    w = OfflineWriter(fs, root)
    calls = []

    def boom(table, directory, name):
        calls.append(directory)
        if len(calls) == 3:
            raise OfflineStoreError("disk full")

    w._write = boom  # type: ignore[method-assign]
    with pytest.raises(OfflineStoreError):
        w.write_part("impressions", "impression", "impressions", 0, 0, _events(50), [])
    assert len(calls) == 5  # every file attempted before the error is raised
