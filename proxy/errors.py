"""One root error and the few leaves callers must tell apart."""

from typing import ClassVar


class ProxyError(Exception):
    """Root of every error cacheproxy raises on purpose."""


class ConfigError(ProxyError):
    """The configuration is invalid; `path` names the offending field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class BadRequest(ProxyError):
    """The client's request cannot be served safely (mapped to 400)."""


class UpstreamError(ProxyError):
    """The upstream could not be reached, did not answer in time, or answered with failure."""

    _STATUS: ClassVar[dict[str, int]] = {
        "timeout": 504, "connect": 502, "protocol": 502, "rate-limited": 503, "unavailable": 503,
    }  # fmt: skip

    def __init__(
        self,
        kind: str,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        # "timeout" | "connect" | "protocol" | "status" | "rate-limited" | "unavailable"
        self.kind = kind
        self.status = status or self._STATUS.get(kind, 502)  # what the client is told
        self.retry_after = retry_after  # seconds, when the client should try again


class StoreUnavailable(ProxyError):
    """A cache store could not answer; callers treat it as a miss."""


class CorruptEntry(ProxyError):
    """Stored bytes do not decode to an entry; callers treat it as a miss."""
