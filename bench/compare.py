#!/usr/bin/env python3
"""Side-by-side runner: adapterkit vs PyTorch + AdapterHub on the same cases, interleaved
(A B A B ...), each run a fresh process with warm-up steps then timed steps; reports the median of the
per-run medians, the throughput ratio (ours / theirs), peak RSS of each, and our achieved GFLOP/s next
to the same run's measured GEMM peak. Standard library only; called by bench/run.sh.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpuinfo import cpu_description  # noqa: E402

# The cases that run an adapter, and so take --adapter-config.
ADAPTER_CASES = ("adapter-train", "infer-adapter", "latency")


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_model():
    return cpu_description()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--python", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cases", default="adapter-train,full-train,infer-base,infer-adapter")
    ap.add_argument("--shapes", default="minilm,bert-base")
    ap.add_argument("--sizes", default="16x128,32x64")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapter-configs", default="",
                    help="AdapterHub configuration strings separated by ';' (they contain commas), each "
                    "run in the adapter cases on both sides, e.g. 'lora[r=8];ia3;prefix_tuning'; "
                    "empty: Houlsby m=64")
    ap.add_argument("--precision", default="f32", choices=["f32", "fp16"],
                    help="inference and adapter-training cases: ours with --precision, PyTorch under autocast in "
                    "--pytorch-precision (default: the same)")
    ap.add_argument("--pytorch-precision", choices=["f32", "fp16", "bf16"])
    ap.add_argument("--baseline", help="another adapterkit binary in PyTorch's place (before/after "
                    "runs of a change: 'ratio' is then baseline time / ours)")
    a = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for shape in a.shapes.split(","):
        for size in a.sizes.split(","):
            b, s = size.split("x")
            for threads in a.threads.split(","):
                for case, spec in [(c, m) for c in a.cases.split(",")
                                   for m in (a.adapter_configs.split(";") if c in ADAPTER_CASES else [""])]:
                    common = ["--case", case, "--shape", shape, "--batch", b, "--seq", s,
                              "--threads", threads, "--steps", str(a.steps), "--warmup", "1"]
                    if spec:
                        common += ["--adapter-config", spec]
                    ours, theirs = [], []
                    ours_cmd = ([a.ours, "bench", "--model", a.model] + common
                                + (["--precision", a.precision] if a.precision != "f32" else []))
                    theirs_cmd = ([a.baseline, "bench", "--model", a.model] + common if a.baseline else
                                  [a.python, os.path.join(here, "pytorch_step.py"), "--model", a.model,
                                   "--precision", a.pytorch_precision or a.precision]
                                  + common)
                    for i in range(a.rounds):
                        # A B, B A, ...: whichever runs second in a pair runs on a warmer machine
                        # (a before/after of identical builds read 0.90 with a fixed order).
                        if i % 2 == 0:
                            ours.append(run(ours_cmd))
                            theirs.append(run(theirs_cmd))
                        else:
                            theirs.append(run(theirs_cmd))
                            ours.append(run(ours_cmd))
                    o = statistics.median(r["median_seconds"] for r in ours)
                    t = statistics.median(r["median_seconds"] for r in theirs)
                    row = {
                        "shape": shape, "batch": int(b), "seq": int(s), "threads": int(threads), "case": case,
                        "adapter_config": spec or None,
                        "precision": a.precision,
                        "pytorch_precision": None if a.baseline else (a.pytorch_precision or a.precision),
                        "ours_s": o, "pytorch_s": t, "throughput_ratio": t / o,
                        "pair_ratios": [p["median_seconds"] / q["median_seconds"] for p, q in zip(theirs, ours)],
                        "ours_rss_gb": max(r["peak_rss_bytes"] for r in ours) / 1e9,
                        "pytorch_rss_gb": max(r["peak_rss_bytes"] for r in theirs) / 1e9,
                        # FLOPs are modelled for Houlsby adapters and the base only (null otherwise).
                        "ours_gflops": median_or_none(r["achieved_gflops"] for r in ours),
                        "gemm_peak_gflops": statistics.median(r["gemm_peak_gflops"] for r in ours),
                        "pytorch_gflops": (ours[0]["gflop_per_step"] / t
                                           if ours[0]["gflop_per_step"] is not None else None),
                    }
                    if case == "latency":
                        row["ours_p99_s"] = statistics.median(r["p99_seconds"] for r in ours)
                        row["pytorch_p99_s"] = statistics.median(r["p99_seconds"] for r in theirs)
                        print(f"latency p50 ours {o * 1e3:.2f} ms / pytorch {t * 1e3:.2f} ms; p99 ours "
                              f"{row['ours_p99_s'] * 1e3:.2f} ms / pytorch {row['pytorch_p99_s'] * 1e3:.2f} ms", flush=True)
                    rows.append(row)
                    label = f"{case} {spec}" if spec else case
                    print(f"{shape:<9} {b:>3}x{s:<4} t{threads} {label:<28} ours {o:7.3f}s  pytorch {t:7.3f}s  "
                          f"ratio {t / o:5.2f} (pairs {' '.join(f'{r:.2f}' for r in row['pair_ratios'])})  rss {row['ours_rss_gb']:.2f}/{row['pytorch_rss_gb']:.2f} GB  "
                          + (f"{row['ours_gflops']:.0f} GFLOP/s of {row['gemm_peak_gflops']:.0f} peak "
                             f"(pytorch {row['pytorch_gflops']:.0f})" if row["ours_gflops"] is not None
                             else f"GEMM peak {row['gemm_peak_gflops']:.0f} GFLOP/s"), flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
              "rounds": a.rounds, "steps": a.steps, "pytorch": theirs[-1].get("torch"),
              "adapters": theirs[-1].get("adapters"), "baseline": a.baseline, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
