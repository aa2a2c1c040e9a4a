//! Stored tensors that would give wrong answers without an error are refused at load, naming the
//! file and the tensor: NaN or infinite values, integer weights.

mod common;

use adapterkit::{AdapterConfig, HeadConfig, TaskModel, TrainableSet};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

fn saved(tag: &str) -> (PathBuf, adapterkit::BaseModel) {
    let base = common::tiny_base();
    let task = TaskModel::new(
        &base,
        "t",
        TrainableSet::Adapters { layernorms: true },
        Some(AdapterConfig {
            bottleneck: 4,
            ..AdapterConfig::default()
        }),
        HeadConfig::classification(vec!["a".into(), "b".into()]),
        32,
        0,
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("ak-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    task.save(&dir, "tiny-bert").unwrap();
    (dir, base)
}

/// Rewrites one tensor of the directory's adapter file with `f`.
fn tamper(dir: &std::path::Path, f: impl Fn(&Tensor) -> Tensor) -> String {
    let path = dir.join("adapter.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let name = tensors.keys().min().unwrap().clone();
    let t = f(&tensors[&name]);
    tensors.insert(name.clone(), t);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    name
}

#[test]
fn nan_weights_are_refused_naming_the_tensor() {
    let (dir, base) = saved("nan");
    let name = tamper(&dir, |t| {
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mid = v.len() / 2;
        v[mid] = f32::NAN;
        Tensor::from_vec(v, t.dims(), t.device()).unwrap()
    });
    let err = TaskModel::load(&dir, &base).unwrap_err().to_string();
    assert!(
        err.contains(name.trim_start_matches("bert.")) && err.contains("NaN"),
        "{err}"
    );
    assert!(err.contains("adapter.safetensors"), "{err}");
}

#[test]
fn integer_weights_are_refused() {
    let (dir, base) = saved("int");
    let name = tamper(&dir, |t| t.to_dtype(DType::I64).unwrap());
    let err = TaskModel::load(&dir, &base).unwrap_err().to_string();
    assert!(
        err.contains(name.trim_start_matches("bert.")) && err.contains("I64"),
        "{err}"
    );
}
