//! Saving and loading a task's directory: one reader for ours and AdapterHub's, which checks that
//! the files agree with each other.

use super::files;
use super::hub::{self, BnConfig, ForBase, HubFile, HubHeadConfig, HUB_VERSION};
use super::hub_lora::HubLoraConfig;
use super::hub_prefix::HubPrefixConfig;
use super::meta::{AdapterInit, TaskMeta, FORMAT_VERSION};
use crate::adapter::{AdapterConfig, AdapterMethod, LoraConfig, PrefixConfig};
use crate::encoder::BaseModel;
use crate::error::{Error, Result};
use crate::head::{HeadConfig, Pooling};
use crate::keys::{ParamKey, Role};
use crate::task::{head_key, validate_name, BaseFingerprint, TaskModel, TrainableSet};
use candle_core::Tensor;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

impl TaskModel {
    /// Writes the task as an adapter directory (AdapterHub file and tensor names, plus our own
    /// metadata and trained base parameters). The directory is replaced as a whole: a crash at
    /// any moment leaves the complete old or the complete new one (see [`crate::io::replace_dir`]).
    pub fn save(&self, dir: &Path, base_name: &str) -> Result<()> {
        self.save_with(dir, base_name, |_| Ok(()))
    }

    /// Checks that [`TaskModel::save`] can write `dir`, before the training whose result goes there.
    pub fn check_save_target(dir: &Path) -> Result<()> {
        crate::io::check_replace_target(dir, &files::replaceable).map(|_| ())
    }

    /// [`TaskModel::save`], with `also` writing more files (the run record) into the new
    /// directory before it takes the old one's place; returns what `also` returns.
    pub fn save_with<R>(
        &self,
        dir: &Path,
        base_name: &str,
        also: impl FnOnce(&Path) -> Result<R>,
    ) -> Result<R> {
        crate::io::replace_dir(dir, &files::replaceable, |staging| {
            self.write_files(staging, base_name)?;
            also(staging)
        })
    }

    /// Writes every file of the directory into the empty directory `dir`; the metadata last.
    fn write_files(&self, dir: &Path, base_name: &str) -> Result<()> {
        let [adapters, head, base] = self.split_params();
        if let Some(l) = &self.lora {
            write_sorted(
                &dir.join(files::ADAPTER_CONFIG),
                &self.envelope(base_name, HubLoraConfig::from(l)),
            )?;
            crate::io::save_safetensors(&dir.join(files::ADAPTER_WEIGHTS), &adapters)?;
        }
        if let Some(p) = &self.prefix {
            write_sorted(
                &dir.join(files::ADAPTER_CONFIG),
                &self.envelope(base_name, HubPrefixConfig::from(p)),
            )?;
            crate::io::save_safetensors(&dir.join(files::ADAPTER_WEIGHTS), &adapters)?;
        }
        if let Some(a) = &self.adapter {
            let bn = BnConfig::from(ForBase {
                config: a,
                hidden: self.base.hidden_size,
                // Not read when writing a BnConfig (its widths are all hidden-sized).
                intermediate: 4 * self.base.hidden_size,
                layers: self.base.num_hidden_layers,
            });
            write_sorted(
                &dir.join(files::ADAPTER_CONFIG),
                &self.envelope(base_name, bn),
            )?;
            let mut adapters = adapters;
            let aliases: Vec<(String, Tensor)> = adapters
                .iter()
                .filter_map(|(k, v)| hub::ln_before_alias(k).map(|a| (a, v.clone())))
                .collect();
            adapters.extend(aliases);
            crate::io::save_safetensors(&dir.join(files::ADAPTER_WEIGHTS), &adapters)?;
        }
        let head_cfg = self.envelope(base_name, HubHeadConfig::from(&self.head));
        write_sorted(&dir.join(files::HEAD_CONFIG), &head_cfg)?;
        crate::io::save_safetensors(&dir.join(files::HEAD_WEIGHTS), &head)?;
        if !base.is_empty() {
            crate::io::save_safetensors(&dir.join(files::BASE_PARAMS), &base)?;
        }
        let meta = TaskMeta {
            format: FORMAT_VERSION,
            name: self.name.clone(),
            trainable: self.trainable.clone(),
            base: self.base.clone(),
            max_len: self.max_len,
            adapter_init: self.adapter.as_ref().map(|a| AdapterInit {
                scheme: a.init,
                std: a.init_std,
            }),
            pair: self.head.pair,
            adapter: None,
            head: None,
        };
        // Written last: a directory without it is an interrupted save and will not load.
        crate::io::write_json(&dir.join(files::META), &meta)
    }

