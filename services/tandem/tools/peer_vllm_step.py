"""vLLM's time a decode step, run by the Python of a virtualenv that holds vLLM (`make peer-vllm`).

Not imported by Tandem: `tandem.tools.bench_forward --peer-python` runs this file with that
Python and one JSON argument (model, dtype, batch, context, short, long, repeats, vocab). It
prints `RESULT {"step_s": ...}`: the median over `repeats` of (time of a generation of `long`
tokens - time of one of `short` tokens) / (long - short), every sequence holding `context`
random prompt tokens, greedy, ignore_eos, so prefill and start-up cancel out.
"""

import json
import random
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_num_seqs=spec["batch"],
              max_model_len=spec["context"] + spec["long"] + 8, seed=0)
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(1, spec["vocab"]) for _ in range(spec["context"])])
               for _ in range(spec["batch"])]

    def generate(num_tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == num_tokens for o in outputs)
        return elapsed

    generate(4)
    steps = sorted((generate(spec["long"]) - generate(spec["short"])) / (spec["long"] - spec["short"])
                   for _ in range(spec["repeats"]))
    print("RESULT " + json.dumps({"step_s": steps[len(steps) // 2], "all": steps}), flush=True)


if __name__ == "__main__":
    main()
