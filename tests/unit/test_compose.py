"""docker-compose.yml, Dockerfile and deploy/prometheus.yml agree with the code."""

from __future__ import annotations

import re
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


#: ``${NAME:?message}``, ``${NAME}``: compose's substitution of the variables of .env
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::\?[^}]*)?\}")


def _example_secrets() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _substituted(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the .env.example values put in, as compose does with a .env."""
    values = _example_secrets()
    return {k: _VAR.sub(lambda m: values[m.group(1)], v) for k, v in env.items()}


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
                "serve", "monitor", "pipeline", "prometheus", "grafana"}
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
    assert {"worker", "serve", "monitor", "pipeline"} <= set(services)
    for name, svc in services.items():
        unknown = {k for k in _env(svc) if k.startswith(ENV_PREFIX)} - known
        assert not unknown, f"{name} sets variables no settings class reads: {sorted(unknown)}"


@pytest.mark.parametrize(("service", "cls"), [("worker", WorkerSettings), ("serve", ServeSettings)])
def test_service_env_builds_its_settings(
    compose: dict[str, Any], service: str, cls: type[CommonSettings]
) -> None:
    env = _substituted(_env(compose["services"][service]))
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in cls.model_fields}
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= fields
    settings = cls.from_env(env)
    assert settings.redis_url.get_secret_value().startswith(
        f"redis://:{_example_secrets()['REDIS_PASSWORD']}@redis:6379/")
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


def _monitor_settings() -> type[CommonSettings]:
    from headrace.monitor.settings import MonitorSettings

    return MonitorSettings


def _pipeline_settings() -> type[CommonSettings]:
    from headrace.pipeline.settings import PipelineSettings

    return PipelineSettings


@pytest.mark.parametrize(("service", "command", "settings_of", "models"), [
    ("monitor", ["headrace", "monitor"], _monitor_settings, "./models:/models:ro"),
    ("pipeline", ["headrace", "pipeline", "schedule"], _pipeline_settings, "./models:/models"),
])
def test_monitor_and_pipeline_services(
    compose: dict[str, Any], service: str, command: list[str],
    settings_of: Any, models: str,
) -> None:
    svc = compose["services"][service]
    assert svc["command"] == command
    assert svc["build"] == "." and svc["image"] == compose["services"]["serve"]["image"]
    assert svc["volumes"] == [models]  # the server's models folder; the pipeline writes it
    env = _substituted(_env(svc))
    cls = settings_of()
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in cls.model_fields}
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= fields
    settings = cls.from_env(env)
    assert settings.metrics_port is not None
    assert settings.models_dir == _env(compose["services"]["serve"])["HEADRACE_MODELS_DIR"]


def test_headrace_commands_exist(compose: dict[str, Any]) -> None:
    """Every container command parses with the real CLI (a renamed or unregistered
    subcommand fails here, not in a restart loop)."""
    from headrace.cli import build_parser

    parser = build_parser()
    for name, svc in _headrace_services(compose).items():
        command = svc["command"]
        assert command[0] == "headrace", name
        args = parser.parse_args(command[1:])
        assert callable(args.func), name


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
    assert expected == {("worker", 9108), ("serve", 9109), ("monitor", 9110),
                        ("pipeline", 9111)}
    assert _targets(prometheus) == expected
    for name, port in expected:
        assert str(port) in [str(p) for p in compose["services"][name].get("expose", [])]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert any(m.startswith("./deploy/prometheus.yml:") for m in mounts)
    assert set(compose["services"]["prometheus"]["depends_on"]) == {n for n, _ in expected}


def test_grafana_is_provisioned_local_and_keeps_no_password(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    image, _, tag = grafana["image"].partition(":")
    assert image == "grafana/grafana-oss"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"pin a version tag, not {tag!r}"
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]  # the host's loopback only
    assert grafana["depends_on"] == ["prometheus"]
    mounts = {m.split(":")[0]: m.split(":")[1:] for m in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == ["/etc/grafana/provisioning", "ro"]
    assert mounts["./deploy/grafana/dashboards"] == ["/var/lib/grafana/dashboards", "ro"]
    for host in ("./deploy/grafana/provisioning", "./deploy/grafana/dashboards"):
        assert (ROOT / host).is_dir()
    env = _env(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    # the admin password only ever comes from the environment: `${VAR:?...}` refuses to
    # start without it, and no GF_* value holds a literal secret
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    for key, value in env.items():
        if any(word in key for word in ("PASSWORD", "SECRET", "TOKEN", "KEY")):
            assert value.startswith("${"), f"{key} is committed in clear"
    assert "grafana" in compose["volumes"]


def test_secrets_come_from_an_uncommitted_env_file(compose: dict[str, Any]) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(_VAR.findall(text))
    assert used == set(_example_secrets()), "every ${VAR} has a line in .env.example"
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert "secrets:" in (ROOT / "Makefile").read_text()
    for name, svc in compose["services"].items():
        for key, value in _env(svc).items():
            if any(w in key for w in ("PASSWORD", "SECRET", "TOKEN", "_KEY", "REDIS_URL",
                                      "ROOT_USER", "REDISCLI_AUTH")):
                assert _VAR.search(value), f"{name}: {key} is committed in clear"
    # Redis requires the password; the server requires a token
    redis = compose["services"]["redis"]
    assert "--requirepass" in " ".join(redis["command"])
    assert "REDIS_PASSWORD" in _env(redis)["REDIS_PASSWORD"]
    assert redis["ports"] == ["127.0.0.1:6379:6379"]
    assert "GRPC_TOKENS" in _env(compose["services"]["serve"])["HEADRACE_GRPC_TOKENS"]
    serve = ServeSettings.from_env(_substituted(_env(compose["services"]["serve"])))
    assert serve.grpc_token_list() == (_example_secrets()["GRPC_TOKENS"],)
    init = " ".join(compose["services"]["minio-init"]["command"])
    assert "headrace-secret" not in init and "\"$$S3_SECRET_KEY\"" in init
