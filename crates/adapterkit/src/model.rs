//! The frozen BERT encoder, with adapter sites, and its forward pass.

use crate::adapter::{Part, Residual, Scaling, Site};

/// Epsilon of the LayerNorms inside an adapter (`ln_before` / `ln_after`): PyTorch's default.
const ADAPTER_LN_EPS: f64 = 1e-5;
use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::head::{HeadKind, Pooling};
use crate::ops::{attention_softmax, dropout, gelu, layer_norm, linear, softmax_last_dim};
use crate::rng::Rng;
use crate::task::TaskModel;
use crate::tokenizer::TextTokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A frozen pre-trained encoder: configuration, weights by checkpoint name, tokenizer. Shared read-only
/// by every task; nothing in this crate ever writes to it.
pub struct BaseModel {
    /// Architecture read from `config.json`.
    pub config: BertConfig,
    weights: HashMap<String, Tensor>,
    /// Tokenizer of the checkpoint.
    pub tokenizer: TextTokenizer,
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Compute device.
    pub device: Device,
    /// Per layer, the query, key and value weights [3d, d] and biases [3d] in one tensor each; the
    /// separate q/k/v weights are views into them, so the fused attention needs no copy per call.
    qkv: Vec<(Tensor, Tensor)>,
}

/// Concatenates each layer's q, k, v weights and biases and replaces the separate entries by views.
fn fuse_qkv(weights: &mut HashMap<String, Tensor>, layers: usize) -> Result<Vec<(Tensor, Tensor)>> {
    let mut out = Vec::with_capacity(layers);
    for l in 0..layers {
        let name = |p: &str, leaf: &str| format!("encoder.layer.{l}.attention.self.{p}.{leaf}");
        let mut fused = Vec::new();
        for leaf in ["weight", "bias"] {
            let parts: Vec<Tensor> = ["query", "key", "value"]
                .iter()
                .map(|p| {
                    weights
                        .get(&name(p, leaf))
                        .cloned()
                        .ok_or_else(|| Error::NotFound(format!("no `{}`", name(p, leaf))))
                })
                .collect::<Result<_>>()?;
            let rows = parts[0].dim(0)?;
            let cat = Tensor::cat(&parts, 0)?;
            for (i, p) in ["query", "key", "value"].iter().enumerate() {
                weights.insert(name(p, leaf), cat.narrow(0, i * rows, rows)?);
            }
            fused.push(cat);
        }
        let b = fused
            .pop()
            .ok_or_else(|| Error::NotFound("qkv bias".into()))?;
        let w = fused
            .pop()
            .ok_or_else(|| Error::NotFound("qkv weight".into()))?;
        out.push((w, b));
    }
    Ok(out)
}

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

    /// Rows in the batch.
    pub fn size(&self) -> usize {
        self.lengths.len()
    }
}

/// Per-call choices of a forward pass.
#[derive(Default)]
pub struct ForwardOptions<'a> {
    /// Training mode: dropout on, drawn from this generator. `None` is inference.
    pub dropout_rng: Option<&'a mut Rng>,
    /// Layers whose adapters are skipped (AdapterDrop-style ablation / faster inference).
    pub skip_adapter_layers: &'a [usize],
    /// `(k, h)`: the hidden states after the first k layers, computed earlier (the frozen-prefix
    /// cache); the encoder starts at layer k instead of the embeddings.
    pub prefix: Option<(usize, Tensor)>,
    /// Stop after this many layers and return their output (to build the frozen-prefix cache).
    pub stop_after: Option<usize>,
}

