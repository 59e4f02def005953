"""Runs a baked directory in the runtimes of an older stack, inside its own virtual environment
(transformers 4.57, Optimum's ORTModelForCausalLM, onnxruntime-genai); imports nothing from bake.

    python matrix.py BAKED_DIR PROMPTS_JSON N_NEW  →  one JSON line: per runtime, per prompt, the
    last prompt position's logits and the greedy continuation (token ids after the prompt)
"""

import json
import sys

import numpy as np
import torch


def transformers4(d, prompts, n):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    rows = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            lg = m(ids).logits[0, -1]
            g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        rows.append({"logits": lg.tolist(), "greedy": g[0, ids.shape[1]:].tolist()})
    return {"version": transformers.__version__, "tokenizer": type(tok).__name__, "rows": rows}


def optimum(d, prompts, n):
    # the environment sees the main one's packages beneath its own; the main diffusers needs a newer
    # huggingface_hub than transformers 4.57's, and Optimum imports it when present: hide it
    sys.modules["diffusers"] = None
    import optimum.onnxruntime as oo
    from transformers import AutoTokenizer

    m = oo.ORTModelForCausalLM.from_pretrained(d, use_cache=True, provider="CPUExecutionProvider")
    tok = AutoTokenizer.from_pretrained(d)
    rows = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        mask = torch.ones_like(ids)
        lg = m(input_ids=ids, attention_mask=mask).logits[0, -1]
        g = m.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=tok.pad_token_id or tok.eos_token_id)
        rows.append({"logits": torch.as_tensor(lg).tolist(), "greedy": g[0, ids.shape[1]:].tolist()})
    return {"rows": rows}


def genai(d, prompts, n):
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    model = og.Model(d)
    tok = AutoTokenizer.from_pretrained(d)  # the same ids as the other runtimes
    rows = []
    for p in prompts:
        ids = tok(p).input_ids
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        logits = np.array(gen.get_output("logits"))[0, -1]
        out = []
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        rows.append({"logits": logits.tolist(), "greedy": out[:n]})
    return {"version": og.__version__, "rows": rows}


if __name__ == "__main__":
    d, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    result = {}
    for name, fn in (("transformers4", transformers4), ("optimum", optimum), ("genai", genai)):
        try:
            result[name] = fn(d, prompts, n)
        except Exception as e:  # reported, and the test fails on it
            result[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    print(json.dumps(result))
