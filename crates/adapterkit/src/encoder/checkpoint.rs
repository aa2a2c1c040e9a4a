//! The base checkpoint as typed modules, one struct per Hugging Face BERT module, each loaded once
//! by the checkpoint's own tensor names and validated against the config's shapes.

use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::kernels::{PackedWeight, Precision, WeightRef};
use crate::keys::{Leaf, ParamKey, Role};
use crate::rng::Rng;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One base tensor with its key: the name by which a task's trained copy is found, and its role.
#[derive(Debug, Clone)]
pub struct Param {
    /// Checkpoint name and role.
    pub key: ParamKey,
    /// The frozen values.
    pub value: ParamValue,
}

/// How a base tensor's values are held.
#[derive(Debug, Clone)]
pub enum ParamValue {
    /// As a tensor.
    Tensor(Tensor),
    /// Rows `start..start + rows` of a frozen weight held only as its panels for the fused
    /// products (see [`PackedWeight`]): beside an f32 copy they added 340 MB to a BERT-base
    /// process. The few readers that need a matrix unpack a copy.
    Panels {
        /// The packed weight.
        panels: PackedWeight,
        /// First row.
        start: usize,
        /// Row count.
        rows: usize,
    },
    /// Dropped from a base whose task trains its own copy (see [`crate::BaseModel::release_owned_by`]):
    /// the shape stays, and every read is an error rather than the values the task replaced.
    Released {
        /// The shape.
        dims: Vec<usize>,
    },
}

impl ParamValue {
    /// `w` held only as panels where our kernel packs it, else as the tensor.
    pub fn packed(w: Tensor) -> Result<Self> {
        Ok(match PackedWeight::of(&w)? {
            Some(panels) => ParamValue::Panels {
                rows: panels.dims().0,
                panels,
                start: 0,
            },
            None => ParamValue::Tensor(w),
        })
    }

    /// The values as a forward reads them; an error for a released weight (`name` says which).
    pub fn get(&self, name: &str) -> Result<WeightRef<'_>> {
        match self {
            ParamValue::Tensor(t) => Ok(WeightRef::Tensor(t)),
            ParamValue::Panels {
                panels,
                start,
                rows,
            } => Ok(WeightRef::Panels {
                panels,
                start: *start,
                rows: *rows,
            }),
            ParamValue::Released { .. } => Err(Error::config(
                "base model",
                name,
                "was released because the task trains its own copy, yet was read (a bug: the \
                 read would have taken values the task replaced)",
            )),
        }
    }
}

impl Param {
    fn new(key: ParamKey, tensor: Tensor) -> Self {
        Param {
            key,
            value: ParamValue::Tensor(tensor),
        }
    }

    /// The values as a tensor: the held tensor (shared, not copied), or a fresh copy unpacked
    /// from the panels.
    pub fn tensor(&self) -> Result<Tensor> {
        Ok(self.value.get(self.key.name())?.tensor()?)
    }

    /// The held tensor, where the values are held as one.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match &self.value {
            ParamValue::Tensor(t) => Some(t),
            ParamValue::Panels { .. } | ParamValue::Released { .. } => None,
        }
    }

    /// The shape.
    pub fn dims(&self) -> Vec<usize> {
        match &self.value {
            ParamValue::Tensor(t) => t.dims().to_vec(),
            ParamValue::Panels { panels, rows, .. } => vec![*rows, panels.dims().1],
            ParamValue::Released { dims } => dims.clone(),
        }
    }

    /// The number of values.
    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }
}

/// A dense layer `x · Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// W [out, in].
    pub weight: Param,
    /// b [out].
    pub bias: Param,
}

/// A LayerNorm's scale and shift.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// γ [d].
    pub weight: Param,
    /// β [d].
    pub bias: Param,
}

/// `embeddings`: word, position and segment tables, then a LayerNorm.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// `word_embeddings` [vocab, d].
    pub word: Param,
    /// `position_embeddings` [positions, d].
    pub position: Param,
    /// `token_type_embeddings` [types, d].
    pub token_type: Param,
    /// `LayerNorm`.
    pub layer_norm: LayerNorm,
}

