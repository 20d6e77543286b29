"""Keystone: the model split into stages equals transformers on the same checkpoint."""

from __future__ import annotations

import pytest
import torch

from tandem.core.modeling.pipeline import LocalPipeline

PROMPTS = [
    [5, 7, 9, 11, 13, 200, 3],
    [100, 4, 40],
    list(range(20, 47)),  # longer than the Mistral sliding window and several KV blocks
    [300],
]
MAX_NEW_TOKENS = 14
SPLITS = [
    pytest.param(1, None, id="1-stage"),
    pytest.param(2, None, id="2-stages-even"),
    pytest.param(3, [1, 4], id="3-stages-uneven"),
]


def reference_generate(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].tolist(), torch.stack(out.logits, 1)[0].float()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("num_stages,boundaries", SPLITS)
def test_split_model_matches_transformers(arch, num_stages, boundaries, checkpoint, reference_model):
    path = checkpoint(arch)
    if boundaries and max(boundaries) >= reference_model(path).config.num_hidden_layers:
        boundaries = [1, 3]
    pipe = LocalPipeline(path, num_stages=num_stages, stage_boundaries=boundaries, block_size=4, num_blocks=96)
    assert len(pipe.stages) == num_stages
    got = pipe.generate(PROMPTS, MAX_NEW_TOKENS, stop_token_ids=(), keep_logits=True)
    for prompt, ids, logits in zip(PROMPTS, got.output_ids, got.logits):
        want_ids, want_logits = reference_generate(reference_model(path), prompt)
        assert ids == want_ids, f"prompt of {len(prompt)} tokens diverged"
        torch.testing.assert_close(logits, want_logits, atol=2e-4, rtol=1e-4)
    # Every block went back to the pool.
    assert pipe.allocator.num_free == 96


