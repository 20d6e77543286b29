"""Typed errors. Services raise these; one interceptor maps them to gRPC status codes."""


class TandemError(Exception):
    """Base of every error Tandem raises on purpose."""


class InvalidArgumentError(TandemError, ValueError):
    """The caller sent something malformed or out of range (gRPC INVALID_ARGUMENT)."""


class NotFoundError(TandemError, KeyError):
    """A named thing (request, sequence, block) does not exist (gRPC NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(TandemError):
    """Something with that name exists already, such as a live request id (gRPC ALREADY_EXISTS)."""


class ResourceExhaustedError(TandemError):
    """A bounded resource (queue, KV blocks) is full (gRPC RESOURCE_EXHAUSTED)."""


class CodecError(InvalidArgumentError):
    """A tensor message failed validation: dtype, shape, byte count or size limit."""


class ModelLoadError(TandemError):
    """A model directory cannot be loaded; the message names the file or tensor at fault."""


class ConfigError(InvalidArgumentError):
    """A configuration value is unknown or invalid; the message names the field."""


class UnavailableError(TandemError):
    """A service or a peer it needs is not ready or is gone (gRPC UNAVAILABLE)."""


class DeadlineExceededError(TandemError):
    """A request ran past its deadline (gRPC DEADLINE_EXCEEDED)."""


class PermissionDeniedError(TandemError):
    """The caller may not do this, whoever it is (gRPC PERMISSION_DENIED)."""


class FailedPreconditionError(TandemError):
    """The system is not in the state the call needs (gRPC FAILED_PRECONDITION)."""
