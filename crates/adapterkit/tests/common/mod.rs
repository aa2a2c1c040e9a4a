//! Helpers shared by the integration tests.
#![allow(dead_code)]

use adapterkit::{BaseModel, Batch};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

pub fn tiny_dir() -> PathBuf {
    fixtures().join("tiny-bert")
}

pub fn tiny_base() -> BaseModel {
    BaseModel::load(&tiny_dir()).expect("tiny fixture loads")
}

pub fn golden(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).expect("golden fixture")
}

/// The padded batch stored in a golden file.
pub fn golden_batch(g: &HashMap<String, Tensor>) -> Batch {
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let types = g["token_type_ids"].to_dtype(DType::U32).unwrap();
    let mask = g["attention_mask"].to_dtype(DType::F32).unwrap();
    let lengths = mask
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&x| x as usize)
        .collect();
    Batch {
        ids,
        type_ids: types,
        mask,
        lengths,
    }
}

/// Max |a - b| over the real (non-padding) positions of [batch, seq, hidden] tensors.
pub fn max_abs_diff_masked(a: &Tensor, b: &Tensor, mask: &Tensor) -> f32 {
    let m = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    a.to_dtype(DType::F32)
        .unwrap()
        .sub(&b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .broadcast_mul(&m)
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute value of a tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(
        &a.to_dtype(DType::F32)
            .unwrap()
            .sub(&b.to_dtype(DType::F32).unwrap())
            .unwrap(),
    )
}

/// Asset cache with the real model and data; panics with instructions when absent.
pub fn assets_home() -> PathBuf {
    let home = adapterkit::default_home();
    let model = home.join("models/all-MiniLM-L6-v2/model.safetensors");
    assert!(
        model.exists(),
        "{} is missing: run `python3 tools/fetch_assets.py` (or `adapterkit fetch`) first",
        model.display()
    );
    home
}
