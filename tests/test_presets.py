"""Technique presets: each switch on its own, and what each service's config gets from it."""

from __future__ import annotations

import dataclasses

import pytest

from tandem.presets import PRESETS, SWITCHES, resolve


@pytest.mark.parametrize("switch", SWITCHES)
def test_one_switch_off_or_on(switch):
    off = resolve(f"full-{switch}")
    on = resolve(f"baseline+{switch}")
    assert [n for n, v in dataclasses.asdict(off).items() if not v] == [switch]
    assert [n for n, v in dataclasses.asdict(on).items() if v] == [switch]


def test_named_presets_set_every_switch():
    assert all(dataclasses.asdict(PRESETS["full"]).values())
    assert not any(dataclasses.asdict(PRESETS["baseline"]).values())
    for name in ("nope", "full-", "full+cpu_sampling", "baseline-cpu_sampling"):
        with pytest.raises(ValueError, match="unknown"):
            resolve(name)


def test_service_options_follow_the_switches():
    full, baseline = resolve("full"), resolve("baseline")
    # full: the last stage hosts a sampler for the argmax rows, beside the replicas
    assert full.stage_options(is_last=True)["sample_on_stage"] is True
    assert resolve("full-greedy_on_stage").stage_options(is_last=True)["sample_on_stage"] is False
    assert full.stage_options(is_last=False)["sample_on_stage"] is False
    assert baseline.stage_options(is_last=True)["sample_on_stage"] is True
    assert baseline.stage_options(is_last=False)["sample_on_stage"] is False
    assert full.coordinator_options() == {"sample_plans": True, "temporal_phases": True, "greedy_on_stage": True,
                                          "decode_chaining": True}
    assert baseline.coordinator_options() == {"sample_plans": False, "temporal_phases": False, "greedy_on_stage": False,
                                              "decode_chaining": False}
    assert resolve("full-decode_chaining").coordinator_options()["decode_chaining"] is False
    # without CPU sampling the stage samples every row: there is no replica to place the others on
    assert resolve("baseline+greedy_on_stage").coordinator_options()["greedy_on_stage"] is False
    assert resolve("full-temporal_phases").coordinator_options()["temporal_phases"] is False
    # row plans only make sense when samplers are separate and streams are structured
    assert resolve("full-cpu_sampling").coordinator_options()["sample_plans"] is False
    assert resolve("full-structured_streams").coordinator_options()["sample_plans"] is False
    assert resolve("full-shared_memory_logits").stage_options(is_last=True)["shared_memory_logits"] is False


@pytest.mark.parametrize("name", ["full", "baseline", *(f"full-{s}" for s in SWITCHES), *(f"baseline+{s}" for s in SWITCHES)])
def test_every_preset_prefills_in_chunks_as_vllm_does(name):
    from tandem.coordinator.config import CoordinatorConfig

    config = CoordinatorConfig(model="m", stages=("s:1",), samplers=("x:1",), **resolve(name).coordinator_options())
    assert config.enable_chunked_prefill and config.max_num_batched_tokens == 2048