# bfloat16 keeps 8 significant bits: at logits of magnitude 2 to 4 one step is 0.0156. Tandem and
# transformers round at different points (fused projections, another matmul kernel, attention in
# float32), so logits may differ by a few steps; 0.1 is about six, and 3% of the logits' range here.
BF16_LOGITS_ATOL = 0.1
# A greedy pick may differ from transformers' only between near-ties: the token Tandem chose
# scores within this much of the reference's best.
BF16_ARGMAX_SLACK = 0.05


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_bfloat16_matches_transformers_in_bfloat16(arch, checkpoint):
    """In bf16 the reference is transformers in bf16, fed Tandem's own tokens (teacher forcing), so
    an early near-tie cannot make the rest of the comparison meaningless."""
    from transformers import AutoModelForCausalLM

    path = checkpoint(arch)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    pipe = LocalPipeline(path, num_stages=2, dtype="bfloat16", block_size=4, num_blocks=96)
    got = pipe.generate(PROMPTS, MAX_NEW_TOKENS, stop_token_ids=(), keep_logits=True)
    for prompt, ids, logits in zip(PROMPTS, got.output_ids, got.logits):
        with torch.no_grad():
            want = reference(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
        torch.testing.assert_close(logits, want, atol=BF16_LOGITS_ATOL, rtol=0)
        chosen = want.gather(1, torch.tensor(ids)[:, None])[:, 0]
        assert (want.max(dim=-1).values - chosen).max() <= BF16_ARGMAX_SLACK


def test_batch_composition_does_not_change_output(checkpoint):
    """A prompt alone and the same prompt batched with others give the same tokens."""
    pipe = LocalPipeline(checkpoint("llama"), num_stages=2, block_size=8, num_blocks=64)
    batched = pipe.generate(PROMPTS, 8, stop_token_ids=()).output_ids
    alone = [pipe.generate([p], 8, stop_token_ids=()).output_ids[0] for p in PROMPTS]
    assert batched == alone


def test_stops_at_eos(checkpoint, reference_model):
    path = checkpoint("qwen2")
    pipe = LocalPipeline(path, block_size=4, num_blocks=64)
    first = pipe.generate([PROMPTS[0]], 6, stop_token_ids=()).output_ids[0]
    stop = first[2]
    out = pipe.generate([PROMPTS[0]], 6, stop_token_ids=(stop,)).output_ids[0]
    assert out == first[: first.index(stop) + 1]


def test_sharded_checkpoint_loads(tmp_path, reference_model):
    from conftest import make_checkpoint

    path = make_checkpoint("llama", tmp_path / "sharded", max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").exists()
    pipe = LocalPipeline(path, num_stages=2, block_size=4, num_blocks=64)
    got = pipe.generate(PROMPTS[:2], 6, stop_token_ids=()).output_ids
    for prompt, ids in zip(PROMPTS[:2], got):
        assert ids == reference_generate(reference_model(path), prompt)[0][:6]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_transformers(checkpoint, reference_model):
    path = checkpoint("llama")
    pipe = LocalPipeline(path, num_stages=2, device="cuda", dtype="float32", block_size=4, num_blocks=96)
    got = pipe.generate(PROMPTS, MAX_NEW_TOKENS, stop_token_ids=()).output_ids
    for prompt, ids in zip(PROMPTS, got):
        assert ids == reference_generate(reference_model(path), prompt)[0]


# Decode steps through core.cuda_graphs: batches padded to the next graph size, contexts to the next
# power of two of blocks, padded rows writing only the spare block. On CPU the padded path runs
# eagerly, which checks the padding; on CUDA the graphs are captured and replayed.
GRAPH_PROMPTS = [*PROMPTS, [1, 2]]  # five sequences: a batch padded to six


def check_decode_graphs(pipe: LocalPipeline, path, reference_model) -> None:
    got = pipe.generate(GRAPH_PROMPTS, MAX_NEW_TOKENS, stop_token_ids=(), keep_logits=True)
    for prompt, ids, logits in zip(GRAPH_PROMPTS, got.output_ids, got.logits):
        want_ids, want_logits = reference_generate(reference_model(path), prompt)
        assert ids == want_ids, f"prompt of {len(prompt)} tokens diverged"
        torch.testing.assert_close(logits, want_logits, atol=2e-4, rtol=1e-4)
    for graphs in pipe.graphs:
        assert graphs.num_replays == MAX_NEW_TOKENS - 1  # every decode step, none of the prefill
        assert {batch for batch, _ in graphs.graphs} == {6}
        assert {blocks for _, blocks in graphs.graphs} == {8, 16}  # longest context 28..40 tokens: 7..10 blocks of 4
    assert pipe.allocator.num_free == 96


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_padded_decode_path_matches_transformers(arch, checkpoint, reference_model):
    path = checkpoint(arch)
    pipe = LocalPipeline(path, num_stages=2, block_size=4, num_blocks=96, decode_graphs=True)
    check_decode_graphs(pipe, path, reference_model)
    assert all(entry.graph is None for g in pipe.graphs for entry in g.graphs.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_match_transformers(checkpoint, reference_model):
    path = checkpoint("llama")
    pipe = LocalPipeline(path, num_stages=2, device="cuda", dtype="float32", block_size=4, num_blocks=96,
                         decode_graphs=True)
    check_decode_graphs(pipe, path, reference_model)
    assert all(entry.graph is not None for g in pipe.graphs for entry in g.graphs.values())


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_decode_in_groups_of_similar_length_matches_transformers(arch, checkpoint, reference_model, monkeypatch):
    """With groups free (no fixed cost), the prompts of 1 to 27 tokens decode in groups of
    similar length, each padded to its own longest; the tokens and logits still equal
    transformers', across Mistral's sliding window too."""
    from tandem.core.modeling import attention, decode_gather

    monkeypatch.setattr(decode_gather, "GROUP_COST_BLOCKS", 0)
    monkeypatch.setattr(attention, "CPU_KERNEL", False)  # groups belong to the portable gather path
    built = []
    original = decode_gather.decode_groups

    def decode_groups(*args, **kwargs):
        groups = original(*args, **kwargs)
        built.append(len(groups))
        return groups

    monkeypatch.setattr(decode_gather, "decode_groups", decode_groups)
    two_stages_match_transformers(checkpoint(arch), reference_model)
    assert max(built) >= 2  # the decode steps did run in groups


def two_stages_match_transformers(path, reference_model) -> None:
    """PROMPTS through a 2-stage split: the tokens and logits equal transformers', and every
    block goes back to the pool."""
    pipe = LocalPipeline(path, num_stages=2, block_size=4, num_blocks=96)
    got = pipe.generate(PROMPTS, MAX_NEW_TOKENS, stop_token_ids=(), keep_logits=True)
    for prompt, ids, logits in zip(PROMPTS, got.output_ids, got.logits):
        want_ids, want_logits = reference_generate(reference_model(path), prompt)
        assert ids == want_ids, f"prompt of {len(prompt)} tokens diverged"
        torch.testing.assert_close(logits, want_logits, atol=2e-4, rtol=1e-4)
    assert pipe.allocator.num_free == 96


def test_decode_groups_balance_padding_against_their_fixed_cost():
    from tandem.core.modeling.decode_gather import decode_groups

    blocks = [30, 1, 60, 1, 2, 31]
    assert decode_groups(blocks, overhead=0) == [[1, 3, 4], [0, 2, 5]]  # 1, 1, 2 | 30, 31, 60
    assert decode_groups(blocks, overhead=40) == [[1, 3, 4], [0, 2, 5]]  # 46 + 220 < 400
    assert decode_groups(blocks, overhead=200) == [[0, 1, 2, 3, 4, 5]]  # 206 + 380 > 560
    assert decode_groups([5, 6, 7], overhead=0) == [[0, 1, 2]]
    assert decode_groups([1, 4, 16, 64], overhead=0) == [[0], [1], [2], [3]]
    assert decode_groups([], overhead=0) == []
