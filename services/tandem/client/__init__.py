"""The Python client of a Tandem deployment: `TandemClient` (blocking), `AsyncTandemClient`.

    with TandemClient("localhost:50051") as client:
        print(client.generate("def parse_args(", max_tokens=32, temperature=0).text)
        for chunk in client.generate_stream("import os", max_tokens=32):
            print(chunk.text, end="")
"""

from tandem.client._wire import GenerateOptions
from tandem.client.aio import AsyncGenerateStream, AsyncTandemClient
from tandem.client.errors import (
    CancelledError,
    ClientError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from tandem.client.results import (
    GenerateChunk,
    GenerateResult,
    SampleLogprobs,
    SamplerInfo,
    ServerInfo,
    StageInfo,
    TokenLogprob,
    Usage,
)
from tandem.client.sync import GenerateStream, TandemClient

__all__ = [
    "AsyncGenerateStream", "AsyncTandemClient", "CancelledError", "ClientError",
    "DeadlineExceededError", "FailedPreconditionError", "GenerateChunk", "GenerateOptions",
    "GenerateResult", "GenerateStream", "InternalError", "InvalidArgumentError",
    "NotFoundError", "PermissionDeniedError", "ResourceExhaustedError", "SampleLogprobs",
    "SamplerInfo", "ServerInfo", "StageInfo", "TandemClient", "TokenLogprob", "UnauthenticatedError",
    "UnavailableError", "Usage",
]
