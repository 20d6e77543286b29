"""Request size limits at the coordinator's front door: refused with INVALID_ARGUMENT naming the
field, before any work is done, and everyone else still served."""

from __future__ import annotations

import time

import pytest

from cluster import start_cluster
from tandem.client import TandemClient
from tandem.client import errors as client_errors
from tandem.coordinator.config import CoordinatorConfig
from tandem.core.errors import ConfigError

LIMITS = dict(max_prompt_bytes=2000, max_prompt_tokens=300, max_request_id_bytes=32, max_stop_strings=4,
              max_stop_string_bytes=16, max_stop_token_ids=8, max_logit_bias=8)


@pytest.fixture(scope="module")
def cluster(checkpoint):
    c = start_cluster(checkpoint("llama"), num_stages=1, num_samplers=1, with_kv_store=False, **LIMITS)
    yield c
    c.stop()


@pytest.mark.parametrize("options,field", [
    (dict(prompt="x" * 2001), "text has 2001 bytes; at most 2000"),
    (dict(prompt="é" * 1001), "text has 2002 bytes; at most 2000"),  # bytes, not characters
    (dict(prompt_ids=[1] * 301), "token_ids has 301 ids; at most 300"),
    (dict(prompt_ids=[1], request_id="r" * 33), "request_id has 33 bytes; at most 32"),
    (dict(prompt_ids=[1], stop=["a"] * 50_000), "sampling.stop has 50000 strings; at most 4"),
    (dict(prompt_ids=[1], stop=["ok", "x" * 17]), "sampling.stop[1] has 17 bytes; at most 16"),
    (dict(prompt_ids=[1], stop_token_ids=list(range(9))), "sampling.stop_token_ids has 9 ids; at most 8"),
    (dict(prompt_ids=[1], logit_bias={i: 1.0 for i in range(9)}), "sampling.logit_bias has 9 entries; at most 8"),
])
def test_an_oversized_request_is_refused_naming_the_field(cluster, options, field):
    with TandemClient(cluster.endpoint, timeout_s=30) as client:
        start = time.monotonic()
        with pytest.raises(client_errors.InvalidArgumentError, match=field.replace("[", r"\[").replace("]", r"\]")):
            client.generate(max_tokens=2, **options)
        assert time.monotonic() - start < 5  # refused up front, not after running
        # The service goes on serving everyone else.
        assert len(client.generate(prompt_ids=[5, 6, 7], max_tokens=3, ignore_eos=True).token_ids) == 3


def test_tokenize_and_detokenize_are_limited_too(cluster):
    with TandemClient(cluster.endpoint, timeout_s=30) as client:
        with pytest.raises(client_errors.InvalidArgumentError, match="text has 100000 bytes; at most 2000"):
            client.tokenize("y" * 100_000)
        with pytest.raises(client_errors.InvalidArgumentError, match="token_ids has 301 ids; at most 300"):
            client.detokenize([1] * 301)
        assert client.detokenize(client.tokenize("hello")).strip() != ""  # within the limits: served


def test_a_limit_below_one_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match="'max_stop_strings' must be >= 1"):
        CoordinatorConfig(model="m", stages=("s:1",), samplers=("x:1",), max_stop_strings=0).validate()
