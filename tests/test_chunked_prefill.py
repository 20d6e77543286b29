"""Chunked prefill, token for token against transformers: the coordinator's pure scheduler driving a
real split model in process (every chunk boundary of a short prompt), then the services end to end."""

from __future__ import annotations

import pytest
import torch

from cluster import start_cluster
from tandem.client import TandemClient
from tandem.coordinator.scheduler import Sampled, Scheduler, Sequence, Status
from tandem.core.modeling.attention import SequenceSlice
from tandem.core.modeling.pipeline import LocalPipeline
from test_services import assert_all_released, reference, run_concurrently

PROMPT = [5, 7, 9, 11, 13, 200, 3, 40, 41]  # 9 tokens: blocks of 4 fill up between chunks
MAX_TOKENS = 6


def held_blocks(s: Scheduler) -> set[int]:
    return {b for q in s.seqs.values() for b in q.block_table}


class Run:
    """What `generate` saw: each step's rows, and how often a partly prefilled sequence was preempted."""

    def __init__(self) -> None:
        self.steps: list[list] = []
        self.num_partial_preempted = 0


def generate(pipe: LocalPipeline, s: Scheduler, prompts: list[list[int]], max_tokens: int,
             arrivals: dict[int, int] | None = None) -> tuple[list[list[int]], Run]:
    """Greedy generation of `prompts` with `s` deciding every step and `pipe` computing it, as the
    stages would: block tables rebuilt from the steps, chunks computed and not sampled. Prompt i
    arrives before step `arrivals[i]` (default: all before the first). Checks the block
    accounting after every step."""
    arrivals = arrivals or {}
    tables: dict[str, list[int]] = {}
    outputs: dict[str, list[int]] = {}
    run = Run()
    steps = run.steps
    for n in range(1000):
        for i, p in enumerate(prompts):
            if arrivals.get(i, 0) == n:
                s.add(Sequence(f"r{i}", list(p), max_tokens, sampler="s0"))
        if len(outputs) == len(prompts):
            break
        prefilling = [q for q in s.seqs.values() if q.status == Status.PREFILLING]
        step = s.schedule()
        run.num_partial_preempted += sum(q.status == Status.WAITING for q in prefilling)
        if step is None:
            continue
        for rid in step.finished_request_ids:
            tables.pop(rid, None)
        for x in step.sequences:
            tables[x.request_id] = list(x.block_table) if x.block_table else tables[x.request_id] + x.new_block_ids
            assert tables[x.request_id] == s.seqs[x.request_id].block_table
        steps.append(list(step.sequences))
        if not step.sequences:
            continue
        slices = [SequenceSlice(x.num_computed_tokens, len(x.input_ids), tables[x.request_id]) for x in step.sequences]
        logits = pipe.step(slices, torch.tensor([t for x in step.sequences for t in x.input_ids]))
        sampled = {x.request_id: Sampled(int(row.argmax())) for x, row in zip(step.sequences, logits)
                   if not x.is_partial_prefill}
        commits = s.computed(step.step_id) + s.update(step.step_id, sampled)
        for seq, _ in commits:
            if len(seq.output_ids) == seq.max_tokens:
                outputs[seq.request_id] = list(seq.output_ids)
                s.finish(seq.request_id)
        # every block is held by a live sequence or free (cached blocks nobody holds count as free)
        assert s.blocks.num_blocks - s.blocks.num_free == len(held_blocks(s))
    assert len(outputs) == len(prompts), "the prompts did not finish"
    assert s.seqs == {} and s.in_flight == {} and s.blocks.num_free == s.blocks.num_blocks
    return [outputs[f"r{i}"] for i in range(len(prompts))], run


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def pipe(llama):
    return LocalPipeline(llama, num_stages=2, block_size=4, num_blocks=32)


