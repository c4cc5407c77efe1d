"""Benchmark: point-in-time training set vs a DuckDB ``ASOF LEFT JOIN`` reference.

Generates, in a temporary folder, the offline layout of ``updates`` applied rows of the
``user_activity`` view (``users`` users over ``days`` days, impressions and clicks) and
``rows`` label rows (mostly impressions of known users, ~5% of users without data).

* ``seconds``: :func:`offline.training_set.build_training_set` for every user feature,
  labels in memory, features read from the offline Parquet store.
* ``reference_seconds``: DuckDB ``ASOF LEFT JOIN`` of the same in-memory labels against
  a pre-materialized Parquet table holding, per user and update time, the rolled-up
  user features (what a naive feature log would store). Building that table is not timed.

Each side runs in its own subprocess, so ``peak_rss_mb`` (its ``VmHWM``) is its own;
each is run ``repeat`` times and the best wall time (and, separately, the best process
CPU time: all threads, useful on a shared machine) kept.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["run", "generate", "main"]

_DAY = 86_400_000
_T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
_CHUNK = 200_000
_PARTITIONS = 4


def _ids(prefix: str, n: int) -> pa.Array:
    return pa.array([f"{prefix}{i:07d}" for i in range(n)], pa.string())


def generate(root: str, *, rows: int, users: int, updates: int, days: int, seed: int) -> str:
    """Write the view rows under ``root/store`` and labels to ``root/labels.parquet``."""
    rng = np.random.default_rng(seed)
    weight = rng.lognormal(0.0, 1.0, users)
    user = rng.choice(users, updates, p=weight / weight.sum())
    ts = np.sort(_T0 + rng.integers(0, days * _DAY, updates))
    ctr = np.clip(rng.beta(2, 60, users), 0, 0.5)
    is_click = rng.random(updates) < ctr[user]
    ad = np.minimum(rng.zipf(1.3, updates), 20_000) - 1
    user_ids, ad_ids = _ids("u", users), _ids("a", 20_000)
    part = rng.integers(0, _PARTITIONS, updates)
    source = np.where(is_click, 1, 0)
    offset = np.zeros(updates, np.int64)
    for s in (0, 1):
        for p in range(_PARTITIONS):
            sel = np.flatnonzero((source == s) & (part == p))
            offset[sel] = np.arange(len(sel))
    table = pa.table({
        "entity_id": user_ids.take(pa.array(user)),
        "ts": pa.array(ts).cast(pa.timestamp("ms", tz="UTC")),
        "source": pa.array(np.where(is_click, "clicks", "impressions")),
        "ad_id": ad_ids.take(pa.array(ad)),
        "event_id": pa.array(np.char.add("e", np.arange(updates).astype(str))),
        "_partition": pa.array(part, pa.int32()),
        "_offset": pa.array(offset),
        "_index": pa.array(np.zeros(updates, np.int32)),
        "_ingest_ms": pa.array(ts + rng.integers(5, 2000, updates)),
    })
    day = (ts - _T0) // _DAY
    chunk = offset // _CHUNK
    order = np.lexsort((chunk, part, source, day))
    group = np.stack([day, source, part, chunk])[:, order]
    cuts = np.flatnonzero(np.any(group[:, 1:] != group[:, :-1], axis=0)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, updates], strict=True):
        d, s, p, c = group[:, lo]
        date = time.strftime("%Y-%m-%d", time.gmtime((_T0 + d * _DAY) / 1000))
        folder = f"{root}/store/views/user_activity@1/date={date}"
        os.makedirs(folder, exist_ok=True)
        topic = "clicks" if s else "impressions"
        part_rows = table.take(pa.array(order[lo:hi]))
        if s:  # like the worker: a source's files hold only its own measure fields
            part_rows = part_rows.drop_columns(["ad_id"])
        pq.write_table(part_rows, f"{folder}/{topic}-p{p:03d}-{c * _CHUNK:012d}.parquet",
                       compression="zstd")
    imps = np.flatnonzero(~is_click)
    pick = rng.choice(imps, rows, replace=len(imps) < rows)
    lab_user = user_ids.take(pa.array(user[pick]))
    unknown = rng.random(rows) < 0.05
    lab_user = pc.if_else(pa.array(unknown), _ids("x", rows).take(pa.array(np.arange(rows))),
                          lab_user)
    labels = pa.table({
        "impression_id": pa.array(np.char.add("i", pick.astype(str))),
        "user_id": lab_user,
        "ad_id": ad_ids.take(pa.array(ad[pick])),
        "ts": pa.array(ts[pick]).cast(pa.timestamp("ms", tz="UTC")),
        "label": pa.array(rng.random(rows) < 0.03),
    })
    pq.write_table(labels, f"{root}/labels.parquet", compression="zstd")
    return f"{root}/store"


def _materialize(root: str) -> None:
    """Per (user, update time) rows of every user feature, for the DuckDB reference."""
    from headrace.core.settings import OfflineSettings
    from offline.training_set import build_training_set

    settings = OfflineSettings.from_env({"HEADRACE_OFFLINE_URI": f"{root}/store",
                                         "HEADRACE_PROGRESS": "false"})
    store = pq.read_table(f"{root}/store/views/user_activity@1", columns=["entity_id", "ts"])
    upd = pa.table({"user_id": store.column("entity_id").cast(pa.string()),
                    "ts": pc.add(store.column("ts").cast(pa.int64()), 1)})
    feats = build_training_set(upd, _user_features(), settings)
    feats = feats.set_column(1, "ts", pc.subtract(feats.column("ts"), 1).cast(
        pa.timestamp("ms", tz="UTC")))
    pq.write_table(feats, f"{root}/features.parquet", compression="zstd")


def _user_features() -> list[str]:
    # Always the shipped set, whatever HEADRACE_DEFINITIONS says: the generated store holds
    # rows of the shipped user_activity@1 view only (this measures the join, not a view).
    from feature_defs.registry import DEFAULT_DEFINITIONS, load_registry

    return load_registry(DEFAULT_DEFINITIONS).feature_names("user")


def _child(side: str, root: str, repeat: int) -> dict[str, Any]:
    labels = pq.read_table(f"{root}/labels.parquet")
    best, best_cpu, rows_out = float("inf"), float("inf"), -1
    for _ in range(repeat):
        if side == "ours":
            from headrace.core.settings import OfflineSettings
            from offline.training_set import build_training_set

            settings = OfflineSettings.from_env({"HEADRACE_OFFLINE_URI": f"{root}/store",
                                                 "HEADRACE_PROGRESS": "false"})
            start, cpu = time.perf_counter(), time.process_time()
            out = build_training_set(labels, _user_features(), settings)
        else:
            import duckdb

            con = duckdb.connect()
            con.register("labels", labels)
            start, cpu = time.perf_counter(), time.process_time()
            out = con.sql(
                "SELECT l.*, f.* EXCLUDE (user_id, ts) FROM labels l ASOF LEFT JOIN "
                f"read_parquet('{root}/features.parquet') f "
                "ON l.user_id = f.user_id AND l.ts > f.ts").to_arrow_table()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        rows_out = out.num_rows
        del out
    return {"seconds": best, "cpu_seconds": best_cpu, "rows_out": rows_out,
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process's own peak RSS. ``ru_maxrss`` would also count the memory of the
    parent at fork time (Linux keeps it across exec), so prefer ``VmHWM``."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spawn(side: str, root: str, repeat: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.training_set", "--child", side, root,
                           str(repeat)], capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {side} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(rows: int = 1_000_000, users: int = 100_000, updates: int = 5_000_000, days: int = 7,
        seed: int = 0, repeat: int = 2) -> dict[str, Any]:
    """Generate data, time both sides in subprocesses and return the figures (JSON-able)."""
    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as root:
        start = time.perf_counter()
        generate(root, rows=rows, users=users, updates=updates, days=days, seed=seed)
        _materialize(root)
        setup = time.perf_counter() - start
        ours = _spawn("ours", root, repeat)
        ref = _spawn("duckdb", root, repeat)
    return {
        "benchmark": "training-set",
        "rows_in": rows,
        "rows_out": ours["rows_out"],
        "updates": updates,
        "users": users,
        "days": days,
        "features": len(_user_features()),
        "seconds": round(ours["seconds"], 3),
        "reference": "duckdb ASOF LEFT JOIN on a pre-materialized per-update feature table",
        "reference_seconds": round(ref["seconds"], 3),
        "ratio": round(ours["seconds"] / ref["seconds"], 3),
        "cpu_seconds": round(ours["cpu_seconds"], 3),
        "reference_cpu_seconds": round(ref["cpu_seconds"], 3),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "reference_peak_rss_mb": round(ref["peak_rss_mb"], 1),
        "reference_rows_out": ref["rows_out"],
        "setup_seconds": round(setup, 1),
        "cpu_count": os.cpu_count(),
        "target": {"ratio_max": 2.0, "peak_rss_mb_max": 3072, "rows_out_eq_rows_in": True},
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(_child(argv[1], argv[2], int(argv[3]))))
        return
    kwargs = dict(arg.split("=", 1) for arg in argv)
    print(json.dumps(run(**{k: int(v) for k, v in kwargs.items()}), indent=2))


if __name__ == "__main__":
    main()
