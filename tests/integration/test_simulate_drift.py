"""``headrace simulate drift`` end to end, shortened (20 s of baseline traffic): the real
stack, server, worker, monitor and pipeline scheduler find the shift of one country's
share and retrain with no human step (the full run: ``headrace simulate drift``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_a_shift_is_alerted_and_a_challenger_retrained() -> None:
    proc = subprocess.run([sys.executable, "-m", "headrace.cli", "simulate", "drift",
                           "--baseline-seconds", "20", "--json"],
                          capture_output=True, text=True, timeout=840, check=False)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["shifted_feature"] == "country"
    assert doc["shifted_feature_psi"] >= 0.25, doc
    assert doc["stable_feature_psi_max"] < 0.1, doc["stable_feature_psi"]
    assert doc["alert"]["signal"] == "drift" and doc["alert"]["feature"] == "country"
    assert doc["alert_seconds"] <= 120, doc["alert_seconds"]
    assert doc["retrain_started"] and doc["pipeline_status"] == "succeeded", doc["pipeline_run"]
    assert doc["challenger_registered"] and doc["challenger"] != doc["champion"]
    assert doc["as_expected"] and proc.returncode == 0
