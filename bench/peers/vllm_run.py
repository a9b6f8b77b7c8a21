"""Run the serving workload on vLLM's CPU build (in its own venv); prints the wall seconds last.

    VLLM_PYTHON=/opt/vllm-venv/bin/python .venv/bin/python bench/serve.py --model models/mini --systems vllm
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
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    print(time.perf_counter() - start)
