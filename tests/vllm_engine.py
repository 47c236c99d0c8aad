"""One vLLM engine on the real model, run by tests/test_vllm.py in a process of its own:
``python tests/vllm_engine.py BACKEND FORMAT OUT.json [TENSOR_PARALLEL [MODEL]]`` (MODEL: ``tiny``,
a random-weight Llama whose heads split over two workers). Writes the greedy continuations of a few
prompts with the top raw logits of every step, and the raw logits of a fixed text read whole
(prompt logprobs), so that two backends can be compared on the same positions."""
import json
import os
import sys

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
SCORED = ("The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France, "
          "on the river Seine. A fibonacci function returns the sum of the two numbers before it.")
NEW_TOKENS = 24
TOP = 5


def _logits(entry) -> dict:
    return {str(token): float(lp.logprob) for token, lp in (entry or {}).items()}


def main(backend: str, fmt: str, out: str, tensor_parallel: str = "1", model: str = "smollm2") -> None:
    from vllm import LLM, SamplingParams

    from zen_inductor.serving import engine_args, tiny_folder

    folder = tiny_folder() if model == "tiny" else None
    llm = LLM(**engine_args(fmt, backend, max_model_len=512, model=folder), max_num_seqs=4, max_num_batched_tokens=512,
              logprobs_mode="raw_logits", tensor_parallel_size=int(tensor_parallel))
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=TOP))
    (scored,) = llm.generate([SCORED], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=TOP))
    result = {
        "greedy": [{"tokens": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                    "steps": [_logits(step) for step in o.outputs[0].logprobs]} for o in greedy],
        "scored": {"tokens": list(scored.prompt_token_ids), "positions": [_logits(p) for p in scored.prompt_logprobs]},
    }
    with open(out, "w") as f:
        json.dump(result, f)
    # vLLM's main process at interpreter exit, after it force-kills its engine process, aborted in
    # 2 of about 15 runs here ("terminate called without an active exception"): the results are
    # written, so the engine is shut down here and this process leaves without the interpreter's
    # teardown
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
