//! The hostile-input corpus: data files, model directories, adapter directories, options and
//! predict input that a user (or a broken disk) can hand the CLI, each run against the tiny model.
//! Every case must end in a clear error naming the file, field, line or option and what was
//! expected, or in a correct result; never a panic, an abort, or exit 0 with a wrong answer.

use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../adapterkit/tests/fixtures/tiny-bert")
}

/// What a case must end in.
enum Expect {
    /// Exit non-zero; stderr holds every one of these.
    Error(Vec<&'static str>),
    /// Exit 0; stdout holds every one of these.
    Ok(Vec<&'static str>),
}

struct Case {
    class: &'static str,
    name: String,
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    expect: Expect,
}

/// The corpus's shared files: a good CSV, a model copy per mutation, a trained adapter.
struct Corpus {
    root: PathBuf,
    cases: Vec<Case>,
}

const GOOD_ARGS: [&str; 8] = [
    "--header",
    "--text-column",
    "sentence",
    "--label-column",
    "sentiment",
    "--epochs",
    "1",
    "--bottleneck",
];

fn good_csv() -> String {
    let mut s = String::from("sentence,sentiment\n");
    for i in 0..60 {
        let (w, l) = if i % 2 == 0 {
            ("good", "pos")
        } else {
            ("awful", "neg")
        };
        s.push_str(&format!("\"the movie was {w}\",{l}\n"));
    }
    s
}

impl Corpus {
    fn new() -> Self {
        let root = std::env::temp_dir().join(format!("ak-hostile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("good.csv"), good_csv()).unwrap();
        Corpus {
            root,
            cases: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.root.join(name).to_string_lossy().into_owned()
    }

    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> String {
        let p = self.root.join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&p, bytes).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn add(
        &mut self,
        class: &'static str,
        name: impl Into<String>,
        args: Vec<String>,
        expect: Expect,
    ) {
        self.cases.push(Case {
            class,
            name: name.into(),
            args,
            stdin: None,
            expect,
        });
    }

    /// `train` on the tiny model with `file` and the good column options, plus `extra`.
    fn train_args(&self, file: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["train", "--model"].iter().map(|s| s.to_string()).collect();
        a.push(tiny().to_string_lossy().into_owned());
        a.push("--train-file".into());
        a.push(file.into());
        a.extend(GOOD_ARGS.iter().map(|s| s.to_string()));
        a.push("4".into());
        a.push("--out".into());
        a.push(self.path("out"));
        merge(a, extra)
    }

    /// A data-file case: `train` on a file with `content` (no --header unless `header`).
    fn data(&mut self, name: &str, file: &str, content: &[u8], extra: &[&str], expect: Expect) {
        let p = self.write(&format!("data/{name}/{file}"), content);
        let args = self.train_args(&p, extra);
        self.add("data files", name, args, expect);
    }

    /// A copy of the tiny model with `edit` applied; returns its directory.
    fn model(&self, name: &str, edit: impl FnOnce(&Path)) -> String {
        let dir = self.root.join("models").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "model.safetensors", "vocab.txt"] {
            std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
        }
        edit(&dir);
        dir.to_string_lossy().into_owned()
    }

    /// A model-directory case: `train` on the good CSV with a mutated model.
    fn model_case(&mut self, name: &str, edit: impl FnOnce(&Path), expect: Expect) {
        let m = self.model(name, edit);
        let mut args = self.train_args(&self.path("good.csv"), &[]);
        args[2] = m;
        self.add("model directories", name, args, expect);
    }
}

fn config_edit(key: &'static str, value: Value) -> impl FnOnce(&Path) {
    move |dir: &Path| {
        let p = dir.join("config.json");
        let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        if value.is_null() {
            v.as_object_mut().unwrap().remove(key);
        } else {
            v[key] = value;
        }
        std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
}

/// `base` with `extra` appended, an option given in `extra` replacing its value in `base`
/// (`--no-header` drops `--header`).
fn merge(mut base: Vec<String>, extra: &[&str]) -> Vec<String> {
    for e in extra {
        let flag = e.split('=').next().unwrap_or(e);
        if *e == "--no-header" {
            base.retain(|a| a != "--header");
        } else if flag.starts_with("--") {
            // An adapter given another way replaces the corpus's --bottleneck.
            let replaced: &[&str] = match flag {
                "--reduction-factor" | "--adapter-config" => &["--bottleneck"],
                f => &[f][..],
            };
            for r in replaced.iter().chain(std::iter::once(&flag)) {
                if let Some(i) = base.iter().position(|a| a == r) {
                    base.drain(i..i + 2);
                }
            }
        }
    }
    base.extend(
        extra
            .iter()
            .filter(|e| **e != "--no-header")
            .map(|s| s.to_string()),
    );
    base
}

/// Rewrites a safetensors file: `edit` changes the header (tensor name → entry) and the data.
fn edit_safetensors(
    path: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>, &mut Vec<u8>),
) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    edit(&mut header, &mut data);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// The data offset of tensor `name`.
fn offset(header: &serde_json::Map<String, Value>, name: &str) -> usize {
    header[name]["data_offsets"][0].as_u64().unwrap() as usize
}

fn err(parts: &[&'static str]) -> Expect {
    Expect::Error(parts.to_vec())
}

fn ok(parts: &[&'static str]) -> Expect {
    Expect::Ok(parts.to_vec())
}

fn data_cases(c: &mut Corpus) {
    let rows = |n: usize, f: &dyn Fn(usize) -> String| -> String { (0..n).map(f).collect() };
    let pn = |i: usize| if i.is_multiple_of(2) { "pos" } else { "neg" };
    c.data(
        "empty file",
        "e.csv",
        b"",
        &[],
        err(&["e.csv", "no examples"]),
    );
    c.data(
        "header only",
        "h.csv",
        b"sentence,sentiment\n",
        &[],
        err(&["h.csv", "no examples"]),
    );
    c.data(
        "unquoted comma",
        "c.csv",
        format!(
            "sentence,sentiment\n{}\"x\",pos\nan ok, bad text,neg\n",
            rows(20, &|i| format!("\"t {i}\",{}\n", pn(i)))
        )
        .as_bytes(),
        &[],
        err(&["c.csv:23", "3 columns", "quoted"]),
    );
    c.data(
        "short row",
        "s.csv",
        format!(
            "sentence,sentiment\n{}lonely\n",
            rows(20, &|i| format!("t {i},{}\n", pn(i)))
        )
        .as_bytes(),
        &[],
        err(&["s.csv:22", "1 columns", "line 1 has 2"]),
    );
    c.data(
        "no such column",
        "n.csv",
        good_csv().as_bytes(),
        &["--text-column", "review"],
        err(&["no column `review`", "columns: sentence, sentiment"]),
    );
    c.data(
        "header row taken as data",
        "hd.csv",
        good_csv().as_bytes(),
        &["--no-header", "--text-column", "0", "--label-column", "1"],
        err(&["hd.csv:1", "looks like a header", "--header"]),
    );
    c.data(
        "name column without header",
        "nh.csv",
        good_csv().as_bytes(),
        &["--no-header"],
        err(&["must be a 0-based index"]),
    );
    c.data(
        "column index beyond the row",
        "ci.csv",
        rows(20, &|i| format!("t {i},{}\n", pn(i))).as_bytes(),
        &["--no-header", "--text-column", "0", "--label-column", "5"],
        err(&["ci.csv:1", "missing label column 5"]),
    );
    c.data(
        "one class",
        "one.csv",
        format!(
            "sentence,sentiment\n{}",
            rows(20, &|i| format!("t {i},pos\n"))
        )
        .as_bytes(),
        &[],
        err(&["one.csv", "at least 2 distinct labels"]),
    );
    c.data(
        "invalid UTF-8",
        "u.csv",
        b"sentence,sentiment\n\"caf\xe9\",pos\n\"b\",neg\n",
        &[],
        err(&["u.csv:2", "UTF-8"]),
    );
    c.data(
        "unterminated quote",
        "q.csv",
        format!(
            "sentence,sentiment\n{}\"never closed,pos\n",
            rows(20, &|i| format!("t {i},{}\n", pn(i)))
        )
        .as_bytes(),
        &[],
        err(&["q.csv"]),
    );
    c.data(
        "BOM and CRLF read correctly",
        "bom.csv",
        format!(
            "\u{feff}sentence,sentiment\r\n{}",
            rows(40, &|i| format!("\"t {i}\",{}\r\n", pn(i)))
        )
        .as_bytes(),
        &[],
        ok(&["adapters on bom: dev"]),
    );
    c.data(
        "blank lines between records are skipped",
        "blank.csv",
        format!(
            "sentence,sentiment\n{}",
            rows(40, &|i| format!("\"t {i}\",{}\n\n", pn(i)))
        )
        .as_bytes(),
        &[],
        ok(&["adapters on blank: dev"]),
    );
    c.data(
        "TSV with a tab in a text",
        "t.tsv",
        format!(
            "sentence\tsentiment\n{}a\ttab\tpos\n",
            rows(20, &|i| format!("t {i}\t{}\n", pn(i)))
        )
        .as_bytes(),
        &[],
        err(&["t.tsv:22", "3 columns", "tab"]),
    );
    c.data(
        "unknown extension",
        "d.txt",
        good_csv().as_bytes(),
        &[],
        err(&["d.txt", "format", "csv, tsv, json or jsonl"]),
    );
    c.data(
        "missing file",
        "present.csv",
        b"x",
        &["--train-file", "/nonexistent/train.csv"],
        err(&["/nonexistent/train.csv"]),
    );
    let jl = |f: &dyn Fn(usize) -> String| -> String { (0..40).map(f).collect() };
    c.data(
        "JSONL bad line",
        "b.jsonl",
        format!(
            "{}{{\"sentence\": \"x\", \n",
            jl(&|i| format!("{{\"sentence\":\"t {i}\",\"sentiment\":\"{}\"}}\n", pn(i)))
        )
        .as_bytes(),
        &["--no-header"],
        err(&["b.jsonl:41", "invalid JSON"]),
    );
    c.data(
        "JSONL missing field",
        "m.jsonl",
        format!(
            "{}{{\"sentence\":\"x\"}}\n",
            jl(&|i| format!("{{\"sentence\":\"t {i}\",\"sentiment\":\"{}\"}}\n", pn(i)))
        )
        .as_bytes(),
        &["--no-header"],
        err(&[
            "m.jsonl:41",
            "missing field `sentiment`",
            "fields present: sentence",
        ]),
    );
    c.data(
        "JSONL null label",
        "nl.jsonl",
        format!(
            "{}{{\"sentence\":\"x\",\"sentiment\":null}}\n",
            jl(&|i| format!("{{\"sentence\":\"t {i}\",\"sentiment\":\"{}\"}}\n", pn(i)))
        )
        .as_bytes(),
        &["--no-header"],
        err(&["nl.jsonl:41", "`sentiment` is null"]),
    );
    c.data(
        "JSONL object label",
        "ol.jsonl",
        format!(
            "{}{{\"sentence\":\"x\",\"sentiment\":{{\"a\":1}}}}\n",
            jl(&|i| format!("{{\"sentence\":\"t {i}\",\"sentiment\":\"{}\"}}\n", pn(i)))
        )
        .as_bytes(),
        &["--no-header"],
        err(&["ol.jsonl:41", "must be a string or number"]),
    );
    c.data(
        "JSONL line not an object",
        "arr.jsonl",
        format!(
            "{}[1, 2]\n",
            jl(&|i| format!("{{\"sentence\":\"t {i}\",\"sentiment\":\"{}\"}}\n", pn(i)))
        )
        .as_bytes(),
        &["--no-header"],
        err(&["arr.jsonl:41", "expected a JSON object"]),
    );
    c.data(
        "JSONL labels 1 and 1.0 are one class",
        "num.jsonl",
        jl(&|i| {
            format!(
                "{{\"sentence\":\"t {i}\",\"sentiment\":{}}}\n",
                ["1", "1.0", "0", "0.0"][i % 4]
            )
        })
        .as_bytes(),
        &["--no-header"],
        ok(&["adapters on num: dev"]),
    );
    c.data(
        "JSONL labels with spaces are trimmed",
        "sp.jsonl",
        jl(&|i| {
            format!(
                "{{\"sentence\":\"t {i}\",\"sentiment\":\"{}\"}}\n",
                ["pos ", "pos", " neg", "neg"][i % 4]
            )
        })
        .as_bytes(),
        &["--no-header"],
        ok(&["adapters on sp: dev"]),
    );
    c.data(
        "JSON not an array",
        "o.json",
        b"{\"sentence\": \"x\", \"sentiment\": \"pos\"}",
        &["--no-header"],
        err(&["o.json:1", "expected a JSON array of objects"]),
    );
    c.data(
        "JSON truncated",
        "t.json",
        b"[{\"sentence\": \"x\", \"sentiment\": \"pos\"},\n {\"sente",
        &["--no-header"],
        err(&["t.json:2", "invalid JSON"]),
    );
    c.data(
        "JSON array of strings",
        "s.json",
        b"[\"a\", \"b\"]",
        &["--no-header"],
        err(&["s.json:1", "expected a JSON object"]),
    );
    c.data(
        "regression label not a number",
        "r.csv",
        format!(
            "sentence,sentiment\n{}\"x\",high\n",
            rows(20, &|i| format!("\"t {i}\",{}\n", i))
        )
        .as_bytes(),
        &["--regression"],
        err(&["r.csv:22", "not a number (regression task)"]),
    );
    c.data(
        "regression label infinite",
        "ri.csv",
        format!(
            "sentence,sentiment\n{}\"x\",inf\n",
            rows(20, &|i| format!("\"t {i}\",{}\n", i))
        )
        .as_bytes(),
        &["--regression"],
        err(&["ri.csv:22", "not a number"]),
    );
    c.data(
        "regression label NaN",
        "rn.csv",
        format!(
            "sentence,sentiment\n{}\"x\",NaN\n",
            rows(20, &|i| format!("\"t {i}\",{}\n", i))
        )
        .as_bytes(),
        &["--regression"],
        err(&["rn.csv:22", "not a number"]),
    );
    c.data(
        "regression target overflowing the squared error",
        "big.csv",
        format!(
            "sentence,sentiment\n{}",
            rows(40, &|i| format!(
                "\"t {i}\",{}\n",
                if i % 5 == 2 {
                    "3e30".to_string()
                } else {
                    i.to_string()
                }
            ))
        )
        .as_bytes(),
        &["--regression", "--batch-size", "64"],
        err(&[
            "training stopped at step 0",
            "has target 3e30",
            "rescale that target",
        ]),
    );
    let dev = c.write(
        "data/dev-unknown/dev.csv",
        "sentence,sentiment\n\"a\",pos\n\"b\",maybe\n",
    );
    let test = c.write(
        "data/dev-unknown/test.csv",
        "sentence,sentiment\n\"a\",pos\n\"b\",neg\n",
    );
    c.data(
        "dev label unknown to training",
        "train.csv",
        good_csv().as_bytes(),
        &["--dev-file", &dev, "--test-file", &test],
        err(&["dev.csv:3", "unknown label `maybe`", "pos"]),
    );
    c.data(
        "dev file without test file",
        "train.csv",
        good_csv().as_bytes(),
        &["--dev-file", &dev],
        err(&["give both a dev and a test file"]),
    );
    let dir_as_file = c.path("data");
    c.data(
        "directory as data file",
        "x.csv",
        b"",
        &["--train-file", &dir_as_file],
        err(&["data"]),
    );
}

fn model_cases(c: &mut Corpus) {
    let layers = |v: Value| config_edit("num_hidden_layers", v);
    c.model_case(
        "config missing",
        |d| std::fs::remove_file(d.join("config.json")).unwrap(),
        err(&["config.json", "No such file"]),
    );
    c.model_case(
        "config not JSON",
        |d| std::fs::write(d.join("config.json"), "{ hidden").unwrap(),
        err(&["config.json", "invalid JSON"]),
    );
    c.model_case(
        "config empty object",
        |d| std::fs::write(d.join("config.json"), "{}").unwrap(),
        err(&["config.json", "missing field"]),
    );
    c.model_case(
        "layers 1e9",
        layers(json!(1_000_000_000u64)),
        err(&["config.json", "num_hidden_layers", "above 1024"]),
    );
    c.model_case(
        "layers above the weights",
        layers(json!(3)),
        err(&["num_hidden_layers", "3 layers", "holds 2"]),
    );
    c.model_case(
        "layers below the weights",
        layers(json!(1)),
        err(&["num_hidden_layers", "1 layers", "holds 2"]),
    );
    c.model_case(
        "layers zero",
        layers(json!(0)),
        err(&["num_hidden_layers", "positive integer"]),
    );
    c.model_case(
        "layers negative",
        layers(json!(-2)),
        err(&["config.json", "invalid JSON"]),
    );
    c.model_case(
        "layers a string",
        layers(json!("two")),
        err(&["config.json", "invalid JSON"]),
    );
    c.model_case(
        "hidden size huge",
        config_edit("hidden_size", json!(1u64 << 40)),
        err(&["hidden_size", "above"]),
    );
    c.model_case(
        "hidden size wrong",
        config_edit("hidden_size", json!(48)),
        err(&["model.safetensors", "shape"]),
    );
    c.model_case(
        "heads do not divide hidden",
        config_edit("num_attention_heads", json!(5)),
        err(&["num_attention_heads", "not divisible"]),
    );
    c.model_case(
        "vocab size huge",
        config_edit("vocab_size", json!(1u64 << 40)),
        err(&["vocab_size", "above"]),
    );
    c.model_case(
        "vocab size above the tokenizer",
        config_edit("vocab_size", json!(88)),
        err(&["vocab.txt", "vocab_size 88"]),
    );
    c.model_case(
        "positions huge",
        config_edit("max_position_embeddings", json!(1u64 << 33)),
        err(&["max_position_embeddings", "above"]),
    );
    c.model_case(
        "intermediate wrong",
        config_edit("intermediate_size", json!(65)),
        err(&["model.safetensors", "shape"]),
    );
    c.model_case(
        "activation relu",
        config_edit("hidden_act", json!("relu")),
        err(&["hidden_act", "not supported"]),
    );
    c.model_case(
        "relative positions",
        config_edit("position_embedding_type", json!("relative_key")),
        err(&["position_embedding_type"]),
    );
    c.model_case(
        "dropout 1.5",
        config_edit("hidden_dropout_prob", json!(1.5)),
        err(&["hidden_dropout_prob", "[0, 1)"]),
    );
    c.model_case(
        "dropout negative",
        config_edit("attention_probs_dropout_prob", json!(-0.1)),
        err(&["attention_probs_dropout_prob"]),
    );
    c.model_case(
        "layer norm eps negative",
        config_edit("layer_norm_eps", json!(-1.0)),
        err(&["layer_norm_eps", "small positive"]),
    );
    c.model_case(
        "layer norm eps zero",
        config_edit("layer_norm_eps", json!(0.0)),
        err(&["layer_norm_eps"]),
    );
    c.model_case(
        "pad token beyond vocab",
        config_edit("pad_token_id", json!(500)),
        err(&["pad_token_id", "vocab_size"]),
    );
    c.model_case(
        "pad token not [PAD]",
        config_edit("pad_token_id", json!(3)),
        err(&["[PAD]", "pad_token_id 3"]),
    );
    c.model_case(
        "weights missing",
        |d| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
        err(&["model.safetensors", "no model.safetensors"]),
    );
    c.model_case(
        "weights truncated",
        |d| {
            let p = d.join("model.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        },
        err(&["model.safetensors", "cannot read tensors"]),
    );
    c.model_case(
        "weights garbage",
        |d| std::fs::write(d.join("model.safetensors"), b"not a tensor file at all").unwrap(),
        err(&["model.safetensors", "cannot read tensors"]),
    );
    c.model_case(
        "weights header length huge",
        |d| {
            let p = d.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            std::fs::write(&p, b).unwrap();
        },
        err(&["model.safetensors", "cannot read tensors"]),
    );
    c.model_case(
        "weight NaN",
        |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, data| {
                let o = offset(h, "encoder.layer.1.output.dense.weight");
                data[o..o + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            })
        },
        err(&["encoder.layer.1.output.dense.weight", "NaN"]),
    );
    c.model_case(
        "weight infinite",
        |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, data| {
                let o = offset(h, "embeddings.word_embeddings.weight") + 40;
                data[o..o + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
            })
        },
        err(&["embeddings.word_embeddings.weight", "inf"]),
    );
    c.model_case(
        "weight integer",
        |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, _| {
                h["encoder.layer.0.attention.self.query.weight"]["dtype"] = json!("I32");
            })
        },
        err(&["encoder.layer.0.attention.self.query.weight", "I32"]),
    );
    c.model_case(
        "weight transposed",
        |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, _| {
                h["encoder.layer.0.intermediate.dense.weight"]["shape"] = json!([32, 64]);
            })
        },
        err(&[
            "encoder.layer.0.intermediate.dense.weight",
            "shape [32, 64]",
            "expected [64, 32]",
        ]),
    );
    c.model_case(
        "weight missing",
        |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, _| {
                let v = h
                    .remove("encoder.layer.1.attention.output.LayerNorm.bias")
                    .unwrap();
                h.insert(
                    "encoder.layer.1.attention.output.LayerNorm.bias_renamed".into(),
                    v,
                );
            })
        },
        err(&["missing tensor `encoder.layer.1.attention.output.LayerNorm.bias`"]),
    );
    c.model_case(
        "vocab missing",
        |d| std::fs::remove_file(d.join("vocab.txt")).unwrap(),
        err(&["neither tokenizer.json nor vocab.txt"]),
    );
    c.model_case(
        "vocab without [UNK]",
        |d| {
            let v = std::fs::read_to_string(d.join("vocab.txt")).unwrap();
            std::fs::write(d.join("vocab.txt"), v.replace("[UNK]\n", "")).unwrap();
        },
        err(&["vocab.txt", "vocab_size 87"]),
    );
    c.model_case(
        "vocab one line short",
        |d| {
            let v = std::fs::read_to_string(d.join("vocab.txt")).unwrap();
            let cut = v.trim_end().rfind('\n').unwrap();
            std::fs::write(d.join("vocab.txt"), &v[..cut + 1]).unwrap();
        },
        err(&["vocab.txt", "token ids 0 to 85", "vocab_size 87"]),
    );
    c.model_case(
        "vocab one line long",
        |d| {
            let mut v = std::fs::read_to_string(d.join("vocab.txt")).unwrap();
            v.push_str("zebra\n");
            std::fs::write(d.join("vocab.txt"), v).unwrap();
        },
        err(&["vocab.txt", "token ids 0 to 87", "vocab_size 87"]),
    );
    c.model_case(
        "vocab without [CLS]",
        |d| {
            let v = std::fs::read_to_string(d.join("vocab.txt")).unwrap();
            std::fs::write(d.join("vocab.txt"), v.replace("[CLS]\n", "[XLS]\n")).unwrap();
        },
        err(&["vocab.txt", "lacks `[CLS]`"]),
    );
    c.model_case(
        "tokenizer.json garbage",
        |d| std::fs::write(d.join("tokenizer.json"), "{\"model\": 3}").unwrap(),
        err(&["tokenizer"]),
    );
    let m = c.path("models/none");
    let mut args = c.train_args(&c.path("good.csv"), &[]);
    args[2] = m;
    c.add(
        "model directories",
        "model directory missing",
        args,
        err(&["models/none"]),
    );
}

