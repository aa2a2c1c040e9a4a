#!/usr/bin/env python3
"""End-to-end reference: train a Houlsby adapter with PyTorch + transformers + AdapterHub `adapters`
on a split exported by `adapterkit split` (the very same train/dev/test examples), the way a careful
AdapterHub user would: dynamic padding, length-grouped batches (as transformers' `group_by_length`),
DoubleSeqBnConfig with m = --bottleneck and GELU, LayerNorms and head trained (the paper's recipe),
AdamW (wd 0.01 except biases and LayerNorms, eps 1e-6), 10% linear warm-up then linear decay,
clipping at 1.0, dev evaluation after each epoch keeping the best, then test. Same hyperparameters as
`adapterkit train`'s defaults. Prints one JSON line.
"""
import argparse
import json
import os
import random
import resource
import time

T0 = time.perf_counter()

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--split", required=True, help="directory with train/dev/test.jsonl")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)

    from adapters import BertAdapterModel, DoubleSeqBnConfig
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    def read(name):
        rows = [json.loads(l) for l in open(os.path.join(a.split, name + ".jsonl"))]
        return [r["text"] for r in rows], [r["label"] for r in rows]

    (tr_x, tr_y), (dv_x, dv_y), (te_x, te_y) = read("train"), read("dev"), read("test")
    labels = sorted(set(tr_y))
    lid = {l: i for i, l in enumerate(labels)}

    tok = AutoTokenizer.from_pretrained(a.model)
    model = BertAdapterModel.from_pretrained(a.model)
    d = model.config.hidden_size
    model.add_adapter("task", config=DoubleSeqBnConfig(reduction_factor=d / a.bottleneck,
                                                       non_linearity="gelu"))
    model.add_classification_head("task", num_labels=len(labels))
    model.train_adapter("task")
    for n, p in model.named_parameters():
        if "LayerNorm" in n:
            p.requires_grad = True
    model.set_active_adapters("task")
    t_loaded = time.perf_counter()

    def encode(xs):
        return tok(xs, truncation=True, max_length=a.max_len)["input_ids"]

    tr_ids, dv_ids, te_ids = encode(tr_x), encode(dv_x), encode(te_x)
    tr_lab = [lid[y] for y in tr_y]

    def collate(ids_list):
        n = max(len(i) for i in ids_list)
        ids = torch.zeros(len(ids_list), n, dtype=torch.long)
        mask = torch.zeros(len(ids_list), n, dtype=torch.long)
        for r, i in enumerate(ids_list):
            ids[r, :len(i)] = torch.tensor(i)
            mask[r, :len(i)] = 1
        return ids, mask

    def grouped_batches(rng):
        # transformers' LengthGroupedSampler: shuffle, sort within mega-batches of 50 batches.
        idx = list(range(len(tr_ids)))
        rng.shuffle(idx)
        mega = a.batch * 50
        out = []
        for s in range(0, len(idx), mega):
            chunk = sorted(idx[s:s + mega], key=lambda i: -len(tr_ids[i]))
            out += [chunk[b:b + a.batch] for b in range(0, len(chunk), a.batch)]
        rng.shuffle(out)
        return out

    def evaluate(ids_all, ys):
        model.eval()
        order = sorted(range(len(ids_all)), key=lambda i: len(ids_all[i]))
        pred = [0] * len(ids_all)
        with torch.no_grad():
            for s in range(0, len(order), 64):
                b = order[s:s + 64]
                ids, mask = collate([ids_all[i] for i in b])
                p = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
                for i, v in zip(b, p):
                    pred[i] = v
        model.train()
        return sum(labels[p] == y for p, y in zip(pred, ys)) / len(ys)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if not (n.endswith("bias") or "LayerNorm" in n)],
         "weight_decay": 0.01},
        {"params": [p for n, p in trainable if n.endswith("bias") or "LayerNorm" in n],
         "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=a.lr, eps=1e-6)
    steps_per_epoch = (len(tr_ids) + a.batch - 1) // a.batch
    total = steps_per_epoch * a.epochs
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * total), total)
    rng = random.Random(a.seed)
    model.train()
    best, best_epoch, best_state, epochs = -1.0, 0, None, []
    t_train = time.perf_counter()
    for ep in range(1, a.epochs + 1):
        t_ep = time.perf_counter()
        for b in grouped_batches(rng):
            ids, mask = collate([tr_ids[i] for i in b])
            y = torch.tensor([tr_lab[i] for i in b])
            loss = model(input_ids=ids, attention_mask=mask, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        train_s = time.perf_counter() - t_ep
        dev = evaluate(dv_ids, dv_y)
        epochs.append({"epoch": ep, "dev": dev, "train_seconds": train_s})
        if dev > best:
            best, best_epoch = dev, ep
            best_state = {n: p.detach().clone() for n, p in trainable}
    with torch.no_grad():
        for n, p in trainable:
            p.copy_(best_state[n])
    test = evaluate(te_ids, te_y)
    t_end = time.perf_counter()
    print(json.dumps({
        "tool": "pytorch+adapters",
        "epochs": epochs, "best_epoch": best_epoch, "dev": best, "test": test,
        "trainable_params": sum(p.numel() for _, p in trainable),
        "train_eval_seconds": t_end - t_train,
        "load_seconds": t_loaded - T0,
        "process_seconds": t_end - T0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__, "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