@pytest.mark.parametrize("arch,prompt", [
    ("llama", PROMPT),
    ("mistral", list(range(20, 35))),  # 15 tokens: chunks cross its sliding window of 12
])
def test_every_chunk_boundary_gives_the_reference_tokens(checkpoint, reference_model, arch, prompt):
    path = checkpoint(arch)
    pipe = LocalPipeline(path, num_stages=2, block_size=4, num_blocks=32)
    want = reference(reference_model(path), prompt, MAX_TOKENS)
    num_cached = (len(prompt) - 1) // 4 * 4  # the full blocks of all but its last token
    for budget in range(1, len(prompt) + 1):
        s = Scheduler(num_blocks=32, block_size=4, max_num_seqs=8, max_num_batched_tokens=budget, max_in_flight=1)
        (got,), run = generate(pipe, s, [prompt], MAX_TOKENS)
        assert got == want, f"budget {budget}"
        prefill = [x for rows in run.steps for x in rows if x.sample_index == 0]
        assert [len(x.input_ids) for x in prefill] == [min(budget, len(prompt) - i) for i in range(0, len(prompt), budget)]
        assert [x.is_partial_prefill for x in prefill] == [True] * (len(prefill) - 1) + [False]
        # the chunks published the prompt's full blocks: the same prompt again computes only the rest
        (again,), run = generate(pipe, s, [prompt], MAX_TOKENS)
        assert again == want, f"budget {budget}, from the prefix cache"
        assert [(x.num_computed_tokens, len(x.input_ids)) for x in run.steps[0]] == [(num_cached, min(budget, len(prompt) - num_cached))]


def test_chunks_beside_decodes_and_through_preemption_give_the_reference_tokens(pipe, llama, reference_model):
    prompts = [[5, 7, 9], [100, 4, 40, 41, 42], list(range(20, 40)), [300, 17, 18, 19, 20, 21, 22]]
    want = [reference(reference_model(llama), p, 10) for p in prompts]
    # 9 blocks of 4 cannot hold all four at once: the sequences preempt each other, a partly
    # prefilled one among them (it starts its prefill over)
    s = Scheduler(num_blocks=9, block_size=4, max_num_seqs=4, max_num_batched_tokens=5, max_in_flight=1)
    got, run = generate(pipe, s, prompts, 10, arrivals={2: 3, 3: 5})
    assert got == want
    assert s.num_preemptions > 1 and run.num_partial_preempted > 0
    steps = run.steps
    mixed = [rows for rows in steps if any(x.is_partial_prefill for x in rows) and
             any(len(x.input_ids) == 1 and x.sample_index > 0 for x in rows)]
    assert mixed, "no step carried a decode and a prefill chunk together"
    assert all(sum(len(x.input_ids) for x in rows) <= 5 for rows in steps)


@pytest.mark.parametrize("preset", ["full", "baseline"])
def test_services_with_chunked_prefill_match_transformers(llama, reference_model, preset):
    prompts = [[5, 7, 9, 11, 13, 200, 3], [100, 4, 40], list(range(20, 47)), [300, 17]]
    c = start_cluster(llama, num_stages=2, num_samplers=2, preset=preset, max_num_batched_tokens=5)
    try:
        results = run_concurrently(c.endpoint, prompts, max_tokens=8, temperature=0.0, ignore_eos=True)
        for prompt, r in zip(prompts, results):
            assert list(r.token_ids) == reference(reference_model(llama), prompt, 8)
        assert_all_released(c)
    finally:
        c.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_services_on_cuda_with_chunked_prefill_match_transformers(llama, reference_model):
    # Budget 3 beside decodes: chunks of one token run through the decode CUDA graphs, and the
    # last stage picks the sampled rows' logits on the device.
    prompts = [[5, 7, 9, 11, 13, 200, 3], [100, 4, 40], list(range(20, 47))]
    c = start_cluster(llama, num_stages=2, num_samplers=2, device="cuda", max_num_batched_tokens=3)
    try:
        results = run_concurrently(c.endpoint, prompts, max_tokens=8, temperature=0.0, ignore_eos=True)
        for prompt, r in zip(prompts, results):
            assert list(r.token_ids) == reference(reference_model(llama), prompt, 8)
        assert_all_released(c)
    finally:
        c.stop()


def test_seeded_sampling_is_the_same_with_chunked_prefill_on_and_off(llama):
    prompts = [list(range(20, 47)), [5, 7, 9, 11, 13, 200, 3]]
    sampling = dict(max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=77, ignore_eos=True,
                    repetition_penalty=1.1, presence_penalty=0.2)
    got = {}
    for chunked in (True, False):
        c = start_cluster(llama, num_stages=2, num_samplers=1, max_num_batched_tokens=4,
                          enable_chunked_prefill=chunked)
        try:
            with TandemClient(c.endpoint, timeout_s=60) as client:
                got[chunked] = [list(client.generate(prompt_ids=p, **sampling).token_ids) for p in prompts]
            assert_all_released(c)
        finally:
            c.stop()
    assert got[True] == got[False]
