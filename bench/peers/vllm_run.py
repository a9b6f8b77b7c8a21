"""Run the serving workload on vLLM's CPU build (in its own venv); prints `WALL_SECONDS <s>` on a line of its own.

    VLLM_PYTHON=/work/peers/vllm/bin/python .venv/bin/python bench/serve.py --model models/mini --systems vllm

vLLM logs to stdout too, and its shutdown messages come after the result: read the marked line, not the last.
"""

import json
import sys
import time

if __name__ == "__main__":  # vLLM starts worker processes that re-import this file
    from vllm import LLM, SamplingParams, TokensPrompt

    model_dir, dtype, prompts, new_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    llm = LLM(model=model_dir, dtype=dtype, skip_tokenizer_init=True, max_model_len=512)
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                            detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:8])], SamplingParams(max_tokens=2, detokenize=False))
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    wall = time.perf_counter() - start
    counts = {len(o.outputs[0].token_ids) for o in outputs}
    if len(outputs) != len(prompts) or counts != {new_tokens}:
        sys.exit(f"vLLM gave {len(outputs)} outputs of {sorted(counts)} tokens, wanted {len(prompts)} of {new_tokens}")
    print(f"\nWALL_SECONDS {wall}", flush=True)
