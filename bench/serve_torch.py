#!/usr/bin/env python3
"""Reference server for the serving benchmark: PyTorch + AdapterHub `adapters` serving the same
`POST /predict {"inputs": "text", "adapter": NAME}` API as `adapterkit serve`, the way a Python
user would build it on that library: one model with every adapter directory under --adapters
loaded (`load_adapter(..., with_head=True)`), a batching thread with the same window and request
limit, and per batch one forward per adapter after `set_active_adapters(NAME)` and
`active_head = NAME` (the library runs one active adapter per forward). Prints
`listening on http://HOST:PORT` when ready. Run by bench/serve.py.
"""
import argparse
import json
import os
import queue
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from adapters import BertAdapterModel
from transformers import AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapters", required=True)
    ap.add_argument("--bind", default="127.0.0.1:0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch-requests", type=int, default=64)
    ap.add_argument("--max-batch-wait-ms", type=float, default=0.0)
    ap.add_argument("--max-len", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = BertAdapterModel.from_pretrained(a.model)
    model.eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    labels = {}
    for name in sorted(os.listdir(a.adapters)):
        path = os.path.join(a.adapters, name)
        if not os.path.isfile(os.path.join(path, "head_config.json")):
            continue
        model.load_adapter(path, with_head=True, load_as=name, set_active=False, use_safetensors=True)
        with open(os.path.join(path, "head_config.json")) as f:
            l2i = json.load(f)["config"]["label2id"]
        labels[name] = [k for k, _ in sorted(l2i.items(), key=lambda kv: kv[1])]
    jobs = queue.Queue()

    def batcher():
        while True:
            first = jobs.get()
            batch = [first]
            deadline = time.monotonic() + a.max_batch_wait_ms / 1000
            while len(batch) < a.max_batch_requests:
                left = deadline - time.monotonic()
                try:
                    batch.append(jobs.get(timeout=left) if left > 0 else jobs.get_nowait())
                except queue.Empty:
                    break
            groups = {}
            for j in batch:
                groups.setdefault(j["adapter"], []).append(j)
            with torch.inference_mode():
                for name, js in groups.items():
                    model.set_active_adapters(name)
                    model.active_head = name
                    enc = tok([j["text"] for j in js], padding=True, truncation=True,
                              max_length=a.max_len, return_tensors="pt")
                    probs = model(**enc).logits.softmax(-1).tolist()
                    for j, p in zip(js, probs):
                        j["out"] = sorted(({"label": l, "score": s} for l, s in zip(labels[name], p)),
                                          key=lambda x: -x["score"])
                        j["done"].set()

    threading.Thread(target=batcher, daemon=True).start()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def send(self, status, body, adapter=None):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if adapter:
                self.send_header("x-adapter", adapter)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.send(200, {"status": "ok", "adapters": len(labels)})

        def do_POST(self):
            n = int(self.headers.get("Content-Length", 0))
            try:
                req = json.loads(self.rfile.read(n))
                name, text = req["adapter"], req["inputs"]
            except (ValueError, KeyError) as e:
                return self.send(400, {"error": str(e)})
            if name not in labels:
                return self.send(404, {"error": f"adapter {name} is not loaded"})
            job = {"adapter": name, "text": text, "done": threading.Event()}
            jobs.put(job)
            job["done"].wait()
            self.send(200, job["out"], adapter=name)

    host, port = a.bind.rsplit(":", 1)
    ThreadingHTTPServer.request_queue_size = 256
    server = ThreadingHTTPServer((host, int(port)), Handler)
    print(f"listening on http://{host}:{server.server_address[1]} ({len(labels)} adapters)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
