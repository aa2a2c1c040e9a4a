//! The registry of real data sets: where each lies in the asset cache and how to read it.

use super::read::{Columns, Format};
use crate::error::{Error, Result};

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

pub(super) fn csv_label_text() -> Columns {
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

pub(super) fn uci_columns() -> Columns {
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
