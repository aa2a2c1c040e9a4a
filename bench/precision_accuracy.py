# Accuracy of `--precision fp16` against f32 on every built-in task: per task, one Houlsby adapter
# (m=64) trained in f32, then the test split predicted in both precisions. Reports each
# precision's test accuracy, how many predictions agree, and the largest logit difference.
# Usage: python3 bench/precision_accuracy.py --ours target/release/adapterkit [--tasks mr,hedge]
#        [--epochs 3] [--max-steps 300] [--work DIR] --out FILE
# (the adapters stay in --work, so a second run only predicts)
import argparse, json, os, platform, subprocess, sys, time

TASKS = "mr,hedge,amazon,imdb,yelp,tweets,sms,bbc"


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def predict(ours, adapter, texts_file, precision):
    t = time.perf_counter()
    out = run([ours, "predict", "--adapter", adapter, "--input", texts_file, "--logits",
               "--precision", precision])
    return [json.loads(l) for l in out.splitlines() if l.strip()], time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--work", default="/tmp/adapterkit-precision")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cpu = run([sys.executable, os.path.join(os.path.dirname(__file__), "cpuinfo.py")]).strip()
    rows = []
    for task in a.tasks.split(","):
        d = os.path.join(a.work, task)
        split, adapter = os.path.join(d, "split"), os.path.join(d, "adapter")
        if not os.path.exists(os.path.join(split, "test.jsonl")):
            run([a.ours, "split", "--task", task, "--out", split])
        if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
            run([a.ours, "train", "--task", task, "--method", "adapters", "--bottleneck", "64",
                 "--epochs", str(a.epochs), "--max-steps", str(a.max_steps), "--seed", "42",
                 "--out", adapter])
        test = [json.loads(l) for l in open(os.path.join(split, "test.jsonl"))]
        texts_file = os.path.join(d, "test-texts.txt")
        with open(texts_file, "w") as f:
            for ex in test:
                # One text per line: the few texts with line breaks or tabs are flattened.
                f.write(" ".join(ex["text"].split()) + "\n")
        p32, t32 = predict(a.ours, adapter, texts_file, "f32")
        p16, t16 = predict(a.ours, adapter, texts_file, "fp16")
        labels = [ex["label"] for ex in test]
        acc = lambda p: sum(x["label"] == y for x, y in zip(p, labels)) / len(labels)
        agree = sum(x["label"] == y["label"] for x, y in zip(p32, p16))
        dlogit = max(abs(u - v) for x, y in zip(p32, p16) for u, v in zip(x["logits"], y["logits"]))
        row = {"task": task, "test_examples": len(labels), "f32_accuracy": acc(p32),
               "fp16_accuracy": acc(p16), "agreeing_predictions": agree,
               "max_abs_logit_difference": dlogit, "f32_predict_seconds": t32,
               "fp16_predict_seconds": t16}
        print(json.dumps(row), flush=True)
        rows.append(row)
    json.dump({"cpu": cpu, "date": time.strftime("%F"), "adapter": "houlsby m=64",
               "epochs": a.epochs, "max_steps": a.max_steps, "tasks": rows},
              open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
