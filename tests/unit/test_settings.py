"""Settings: env prefix, isolation from os.environ, and derived client configuration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from headrace.core.settings import (
    CommonSettings,
    OfflineSettings,
    ProducerSettings,
    ServeSettings,
    WorkerSettings,
)

EMBEDDED = {
    "HEADRACE_KAFKA_BOOTSTRAP": "127.0.0.1:9999",
    "HEADRACE_BROKER_PROFILE": "embedded",
    "HEADRACE_S3_ENDPOINT": "http://127.0.0.1:5000",
    "HEADRACE_S3_KEY": "k",
    "HEADRACE_S3_SECRET": "s",
    "HEADRACE_TOPIC_PREFIX": "t1.",
}


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_PARTITIONS", "7")
    monkeypatch.setenv("HEADRACE_GROUP_ID", "g")
    monkeypatch.setenv("HEADRACE_METRICS_PORT", "")
    settings = WorkerSettings()
    assert (settings.partitions, settings.group_id, settings.metrics_port) == (7, "g", None)


def test_from_env_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_PARTITIONS", "7")
    settings = WorkerSettings.from_env({"HEADRACE_REDIS_PREFIX": "x", "HEADRACE_NOPE": "1"})
    assert settings.partitions == 4
    assert settings.redis_prefix == "x"
    assert WorkerSettings().partitions == 7  # isolation does not leak out of from_env


def test_defaults() -> None:
    s = CommonSettings.from_env({})
    assert (s.kafka_bootstrap, s.broker_profile, s.offline_uri) == (
        "localhost:9092", "kafka", "s3://headrace-offline")
    assert ServeSettings.from_env({}).port == 50051
    assert OfflineSettings.from_env({}).workers == 2
    assert ProducerSettings.from_env({}).encoding == "arrow"
    assert WorkerSettings.from_env({}).max_future_ms == 3_600_000


@pytest.mark.parametrize(
    ("key", "value"),
    [("HEADRACE_BROKER_PROFILE", "zookeeper"), ("HEADRACE_PARTITIONS", "0"),
     ("HEADRACE_ENCODING", "xml"), ("HEADRACE_LOG_LEVEL", "LOUD")],
)
def test_invalid_values_are_rejected(key: str, value: str) -> None:
    with pytest.raises(ValidationError):
        ProducerSettings.from_env({key: value})


def test_secrets_are_hidden() -> None:
    assert "s3_secret=SecretStr('**********')" in repr(CommonSettings.from_env(EMBEDDED))


def test_topic_prefix() -> None:
    assert CommonSettings.from_env(EMBEDDED).topic("events") == "t1.events"


def test_consumer_never_starts_at_latest() -> None:
    for env in ({}, EMBEDDED):
        conf = CommonSettings.from_env(env).confluent_consumer("g")
        assert conf["auto.offset.reset"] == "earliest"
        assert conf["enable.auto.commit"] is False
        assert conf["group.id"] == "g"


def test_profiles_for_confluent() -> None:
    kafka = CommonSettings.from_env({})
    embedded = CommonSettings.from_env(EMBEDDED)
    assert "session.timeout.ms" not in kafka.confluent_common()
    assert embedded.confluent_common()["session.timeout.ms"] == 2000
    assert embedded.confluent_common()["heartbeat.interval.ms"] == 500
    assert kafka.confluent_producer()["enable.idempotence"] is True
    assert kafka.confluent_producer()["acks"] == "all"
    assert embedded.confluent_producer() == {
        "bootstrap.servers": "127.0.0.1:9999", "acks": "all", "linger.ms": 5}


def test_faust_kwargs() -> None:
    embedded = CommonSettings.from_env(EMBEDDED).faust_broker_kwargs()
    assert embedded["broker"] == "kafka://127.0.0.1:9999"
    assert (embedded["broker_session_timeout"], embedded["broker_heartbeat_interval"]) == (2, 0.5)
    assert embedded["processing_guarantee"] == "at_least_once"
    assert embedded["consumer_auto_offset_reset"] == "earliest"
    multi = CommonSettings.from_env({"HEADRACE_KAFKA_BOOTSTRAP": "a:1,b:2"}).faust_broker_kwargs()
    assert multi["broker"] == "kafka://a:1;kafka://b:2"
    assert multi["broker_session_timeout"] >= 6


def test_s3_options_without_region() -> None:
    s = CommonSettings.from_env(EMBEDDED)
    endpoint = {"endpoint_url": "http://127.0.0.1:5000"}
    assert s.storage_options() == {"key": "k", "secret": "s", "client_kwargs": endpoint}
    fs = s.pyarrow_s3()
    assert fs is not None and type(fs).__name__ == "S3FileSystem"
    assert s.offline_path() == "headrace-offline"


def test_local_offline_store_has_no_s3() -> None:
    s = CommonSettings.from_env({"HEADRACE_OFFLINE_URI": "/data/offline/"})
    assert s.pyarrow_s3() is None
    assert s.storage_options() == {}
    assert s.offline_path() == "/data/offline"
