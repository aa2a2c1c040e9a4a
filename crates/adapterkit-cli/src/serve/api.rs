//! The HTTP API's bodies: the `/predict` request in text-embeddings-inference's shape plus an
//! adapter name, its answers, and errors as `{"error", "error_type"}` with the status they go with.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /predict`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PredictRequest {
    /// A text, a list of texts, or a list of `[text, pair]` lists (see [`parse_inputs`]).
    pub inputs: Value,
    /// The adapter to run; without it, the server's default adapter.
    #[serde(default)]
    pub adapter: Option<String>,
    /// Raw head outputs instead of softmax probabilities.
    #[serde(default)]
    pub raw_scores: bool,
    /// Cut inputs longer than the adapter's length; when false, such an input is refused.
    #[serde(default = "yes")]
    pub truncate: bool,
    /// Which end is cut (`right` only).
    #[serde(default)]
    pub truncation_direction: Option<String>,
}

fn yes() -> bool {
    true
}

/// `POST /adapters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoadRequest {
    /// The name to serve it as.
    pub name: String,
    /// Its directory, relative to the adapter root (or absolute, inside it).
    pub path: String,
}

/// One label and its score, as text-embeddings-inference answers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Prediction {
    /// The class label (`value` for a regression head).
    pub label: String,
    /// Probability, or the raw output with `raw_scores` (and always for regression).
    pub score: f32,
}

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, naming the field.
    pub message: String,
    /// Seconds a client should wait before retrying (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 422: a well-formed request that asks for something invalid.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }

    /// The `error_type` text-embeddings-inference uses for this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => "Overloaded",
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::NOT_FOUND => "NotFound",
            StatusCode::GATEWAY_TIMEOUT => "Timeout",
            s if s.is_server_error() => "Backend",
            _ => "Validation",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.message, "error_type": self.kind()});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// Parses a JSON body: malformed JSON is 400, JSON of the wrong shape 422; both name where.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let status = match e.classify() {
            serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, format!("request body: {e}"))
    })
}

/// The inputs of one request and whether it was a single input (answered with one list) or a batch
/// (a list of lists).
#[derive(Debug, PartialEq)]
pub(crate) struct Inputs {
    /// `(text, pair)` per input.
    pub items: Vec<(String, Option<String>)>,
    /// A single input, not a batch.
    pub single: bool,
}