/// `attention.self`: the query, key and value projections.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    /// `query`.
    pub query: Linear,
    /// `key`.
    pub key: Linear,
    /// `value`.
    pub value: Linear,
    /// q, k, v concatenated once at load, for the fused block; the three projections above hold
    /// its row ranges.
    pub qkv: FusedQkv,
}

/// `attention.output`: the output projection, then residual + LayerNorm (adapter site 1).
#[derive(Debug, Clone)]
pub struct AttentionOutput {
    /// `dense`.
    pub dense: Linear,
    /// `LayerNorm`.
    pub layer_norm: LayerNorm,
}

/// `intermediate`: the FFN's up-projection (GELU follows).
#[derive(Debug, Clone)]
pub struct Intermediate {
    /// `dense`.
    pub dense: Linear,
}

/// `output`: the FFN's down-projection, then residual + LayerNorm (adapter site 2).
#[derive(Debug, Clone)]
pub struct Output {
    /// `dense`.
    pub dense: Linear,
    /// `LayerNorm`.
    pub layer_norm: LayerNorm,
}

/// `encoder.layer.{i}`: one transformer layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// `attention.self`.
    pub attention: SelfAttention,
    /// `attention.output`.
    pub attention_output: AttentionOutput,
    /// `intermediate`.
    pub intermediate: Intermediate,
    /// `output`.
    pub output: Output,
}

/// `pooler`: tanh(W · h[CLS] + b).
#[derive(Debug, Clone)]
pub struct Pooler {
    /// `dense`.
    pub dense: Linear,
}

