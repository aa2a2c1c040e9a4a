//! Fixed, seeded, stratified splits and their fingerprints.

use crate::rng::Rng;
use serde::{Deserialize, Serialize};

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
