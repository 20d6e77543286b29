"""The stage profile (format, interpolation, measurement) and the cost-aware layer split."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tandem.core.config import load_config
from tandem.core.errors import ConfigError
from tandem.core.modeling.model_config import ModelConfig
from tandem.core.modeling.profile import StageProfile, balanced_split, interpolate, load_profile, parse_profile
from tandem.core.modeling.profiler import Grid, measure_profile
from tandem.core.modeling.stages import balanced_boundaries, parse_boundaries, plan_stages, stage_times
from tandem.stage_worker.config import StageWorkerConfig
from tandem.stage_worker.executor import stage_boundaries
from tandem.tools import profile_stage


def profile(**changes) -> StageProfile:
    """8 layers; a layer costs 1 ms per 8 tokens per 1024 of context; the head 6 ms per 8 tokens
    (six layers' worth at context 1024)."""
    tokens, contexts = (8, 16, 32), (1024, 2048)
    base = StageProfile(
        model="m", num_layers=8, hidden_size=64, vocab_size=1000, device="cpu", dtype="float32", num_threads=1,
        cpus=(0,), max_seqs_per_step=32, repeats=3, tokens=tokens, contexts=contexts,
        layer_ms=tuple(tuple(t / 8 * c / 1024 for c in contexts) for t in tokens),
        head_ms=tuple(6 * t / 8 for t in tokens), embed_ms=(0.0, 0.0, 0.0), measure_s=0.5)
    return dataclasses.replace(base, **changes)


def test_interpolation_is_piecewise_linear_and_goes_on_straight_beyond_the_grid():
    xs, ys = (1, 8, 32), (1.0, 2.0, 8.0)
    assert [interpolate(xs, ys, x) for x in (1, 8, 32)] == [1.0, 2.0, 8.0]
    assert interpolate(xs, ys, 20) == pytest.approx(5.0)
    assert interpolate(xs, ys, 64) == pytest.approx(16.0)  # the last segment's line
    assert interpolate(xs, ys, 0) == pytest.approx(1 - 1 / 7)
    assert interpolate((5,), (3.0,), 100) == 3.0


def test_profile_interpolates_tokens_and_context():
    p = profile()
    assert p.layer(16, 1536) == pytest.approx(2 * 1.5)
    assert p.layer(24, 2048) == pytest.approx(3 * 2)
    assert p.layer(8, 512) == pytest.approx(0.5)  # the line through the grid goes on
    assert p.head(12) == pytest.approx(9.0) and p.embed(100) == 0.0
    assert p.num_seqs(8) == 8 and p.num_seqs(100) == 32


def test_profile_json_round_trips(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(profile().to_json())
    assert load_profile(path) == profile()
    data = json.loads(path.read_text())
    assert data["format"] == "tandem-stage-profile" and data["version"] == 1


@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("head_ms"), "head_ms"),
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(version=2), "version"),
    (lambda d: d.update(tokens=[8, 8, 32]), "tokens"),
    (lambda d: d.update(layer_ms=[[1.0, 2.0]] * 2), "layer_ms"),
    (lambda d: d.update(head_ms=[1.0, -1.0, 2.0]), "head_ms"),
    (lambda d: d.update(num_threads="1"), "num_threads"),
])
def test_a_bad_profile_is_refused_naming_the_field(change, field):
    data = json.loads(profile().to_json())
    change(data)
    with pytest.raises(ConfigError, match=f"'{field}'"):
        parse_profile(json.dumps(data), "p.json")


@pytest.mark.parametrize("layers, stages, first, last, want", [
    ([1.0] * 8, 2, 0.0, 6.0, (7,)),  # a head worth six layers: [0, 7) and [7, 8) + head, 7 ms each
    ([1.0] * 8, 2, 0.0, 0.0, (4,)),
    ([1.0] * 8, 2, 0.0, 20.0, (7,)),  # every stage keeps a layer however costly the head
    ([1.0] * 8, 3, 0.0, 2.0, (3, 6)),  # 3, 3, 2 + 2
    ([1.0] * 8, 2, 2.0, 0.0, (3,)),  # the embedding weighs on stage 0: 2 + 3 and 5
    ([1.0, 1.0, 4.0, 1.0, 1.0], 2, 0.0, 0.0, (2,)),  # uneven layers: 2 | 6 or 6 | 2, the earlier wins
    ([2.0] * 4, 4, 0.0, 0.0, (1, 2, 3)),
    ([1.0] * 5, 1, 0.0, 9.0, ()),
])
def test_balanced_boundaries(layers, stages, first, last, want):
    got = balanced_boundaries(layers, stages, first, last)
    assert got == want
    times = stage_times(plan_stages(len(layers), stages, got), layers, first, last)
    best = min(max(stage_times(plan_stages(len(layers), stages, b), layers, first, last))
               for b in _all_splits(len(layers), stages))
    assert max(times) == pytest.approx(best)


