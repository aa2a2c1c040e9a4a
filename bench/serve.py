#!/usr/bin/env python3
"""Serving benchmark: `adapterkit serve` with 1, 8 and 64 adapters on real MiniLM, loaded by
`adapterkit loadgen` with the same offered load (same clients, same texts), every answer checked
against `adapterkit predict` of its own adapter; PyTorch + AdapterHub serving the same requests
(bench/serve_torch.py) for the ratio; RSS per adapter count; a run with adapters reloaded and
churned during traffic. Rounds interleave the configurations; medians are reported.
`--precision fp16` runs ours (serve and the predict it is checked against) with fp16 products; a
row's fp16 answer can move by about 1e-3 with its batchmates (see README), so the check's
tolerance is then 2e-3; PyTorch (bench/serve_torch.py) stays f32.
Standard library only; run through bench/run-serve.sh.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from compare import cpu_model

TASKS = ["mr", "hedge", "amazon", "imdb", "yelp", "tweets", "sms", "bbc"]
TOKEN = "bench-admin-token-0123456789abcdef"


def sample(src, dst, n):
    """n lines spread evenly over src (split files are grouped by label)."""
    with open(src) as f:
        lines = f.readlines()
    step = max(1, len(lines) // n)
    with open(dst, "w") as g:
        g.writelines(lines[::step][:n])


def prepare(a):
    """Trains one small real adapter per built-in task (cached), returns their directories."""
    dirs = {}
    for t in TASKS:
        data = os.path.join(a.work, "data", t)
        if not os.path.exists(os.path.join(data, "test.jsonl")):
            subprocess.run([a.ours, "split", "--task", t, "--out", data], check=True, capture_output=True)
        small = os.path.join(a.work, "small", t)
        os.makedirs(small, exist_ok=True)
        for split, n in [("train", 320), ("dev", 64), ("test", 64)]:
            sample(os.path.join(data, f"{split}.jsonl"), os.path.join(small, f"{split}.jsonl"), n)
        out = os.path.join(a.work, "adapters", t)
        if not os.path.exists(os.path.join(out, "adapterkit.json")):
            print(f"training {t}", file=sys.stderr, flush=True)
            subprocess.run([a.ours, "train", "--model", a.model, "--name", t,
                            "--train-file", os.path.join(small, "train.jsonl"),
                            "--dev-file", os.path.join(small, "dev.jsonl"),
                            "--test-file", os.path.join(small, "test.jsonl"),
                            "--epochs", "1", "--max-len", "64", "--freeze-layernorms",
                            "--out", out], check=True, capture_output=True)
        dirs[t] = out
    return dirs


def texts_of(a):
    texts = []
    per = {}
    for t in TASKS:
        with open(os.path.join(a.work, "small", t, "test.jsonl")) as f:
            per[t] = [" ".join(json.loads(l)["text"].split()) for l in f][:50]
    for i in range(50):
        for t in TASKS:
            if i < len(per[t]) and per[t][i]:
                texts.append(per[t][i])
    return texts


def expected(a, dirs, texts):
    """`adapterkit predict` of every adapter on every text: {task: [probabilities per text]}."""
    path = os.path.join(a.work, "texts.txt")
    with open(path, "w") as f:
        f.write("\n".join(texts) + "\n")
    out = {}
    for t, d in dirs.items():
        r = subprocess.run([a.ours, "predict", "--model", a.model, "--adapter", d, "--input", path,
                            "--precision", a.precision], check=True, capture_output=True, text=True)
        out[t] = [json.loads(l)["probabilities"] for l in r.stdout.splitlines()]
        assert len(out[t]) == len(texts), (t, len(out[t]), len(texts))
    return out


def make_root(a, dirs, n):
    """A root with n adapter directories: the 8 trained ones, then copies of them (mr-1, ...)."""
    root = os.path.join(a.work, f"root{n}")
    names = {}
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for i in range(n):
        src = TASKS[i % len(TASKS)]
        name = src if i < len(TASKS) else f"{src}-{i // len(TASKS)}"
        shutil.copytree(dirs[src], os.path.join(root, name))
        names[name] = src
    return root, names


def request_file(a, names, texts, exp, n):
    path = os.path.join(a.work, f"requests{n}.jsonl")
    order = list(names)
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            name = order[i % len(order)]
            f.write(json.dumps({"adapter": name, "text": text, "expected": exp[names[name]][i]}) + "\n")
    return path


def dir_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def start(cmd):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    url = next((w for w in line.split() if w.startswith("http://")), None)
    if url is None:
        p.kill()
        raise SystemExit(f"server did not start: {cmd}: {line!r}")
    return p, url


def rss_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def loadgen(a, url, requests, label, tolerance, extra=()):
    warm = [a.ours, "loadgen", "--url", url, "--requests", requests, "--clients", "4", "--total", "64",
            "--tolerance", str(tolerance)]
    subprocess.run(warm, check=True, capture_output=True)
    cmd = [a.ours, "loadgen", "--url", url, "--requests", requests, "--clients", str(a.clients),
           "--total", str(a.total), "--max-seconds", str(a.max_seconds), "--tolerance", str(tolerance),
           "--label", label, *extra]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print(r.stderr.strip().splitlines()[-1], file=sys.stderr, flush=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--python", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--total", type=int, default=1600)
    ap.add_argument("--max-seconds", type=float, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--precision", default="f32", choices=["f32", "fp16"])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    tolerance = 1e-5 if a.precision == "f32" else 2e-3
    os.makedirs(a.work, exist_ok=True)
    dirs = prepare(a)
    texts = texts_of(a)
    exp = expected(a, dirs, texts)
    token = os.path.join(a.work, "token")
    with open(token, "w") as f:
        f.write(TOKEN)
    configs = {}
    for n in (1, 8, 64):
        root, names = make_root(a, dirs, n)
        configs[n] = (root, names, request_file(a, names, texts, exp, n))
    runs = {k: [] for k in ["ours-1", "ours-8", "ours-64", "torch-8"]}
    rss = {}
    for rnd in range(a.rounds):
        for n in (1, 8, 64):
            root, names, req = configs[n]
            p, url = start([a.ours, "serve", "--model", a.model, "--adapters", root, "--bind", "127.0.0.1:0",
                            "--admin-token-file", token, "--precision", a.precision])
            try:
                runs[f"ours-{n}"].append(loadgen(a, url, req, f"ours-{n}", tolerance))
                rss.setdefault(n, []).append(rss_kib(p.pid))
            finally:
                p.terminate()
                p.wait()
            if n == 8 and not a.no_torch:
                p, url = start([a.python, "bench/serve_torch.py", "--model", a.model, "--adapters", root,
                                "--max-len", "64"])
                try:
                    # AdapterHub computes the same function; float differences are larger than ours.
                    runs["torch-8"].append(loadgen(a, url, req, "torch-8", 1e-4))
                finally:
                    p.terminate()
                    p.wait()
    # Hot reload and churn during mixed traffic over 8 adapters.
    root, names, req = configs[8]
    p, url = start([a.ours, "serve", "--model", a.model, "--adapters", root, "--bind", "127.0.0.1:0",
                    "--admin-token-file", token, "--precision", a.precision])
    try:
        churn = loadgen(a, url, req, "ours-8-reload", tolerance,
                        ["--reload", "mr=mr", "--reload", "sms=sms", "--admin-token-file", token])
    finally:
        p.terminate()
        p.wait()

    def med(key, field):
        v = [r[field] if not isinstance(field, tuple) else r[field[0]][field[1]] for r in runs[key]]
        return statistics.median(v) if v else None

    summary = {}
    for k in runs:
        if runs[k]:
            summary[k] = {"requests_per_s": med(k, "requests_per_s"), "p50_ms": med(k, ("latency_ms", "p50")),
                          "p99_ms": med(k, ("latency_ms", "p99"))}
    bytes_extra = sum(dir_bytes(os.path.join(configs[64][0], n)) for n in list(configs[64][1])[1:])
    rss1 = statistics.median(r["VmRSS"] for r in rss[1]) * 1024
    rss64 = statistics.median(r["VmRSS"] for r in rss[64]) * 1024
    all_runs = [r for v in runs.values() for r in v] + [churn]
    ours_runs = [r for k, v in runs.items() if k.startswith("ours") for r in v] + [churn]
    report = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "cores": os.cpu_count(),
        "precision": a.precision, "tolerance": tolerance,
        "clients": a.clients, "total_per_run": a.total, "rounds": a.rounds, "texts": len(texts),
        "summary": summary,
        "mixed8_over_single": summary["ours-8"]["requests_per_s"] / summary["ours-1"]["requests_per_s"],
        "ours8_over_torch8": (summary["ours-8"]["requests_per_s"] / summary["torch-8"]["requests_per_s"]
                              if "torch-8" in summary else None),
        "rss_bytes": {"1": rss1, "64": rss64, "extra_adapter_file_bytes_63": bytes_extra,
                      "bound_rss1_plus_1.5x": rss1 + 1.5 * bytes_extra, "within_bound": rss64 <= rss1 + 1.5 * bytes_extra},
        "correctness_ours": {k: sum(r[k] for r in ours_runs) for k in
                             ["ok", "lost", "server_errors", "cross_routed", "mismatched", "checked"]},
        "max_abs_diff_ours": max(r["max_abs_diff"] for r in ours_runs),
        "reload_run": churn,
        "runs": runs,
        "all_sent": sum(r["sent"] for r in all_runs),
    }
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: report[k] for k in ["cpu", "summary", "mixed8_over_single", "ours8_over_torch8",
                                             "rss_bytes", "correctness_ours", "max_abs_diff_ours"]}, indent=2))
    print(f"reload run: {churn['ok']} ok, {churn['server_errors']} 5xx, {churn['lost']} lost, "
          f"{churn['churn_ops']} admin ops, {churn['churn_failures']} failed")


if __name__ == "__main__":
    sys.exit(main())
