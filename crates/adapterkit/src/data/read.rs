//! Readers of labelled examples: CSV, TSV, JSON and JSONL, with errors naming file and line.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

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

pub(super) fn data_err(path: &Path, line: usize, message: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

/// Reads every example of a file.
pub fn read_examples(path: &Path, format: Format, cols: &Columns) -> Result<Vec<Example>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes
        .strip_prefix("\u{feff}".as_bytes())
        .unwrap_or(&bytes)
        .iter()
        .all(u8::is_ascii_whitespace)
    {
        return Err(data_err(path, 0, "the file is empty: it holds no examples"));
    }
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

/// The one form of a label, whatever the file's format: trimmed, and a whole number written as an
/// integer (`1`, `1.0` and `" 1 "` are one class, as a CSV and a JSONL file of the same data agree).
pub fn normalise_label(raw: &str) -> String {
    let t = raw.trim();
    // Integers as written stay (`007` may be a name); numbers written as floats become integers.
    let integer = t
        .strip_prefix('-')
        .unwrap_or(t)
        .bytes()
        .all(|b| b.is_ascii_digit());
    match t.parse::<f64>() {
        Ok(v) if !integer && v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 => {
            format!("{}", v as i64)
        }
        _ => t.to_string(),
    }
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
    let label = label
        .map(|l| normalise_label(&l))
        .ok_or_else(|| data_err(path, line, format!("field `{}` is null", cols.label)))?;
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
    // Every record has the header's width (or the first record's): a different count means a
    // field was split or merged (an unquoted comma), which would silently shift the columns.
    let mut width = headers.as_ref().map(|h| (h.len(), 1usize));
    for rec in rdr.records() {
        let rec = rec.map_err(|e| csv_err(path, e))?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        if rec.len() == 1 && rec.get(0).map(str::trim).unwrap_or("").is_empty() {
            continue;
        }
        match width {
            None => width = Some((rec.len(), line)),
            Some((w, from)) if w != rec.len() => {
                return Err(data_err(
                    path,
                    line,
                    format!(
                        "{} columns, but line {from} has {w}{}",
                        rec.len(),
                        if format == Format::Csv {
                            "; a text holding a comma must be quoted (\"like, this\")"
                        } else {
                            "; a text holding a tab breaks a TSV record"
                        }
                    ),
                ))
            }
            Some(_) => {}
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
        let label = normalise_label(&get(li, "label")?);
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
