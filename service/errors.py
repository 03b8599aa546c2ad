"""Errors the service raises, and the one table that turns any exception into a gRPC status.

Library code raises ValueError/TypeError naming the bad field; the service adds the few conditions that are
about sessions rather than arguments. The interceptor calls `status_for` on whatever a handler raised.
"""

import grpc

from kvshard.wire.status import CURRENT_OFFSET_KEY


class SessionNotFound(LookupError):
    """Unknown id, expired, or owned by another tenant: all three look the same to the caller."""

    def __init__(self, session_id: str):
        super().__init__(f"session_id: no session {session_id!r}")


class SessionExists(Exception):
    def __init__(self, session_id: str):
        super().__init__(f"session_id: session {session_id!r} already exists")


class OffsetMismatch(Exception):
    """expected_offset differs from the session's offset: the call was applied already, or raced another."""

    def __init__(self, expected: int, current: int, field: str = "expected_offset"):
        super().__init__(f"{field}: expected {expected}, the session is at offset {current}")
        self.current = current


class SessionConflict(Exception):
    """Another shard committed the session since this one loaded it (shared stores)."""

    def __init__(self, session_id: str):
        super().__init__(f"session_id: session {session_id!r} was changed by another shard; retry the call")


class LeaseHeld(Exception):
    """Another shard holds the session's lease (shared stores): it is serving the session, or it died and its
    lease has not run out yet. Retryable."""

    def __init__(self, session_id: str, owner: str, expires_in_ms: int):
        super().__init__(f"session_id: session {session_id!r} is held by shard {owner} for up to {expires_in_ms} ms more; retry")
        self.expires_in_ms = expires_in_ms


class Fenced(Exception):
    """This shard lost the session's lease (it was paused or cut off while another shard took over): the store
    refused its write, and its copy of the session is dropped. Retryable: a retry reaches the new owner."""

    def __init__(self, session_id: str):
        super().__init__(f"session_id: this shard no longer owns session {session_id!r} (its lease was taken over); retry")


class StoreUnavailable(Exception):
    """The session store cannot be reached (a Redis master failing over, a network cut). Retryable: the call
    either committed or left nothing, and the client's retry carries expected_offset."""


class FailedPrecondition(Exception):
    """The session cannot serve this call: another model's session, or a raw session asked to generate."""


class LimitExceeded(Exception):
    """A configured limit (sizes, counts, memory) would be exceeded."""


class QuotaExceeded(LimitExceeded):
    """A write would leave a tenant storing more than --max-tenant-bytes; the store refused all of it."""

    def __init__(self, tenant: str, held: int, grown: int, quota: int):
        super().__init__(
            f"max_tenant_bytes: tenant {tenant!r} stores {held} bytes; this change adds {grown}, over its quota of "
            f"{quota} bytes; trim or delete sessions"
        )


class Unauthenticated(Exception):
    pass


class NotReady(Exception):
    """The server is loading its model or draining."""


_CODES = (
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (SessionExists, grpc.StatusCode.ALREADY_EXISTS),
    ((OffsetMismatch, SessionConflict), grpc.StatusCode.ABORTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    ((NotReady, LeaseHeld, Fenced, StoreUnavailable), grpc.StatusCode.UNAVAILABLE),
    ((ValueError, TypeError), grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str, tuple]:
    """(code, details, trailing metadata) for an exception; anything unexpected is INTERNAL."""
    for kinds, code in _CODES:
        if isinstance(error, kinds):
            trailers = ((CURRENT_OFFSET_KEY, str(error.current)),) if isinstance(error, OffsetMismatch) else ()
            return code, str(error), trailers
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}", ()