    /// `config` in the envelope AdapterHub writes around it.
    fn envelope<C>(&self, base_name: &str, config: C) -> HubFile<C> {
        HubFile {
            config,
            hidden_size: Some(self.base.hidden_size),
            model_class: Some("BertAdapterModel".into()),
            model_name: Some(base_name.into()),
            model_type: Some(self.base.model_type.clone()),
            name: Some(self.name.clone()),
            version: Some(HUB_VERSION.into()),
            adapterkit_base_params: self
                .params
                .keys()
                .any(|k| !matches!(k.role(), Role::Adapter { .. } | Role::Head))
                .then(|| files::BASE_PARAMS.to_string()),
        }
    }

    /// Loads an adapter directory written by [`TaskModel::save`] onto `base`, checking that it fits
    /// and that its files agree. A directory without our `adapterkit.json` is read as one saved by
    /// AdapterHub (see [`TaskModel::load_adapterhub`]).
    pub fn load(dir: &Path, base: &BaseModel) -> Result<Self> {
        // AdapterHub never writes our parameter file: with it and without the metadata (written
        // last), this is an interrupted save of ours and must not load as something else.
        if !dir.join(files::META).exists()
            && (dir.join(files::HEAD_CONFIG).exists() || dir.join(files::ADAPTER_CONFIG).exists())
            && !dir.join(files::BASE_PARAMS).exists()
        {
            return Self::load_adapterhub(dir, base);
        }
        let meta_path = dir.join(files::META);
        let meta: TaskMeta = read_typed(&meta_path)?;
        let incompatible = |message: String| Error::Incompatible {
            path: dir.to_path_buf(),
            message,
        };
        if meta.format != FORMAT_VERSION && meta.format != 1 {
            return Err(incompatible(format!(
                "format {} is not supported (expected 1 or {FORMAT_VERSION})",
                meta.format
            )));
        }
        let here = BaseFingerprint::of(base);
        if meta.base != here {
            return Err(incompatible(format!(
                "made for {} with hidden size {}, {} layers, vocabulary {}; this base is {} with hidden size {}, {} layers, vocabulary {}",
                meta.base.model_type, meta.base.hidden_size, meta.base.num_hidden_layers, meta.base.vocab_size,
                here.model_type, here.hidden_size, here.num_hidden_layers, here.vocab_size
            )));
        }
        validate_name(&meta.name)?;
        let hub = HubDir::read(dir, base)?;
        let disagree = |what: &str, detail: String| {
            incompatible(format!(
                "{} and {what} disagree ({detail}): the directory mixes files of different runs",
                files::META
            ))
        };
        for (file, name) in [
            (files::HEAD_CONFIG, Some(&hub.head_name)),
            (files::ADAPTER_CONFIG, hub.adapter.as_ref().map(|a| &a.1)),
        ] {
            match name {
                Some(n) if *n != meta.name => {
                    return Err(disagree(file, format!("name `{}` vs `{n}`", meta.name)))
                }
                _ => {}
            }
        }
        let has_adapter = matches!(meta.trainable, TrainableSet::Adapters { .. });
        if has_adapter != hub.adapter.is_some() {
            return Err(disagree(
                files::ADAPTER_CONFIG,
                format!(
                    "trainable set `{}` {} adapters, but the file is {}",
                    meta.trainable.label(),
                    if has_adapter { "has" } else { "has no" },
                    if hub.adapter.is_some() {
                        "there"
                    } else {
                        "missing"
                    }
                ),
            ));
        }
        let (mut adapter, lora, prefix) = split(hub.adapter.as_ref().map(|a| &a.0));
        let mut head = hub.head.clone();
        head.pair = meta.pair;
        let init = match (&meta.adapter, meta.adapter_init) {
            (Some(a), _) => Some(AdapterInit {
                scheme: a.init,
                std: a.init_std,
            }),
            (None, i) => i,
        };
        if let (Some(a), Some(i)) = (adapter.as_mut(), init) {
            if i.scheme.hub_name() != a.init.hub_name() {
                return Err(disagree(
                    files::ADAPTER_CONFIG,
                    format!("init `{}` vs `{}`", i.scheme.hub_name(), a.init.hub_name()),
                ));
            }
            a.init = i.scheme;
            a.init_std = i.std;
        }
        // Format 1 kept second copies of both configurations; they must say the same.
        if let Some(old) = &meta.adapter {
            // (Format 1 had no LoRA, so `adapter` is the bottleneck configuration or nothing.)
            if adapter.as_ref() != Some(old) {
                return Err(disagree(
                    files::ADAPTER_CONFIG,
                    "adapter configuration".into(),
                ));
            }
        }
        if let Some(old) = &meta.head {
            head.pair = old.pair;
            if *old != head {
                return Err(disagree(files::HEAD_CONFIG, "head configuration".into()));
            }
        }
        let method = hub.adapter.as_ref().map(|a| match &adapter {
            Some(bn) => AdapterMethod::Bottleneck(bn.clone()),
            None => a.0.clone(),
        });
        let params = hub.tensors(
            dir,
            base,
            &meta.name,
            method.as_ref(),
            &head,
            Some(&meta.trainable),
        )?;
        let mut task = TaskModel {
            name: meta.name,
            adapter,
            lora,
            prefix,
            merged: None,
            head,
            trainable: meta.trainable,
            params,
            base: here,
            max_len: meta.max_len,
        };
        task.merge(base)?;
        Ok(task)
    }

