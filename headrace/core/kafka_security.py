"""How Headrace authenticates to Kafka and encrypts the connection: one description
mapped to both clients, librdkafka (confluent-kafka: the producer, the prediction log,
admin clients, consumers) and aiokafka (under Faust: the stream worker).

:class:`KafkaSecurity` is built from the ``HEADRACE_KAFKA_*`` settings
(:meth:`~headrace.core.settings.CommonSettings.kafka_security`):

=====================================  ========================  ==========================
setting                                librdkafka                Faust / aiokafka
=====================================  ========================  ==========================
``HEADRACE_KAFKA_SECURITY_PROTOCOL``   ``security.protocol``     the credentials' class
``HEADRACE_KAFKA_SASL_MECHANISM``      ``sasl.mechanism``        ``SASLCredentials.mechanism``
``HEADRACE_KAFKA_SASL_USERNAME``       ``sasl.username``         ``username``
``HEADRACE_KAFKA_SASL_PASSWORD``       ``sasl.password``         ``password``
``HEADRACE_KAFKA_TLS_CA``              ``ssl.ca.location``       ``SSLContext(cafile=…)``
``HEADRACE_KAFKA_TLS_CERT`` / ``_KEY`` ``ssl.certificate.location``  ``load_cert_chain``
                                       / ``ssl.key.location``
=====================================  ========================  ==========================

Protocols: ``PLAINTEXT`` (the default), ``SSL`` (TLS, with an optional client
certificate for mutual TLS), ``SASL_PLAINTEXT`` and ``SASL_SSL`` (SASL ``PLAIN``,
``SCRAM-SHA-256`` or ``SCRAM-SHA-512``, with a username and a password). The password
is a secret: it is read only here, when a client's configuration is built, and never
appears in ``repr``, settings dumps or logs. The embedded broker (Tansu) speaks
PLAINTEXT only, so the mapping is unit-tested (tests/unit/test_kafka_security.py), not
run against a SASL broker here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import SecretStr

__all__ = ["PROTOCOLS", "MECHANISMS", "KafkaSecurity"]

Protocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Mechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
PROTOCOLS: tuple[str, ...] = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """Kafka authentication and TLS (see the module docstring for the mapping).

    Attributes:
        protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
        mechanism: the SASL mechanism (SASL protocols only).
        username: the SASL user. password: its password (a secret).
        tls_ca: PEM file of the CA that signed the brokers' certificates (unset: the
            system's trust store). tls_cert, tls_key: a client certificate and its key
            for mutual TLS.
    """

    protocol: Protocol = "PLAINTEXT"
    mechanism: Mechanism | None = None
    username: str | None = None
    password: SecretStr | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def sasl(self) -> bool:
        """True for ``SASL_PLAINTEXT`` and ``SASL_SSL``."""
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        """True for ``SSL`` and ``SASL_SSL``."""
        return self.protocol in ("SSL", "SASL_SSL")

    def problems(self) -> list[str]:
        """Every inconsistency, one sentence each (empty: usable)."""
        out = []
        if self.sasl and not (self.mechanism and self.username and self.password):
            out.append(f"HEADRACE_KAFKA_SECURITY_PROTOCOL={self.protocol} needs "
                       "HEADRACE_KAFKA_SASL_MECHANISM, HEADRACE_KAFKA_SASL_USERNAME and "
                       "HEADRACE_KAFKA_SASL_PASSWORD")
        if not self.sasl and (self.mechanism or self.username or self.password):
            out.append("HEADRACE_KAFKA_SASL_* are set but HEADRACE_KAFKA_SECURITY_PROTOCOL "
                       f"is {self.protocol}, not SASL_PLAINTEXT or SASL_SSL")
        if not self.tls and (self.tls_ca or self.tls_cert or self.tls_key):
            out.append("HEADRACE_KAFKA_TLS_* are set but HEADRACE_KAFKA_SECURITY_PROTOCOL "
                       f"is {self.protocol}, not SSL or SASL_SSL")
        if bool(self.tls_cert) != bool(self.tls_key):
            out.append("HEADRACE_KAFKA_TLS_CERT and HEADRACE_KAFKA_TLS_KEY go together")
        return out

    def confluent(self) -> dict[str, Any]:
        """librdkafka settings (empty for ``PLAINTEXT``: the clients' default)."""
        if self.protocol == "PLAINTEXT":
            return {}
        conf: dict[str, Any] = {"security.protocol": self.protocol}
        if self.sasl:
            conf["sasl.mechanism"] = self.mechanism
            conf["sasl.username"] = self.username
            conf["sasl.password"] = self.password.get_secret_value() if self.password else ""
        if self.tls_ca:
            conf["ssl.ca.location"] = self.tls_ca
        if self.tls_cert:
            conf["ssl.certificate.location"] = self.tls_cert
            conf["ssl.key.location"] = self.tls_key
        return conf

    def ssl_context(self) -> Any:
        """An ``ssl.SSLContext`` verifying the brokers (``tls_ca`` or the system's store)
        with the client certificate loaded; None without TLS."""
        if not self.tls:
            return None
        import ssl

        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def faust_credentials(self) -> Any:
        """``faust.App(broker_credentials=…)``: ``SASLCredentials`` (with the TLS context
        for ``SASL_SSL``), ``SSLCredentials`` for ``SSL``, None for ``PLAINTEXT``."""
        if self.protocol == "PLAINTEXT":
            return None
        from faust.auth import SASLCredentials, SSLCredentials

        if self.sasl:
            return SASLCredentials(
                username=self.username,
                password=self.password.get_secret_value() if self.password else None,
                ssl_context=self.ssl_context(), mechanism=self.mechanism)
        return SSLCredentials(self.ssl_context())
