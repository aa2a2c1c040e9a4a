#!/usr/bin/env python3
"""Start-up case: a fresh process loads the base model and one adapter and predicts one sentence.
adapterkit's CLI (`adapterkit predict`) against a Python script doing the same with transformers +
AdapterHub (each loading an adapter in its own format: ours from `adapterkit train`, theirs saved by
`save_adapter`/`save_head`). Interleaved A B A B; prints the median wall time of each and the ratio.
Standard library only; run through bench/run-startup.sh.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SENTENCE = "a gripping, beautifully acted film that stays with you."

PY_PREPARE = r"""
import sys
from adapters import BertAdapterModel, DoubleSeqBnConfig
m = BertAdapterModel.from_pretrained(sys.argv[1])
m.add_adapter("mr", config=DoubleSeqBnConfig(reduction_factor=6, non_linearity="gelu"))
m.add_classification_head("mr", num_labels=2)
m.save_adapter(sys.argv[2], "mr", with_head=True)
"""

PY_PREDICT = r"""
import sys, json
import torch
torch.set_num_threads(2)
from transformers import AutoTokenizer
from adapters import BertAdapterModel
m = BertAdapterModel.from_pretrained(sys.argv[1])
name = m.load_adapter(sys.argv[2], with_head=True)
m.set_active_adapters(name)
m.eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
with torch.no_grad():
    p = m(**tok(sys.argv[3], return_tensors="pt")).logits.softmax(-1)[0].tolist()
print(json.dumps({"probabilities": p}))
"""


def timed(cmd, env=None):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--python", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="ak-startup-")
    ours_dir = os.path.join(work, "ours")
    theirs_dir = os.path.join(work, "theirs")
    subprocess.run([a.ours, "train", "--task", "mr", "--max-steps", "1", "--epochs", "1", "--out", ours_dir],
                   check=True, capture_output=True)
    subprocess.run([a.python, "-c", PY_PREPARE, a.model, theirs_dir], check=True, capture_output=True)
    env = dict(os.environ, RAYON_NUM_THREADS="2")
    ours, theirs = [], []
    for _ in range(a.rounds):
        ours.append(timed([a.ours, "predict", "--model", a.model, "--adapter", ours_dir, SENTENCE], env))
        theirs.append(timed([a.python, "-c", PY_PREDICT, a.model, theirs_dir, SENTENCE]))
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"start-up to first prediction: adapterkit {o:.3f} s, python {t:.3f} s, ours/theirs {o / t:.3f}")
    with open(a.out, "w") as f:
        json.dump({"ours_s": ours, "python_s": theirs, "ours_median_s": o, "python_median_s": t,
                   "ratio": o / t}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