/// Every weight of a BERT checkpoint, by module.
#[derive(Debug, Clone)]
pub struct BertWeights {
    /// `embeddings`.
    pub embeddings: Embeddings,
    /// `encoder.layer.*`.
    pub layers: Vec<Layer>,
    /// `pooler`, when the checkpoint has one.
    pub pooler: Option<Pooler>,
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

/// Where the loader's tensors come from.
enum Source {
    /// A checkpoint's tensors by canonical name.
    Checkpoint(HashMap<String, Tensor>),
    /// Fresh random weights: normal(0, std) matrices, unit LayerNorm scales, zero vectors.
    Random { rng: Rng, std: f64 },
}

/// Builds the typed modules tensor by tensor, checking each shape.
struct Loader {
    source: Source,
    path: PathBuf,
}

impl Loader {
    fn take(&mut self, name: String, shape: &[usize], role: Role, leaf: Leaf) -> Result<Param> {
        let t = match &mut self.source {
            Source::Checkpoint(all) => {
                crate::io::take_tensor(all, &self.path, &name, shape, &Device::Cpu)?
            }
            Source::Random { rng, std } => {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = if leaf == Leaf::Norm && name.ends_with(".weight") {
                    vec![1.0; n]
                } else if shape.len() == 1 {
                    vec![0.0; n]
                } else {
                    (0..n).map(|_| (rng.normal() * *std) as f32).collect()
                };
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
        };
        Ok(Param::new(ParamKey::new(name, role, leaf), t))
    }

    fn has_pooler(&self) -> bool {
        match &self.source {
            Source::Checkpoint(all) => all.contains_key("pooler.dense.weight"),
            Source::Random { .. } => true,
        }
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, role: Role) -> Result<Linear> {
        Ok(Linear {
            weight: self.take(format!("{prefix}.weight"), &[out, inp], role, Leaf::Weight)?,
            bias: self.take(format!("{prefix}.bias"), &[out], role, Leaf::Bias)?,
        })
    }

    fn layer_norm(&mut self, prefix: &str, d: usize, layer: Option<usize>) -> Result<LayerNorm> {
        let role = Role::LayerNorm { layer };
        Ok(LayerNorm {
            weight: self.take(format!("{prefix}.LayerNorm.weight"), &[d], role, Leaf::Norm)?,
            bias: self.take(format!("{prefix}.LayerNorm.bias"), &[d], role, Leaf::Norm)?,
        })
    }
}

impl BertWeights {
    /// Reads every module from `raw` (checkpoint names, `bert.` prefix and TF names allowed),
    /// checking names and shapes against `config`; `source` names the file in errors.
    pub fn from_tensors(
        config: &BertConfig,
        raw: HashMap<String, Tensor>,
        source: &Path,
    ) -> Result<Self> {
        let all: HashMap<String, Tensor> = raw
            .into_iter()
            .map(|(k, v)| (canonical_name(&k), v))
            .collect();
        let held = all
            .keys()
            .filter_map(|k| {
                k.strip_prefix("encoder.layer.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |l| l + 1);
        if held != config.num_hidden_layers {
            return Err(Error::config(
                "config.json",
                "num_hidden_layers",
                format!(
                    "{} layers, but {} holds {held} (encoder.layer.0 to {}); the configuration \
                     does not belong to these weights",
                    config.num_hidden_layers,
                    source.display(),
                    held.saturating_sub(1)
                ),
            ));
        }
        Self::build(
            config,
            Loader {
                source: Source::Checkpoint(all),
                path: source.to_path_buf(),
            },
        )
    }

    /// Random weights of the shapes `config` describes (normal with std `initializer_range`, unit
    /// LayerNorm scales, zero biases), with a pooler.
    pub fn random(config: &BertConfig, seed: u64) -> Result<Self> {
        let source = Source::Random {
            rng: Rng::derive(seed, "random-base"),
            std: config.initializer_range,
        };
        Self::build(
            config,
            Loader {
                source,
                path: PathBuf::from("<random>"),
            },
        )
    }

    fn build(config: &BertConfig, mut ld: Loader) -> Result<Self> {
        let (d, i) = (config.hidden_size, config.intermediate_size);
        let emb = |n: &str| format!("embeddings.{n}.weight");
        let embeddings = Embeddings {
            word: ld.take(
                emb("word_embeddings"),
                &[config.vocab_size, d],
                Role::Embedding,
                Leaf::Weight,
            )?,
            position: ld.take(
                emb("position_embeddings"),
                &[config.max_position_embeddings, d],
                Role::Embedding,
                Leaf::Weight,
            )?,
            token_type: ld.take(
                emb("token_type_embeddings"),
                &[config.type_vocab_size, d],
                Role::Embedding,
                Leaf::Weight,
            )?,
            layer_norm: ld.layer_norm("embeddings", d, None)?,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let role = Role::LayerWeight { layer: l };
            let query = ld.linear(&format!("{p}.attention.self.query"), d, d, role)?;
            let key = ld.linear(&format!("{p}.attention.self.key"), d, d, role)?;
            let value = ld.linear(&format!("{p}.attention.self.value"), d, d, role)?;
            let attention = SelfAttention::fused(query, key, value)?;
            let attention_output = AttentionOutput {
                dense: ld.linear(&format!("{p}.attention.output.dense"), d, d, role)?,
                layer_norm: ld.layer_norm(&format!("{p}.attention.output"), d, Some(l))?,
            };
            let intermediate = Intermediate {
                dense: ld.linear(&format!("{p}.intermediate.dense"), i, d, role)?,
            };
            let output = Output {
                dense: ld.linear(&format!("{p}.output.dense"), d, i, role)?,
                layer_norm: ld.layer_norm(&format!("{p}.output"), d, Some(l))?,
            };
            layers.push(Layer {
                attention,
                attention_output,
                intermediate,
                output,
            });
        }
        let pooler = if ld.has_pooler() {
            Some(Pooler {
                dense: ld.linear("pooler.dense", d, d, Role::Pooler)?,
            })
        } else {
            None
        };
        BertWeights {
            embeddings,
            layers,
            pooler,
        }
        .packed()
    }

    /// The same weights with the frozen weights of the products the fused forward runs on every
    /// step (q|k|v, attention output, both FFN projections) held only as their panels: frozen
    /// weights never change, packing the transposed weight on every call cost a share of each
    /// product, and a second f32 copy beside the panels cost memory. Other dtypes and devices,
    /// and CPUs without our tile, keep tensors.
    fn packed(mut self) -> Result<Self> {
        let pack = |v: &mut ParamValue| -> Result<()> {
            if let ParamValue::Tensor(w) = &*v {
                *v = ParamValue::packed(w.clone())?;
            }
            Ok(())
        };
        for l in &mut self.layers {
            let a = &mut l.attention;
            a.qkv = a.qkv.clone().packed()?;
            for (lin, (w, _)) in [&mut a.query, &mut a.key, &mut a.value]
                .into_iter()
                .zip(&a.qkv.parts)
            {
                lin.weight.value = w.clone();
            }
            for lin in [
                &mut l.attention_output.dense,
                &mut l.intermediate.dense,
                &mut l.output.dense,
            ] {
                pack(&mut lin.weight.value)?;
            }
        }
        Ok(self)
    }

    /// Releases every weight `owned` names (see [`ParamValue::Released`]); the fused q|k|v goes
    /// with q, k and v when all three go.
    pub fn release(&mut self, owned: &dyn Fn(&str) -> bool) -> Result<()> {
        let release = |p: &mut Param| {
            if owned(p.key.name()) {
                p.value = ParamValue::Released { dims: p.dims() };
            }
        };
        let e = &mut self.embeddings;
        for p in [&mut e.word, &mut e.position, &mut e.token_type] {
            release(p);
        }
        let mut norms = vec![&mut e.layer_norm];
        let mut linears = Vec::new();
        for l in &mut self.layers {
            let a = &mut l.attention;
            let qkv = [&a.query, &a.key, &a.value].map(|lin| owned(lin.weight.key.name()));
            if qkv.iter().all(|&o| o) {
                let dims = vec![a.qkv.bias.dim(0)?, a.query.weight.dims()[1]];
                a.qkv = FusedQkv::of(ParamValue::Released { dims }, a.qkv.bias.clone())?;
            }
            linears.extend([&mut a.query, &mut a.key, &mut a.value]);
            linears.extend([
                &mut l.attention_output.dense,
                &mut l.intermediate.dense,
                &mut l.output.dense,
            ]);
            norms.extend([&mut l.attention_output.layer_norm, &mut l.output.layer_norm]);
        }
        linears.extend(self.pooler.as_mut().map(|p| &mut p.dense));
        for lin in linears {
            release(&mut lin.weight);
            release(&mut lin.bias);
        }
        for n in norms {
            release(&mut n.weight);
            release(&mut n.bias);
        }
        Ok(())
    }

    /// The panels of the frozen projections (q|k|v, attention output, FFN up and down) held as
    /// them.
    fn projection_panels(&self) -> impl Iterator<Item = &PackedWeight> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.attention.qkv.weight,
                    &l.attention_output.dense.weight.value,
                    &l.intermediate.dense.weight.value,
                    &l.output.dense.weight.value,
                ]
            })
            .filter_map(|v| v.get("").ok()?.whole_panels())
    }

