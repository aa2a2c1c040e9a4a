//! Training losses, composed from candle primitives (autograd differentiates them exactly; they are
//! a small part of a step's time).

use crate::error::{Error, Result};
use candle_core::{Tensor, D};

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Mean cross-entropy of `logits` [batch, classes] against one class index per row. A label
/// outside `0..classes`, or a label count that is not the batch size, is an error, never an index
/// into another row.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<Tensor> {
    let (b, c) = logits.dims2()?;
    if labels.len() != b {
        return Err(Error::config(
            "cross entropy",
            "labels",
            format!("{} labels for a batch of {b} rows", labels.len()),
        ));
    }
    let mut onehot = vec![0f32; b * c];
    for (i, &l) in labels.iter().enumerate() {
        if l as usize >= c {
            return Err(Error::Label {
                set: "batch".into(),
                example: i,
                label: l as usize,
                classes: c,
            });
        }
        onehot[i * c + l as usize] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (b, c), logits.device())?.to_dtype(logits.dtype())?;
    let lp = log_softmax_last_dim(logits)?;
    Ok((lp.mul(&onehot)?.sum_all()? * (-1.0 / b as f64))?)
}

/// Mean squared error of `pred` [batch, 1] against targets.
pub fn mse(pred: &Tensor, targets: &[f32]) -> Result<Tensor> {
    let t = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), pred.device())?
        .to_dtype(pred.dtype())?;
    Ok(pred.sub(&t)?.sqr()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::softmax_last_dim;
    use candle_core::Device;

    #[test]
    fn softmax_rows_sum_to_one_and_ce_matches_closed_form() {
        let x = Tensor::new(&[[1f32, 2., 3.], [0., 0., 0.]], &Device::Cpu).unwrap();
        let s = softmax_last_dim(&x)
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-6));
        let ce = cross_entropy(&x, &[2, 0])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let l0 = -(3f32.exp() / (1f32.exp() + 2f32.exp() + 3f32.exp())).ln();
        let l1 = 3f32.ln();
        assert!((ce - (l0 + l1) / 2.0).abs() < 1e-5);
    }

    #[test]
    fn a_label_outside_the_classes_is_an_error_naming_the_row() {
        let x = Tensor::new(&[[1f32, 2., 3.], [0., 0., 0.]], &Device::Cpu).unwrap();
        let err = cross_entropy(&x, &[2, 3]).unwrap_err().to_string();
        assert!(
            err.contains("example 1") && err.contains("label 3"),
            "{err}"
        );
        assert!(cross_entropy(&x, &[0]).is_err());
    }
}
