//! Labelled text data: readers (CSV, TSV, JSON, JSONL), the registry of real data sets, fixed
//! stratified splits and length-bucketed batching.

use crate::error::{Error, Result};
use crate::rng::Rng;
use std::path::{Path, PathBuf};

mod read;
mod registry;
mod split;

use read::data_err;
pub use read::{normalise_label, read_examples, Columns, Example, Format};
pub use registry::{task_spec, TaskSpec, REGISTRY};
pub use split::{stratified_split, Split};

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
    let infer = labels == Labels::Infer;
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
    if infer && !cols.header && matches!(fmt(train)?, Format::Csv | Format::Tsv) {
        looks_like_header(train, &train_ex)?;
    }
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

/// Refuses a header-less file whose first line looks like a header: its label occurs nowhere
/// else (`sentiment` among `pos`/`neg`), so it would become a class of one example.
fn looks_like_header(path: &Path, examples: &[Example]) -> Result<()> {
    let Some(first) = examples.first().filter(|e| e.line == 1) else {
        return Ok(());
    };
    let once = examples[1..].iter().all(|e| e.label != first.label);
    if once && examples.len() >= 10 {
        return Err(data_err(
            path,
            1,
            format!(
                "label `{}` occurs only on the first line, which looks like a header row: pass \
                 --header (or remove the line)",
                first.label
            ),
        ));
    }
    Ok(())
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
    use super::registry::{csv_label_text, uci_columns};
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
