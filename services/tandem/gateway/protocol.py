"""OpenAI request bodies checked and mapped to Tandem's generate options; OpenAI response bodies.

Pure functions: no I/O. A parameter Tandem cannot honour is refused with an OpenAIError (HTTP 400)
naming it, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tandem.client import SampleLogprobs, Usage

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
               503: "service_unavailable", 504: "timeout"}
MAX_LOGPROBS = 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
FINISH_REASONS = {"stop_token": "stop", "stop": "stop", "length": "length"}  # others pass through


class OpenAIError(Exception):
    """A request the gateway answers with an OpenAI error body and `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param)


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"must be a number, got {v!r}")
    return float(v)


def _integer(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"must be an integer, got {v!r}")
    return v


def _boolean(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _bad(name, f"must be true or false, got {v!r}")
    return v


def _string(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _bad(name, f"must be a string, got {v!r}")
    return v


def _stops(name: str, v: Any) -> list[str]:
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad(name, "must be a string or a list of strings")
    return stops


def _int_list(name: str, v: Any) -> list[int]:
    if not isinstance(v, list):
        raise _bad(name, "must be a list of integers")
    return [_integer(name, i) for i in v]


def _logit_bias(name: str, v: Any) -> dict[int, float]:
    if not isinstance(v, dict):
        raise _bad(name, "must map token ids to biases")
    try:
        return {int(k): _number(name, b) for k, b in v.items()}
    except ValueError:
        raise _bad(name, "keys must be token ids") from None


def _mapping(name: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _bad(name, "must be an object")
    return v


# OpenAI (and vLLM extra) parameter -> its check; those also in GenerateOptions pass on unchanged.
SAMPLING: dict[str, Callable[[str, Any], Any]] = {
    "max_tokens": _integer, "temperature": _number, "top_p": _number, "top_k": _integer, "min_p": _number,
    "repetition_penalty": _number, "presence_penalty": _number, "frequency_penalty": _number,
    "seed": _integer, "min_tokens": _integer, "stop": _stops, "stop_token_ids": _int_list,
    "ignore_eos": _boolean, "logit_bias": _logit_bias,
}
COMMON: dict[str, Callable[[str, Any], Any]] = {
    **SAMPLING, "model": _string, "n": _integer, "stream": _boolean, "stream_options": _mapping, "user": _string,
}
COMPLETION = {**COMMON, "prompt": lambda _, v: v, "logprobs": _integer, "best_of": _integer, "echo": _boolean,
              "suffix": _string}
CHAT = {**COMMON, "messages": lambda _, v: v, "logprobs": _boolean, "top_logprobs": _integer,
        "max_completion_tokens": _integer, "response_format": _mapping, "tools": lambda _, v: v,
        "tool_choice": lambda _, v: v, "parallel_tool_calls": _boolean, "add_generation_prompt": _boolean}


@dataclass
class Job:
    """What one request asks for: its prompts, n choices each, and the generate options."""

    prompts: list[str | list[int]]
    n: int
    options: dict[str, Any]
    """GenerateOptions without the prompt (and, for n > 1, without the per-choice seed)."""
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    messages: list[dict[str, Any]] = field(default_factory=list)
    add_generation_prompt: bool = True

    def calls(self) -> list[tuple[str | list[int], dict[str, Any]]]:
        """(prompt, options) of each Generate call; choice index = prompt index * n + i. With a seed,
        choice i samples with seed + i, so that the n choices differ."""
        calls = []
        for prompt in self.prompts:
            for i in range(self.n):
                options = dict(self.options)
                if i and options.get("seed") is not None:
                    options["seed"] += i
                calls.append((prompt, options))
        return calls


def _checked(body: Any, spec: Mapping[str, Callable[[str, Any], Any]]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise _bad(unknown[0], "unknown or unsupported parameter")
    return {name: spec[name](name, v) for name, v in body.items() if v is not None}


def _common(args: dict[str, Any], served_model: str, max_n: int) -> tuple[dict[str, Any], int, bool, bool]:
    if "model" in args and args["model"] != served_model:
        raise OpenAIError(404, f"The model `{args['model']}` does not exist; this server serves `{served_model}`.",
                          param="model", code="model_not_found")
    n = args.get("n", 1)
    if not 1 <= n <= max_n:
        raise _bad("n", f"must be in [1, {max_n}], got {n}")
    stream = args.get("stream", False)
    stream_options = args.get("stream_options", {})
    if set(stream_options) - {"include_usage"} or not stream and stream_options:
        raise _bad("stream_options", "only include_usage is supported, with stream: true")
    options = {name: args[name] for name in SAMPLING if name in args}
    return options, n, stream, bool(stream_options.get("include_usage"))


def parse_completion(body: Any, served_model: str, max_n: int) -> Job:
    """The Job of a /v1/completions body; OpenAIError(400) names a bad parameter."""
    args = _checked(body, COMPLETION)
    options, n, stream, include_usage = _common(args, served_model, max_n)
    options.setdefault("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
    if args.get("best_of", n) != n:
        raise _bad("best_of", "only best_of equal to n is supported (no ranking of extra samples)")
    if args.get("echo"):
        raise _bad("echo", "echoing the prompt is not supported")
    if args.get("suffix"):
        raise _bad("suffix", "insertion with a suffix is not supported")
    if "logprobs" in args:
        if not 0 <= args["logprobs"] <= MAX_LOGPROBS:
            raise _bad("logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        options["logprobs"] = args["logprobs"]
    return Job(_prompts(body.get("prompt")), n, options, stream, include_usage, "logprobs" in args)


def _prompts(prompt: Any) -> list[str | list[int]]:
    """A prompt as text, token ids, or a list of either, as a list of prompts."""
    def ids(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(prompt, str) or ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        return list(prompt)
    raise _bad("prompt", "must be a string, a list of token ids, or a non-empty list of either")


def parse_chat(body: Any, served_model: str, max_n: int) -> Job:
    """The Job of a /v1/chat/completions body (messages unrendered); OpenAIError(400) names a bad parameter."""
    args = _checked(body, CHAT)
    options, n, stream, include_usage = _common(args, served_model, max_n)
    if "max_completion_tokens" in args:
        options["max_tokens"] = args["max_completion_tokens"]
    if args.get("tools"):
        raise _bad("tools", "tool calling is not supported")
    if args.get("tool_choice", "none") != "none":
        raise _bad("tool_choice", "tool calling is not supported")
    if args.get("response_format", {"type": "text"}) != {"type": "text"}:
        raise _bad("response_format", "only {\"type\": \"text\"} is supported")
    if "top_logprobs" in args and not args.get("logprobs"):
        raise _bad("top_logprobs", "needs logprobs: true")
    if args.get("logprobs"):
        options["logprobs"] = args.get("top_logprobs", 0)
        if not 0 <= options["logprobs"] <= MAX_LOGPROBS:
            raise _bad("top_logprobs", f"must be in [0, {MAX_LOGPROBS}]")
    return Job([], n, options, stream, include_usage, bool(args.get("logprobs")),
               _messages(body.get("messages")), args.get("add_generation_prompt", True))


def _messages(messages: Any) -> list[dict[str, Any]]:
    """Messages with text content only; a content list of text parts is joined into one string."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "must be an object with a role")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        elif content is not None and not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append({**m, "content": content or ""})
    return out


def finish_reason(name: str) -> str:
    """OpenAI's finish reason for Tandem's: stop, length, or Tandem's own (aborted, time_limit, error)."""
    return FINISH_REASONS.get(name, name)


def usage_body(usages: Sequence[Usage], n: int) -> dict[str, int]:
    """Usage of a request: each prompt counted once (its first choice), every choice's output."""
    prompt = sum(u.prompt_tokens for u in usages[::n])
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(samples: Sequence[SampleLogprobs], text_of: Mapping[int, str], offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object; text offsets count from `offset`."""
    tokens = [text_of[s.sampled.token_id] for s in samples]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [s.sampled.logprob for s in samples],
            "top_logprobs": [{text_of[t.token_id]: t.logprob for t in s.top} for s in samples],
            "text_offset": offsets}


def chat_logprobs(samples: Sequence[SampleLogprobs], text_of: Mapping[int, str]) -> dict[str, Any]:
    """The chat `logprobs` object: token, logprob, UTF-8 bytes and top alternatives per token."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = text_of[token_id]
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(s.sampled.token_id, s.sampled.logprob),
                         "top_logprobs": [entry(t.token_id, t.logprob) for t in s.top]} for s in samples]}


def token_ids_of(samples: Sequence[SampleLogprobs] | None) -> set[int]:
    """Every token id that logprobs mention, to be turned into text."""
    return {t.token_id for s in samples or () for t in (s.sampled, *s.top)}
