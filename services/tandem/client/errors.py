"""Typed client errors: one class per gRPC status code a Tandem server answers with.

Every error carries the status `code` and the server's `message`. Catch `ClientError` for
all of them, or a subclass (`ResourceExhaustedError` to back off, `UnavailableError` to
retry elsewhere, ...).
"""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """A call to a Tandem server failed with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)
        self.code = code
        """The gRPC status code."""
        self.message = message
        """The server's description of what went wrong."""

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(ClientError, ValueError):
    """The request was malformed or out of range (INVALID_ARGUMENT)."""


class NotFoundError(ClientError, LookupError):
    """The named request or resource does not exist (NOT_FOUND)."""


class AlreadyExistsError(ClientError):
    """A request with that id is still running: use another id, or wait for it to end."""


class ResourceExhaustedError(ClientError):
    """The server is overloaded or a queue or cache is full; retry later (RESOURCE_EXHAUSTED)."""


class DeadlineExceededError(ClientError, TimeoutError):
    """The call's deadline passed before it finished (DEADLINE_EXCEEDED)."""


class UnavailableError(ClientError, ConnectionError):
    """The server, or a service behind it, cannot be reached (UNAVAILABLE)."""


class CancelledError(ClientError):
    """The call was cancelled (CANCELLED). Not asyncio.CancelledError."""


class UnauthenticatedError(ClientError):
    """The API key is missing or wrong (UNAUTHENTICATED)."""


class PermissionDeniedError(ClientError):
    """The API key may not make this call (PERMISSION_DENIED)."""


class FailedPreconditionError(ClientError):
    """The server is not in a state to serve the call (FAILED_PRECONDITION)."""


class InternalError(ClientError):
    """The server failed unexpectedly (INTERNAL or UNKNOWN)."""


ERROR_OF: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
}


def error_from_rpc(error: grpc.RpcError) -> ClientError:
    """The typed error for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code_of = getattr(error, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details_of = getattr(error, "details", None)
    message = (details_of() if callable(details_of) else None) or str(error)
    return ERROR_OF.get(code, ClientError)(code, message)
