#!/usr/bin/env python3
"""Runs the end-to-end case interleaved (ours, theirs, ours, theirs …) in fresh processes and prints
the medians: process wall time (start to exit, model loading included), training + evaluation time,
best dev and test accuracy, peak RSS. Writes all runs to --out as JSON. With --baseline, another
adapterkit binary takes PyTorch's place (an end-to-end before/after of a change)."""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpuinfo import cpu_description  # noqa: E402


def timed(cmd, env):
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{p.stderr[-3000:]}")
    return wall, p.stdout, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def main():
    ap = argparse.ArgumentParser()
    for k in ("ours", "python", "model", "task", "split", "work", "out"):
        ap.add_argument("--" + k, required=True)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", help="another adapterkit binary in PyTorch's place")
    ap.add_argument("--precision", default="f32", choices=["f32", "fp16"],
                    help="ours with `train --precision` (PyTorch stays f32, its fastest CPU training)")
    a = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads))
    runs = []

    def ours(binary, tool, r):
        out = os.path.join(a.work, f"{tool}-{r}")
        wall, _, _ = timed([binary, "train", "--model", a.model, "--task", a.task, "--method", "adapters",
                            "--bottleneck", "64", "--epochs", str(a.epochs), "--seed", "42",
                            "--precision", a.precision, "--out", out], env)
        m = json.load(open(os.path.join(out, "metrics.json")))
        return {"tool": tool, "round": r, "process_seconds": wall,
                "train_eval_seconds": m["seconds"], "dev": m["dev"]["accuracy"],
                "test": m["test"]["accuracy"], "best_epoch": m["best_epoch"],
                "trainable_params": m["trainable_params"],
                "epochs": [{"epoch": e["epoch"], "dev": e["dev"]["accuracy"],
                            "train_seconds": e["train_seconds"]} for e in m["epochs"]]}

    def theirs(r):
        if a.baseline:
            return ours(a.baseline, "baseline", r)
        wall, stdout, _ = timed([a.python, os.path.join(os.path.dirname(__file__), "e2e_train.py"),
                                 "--model", a.model, "--split", a.split, "--epochs", str(a.epochs),
                                 "--threads", str(a.threads)], env)
        run = json.loads(stdout.strip().splitlines()[-1])
        run.update({"round": r, "process_seconds": wall})
        return run

    for r in range(a.rounds):
        # Which side runs first alternates by round: with a fixed order, this VM's drift over
        # minutes favoured one side.
        sides = [lambda: ours(a.ours, "adapterkit", r), lambda: theirs(r)]
        for side in (sides if r % 2 == 0 else sides[::-1]):
            runs.append(side())
            print(json.dumps(runs[-1]), flush=True)
    def med(tool, key):
        return statistics.median(x[key] for x in runs if x["tool"].startswith(tool))
    other = "baseline" if a.baseline else "pytorch"
    summary = {k: {"adapterkit": med("adapterkit", k), other: med(other, k)}
               for k in ("process_seconds", "train_eval_seconds", "dev", "test")}
    speed = summary["process_seconds"][other] / summary["process_seconds"]["adapterkit"]
    def of_round(r, mine):
        return next(x for x in runs if x["round"] == r and (x["tool"] == "adapterkit") == mine)
    pairs = [of_round(r, False)["process_seconds"] / of_round(r, True)["process_seconds"]
             for r in range(a.rounds)]
    print(f"\n{a.task}, {a.epochs} epochs, {a.threads} threads, {a.rounds} rounds (medians)")
    for k, v in summary.items():
        print(f"  {k:<20} adapterkit {v['adapterkit']:.4g}   {other} {v[other]:.4g}")
    print(f"  speed-up (process wall, theirs/ours): {speed:.2f}x; per pair: "
          + ", ".join(f"{p:.2f}" for p in pairs))
    json.dump({"cpu": cpu_description(), "task": a.task, "epochs": a.epochs, "threads": a.threads,
               "baseline": a.baseline, "precision": a.precision, "runs": runs,
               "summary": summary, "speedup": speed, "pair_speedups": pairs,
               "date": time.strftime("%Y-%m-%d")}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
