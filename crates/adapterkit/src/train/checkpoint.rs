//! Resumable training: the trainer's whole state at a step boundary (trained tensors, Adam
//! moments, schedule position, generator states, data-order position, the best epoch so far),
//! saved as one directory that replaces the previous checkpoint in one swap, and read back so that
//! a resumed run continues bit for bit where the saved one stood.

use super::{EpochReport, EvalMetrics};
use crate::error::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The checkpoint's counters and positions.
pub const STATE: &str = "state.json";
/// The checkpoint's tensors: `param.*`, `adam_m.*`, `adam_v.*` and `best.*`.
pub const TENSORS: &str = "state.safetensors";
const FORMAT: u32 = 1;

/// Where and how often training saves a resumable checkpoint, and whether it starts from one.
#[derive(Debug, Clone)]
pub struct Checkpointing {
    /// The checkpoint directory (replaced as a whole on every save).
    pub dir: PathBuf,
    /// Save after every this many steps; 0 saves only after each epoch's evaluation.
    pub every: usize,
    /// Continue from the checkpoint in `dir`; an error when there is none.
    pub resume: bool,
    /// What the run is (options, base, data): a checkpoint of another run is refused by field.
    pub run: Value,
}

/// The trainer's position and counters; with the tensors, everything a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Progress {
    pub format: u32,
    pub run: Value,
    /// Steps taken.
    pub step: usize,
    /// The epoch in progress (1-based).
    pub epoch: usize,
    /// Batches of that epoch already taken.
    pub batches_done: usize,
    /// The order generator as it was before this epoch's batches were drawn.
    pub order_rng: [u64; 4],
    /// The dropout generator now.
    pub dropout_rng: [u64; 4],
    /// The epoch's summed loss and examples so far.
    pub loss_sum: f64,
    pub seen: usize,
    /// Training seconds of the epoch so far, and of the run so far.
    pub epoch_seconds: f64,
    pub seconds: f64,
    /// Adam's step counter.
    pub adam_t: i32,
    pub epochs: Vec<EpochReport>,
    /// The best epoch so far and its dev metrics (its parameters are the `best.*` tensors).
    pub best: Option<(usize, EvalMetrics)>,
}

/// A checkpoint in memory: progress plus tensors by parameter name.
pub(crate) struct Snapshot {
    pub progress: Progress,
    pub params: BTreeMap<String, Tensor>,
    pub adam_m: BTreeMap<String, Tensor>,
    pub adam_v: BTreeMap<String, Tensor>,
    pub best: BTreeMap<String, Tensor>,
}

const GROUPS: [&str; 4] = ["param", "adam_m", "adam_v", "best"];

impl Snapshot {
    /// Replaces the checkpoint directory `dir` with this one, atomically as a whole.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut all = BTreeMap::new();
        for (group, map) in GROUPS.iter().zip(self.groups()) {
            for (k, v) in map {
                all.insert(format!("{group}.{k}"), v.clone());
            }
        }
        crate::io::replace_dir(dir, &|f| f == STATE || f == TENSORS, |staging| {
            crate::io::save_safetensors(&staging.join(TENSORS), &all)?;
            // Written last: a directory without it is not a checkpoint.
            crate::io::write_json(&staging.join(STATE), &self.progress)
        })
    }

    fn groups(&self) -> [&BTreeMap<String, Tensor>; 4] {
        [&self.params, &self.adam_m, &self.adam_v, &self.best]
    }

    /// Reads the checkpoint in `dir` and checks that it was written by the run `run` describes.
    pub fn load(dir: &Path, run: &Value) -> Result<Self> {
        let bad = |message: String| Error::Checkpoint {
            path: dir.to_path_buf(),
            message,
        };
        let state = dir.join(STATE);
        if !state.is_file() {
            return Err(bad(format!(
                "no {STATE} there: not a checkpoint written by `train --checkpoint-every`, or one \
                 whose first save did not finish (start the run without --resume)"
            )));
        }
        let progress: Progress = crate::io::read_json(&state)?;
        if progress.format != FORMAT {
            return Err(bad(format!(
                "format {} (this build reads format {FORMAT})",
                progress.format
            )));
        }
        if let Some(diff) = first_difference(&progress.run, run, String::new()) {
            return Err(bad(format!(
                "written by a different run: {diff}; resume with the options of the interrupted \
                 run, or start afresh without --resume"
            )));
        }
        let tensors = crate::io::load_tensors(&dir.join(TENSORS))?;
        let mut groups: [BTreeMap<String, Tensor>; 4] = Default::default();
        for (name, t) in tensors {
            let (group, key) = name
                .split_once('.')
                .and_then(|(g, k)| GROUPS.iter().position(|&x| x == g).map(|i| (i, k)))
                .ok_or_else(|| bad(format!("{TENSORS} holds an unexpected tensor `{name}`")))?;
            groups[group].insert(key.to_string(), t);
        }
        let [params, adam_m, adam_v, best] = groups;
        Ok(Snapshot {
            progress,
            params,
            adam_m,
            adam_v,
            best,
        })
    }
}

