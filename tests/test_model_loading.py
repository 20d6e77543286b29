"""Loading a model directory: only a stage's own tensors, and clear errors naming what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.core.errors import ConfigError, InvalidArgumentError, ModelLoadError
from tandem.core.modeling.attention import AttentionMetadata, SequenceSlice
from tandem.core.modeling.model import StageModel
from tandem.core.modeling.model_config import ModelConfig
from tandem.core.modeling.stages import plan_stages


@pytest.fixture
def model_dir(tmp_path, checkpoint):
    dst = tmp_path / "model"
    shutil.copytree(checkpoint("llama"), dst)
    return dst


def test_plan_even_and_uneven():
    assert [(r.start, r.end) for r in plan_stages(5, 2)] == [(0, 3), (3, 5)]
    assert [(r.start, r.end) for r in plan_stages(7, 3)] == [(0, 3), (3, 5), (5, 7)]
    ranges = plan_stages(5, 3, boundaries=[1, 4])
    assert [(r.start, r.end) for r in ranges] == [(0, 1), (1, 4), (4, 5)]
    assert ranges[0].is_first and not ranges[0].is_last and ranges[2].is_last


@pytest.mark.parametrize(
    "num_stages,boundaries,match",
    [(6, None, "num_stages=6"), (0, None, "num_stages=0"), (3, [2, 2], "strictly increasing"),
     (3, [0, 2], "strictly increasing"), (2, [1, 3], "makes 3 stages"), (3, [1, 5], "strictly increasing")],
)
def test_plan_rejects_bad_splits(num_stages, boundaries, match):
    with pytest.raises(ConfigError, match=match):
        plan_stages(5, num_stages, boundaries)


def test_each_stage_holds_only_its_own_tensors(model_dir):
    cfg = ModelConfig.from_dir(model_dir)
    first, middle, last = (StageModel.load(model_dir, r) for r in plan_stages(5, 3, [1, 4]))
    assert first.embed_tokens is not None and first.lm_head is None
    assert middle.embed_tokens is None and middle.lm_head is None and len(middle.layers) == 3
    assert last.embed_tokens is None and last.lm_head is not None
    assert set(middle.checkpoint_names().values()) == {
        n for n in load_file(model_dir / "model.safetensors") if any(f"layers.{i}." in n for i in (1, 2, 3))
    }
    hidden = cfg.hidden_size
    assert middle.num_parameters() < first.num_parameters() * 3 + hidden


def test_stage_never_reads_other_stages_tensors(model_dir):
    """A corrupt layer-0 tensor breaks stage 0 only: later stages do not read it."""
    tensors = load_file(model_dir / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    StageModel.load(model_dir, plan_stages(5, 2)[1])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*model\.layers\.0\.mlp\.up_proj\.weight.*\[3, 3\]"):
        StageModel.load(model_dir, plan_stages(5, 2)[0])


def test_missing_tensor_is_named(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="model.norm.weight"):
        StageModel.load(model_dir, plan_stages(5, 1)[0])


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_file_is_named(model_dir, missing):
    (model_dir / missing).unlink()
    with pytest.raises(ModelLoadError, match=missing.replace(".", r"\.")):
        StageModel.load(model_dir, plan_stages(5, 1)[0])


def test_missing_shard_is_named(tmp_path):
    from conftest import make_checkpoint

    path = make_checkpoint("llama", tmp_path / "sharded", max_shard_size="60KB")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.norm.weight"]
    (path / shard).unlink()
    with pytest.raises(ModelLoadError, match=shard):
        StageModel.load(path, plan_stages(5, 2)[1])


def test_unsupported_architecture_is_named(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json.*gpt2.*GPT2LMHeadModel"):
        ModelConfig.from_dir(model_dir)


def test_unsupported_rope_scaling_is_named(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="rope_type='yarn'"):
        ModelConfig.from_dir(model_dir)


def test_older_config_keys_are_read(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (model_dir / "config.json").write_text(json.dumps(cfg))
    parsed = ModelConfig.from_dir(model_dir).rope
    assert (parsed.rope_type, parsed.theta, parsed.factor) == ("llama3", 50000.0, 8.0)


def test_metadata_rejects_short_block_table():
    with pytest.raises(InvalidArgumentError, match="holds 8 tokens, needs 9"):
        AttentionMetadata.build([SequenceSlice(5, 4, [0, 1])], block_size=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_projection_equals_its_linears_on_any_cpu(dtype):
    """q, k and v stacked into one projection give what the three give; bfloat16 takes oneDNN only
    where this CPU converts it natively (on an AVX2-only CPU oneDNN refuses it at load)."""
    from tandem.core.modeling.linear import PackedLinear

    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=n == 16, dtype=dtype) for n in (64, 16, 16)]
    packed = PackedLinear(linears)
    x = torch.randn(5, 64, dtype=dtype)
    with torch.inference_mode():
        for got, linear in zip(packed.split(packed(x)), linears):
            torch.testing.assert_close(got, linear(x), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
    assert packed.is_onednn == (dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
