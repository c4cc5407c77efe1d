"""One error tree for the whole project.

Third-party exceptions are translated at the boundary with ``raise ... from exc``.
The CLI maps :class:`UsageError` and :class:`InputError` to exit status 2 with one
sentence; serving errors carry a gRPC status name that one interceptor maps.
"""

from __future__ import annotations

__all__ = [
    "HeadraceError",
    "UsageError",
    "InputError",
    "DefinitionError",
    "StateFormatError",
    "MissingDependencyError",
    "StackError",
    "BackendError",
    "OnlineStoreError",
    "OnlineStoreAuthError",
    "OfflineStoreError",
    "BrokerError",
    "InvalidArgument",
    "missing_extra",
]


class HeadraceError(Exception):
    """Base of every error Headrace raises on purpose."""

    exit_code = 1


class UsageError(HeadraceError):
    """The command line or a request was malformed (exit 2)."""

    exit_code = 2


class InputError(HeadraceError):
    """An input file or value is invalid (exit 2, one sentence, nothing written)."""

    exit_code = 2


class DefinitionError(InputError):
    """Feature definitions are invalid; ``problems`` lists every one with its location,
    ``source`` names the definitions (a ``module:ATTR`` or ``file.py:ATTR`` spec) if known."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" '{source}'" if source else ""
        super().__init__(
            f"{len(self.problems)} problem(s) in feature definitions{where}:\n"
            + "\n".join(f"  - {p}" for p in self.problems)
        )


class StateFormatError(InputError, ValueError):
    """Stored view-state bytes are malformed: truncated, an unknown format or magic,
    counts that overrun the buffer, trailing bytes, or another view's layout.

    Also a ``ValueError``: readers that skip an unreadable state (serving answers the
    defaults, ``get`` reports it) caught ``ValueError`` before there was a typed error.
    """


class MissingDependencyError(HeadraceError):
    """A binary or optional package is missing; the message names what to install."""

    exit_code = 3


class StackError(HeadraceError):
    """The local stack could not be started, found or stopped."""


class BackendError(HeadraceError):
    """A storage or messaging backend failed.

    ``transient``: the failure may pass by itself (the backend unreachable, timing out,
    loading or failing over), so waiting and retrying is right
    (:mod:`headrace.core.retry`); False: retrying cannot help (a wrong key type, a
    malformed reply, missing permissions).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class OnlineStoreError(BackendError):
    """Redis failed or exceeded its budget."""


class OnlineStoreAuthError(OnlineStoreError):
    """Redis refused our credentials (wrong password, NOAUTH, WRONGPASS) or the TLS
    handshake failed. The message is one sentence naming ``host:port``, never the
    password.

    Commands exit 2 with it (a configuration error, not an outage). It is not
    ``transient``; the long-running worker nevertheless keeps retrying it with back-off
    and an ERROR line (:class:`~headrace.core.online_store.RetryingOnlineStore`), so that
    fixing the password or the certificate needs no restart and causes no crash loop.
    """

    exit_code = 2


class OfflineStoreError(BackendError):
    """The offline store (S3 or local Parquet) failed or is unreadable."""


class BrokerError(BackendError):
    """The Kafka-protocol broker failed."""


class InvalidArgument(HeadraceError):
    """A serving request is invalid; ``field`` names the offending field."""

    grpc_status = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def missing_extra(package: str, extra: str) -> MissingDependencyError:
    """Build the error for an optional import that failed."""
    return MissingDependencyError(
        f"the Python package '{package}' is missing; install it with: "
        f"pip install 'headrace[{extra}]'"
    )
