"""Labels with IVT filtering on the real local S3 endpoint: the file written to S3 holds
the same rows and the same IVT report as the labels built from a local copy of the store
(the local path is checked against a brute-force oracle in tests/unit/test_labels.py),
and no temporary key is left behind by the metadata rewrite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from headrace.core.settings import OfflineSettings
from offline.ivt import IvtRules
from offline.labels import build_labels, ivt_report_of, write_labels
from offline.store import OfflineStore
from tests.integration.test_offline_s3 import HOUR, MIN, START, _events, _write

pytestmark = pytest.mark.integration

RULES = IvtRules(min_click_delay_ms=5 * MIN, max_user_clicks_per_minute=1,
                 impossible_ctr_min_impressions=20, impossible_ctr=0.3)


def test_labels_with_ivt_on_s3_equal_local(ns: Any, tmp_path: Path) -> None:
    s3 = ns.settings(OfflineSettings, progress=False)
    imps, clicks = _events(1)
    fs = s3.pyarrow_s3()
    assert fs is not None
    _write(fs, s3.offline_path(), imps, clicks)
    _write(pafs.LocalFileSystem(), str(tmp_path / "local"), imps, clicks)
    local = OfflineStore.from_uri(str(tmp_path / "local"))
    want = build_labels(local, START + HOUR, START + 3 * HOUR, 30 * MIN, ivt=RULES)
    report = ivt_report_of(want.schema)
    assert report is not None and report.clicks_out < report.clicks_in
    assert sum(report.counts.values()) > 0

    uri = f"{s3.offline_uri}/work/labels-ivt.parquet"
    rows, positives = write_labels(OfflineStore.from_settings(s3), uri, START + HOUR,
                                   START + 3 * HOUR, 30 * MIN, s3, ivt=RULES)
    path = uri.split("://", 1)[1]
    got = pq.read_table(path, filesystem=fs)
    assert rows == want.num_rows and positives == pa.compute.sum(want.column("label")).as_py()
    assert got.replace_schema_metadata(None).equals(want.replace_schema_metadata(None))
    assert ivt_report_of(pq.read_schema(path, filesystem=fs)) == report
    left = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path.rsplit("/", 1)[0]))]
    assert left == ["labels-ivt.parquet"]