def _all_splits(n: int, stages: int):
    if stages == 1:
        yield ()
        return
    import itertools

    yield from itertools.combinations(range(1, n), stages - 1)


def test_more_stages_than_layers_is_an_error():
    with pytest.raises(ConfigError, match="num_stages"):
        balanced_boundaries([1.0] * 2, 3)


def test_balanced_split_of_a_profile():
    split = balanced_split(profile(), 2, tokens=8, context=1024)
    assert split.boundaries == (7,) and split.stage_ms == pytest.approx((7.0, 7.0))
    assert "stage 1 layers [7, 8) + LM head 7.00 ms" in split.describe()
    longer = balanced_split(profile(), 2, tokens=8, context=2048)  # layers cost twice as much: head = 3 layers
    assert longer.boundaries == (5,)  # 10 | 6 + 6 ms, as good as 12 | 4 + 6; the earlier wins


def test_boundaries_parse_from_the_command_line():
    assert parse_boundaries("7") == (7,) and parse_boundaries("3, 6") == (3, 6)
    assert parse_boundaries("auto") == "auto" and parse_boundaries("") == ()
    with pytest.raises(ValueError):
        parse_boundaries("half")


def test_auto_boundaries_in_the_stage_config(tmp_path, checkpoint):
    model = checkpoint("llama")  # 5 layers
    path = tmp_path / "p.json"
    path.write_text(profile(num_layers=5).to_json())
    cfg = load_config(StageWorkerConfig, {"model": str(model), "num_stages": 2, "stage_index": 1, "samplers": ["s:1"],
                                          "stage_boundaries": "auto", "stage_profile": str(path)})
    config = ModelConfig.from_dir(model)
    assert stage_boundaries(cfg, config) == balanced_split(profile(num_layers=5), 2).boundaries
    assert load_config(StageWorkerConfig, {"model": "m", "samplers": ["s:1"], "stage_boundaries": [3]}).stage_boundaries == (3,)
    with pytest.raises(ConfigError, match="'stage_profile'"):
        load_config(StageWorkerConfig, {"model": "m", "stage_boundaries": "auto"})
    with pytest.raises(ConfigError, match="'stage_boundaries'"):
        load_config(StageWorkerConfig, {"model": "m", "stage_boundaries": "even"})
    with pytest.raises(ConfigError, match=r"stage_boundaries\[0\]"):
        load_config(StageWorkerConfig, {"model": "m", "stage_boundaries": ["a"]})
    path.write_text(profile().to_json())  # 8 layers
    with pytest.raises(ConfigError, match="8 layers"):
        stage_boundaries(cfg, config)


SMALL = Grid(tokens=(1, 8, 40), contexts=(16, 1024), max_seqs_per_step=4, repeats=2)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_measure_profile_fills_the_grid(checkpoint, arch):
    p = measure_profile(checkpoint(arch), grid=SMALL)
    assert p.tokens == (1, 8, 40) and p.contexts == (16, 256)  # clipped to the model's 256 positions
    assert len(p.layer_ms) == 3 and all(len(row) == 2 and min(row) > 0 for row in p.layer_ms)
    assert min(p.head_ms) > 0 and min(p.embed_ms) > 0 and p.num_layers == ModelConfig.from_dir(checkpoint(arch)).num_hidden_layers
    assert parse_profile(p.to_json()) == p


def test_profile_stage_tool_writes_the_profile_and_prints_the_split(checkpoint, tmp_path, capsys):
    out = tmp_path / "p.json"
    code = profile_stage.main(["--model", str(checkpoint("llama")), "--tokens", "1,8", "--contexts", "32",
                               "--repeats", "1", "--out", str(out), "--stages", "2"])
    assert code == 0
    p = load_profile(out)
    assert p.tokens == (1, 8) and p.contexts == (32,)
    printed = capsys.readouterr()
    assert f"stage_boundaries: [{balanced_split(p, 2).boundaries[0]}]" in printed.out
    assert "pipeline.stageBoundaries" in printed.err
    assert profile_stage.main(["--model", str(tmp_path), "--out", str(out)]) == 2
