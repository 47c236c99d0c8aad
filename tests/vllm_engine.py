"""One vLLM engine on the real model, run by tests/test_vllm.py in a process of its own:
``python tests/vllm_engine.py BACKEND FORMAT OUT.json``. Writes the greedy continuations of a few
prompts with the top raw logits of every step, and the raw logits of a fixed text read whole
(prompt logprobs), so that two backends can be compared on the same positions."""
import json
import sys

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
SCORED = ("The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France, "
          "on the river Seine. A fibonacci function returns the sum of the two numbers before it.")
NEW_TOKENS = 24
TOP = 5


def _logits(entry) -> dict:
    return {str(token): float(lp.logprob) for token, lp in (entry or {}).items()}


def main(backend: str, fmt: str, out: str) -> None:
    from vllm import LLM, SamplingParams

    from zen_inductor.serving import engine_args

    llm = LLM(**engine_args(fmt, backend, max_model_len=512), max_num_seqs=4, max_num_batched_tokens=512,
              logprobs_mode="raw_logits")
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=TOP))
    (scored,) = llm.generate([SCORED], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=TOP))
    result = {
        "greedy": [{"tokens": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                    "steps": [_logits(step) for step in o.outputs[0].logprobs]} for o in greedy],
        "scored": {"tokens": list(scored.prompt_token_ids), "positions": [_logits(p) for p in scored.prompt_logprobs]},
    }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
