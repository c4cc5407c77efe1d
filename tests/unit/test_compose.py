"""docker-compose.yml, Dockerfile and deploy/prometheus.yml agree with the code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from headrace.core.settings import (
    ENV_PREFIX,
    SETTINGS_CLASSES,
    CommonSettings,
    ServeSettings,
    WorkerSettings,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _headrace_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items()
            if any(k.startswith(ENV_PREFIX) for k in _env(svc))}


def test_services_exist(compose: dict[str, Any]) -> None:
    expected = {"kafka-1", "kafka-2", "kafka-3", "redis", "minio", "minio-init", "worker",
                "serve", "prometheus"}
    assert expected <= set(compose["services"])


def test_kafka_is_a_three_node_kraft_cluster(compose: dict[str, Any]) -> None:
    nodes = {name: _env(compose["services"][name]) for name in ("kafka-1", "kafka-2", "kafka-3")}
    for name, env in nodes.items():
        assert compose["services"][name]["image"].startswith("apache/kafka:")
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
        assert f"{env['KAFKA_NODE_ID']}@{name}:9093" in voters
        assert len(voters) == 3
        assert f"PLAINTEXT://{name}:19092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert len({env["CLUSTER_ID"] for env in nodes.values()}) == 1
    assert len({env["KAFKA_NODE_ID"] for env in nodes.values()}) == 3


def test_every_headrace_variable_is_a_settings_field(compose: dict[str, Any]) -> None:
    known = {f"{ENV_PREFIX}{name.upper()}" for cls in SETTINGS_CLASSES for name in cls.model_fields}
    services = _headrace_services(compose)
    assert {"worker", "serve"} <= set(services)
    for name, svc in services.items():
        unknown = {k for k in _env(svc) if k.startswith(ENV_PREFIX)} - known
        assert not unknown, f"{name} sets variables no settings class reads: {sorted(unknown)}"


@pytest.mark.parametrize(("service", "cls"), [("worker", WorkerSettings), ("serve", ServeSettings)])
def test_service_env_builds_its_settings(
    compose: dict[str, Any], service: str, cls: type[CommonSettings]
) -> None:
    env = _env(compose["services"][service])
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in cls.model_fields}
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= fields
    settings = cls.from_env(env)
    assert settings.broker_profile == "kafka"
    assert settings.offline_uri == "s3://headrace-offline"
    assert settings.metrics_port is not None


def test_worker_and_serve_commands(compose: dict[str, Any]) -> None:
    worker, serve = compose["services"]["worker"], compose["services"]["serve"]
    assert worker["command"] == ["headrace", "worker"]
    assert worker["deploy"]["replicas"] == 2
    assert serve["command"] == ["headrace", "serve", "--host", "0.0.0.0", "--port", "50051"]
    assert worker["build"] == serve["build"] == "."
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "pip install '.[stream,serve,offline]'" in dockerfile


def test_offline_bucket_is_created(compose: dict[str, Any]) -> None:
    init = compose["services"]["minio-init"]
    script = " ".join(init["command"])
    assert "mc mb" in script and "headrace-offline" in script
    bucket = _env(compose["services"]["worker"])["HEADRACE_OFFLINE_URI"].removeprefix("s3://")
    assert bucket.split("/")[0] == "headrace-offline"


def _targets(prometheus: dict[str, Any]) -> set[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for job in prometheus["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                found.add((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            found.update((name, int(dns["port"])) for name in dns["names"])
    return found


def test_prometheus_scrapes_the_metrics_ports(
    compose: dict[str, Any], prometheus: dict[str, Any]
) -> None:
    expected = {(name, int(_env(svc)["HEADRACE_METRICS_PORT"]))
                for name, svc in _headrace_services(compose).items()
                if "HEADRACE_METRICS_PORT" in _env(svc)}
    assert expected == {("worker", 9108), ("serve", 9109)}
    assert _targets(prometheus) == expected
    for name, port in expected:
        assert str(port) in [str(p) for p in compose["services"][name].get("expose", [])]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert any(m.startswith("./deploy/prometheus.yml:") for m in mounts)