fn option_cases(c: &mut Corpus) {
    let good = c.path("good.csv");
    let file = c.write("a-file", "x");
    let bad_out = format!("{file}/out");
    let opts: Vec<(&str, Vec<String>, Expect)> = vec![
        (
            "weight decay negative",
            vec!["--weight-decay=-5".into()],
            err(&["weight_decay", "-5 must be a number of at least 0"]),
        ),
        (
            "weight decay shrinks past zero",
            vec!["--weight-decay".into(), "2000".into()],
            err(&["weight_decay", "= 2 must be below 1"]),
        ),
        (
            "warmup 2",
            vec!["--warmup".into(), "2".into()],
            err(&["warmup", "0 to 1"]),
        ),
        (
            "warmup negative",
            vec!["--warmup=-0.1".into()],
            err(&["warmup", "0 to 1"]),
        ),
        (
            "lr zero",
            vec!["--lr".into(), "0".into()],
            err(&["lr", "positive"]),
        ),
        (
            "lr negative",
            vec!["--lr=-1".into()],
            err(&["lr", "positive"]),
        ),
        (
            "lr NaN",
            vec!["--lr".into(), "NaN".into()],
            err(&["lr", "positive"]),
        ),
        (
            "epochs zero",
            vec!["--epochs".into(), "0".into()],
            err(&["epochs", "at least 1"]),
        ),
        (
            "batch size zero",
            vec!["--batch-size".into(), "0".into()],
            err(&["batch_size", "at least 1"]),
        ),
        (
            "max steps zero",
            vec!["--max-steps".into(), "0".into()],
            err(&["max_steps", "at least 1"]),
        ),
        (
            "max len above positions",
            vec!["--max-len".into(), "9999".into()],
            err(&["--max-len 9999", "64 positions"]),
        ),
        (
            "max len zero",
            vec!["--max-len".into(), "0".into()],
            err(&["max_len", "0 must be in 4..=64"]),
        ),
        (
            "head layers zero",
            vec!["--head-layers".into(), "0".into()],
            err(&["layers", "not in 1..=8"]),
        ),
        (
            "head layers nine",
            vec!["--head-layers".into(), "9".into()],
            err(&["layers", "not in 1..=8"]),
        ),
        (
            "reduction factor leaves nothing",
            vec!["--reduction-factor".into(), "100".into()],
            err(&["reduction_factor", "below 1"]),
        ),
        (
            "reduction factor zero",
            vec!["--reduction-factor".into(), "0".into()],
            err(&["reduction_factor", "positive"]),
        ),
        (
            "bottleneck zero",
            vec!["--bottleneck".into(), "0".into()],
            err(&["bottleneck"]),
        ),
        (
            "nonlinearity unknown",
            vec!["--nonlinearity".into(), "sigmoidish".into()],
            err(&["--nonlinearity `sigmoidish`", "expected one of"]),
        ),
        (
            "leave out a layer that does not exist",
            vec!["--leave-out".into(), "7".into()],
            err(&["leave_out", "7"]),
        ),
        (
            "leave out every layer",
            vec!["--leave-out".into(), "0,1".into()],
            err(&["leave_out", "leaves out every layer"]),
        ),
        (
            "top-k above the layers",
            vec![
                "--method".into(),
                "top-k".into(),
                "--top-k".into(),
                "5".into(),
            ],
            err(&["top_k", "5 must be in 1..=2"]),
        ),
        (
            "init std negative",
            vec!["--init-std=-1".into()],
            err(&["init_std"]),
        ),
        (
            "name with a slash",
            vec!["--name".into(), "a/b".into()],
            err(&["name", "`a/b`"]),
        ),
        (
            "out is a file",
            vec!["--out".into(), file.clone()],
            err(&["exists and is not a directory"]),
        ),
        (
            "out below a file",
            vec!["--out".into(), bad_out],
            err(&["a-file"]),
        ),
        (
            "unknown precision",
            vec!["--precision".into(), "bf8".into()],
            err(&["--precision", "expected f32 or fp16"]),
        ),
        (
            "fp16 with full fine-tuning",
            vec![
                "--precision".into(),
                "fp16".into(),
                "--method".into(),
                "full".into(),
            ],
            err(&["--precision fp16", "full fine-tuning", "--precision f32"]),
        ),
        (
            "fp16 with the reference ops",
            vec![
                "--precision".into(),
                "fp16".into(),
                "--reference-ops".into(),
            ],
            err(&["--precision fp16", "--reference-ops", "f32 only"]),
        ),
        (
            "resume from nowhere",
            vec!["--resume".into(), c.path("nowhere")],
            err(&["no state.json"]),
        ),
        (
            "checkpoint dir without interval",
            vec!["--checkpoint-dir".into(), c.path("ck")],
            err(&["--checkpoint-every"]),
        ),
        (
            "adapter config missing file",
            vec!["--adapter-config".into(), "/nonexistent.json".into()],
            err(&["--adapter-config `/nonexistent.json`"]),
        ),
        (
            "adapter config string with a value that is no literal",
            vec!["--adapter-config".into(), "par_bn[scaling=wild]".into()],
            err(&["par_bn[scaling=wild]", "`wild`", "not a Python literal"]),
        ),
        (
            "adapter config string with an unknown key",
            vec!["--adapter-config".into(), "par_bn[reduction=4]".into()],
            err(&["--adapter-config par_bn[reduction=4]", "reduction"]),
        ),
        (
            "adapter config string of a method not implemented",
            vec![
                "--adapter-config".into(),
                "prompt_tuning[prompt_length=10]".into(),
            ],
            err(&["prompt_tuning", "not implemented"]),
        ),
        (
            "Compacter whose phm_dim does not divide the bottleneck",
            vec!["--adapter-config".into(), "compacter[phm_dim=5]".into()],
            err(&["phm_dim", "does not divide"]),
        ),
        (
            "Compacter with frozen rules",
            vec![
                "--adapter-config".into(),
                "compacter[learn_phm=False]".into(),
            ],
            err(&["learn_phm", "not implemented"]),
        ),
        (
            "prefix tuning with prefix dropout",
            vec![
                "--adapter-config".into(),
                "prefix_tuning[dropout=0.1]".into(),
            ],
            err(&["dropout", "prefix dropout"]),
        ),
        (
            "prefix tuning with no prefix positions",
            vec![
                "--adapter-config".into(),
                "prefix_tuning[prefix_length=0]".into(),
            ],
            err(&["prefix_length"]),
        ),
    ];
    for (name, extra, expect) in opts {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let args = c.train_args(&good, &extra);
        c.add("options", name, args, expect);
    }
    let cfg = c.write("opts/bad_adapter_config.json", r#"{"mh_adapter": true, "output_adapter": true, "reduction_factor": 16, "non_linearity": "gelu", "adapter_residual_before_ln": 7}"#);
    let args = c.train_args(&good, &["--adapter-config", &cfg]);
    c.add(
        "options",
        "adapter config with a bad field",
        args,
        err(&["bad_adapter_config.json"]),
    );
}

/// Trains the corpus's adapter once; the adapter and predict cases copy and mutate it.
fn trained_adapter(c: &Corpus) -> PathBuf {
    let dir = c.root.join("trained");
    let out = Command::new(env!("CARGO_BIN_EXE_adapterkit"))
        .args(c.train_args(&c.path("good.csv"), &["--out", dir.to_str().unwrap()]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn adapter_cases(c: &mut Corpus, trained: &Path) {
    let tiny_s = tiny().to_string_lossy().into_owned();
    let good = c.path("good.csv");
    let case = |c: &mut Corpus, name: &str, edit: &dyn Fn(&Path), expect: Expect| {
        let dir = c.root.join("adapters").join(name.replace(' ', "-"));
        copy_dir(trained, &dir);
        edit(&dir);
        let args: Vec<String> = [
            "eval",
            "--model",
            &tiny_s,
            "--adapter",
            dir.to_str().unwrap(),
            "--train-file",
            &good,
            "--header",
            "--text-column",
            "sentence",
            "--label-column",
            "sentiment",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        c.add("adapter directories", name.to_string(), args, expect);
    };
    let rm = |f: &'static str| move |d: &Path| std::fs::remove_file(d.join(f)).unwrap();
    let write =
        |f: &'static str, s: &'static str| move |d: &Path| std::fs::write(d.join(f), s).unwrap();
    let json_edit = |f: &'static str, e: fn(&mut Value)| {
        move |d: &Path| {
            let p = d.join(f);
            let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            e(&mut v);
            std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        }
    };
    case(c, "unchanged loads", &|_| {}, ok(&["\"accuracy\""]));
    case(
        c,
        "metadata missing",
        &rm("adapterkit.json"),
        err(&["adapterkit.json"]),
    );
    case(
        c,
        "metadata not JSON",
        &write("adapterkit.json", "{"),
        err(&["adapterkit.json", "invalid JSON"]),
    );
    case(
        c,
        "metadata future format",
        &json_edit("adapterkit.json", |v| v["format"] = json!(99)),
        err(&["format 99"]),
    );
    case(
        c,
        "metadata other base",
        &json_edit("adapterkit.json", |v| v["base"]["hidden_size"] = json!(768)),
        err(&["hidden size 768"]),
    );
    case(
        c,
        "metadata bad name",
        &json_edit("adapterkit.json", |v| v["name"] = json!("../x")),
        err(&["name", "`../x`"]),
    );
    case(
        c,
        "adapter config corrupt",
        &write("adapter_config.json", "{\"config\": "),
        err(&["adapter_config.json", "invalid JSON"]),
    );
    case(
        c,
        "adapter config missing",
        &rm("adapter_config.json"),
        err(&["adapter_config.json"]),
    );
    case(
        c,
        "adapter config other name",
        &json_edit("adapter_config.json", |v| v["name"] = json!("other")),
        err(&["disagree", "`other`"]),
    );
    case(
        c,
        "adapter config other bottleneck",
        &json_edit("adapter_config.json", |v| {
            v["config"]["reduction_factor"] = json!(4)
        }),
        err(&["adapter.safetensors", "shape"]),
    );
    case(
        c,
        "adapter config unknown architecture",
        &json_edit("adapter_config.json", |v| {
            v["config"]["architecture"] = json!("lora")
        }),
        err(&["adapter_config.json", "lora"]),
    );
    case(
        c,
        "head config corrupt",
        &write("head_config.json", "[]"),
        err(&["head_config.json"]),
    );
    case(
        c,
        "head config missing",
        &rm("head_config.json"),
        err(&["head_config.json"]),
    );
    case(
        c,
        "head config other labels",
        &json_edit("head_config.json", |v| v["config"]["num_labels"] = json!(3)),
        err(&["model_head.safetensors", "expected [3, 32]"]),
    );
    case(
        c,
        "head config other name",
        &json_edit("head_config.json", |v| v["name"] = json!("other")),
        err(&["disagree", "`other`"]),
    );
    case(
        c,
        "adapter weights missing",
        &rm("adapter.safetensors"),
        err(&["adapter.safetensors"]),
    );
    case(
        c,
        "head weights missing",
        &rm("model_head.safetensors"),
        err(&["model_head.safetensors"]),
    );
    case(
        c,
        "trained LayerNorms missing",
        &rm("adapterkit_params.safetensors"),
        err(&["adapterkit_params.safetensors"]),
    );
    case(
        c,
        "adapter weight NaN",
        &|d| {
            edit_safetensors(&d.join("adapter.safetensors"), |h, data| {
                let name = h
                    .keys()
                    .find(|k| k.contains("adapter_down"))
                    .unwrap()
                    .clone();
                let o = offset(h, &name);
                data[o..o + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            })
        },
        err(&["adapter.safetensors", "NaN"]),
    );
    case(
        c,
        "head weight integer",
        &|d| {
            edit_safetensors(&d.join("model_head.safetensors"), |h, _| {
                let name = h.keys().find(|k| k.ends_with("weight")).unwrap().clone();
                h[&name]["dtype"] = json!("I32");
            })
        },
        err(&["model_head.safetensors", "I32"]),
    );
    case(
        c,
        "adapter weight extra",
        &|d| {
            edit_safetensors(&d.join("adapter.safetensors"), |h, data| {
                let k = h.keys().find(|k| !k.starts_with("__")).unwrap().clone();
                let n = data.len() as u64;
                let stray = json!({"dtype": "F32", "shape": [2], "data_offsets": [n, n + 8]});
                data.extend([0u8; 8]);
                h.insert(format!("{k}.stray"), stray);
            })
        },
        err(&["adapter.safetensors", "stray"]),
    );
    case(
        c,
        "adapter weights truncated",
        &|d| {
            let p = d.join("adapter.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() - 9]).unwrap();
        },
        err(&["adapter.safetensors"]),
    );
    case(
        c,
        "only the AdapterHub files of a run that trained LayerNorms",
        &|d| {
            for f in ["adapterkit.json", "adapterkit_params.safetensors"] {
                std::fs::remove_file(d.join(f)).unwrap();
            }
        },
        err(&[
            "trained base parameters",
            "adapterkit_params.safetensors",
            "copy the whole directory",
        ]),
    );
    case(
        c,
        "metrics.json corrupt does not matter",
        &write("metrics.json", "{"),
        ok(&["\"accuracy\""]),
    );
    case(
        c,
        "stray staging directory ignored",
        &|d| std::fs::create_dir_all(d.parent().unwrap().join(".stray-staging")).unwrap(),
        ok(&["\"accuracy\""]),
    );
    case(
        c,
        "foreign file beside",
        &write("notes.txt", "mine"),
        ok(&["\"accuracy\""]),
    );
    let args: Vec<String> = [
        "eval",
        "--model",
        &tiny_s,
        "--adapter",
        "/nonexistent/adapter",
        "--train-file",
        &good,
        "--header",
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    c.add(
        "adapter directories",
        "adapter directory missing",
        args,
        err(&["/nonexistent/adapter"]),
    );
    let mut skip = c.cases.last().unwrap().args.clone();
    skip[4] = trained.to_string_lossy().into_owned();
    skip.extend(["--skip-adapter-layers".to_string(), "99".to_string()]);
    c.add(
        "options",
        "skip adapter layers beyond the model",
        skip,
        err(&["layer 99 does not exist", "layers 0 to 1"]),
    );
}

fn predict_cases(c: &mut Corpus, trained: &Path) {
    let base: Vec<String> = [
        "predict",
        "--model",
        tiny().to_str().unwrap(),
        "--adapter",
        trained.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let stdin_case = |c: &mut Corpus, name: &str, input: &[u8], extra: &[&str], expect: Expect| {
        let mut args = base.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        c.cases.push(Case {
            class: "predict input",
            name: name.into(),
            args,
            stdin: Some(input.to_vec()),
            expect,
        });
    };
    stdin_case(
        c,
        "lines in, lines out",
        b"good\nawful\n",
        &[],
        ok(&["\"label\""]),
    );
    stdin_case(
        c,
        "blank line keeps its place",
        b"good\n\nawful\n",
        &[],
        ok(&["\"label\""]),
    );
    stdin_case(
        c,
        "invalid UTF-8 line",
        b"good\n\xff\xfe\n",
        &[],
        err(&["line 2", "UTF-8"]),
    );
    stdin_case(c, "NUL bytes", b"go\0od\n", &[], ok(&["\"label\""]));
    stdin_case(
        c,
        "very long line is truncated to max len",
        "word ".repeat(20000).as_bytes(),
        &[],
        ok(&["\"label\""]),
    );
    stdin_case(c, "no input, no output", b"", &[], ok(&[]));
    stdin_case(
        c,
        "max len above positions",
        b"good\n",
        &["--max-len", "999"],
        err(&["--max-len 999", "64"]),
    );
    stdin_case(
        c,
        "input file missing",
        b"",
        &["--input", "/nonexistent/in.txt"],
        err(&["/nonexistent/in.txt"]),
    );
    stdin_case(
        c,
        "batch size zero",
        b"good\n",
        &["--batch-size", "0"],
        err(&["--batch-size 0"]),
    );
    stdin_case(
        c,
        "skip layers beyond the model",
        b"good\n",
        &["--skip-adapter-layers", "5"],
        err(&["layer 5 does not exist"]),
    );
    stdin_case(
        c,
        "unknown precision",
        b"good\n",
        &["--precision", "bf8"],
        err(&["--precision", "expected f32 or fp16"]),
    );
    // fp16 runs where the CPU has AVX512_FP16 and is refused, naming what is missing, elsewhere.
    #[cfg(target_arch = "x86_64")]
    let fp16 = std::arch::is_x86_feature_detected!("avx512fp16");
    #[cfg(not(target_arch = "x86_64"))]
    let fp16 = false;
    stdin_case(
        c,
        "fp16 precision",
        b"good\nawful\n",
        &["--precision", "fp16"],
        if fp16 {
            ok(&["\"label\""])
        } else {
            err(&["--precision fp16", "AVX512_FP16"])
        },
    );
    stdin_case(
        c,
        "adapter and server both",
        b"good\n",
        &["--server", "http://127.0.0.1:9"],
        err(&["--server"]),
    );
}

fn run_case(case: &Case) -> Result<(), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_adapterkit"))
        .args(&case.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let input = case.stdin.clone().unwrap_or_default();
    let mut pipe = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let code = out.status.code();
    if stderr.contains("panicked") || code == Some(101) {
        return Err(format!("PANIC: {stderr}"));
    }
    let Some(code) = code else {
        return Err(format!("ABORT (killed by a signal): {stderr}"));
    };
    match &case.expect {
        Expect::Error(parts) => {
            if code == 0 {
                return Err(format!(
                    "SILENT: exit 0, expected an error; stdout {stdout}"
                ));
            }
            match parts.iter().find(|p| !stderr.contains(*p)) {
                Some(p) => Err(format!("error does not say `{p}`: {stderr}")),
                None => Ok(()),
            }
        }
        Expect::Ok(parts) => {
            if code != 0 {
                return Err(format!(
                    "failed (exit {code}) where it should work: {stderr}"
                ));
            }
            match parts.iter().find(|p| !stdout.contains(*p)) {
                Some(p) => Err(format!("output lacks `{p}`: {stdout}")),
                None => Ok(()),
            }
        }
    }
}

#[test]
fn hostile_inputs_get_clear_errors_or_correct_results() {
    let mut c = Corpus::new();
    data_cases(&mut c);
    model_cases(&mut c);
    option_cases(&mut c);
    let trained = trained_adapter(&c);
    adapter_cases(&mut c, &trained);
    predict_cases(&mut c, &trained);
    assert!(
        c.cases.len() >= 100,
        "the corpus holds {} cases",
        c.cases.len()
    );
    let mut failures = Vec::new();
    let mut per_class: std::collections::BTreeMap<&str, usize> = Default::default();
    for case in &c.cases {
        *per_class.entry(case.class).or_default() += 1;
        if let Err(e) = run_case(case) {
            failures.push(format!("[{}] {}: {e}", case.class, case.name));
        }
    }
    eprintln!("hostile corpus: {} cases {per_class:?}", c.cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        c.cases.len(),
        failures.join("\n---\n")
    );
    std::fs::remove_dir_all(&c.root).unwrap();
}
