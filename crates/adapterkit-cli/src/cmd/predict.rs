//! `adapterkit predict`: labels for texts from arguments, a file or stdin, as JSONL.

use super::*;

#[derive(Args)]
pub(crate) struct PredictArgs {
    /// Adapter directory written by `train`.
    #[arg(long, required_unless_present = "server")]
    adapter: Option<PathBuf>,
    /// Ask a running `adapterkit serve` at this URL (http://HOST:PORT) instead of loading the
    /// model here; the output is the same.
    #[arg(long, conflicts_with_all = ["adapter", "model", "skip_adapter_layers", "max_len", "precision"])]
    server: Option<String>,
    /// With --server: the adapter's name there [default: the server's default adapter].
    #[arg(long, requires = "server")]
    name: Option<String>,
    /// Texts to classify; without them, lines are read from --input or stdin. For sentence-pair
    /// adapters, each input is `TEXT<TAB>PAIR`.
    texts: Vec<String>,
    /// File with one text per line.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Base model directory [default: the cached all-MiniLM-L6-v2].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Skip the adapters of these layers (comma-separated), AdapterDrop-style.
    #[arg(long, value_delimiter = ',')]
    skip_adapter_layers: Vec<usize>,
    /// Examples per inference batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Also print the head's raw outputs (`logits`, before softmax) for each input.
    #[arg(long)]
    logits: bool,
    /// Maximum tokens per input [default: the length the adapter was trained with].
    #[arg(long)]
    max_len: Option<usize>,
    /// Number format of the frozen projections' products: f32, or fp16 (fp16 products with f32
    /// sums, on CPUs with AVX512_FP16; about 4e-3 from f32 on MiniLM's hidden states).
    #[arg(long, default_value = "f32")]
    precision: adapterkit::Precision,
}

/// The texts to predict: the arguments, else every line of --input or stdin.
fn read_texts(a: &PredictArgs) -> Result<Vec<String>> {
    Ok(if !a.texts.is_empty() {
        a.texts.clone()
    } else {
        let reader: Box<dyn BufRead> = match &a.input {
            Some(p) => Box::new(std::io::BufReader::new(
                std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
            )),
            None => Box::new(std::io::stdin().lock()),
        };
        let mut v = Vec::new();
        // Blank lines are kept (and predicted) so that output line i answers input line i.
        for (i, line) in reader.lines().enumerate() {
            v.push(line.with_context(|| format!("reading input line {}", i + 1))?);
        }
        v
    })
}

/// Splits `TEXT<TAB>PAIR` inputs for a pair adapter.
fn split_pairs(texts: &[String], pair: bool) -> Result<Vec<(String, Option<String>)>> {
    Ok(if pair {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| match t.split_once('\t') {
                Some((a, b)) => Ok((a.to_string(), Some(b.to_string()))),
                None => bail!(
                    "input {}: this adapter takes sentence pairs; write TEXT<TAB>PAIR",
                    i + 1
                ),
            })
            .collect::<Result<_>>()?
    } else {
        texts.iter().map(|t| (t.clone(), None)).collect()
    })
}

/// One output line: the text, the best label and every label's probability (or the value).
fn line(
    text: &str,
    kind: HeadKind,
    labels: &[String],
    o: &[f32],
    logits: Option<&[f32]>,
) -> serde_json::Value {
    let mut line = match kind {
        HeadKind::Classification => {
            let best = adapterkit::train::argmax(o);
            let probs: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .zip(o)
                .map(|(l, p)| (l.clone(), json!(p)))
                .collect();
            json!({"text": text, "label": labels.get(best), "probabilities": probs})
        }
        HeadKind::Regression => json!({"text": text, "value": o.first()}),
    };
    if let Some(l) = logits {
        line["logits"] = json!(l);
    }
    line
}