    /// Bytes of the panels that hold frozen weights.
    pub fn packed_bytes(&self) -> usize {
        self.projection_panels().map(PackedWeight::bytes).sum()
    }

    /// The precision the frozen projections' products run in: fp16 where any has fp16 panels
    /// ([`BertWeights::with_precision`]).
    pub fn precision(&self) -> Precision {
        if self.projection_panels().any(PackedWeight::is_half) {
            Precision::F16
        } else {
            Precision::F32
        }
    }

    /// The same weights (shared, not copied) whose layers' frozen projections run their products
    /// in `precision` (the forward `x · Wᵀ` and, in training, the input gradient `g · W`): fp16
    /// panels built beside the f32 ones, or dropped.
    pub fn with_precision(&self, precision: Precision) -> Result<Self> {
        let half = precision == Precision::F16;
        if half && !crate::kernels::half::available() {
            return Err(Error::config(
                "precision",
                "fp16",
                "needs a CPU with AVX512_FP16 (Intel Sapphire Rapids or later); this one has \
                 none: use --precision f32",
            ));
        }
        let mut converted = 0;
        let mut convert = |v: &ParamValue, name: &str| -> Result<ParamValue> {
            let ParamValue::Panels {
                panels,
                start,
                rows,
            } = v
            else {
                return Ok(v.clone());
            };
            let panels = panels.with_half(half)?.ok_or_else(|| {
                Error::config(
                    "precision",
                    name,
                    "holds a value beyond fp16's range (65504): this model cannot run in fp16",
                )
            })?;
            converted += 1;
            Ok(ParamValue::Panels {
                panels,
                start: *start,
                rows: *rows,
            })
        };
        let mut w = self.clone();
        for l in &mut w.layers {
            let a = &mut l.attention;
            let qkv = convert(&a.qkv.weight, a.query.weight.key.name())?;
            a.qkv = FusedQkv::of(qkv, a.qkv.bias.clone())?;
            for lin in [
                &mut l.attention_output.dense,
                &mut l.intermediate.dense,
                &mut l.output.dense,
            ] {
                lin.weight.value = convert(&lin.weight.value, lin.weight.key.name())?;
            }
        }
        // Asked for fp16 and nothing would run in it: say so rather than run f32 unannounced.
        if half && converted == 0 {
            return Err(Error::config(
                "precision",
                "fp16",
                "no frozen projection is held as GEMM panels (the task trains its own copy of \
                 every projection, ADAPTERKIT_GEMM turns our GEMM off, or the model is not on \
                 the CPU): nothing would run in fp16; use --precision f32",
            ));
        }
        Ok(w)
    }