/// Reads `inputs` for an adapter that takes pairs (`pair`) or single texts: `"text"`; a list of
/// texts (for a pair adapter, `["text", "pair"]` is one pair, as in text-embeddings-inference);
/// a list of lists, each `["text"]` or `["text", "pair"]`.
pub(crate) fn parse_inputs(inputs: &Value, pair: bool, adapter: &str) -> Result<Inputs, ApiError> {
    let shape =
        "`inputs` must be a text, a list of texts, or a list of [text] / [text, pair] lists";
    let wants = |i: usize, got_pair: bool| -> ApiError {
        if pair {
            ApiError::invalid(format!(
                "`inputs[{i}]`: adapter `{adapter}` classifies sentence pairs; give [text, pair]"
            ))
        } else if got_pair {
            ApiError::invalid(format!(
                "`inputs[{i}]`: adapter `{adapter}` classifies single texts, not pairs"
            ))
        } else {
            ApiError::invalid(format!("`inputs[{i}]`: {shape}"))
        }
    };
    match inputs {
        Value::String(s) if !pair => Ok(Inputs {
            items: vec![(s.clone(), None)],
            single: true,
        }),
        Value::String(_) => Err(wants(0, false)),
        Value::Array(list) if list.is_empty() => Err(ApiError::invalid(
            "`inputs` is empty: give at least one text",
        )),
        Value::Array(list) if list.iter().all(Value::is_string) => {
            let texts: Vec<String> = list
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            if pair {
                match <[String; 2]>::try_from(texts) {
                    Ok([a, b]) => Ok(Inputs {
                        items: vec![(a, Some(b))],
                        single: true,
                    }),
                    Err(_) => Err(ApiError::invalid(format!(
                        "`inputs`: adapter `{adapter}` classifies sentence pairs; give [text, pair] or a list of them"
                    ))),
                }
            } else {
                Ok(Inputs {
                    items: texts.into_iter().map(|t| (t, None)).collect(),
                    single: false,
                })
            }
        }
        Value::Array(list) => {
            let mut items = Vec::with_capacity(list.len());
            for (i, v) in list.iter().enumerate() {
                let parts: Option<Vec<&str>> = v
                    .as_array()
                    .map(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
                    .unwrap_or(None);
                match (parts.as_deref(), pair) {
                    (Some([a]), false) => items.push((a.to_string(), None)),
                    (Some([a, b]), true) => items.push((a.to_string(), Some(b.to_string()))),
                    (Some([_, _]), false) => return Err(wants(i, true)),
                    _ => return Err(wants(i, false)),
                }
            }
            Ok(Inputs {
                items,
                single: false,
            })
        }
        _ => Err(ApiError::invalid(shape)),
    }
}

/// Softmax of one row, in f32 with the maximum subtracted.
pub(crate) fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

/// One row's answer: labels with probabilities (or raw scores), highest first; a regression head's
/// value under the label `value`.
pub(crate) fn predictions(labels: &[String], raw: &[f32], raw_scores: bool) -> Vec<Prediction> {
    if labels.is_empty() {
        return raw
            .iter()
            .map(|&v| Prediction {
                label: "value".into(),
                score: v,
            })
            .collect();
    }
    let scores = if raw_scores {
        raw.to_vec()
    } else {
        softmax(raw)
    };
    let mut out: Vec<Prediction> = labels
        .iter()
        .zip(scores)
        .map(|(l, s)| Prediction {
            label: l.clone(),
            score: s,
        })
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_in_every_shape_and_the_errors_name_the_item() {
        let one = parse_inputs(&json!("hi"), false, "mr").unwrap();
        assert_eq!(one.items, vec![("hi".to_string(), None)]);
        assert!(one.single);
        let many = parse_inputs(&json!(["a", "b"]), false, "mr").unwrap();
        assert_eq!(many.items.len(), 2);
        assert!(!many.single);
        let pair = parse_inputs(&json!(["a", "b"]), true, "nli").unwrap();
        assert_eq!(pair.items, vec![("a".into(), Some("b".into()))]);
        assert!(pair.single);
        let pairs = parse_inputs(&json!([["a", "b"], ["c", "d"]]), true, "nli").unwrap();
        assert_eq!(pairs.items.len(), 2);
        let tei = parse_inputs(&json!([["a"], ["b"]]), false, "mr").unwrap();
        assert_eq!(tei.items.len(), 2);
        let e = parse_inputs(&json!([["a"], ["b", "c"]]), false, "mr").unwrap_err();
        assert!(
            e.message.contains("inputs[1]") && e.message.contains("single texts"),
            "{}",
            e.message
        );
        let e = parse_inputs(&json!(["a", "b", "c"]), true, "nli").unwrap_err();
        assert!(e.message.contains("pairs"), "{}", e.message);
        let e = parse_inputs(&json!([]), false, "mr").unwrap_err();
        assert!(e.message.contains("empty"));
        let e = parse_inputs(&json!(3), false, "mr").unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn predictions_sorted_and_softmaxed() {
        let labels = vec!["neg".to_string(), "pos".to_string()];
        let p = predictions(&labels, &[0.0, 2.0], false);
        assert_eq!(p[0].label, "pos");
        assert!((p[0].score + p[1].score - 1.0).abs() < 1e-6);
        let raw = predictions(&labels, &[0.0, 2.0], true);
        assert_eq!(raw[0].score, 2.0);
        let reg = predictions(&[], &[3.5], false);
        assert_eq!(
            reg,
            vec![Prediction {
                label: "value".into(),
                score: 3.5
            }]
        );
    }

    #[test]
    fn malformed_json_is_400_and_wrong_shape_422() {
        let e = parse_body::<PredictRequest>(b"{\"inputs\": ").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse_body::<PredictRequest>(b"{\"input\": \"x\"}").unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.message.contains("input"), "{}", e.message);
    }
}