pub(crate) fn predict(a: PredictArgs) -> Result<()> {
    if let Some(url) = &a.server {
        return predict_remote(&a, url);
    }
    if a.batch_size == 0 {
        bail!("--batch-size 0: give at least 1");
    }
    let base = load_base(&a.model)?;
    let Some(dir) = &a.adapter else {
        bail!("give --adapter DIR or --server URL");
    };
    let positions = base.config.max_position_embeddings;
    if let Some(n) = a.max_len.filter(|&n| n > positions || n < 4) {
        bail!(
            "--max-len {n}: expected 4 to the model's {positions} positions (max_position_embeddings)"
        );
    }
    let task = load_task(&base, dir)?;
    let mut base = base;
    super::hold_model_once(&mut base, &task)?;
    let base = base
        .with_precision(a.precision)
        .with_context(|| format!("--precision {}", a.precision))?;
    let texts = read_texts(&a)?;
    let inputs = split_pairs(&texts, task.head.pair)?;
    let max_len = a.max_len.unwrap_or(task.max_len);
    let encoded = base.tokenizer.encode_all(&inputs, max_len)?;
    let outputs = base.predict_encoded(&task, &encoded, a.batch_size, &a.skip_adapter_layers)?;
    let logits = if a.logits {
        Some(base.logits_encoded(&task, &encoded, a.batch_size, &a.skip_adapter_layers)?)
    } else {
        None
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (i, (text, o)) in texts.iter().zip(outputs).enumerate() {
        let l = logits.as_ref().map(|l| l[i].as_slice());
        writeln!(
            out,
            "{}",
            line(text, task.head.kind, &task.head.labels, &o, l)
        )?;
    }
    Ok(())
}

/// `predict --server`: the same output, from a running server's `/predict`.
fn predict_remote(a: &PredictArgs, url: &str) -> Result<()> {
    use crate::serve::client::HttpClient;
    let mut client = HttpClient::new(url, std::time::Duration::from_secs(120))
        .map_err(|e| anyhow::anyhow!("--server {e}"))?;
    let r = client
        .get("/adapters")
        .with_context(|| format!("asking {url}/adapters"))?;
    let adapters: serde_json::Value = serde_json::from_slice(&r.body)
        .with_context(|| format!("{url}/adapters answered {}: {}", r.status, r.text()))?;
    let info: serde_json::Value = serde_json::from_slice(
        &client
            .get("/info")
            .with_context(|| format!("asking {url}/info"))?
            .body,
    )
    .with_context(|| format!("{url}/info is not JSON"))?;
    let name = match (&a.name, info["default_adapter"].as_str()) {
        (Some(n), _) => n.clone(),
        (None, Some(d)) => d.to_string(),
        (None, None) => bail!("the server has no default adapter: give --name NAME"),
    };
    let Some(entry) = adapters
        .as_array()
        .and_then(|l| l.iter().find(|e| e["name"] == name.as_str()))
    else {
        bail!("the server at {url} serves no adapter `{name}`");
    };
    let labels: Vec<String> = entry["labels"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let kind = if entry["kind"] == "regression" {
        HeadKind::Regression
    } else {
        HeadKind::Classification
    };
    let texts = read_texts(a)?;
    let inputs = split_pairs(&texts, entry["pair"] == true)?;
    let limit = info["limits"]["max_client_batch_size"]
        .as_u64()
        .unwrap_or(32) as usize;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let ask = |client: &mut HttpClient,
               chunk: &[(String, Option<String>)],
               raw: bool|
     -> Result<Vec<Vec<f32>>> {
        let items: Vec<serde_json::Value> = chunk
            .iter()
            .map(|(t, p)| match p {
                Some(p) => json!([t, p]),
                None => json!([t]),
            })
            .collect();
        let body = json!({"inputs": items, "adapter": name, "raw_scores": raw}).to_string();
        let r = client
            .post_json("/predict", &[], &body)
            .with_context(|| format!("asking {url}/predict"))?;
        if r.status != 200 {
            bail!("{url}/predict answered {}: {}", r.status, r.text());
        }
        let rows: Vec<Vec<crate::serve::client::Scored>> = serde_json::from_slice(&r.body)
            .with_context(|| format!("{url}/predict answered something else than predictions"))?;
        // Back to head order: the server sorts each row by score.
        Ok(rows
            .into_iter()
            .map(|row| match kind {
                HeadKind::Regression => row.iter().map(|p| p.score).collect(),
                HeadKind::Classification => labels
                    .iter()
                    .map(|l| {
                        row.iter()
                            .find(|p| &p.label == l)
                            .map_or(f32::NAN, |p| p.score)
                    })
                    .collect(),
            })
            .collect())
    };
    for (ci, chunk) in inputs.chunks(limit.max(1)).enumerate() {
        let probs = ask(&mut client, chunk, false)?;
        let logits = if a.logits {
            Some(ask(&mut client, chunk, true)?)
        } else {
            None
        };
        for (i, o) in probs.iter().enumerate() {
            let text = &texts[ci * limit.max(1) + i];
            let l = logits.as_ref().map(|l| l[i].as_slice());
            writeln!(out, "{}", line(text, kind, &labels, o, l))?;
        }
    }
    Ok(())
}
