//! Labelled text data: readers (CSV, TSV, JSON, JSONL), the registry of real data sets, fixed
//! stratified splits and length-bucketed batching.

use crate::error::{Error, Result};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One labelled example as read from a file; the label is the file's raw value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// The text (first sentence).
    pub text: String,
    /// Second sentence for pair tasks.
    pub pair: Option<String>,
    /// Raw label value as written in the file.
    pub label: String,
    /// 1-based line (CSV/TSV/JSONL) or record (JSON array) number, for error messages.
    pub line: usize,
}

/// File layout of a data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Comma-separated, RFC 4180 quoting; a UTF-8 BOM is skipped.
    Csv,
    /// Tab-separated, no quoting.
    Tsv,
    /// One JSON object per line.
    Jsonl,
    /// One JSON array of objects.
    Json,
}

impl Format {
    /// Guesses the format from a file extension.
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" => Some(Format::Csv),
            "tsv" | "tab" => Some(Format::Tsv),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// Which columns (by header name, or 0-based index for header-less CSV/TSV) or JSON fields hold what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Columns {
    /// Column of the text.
    pub text: String,
    /// Column of the second text of a pair, if any.
    pub pair: Option<String>,
    /// Column of the label.
    pub label: String,
    /// Whether CSV/TSV files start with a header row.
    pub header: bool,
    /// Skip records whose text is empty and label is null/empty (trailing sentinel records).
    #[serde(default)]
    pub drop_empty: bool,
}

fn data_err(path: &Path, line: usize, message: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Reads every example of a file.
pub fn read_examples(path: &Path, format: Format, cols: &Columns) -> Result<Vec<Example>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let examples = match format {
        Format::Csv | Format::Tsv => read_delimited(path, &bytes, format, cols)?,
        Format::Jsonl => {
            let mut out = Vec::new();
            for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                let line_no = i + 1;
                let text = std::str::from_utf8(line)
                    .map_err(|e| data_err(path, line_no, format!("not valid UTF-8: {e}")))?;
                let text = text.trim_start_matches('\u{feff}').trim();
                if text.is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| data_err(path, line_no, format!("invalid JSON: {e}")))?;
                if let Some(ex) = json_example(path, line_no, &v, cols)? {
                    out.push(ex);
                }
            }
            out
        }
        Format::Json => {
            let text = std::str::from_utf8(&bytes).map_err(|e| {
                let line = 1 + bytes[..e.valid_up_to()]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count();
                data_err(path, line, format!("not valid UTF-8: {e}"))
            })?;
            let v: serde_json::Value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
                .map_err(|e| data_err(path, e.line(), format!("invalid JSON: {e}")))?;
            let arr = v
                .as_array()
                .ok_or_else(|| data_err(path, 1, "expected a JSON array of objects"))?;
            let mut out = Vec::new();
            for (i, item) in arr.iter().enumerate() {
                if let Some(ex) = json_example(path, i + 1, item, cols)? {
                    out.push(ex);
                }
            }
            out
        }
    };
    if examples.is_empty() {
        return Err(data_err(path, 0, "the file holds no examples"));
    }
    Ok(examples)
}

