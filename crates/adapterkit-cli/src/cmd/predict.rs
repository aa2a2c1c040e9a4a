//! `adapterkit predict`: labels for texts from arguments, a file or stdin, as JSONL.

use super::*;

#[derive(Args)]
pub(crate) struct PredictArgs {
    /// Adapter directory written by `train`.
    #[arg(long)]
    adapter: PathBuf,
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
}

pub(crate) fn predict(a: PredictArgs) -> Result<()> {
    let base = load_base(&a.model)?;
    let task = load_task(&base, &a.adapter)?;
    let texts: Vec<String> = if !a.texts.is_empty() {
        a.texts.clone()
    } else {
        let reader: Box<dyn BufRead> = match &a.input {
            Some(p) => Box::new(std::io::BufReader::new(
                std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
            )),
            None => Box::new(std::io::stdin().lock()),
        };
        let mut v = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("reading input line {}", i + 1))?;
            if !line.trim().is_empty() {
                v.push(line);
            }
        }
        v
    };
    let inputs: Vec<(String, Option<String>)> = if task.head.pair {
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
    };
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
        let mut line = match task.head.kind {
            HeadKind::Classification => {
                let best = adapterkit::train::argmax(&o);
                let probs: serde_json::Map<String, serde_json::Value> = task
                    .head
                    .labels
                    .iter()
                    .zip(&o)
                    .map(|(l, p)| (l.clone(), json!(p)))
                    .collect();
                json!({"text": text, "label": task.head.labels[best], "probabilities": probs})
            }
            HeadKind::Regression => json!({"text": text, "value": o.first()}),
        };
        if let Some(l) = &logits {
            line["logits"] = json!(l[i]);
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}