    /// Every base parameter, in checkpoint order.
    pub fn params(&self) -> Vec<&Param> {
        let e = &self.embeddings;
        let mut v = vec![
            &e.word,
            &e.position,
            &e.token_type,
            &e.layer_norm.weight,
            &e.layer_norm.bias,
        ];
        for l in &self.layers {
            let a = &l.attention;
            for lin in [&a.query, &a.key, &a.value, &l.attention_output.dense] {
                v.extend([&lin.weight, &lin.bias]);
            }
            v.extend([
                &l.attention_output.layer_norm.weight,
                &l.attention_output.layer_norm.bias,
            ]);
            for lin in [&l.intermediate.dense, &l.output.dense] {
                v.extend([&lin.weight, &lin.bias]);
            }
            v.extend([&l.output.layer_norm.weight, &l.output.layer_norm.bias]);
        }
        if let Some(p) = &self.pooler {
            v.extend([&p.dense.weight, &p.dense.bias]);
        }
        v
    }

    /// The same weights with every tensor passed through `f` (dtype or device changes); the fused
    /// q, k, v tensors are rebuilt so the projections stay views into them.
    pub fn map(&self, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        self.map_tensors(f)?.packed()
    }

    /// The same values with every weight held as a tensor, none as panels: the reference of the
    /// packed products in tests.
    pub fn unpacked(&self) -> Result<Self> {
        self.map_tensors(&|t| Ok(t.clone()))
    }

    /// [`BertWeights::map`] without packing the result.
    fn map_tensors(&self, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let p = |x: &Param| -> Result<Param> { Ok(Param::new(x.key.clone(), f(&x.tensor()?)?)) };
        let lin = |x: &Linear| -> Result<Linear> {
            Ok(Linear {
                weight: p(&x.weight)?,
                bias: p(&x.bias)?,
            })
        };
        let ln = |x: &LayerNorm| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: p(&x.weight)?,
                bias: p(&x.bias)?,
            })
        };
        let e = &self.embeddings;
        Ok(BertWeights {
            embeddings: Embeddings {
                word: p(&e.word)?,
                position: p(&e.position)?,
                token_type: p(&e.token_type)?,
                layer_norm: ln(&e.layer_norm)?,
            },
            layers: self
                .layers
                .iter()
                .map(|l| {
                    let a = &l.attention;
                    Ok(Layer {
                        attention: SelfAttention::fused(
                            lin(&a.query)?,
                            lin(&a.key)?,
                            lin(&a.value)?,
                        )?,
                        attention_output: AttentionOutput {
                            dense: lin(&l.attention_output.dense)?,
                            layer_norm: ln(&l.attention_output.layer_norm)?,
                        },
                        intermediate: Intermediate {
                            dense: lin(&l.intermediate.dense)?,
                        },
                        output: Output {
                            dense: lin(&l.output.dense)?,
                            layer_norm: ln(&l.output.layer_norm)?,
                        },
                    })
                })
                .collect::<Result<_>>()?,
            pooler: match &self.pooler {
                Some(pl) => Some(Pooler {
                    dense: lin(&pl.dense)?,
                }),
                None => None,
            },
        })
    }

    /// Moves every tensor to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        self.map(&|t| Ok(t.to_device(device)?))
    }
}

