"""Domain errors of the worker; the gRPC layer maps each to one status code."""


class SinkserveError(Exception):
    """Base of every error a request can cause."""


class SessionNotFound(SinkserveError):
    """No session with that id lives here."""


class InvalidRequest(SinkserveError):
    """The request is malformed or a value is out of its range."""


class SessionBusy(SinkserveError):
    """The session cannot take this request in its current state."""


class LimitExceeded(SinkserveError):
    """The request asks for more than this worker's configured limits."""


class Unavailable(SinkserveError):
    """The worker is shutting down or cannot take sessions now."""


class SnapshotError(ValueError):
    """A snapshot cannot be taken or is refused; the message says why."""


class SnapshotRefused(SinkserveError):
    """A session's snapshot exists but cannot be restored here."""
