"""Greedy generation with vLLM's offline `LLM`, for the vLLM tests (run in .venv-vllm).

    python run_llm.py MODEL_DIR OUT.json --prompts PROMPTS.json [--tp N] [--max-tokens 32]

Writes {"tokens": [[ids...] per prompt], "top2": [[[id, logprob], [id, logprob]] per step],
"load_s": ..., "generate_s": ...}. fp32, eager mode (no torch.compile warm-up: minutes on
a 2-core CPU, and identical numerics are what the tests compare).
"""

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(a.model, dtype="float32", tensor_parallel_size=a.tp, enforce_eager=True,
              max_model_len=256, seed=0)
    t1 = time.perf_counter()
    prompts = json.load(open(a.prompts))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=a.max_tokens, logprobs=2,
                                                ignore_eos=True))
    t2 = time.perf_counter()
    res = {"tokens": [], "top2": [], "texts": [], "load_s": t1 - t0, "generate_s": t2 - t1}
    for o in outs:
        c = o.outputs[0]
        res["tokens"].append(list(c.token_ids))
        res["texts"].append(c.text)
        res["top2"].append([sorted(([t, lp.logprob] for t, lp in step.items()), key=lambda p: -p[1])[:2]
                            for step in c.logprobs])
    with open(a.out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":  # vLLM starts worker processes that re-import this file
    main()