    /// Loads an adapter directory saved by the Python `adapters` library (`save_adapter` with its
    /// head): `adapter_config.json` + `adapter.safetensors` or `pytorch_adapter.bin`, and
    /// `head_config.json` + `model_head.safetensors` or `pytorch_model_head.bin`. A directory with
    /// only a head loads as a head-only task. Every tensor in the weight files must be used.
    pub fn load_adapterhub(dir: &Path, base: &BaseModel) -> Result<Self> {
        let hub = HubDir::read(dir, base)?;
        if let Some(f) = &hub.base_params {
            return Err(Error::Incompatible {
                path: dir.to_path_buf(),
                message: format!(
                    "written by adapterkit for a run that also trained base parameters (in `{f}`, \
                     with `{}`), which are not here: without them it would predict differently \
                     from the trained run; copy the whole directory",
                    files::META
                ),
            });
        }
        let (method, name) = match &hub.adapter {
            Some((a, n)) => (Some(a.clone()), n.clone()),
            None => (None, hub.head_name.clone()),
        };
        validate_name(&name)?;
        let params = hub.tensors(dir, base, &name, method.as_ref(), &hub.head, None)?;
        let (adapter, lora, prefix) = split(method.as_ref());
        let mut task = TaskModel {
            name,
            trainable: if method.is_some() {
                TrainableSet::Adapters { layernorms: false }
            } else {
                TrainableSet::Head
            },
            adapter,
            lora,
            prefix,
            merged: None,
            head: hub.head,
            params,
            base: BaseFingerprint::of(base),
            max_len: base.config.max_position_embeddings.min(512),
        };
        task.merge(base)?;
        Ok(task)
    }
}

/// The task's optional configurations, one per method kind.
type MethodParts = (
    Option<AdapterConfig>,
    Option<LoraConfig>,
    Option<PrefixConfig>,
);

/// A method as the task's optional configurations.
fn split(method: Option<&AdapterMethod>) -> MethodParts {
    match method {
        Some(AdapterMethod::Bottleneck(a)) => (Some(a.clone()), None, None),
        Some(AdapterMethod::Lora(l)) => (None, Some(l.clone()), None),
        Some(AdapterMethod::Prefix(p)) => (None, None, Some(p.clone())),
        None => (None, None, None),
    }
}

/// Serialises `value` through a JSON value, so every object's keys are sorted as AdapterHub's
/// files (and ours before the typed structs) have them.
fn write_sorted<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let v = serde_json::to_value(value).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    crate::io::write_json(path, &v)
}

/// Reads a JSON file as `T`, naming the file and the key path of any error.
fn read_typed<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    hub::parse(&path.display().to_string(), &text)
}

/// An AdapterHub configuration file holding a `C`, read as our `T` for `base`; its envelope.
fn read_config<C, T>(path: &Path, base: &BaseModel) -> Result<(T, HubFile<()>)>
where
    C: serde::de::DeserializeOwned,
    T: for<'c> TryFrom<ForBase<'c, C>, Error = hub::Refusal>,
{
    let file: HubFile<C> = read_typed(path)?;
    let cfg = T::try_from(ForBase {
        config: &file.config,
        hidden: base.config.hidden_size,
        intermediate: base.config.intermediate_size,
        layers: base.config.num_hidden_layers,
    })
    .map_err(|r| r.in_file(&path.display().to_string()))?;
    Ok((cfg, file.without_config()))
}

/// AdapterHub's files of a directory, read and checked against the base.
struct HubDir {
    head: HeadConfig,
    /// The name the head's tensors carry (`heads.{name}.…`).
    head_name: String,
    /// The adapter method and its name, when the directory has one.
    adapter: Option<(AdapterMethod, String)>,
    /// Our file of trained base parameters that the configurations say the run has.
    base_params: Option<String>,
}