/// Whether `file` belongs in a checkpoint directory (anything else there is not ours to replace).
pub fn is_checkpoint_file(file: &str) -> bool {
    file == STATE || file == TENSORS
}

/// Takes tensor `name` of checkpoint group `group`, checking its shape; the error names both.
pub(crate) fn take(
    map: &mut BTreeMap<String, Tensor>,
    dir: &Path,
    group: &str,
    name: &str,
    shape: &[usize],
) -> Result<Tensor> {
    let t = map.remove(name).ok_or_else(|| Error::Checkpoint {
        path: dir.to_path_buf(),
        message: format!("{TENSORS} lacks `{group}.{name}`, which this run trains"),
    })?;
    if t.dims() != shape {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            message: format!(
                "`{group}.{name}` has shape {:?}, the run's parameter {shape:?}",
                t.dims()
            ),
        });
    }
    Ok(t)
}

/// Checks that every tensor of a checkpoint group was used: one left over belongs to another run.
pub(crate) fn all_taken(map: &BTreeMap<String, Tensor>, dir: &Path, group: &str) -> Result<()> {
    match map.keys().next() {
        Some(k) => Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("`{group}.{k}` is not a parameter of this run"),
        }),
        None => Ok(()),
    }
}

/// The first place where two JSON values differ, as `path: A there, B here`.
fn first_difference(saved: &Value, now: &Value, at: String) -> Option<String> {
    let show = |v: Option<&Value>| v.map_or("absent".to_string(), |v| v.to_string());
    match (saved, now) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => first_difference(x, y, path),
                    (x, y) => Some(format!("`{path}` is {} there, {} here", show(x), show(y))),
                }
            })
        }
        _ if saved == now => None,
        _ => Some(format!(
            "`{}` is {saved} there, {now} here",
            if at.is_empty() { "run" } else { &at }
        )),
    }
}

/// A 64-bit FNV-1a hash of byte strings, to fingerprint a data set cheaply and stably.
pub(crate) fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_the_field() {
        let a = serde_json::json!({"train": {"lr": 0.001, "seed": 1}, "name": "x"});
        let b = serde_json::json!({"train": {"lr": 0.002, "seed": 1}, "name": "x"});
        assert_eq!(first_difference(&a, &a, String::new()), None);
        let d = first_difference(&a, &b, String::new()).unwrap();
        assert_eq!(d, "`train.lr` is 0.001 there, 0.002 here");
        let c = serde_json::json!({"name": "x"});
        let d = first_difference(&a, &c, String::new()).unwrap();
        assert!(d.starts_with("`train` is {"), "{d}");
        assert!(d.ends_with("absent here"), "{d}");
    }

    #[test]
    fn fingerprints_separate_parts() {
        let ab = fingerprint([b"ab".as_slice(), b"c"]);
        assert_ne!(ab, fingerprint([b"a".as_slice(), b"bc"]));
        assert_eq!(ab, fingerprint([b"ab".as_slice(), b"c"]));
    }
}
