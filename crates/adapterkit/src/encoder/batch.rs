//! Padded batches of token ids.

use crate::error::Result;
use candle_core::{Device, Tensor};

/// A padded batch of token ids ready for the encoder.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids [batch, seq].
    pub ids: Tensor,
    /// Segment ids [batch, seq].
    pub type_ids: Tensor,
    /// 1.0 on real tokens, 0.0 on padding [batch, seq].
    pub mask: Tensor,
    /// Real length of each row.
    pub lengths: Vec<usize>,
}

impl Batch {
    /// Pads `(ids, type_ids)` rows to the longest row.
    pub fn new(rows: &[(&[u32], &[u32])], pad_id: u32, device: &Device) -> Result<Self> {
        let b = rows.len();
        let s = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![pad_id; b * s];
        let mut types = vec![0u32; b * s];
        let mut mask = vec![0f32; b * s];
        let mut lengths = Vec::with_capacity(b);
        for (i, (r_ids, r_types)) in rows.iter().enumerate() {
            ids[i * s..i * s + r_ids.len()].copy_from_slice(r_ids);
            types[i * s..i * s + r_types.len()].copy_from_slice(r_types);
            mask[i * s..i * s + r_ids.len()]
                .iter_mut()
                .for_each(|m| *m = 1.0);
            lengths.push(r_ids.len());
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, s), device)?,
            type_ids: Tensor::from_vec(types, (b, s), device)?,
            mask: Tensor::from_vec(mask, (b, s), device)?,
            lengths,
        })
    }

    /// The batch of `encoded[i]` for each `i` in `rows`, in that order.
    pub fn select(
        encoded: &[(Vec<u32>, Vec<u32>)],
        rows: &[usize],
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        let pieces: Vec<(&[u32], &[u32])> = rows
            .iter()
            .map(|&i| (encoded[i].0.as_slice(), encoded[i].1.as_slice()))
            .collect();
        Self::new(&pieces, pad_id, device)
    }

    /// Rows in the batch.
    pub fn size(&self) -> usize {
        self.lengths.len()
    }
}
