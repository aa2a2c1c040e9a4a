//! WordPiece tokenization through Hugging Face `tokenizers`, from `tokenizer.json` or `vocab.txt`.

use crate::error::{Error, Result};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{Model, Tokenizer, TruncationParams, TruncationStrategy};

/// A checkpoint's tokenizer with padding and truncation under our control (batches pad themselves).
pub struct TextTokenizer {
    inner: Tokenizer,
    // Copies configured to truncate at the lengths asked for: cloning the vocabulary on every call
    // cost more than encoding a short sentence. Shared by `Arc` so that concurrent callers (the
    // server's request handlers) encode without holding the lock.
    truncating: Mutex<Vec<(usize, Arc<Tokenizer>)>>,
}

/// How many truncation lengths keep a configured copy (adapters served together may differ).
const CACHED_LENGTHS: usize = 8;

/// One encoded input: token ids, segment ids, and whether it was cut to fit `max_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids with [CLS]/[SEP].
    pub ids: Vec<u32>,
    /// Segment (token type) ids.
    pub type_ids: Vec<u32>,
    /// Whether tokens were dropped to fit the length.
    pub truncated: bool,
}

impl Clone for TextTokenizer {
    fn clone(&self) -> Self {
        TextTokenizer {
            inner: self.inner.clone(),
            truncating: Mutex::new(Vec::new()),
        }
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `dir`, or builds a BERT WordPiece tokenizer from `vocab.txt`
    /// (lower-casing unless `tokenizer_config.json` says `"do_lower_case": false`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let mut inner = if json.exists() {
            Tokenizer::from_file(&json)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?
        } else {
            let vocab = dir.join("vocab.txt");
            if !vocab.exists() {
                return Err(Error::io(
                    &json,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "neither tokenizer.json nor vocab.txt is in the checkpoint directory",
                    ),
                ));
            }
            Self::from_vocab(&vocab, lowercase_setting(dir)?)?.inner
        };
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(TextTokenizer {
            inner,
            truncating: Mutex::new(Vec::new()),
        })
    }

    /// Builds a BERT WordPiece tokenizer from a `vocab.txt`.
    pub fn from_vocab(vocab: &Path, lowercase: bool) -> Result<Self> {
        let path = vocab
            .to_str()
            .ok_or_else(|| Error::Tokenizer(format!("{}: path is not UTF-8", vocab.display())))?;
        let wp = WordPiece::from_file(path)
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", vocab.display())))?;
        let id = |tok: &str| -> Result<u32> {
            wp.get_vocab().get(tok).copied().ok_or_else(|| {
                Error::Tokenizer(format!("{}: vocabulary lacks `{tok}`", vocab.display()))
            })
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        let mut inner = Tokenizer::new(wp);
        inner.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)));
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )));
        Ok(TextTokenizer {
            inner,
            truncating: Mutex::new(Vec::new()),
        })
    }

    /// Token ids and segment ids of each input, with [CLS]/[SEP] and at most `max_len` tokens
    /// (pairs truncated longest-first).
    pub fn encode_all(
        &self,
        inputs: &[(String, Option<String>)],
        max_len: usize,
    ) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        Ok(self
            .encode_checked(inputs, max_len)?
            .into_iter()
            .map(|e| (e.ids, e.type_ids))
            .collect())
    }

    /// [`TextTokenizer::encode_all`] that also says, per input, whether it was truncated.
    pub fn encode_checked(
        &self,
        inputs: &[(String, Option<String>)],
        max_len: usize,
    ) -> Result<Vec<Encoded>> {
        let tok = self.truncating_at(max_len)?;
        inputs
            .iter()
            .map(|(a, b)| {
                let enc = match b {
                    Some(b) => tok.encode((a.as_str(), b.as_str()), true),
                    None => tok.encode(a.as_str(), true),
                }
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
                Ok(Encoded {
                    ids: enc.get_ids().to_vec(),
                    type_ids: enc.get_type_ids().to_vec(),
                    truncated: !enc.get_overflowing().is_empty(),
                })
            })
            .collect()
    }

    /// The copy that truncates at `max_len`, made once per length.
    fn truncating_at(&self, max_len: usize) -> Result<Arc<Tokenizer>> {
        if max_len < 4 {
            return Err(Error::config("tokenizer", "max_len", "must be at least 4"));
        }
        let mut cache = self
            .truncating
            .lock()
            .map_err(|_| Error::Tokenizer("tokenizer cache lock poisoned".into()))?;
        if let Some((_, t)) = cache.iter().find(|(len, _)| *len == max_len) {
            return Ok(Arc::clone(t));
        }
        let mut tok = self.inner.clone();
        tok.with_truncation(Some(TruncationParams {
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            ..Default::default()
        }))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let tok = Arc::new(tok);
        if cache.len() >= CACHED_LENGTHS {
            cache.remove(0);
        }
        cache.push((max_len, Arc::clone(&tok)));
        Ok(tok)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of token `tok`, if the vocabulary has it.
    pub fn token_id(&self, tok: &str) -> Option<u32> {
        self.inner.token_to_id(tok)
    }

    /// Checks that the tokenizer in `dir` fits the model `config` describes: its ids index the
    /// embedding table, and padding and unknown words map to the ids the model was trained with.
    /// A `vocab.txt` missing a line shifts every id after it, which no later check would notice.
    pub fn check_fits(&self, dir: &Path, config: &crate::config::BertConfig) -> Result<()> {
        let from_vocab = !dir.join("tokenizer.json").exists();
        let file = dir.join(if from_vocab {
            "vocab.txt"
        } else {
            "tokenizer.json"
        });
        // The ids' span, not the token count: a vocab.txt may repeat a line (the later id wins).
        let n = self
            .inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        let bad = |m: String| Error::Tokenizer(format!("{}: {m}", file.display()));
        if n > config.vocab_size || (from_vocab && n != config.vocab_size) {
            return Err(bad(format!(
                "token ids 0 to {}, but config.json has vocab_size {}; the vocabulary does not \
                 belong to this model (a missing or extra line shifts every token id)",
                n.saturating_sub(1),
                config.vocab_size
            )));
        }
        if from_vocab && self.token_id("[UNK]").is_none() {
            return Err(bad("lacks `[UNK]`".into()));
        }
        if let Some(id) = self
            .token_id("[PAD]")
            .filter(|&id| id != config.pad_token_id)
        {
            return Err(bad(format!(
                "`[PAD]` has id {id}, but config.json has pad_token_id {}",
                config.pad_token_id
            )));
        }
        Ok(())
    }
}

fn lowercase_setting(dir: &Path) -> Result<bool> {
    let p = dir.join("tokenizer_config.json");
    if !p.exists() {
        return Ok(true);
    }
    let v: serde_json::Value = crate::io::read_json(&p)?;
    Ok(v.get("do_lower_case")
        .and_then(|x| x.as_bool())
        .unwrap_or(true))
}
