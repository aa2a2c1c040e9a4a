# Accuracy of `--precision fp16` against f32 on every built-in task: per task, one Houlsby adapter
# (m=64) trained in f32, then the test split predicted in both precisions. Reports each
# precision's test accuracy, how many predictions agree, and the largest logit difference.
# With --training: per task, the same adapter also trained with `train --precision fp16` (same
# seed and steps) and, for scale, in f32 with another seed; all three predicted in f32. Reports
# the test accuracy of each, so fp16 training's effect reads against seed-to-seed variation.
# Usage: python3 bench/precision_accuracy.py --ours target/release/adapterkit [--tasks mr,hedge]
#        [--epochs 3] [--max-steps 300] [--work DIR] [--training] --out FILE
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
    ap.add_argument("--training", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cpu = run([sys.executable, os.path.join(os.path.dirname(__file__), "cpuinfo.py")]).strip()
    rows = []
    for task in a.tasks.split(","):
        d = os.path.join(a.work, task)
        split, adapter = os.path.join(d, "split"), os.path.join(d, "adapter")
        if not os.path.exists(os.path.join(split, "test.jsonl")):
            run([a.ours, "split", "--task", task, "--out", split])
        def train(out, seed, precision):
            if not os.path.exists(os.path.join(out, "adapter_config.json")):
                run([a.ours, "train", "--task", task, "--method", "adapters", "--bottleneck",
                     "64", "--epochs", str(a.epochs), "--max-steps", str(a.max_steps), "--seed",
                     str(seed), "--precision", precision, "--out", out])
            m = json.load(open(os.path.join(out, "metrics.json")))
            return m["dev"]["accuracy"], m["test"]["accuracy"], sum(
                e["train_seconds"] for e in m["epochs"])
        train(adapter, 42, "f32")
        test = [json.loads(l) for l in open(os.path.join(split, "test.jsonl"))]
        texts_file = os.path.join(d, "test-texts.txt")
        with open(texts_file, "w") as f:
            for ex in test:
                # One text per line: the few texts with line breaks or tabs are flattened.
                f.write(" ".join(ex["text"].split()) + "\n")
        if a.training:
            row = {"task": task, "test_examples": len(test)}
            for name, seed, precision in [("f32", 42, "f32"), ("fp16", 42, "fp16"),
                                          ("f32_seed43", 43, "f32")]:
                out = adapter if name == "f32" else os.path.join(d, "adapter-" + name)
                dev, acc, secs = train(out, seed, precision)
                row[name] = {"dev_accuracy": dev, "test_accuracy": acc, "train_seconds": secs}
            p32, _ = predict(a.ours, adapter, texts_file, "f32")
            p16, _ = predict(a.ours, os.path.join(d, "adapter-fp16"), texts_file, "f32")
            row["f32_fp16_agreeing_predictions"] = sum(
                x["label"] == y["label"] for x, y in zip(p32, p16))
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
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
               "epochs": a.epochs, "max_steps": a.max_steps, "training": a.training,
               "tasks": rows},
              open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
