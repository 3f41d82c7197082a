"""Runs a real vLLM (CPU) in this process on a fixed set of prompts and writes what it produced.

    python engine_run.py SPEC.json OUT.json

SPEC: {"model": DIR, "prompts": [[token ids]...], "max_tokens": N, "kv_transfer_config": {...}
or null, "rounds": 1, "one_by_one": false, "warmup": [[token ids]...]}. OUT: one list per round,
one entry per prompt: token_ids, cumulative_logprob, num_cached_tokens, seconds (of the generate
call that produced it). Started as a subprocess by the tests and the benchmark
(vLLM starts its own processes with spawn, so this must be a script with a main guard).
"""

import json
import sys
import time


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        model=spec["model"],
        max_model_len=spec.get("max_model_len", 2048),
        enforce_eager=True,
        dtype="bfloat16",
        seed=0,
        enable_prefix_caching=True,
    )
    if spec.get("kv_transfer_config"):
        kwargs["kv_transfer_config"] = spec["kv_transfer_config"]
    llm = LLM(**kwargs)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16), logprobs=1)
    if spec.get("warmup"):
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["warmup"]], params, use_tqdm=False)
    rounds = []
    for _ in range(spec.get("rounds", 1)):
        results = []
        for prompt in prompts if spec.get("one_by_one") else [prompts]:
            started = time.perf_counter()
            outs = llm.generate(prompt, params, use_tqdm=False)
            elapsed = time.perf_counter() - started
            results += [
                {
                    "token_ids": list(o.outputs[0].token_ids),
                    "cumulative_logprob": o.outputs[0].cumulative_logprob,
                    "num_cached_tokens": o.num_cached_tokens,
                    "seconds": elapsed,
                }
                for o in outs
            ]
        rounds.append(results)
    json.dump(rounds, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
