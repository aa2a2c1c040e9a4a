#!/usr/bin/env python3
"""PyTorch + transformers + AdapterHub `adapters` reference for `adapterkit bench`: the same cases,
shapes, threads and input construction (full-length rows of random ids, [CLS] first), timed the same
way (warm-up steps, then the median of timed steps). Prints one JSON line.

Adapter training follows the paper as AdapterHub users would: DoubleSeqBnConfig (Houlsby) with
reduction_factor = hidden / m, GELU, `train_adapter`, then LayerNorms unfrozen; AdamW (wd 0.01,
eps 1e-6), gradient clipping 1.0, dropout on (train mode). `--adapter-config` takes any AdapterHub
configuration string instead (`par_bn[reduction_factor=6]`, `lora[r=8]`, `ia3`, `compacter`,
`prefix_tuning`), as `adapter-config` does for ours; for inference LoRA / (IA)^3 is merged and the
prefix MLP ejected first, as a user serving them would (adapterkit does both at load).
`--precision fp16|bf16` runs the cases under `torch.autocast` in that dtype (set beside
`adapterkit bench --precision fp16`); training's forward runs under it, with fp16's GradScaler
(PyTorch's mixed-precision recipe).
"""
import argparse
import contextlib
import json
import resource
import statistics
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="adapter-train",
                    choices=["adapter-train", "full-train", "infer-base", "infer-adapter", "latency"])
    ap.add_argument("--shape", default="minilm", choices=["minilm", "bert-base"])
    ap.add_argument("--model", required=True, help="MiniLM checkpoint dir (also the tokenizer/vocab source)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--adapter-config", help="an AdapterHub configuration string (default: Houlsby, m)")
    ap.add_argument("--precision", default="f32", choices=["f32", "fp16", "bf16"],
                    help="under torch.autocast in this dtype (fp16, bf16)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from transformers import BertConfig
    import adapters
    from adapters import BertAdapterModel, DoubleSeqBnConfig

    if a.shape == "minilm":
        model = BertAdapterModel.from_pretrained(a.model)
    else:
        cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=512)
        model = BertAdapterModel(cfg)
    d = model.config.hidden_size
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, vocab, (a.batch, a.seq), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    labels = torch.arange(a.batch) % 2

    with_adapter = a.case in ("adapter-train", "infer-adapter", "latency")
    if with_adapter:
        if a.adapter_config:
            config = adapters.AdapterConfig.load(a.adapter_config)
        else:
            config = DoubleSeqBnConfig(reduction_factor=d / a.bottleneck, non_linearity="gelu")
        model.add_adapter("bench", config=config)
    model.add_classification_head("bench", num_labels=2)
    if with_adapter:
        model.train_adapter("bench")
        for n, p in model.named_parameters():
            if "LayerNorm" in n:
                p.requires_grad = True
        model.set_active_adapters("bench")
    else:
        model.active_head = "bench"

    if a.precision != "f32" and a.case == "full-train":
        sys.exit("--precision: full fine-tuning runs in f32 only (as ours)")
    autocast = (torch.autocast("cpu", dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[a.precision])
                if a.precision != "f32" else contextlib.nullcontext())

    if a.case == "latency":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(a.model)
        model.eval()
        sentence = "a gripping, beautifully acted film that stays with you."
        times = []
        for i in range(a.calls + 10):
            t = time.perf_counter()
            with torch.no_grad(), autocast:
                enc = tok(sentence, return_tensors="pt", truncation=True, max_length=128)
                logits = model(**enc).logits
                logits.softmax(-1).tolist()
            if i >= 10:
                times.append(time.perf_counter() - t)
        times.sort()
        print(json.dumps({
            "tool": "pytorch", "torch": torch.__version__, "adapters": adapters.__version__, "case": "latency",
            "precision": a.precision,
            "calls": a.calls, "median_seconds": times[round((len(times) - 1) * 0.5)],
            "p99_seconds": times[round((len(times) - 1) * 0.99)],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }))
        return

    train = a.case.endswith("train")
    if train:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for n, p in model.named_parameters() if p.requires_grad and not (n.endswith("bias") or "LayerNorm" in n)]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (n.endswith("bias") or "LayerNorm" in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-4, eps=1e-6)
        scaler = torch.amp.GradScaler("cpu") if a.precision == "fp16" else None
    else:
        model.eval()
        arch = getattr(config, "architecture", None) if with_adapter else None
        if arch == "lora":
            model.merge_adapter("bench")
        elif arch == "prefix_tuning" and not config.flat:
            model.eject_prefix_tuning("bench")

    times = []
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        if train:
            with autocast:
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
            if scaler:
                scaler.scale(out.loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(opt)
                scaler.update()
            else:
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), autocast:
                if a.case == "infer-base":
                    model.bert(input_ids=ids, attention_mask=mask)
                else:
                    model(input_ids=ids, attention_mask=mask)
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if train else 0
    print(json.dumps({
        "tool": "pytorch",
        "torch": torch.__version__, "adapters": adapters.__version__,
        "case": a.case, "shape": a.shape, "batch": a.batch, "seq": a.seq, "threads": a.threads,
        "precision": a.precision,
        "adapter_config": a.adapter_config, "step_seconds": times, "median_seconds": med, "sequences_per_second": a.batch / med,
        "trainable_params": trainable,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