impl SelfAttention {
    /// Concatenates the three projections into one [3d, d] weight and [3d] bias and makes the
    /// separate projections views into them, so the fused attention needs no copy per call.
    fn fused(mut query: Linear, mut key: Linear, mut value: Linear) -> Result<Self> {
        let lins = [&query, &key, &value];
        let f = FusedQkv::new(
            [
                lins[0].weight.tensor()?,
                lins[1].weight.tensor()?,
                lins[2].weight.tensor()?,
            ],
            [
                lins[0].bias.tensor()?,
                lins[1].bias.tensor()?,
                lins[2].bias.tensor()?,
            ],
            false,
        )?;
        for (lin, (w, b)) in [&mut query, &mut key, &mut value].into_iter().zip(&f.parts) {
            lin.weight.value = w.clone();
            lin.bias.value = ParamValue::Tensor(b.clone());
        }
        Ok(SelfAttention {
            query,
            key,
            value,
            qkv: f,
        })
    }
}

/// One layer's q, k and v projections concatenated into one [3d, d] weight and [3d] bias, each
/// projection a row range of them: what the fused attention reads, built once (at load for the
/// base, at [`crate::TaskModel::merge`] for a task's own or merged q, k, v) so that no forward
/// concatenates, unpacks or packs them.
#[derive(Debug, Clone)]
pub struct FusedQkv {
    /// W_q | W_k | W_v [3d, d]: panels where our kernel packs, else a tensor.
    pub weight: ParamValue,
    /// b_q | b_k | b_v [3d].
    pub bias: Tensor,
    /// q, k and v's weights and biases, as row ranges of the two above.
    pub parts: [(ParamValue, Tensor); 3],
}

impl FusedQkv {
    /// Concatenates q, k and v (weights [d, d], biases [d]); with `pack`, the weight is held only
    /// as panels where our kernel packs.
    pub fn new(weights: [Tensor; 3], biases: [Tensor; 3], pack: bool) -> Result<Self> {
        let f = Self::of(
            ParamValue::Tensor(Tensor::cat(&weights, 0)?),
            Tensor::cat(&biases, 0)?,
        )?;
        if pack {
            f.packed()
        } else {
            Ok(f)
        }
    }

    /// The same weight held only as panels, where our kernel packs (else unchanged).
    pub fn packed(self) -> Result<Self> {
        match &self.weight {
            ParamValue::Tensor(w) => Self::of(ParamValue::packed(w.clone())?, self.bias),
            ParamValue::Panels { .. } | ParamValue::Released { .. } => Ok(self),
        }
    }

    /// The concatenated `weight` and `bias` with q, k and v as their row ranges.
    fn of(weight: ParamValue, bias: Tensor) -> Result<Self> {
        let rows = bias.dim(0)? / 3;
        let part = |i: usize| -> Result<(ParamValue, Tensor)> {
            let w = match &weight {
                ParamValue::Panels { panels, .. } => ParamValue::Panels {
                    panels: panels.clone(),
                    start: i * rows,
                    rows,
                },
                ParamValue::Tensor(w) => ParamValue::Tensor(w.narrow(0, i * rows, rows)?),
                ParamValue::Released { dims } => ParamValue::Released {
                    dims: vec![rows, dims[1]],
                },
            };
            Ok((w, bias.narrow(0, i * rows, rows)?))
        };
        let parts = [part(0)?, part(1)?, part(2)?];
        Ok(FusedQkv {
            weight,
            bias,
            parts,
        })
    }
}