impl HubDir {
    fn read(dir: &Path, base: &BaseModel) -> Result<HubDir> {
        let here = BaseFingerprint::of(base);
        let d = here.hidden_size;
        let check_envelope = |path: &Path, size: Option<usize>, ty: Option<&str>| -> Result<()> {
            let incompatible = |message: String| Error::Incompatible {
                path: dir.to_path_buf(),
                message,
            };
            if let Some(h) = size.filter(|&h| h != d) {
                return Err(incompatible(format!(
                    "{} was made for hidden size {h}; this base has {d}",
                    path.display()
                )));
            }
            if let Some(t) = ty.filter(|&t| t != here.model_type) {
                return Err(incompatible(format!(
                    "{} was made for model type `{t}`; this base is `{}`",
                    path.display(),
                    here.model_type
                )));
            }
            Ok(())
        };
        let head_path = dir.join(files::HEAD_CONFIG);
        if !head_path.exists() {
            return Err(Error::NotFound(format!(
                "{}: an adapter without a prediction head ({} is missing): predicting needs the \
                 head it was trained with; save both from Python with \
                 `save_adapter(dir, name, with_head=True)`",
                dir.display(),
                files::HEAD_CONFIG,
            )));
        }
        let ctx = head_path.display().to_string();
        let file: HubFile<HubHeadConfig> = read_typed(&head_path)?;
        check_envelope(&head_path, file.hidden_size, file.model_type.as_deref())?;
        let head = HeadConfig::try_from(&file.config).map_err(|r| r.in_file(&ctx))?;
        let head_name = file
            .name
            .ok_or_else(|| Error::config(&ctx, "name", "missing: expected the head's name"))?;
        let mut base_params = file.adapterkit_base_params;

        let adapter_path = dir.join(files::ADAPTER_CONFIG);
        let adapter = if adapter_path.exists() {
            let ctx = adapter_path.display().to_string();
            let peek: serde_json::Value = read_typed(&adapter_path)?;
            let (method, file) = if hub::is_lora(&peek) {
                let (cfg, file) = read_config::<HubLoraConfig, LoraConfig>(&adapter_path, base)?;
                (AdapterMethod::Lora(cfg), file)
            } else if hub::is_prefix(&peek) {
                let (cfg, file) =
                    read_config::<HubPrefixConfig, PrefixConfig>(&adapter_path, base)?;
                (AdapterMethod::Prefix(cfg), file)
            } else {
                let (cfg, file) = read_config::<BnConfig, AdapterConfig>(&adapter_path, base)?;
                (AdapterMethod::Bottleneck(cfg), file)
            };
            check_envelope(&adapter_path, file.hidden_size, file.model_type.as_deref())?;
            base_params = base_params.or(file.adapterkit_base_params);
            let name = file.name.ok_or_else(|| {
                Error::config(&ctx, "name", "missing: expected the adapter's name")
            })?;
            let method = match method {
                AdapterMethod::Prefix(p) if !p.flat && ejected_prefix(dir, &name)? => {
                    AdapterMethod::Prefix(PrefixConfig { flat: true, ..p })
                }
                m => m,
            };
            Some((method, name))
        } else {
            None
        };
        if head.pooling == Pooling::Pooler && base.param("pooler.dense.weight").is_none() {
            return Err(Error::Incompatible {
                path: dir.to_path_buf(),
                message: "the head uses the pooler (use_pooler) but the base checkpoint has no \
                          pooler weights"
                    .into(),
            });
        }
        Ok(HubDir {
            head,
            head_name,
            adapter,
            base_params,
        })
    }