fn json_scalar(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn json_example(
    path: &Path,
    line: usize,
    v: &serde_json::Value,
    cols: &Columns,
) -> Result<Option<Example>> {
    let obj = v
        .as_object()
        .ok_or_else(|| data_err(path, line, "expected a JSON object"))?;
    let field = |name: &str| -> Result<Option<String>> {
        match obj.get(name) {
            None => Err(data_err(
                path,
                line,
                format!(
                    "missing field `{name}` (fields present: {})",
                    obj.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )),
            Some(serde_json::Value::Null) => Ok(None),
            Some(x) => json_scalar(x).map(Some).ok_or_else(|| {
                data_err(
                    path,
                    line,
                    format!("field `{name}` must be a string or number"),
                )
            }),
        }
    };
    let text = field(&cols.text)?.unwrap_or_default();
    let label = field(&cols.label)?;
    if cols.drop_empty && text.trim().is_empty() && label.as_deref().unwrap_or("").is_empty() {
        return Ok(None);
    }
    let label =
        label.ok_or_else(|| data_err(path, line, format!("field `{}` is null", cols.label)))?;
    let pair = match &cols.pair {
        Some(p) => {
            Some(field(p)?.ok_or_else(|| data_err(path, line, format!("field `{p}` is null")))?)
        }
        None => None,
    };
    Ok(Some(Example {
        text,
        pair,
        label,
        line,
    }))
}

fn read_delimited(
    path: &Path,
    bytes: &[u8],
    format: Format,
    cols: &Columns,
) -> Result<Vec<Example>> {
    let mut b = csv::ReaderBuilder::new();
    b.has_headers(cols.header).flexible(true);
    if format == Format::Tsv {
        b.delimiter(b'\t').quoting(false);
    }
    let mut rdr = b.from_reader(bytes);
    let index_of = |name: &str, headers: Option<&csv::StringRecord>| -> Result<usize> {
        if let Some(h) = headers {
            if let Some(i) = h
                .iter()
                .position(|c| c.trim_start_matches('\u{feff}') == name)
            {
                return Ok(i);
            }
            return Err(data_err(
                path,
                1,
                format!(
                    "no column `{name}` in the header (columns: {})",
                    h.iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        name.parse::<usize>().map_err(|_| {
            data_err(
                path,
                0,
                format!("column `{name}` must be a 0-based index because the file has no header"),
            )
        })
    };
    let headers = if cols.header {
        Some(rdr.headers().map_err(|e| csv_err(path, e))?.clone())
    } else {
        None
    };
    let ti = index_of(&cols.text, headers.as_ref())?;
    let li = index_of(&cols.label, headers.as_ref())?;
    let pi = match &cols.pair {
        Some(p) => Some(index_of(p, headers.as_ref())?),
        None => None,
    };
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| csv_err(path, e))?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        if rec.len() == 1 && rec.get(0).map(str::trim).unwrap_or("").is_empty() {
            continue;
        }
        let get = |i: usize, what: &str| -> Result<String> {
            rec.get(i)
                .map(|s| s.trim_start_matches('\u{feff}').to_string())
                .ok_or_else(|| {
                    data_err(
                        path,
                        line,
                        format!(
                            "missing {what} column {i} (the record has {} columns)",
                            rec.len()
                        ),
                    )
                })
        };
        let text = get(ti, "text")?;
        let label = get(li, "label")?.trim().to_string();
        if cols.drop_empty && text.trim().is_empty() && label.is_empty() {
            continue;
        }
        let pair = match pi {
            Some(i) => Some(get(i, "pair")?),
            None => None,
        };
        out.push(Example {
            text: text.trim().to_string(),
            pair,
            label,
            line,
        });
    }
    Ok(out)
}

fn csv_err(path: &Path, e: csv::Error) -> Error {
    let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
    let msg = match e.kind() {
        csv::ErrorKind::Utf8 { err, .. } => format!("not valid UTF-8 (field {})", err.field() + 1),
        _ => e.to_string(),
    };
    data_err(path, line, msg)
}

/// A data set known by name: where its file lies in the asset cache and how to read it.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// Registry name (`mr`, `amazon`, …).
    pub name: &'static str,
    /// What the task is.
    pub description: &'static str,
    /// Path of the file relative to the asset cache.
    pub file: &'static str,
    /// File format.
    pub format: Format,
    /// Column mapping.
    pub columns: fn() -> Columns,
    /// Raw label value → class name, in class-index order.
    pub labels: &'static [(&'static str, &'static str)],
    /// Default maximum length in word pieces.
    pub max_len: usize,
}

fn csv_label_text() -> Columns {
    Columns {
        text: "1".into(),
        pair: None,
        label: "0".into(),
        header: false,
        drop_empty: false,
    }
}

fn jsonl_text_label() -> Columns {
    Columns {
        text: "text".into(),
        pair: None,
        label: "label".into(),
        header: false,
        drop_empty: false,
    }
}

fn uci_columns() -> Columns {
    Columns {
        text: "text".into(),
        pair: None,
        label: "class".into(),
        header: false,
        drop_empty: true,
    }
}

/// The real data sets adapterkit knows (fetched by `adapterkit fetch`, see ASSETS.md).
pub const REGISTRY: &[TaskSpec] = &[
    TaskSpec {
        name: "mr",
        description: "Movie-review sentence polarity (Pang & Lee), 4,000 sentences",
        file: "data/mr/polarity-en-pang-lee2.csv",
        format: Format::Csv,
        columns: csv_label_text,
        labels: &[("-1", "negative"), ("1", "positive")],
        max_len: 64,
    },
    TaskSpec {
        name: "hedge",
        description: "CoNLL-2010 hedge/uncertainty detection, 3,000 sentences",
        file: "data/hedge/uncertainty-conll2010.csv",
        format: Format::Csv,
        columns: csv_label_text,
        // -1 marks the uncertain (hedged) sentences: they carry 0.82 hedge/weasel cues ("some",
        // "many", "may", "probably", …) per sentence against 0.29 for label 1.
        labels: &[("-1", "uncertain"), ("1", "certain")],
        max_len: 96,
    },
    TaskSpec {
        name: "amazon",
        description: "UCI sentiment-labelled sentences, Amazon reviews, 1,000",
        file: "data/uci/amazon.json",
        format: Format::Json,
        columns: uci_columns,
        labels: &[("0", "negative"), ("1", "positive")],
        max_len: 64,
    },
    TaskSpec {
        name: "imdb",
        description: "UCI sentiment-labelled sentences, IMDB reviews, 1,000",
        file: "data/uci/imdb.json",
        format: Format::Json,
        columns: uci_columns,
        labels: &[("0", "negative"), ("1", "positive")],
        max_len: 64,
    },
    TaskSpec {
        name: "yelp",
        description: "UCI sentiment-labelled sentences, Yelp reviews, 1,000",
        file: "data/uci/yelp.json",
        format: Format::Json,
        columns: uci_columns,
        labels: &[("0", "negative"), ("1", "positive")],
        max_len: 64,
    },
    TaskSpec {
        name: "tweets",
        description:
            "CrowdFlower tweets, 3-class sentiment, confidence-1 subset, deduplicated, 17,824",
        file: "data/tweets/tweets.jsonl",
        format: Format::Jsonl,
        columns: jsonl_text_label,
        labels: &[
            ("negative", "negative"),
            ("neutral", "neutral"),
            ("positive", "positive"),
        ],
        max_len: 64,
    },
    TaskSpec {
        name: "sms",
        description: "SMS spam collection, 4,862 messages (642 spam)",
        file: "data/sms/sms.jsonl",
        format: Format::Jsonl,
        columns: jsonl_text_label,
        labels: &[("ham", "ham"), ("spam", "spam")],
        max_len: 64,
    },
    TaskSpec {
        name: "bbc",
        description: "BBC News topics, 5 classes, 2,225 documents (truncated to 128 word pieces)",
        file: "data/bbc/bbc.jsonl",
        format: Format::Jsonl,
        columns: jsonl_text_label,
        labels: &[
            ("business", "business"),
            ("entertainment", "entertainment"),
            ("politics", "politics"),
            ("sports", "sports"),
            ("tech", "tech"),
        ],
        max_len: 128,
    },
];

/// Looks a task up in [`REGISTRY`].
pub fn task_spec(name: &str) -> Result<&'static TaskSpec> {
    REGISTRY.iter().find(|t| t.name == name).ok_or_else(|| {
        Error::NotFound(format!(
            "unknown task `{name}` (known: {})",
            REGISTRY
                .iter()
                .map(|t| t.name)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// Indices of one example set per split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split {
    /// Training indices, ascending.
    pub train: Vec<usize>,
    /// Development indices, ascending.
    pub dev: Vec<usize>,
    /// Test indices, ascending.
    pub test: Vec<usize>,
}

impl Split {
    /// A fingerprint of the split (FNV-1a over the indices), to record that runs used the same split.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (tag, v) in [(1u64, &self.train), (2, &self.dev), (3, &self.test)] {
            for &i in v.iter() {
                for x in [tag, i as u64] {
                    h ^= x;
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
        format!("{h:016x}")
    }
}

/// Fixed, seeded, stratified split: within each class, `dev_frac` and `test_frac` of the examples
/// (rounded) go to dev and test, the rest to train. Depends only on the labels and the seed.
pub fn stratified_split(labels: &[usize], dev_frac: f64, test_frac: f64, seed: u64) -> Split {
    let mut rng = Rng::derive(seed, "split");
    let classes = labels.iter().copied().max().map(|m| m + 1).unwrap_or(0);
    let mut split = Split {
        train: vec![],
        dev: vec![],
        test: vec![],
    };
    for c in 0..classes {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        rng.shuffle(&mut idx);
        let n = idx.len();
        let n_test = (n as f64 * test_frac).round() as usize;
        let n_dev = ((n as f64 * dev_frac).round() as usize).min(n - n_test);
        split.test.extend_from_slice(&idx[..n_test]);
        split.dev.extend_from_slice(&idx[n_test..n_test + n_dev]);
        split.train.extend_from_slice(&idx[n_test + n_dev..]);
    }
    split.train.sort_unstable();
    split.dev.sort_unstable();
    split.test.sort_unstable();
    split
}

/// Examples with class indices, ready for training.
#[derive(Debug, Clone)]
pub struct LabelledSet {
    /// Inputs `(text, pair)`.
    pub inputs: Vec<(String, Option<String>)>,
    /// Class index (classification) per example.
    pub labels: Vec<usize>,
    /// Target value (regression) per example.
    pub targets: Vec<f32>,
}

impl LabelledSet {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }
}

/// A task's data, split, with class names.
#[derive(Debug, Clone)]
pub struct TaskData {
    /// Task name.
    pub name: String,
    /// Class names in index order (empty for regression).
    pub labels: Vec<String>,
    /// Training set.
    pub train: LabelledSet,
    /// Development set (model selection).
    pub dev: LabelledSet,
    /// Test set (reported once).
    pub test: LabelledSet,
    /// The split, when it was made by [`stratified_split`].
    pub split: Option<Split>,
    /// Whether inputs are pairs.
    pub pair: bool,
    /// Files the data came from.
    pub source: Vec<PathBuf>,
}

/// Maps raw labels to class indices; unknown labels are errors naming file and line.
pub fn index_labels(
    path: &Path,
    examples: &[Example],
    labels: &[(String, String)],
) -> Result<Vec<usize>> {
    examples
        .iter()
        .map(|e| {
            labels
                .iter()
                .position(|(raw, _)| raw == &e.label)
                .ok_or_else(|| {
                    data_err(
                        path,
                        e.line,
                        format!(
                            "unknown label `{}` (expected one of: {})",
                            e.label,
                            labels
                                .iter()
                                .map(|(r, _)| r.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })
        })
        .collect()
}

fn to_set(examples: &[Example], labels: &[usize], targets: &[f32], idx: &[usize]) -> LabelledSet {
    LabelledSet {
        inputs: idx
            .iter()
            .map(|&i| (examples[i].text.clone(), examples[i].pair.clone()))
            .collect(),
        labels: idx.iter().map(|&i| labels[i]).collect(),
        targets: idx.iter().map(|&i| targets[i]).collect(),
    }
}

/// How the label column of a user's files is read.
#[derive(Debug, Clone, PartialEq)]
pub enum Labels {
    /// Classes are the sorted distinct labels of the training file.
    Infer,
    /// Classes are these, in this order; any other label is an error.
    Given(Vec<String>),
    /// Labels are real numbers (regression).
    Regression,
}

/// Class indices and numeric targets of examples; for regression the class index is 0.
fn label_values(
    path: &Path,
    examples: &[Example],
    classes: Option<&[(String, String)]>,
) -> Result<(Vec<usize>, Vec<f32>)> {
    match classes {
        Some(c) => {
            let idx = index_labels(path, examples, c)?;
            let t = idx.iter().map(|&i| i as f32).collect();
            Ok((idx, t))
        }
        None => {
            let t = examples
                .iter()
                .map(|e| {
                    e.label
                        .trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|v| v.is_finite())
                        .ok_or_else(|| {
                            data_err(
                                path,
                                e.line,
                                format!("label `{}` is not a number (regression task)", e.label),
                            )
                        })
                })
                .collect::<Result<Vec<f32>>>()?;
            Ok((vec![0; t.len()], t))
        }
    }
}

/// Loads a registry task from the asset cache and splits it 80/10/10 (seeded, stratified).
pub fn load_registry_task(home: &Path, name: &str, split_seed: u64) -> Result<TaskData> {
    let spec = task_spec(name)?;
    let path = home.join(spec.file);
    if !path.exists() {
        return Err(Error::NotFound(format!(
            "{}: data file of task `{name}` not found; run `adapterkit fetch` first",
            path.display()
        )));
    }
    let examples = read_examples(&path, spec.format, &(spec.columns)())?;
    let labels: Vec<(String, String)> = spec
        .labels
        .iter()
        .map(|(r, n)| (r.to_string(), n.to_string()))
        .collect();
    let (idx, targets) = label_values(&path, &examples, Some(&labels))?;
    let split = stratified_split(&idx, 0.1, 0.1, split_seed);
    Ok(TaskData {
        name: name.to_string(),
        labels: labels.into_iter().map(|(_, n)| n).collect(),
        train: to_set(&examples, &idx, &targets, &split.train),
        dev: to_set(&examples, &idx, &targets, &split.dev),
        test: to_set(&examples, &idx, &targets, &split.test),
        split: Some(split),
        pair: false,
        source: vec![path],
    })
}

/// A user's data files.
#[derive(Debug, Clone)]
pub struct DataFiles {
    /// Training file (split 80/10/10 when dev and test are absent).
    pub train: PathBuf,
    /// Development file.
    pub dev: Option<PathBuf>,
    /// Test file.
    pub test: Option<PathBuf>,
    /// Format of all files; `None` guesses from each extension.
    pub format: Option<Format>,
}

/// Loads a user's files: with only `train`, it is split 80/10/10; class names are the sorted distinct
/// labels of the training file unless `labels` lists them.
pub fn load_files(
    name: &str,
    files: &DataFiles,
    cols: &Columns,
    labels: Labels,
    split_seed: u64,
) -> Result<TaskData> {
    let (train, dev, test, format) = (
        files.train.as_path(),
        files.dev.as_deref(),
        files.test.as_deref(),
        files.format,
    );
    let fmt = |p: &Path| -> Result<Format> {
        format.or_else(|| Format::from_path(p)).ok_or_else(|| {
            Error::config(
                p.display().to_string(),
                "format",
                "cannot tell the format from the extension; pass csv, tsv, json or jsonl",
            )
        })
    };
    let train_ex = read_examples(train, fmt(train)?, cols)?;
    let regression = labels == Labels::Regression;
    let names = match labels {
        Labels::Given(l) => l,
        Labels::Regression => Vec::new(),
        Labels::Infer => {
            let mut l: Vec<String> = train_ex.iter().map(|e| e.label.clone()).collect();
            l.sort();
            l.dedup();
            l
        }
    };
    if !regression && names.len() < 2 {
        return Err(data_err(
            train,
            0,
            format!("need at least 2 distinct labels, found {names:?}"),
        ));
    }
    let pairs: Vec<(String, String)> = names.iter().map(|n| (n.clone(), n.clone())).collect();
    let classes = (!regression).then_some(pairs.as_slice());
    let (train_idx, train_t) = label_values(train, &train_ex, classes)?;
    let (train_set, dev_set, test_set, split) = match (dev, test) {
        (Some(d), Some(t)) => {
            let dex = read_examples(d, fmt(d)?, cols)?;
            let tex = read_examples(t, fmt(t)?, cols)?;
            let (di, dt) = label_values(d, &dex, classes)?;
            let (ti, tt) = label_values(t, &tex, classes)?;
            let all = |n: usize| (0..n).collect::<Vec<_>>();
            (
                to_set(&train_ex, &train_idx, &train_t, &all(train_ex.len())),
                to_set(&dex, &di, &dt, &all(dex.len())),
                to_set(&tex, &ti, &tt, &all(tex.len())),
                None,
            )
        }
        (None, None) => {
            let s = stratified_split(&train_idx, 0.1, 0.1, split_seed);
            (
                to_set(&train_ex, &train_idx, &train_t, &s.train),
                to_set(&train_ex, &train_idx, &train_t, &s.dev),
                to_set(&train_ex, &train_idx, &train_t, &s.test),
                Some(s),
            )
        }
        _ => {
            return Err(Error::config(
                "data",
                "dev/test",
                "give both a dev and a test file, or neither (then the training file is split 80/10/10)",
            ))
        }
    };
    Ok(TaskData {
        name: name.to_string(),
        labels: names,
        train: train_set,
        dev: dev_set,
        test: test_set,
        split,
        pair: cols.pair.is_some(),
        source: [Some(train), dev, test]
            .into_iter()
            .flatten()
            .map(Path::to_path_buf)
            .collect(),
    })
}

/// Length-bucketed batches: shuffle, sort within pools of 50 batches by length, shuffle the batches.
/// Rows of similar length share a batch, so little compute goes to padding.
pub fn bucketed_batches(lengths: &[usize], batch_size: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let bs = batch_size.max(1);
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut idx);
    let mut batches = Vec::new();
    for pool in idx.chunks(bs * 50) {
        let mut pool = pool.to_vec();
        pool.sort_by_key(|&i| lengths[i]);
        batches.extend(pool.chunks(bs).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, content: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ak-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }

    #[test]
    fn split_is_stratified_disjoint_and_fixed() {
        let labels: Vec<usize> = (0..1000).map(|i| usize::from(i % 4 == 0)).collect();
        let a = stratified_split(&labels, 0.1, 0.1, 0);
        let b = stratified_split(&labels, 0.1, 0.1, 0);
        assert_eq!(a, b);
        assert_ne!(a, stratified_split(&labels, 0.1, 0.1, 1));
        assert_eq!(a.train.len() + a.dev.len() + a.test.len(), 1000);
        assert_eq!(a.test.iter().filter(|&&i| labels[i] == 1).count(), 25);
        let mut all: Vec<usize> = a
            .train
            .iter()
            .chain(&a.dev)
            .chain(&a.test)
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 1000);
    }

    #[test]
    fn csv_with_bom_and_multiline_quotes() {
        let p = tmp(
            "a.csv",
            "\u{feff}\"1\",\"good \"\" film\n\"\n\"-1\",\"bad\"\n".as_bytes(),
        );
        let ex = read_examples(&p, Format::Csv, &csv_label_text()).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].label, "1");
        assert_eq!(ex[0].text, "good \" film");
        assert_eq!(ex[1].line, 3);
    }

    #[test]
    fn hostile_data_files_give_errors_with_file_and_line() {
        let cols = csv_label_text();
        let empty = tmp("empty.csv", b"");
        let e = read_examples(&empty, Format::Csv, &cols)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty.csv") && e.contains("no examples"), "{e}");

        let bad = tmp("bad.csv", b"\"1\",\"ok\"\n\"1\",\"caf\xff\"\n");
        let e = read_examples(&bad, Format::Csv, &cols)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.csv:2") && e.contains("UTF-8"), "{e}");

        let short = tmp("short.csv", b"\"1\"\n");
        let e = read_examples(&short, Format::Csv, &cols)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("short.csv:1") && e.contains("text column 1"),
            "{e}"
        );

        let hdr = tmp("h.csv", b"sentence,y\nhi,1\n");
        let named = Columns {
            text: "text".into(),
            pair: None,
            label: "y".into(),
            header: true,
            drop_empty: false,
        };
        let e = read_examples(&hdr, Format::Csv, &named)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no column `text`") && e.contains("sentence"),
            "{e}"
        );

        let jl = tmp(
            "x.jsonl",
            b"{\"text\":\"a\",\"class\":1}\n{\"txt\":\"b\",\"class\":0}\n",
        );
        let e = read_examples(&jl, Format::Jsonl, &uci_columns())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.jsonl:2") && e.contains("missing field `text`"),
            "{e}"
        );

        let ok = tmp("ok.csv", b"\"1\",\"a\"\n\"7\",\"b\"\n");
        let ex = read_examples(&ok, Format::Csv, &cols).unwrap();
        let labels = vec![
            ("-1".to_string(), "n".to_string()),
            ("1".to_string(), "p".to_string()),
        ];
        let e = index_labels(&ok, &ex, &labels).unwrap_err().to_string();
        assert!(
            e.contains("ok.csv:2") && e.contains("unknown label `7`"),
            "{e}"
        );
    }

    #[test]
    fn buckets_cover_everything_once_and_group_lengths() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 37) % 100).collect();
        let mut rng = Rng::new(3);
        let batches = bucketed_batches(&lengths, 16, &mut rng);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        let padded: usize = batches
            .iter()
            .map(|b| b.iter().map(|&i| lengths[i]).max().unwrap() * b.len())
            .sum();
        let real: usize = lengths.iter().sum();
        assert!(
            (padded as f64) < real as f64 * 1.1,
            "padding overhead too high: {padded} vs {real}"
        );
    }
}
