#!/usr/bin/env python3
"""The reverse direction of AdapterHub interoperability: load an adapter directory written by
adapterkit with the Python `adapters` library, run it, and compare its logits with ours.

    python_loads_ours.py --model BASE_DIR --adapter ADAPTER_DIR --ours OURS.jsonl [--max-len N]

OURS.jsonl is `adapterkit predict --logits` output (one JSON object per line with `text` and
`logits`). The script reports the max abs logit difference twice:
  * `hub files only`: exactly what `load_adapter(dir, use_safetensors=True)` + its head gives;
  * `with adapterkit_params`: after also copying our trained base parameters (the LayerNorms the
    paper trains, which AdapterHub has no file for) into the model.
When the adapter was trained with frozen LayerNorms, both numbers are at float precision.
It exits non-zero if the second number is above --tol (default 1e-4).
"""
import argparse
import json
import os
import sys

import torch
from adapters import BertAdapterModel
from safetensors.torch import load_file
from transformers import AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--ours", required=True)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()

    rows = [json.loads(l) for l in open(a.ours) if l.strip()]
    texts = [r["text"] for r in rows]
    ours = torch.tensor([r["logits"] for r in rows])

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = BertAdapterModel.from_pretrained(a.model)
    name = model.load_adapter(a.adapter, use_safetensors=True, set_active=True)
    model.active_head = name
    model.eval()

    def run():
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), 32):
                enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=a.max_len,
                          return_tensors="pt")
                out.append(model(**enc).logits)
        return torch.cat(out)

    def agreement(t):
        return (t.argmax(-1) == ours.argmax(-1)).float().mean().item()

    theirs = run()
    plain = (theirs - ours).abs().max().item()
    print(f"adapter `{name}`, {len(texts)} inputs")
    print(f"hub files only: max abs logit diff {plain:.3e}, argmax agreement {agreement(theirs):.4f}")

    extra = os.path.join(a.adapter, "adapterkit_params.safetensors")
    if os.path.exists(extra):
        params = load_file(extra)
        state = model.state_dict()
        missing = []
        with torch.no_grad():
            for k, v in params.items():
                key = k if k in state else "bert." + k
                if key not in state:
                    missing.append(k)
                    continue
                state[key].copy_(v)
        if missing:
            sys.exit(f"tensors of adapterkit_params.safetensors not in the model: {missing[:5]}")
        theirs = run()
        print(f"with adapterkit_params ({len(params)} tensors): max abs logit diff "
              f"{(theirs - ours).abs().max().item():.3e}, argmax agreement {agreement(theirs):.4f}")
    full = (theirs - ours).abs().max().item()
    return 0 if full <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