    /// Every tensor of the task `name`: adapter tensors, the head's (renamed from the head's own
    /// name), and, for a trainable set of ours, its copies of base parameters. Each weight file
    /// must hold exactly what the configurations account for.
    fn tensors(
        &self,
        dir: &Path,
        base: &BaseModel,
        name: &str,
        method: Option<&AdapterMethod>,
        head: &HeadConfig,
        trainable: Option<&TrainableSet>,
    ) -> Result<BTreeMap<ParamKey, Tensor>> {
        let (d, layers) = (base.config.hidden_size, base.config.num_hidden_layers);
        let mut params = BTreeMap::new();
        if let Some(m) = method {
            let keys = match m {
                AdapterMethod::Bottleneck(a) => a.param_keys(name, d, layers),
                AdapterMethod::Lora(l) => {
                    l.param_keys(name, d, base.config.intermediate_size, layers)
                }
                AdapterMethod::Prefix(p) => p.param_keys(name, d, layers),
            };
            let file = pick(dir, files::ADAPTER_WEIGHTS, files::ADAPTER_WEIGHTS_BIN)?;
            let mut tensors = read_stripped(&file)?;
            for (key, shape) in keys {
                let alias = hub::ln_before_alias(key.name());
                let from = match &alias {
                    Some(al) if !tensors.contains_key(key.name()) => al.clone(),
                    _ => key.to_string(),
                };
                let t = crate::io::take_tensor(&mut tensors, &file, &from, &shape, &base.device)?;
                if let Some(al) = alias {
                    tensors.remove(&al);
                }
                // AdapterHub saves each prefix tensor once more per layer: those copies must be
                // the same tensor, not a mix of runs.
                for al in crate::adapter::prefix::aliases(key.name(), layers) {
                    if let Some(copy) = tensors.remove(&al) {
                        let same = copy.dims() == t.dims()
                            && copy
                                .to_dtype(t.dtype())?
                                .ne(&t)?
                                .sum_all()?
                                .to_dtype(candle_core::DType::F64)?
                                .to_scalar::<f64>()?
                                == 0.0;
                        if !same {
                            return Err(Error::Config {
                                context: file.display().to_string(),
                                field: al,
                                message: format!(
                                    "differs from `{}`, of which AdapterHub saves it as a copy",
                                    key.name()
                                ),
                            });
                        }
                    }
                }
                params.insert(key, t);
            }
            leftovers(&file, &tensors)?;
        }
        let file = pick(dir, files::HEAD_WEIGHTS, files::HEAD_WEIGHTS_BIN)?;
        let mut tensors = read_stripped(&file)?;
        let theirs = head.param_shapes(&self.head_name, d);
        for ((from, shape), (to, _)) in theirs.into_iter().zip(head.param_shapes(name, d)) {
            let t = crate::io::take_tensor(&mut tensors, &file, &from, &shape, &base.device)?;
            params.insert(head_key(to, &shape), t);
        }
        leftovers(&file, &tensors)?;
        let mut owned = match trainable {
            Some(t) => t.owned_base_params(base, head.pooling),
            None => Vec::new(),
        };
        if !owned.is_empty() {
            owned.sort_by(|a, b| a.key.cmp(&b.key));
            let file = dir.join(files::BASE_PARAMS);
            let mut tensors = read_stripped(&file)?;
            for p in owned {
                let shape = p.dims();
                let t = crate::io::take_tensor(
                    &mut tensors,
                    &file,
                    p.key.name(),
                    &shape,
                    &base.device,
                )?;
                debug_assert!(!matches!(p.key.role(), Role::Adapter { .. } | Role::Head));
                params.insert(p.key.clone(), t);
            }
            leftovers(&file, &tensors)?;
        }
        Ok(params)
    }
}

/// Whether the prefix tuning `name` in `dir` was saved after AdapterHub's `eject_prefix_tuning`:
/// flat prefixes (`control_trans`) and no MLP (`wte.weight`), under a config that the library
/// leaves saying `flat: false`. Such a directory is read as the flat prefixes it holds.
fn ejected_prefix(dir: &Path, name: &str) -> Result<bool> {
    let file = pick(dir, files::ADAPTER_WEIGHTS, files::ADAPTER_WEIGHTS_BIN)?;
    let tensors = read_stripped(&file)?;
    let has = |leaf: &str| tensors.contains_key(&crate::adapter::prefix::param_name(name, leaf));
    Ok(has("control_trans") && !has("wte.weight"))
}

/// The safetensors file if there, else the PyTorch pickle.
fn pick(dir: &Path, safe: &str, bin: &str) -> Result<PathBuf> {
    let (s, b) = (dir.join(safe), dir.join(bin));
    if s.exists() {
        Ok(s)
    } else if b.exists() {
        Ok(b)
    } else {
        Err(Error::NotFound(format!(
            "{}: neither {safe} nor {bin} is there",
            dir.display()
        )))
    }
}

/// A weight file's tensors, with the `bert.` prefix AdapterHub's model class adds taken off.
fn read_stripped(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(crate::io::load_tensors(path)?
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("bert.").unwrap_or(&k).to_string(), v))
        .collect())
}

/// Refuses tensors left over in `file` after every expected one was taken.
fn leftovers(file: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    match tensors.keys().min() {
        Some(k) => Err(Error::Config {
            context: file.display().to_string(),
            field: k.clone(),
            message: "tensor the configuration does not account for".into(),
        }),
        None => Ok(()),
    }
}
