"""Kafka SASL/TLS and S3 region settings, mapped to librdkafka, Faust and S3 clients.

The embedded broker speaks PLAINTEXT only, so these check the configuration each client
receives, key by key, against the librdkafka and aiokafka option names."""

from __future__ import annotations

import ssl
from pathlib import Path

import pydantic
import pytest

from headrace.core.settings import CommonSettings
from tests.certs import self_signed

PASSWORD = "s3cr3t-kafka-pw"


def _settings(**env: str) -> CommonSettings:
    return CommonSettings.from_env({"HEADRACE_KAFKA_BOOTSTRAP": "k1:9093", **env})


def test_plaintext_by_default_adds_nothing() -> None:
    s = _settings()
    assert s.confluent_common() == {"bootstrap.servers": "k1:9093"}
    assert s.confluent_admin() == {"bootstrap.servers": "k1:9093"}
    assert "broker_credentials" not in s.faust_broker_kwargs()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_maps_to_both_clients(mechanism: str) -> None:
    s = _settings(HEADRACE_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
                  HEADRACE_KAFKA_SASL_MECHANISM=mechanism,
                  HEADRACE_KAFKA_SASL_USERNAME="hr-worker",
                  HEADRACE_KAFKA_SASL_PASSWORD=PASSWORD)
    want = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": mechanism,
            "sasl.username": "hr-worker", "sasl.password": PASSWORD}
    for conf in (s.confluent_common(), s.confluent_admin(), s.confluent_producer(),
                 s.confluent_consumer("g")):
        assert {k: conf[k] for k in want} == want
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    auth = credentials_to_aiokafka_auth(s.faust_broker_kwargs()["broker_credentials"])
    assert auth == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism,
                    "sasl_plain_username": "hr-worker", "sasl_plain_password": PASSWORD,
                    "ssl_context": None}


def test_sasl_ssl_and_mutual_tls_files(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "broker")
    s = _settings(HEADRACE_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
                  HEADRACE_KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
                  HEADRACE_KAFKA_SASL_USERNAME="u", HEADRACE_KAFKA_SASL_PASSWORD=PASSWORD,
                  HEADRACE_KAFKA_TLS_CA=str(cert), HEADRACE_KAFKA_TLS_CERT=str(cert),
                  HEADRACE_KAFKA_TLS_KEY=str(key))
    conf = s.confluent_producer()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["ssl.ca.location"] == str(cert)
    assert conf["ssl.certificate.location"] == str(cert)
    assert conf["ssl.key.location"] == str(key)
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    auth = credentials_to_aiokafka_auth(s.faust_broker_kwargs()["broker_credentials"])
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    context = auth["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname


def test_ssl_without_sasl(tmp_path: Path) -> None:
    cert, _key = self_signed(tmp_path, "broker")
    s = _settings(HEADRACE_KAFKA_SECURITY_PROTOCOL="SSL", HEADRACE_KAFKA_TLS_CA=str(cert))
    conf = s.confluent_consumer("g")
    assert conf["security.protocol"] == "SSL" and conf["ssl.ca.location"] == str(cert)
    assert not any(k.startswith("sasl.") for k in conf)
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    auth = credentials_to_aiokafka_auth(s.faust_broker_kwargs()["broker_credentials"])
    assert auth["security_protocol"] == "SSL"
    assert isinstance(auth["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize(("env", "fragment"), [
    ({"HEADRACE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs HEADRACE_KAFKA_SASL_MECHANISM"),
    ({"HEADRACE_KAFKA_SASL_USERNAME": "u"}, "is PLAINTEXT, not SASL_PLAINTEXT or SASL_SSL"),
    ({"HEADRACE_KAFKA_TLS_CA": "/ca.pem"}, "is PLAINTEXT, not SSL or SASL_SSL"),
    ({"HEADRACE_KAFKA_SECURITY_PROTOCOL": "SSL", "HEADRACE_KAFKA_TLS_CERT": "/c.pem"},
     "HEADRACE_KAFKA_TLS_CERT and HEADRACE_KAFKA_TLS_KEY go together"),
    ({"HEADRACE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "HEADRACE_KAFKA_SASL_MECHANISM": "GSSAPI",
      "HEADRACE_KAFKA_SASL_USERNAME": "u", "HEADRACE_KAFKA_SASL_PASSWORD": PASSWORD},
     "kafka_sasl_mechanism"),
])
def test_inconsistent_settings_are_refused(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        _settings(**env)
    assert fragment in str(err.value)
    assert PASSWORD not in str(err.value)


def test_the_password_never_shows() -> None:
    s = _settings(HEADRACE_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
                  HEADRACE_KAFKA_SASL_MECHANISM="PLAIN", HEADRACE_KAFKA_SASL_USERNAME="u",
                  HEADRACE_KAFKA_SASL_PASSWORD=PASSWORD,
                  HEADRACE_S3_KEY="AKIAEXAMPLEKEY", HEADRACE_S3_SECRET="s3-secret-value")
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.kafka_security()),
                 repr(s.faust_broker_kwargs()["broker_credentials"])):
        for secret in (PASSWORD, "AKIAEXAMPLEKEY", "s3-secret-value"):
            assert secret not in text


def test_s3_region_reaches_both_s3_clients() -> None:
    s = CommonSettings.from_env({"HEADRACE_OFFLINE_URI": "s3://b", "HEADRACE_S3_REGION":
                                 "eu-west-3", "HEADRACE_S3_ENDPOINT": "http://127.0.0.1:9"})
    assert s.storage_options()["client_kwargs"] == {"region_name": "eu-west-3",
                                                    "endpoint_url": "http://127.0.0.1:9"}
    fs = s.pyarrow_s3()
    assert fs is not None and fs.region == "eu-west-3"
    plain = CommonSettings.from_env({"HEADRACE_OFFLINE_URI": "s3://b"})
    assert "client_kwargs" not in plain.storage_options()
    empty = CommonSettings.from_env({"HEADRACE_OFFLINE_URI": "s3://b", "HEADRACE_S3_KEY": ""})
    assert empty.s3_key is None
