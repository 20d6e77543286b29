"""vLLM's time a decode step, run by the Python of a virtualenv that holds vLLM (`make peer-vllm`).

Not imported by Tandem: `tandem.tools.bench_forward --peer-python` runs this file with that
Python and one JSON argument (model, dtype, batch, context, steps, vocab), with vLLM's engine in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0). It times the model runner's own calls of each
step, the forward pass (`execute_model`) and the sampling that follows (`sample_tokens`), while
`batch` sequences of `context` random prompt tokens generate `steps` greedy tokens each, and
prints `RESULT {"step_s": ..., "forward_s": ..., "sample_s": ...}`, the medians over the steps:
what vLLM's scheduler, detokenizer and front end do around them is left out, as Tandem's
StageModel benchmark leaves out its serving.
"""

import json
import random
import statistics
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_num_seqs=spec["batch"],
              max_model_len=spec["context"] + spec["steps"] + 8, seed=0)
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    worker = executor.driver_worker
    runner = getattr(worker, "worker", worker).model_runner
    calls: dict[str, list[float]] = {"execute_model": [], "sample_tokens": []}
    for name, times in calls.items():
        original = getattr(runner, name)

        def timed(*args, _original=original, _times=times, **kwargs):
            start = time.perf_counter()
            result = _original(*args, **kwargs)
            _times.append(time.perf_counter() - start)
            return result

        setattr(runner, name, timed)

    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1, spec["vocab"]) for _ in range(spec["context"])])
               for _ in range(spec["batch"])]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    for times in calls.values():
        times.clear()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=spec["steps"], ignore_eos=True),
                           use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == spec["steps"] for o in outputs)
    forward = statistics.median(calls["execute_model"])
    sample = statistics.median(calls["sample_tokens"]) if calls["sample_tokens"] else 0.0
    print("RESULT " + json.dumps({"step_s": forward + sample, "forward_s": forward, "sample_s": sample}), flush=True)


if __name__ == "__main__":
    main()