/// Every tensor name and shape a BERT checkpoint must provide for `cfg` (without `bert.` prefix).
pub fn expected_shapes(cfg: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.hidden_size;
    let i = cfg.intermediate_size;
    let mut v = vec![
        (
            "embeddings.word_embeddings.weight".to_string(),
            vec![cfg.vocab_size, d],
        ),
        (
            "embeddings.position_embeddings.weight".to_string(),
            vec![cfg.max_position_embeddings, d],
        ),
        (
            "embeddings.token_type_embeddings.weight".to_string(),
            vec![cfg.type_vocab_size, d],
        ),
        ("embeddings.LayerNorm.weight".to_string(), vec![d]),
        ("embeddings.LayerNorm.bias".to_string(), vec![d]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for n in ["query", "key", "value"] {
            v.push((format!("{p}.attention.self.{n}.weight"), vec![d, d]));
            v.push((format!("{p}.attention.self.{n}.bias"), vec![d]));
        }
        v.push((format!("{p}.attention.output.dense.weight"), vec![d, d]));
        v.push((format!("{p}.attention.output.dense.bias"), vec![d]));
        v.push((format!("{p}.attention.output.LayerNorm.weight"), vec![d]));
        v.push((format!("{p}.attention.output.LayerNorm.bias"), vec![d]));
        v.push((format!("{p}.intermediate.dense.weight"), vec![i, d]));
        v.push((format!("{p}.intermediate.dense.bias"), vec![i]));
        v.push((format!("{p}.output.dense.weight"), vec![d, i]));
        v.push((format!("{p}.output.dense.bias"), vec![d]));
        v.push((format!("{p}.output.LayerNorm.weight"), vec![d]));
        v.push((format!("{p}.output.LayerNorm.bias"), vec![d]));
    }
    v
}

/// Normalises a checkpoint tensor name: drops the `bert.` prefix, maps TF-era `gamma`/`beta`.
pub fn canonical_name(name: &str) -> String {
    let n = name.strip_prefix("bert.").unwrap_or(name);
    if let Some(stem) = n.strip_suffix("LayerNorm.gamma") {
        format!("{stem}LayerNorm.weight")
    } else if let Some(stem) = n.strip_suffix("LayerNorm.beta") {
        format!("{stem}LayerNorm.bias")
    } else {
        n.to_string()
    }
}

/// Whether a base parameter is a LayerNorm scale or shift.
pub fn is_layer_norm(name: &str) -> bool {
    name.contains("LayerNorm.")
}

impl BaseModel {
    /// Loads a Hugging Face BERT checkpoint directory: `config.json`, `model.safetensors` (or
    /// `pytorch_model.bin`) and `tokenizer.json` (or `vocab.txt`).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, &Device::Cpu)
    }

    /// [`BaseModel::load`] onto a given device (a CUDA device with the `cuda` feature).
    pub fn load_on(dir: &Path, device: &Device) -> Result<Self> {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let weights_path = ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .ok_or_else(|| {
                Error::io(
                    dir.join("model.safetensors"),
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no model.safetensors or pytorch_model.bin in the checkpoint directory",
                    ),
                )
            })?;
        let raw = crate::io::load_tensors(&weights_path)?;
        let tokenizer = TextTokenizer::from_dir(dir)?;
        let mut model = Self::from_tensors(config, raw, tokenizer, dir, &weights_path)?;
        if !device.same_device(&Device::Cpu) {
            for t in model.weights.values_mut() {
                *t = t.to_device(device)?;
            }
            model.qkv = fuse_qkv(&mut model.weights, model.config.num_hidden_layers)?;
            model.device = device.clone();
        }
        tracing::info!(
            dir = %dir.display(),
            params = model.num_params(),
            layers = model.config.num_hidden_layers,
            hidden = model.config.hidden_size,
            "loaded base model"
        );
        Ok(model)
    }

    /// Builds a base model from tensors already in memory, validating names and shapes.
    pub fn from_tensors(
        config: BertConfig,
        raw: HashMap<String, Tensor>,
        tokenizer: TextTokenizer,
        dir: &Path,
        source: &Path,
    ) -> Result<Self> {
        let mut all: HashMap<String, Tensor> = HashMap::new();
        for (k, v) in raw {
            all.insert(canonical_name(&k), v);
        }
        let mut weights = HashMap::new();
        let mut wanted = expected_shapes(&config);
        let d = config.hidden_size;
        if all.contains_key("pooler.dense.weight") {
            wanted.push(("pooler.dense.weight".into(), vec![d, d]));
            wanted.push(("pooler.dense.bias".into(), vec![d]));
        }
        for (name, shape) in wanted {
            let t = all.remove(&name).ok_or_else(|| Error::MissingTensor {
                path: source.to_path_buf(),
                name: name.clone(),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::TensorShape {
                    path: source.to_path_buf(),
                    name,
                    expected: shape,
                    found: t.dims().to_vec(),
                });
            }
            weights.insert(name, t.to_dtype(DType::F32)?);
        }
        let qkv = fuse_qkv(&mut weights, config.num_hidden_layers)?;
        Ok(BaseModel {
            config,
            weights,
            tokenizer,
            dir: dir.to_path_buf(),
            device: Device::Cpu,
            qkv,
        })
    }

    /// A base with random weights (normal, std `initializer_range`) of the shape `config` describes:
    /// for benchmarks and tests of architectures whose real checkpoints are not available.
    pub fn random(config: BertConfig, tokenizer: TextTokenizer, seed: u64) -> Result<Self> {
        config.validate("random model")?;
        let mut rng = Rng::derive(seed, "random-base");
        let std = config.initializer_range;
        let mut tensors = HashMap::new();
        let d = config.hidden_size;
        let mut shapes = expected_shapes(&config);
        shapes.push(("pooler.dense.weight".into(), vec![d, d]));
        shapes.push(("pooler.dense.bias".into(), vec![d]));
        for (name, shape) in shapes {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with("LayerNorm.weight") {
                vec![1.0; n]
            } else if shape.len() == 1 {
                vec![0.0; n]
            } else {
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            };
            tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
        }
        let dir = PathBuf::from("<random>");
        Self::from_tensors(config, tensors, tokenizer, &dir, &dir)
    }

    /// A base weight by canonical name.
    pub fn weight(&self, name: &str) -> Option<&Tensor> {
        self.weights.get(name)
    }

    /// All base weight names, sorted.
    pub fn weight_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.weights.keys().cloned().collect();
        v.sort();
        v
    }

    /// Number of base parameters.
    pub fn num_params(&self) -> usize {
        self.weights.values().map(|t| t.elem_count()).sum()
    }

    /// The same model with weights in `dtype` (f64 for gradient checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut weights = self
            .weights
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let qkv = fuse_qkv(&mut weights, self.config.num_hidden_layers)?;
        Ok(BaseModel {
            config: self.config.clone(),
            weights,
            tokenizer: self.tokenizer.clone(),
            dir: self.dir.clone(),
            device: self.device.clone(),
            qkv,
        })
    }

    fn param<'a>(&'a self, task: Option<&'a TaskModel>, name: &str) -> Result<&'a Tensor> {
        if let Some(t) = task.and_then(|t| t.params.get(name)) {
            return Ok(t);
        }
        self.weights
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("the model has no parameter `{name}`")))
    }

    fn ln(&self, task: Option<&TaskModel>, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let g = self.param(task, &format!("{prefix}.LayerNorm.weight"))?;
        let b = self.param(task, &format!("{prefix}.LayerNorm.bias"))?;
        layer_norm(x, g, b, self.config.layer_norm_eps)
    }

    fn dense(&self, task: Option<&TaskModel>, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let w = self.param(task, &format!("{prefix}.weight"))?;
        let b = self.param(task, &format!("{prefix}.bias"))?;
        linear(x, w, Some(b))
    }

    /// The weight and bias of linear `prefix` when the fused frozen-weight kernels apply to it.
    fn frozen_fast<'a>(
        &'a self,
        task: Option<&'a TaskModel>,
        prefix: &str,
        x: &Tensor,
    ) -> Result<Option<(&'a Tensor, &'a Tensor)>> {
        let w = self.param(task, &format!("{prefix}.weight"))?;
        let b = self.param(task, &format!("{prefix}.bias"))?;
        let ok = crate::ops::fast_ops()
            && crate::fused::supported(x)
            && !w.track_op()
            && !b.track_op()
            && w.dtype() == DType::F32;
        Ok(ok.then_some((w, b)))
    }

    /// All four frozen weight pairs of layer `layer`'s attention when the fused block applies.
    fn frozen_attention<'a>(
        &'a self,
        task: Option<&'a TaskModel>,
        layer: usize,
        h: &Tensor,
    ) -> Result<Option<crate::fused::AttentionWeights<'a>>> {
        let pre = format!("encoder.layer.{layer}");
        let get = |n: &str| self.frozen_fast(task, &format!("{pre}.{n}"), h);
        Ok(
            match (
                get("attention.self.query")?,
                get("attention.self.key")?,
                get("attention.self.value")?,
                get("attention.output.dense")?,
            ) {
                (Some(q), Some(k), Some(v), Some(o)) => {
                    let owned = task.is_some_and(|t| {
                        ["query", "key", "value"].iter().any(|p| {
                            t.params
                                .contains_key(&format!("{pre}.attention.self.{p}.weight"))
                                || t.params
                                    .contains_key(&format!("{pre}.attention.self.{p}.bias"))
                        })
                    });
                    let qkv = if owned {
                        None
                    } else {
                        self.qkv.get(layer).map(|(w, b)| (w, b))
                    };
                    Some(crate::fused::AttentionWeights { q, k, v, o, qkv })
                }
                _ => None,
            },
        )
    }

    /// One sub-layer's exit: its output `sub` passes the task's adapter at this site (if any) and the
    /// original residual (`input`) + LayerNorm (`ln_prefix`), in the order the adapter's
    /// configuration gives (AdapterHub's `pre_forward` / `forward` / `post_forward`).
    #[allow(clippy::too_many_arguments)]
    fn site_exit(
        &self,
        task: Option<&TaskModel>,
        layer: usize,
        site: Site,
        sub: &Tensor,
        input: &Tensor,
        ln_prefix: &str,
        opts: &mut ForwardOptions<'_>,
    ) -> Result<Tensor> {
        let active = task.and_then(|t| t.adapter.as_ref().map(|c| (t, c)));
        let active = active.filter(|(_, c)| {
            c.has_layer(layer)
                && c.sites().contains(&site)
                && !opts.skip_adapter_layers.contains(&layer)
        });
        let Some((task, cfg)) = active else {
            return self.ln(task, ln_prefix, &sub.add(input)?);
        };
        let p = |part: Part| self.param(Some(task), &cfg.param_name(layer, site, &task.name, part));
        let (wd, bd, wu, bu) = (
            p(Part::DownWeight)?,
            p(Part::DownBias)?,
            p(Part::UpWeight)?,
            p(Part::UpBias)?,
        );
        if cfg.is_plain() {
            let adapted = if crate::ops::fast_ops()
                && [sub, wd, bd, wu, bu]
                    .iter()
                    .all(|t| crate::fused::supported(t))
            {
                crate::fused::adapter(sub, (wd, bd), (wu, bu), cfg.nonlinearity)?
            } else {
                let down = cfg.nonlinearity.apply(&linear(sub, wd, Some(bd))?)?;
                sub.add(&linear(&down, wu, Some(bu))?)?
            };
            return self.ln(Some(task), ln_prefix, &adapted.add(input)?);
        }
        // The general arrangement, composed from ops (AdapterHub's `Adapter` module step by step).
        let mut h = sub.clone();
        let mut residual = (cfg.residual == Residual::Sublayer).then(|| h.clone());
        if cfg.original_ln_before {
            h = h.add(input)?;
            if cfg.residual == Residual::PostAdd {
                residual = Some(h.clone());
            }
            h = self.ln(Some(task), ln_prefix, &h)?;
        }
        let residual = match residual {
            Some(r) => r,
            None => h.clone(),
        };
        let x = if cfg.ln_before {
            layer_norm(
                &h,
                p(Part::LnBeforeWeight)?,
                p(Part::LnBeforeBias)?,
                ADAPTER_LN_EPS,
            )?
        } else {
            h
        };
        let down = cfg.nonlinearity.apply(&linear(&x, wd, Some(bd))?)?;
        let mut up = linear(&down, wu, Some(bu))?;
        up = match cfg.scaling {
            Scaling::Fixed(1.0) => up,
            Scaling::Fixed(f) => (up * f)?,
            Scaling::Learned | Scaling::Channel => up.broadcast_mul(p(Part::Scaling)?)?,
        };
        let mut out = maybe_dropout(&up, cfg.dropout, opts)?;
        if cfg.adapter_residual_before_ln {
            out = out.add(&residual)?;
        }
        if cfg.ln_after {
            out = layer_norm(
                &out,
                p(Part::LnAfterWeight)?,
                p(Part::LnAfterBias)?,
                ADAPTER_LN_EPS,
            )?;
        }
        if !cfg.adapter_residual_before_ln {
            out = out.add(&residual)?;
        }
        if cfg.original_ln_after {
            out = self.ln(Some(task), ln_prefix, &out.add(input)?)?;
        }
        Ok(out)
    }

    /// The embedding layer's output [batch, seq, hidden] (word + position + segment, LayerNorm,
    /// dropout in training).
    fn embed(
        &self,
        task: Option<&TaskModel>,
        batch: &Batch,
        opts: &mut ForwardOptions<'_>,
    ) -> Result<Tensor> {
        let (b, s) = batch.ids.dims2()?;
        let d = self.config.hidden_size;
        let words = self
            .param(task, "embeddings.word_embeddings.weight")?
            .index_select(&batch.ids.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        let types = self
            .param(task, "embeddings.token_type_embeddings.weight")?
            .index_select(&batch.type_ids.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        let pos = self
            .param(task, "embeddings.position_embeddings.weight")?
            .narrow(0, 0, s)?;
        let emb = words.add(&types)?.broadcast_add(&pos)?;
        let h = self.ln(task, "embeddings", &emb)?;
        maybe_dropout(&h, self.config.hidden_dropout_prob, opts)
    }

    /// The hidden states after the first `k` layers, per row without padding ([len, hidden] each),
    /// in inference mode (no dropout): what the frozen-prefix cache stores.
    pub fn encode_prefix(&self, task: &TaskModel, batch: &Batch, k: usize) -> Result<Vec<Tensor>> {
        let mut opts = ForwardOptions {
            stop_after: Some(k),
            ..ForwardOptions::default()
        };
        let h = self.encode(Some(task), batch, &mut opts)?;
        batch
            .lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| Ok(h.get(i)?.narrow(0, 0, len)?.detach().contiguous()?))
            .collect()
    }

    /// Runs the encoder and returns the last hidden state [batch, seq, hidden]. With a task, its
    /// adapters run at their sites and its own copies of any base parameter replace the base's.
    pub fn encode(
        &self,
        task: Option<&TaskModel>,
        batch: &Batch,
        opts: &mut ForwardOptions<'_>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, s) = batch.ids.dims2()?;
        if s > cfg.max_position_embeddings {
            return Err(Error::config(
                "input",
                "length",
                format!(
                    "{s} tokens exceed the model's {} positions",
                    cfg.max_position_embeddings
                ),
            ));
        }
        let d = cfg.hidden_size;
        let p_hidden = cfg.hidden_dropout_prob;
        let p_attn = cfg.attention_probs_dropout_prob;

        let (first, mut h) = match opts.prefix.take() {
            Some((k, h)) => (k, h),
            None => (0, self.embed(task, batch, opts)?),
        };
        // Additive mask: large negative (not -inf, whose gradient arithmetic would give NaN).
        let dtype = h.dtype();
        let mask = ((batch.mask.to_dtype(dtype)? - 1.0)? * 1e9)?;
        let heads = cfg.num_attention_heads;
        let dh = cfg.head_dim();
        let scale = 1.0 / (dh as f64).sqrt();
        let last = opts
            .stop_after
            .unwrap_or(cfg.num_hidden_layers)
            .min(cfg.num_hidden_layers);
        for l in first..last {
            let pre = format!("encoder.layer.{l}");
            let attn = match self.frozen_attention(task, l, &h)? {
                Some(w) => {
                    let seed = opts
                        .dropout_rng
                        .as_deref_mut()
                        .map(|r| (p_attn, r.next_u64()));
                    crate::fused::frozen_attention(&h, &w, &mask, heads, scale, seed)?
                }
                None => {
                    let project = |name: &str| -> Result<Tensor> {
                        let t = self.dense(task, &format!("{pre}.attention.self.{name}"), &h)?;
                        Ok(t.reshape((b, s, heads, dh))?
                            .transpose(1, 2)?
                            .contiguous()?)
                    };
                    let (q, k, v) = (project("query")?, project("key")?, project("value")?);
                    let fast = crate::ops::fast_ops() && crate::fused::supported(&q);
                    let scores = if fast {
                        crate::fused::batched_matmul(&q, &k, false, true)?
                    } else {
                        q.matmul(&k.t()?)?
                    };
                    let probs = attention_softmax(&scores, &mask, scale)?;
                    let probs = maybe_dropout(&probs, p_attn, opts)?;
                    let ctx = if fast {
                        crate::fused::batched_matmul(&probs, &v, false, false)?
                    } else {
                        probs.matmul(&v)?
                    };
                    let ctx = ctx.transpose(1, 2)?.contiguous()?.reshape((b, s, d))?;
                    self.dense(task, &format!("{pre}.attention.output.dense"), &ctx)?
                }
            };
            let attn = maybe_dropout(&attn, p_hidden, opts)?;
            h = self.site_exit(
                task,
                l,
                Site::Attention,
                &attn,
                &h,
                &format!("{pre}.attention.output"),
                opts,
            )?;

            let (ffn_in, ffn_out) = (
                format!("{pre}.intermediate.dense"),
                format!("{pre}.output.dense"),
            );
            let out = match (
                self.frozen_fast(task, &ffn_in, &h)?,
                self.frozen_fast(task, &ffn_out, &h)?,
            ) {
                (Some(w1), Some(w2)) => crate::fused::frozen_ffn(&h, w1, w2)?,
                _ => {
                    let inter = gelu(&self.dense(task, &ffn_in, &h)?)?;
                    self.dense(task, &ffn_out, &inter)?
                }
            };
            let out = maybe_dropout(&out, p_hidden, opts)?;
            h = self.site_exit(task, l, Site::Ffn, &out, &h, &format!("{pre}.output"), opts)?;
        }
        Ok(h)
    }

    /// The checkpoint's pooler: tanh(W · h[CLS] + b), [batch, hidden].
    pub fn pooler(&self, task: Option<&TaskModel>, hidden: &Tensor) -> Result<Tensor> {
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.dense(task, "pooler.dense", &cls)?.tanh()?)
    }

    /// One vector per example, as the task's head expects.
    pub fn pool(&self, task: &TaskModel, hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
        match task.head.pooling {
            Pooling::Cls => Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?),
            Pooling::Pooler => self.pooler(Some(task), hidden),
            Pooling::Mean => {
                let m = batch.mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                Ok(sum.broadcast_div(&m.sum(1)?)?)
            }
        }
    }

    /// Head outputs [batch, classes] (logits) or [batch, 1] (regression) for a task.
    pub fn logits(
        &self,
        task: &TaskModel,
        batch: &Batch,
        opts: &mut ForwardOptions<'_>,
    ) -> Result<Tensor> {
        let hidden = self.encode(Some(task), batch, opts)?;
        let pooled = self.pool(task, &hidden, batch)?;
        let p = self.config.hidden_dropout_prob;
        let name = &task.name;
        let mut x = pooled;
        for layer in task.head.dense_layers(name, self.config.hidden_size) {
            x = maybe_dropout(&x, p, opts)?;
            let w = self.param(Some(task), &format!("{}.weight", layer.prefix))?;
            let b = if layer.bias {
                Some(self.param(Some(task), &format!("{}.bias", layer.prefix))?)
            } else {
                None
            };
            x = linear(&x, w, b)?;
            if let (true, Some(act)) = (layer.activation, task.head.activation) {
                x = act.apply(&x)?;
            }
        }
        Ok(x)
    }

    /// Tokenizes `(text, pair)` inputs and runs inference in length-sorted batches; returns one row of
    /// outputs per input, in input order (probabilities for classification, the value for regression).
    pub fn predict(
        &self,
        task: &TaskModel,
        inputs: &[(String, Option<String>)],
        max_len: usize,
        batch_size: usize,
        skip_adapter_layers: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let encoded = self.tokenizer.encode_all(inputs, max_len)?;
        self.predict_encoded(task, &encoded, batch_size, skip_adapter_layers)
    }

    /// [`BaseModel::predict`] on already tokenized inputs.
    pub fn predict_encoded(
        &self,
        task: &TaskModel,
        encoded: &[(Vec<u32>, Vec<u32>)],
        batch_size: usize,
        skip_adapter_layers: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        self.run_encoded(task, encoded, batch_size, skip_adapter_layers, true)
    }

    /// The head's raw outputs (logits before softmax) on already tokenized inputs, in input order.
    pub fn logits_encoded(
        &self,
        task: &TaskModel,
        encoded: &[(Vec<u32>, Vec<u32>)],
        batch_size: usize,
        skip_adapter_layers: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        self.run_encoded(task, encoded, batch_size, skip_adapter_layers, false)
    }

    fn run_encoded(
        &self,
        task: &TaskModel,
        encoded: &[(Vec<u32>, Vec<u32>)],
        batch_size: usize,
        skip_adapter_layers: &[usize],
        probabilities: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let frozen = task.detached();
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| encoded[i].0.len());
        let mut out = vec![Vec::new(); encoded.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let rows: Vec<(&[u32], &[u32])> = chunk
                .iter()
                .map(|&i| (encoded[i].0.as_slice(), encoded[i].1.as_slice()))
                .collect();
            let batch = Batch::new(&rows, self.config.pad_token_id, &self.device)?;
            let mut opts = ForwardOptions {
                dropout_rng: None,
                skip_adapter_layers,
                ..ForwardOptions::default()
            };
            let logits = self.logits(&frozen, &batch, &mut opts)?;
            let rows_out = match task.head.kind {
                HeadKind::Classification if probabilities => softmax_last_dim(&logits)?,
                _ => logits,
            }
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
            for (&i, r) in chunk.iter().zip(rows_out) {
                out[i] = r;
            }
        }
        Ok(out)
    }
}

fn maybe_dropout(x: &Tensor, p: f64, opts: &mut ForwardOptions<'_>) -> Result<Tensor> {
    match opts.dropout_rng.as_deref_mut() {
        Some(rng) => dropout(x, p, rng),
        None => Ok(x.clone()),
    }
}
