//! Evaluation metrics.

use serde::{Deserialize, Serialize};

/// Classification quality on one set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Fraction of correct predictions.
    pub accuracy: f64,
    /// Unweighted mean of per-class F1.
    pub macro_f1: f64,
    /// Matthews correlation coefficient (multi-class form).
    pub mcc: f64,
    /// Number of examples.
    pub n: usize,
}

/// Accuracy, macro-F1 and MCC of predictions against gold labels over `classes` classes.
pub fn classification(pred: &[usize], gold: &[usize], classes: usize) -> ClassMetrics {
    let n = pred.len().min(gold.len());
    let cm = confusion(pred, gold, classes);
    let correct: f64 = (0..classes).map(|c| cm[c][c]).sum();
    let f1s = per_class_f1(&cm);
    let total = n as f64;
    let t: Vec<f64> = (0..classes).map(|k| cm[k].iter().sum()).collect();
    let p: Vec<f64> = (0..classes)
        .map(|k| (0..classes).map(|g| cm[g][k]).sum())
        .collect();
    let cov_tp = correct * total - t.iter().zip(&p).map(|(a, b)| a * b).sum::<f64>();
    let cov_pp = total * total - p.iter().map(|x| x * x).sum::<f64>();
    let cov_tt = total * total - t.iter().map(|x| x * x).sum::<f64>();
    let mcc = if cov_pp > 0.0 && cov_tt > 0.0 {
        cov_tp / (cov_pp * cov_tt).sqrt()
    } else {
        0.0
    };
    ClassMetrics {
        accuracy: if n > 0 { correct / total } else { 0.0 },
        macro_f1: f1s.iter().sum::<f64>() / classes.max(1) as f64,
        mcc,
        n,
    }
}

/// F1 of each class over `classes` classes (0 for a class never predicted nor present).
pub fn class_f1(pred: &[usize], gold: &[usize], classes: usize) -> Vec<f64> {
    per_class_f1(&confusion(pred, gold, classes))
}

/// The confusion matrix, `cm[gold][predicted]`; labels outside `classes` are not counted.
fn confusion(pred: &[usize], gold: &[usize], classes: usize) -> Vec<Vec<f64>> {
    let mut cm = vec![vec![0f64; classes]; classes];
    for (&p, &g) in pred.iter().zip(gold) {
        if p < classes && g < classes {
            cm[g][p] += 1.0;
        }
    }
    cm
}

fn per_class_f1(cm: &[Vec<f64>]) -> Vec<f64> {
    cm.iter()
        .enumerate()
        .map(|(c, row)| {
            let tp = row[c];
            let fp: f64 = cm.iter().map(|r| r[c]).sum::<f64>() - tp;
            let fnn: f64 = row.iter().sum::<f64>() - tp;
            let denom = 2.0 * tp + fp + fnn;
            if denom > 0.0 {
                2.0 * tp / denom
            } else {
                0.0
            }
        })
        .collect()
}

/// The median of `values` (the mean of the two middle ones for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Pearson correlation of two series (0 when either is constant).
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    if n == 0.0 {
        return 0.0;
    }
    let ma = a.iter().map(|&x| x as f64).sum::<f64>() / n;
    let mb = b.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa > 0.0 && sbb > 0.0 {
        sab / (saa * sbb).sqrt()
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        let m = classification(&[1, 1, 0, 0], &[1, 0, 0, 0], 2);
        assert!((m.accuracy - 0.75).abs() < 1e-12);
        // F1(pos) = 2/3, F1(neg) = 0.8.
        assert!((m.macro_f1 - (2.0 / 3.0 + 0.8) / 2.0).abs() < 1e-12);
        assert!((m.mcc - 1.0 / 3f64.sqrt()).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]) - 0.9986).abs() < 1e-3);
    }
}
