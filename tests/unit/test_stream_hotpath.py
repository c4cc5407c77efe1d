"""Hot-path shortcuts of the stream worker keep their observable behaviour."""

from __future__ import annotations

import pyarrow as pa

from feature_defs.layout import partition_for
from headrace.core.online_store import RedisOnlineStore, StateWrite
from headrace.core.resp import PipelineConnections
from streams.sides import KafkaSideOutputs
from tests.resp_fakes import FakePool


def _log(pool: FakePool) -> list[tuple]:
    """(name, key[, ttl]) of every command the store sent."""
    out: list[tuple] = []
    for cmd in pool.commands():
        name, key = cmd[0].decode().lower(), cmd[1].decode()
        out.append((name, key, int(cmd[2])) if name == "expire" else (name, key))
    return out


def _store() -> tuple[RedisOnlineStore, FakePool]:
    st = RedisOnlineStore.__new__(RedisOnlineStore)
    pool = FakePool()
    st._pipelines, st._errors = PipelineConnections(pool), (OSError,)
    st._batch, st._expiry = 2000, {}
    return st, pool


def test_expire_issued_once_per_refresh_window() -> None:
    st, pool = _store()
    day = 86400
    w = [StateWrite("k1", "v1", b"x", day), StateWrite("k1", "v2", b"y", day),
         StateWrite("k2", "v1", b"z", day)]

    def sent_by(call: object) -> list[tuple]:
        before = len(_log(pool))
        call()  # type: ignore[operator]
        return _log(pool)[before:]

    log = sent_by(lambda: st.write(w, {}))
    assert [e for e in log if e[0] == "expire"] == [("expire", "k1", day), ("expire", "k2", day)]
    log = sent_by(lambda: st.write(w, {}))
    assert not [e for e in log if e[0] == "expire"]
    assert len([e for e in log if e[0] == "hset"]) == 3
    # a much longer TTL than the one set is applied at once; past the window, refreshed
    log = sent_by(lambda: st.write([StateWrite("k1", "v1", b"x", 30 * day)], {}))
    assert ("expire", "k1", 30 * day) in log
    st._expiry = {k: v - 1000 for k, v in st._expiry.items()}
    log = sent_by(lambda: st.write(w[2:], {}))
    assert ("expire", "k2", day) in log


def test_short_ttls_always_expire() -> None:
    st, pool = _store()
    st.write([StateWrite("k", "v", b"x", 60)], {})
    st.write([StateWrite("k", "v", b"x", 60)], {})
    assert [e for e in _log(pool) if e[0] == "expire"] == [("expire", "k", 60)] * 2
    assert pool.connects == 1 and not pool.sockets[0].pending  # every reply was read


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

    from headrace.core.errors import OfflineStoreError
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
