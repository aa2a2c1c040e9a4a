//! Analytic FLOP counts of encoder steps, so benchmarks can report achieved GFLOP/s honestly.
//!
//! Only matrix products are counted (2 FLOPs per multiply-add); element-wise work is excluded, as
//! is the head (a few d×d products per example, negligible against the encoder).

use crate::config::BertConfig;
use serde::{Deserialize, Serialize};

/// What a benchmarked step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    /// Forward of the base encoder only.
    InferBase,
    /// Forward with adapters.
    InferAdapter,
    /// Adapter training: forward, input gradients through the frozen encoder, adapter weight gradients.
    AdapterTrain,
    /// Full fine-tuning: forward, input and weight gradients of every linear layer.
    FullTrain,
}

/// Useful FLOPs of one step on `batch` rows of `seq` tokens; `adapter_sites` adapters of bottleneck
/// `m` per layer (0 sites for none).
pub fn step_flops(
    cfg: &BertConfig,
    kind: StepKind,
    batch: usize,
    seq: usize,
    m: usize,
    adapter_sites: usize,
) -> f64 {
    let d = cfg.hidden_size as f64;
    let i = cfg.intermediate_size as f64;
    let s = seq as f64;
    let tokens = (batch * seq) as f64;
    let layers = cfg.num_hidden_layers as f64;
    // Per token and layer.
    let lin = 2.0 * (4.0 * d * d + 2.0 * d * i);
    let att = 2.0 * 2.0 * s * d;
    let ad = 2.0 * 2.0 * d * m as f64 * adapter_sites as f64;
    let per = match kind {
        StepKind::InferBase => lin + att,
        StepKind::InferAdapter => lin + att + ad,
        // forward + input grads (linears: same as forward; attention: twice) + adapter weight grads
        StepKind::AdapterTrain => (lin + att + ad) + (lin + 2.0 * att + ad) + ad,
        // forward + input grads + weight grads of every linear
        StepKind::FullTrain => (lin + att) + (lin + 2.0 * att) + lin,
    };
    per * tokens * layers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minilm_adapter_step_matches_the_known_count() {
        let cfg: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
            "intermediate_size": 1536, "max_position_embeddings": 512
        }))
        .unwrap();
        // The performance issue quotes ~92 GFLOP for PyTorch's adapter step at batch 16 × seq 128.
        let f = step_flops(&cfg, StepKind::AdapterTrain, 16, 128, 64, 2) / 1e9;
        assert!((90.0..105.0).contains(&f), "{f}");
        let inf = step_flops(&cfg, StepKind::InferBase, 16, 128, 0, 0) / 1e9;
        assert!((inf - 45.9).abs() < 0.5, "{inf}");
    }
}
