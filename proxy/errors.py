"""One root error and the few leaves callers must tell apart."""


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
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "timeout" | "connect" | "protocol"


class StoreUnavailable(ProxyError):
    """A cache store could not answer; callers treat it as a miss."""


class CorruptEntry(ProxyError):
    """Stored bytes do not decode to an entry; callers treat it as a miss."""
