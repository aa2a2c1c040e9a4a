//! Adapter behaviour on the tiny random BERT: near identity, gradients, isolation between tasks,
//! save/load round trips and hostile inputs.

mod common;
use adapterkit::adapter::lora::{Composition, LoraInit, Projection};
use adapterkit::adapter::{param_name, AdapterMethod, LoraConfig, Site};
use adapterkit::data::{LabelledSet, TaskData};
use adapterkit::task::files;
use adapterkit::train::{batch_loss, evaluate};
use adapterkit::{
    AdapterConfig, BaseModel, Batch, BertConfig, Error, ForwardOptions, HeadConfig, Placement,
    TaskModel, TrainConfig, TrainableSet,
};
use candle_core::{DType, Tensor, Var};
use common::*;
use std::collections::HashMap;
use std::path::PathBuf;

fn adapters(std: f64) -> AdapterConfig {
    AdapterConfig {
        bottleneck: 8,
        init_std: std,
        ..AdapterConfig::default()
    }
}

fn head() -> HeadConfig {
    HeadConfig::classification(vec!["neg".into(), "pos".into()])
}

fn adapter_task(base: &BaseModel, name: &str, std: f64, seed: u64) -> TaskModel {
    TaskModel::new(
        base,
        name,
        TrainableSet::Adapters { layernorms: true },
        Some(adapters(std)),
        head(),
        32,
        seed,
    )
    .unwrap()
}

/// A small labelled set in the tiny vocabulary: positive words → class 1.
fn toy_data() -> TaskData {
    let pos = ["good", "great", "fun", "love"];
    let neg = ["bad", "awful", "boring", "hate"];
    let mut inputs = Vec::new();
    let mut labels = Vec::new();
    for i in 0..48 {
        let (w, l) = if i % 2 == 0 {
            (pos[i / 2 % 4], 1)
        } else {
            (neg[i / 2 % 4], 0)
        };
        let filler = [
            "the movie",
            "this film is very",
            "the plot and acting was",
            "it",
        ][i % 4];
        inputs.push((format!("{filler} {w}"), None));
        labels.push(l);
    }
    let set = |r: std::ops::Range<usize>| LabelledSet {
        inputs: inputs[r.clone()].to_vec(),
        labels: labels[r.clone()].to_vec(),
        targets: labels[r].iter().map(|&l| l as f32).collect(),
    };
    TaskData {
        name: "toy".into(),
        labels: vec!["neg".into(), "pos".into()],
        train: set(0..32),
        dev: set(32..40),
        test: set(40..48),
        split: None,
        pair: false,
        source: vec![],
    }
}

fn quick_cfg(seed: u64) -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch_size: 8,
        lr: 1e-2,
        seed,
        ..TrainConfig::default()
    }
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ak-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn snapshot(base: &BaseModel) -> HashMap<String, Vec<u32>> {
    base.weight_names()
        .into_iter()
        .map(|n| {
            let bits = base
                .weight(&n)
                .unwrap()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n, bits.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

fn bits(rows: &[Vec<f32>]) -> Vec<u32> {
    rows.iter().flatten().map(|x| x.to_bits()).collect()
}

#[test]
fn fresh_adapter_is_near_identity_and_zero_adapter_is_exact() {
    let base = tiny_base();
    let g = golden(&tiny_dir().join("golden.safetensors"));
    let batch = golden_batch(&g);
    let plain = base
        .encode(None, &batch, &mut ForwardOptions::default())
        .unwrap();
    let small = adapter_task(&base, "a", 1e-3, 1);
    let with = base
        .encode(Some(&small), &batch, &mut ForwardOptions::default())
        .unwrap();
    let d = max_abs_diff(&plain, &with);
    assert!(
        d > 0.0 && d < 1e-2,
        "std 1e-3 adapter moved the output by {d}"
    );
    let zero = adapter_task(&base, "z", 0.0, 1);
    let exact = base
        .encode(Some(&zero), &batch, &mut ForwardOptions::default())
        .unwrap();
    assert_eq!(max_abs_diff(&plain, &exact), 0.0);
    // A large init is far from identity: the check above can fail.
    let big = adapter_task(&base, "b", 1.0, 1);
    let far = base
        .encode(Some(&big), &batch, &mut ForwardOptions::default())
        .unwrap();
    assert!(max_abs_diff(&plain, &far) > 1e-2);
}

#[test]
fn placement_and_leave_out_decide_the_adapter_tensors() {
    let base = tiny_base();
    let cfg = AdapterConfig {
        placement: Placement::Pfeiffer,
        leave_out: vec![0],
        ..adapters(1e-3)
    };
    let t = TaskModel::new(
        &base,
        "p",
        TrainableSet::Adapters { layernorms: false },
        Some(cfg.clone()),
        head(),
        32,
        0,
    )
    .unwrap();
    let names: Vec<_> = t
        .params
        .keys()
        .filter(|k| k.contains(".adapters."))
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(t
        .params
        .contains_key(&param_name(1, Site::Ffn, "p", "down.weight")));
    assert!(!t
        .params
        .contains_key(&param_name(1, Site::Attention, "p", "down.weight")));
    assert!(
        !t.params.keys().any(|k| k.contains("LayerNorm")),
        "frozen LayerNorms must not be owned"
    );
    let adapter_params: usize = t
        .params
        .iter()
        .filter(|(k, _)| k.contains(".adapters."))
        .map(|(_, v)| v.elem_count())
        .sum();
    assert_eq!(adapter_params, cfg.num_params(32, 2));
}

#[test]
fn trainable_sets_own_exactly_their_parameters() {
    let base = tiny_base();
    let mk = |set: TrainableSet| {
        let a = matches!(set, TrainableSet::Adapters { .. }).then(|| adapters(1e-3));
        TaskModel::new(&base, "t", set, a, head(), 32, 0).unwrap()
    };
    let head_n = 32 * 32 + 32 + 2 * 32 + 2;
    assert_eq!(mk(TrainableSet::Head).num_params(), head_n);
    let ln = mk(TrainableSet::Layernorm);
    assert_eq!(
        ln.params.keys().filter(|k| k.contains("LayerNorm")).count(),
        10
    );
    assert_eq!(ln.num_params(), head_n + 5 * 2 * 32);
    let top1 = mk(TrainableSet::TopK { k: 1 });
    assert!(top1
        .params
        .keys()
        .any(|k| k.starts_with("encoder.layer.1.")));
    assert!(!top1
        .params
        .keys()
        .any(|k| k.starts_with("encoder.layer.0.") || k.starts_with("embeddings.")));
    let full = mk(TrainableSet::Full);
    let pooler = 32 * 32 + 32;
    assert_eq!(full.num_params(), head_n + base.num_params() - pooler);
    assert!(TaskModel::new(&base, "t", TrainableSet::TopK { k: 3 }, None, head(), 32, 0).is_err());
    assert!(TaskModel::new(
        &base,
        "t",
        TrainableSet::Full,
        Some(adapters(1e-3)),
        head(),
        32,
        0
    )
    .is_err());
    assert!(TaskModel::new(&base, "bad name", TrainableSet::Head, None, head(), 32, 0).is_err());
}

#[test]
fn every_trainable_tensor_gets_a_gradient_matching_finite_differences() {
    let base = tiny_base().to_dtype(DType::F64).unwrap();
    let task = adapter_task(&base, "g", 5e-2, 3)
        .to_dtype(DType::F64)
        .unwrap();
    // 2 layers × 2 sites × 4 tensors + 5 LayerNorms × 2 tensors, 3 entries each.
    assert_eq!(gradient_check(&base, &task), (16 + 10) * 3);
}

#[test]
fn adapterhub_arrangements_get_gradients_matching_finite_differences() {
    use adapterkit::adapter::{Residual, Scaling};
    let base = tiny_base().to_dtype(DType::F64).unwrap();
    let general = [
        AdapterConfig {
            ln_before: true,
            ln_after: true,
            adapter_residual_before_ln: true,
            original_ln_before: true,
            residual: Residual::PostAdd,
            scaling: Scaling::Channel,
            ..adapters(5e-2)
        },
        AdapterConfig {
            placement: Placement::Attention,
            original_ln_before: true,
            original_ln_after: false,
            residual: Residual::AdapterInput,
            ln_after: true,
            scaling: Scaling::Learned,
            nonlinearity: adapterkit::kernels::Activation::GeluNew,
            ..adapters(5e-2)
        },
        // Parallel adapters (He et al.): AdapterHub's par_bn, and one at both sites with its own
        // LayerNorms and learned scaling.
        AdapterConfig {
            init: adapterkit::adapter::Init::TruncatedNormal,
            init_std: 5e-2,
            ..AdapterConfig::parallel(8, Scaling::Fixed(4.0))
        },
        AdapterConfig {
            parallel: true,
            ln_before: true,
            ln_after: true,
            scaling: Scaling::Learned,
            ..adapters(5e-2)
        },
    ];
    for (cfg, tensors_per_site) in general.into_iter().zip([9, 7, 4, 9]) {
        let sites = cfg.sites().len();
        let task = TaskModel::new(
            &base,
            "g",
            TrainableSet::Adapters { layernorms: true },
            Some(cfg),
            head(),
            32,
            3,
        )
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
        assert_eq!(
            gradient_check(&base, &task),
            (2 * sites * tensors_per_site + 10) * 3
        );
    }
}

/// A LoRA / (IA)³ task on `base` with random (non-zero) tensors, LayerNorms trained.
fn lora_task(base: &BaseModel, name: &str, lora: LoraConfig, seed: u64) -> TaskModel {
    TaskModel::with_method(
        base,
        name,
        TrainableSet::Adapters { layernorms: true },
        Some(AdapterMethod::Lora(LoraConfig {
            init: if lora.composition == Composition::Add {
                LoraInit::Bert
            } else {
                lora.init
            },
            ..lora
        })),
        head(),
        32,
        seed,
    )
    .unwrap()
}

/// LoRA on every projection, and (IA)³ with its rescaling vectors moved off one.
fn lora_cases(base: &BaseModel) -> Vec<TaskModel> {
    let all = LoraConfig {
        targets: Projection::ALL.to_vec(),
        ..LoraConfig::lora(4, 8.0)
    };
    let mut ia3 = lora_task(base, "ia3", LoraConfig::ia3(), 3);
    let names: Vec<String> = ia3.params.keys().map(|k| k.to_string()).collect();
    for n in names.iter().filter(|n| n.contains(".loras.")) {
        let t = &ia3.params[n.as_str()];
        let moved = Tensor::rand(0.2f32, 2.0, t.shape(), t.device()).unwrap();
        ia3.set_param(n, moved).unwrap();
    }
    // LoRA's "bert" init (std 0.02) is near zero: ten times that changes the outputs clearly.
    let mut lora = lora_task(base, "lora", all, 2);
    let names: Vec<String> = lora.params.keys().map(|k| k.to_string()).collect();
    for n in names.iter().filter(|n| n.contains(".loras.")) {
        let t = (&lora.params[n.as_str()] * 10.0).unwrap();
        lora.set_param(n, t).unwrap();
    }
    vec![lora, ia3]
}

#[test]
fn lora_and_ia3_get_gradients_matching_finite_differences() {
    let base = tiny_base().to_dtype(DType::F64).unwrap();
    // Per layer: LoRA A and B on 5 projections; (IA)³ one vector on 3. Plus 10 LayerNorm tensors.
    for (task, per_layer) in lora_cases(&base).into_iter().zip([10, 3]) {
        let task = task.to_dtype(DType::F64).unwrap();
        assert_eq!(gradient_check(&base, &task), (2 * per_layer + 10) * 3);
    }
}

#[test]
fn merged_lora_gives_the_unmerged_forward_and_merges_into_the_weights() {
    let base = tiny_base();
    let data = toy_data();
    let enc = base.tokenizer.encode_all(&data.test.inputs, 32).unwrap();
    let plain = TaskModel::new(&base, "plain", TrainableSet::Head, None, head(), 32, 2).unwrap();
    for task in lora_cases(&base) {
        assert!(!task.is_merged());
        let unmerged = base.logits_encoded(&task, &enc, 8, &[]).unwrap();
        let mut merged_task = task.clone();
        merged_task.merge(&base).unwrap();
        assert!(merged_task.is_merged());
        let batch = Batch::select(&enc, &[0, 1, 2], 0, &base.device).unwrap();
        let mut opts = ForwardOptions::default();
        let a = base.logits(&task, &batch, &mut opts).unwrap();
        let b = base.logits(&merged_task, &batch, &mut opts).unwrap();
        let d = max_abs_diff(&a, &b);
        assert!(d < 1e-5, "{}: merged and unmerged differ by {d}", task.name);
        // LoRA changes the encoder's output: without it, that moves well beyond the tolerance.
        let mut bare = task.clone();
        bare.lora = None;
        let h = base.encode(Some(&task), &batch, &mut opts).unwrap();
        let h_bare = base.encode(Some(&bare), &batch, &mut opts).unwrap();
        let moved = max_abs_diff(&h, &h_bare);
        assert!(moved > 1e-2, "{}: LoRA had no effect ({moved})", task.name);
        // Saved and loaded, a LoRA task comes back merged, with the same outputs.
        let dir = tmpdir(&format!("lora-{}", task.name));
        task.save(&dir, "tiny-bert").unwrap();
        let loaded = TaskModel::load(&dir, &base).unwrap();
        assert!(loaded.is_merged() && loaded.lora == task.lora);
        let again = base.logits_encoded(&loaded, &enc, 8, &[]).unwrap();
        assert_eq!(again, unmerged, "{}", task.name);
        std::fs::remove_dir_all(&dir).unwrap();
        // Its rows cannot share a batch with tasks that read the base's projections.
        let rows = vec![(&plain, &enc[0]), (&loaded, &enc[1])];
        let msg = base.predict_mixed(&rows, true).unwrap_err().to_string();
        assert!(msg.contains(&task.name) && msg.contains("LoRA"), "{msg}");
        // Skipping layers is for bottleneck adapters.
        let msg = base
            .logits_encoded(&loaded, &enc, 8, &[0])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("LoRA"), "{msg}");
    }
}

/// Full fine-tuning and top-k own copies of the base's weights: the base's may be released. The
/// task then trains and predicts exactly as beside the whole base, and another task that needs
/// a released weight fails with an error naming it instead of reading anything else.
#[test]
fn a_base_released_for_its_task_trains_and_predicts_the_same() {
    let data = toy_data();
    for set in [TrainableSet::Full, TrainableSet::TopK { k: 1 }] {
        let base = tiny_base();
        let task = TaskModel::new(&base, "own", set.clone(), None, head(), 32, 2).unwrap();
        let mut released = base.clone();
        released.release_owned_by(&task).unwrap();
        assert_eq!(released.num_params(), base.num_params());
        let (mut a, mut b) = (task.clone(), task.clone());
        adapterkit::train(&base, &mut a, &data, &quick_cfg(1), &mut |_| {}).unwrap();
        adapterkit::train(&released, &mut b, &data, &quick_cfg(1), &mut |_| {}).unwrap();
        for (k, v) in &a.params {
            assert_eq!(max_abs_diff(v, &b.params[k]), 0.0, "{set:?}: {k}");
        }
        let enc = base.tokenizer.encode_all(&data.test.inputs, 32).unwrap();
        let logits = base.logits_encoded(&a, &enc, 8, &[]).unwrap();
        assert_eq!(released.logits_encoded(&b, &enc, 8, &[]).unwrap(), logits);
        let other = adapter_task(&base, "other", 5e-2, 3);
        let msg = released
            .logits_encoded(&other, &enc, 8, &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("released"), "{set:?}: {msg}");
    }
}

/// A task's projections that differ from the base's (LoRA and (IA)³ merged, top-k and full
/// fine-tuning's own copies) are fused and packed once at merge; every change of the task must
/// drop them, or its forwards would read stale weights.
#[test]
fn projections_held_at_merge_follow_every_change_of_the_task() {
    let base = tiny_base();
    let data = toy_data();
    let enc = base.tokenizer.encode_all(&data.test.inputs, 32).unwrap();
    let batch = Batch::select(&enc, &[0, 1, 2], 0, &base.device).unwrap();
    let logits = |t: &TaskModel| {
        base.logits(t, &batch, &mut ForwardOptions::default())
            .unwrap()
    };
    let top = TaskModel::new(
        &base,
        "top",
        TrainableSet::TopK { k: 1 },
        None,
        head(),
        32,
        2,
    );
    let top = randomised(top.unwrap(), |n| n.contains(".attention.self."), 0.3);
    // (IA)³ scales k and v: the fused weight takes q from the base's panels.
    let ia3 = lora_cases(&base).swap_remove(1);
    for (task, part) in [
        (top, "attention.self.key.weight"),
        (ia3, "attention.self.value"),
    ] {
        let changed = task
            .params
            .keys()
            .map(|k| k.name().to_string())
            .find(|n| n.contains(part) && !n.contains("attention.output"))
            .unwrap();
        let before = logits(&task);
        let mut m = task.clone();
        m.merge(&base).unwrap();
        assert!(m.is_merged(), "{}", task.name);
        let d = max_abs_diff(&logits(&m), &before);
        assert!(d < 1e-5, "{}: merged differs by {d}", task.name);
        // Changing a tensor drops the fused copy: the forward reads the new value.
        let moved = (&m.params[changed.as_str()] * 3.0).unwrap();
        m.set_param(&changed, moved.clone()).unwrap();
        assert!(!m.is_merged(), "{}", task.name);
        let mut fresh = task.clone();
        fresh.set_param(&changed, moved).unwrap();
        let after = logits(&m);
        let d = max_abs_diff(&after, &logits(&fresh));
        assert!(d < 1e-6, "{}: {d}", task.name);
        let moved_by = max_abs_diff(&after, &before);
        assert!(moved_by > 1e-4, "{}: {changed} had no effect", task.name);
        // Merged again, from the new value.
        m.merge(&base).unwrap();
        let d = max_abs_diff(&logits(&m), &after);
        assert!(d < 1e-5, "{}: merged again differs by {d}", task.name);
        // `params` is public: a tensor put there directly makes the merge stale, and forwards
        // derive from the tensors again instead of reading it.
        let key = m
            .params
            .keys()
            .find(|k| k.name() == changed)
            .unwrap()
            .clone();
        let back = task.params[changed.as_str()].clone();
        let mut direct = m.clone();
        direct.params.insert(key, back);
        assert!(!direct.is_merged(), "{}", task.name);
        let d = max_abs_diff(&logits(&direct), &before);
        assert!(d < 1e-6, "{}: a stale merge was read ({d})", task.name);
        assert!(m.detached().is_merged(), "{}", task.name);
        assert!(!m.to_dtype(DType::F64).unwrap().is_merged());
        // Training starts from the tensors, not from the merged copy.
        let mut trained = m.clone();
        adapterkit::train(&base, &mut trained, &data, &quick_cfg(1), &mut |_| {}).unwrap();
        assert!(!trained.is_merged(), "{}", task.name);
    }
    // A task that changes neither q, k, v nor derives weights has nothing to merge.
    let mut plain = adapter_task(&base, "plain", 5e-2, 2);
    plain.merge(&base).unwrap();
    assert!(!plain.is_merged());
}

#[test]
fn lora_kept_as_updates_shares_batches_with_other_adapters() {
    let base = tiny_base();
    let data = toy_data();
    let enc = base.tokenizer.encode_all(&data.test.inputs, 32).unwrap();
    let plain = adapter_task(&base, "plain", 5e-2, 2);
    let qv = randomised(
        lora_task(&base, "qv", LoraConfig::lora(4, 8.0), 3),
        |n| n.contains(".loras."),
        0.3,
    );
    let qkvi = randomised(
        lora_task(
            &base,
            "qkvi",
            LoraConfig {
                targets: vec![
                    Projection::Query,
                    Projection::Key,
                    Projection::Value,
                    Projection::Intermediate,
                ],
                ..LoraConfig::lora(2, 4.0)
            },
            4,
        ),
        |n| n.contains(".loras."),
        0.3,
    );
    let mut served = Vec::new();
    for task in [qv, qkvi] {
        let mut t = task.detached();
        t.merge(&base).unwrap();
        let merged = base.logits_encoded(&t, &enc, 8, &[]).unwrap();
        // Merged weights: the rows cannot share a batch.
        assert!(!t.shares_encoder());
        t.keep_lora_as_updates(&base).unwrap();
        assert!(t.shares_encoder() && t.lora_as_updates());
        // The updates give what the merged weights give.
        let updates = base.logits_encoded(&t, &enc, 8, &[]).unwrap();
        for (a, b) in merged.iter().flatten().zip(updates.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "{}: {a} vs {b}", t.name);
        }
        served.push(t);
    }
    // Rows of both LoRA tasks and of a plain adapter in one batch: each as alone.
    let rows: Vec<_> = (0..6)
        .map(|i| {
            let task = match i % 3 {
                0 => &plain,
                1 => &served[0],
                _ => &served[1],
            };
            (task, &enc[i])
        })
        .collect();
    let mixed = base.predict_mixed(&rows, false).unwrap();
    for (i, (task, row)) in rows.iter().enumerate() {
        let alone = base
            .logits_encoded(task, std::slice::from_ref(*row), 8, &[])
            .unwrap();
        for (a, b) in mixed[i].iter().zip(&alone[0]) {
            assert!((a - b).abs() < 1e-5, "row {i} ({}): {a} vs {b}", task.name);
        }
    }
    // LoRA on the FFN's output projection cannot run per row group: it stays merged, alone.
    let mut all = lora_cases(&base).swap_remove(0);
    all.merge(&base).unwrap();
    all.keep_lora_as_updates(&base).unwrap();
    assert!(!all.shares_encoder() && !all.lora_as_updates());
}

#[test]
fn lora_training_moves_only_its_tensors_and_the_head() {
    let base = tiny_base();
    let before = snapshot(&base);
    let data = toy_data();
    let mut task = TaskModel::with_method(
        &base,
        "lora",
        TrainableSet::Adapters { layernorms: false },
        Some(AdapterMethod::Lora(LoraConfig::lora(4, 8.0))),
        head(),
        32,
        5,
    )
    .unwrap();
    // AdapterHub's LoRA init: B starts at zero, so the fresh task is the base exactly.
    let b_name = "encoder.layer.0.attention.self.query.loras.lora.lora_B";
    assert_eq!(max_abs(&task.params[b_name]), 0.0);
    let a_before = task.params["encoder.layer.0.attention.self.query.loras.lora.lora_A"].clone();
    let report = adapterkit::train(&base, &mut task, &data, &quick_cfg(1), &mut |_| {}).unwrap();
    assert!(report.steps > 0);
    assert!(max_abs(&task.params[b_name]) > 0.0, "lora_B did not move");
    let a_after = &task.params["encoder.layer.0.attention.self.query.loras.lora.lora_A"];
    assert!(
        max_abs_diff(&a_before, a_after) > 0.0,
        "lora_A did not move"
    );
    // Only LoRA tensors and the head are the task's: no LayerNorm or projection copies.
    assert!(task
        .params
        .keys()
        .all(|k| k.name().contains(".loras.") || k.name().starts_with("heads.")));
    assert_eq!(snapshot(&base), before, "training wrote to the base");
}

/// `t` with every tensor whose name `which` picks drawn uniformly from ±`bound` (a fresh
/// method's init is often near zero, which would hide mistakes).
fn randomised(mut t: TaskModel, which: impl Fn(&str) -> bool, bound: f32) -> TaskModel {
    let names: Vec<String> = t
        .params
        .keys()
        .filter(|k| which(k.name()))
        .map(|k| k.to_string())
        .collect();
    for n in names {
        let old = &t.params[n.as_str()];
        let v = Tensor::rand(-bound, bound, old.shape(), old.device())
            .unwrap()
            .to_dtype(old.dtype())
            .unwrap();
        t.set_param(&n, v).unwrap();
    }
    t
}

/// Compacter tasks (Houlsby's sites; Compacter++ with per-layer factorised rules, unfactorised
/// weights, no biases; shared rank-2 weights with an own LayerNorm before), their PHM tensors moved
/// well off their near-zero init.
fn compacter_cases(base: &BaseModel) -> Vec<TaskModel> {
    use adapterkit::adapter::PhmConfig;
    let local = AdapterConfig {
        leave_out: vec![0],
        phm: Some(PhmConfig {
            phm_dim: 2,
            shared_phm_rule: false,
            factorized_phm_rule: true,
            factorized_phm_w: false,
            phm_bias: false,
            ..PhmConfig::default()
        }),
        ..AdapterConfig::compacter(8, true)
    };
    let shared = AdapterConfig {
        ln_before: true,
        phm: Some(PhmConfig {
            shared_w_phm: true,
            phm_rank: 2,
            ..PhmConfig::default()
        }),
        ..AdapterConfig::compacter(4, false)
    };
    [AdapterConfig::compacter(8, false), local, shared]
        .into_iter()
        .enumerate()
        .map(|(i, cfg)| {
            let t = TaskModel::new(
                base,
                &format!("c{i}"),
                TrainableSet::Adapters { layernorms: true },
                Some(cfg),
                head(),
                32,
                i as u64,
            )
            .unwrap();
            randomised(t, |n| n.contains("adapter_") || n.contains("shared_"), 0.6)
        })
        .collect()
}

#[test]
fn compacter_gets_gradients_matching_finite_differences() {
    let base = tiny_base().to_dtype(DType::F64).unwrap();
    for task in compacter_cases(&base) {
        let task = task.to_dtype(DType::F64).unwrap();
        let tensors = task
            .params
            .keys()
            .filter(|k| !k.name().starts_with("heads."))
            .count();
        assert!(task.params.keys().any(|k| k.name().contains(".W")));
        assert_eq!(gradient_check(&base, &task), tensors * 3, "{}", task.name);
    }
}

#[test]
fn merged_compacter_gives_the_unmerged_forward_and_trains_only_its_tensors() {
    let base = tiny_base();
    let data = toy_data();
    let enc = base.tokenizer.encode_all(&data.test.inputs, 32).unwrap();
    let plain = adapter_task(&base, "plain", 5e-2, 2);
    for task in compacter_cases(&base) {
        assert!(!task.is_merged());
        let batch = Batch::select(&enc, &[0, 1, 2], 0, &base.device).unwrap();
        let mut opts = ForwardOptions::default();
        let a = base.logits(&task, &batch, &mut opts).unwrap();
        let mut merged = task.clone();
        merged.merge(&base).unwrap();
        let b = base.logits(&merged, &batch, &mut opts).unwrap();
        let d = max_abs_diff(&a, &b);
        assert!(d < 1e-5, "{}: merged and unmerged differ by {d}", task.name);
        // The adapters change the encoder's output: without them, that moves well beyond it.
        let h = base.encode(Some(&merged), &batch, &mut opts).unwrap();
        let mut skip = ForwardOptions {
            skip_adapter_layers: &[0, 1],
            ..ForwardOptions::default()
        };
        let h_bare = base.encode(Some(&merged), &batch, &mut skip).unwrap();
        let moved = max_abs_diff(&h, &h_bare);
        assert!(
            moved > 1e-2,
            "{}: the adapters had no effect ({moved})",
            task.name
        );
        // Saved and loaded, it comes back merged, with the same outputs.
        let dir = tmpdir(&format!("compacter-{}", task.name));
        task.save(&dir, "tiny-bert").unwrap();
        let loaded = TaskModel::load(&dir, &base).unwrap();
        assert!(loaded.is_merged() && loaded.adapter == task.adapter);
        assert_eq!(
            base.logits_encoded(&loaded, &enc, 8, &[]).unwrap(),
            base.logits_encoded(&merged, &enc, 8, &[]).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
        // Its rows share a batch with plain adapters' rows and get what they get alone.
        let rows = vec![(&plain, &enc[0]), (&loaded, &enc[1]), (&plain, &enc[2])];
        let mixed = base.predict_mixed(&rows, false).unwrap();
        let alone = base.logits_encoded(&loaded, &enc[1..2], 8, &[]).unwrap();
        let d = mixed[1]
            .iter()
            .zip(&alone[0])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{}: mixed row differs by {d}", task.name);
    }
    // Training moves the PHM tensors (shared rules included) and leaves the base alone.
    let before = snapshot(&base);
    let mut task = TaskModel::new(
        &base,
        "cpt",
        TrainableSet::Adapters { layernorms: false },
        Some(AdapterConfig::compacter(8, false)),
        head(),
        32,
        5,
    )
    .unwrap();
    let start = task.clone();
    adapterkit::train(&base, &mut task, &data, &quick_cfg(1), &mut |_| {}).unwrap();
    for (k, v) in &task.params {
        assert!(
            max_abs_diff(v, &start.params[k.name()]) > 0.0,
            "{k} did not move"
        );
    }
    assert!(task.params.contains_key("shared_parameters.cpt.phm_rule"));
    assert_eq!(snapshot(&base), before, "training wrote to the base");
}

/// Prefix-tuning tasks: through the MLP (4 positions, bottleneck 6), and flat with layer 0 left
/// out; their tensors moved off PyTorch's init to keep the attention away from saturation.
fn prefix_cases(base: &BaseModel) -> Vec<TaskModel> {
    use adapterkit::adapter::PrefixConfig;
    let mlp = PrefixConfig {
        prefix_length: 4,
        bottleneck_size: 6,
        ..PrefixConfig::default()
    };
    let flat = PrefixConfig {
        prefix_length: 3,
        flat: true,
        leave_out: vec![0],
        ..PrefixConfig::default()
    };
    [mlp, flat]
        .into_iter()
        .enumerate()
        .map(|(i, cfg)| {
            let t = TaskModel::with_method(
                base,
                &format!("p{i}"),
                TrainableSet::Adapters { layernorms: true },
                Some(AdapterMethod::Prefix(cfg)),
                head(),
                32,
                i as u64,
            )
            .unwrap();
            randomised(t, |n| n.starts_with("prefix_tuning."), 0.8)
        })
        .collect()
}

#[test]
fn prefix_tuning_gets_gradients_matching_finite_differences() {
    let base = tiny_base().to_dtype(DType::F64).unwrap();
    // MLP: 5 tensors; flat: 1. Plus 10 LayerNorm tensors.
    for (task, tensors) in prefix_cases(&base).into_iter().zip([5, 1]) {
        let task = task.to_dtype(DType::F64).unwrap();
        assert_eq!(
            gradient_check(&base, &task),
            (tensors + 10) * 3,
            "{}",
            task.name
        );
    }
}

#[test]
fn prefix_tuning_merges_folds_saves_and_trains_only_its_tensors() {
    let base = tiny_base();
    let data = toy_data();
    let enc = base.tokenizer.encode_all(&data.test.inputs, 32).unwrap();
    let plain = adapter_task(&base, "plain", 5e-2, 2);
    let batch = Batch::select(&enc, &[0, 1, 2], 0, &base.device).unwrap();
    for task in prefix_cases(&base) {
        let mut opts = ForwardOptions::default();
        let a = base.logits(&task, &batch, &mut opts).unwrap();
        let mut merged = task.clone();
        merged.merge(&base).unwrap();
        let b = base.logits(&merged, &batch, &mut opts).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-5, "{}: merged differs", task.name);
        // The fused and the composed attention agree on prefixed layers.
        let reference = base.with_backend(adapterkit::Backend::Reference);
        let r = reference.logits(&merged, &batch, &mut opts).unwrap();
        assert!(
            max_abs_diff(&r, &b) < 1e-5,
            "{}: backends differ",
            task.name
        );
        // The prefixes change the encoder's output.
        let mut bare = task.clone();
        bare.prefix = None;
        let h = base.encode(Some(&task), &batch, &mut opts).unwrap();
        let h_bare = base.encode(Some(&bare), &batch, &mut opts).unwrap();
        let moved = max_abs_diff(&h, &h_bare);
        assert!(
            moved > 1e-2,
            "{}: the prefixes had no effect ({moved})",
            task.name
        );
        // Folding the MLP into flat prefixes keeps the outputs and shrinks the stored tensors.
        let mut folded = task.clone();
        folded.fold_prefix().unwrap();
        assert!(folded.prefix.as_ref().unwrap().flat);
        let f = base.logits(&folded, &batch, &mut opts).unwrap();
        assert!(
            max_abs_diff(&f, &a) < 1e-5,
            "{}: folding changed it",
            task.name
        );
        // Saved and loaded (ours, then AdapterHub's files alone), the same outputs.
        let dir = tmpdir(&format!("prefix-{}", task.name));
        folded.save(&dir, "tiny-bert").unwrap();
        let loaded = TaskModel::load(&dir, &base).unwrap();
        assert!(loaded.is_merged() && loaded.prefix == folded.prefix);
        let got = base.logits(&loaded, &batch, &mut opts).unwrap();
        assert!(
            max_abs_diff(&got, &b) < 1e-5,
            "{}: save/load changed it",
            task.name
        );
        std::fs::remove_dir_all(&dir).unwrap();
        // Its rows cannot share a batch with tasks that attend without its prefixes.
        let rows = vec![(&plain, &enc[0]), (&loaded, &enc[1])];
        let msg = base.predict_mixed(&rows, true).unwrap_err().to_string();
        assert!(msg.contains(&task.name) && msg.contains("prefix"), "{msg}");
    }

    // Training moves the prefix MLP and the head only (LayerNorms frozen), the base stays.
    let before = snapshot(&base);
    let mut task = TaskModel::with_method(
        &base,
        "pt",
        TrainableSet::Adapters { layernorms: false },
        Some(AdapterMethod::Prefix(adapterkit::adapter::PrefixConfig {
            prefix_length: 4,
            bottleneck_size: 8,
            ..Default::default()
        })),
        head(),
        32,
        5,
    )
    .unwrap();
    let start = task.clone();
    adapterkit::train(&base, &mut task, &data, &quick_cfg(1), &mut |_| {}).unwrap();
    for (k, v) in &task.params {
        assert!(
            k.name().starts_with("prefix_tuning.") || k.name().starts_with("heads."),
            "{k}"
        );
        assert!(
            max_abs_diff(v, &start.params[k.name()]) > 0.0,
            "{k} did not move"
        );
    }
    assert_eq!(snapshot(&base), before, "training wrote to the base");
}

/// The loss of `rows` and each trainable tensor's gradient, by name.
fn loss_and_gradients(
    base: &BaseModel,
    task: &TaskModel,
    enc: &[(Vec<u32>, Vec<u32>)],
    set: &LabelledSet,
    rows: &[usize],
) -> (f32, Vec<(String, Tensor)>) {
    let mut t = task.clone();
    let mut vars = Vec::new();
    for (name, p) in t.params.iter_mut() {
        let v = Var::from_tensor(p).unwrap();
        *p = v.as_tensor().clone();
        vars.push((name.clone(), v));
    }
    let loss = batch_loss(base, &t, enc, set, rows, None).unwrap();
    let grads = loss.backward().unwrap();
    let g = vars
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                grads.get(v.as_tensor()).expect("gradient").clone(),
            )
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), g)
}

/// Checks every trainable tensor's gradient is finite and non-zero, and three entries of each
/// adapter and LayerNorm tensor against central finite differences; returns the entries checked.
fn gradient_check(base: &BaseModel, task: &TaskModel) -> usize {
    let data = toy_data();
    let enc = base.tokenizer.encode_all(&data.train.inputs, 32).unwrap();
    let rows: Vec<usize> = (0..6).collect();

    let mut var_task = task.clone();
    let mut vars = Vec::new();
    for (name, t) in var_task.params.iter_mut() {
        let v = Var::from_tensor(t).unwrap();
        *t = v.as_tensor().clone();
        vars.push((name.clone(), v));
    }
    let loss = batch_loss(base, &var_task, &enc, &data.train, &rows, None).unwrap();
    let grads = loss.backward().unwrap();
    let loss_at = |t: &TaskModel| -> f64 {
        batch_loss(base, t, &enc, &data.train, &rows, None)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let mut checked = 0;
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let gv = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(
            gv.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(gv.iter().any(|&x| x != 0.0), "{name}: all-zero gradient");
        let is_adapter_or_ln = name.contains(".adapters.")
            || name.contains(".loras.")
            || name.contains("shared_parameters.")
            || name.contains("prefix_tuning.")
            || name.contains("LayerNorm");
        if !is_adapter_or_ln {
            continue;
        }
        let base_vals = task.params[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let n = base_vals.len();
        for &i in &[0, n / 2, n - 1] {
            let h = 1e-6;
            let perturbed = |delta: f64| {
                let mut vals = base_vals.clone();
                vals[i] += delta;
                let mut t = task.clone();
                let shape = task.params[name].shape().clone();
                t.params.insert(
                    name.clone(),
                    Tensor::from_vec(vals, shape, &base.device).unwrap(),
                );
                loss_at(&t)
            };
            let fd = (perturbed(h) - perturbed(-h)) / (2.0 * h);
            let tol = 1e-6 + 1e-4 * fd.abs().max(gv[i].abs());
            assert!(
                (fd - gv[i]).abs() <= tol,
                "{name}[{i}]: analytic {} vs finite difference {fd}",
                gv[i]
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn training_leaves_base_and_other_tasks_bit_identical_and_save_load_round_trips() {
    let base = tiny_base();
    let before = snapshot(&base);
    let data = toy_data();

    let mut first = adapter_task(&base, "first", 1e-3, 1);
    let report = adapterkit::train(&base, &mut first, &data, &quick_cfg(1), &mut |_| {}).unwrap();
    assert!(report.steps > 0);
    let first_preds = evaluate(&base, &first, &data.test, 16, &[])
        .unwrap()
        .outputs;

    for set in [
        TrainableSet::Adapters { layernorms: true },
        TrainableSet::Full,
        TrainableSet::TopK { k: 1 },
    ] {
        let a = matches!(set, TrainableSet::Adapters { .. }).then(|| adapters(1e-3));
        let mut other = TaskModel::new(&base, "second", set.clone(), a, head(), 32, 2).unwrap();
        let start = other.detached().params;
        adapterkit::train(&base, &mut other, &data, &quick_cfg(2), &mut |_| {}).unwrap();
        let moved = other
            .params
            .iter()
            .filter(|(k, v)| max_abs_diff(v, &start[*k]) > 0.0)
            .count();
        assert!(moved > 0, "{set:?}: training changed nothing");
        assert_eq!(
            snapshot(&base),
            before,
            "{set:?} training modified the base weights"
        );
        let again = evaluate(&base, &first, &data.test, 16, &[])
            .unwrap()
            .outputs;
        assert_eq!(
            bits(&again),
            bits(&first_preds),
            "{set:?} training changed another task's predictions"
        );
    }

    let dir = tmpdir("roundtrip");
    first.save(&dir, "tiny").unwrap();
    for f in [
        files::ADAPTER_CONFIG,
        files::ADAPTER_WEIGHTS,
        files::HEAD_CONFIG,
        files::HEAD_WEIGHTS,
        files::META,
        files::BASE_PARAMS,
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(files::ADAPTER_CONFIG)).unwrap())
            .unwrap();
    assert_eq!(cfg["config"]["mh_adapter"], true);
    assert_eq!(cfg["config"]["reduction_factor"], 4.0);
    let weights =
        candle_core::safetensors::load(dir.join(files::ADAPTER_WEIGHTS), &base.device).unwrap();
    assert!(weights.contains_key(
        "bert.encoder.layer.0.attention.output.adapters.first.adapter_down.0.weight"
    ));
    assert!(weights.contains_key("bert.encoder.layer.1.output.adapters.first.adapter_up.bias"));
    let loaded = TaskModel::load(&dir, &base).unwrap();
    let reloaded = evaluate(&base, &loaded, &data.test, 16, &[])
        .unwrap()
        .outputs;
    assert_eq!(bits(&reloaded), bits(&first_preds));
    // Skipping adapters of a layer changes predictions (the option is real).
    let skipped = evaluate(&base, &loaded, &data.test, 16, &[0, 1])
        .unwrap()
        .outputs;
    assert_ne!(bits(&skipped), bits(&first_preds));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let base = tiny_base();
    let data = toy_data();
    let run = |seed| {
        let mut t = adapter_task(&base, "d", 1e-3, 5);
        adapterkit::train(&base, &mut t, &data, &quick_cfg(seed), &mut |_| {}).unwrap();
        bits(&evaluate(&base, &t, &data.test, 16, &[]).unwrap().outputs)
    };
    assert_eq!(run(9), run(9));
    assert_ne!(run(9), run(10));
}

fn random_base(layers: usize, hidden: usize) -> BaseModel {
    let mut cfg: BertConfig =
        serde_json::from_str(&std::fs::read_to_string(tiny_dir().join("config.json")).unwrap())
            .unwrap();
    cfg.num_hidden_layers = layers;
    cfg.hidden_size = hidden;
    cfg.intermediate_size = hidden * 2;
    let tok = adapterkit::tokenizer::TextTokenizer::from_dir(&tiny_dir()).unwrap();
    BaseModel::random(cfg, tok, 11).unwrap()
}

#[test]
fn adapter_for_another_base_is_refused() {
    let base = tiny_base();
    let dir = tmpdir("otherbase");
    adapter_task(&base, "x", 1e-3, 1)
        .save(&dir, "tiny")
        .unwrap();
    for other in [random_base(3, 32), random_base(2, 48)] {
        let e = TaskModel::load(&dir, &other).unwrap_err();
        assert!(matches!(e, Error::Incompatible { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("does not fit") && msg.contains("layers"),
            "{msg}"
        );
    }
    // A mis-shaped adapter tensor is named with both shapes.
    let mut bad = adapter_task(&base, "x", 1e-3, 1);
    let key = param_name(0, Site::Ffn, "x", "up.weight");
    bad.set_param(
        &key,
        Tensor::zeros((32, 4), DType::F32, &base.device).unwrap(),
    )
    .unwrap();
    bad.save(&dir, "tiny").unwrap();
    let msg = TaskModel::load(&dir, &base).unwrap_err().to_string();
    assert!(
        msg.contains(&key) && msg.contains("[32, 4]") && msg.contains("[32, 8]"),
        "{msg}"
    );
    // An interrupted save (no metadata) does not load.
    std::fs::remove_file(dir.join(files::META)).unwrap();
    let msg = TaskModel::load(&dir, &base).unwrap_err().to_string();
    assert!(msg.contains(files::META), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_checkpoints_give_named_errors() {
    let src = tiny_dir();
    let dir = tmpdir("ckpt");
    std::fs::copy(src.join("vocab.txt"), dir.join("vocab.txt")).unwrap();

    // Missing required config key.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let msg = BaseModel::load(&dir).err().unwrap().to_string();
    assert!(
        msg.contains("config.json") && msg.contains("hidden_size"),
        "{msg}"
    );

    // Missing and mis-shaped tensors.
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    t.remove("encoder.layer.1.output.dense.weight");
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let msg = BaseModel::load(&dir).err().unwrap().to_string();
    assert!(
        msg.contains("missing tensor `encoder.layer.1.output.dense.weight`"),
        "{msg}"
    );
    t.insert(
        "encoder.layer.1.output.dense.weight".into(),
        Tensor::zeros((32, 32), DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let msg = BaseModel::load(&dir).err().unwrap().to_string();
    assert!(
        msg.contains("encoder.layer.1.output.dense.weight")
            && msg.contains("[32, 32]")
            && msg.contains("[32, 64]"),
        "{msg}"
    );

    // Garbage weights file and no weights at all.
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file").unwrap();
    let msg = BaseModel::load(&dir).err().unwrap().to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("cannot read tensors"),
        "{msg}"
    );
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let msg = BaseModel::load(&dir).err().unwrap().to_string();
    assert!(
        msg.contains("no model.safetensors or pytorch_model.bin"),
        "{msg}"
    );

    // Inputs longer than the position table.
    let base = tiny_base();
    let long = vec![5u32; 80];
    let batch = adapterkit::Batch::new(&[(&long, &vec![0u32; 80])], 0, &base.device).unwrap();
    let msg = base
        .encode(None, &batch, &mut ForwardOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("80 tokens exceed"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fast_and_reference_paths_agree_on_values_and_gradients() {
    let base = tiny_base();
    let data = toy_data();
    let enc = base.tokenizer.encode_all(&data.train.inputs, 32).unwrap();
    // Rows of different lengths, so padding and masks are exercised.
    let rows: Vec<usize> = (0..8).collect();
    let mut tasks: Vec<TaskModel> = [
        TrainableSet::Adapters { layernorms: true },
        TrainableSet::TopK { k: 1 },
        TrainableSet::Head,
    ]
    .into_iter()
    .map(|set| {
        let a = matches!(set, TrainableSet::Adapters { .. }).then(|| adapters(5e-2));
        TaskModel::new(&base, "f", set, a, head(), 32, 4).unwrap()
    })
    .collect();
    // Compacter: the fused adapter kernel's weight gradients flow on into the PHM tensors.
    tasks.push(compacter_cases(&base).swap_remove(0));
    // (IA)³: the frozen fused attention and FFN rescale q|k|v and the intermediate activations
    // and give the scales their gradients; prefix tuning: the prefixed fused attention.
    let mut lora = lora_cases(&base);
    tasks.push(lora.swap_remove(1));
    // LoRA on every projection: q|k|v and intermediate updates fused, the output projection's
    // composed.
    tasks.push(lora.swap_remove(0));
    // LoRA on q and v only: the whole FFN stays fused.
    tasks.push(lora_task(&base, "lqv", LoraConfig::lora(4, 8.0), 7));
    tasks.push(prefix_cases(&base).swap_remove(0));
    for task in tasks {
        let set = format!("{} {}", task.name, task.trainable.label());
        let run = |fast: bool| {
            let backend = if fast {
                adapterkit::Backend::Fused
            } else {
                adapterkit::Backend::Reference
            };
            loss_and_gradients(&base.with_backend(backend), &task, &enc, &data.train, &rows)
        };
        let (lf, gf) = run(true);
        let (lr, gr) = run(false);
        assert!(
            (lf - lr).abs() <= 1e-5 * lr.abs().max(1.0),
            "{set:?}: loss {lf} vs {lr}"
        );
        for ((name, a), (_, b)) in gf.iter().zip(&gr) {
            let scale = max_abs(b);
            let d = max_abs_diff(a, b);
            assert!(
                d <= 1e-4 * scale + 1e-7,
                "{set:?} {name}: gradient differs by {d} (scale {scale})"
            );
        }
    }
}

/// Training in fp16 precision (the frozen projections' forward and input-gradient products in
/// fp16 with f32 sums) gives nearly f32's loss and gradients, and really runs in fp16.
#[test]
fn fp16_precision_gives_nearly_the_f32_loss_and_gradients() {
    let base = tiny_base();
    let half = match base.with_precision(adapterkit::Precision::F16) {
        Ok(half) => half,
        Err(e) => {
            assert!(!adapterkit::kernels::half::available(), "{e}");
            return;
        }
    };
    assert_eq!(half.precision(), adapterkit::Precision::F16);
    assert_eq!(base.precision(), adapterkit::Precision::F32);
    let data = toy_data();
    let enc = base.tokenizer.encode_all(&data.train.inputs, 32).unwrap();
    let rows: Vec<usize> = (0..8).collect();
    let mut tasks = vec![TaskModel::new(
        &base,
        "f",
        TrainableSet::Adapters { layernorms: true },
        Some(adapters(5e-2)),
        head(),
        32,
        4,
    )
    .unwrap()];
    // LoRA on q and v: q|k|v is the task's own (f32), the rest stays frozen in fp16.
    tasks.push(lora_task(&base, "lqv", LoraConfig::lora(4, 8.0), 7));
    for task in tasks {
        let run = |base: &BaseModel| loss_and_gradients(base, &task, &enc, &data.train, &rows);
        let (l32, g32) = run(&base);
        let (l16, g16) = run(&half);
        assert!(
            (l16 - l32).abs() <= 1e-2 * l32.abs().max(1.0),
            "{}: loss {l16} against {l32}",
            task.name
        );
        let mut largest = 0f32;
        for ((name, a), (_, b)) in g16.iter().zip(&g32) {
            let scale = max_abs(b);
            let d = max_abs_diff(a, b);
            largest = largest.max(d / scale.max(1e-12));
            // fp16 keeps 11 bits: a few ulps of fp16 per 32-term sum, through a few layers.
            assert!(
                d <= 3e-2 * scale + 1e-7,
                "{} {name}: gradient differs by {d} (scale {scale})",
                task.name
            );
        }
        // The f32 path is deterministic, so any difference is fp16's rounding: none at all would
        // mean the fp16 products never ran.
        assert!(
            largest > 1e-5,
            "{}: fp16 gradients equal f32's ({largest})",
            task.name
        );
    }
}

#[test]
fn init_schemes_draw_what_adapterhub_draws() {
    use adapterkit::adapter::{Init, Part};
    let base = random_base(2, 256);
    let stats = |init: Init, part: Part| -> (f64, f64, f64) {
        let cfg = AdapterConfig {
            bottleneck: 64,
            init,
            ..AdapterConfig::default()
        };
        let name = cfg.param_name(1, Site::Ffn, "i", part);
        let task = TaskModel::new(
            &base,
            "i",
            TrainableSet::Adapters { layernorms: false },
            Some(cfg),
            head(),
            32,
            5,
        )
        .unwrap();
        let v = task.params[&name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let max = v.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
        (mean, std, max)
    };
    // bert: normal, std 0.02, untruncated (16384 draws reach beyond 2 std).
    let (_, std, max) = stats(Init::Bert, Part::DownWeight);
    assert!((std - 0.02).abs() < 0.001 && max > 0.04, "{std} {max}");
    // houlsby: truncated at ±2e-2 (std of a ±2σ-truncated normal is 0.88σ).
    let (_, std, max) = stats(Init::Houlsby, Part::UpWeight);
    assert!(max <= 0.02 && (std - 0.0088).abs() < 0.0005, "{std} {max}");
    // mam_adapter: Kaiming-uniform down (bound 1/sqrt(256)), zero up: an exact identity at start.
    let (_, std, max) = stats(Init::MamAdapter, Part::DownWeight);
    let bound = 1.0 / 16.0;
    assert!(
        max <= bound && (std - bound / 3f64.sqrt()).abs() < 0.002,
        "{std} {max}"
    );
    assert_eq!(stats(Init::MamAdapter, Part::UpWeight), (0.0, 0.0, 0.0));
    // Ours: truncated normal with init_std (1e-3).
    let (_, std, max) = stats(Init::TruncatedNormal, Part::DownWeight);
    assert!(
        max <= 2e-3 && (std - 0.00088).abs() < 0.00005,
        "{std} {max}"
    );
}

#[test]
fn frozen_prefix_cache_gives_the_same_loss_and_gradients() {
    use adapterkit::train::{batch_loss_from, PrefixCache, TrainForward};
    let base = tiny_base();
    let layers = base.config.num_hidden_layers;
    let make = |trainable: TrainableSet, adapter: Option<AdapterConfig>| {
        TaskModel::new(&base, "p", trainable, adapter, head(), 32, 4).unwrap()
    };
    let upper = AdapterConfig {
        leave_out: vec![0],
        ..adapters(5e-2)
    };
    let frozen_ln = TrainableSet::Adapters { layernorms: false };
    assert_eq!(
        make(frozen_ln.clone(), Some(upper.clone())).frozen_prefix_layers(layers),
        1
    );
    assert_eq!(
        make(frozen_ln.clone(), Some(adapters(1e-3))).frozen_prefix_layers(layers),
        0
    );
    let with_ln = TrainableSet::Adapters { layernorms: true };
    assert_eq!(
        make(with_ln, Some(upper.clone())).frozen_prefix_layers(layers),
        0
    );
    assert_eq!(
        make(TrainableSet::Head, None).frozen_prefix_layers(layers),
        layers
    );
    assert_eq!(
        make(TrainableSet::TopK { k: 1 }, None).frozen_prefix_layers(layers),
        1
    );
    assert_eq!(
        make(TrainableSet::Full, None).frozen_prefix_layers(layers),
        0
    );

    let data = toy_data();
    let enc = base.tokenizer.encode_all(&data.train.inputs, 32).unwrap();
    let rows: Vec<usize> = (0..8).collect();
    for (trainable, adapter) in [
        (frozen_ln.clone(), Some(upper.clone())),
        (TrainableSet::Head, None),
    ] {
        let task = make(trainable, adapter);
        let k = task.frozen_prefix_layers(layers);
        let cache = PrefixCache::build(&base, &task, &enc, k, 3).unwrap();
        let mut var_task = task.clone();
        let mut vars = Vec::new();
        for (name, t) in var_task.params.iter_mut() {
            let v = Var::from_tensor(t).unwrap();
            *t = v.as_tensor().clone();
            vars.push((name.clone(), v));
        }
        let plain = batch_loss(&base, &var_task, &enc, &data.train, &rows, None).unwrap();
        let from_cache = TrainForward {
            cache: Some(&cache),
            ..TrainForward::default()
        };
        let cached =
            batch_loss_from(&base, &var_task, &enc, &data.train, &rows, from_cache).unwrap();
        let (a, b) = (
            plain.to_scalar::<f32>().unwrap(),
            cached.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "k={k}: {a} vs {b}");
        let (ga, gb) = (plain.backward().unwrap(), cached.backward().unwrap());
        for (name, v) in &vars {
            let d = max_abs_diff(
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-5, "k={k} {name}: gradient differs by {d}");
        }
    }
    // Training with the cache runs end to end and keeps the base untouched.
    let mut task = make(frozen_ln, Some(upper));
    let cfg = TrainConfig {
        cache_frozen_prefix: true,
        ..quick_cfg(1)
    };
    let report = adapterkit::train(&base, &mut task, &data, &cfg, &mut |_| {}).unwrap();
    assert!(report.best_dev.primary() >= 0.0);
}

#[test]
fn saving_over_another_task_leaves_none_of_its_files() {
    let base = tiny_base();
    let dir = tmpdir("overwrite");
    adapter_task(&base, "x", 1e-3, 1)
        .save(&dir, "tiny")
        .unwrap();
    std::fs::write(dir.join("pytorch_adapter.bin"), b"stale").unwrap();
    assert!(dir.join(files::ADAPTER_CONFIG).exists() && dir.join(files::BASE_PARAMS).exists());
    let head_only = TaskModel::new(&base, "x", TrainableSet::Head, None, head(), 32, 2).unwrap();
    head_only.save(&dir, "tiny").unwrap();
    for f in [
        files::ADAPTER_CONFIG,
        files::ADAPTER_WEIGHTS,
        files::BASE_PARAMS,
        "pytorch_adapter.bin",
    ] {
        assert!(!dir.join(f).exists(), "{f} survived");
    }
    let back = TaskModel::load(&dir, &base).unwrap();
    assert!(back.adapter.is_none() && back.trainable == TrainableSet::Head);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_batch_mixing_adapters_gives_each_row_what_it_gets_alone() {
    let base = tiny_base();
    // Four tasks that share the encoder: Houlsby adapters with LayerNorms, Pfeiffer adapters
    // with an AdapterHub arrangement, parallel adapters, and a head-only probe. Large inits so that the tasks'
    // outputs differ by far more than the tolerance.
    let houlsby = adapter_task(&base, "houlsby", 0.3, 1);
    let pfeiffer = TaskModel::new(
        &base,
        "pfeiffer",
        TrainableSet::Adapters { layernorms: false },
        Some(AdapterConfig {
            placement: Placement::Pfeiffer,
            bottleneck: 4,
            ln_after: true,
            init_std: 0.3,
            ..AdapterConfig::default()
        }),
        HeadConfig::classification(vec!["a".into(), "b".into(), "c".into()]),
        32,
        2,
    )
    .unwrap();
    let probe = TaskModel::new(&base, "probe", TrainableSet::Head, None, head(), 32, 3).unwrap();
    let parallel = TaskModel::new(
        &base,
        "parallel",
        TrainableSet::Adapters { layernorms: true },
        Some(AdapterConfig {
            placement: Placement::Houlsby,
            init: adapterkit::adapter::Init::TruncatedNormal,
            init_std: 0.3,
            ..AdapterConfig::parallel(6, adapterkit::adapter::Scaling::Channel)
        }),
        head(),
        32,
        5,
    )
    .unwrap();
    let texts = [
        "the movie was good",
        "bad",
        "this film is very boring and the plot and acting was awful",
        "fun",
        "it was great great great",
        "hate it",
        "love",
    ];
    let inputs: Vec<(String, Option<String>)> =
        texts.iter().map(|t| (t.to_string(), None)).collect();
    let encoded = base.tokenizer.encode_all(&inputs, 32).unwrap();
    let tasks = [
        &houlsby, &pfeiffer, &parallel, &probe, &pfeiffer, &probe, &parallel,
    ];
    let rows: Vec<_> = tasks.iter().zip(&encoded).map(|(t, e)| (*t, e)).collect();
    for backend in [adapterkit::Backend::Fused, adapterkit::Backend::Reference] {
        let base = base.clone().with_backend(backend);
        for probabilities in [false, true] {
            let mixed = base.predict_mixed(&rows, probabilities).unwrap();
            assert_eq!(mixed.len(), rows.len());
            for (i, (task, e)) in rows.iter().enumerate() {
                let one = std::slice::from_ref(*e);
                let alone = if probabilities {
                    base.predict_encoded(task, one, 1, &[]).unwrap()
                } else {
                    base.logits_encoded(task, one, 1, &[]).unwrap()
                };
                assert_eq!(mixed[i].len(), alone[0].len(), "row {i}: output width");
                let d = mixed[i]
                    .iter()
                    .zip(&alone[0])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    d <= 1e-6,
                    "{backend:?}: row {i} ({}) differs by {d}",
                    task.name
                );
            }
        }
    }
    // Routed to another task, a row would differ far above the tolerance: the check can fail.
    let a = base
        .logits_encoded(&houlsby, &encoded[..1], 1, &[])
        .unwrap();
    let b = base.logits_encoded(&probe, &encoded[..1], 1, &[]).unwrap();
    let d = a[0]
        .iter()
        .zip(&b[0])
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(d > 1e-2, "houlsby and probe agree to {d}");
    // A task with its own copy of encoder weights cannot share a batch with the others.
    let top = TaskModel::new(
        &base,
        "top",
        TrainableSet::TopK { k: 1 },
        None,
        head(),
        32,
        4,
    )
    .unwrap();
    let rows = vec![(&houlsby, &encoded[0]), (&top, &encoded[1])];
    let msg = base.predict_mixed(&rows, true).unwrap_err().to_string();
    assert!(msg.contains("top"), "{msg}");
}

#[test]
fn a_directory_states_each_configuration_once_and_refuses_a_mix_of_runs() {
    let base = tiny_base();
    let root = tmpdir("mix");
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    let mut a = adapter_task(&base, "a", 1e-3, 1);
    a.head.pair = true;
    a.save(&a_dir, "tiny").unwrap();
    let b = TaskModel::new(&base, "b", TrainableSet::Head, None, head(), 32, 2).unwrap();
    b.save(&b_dir, "tiny").unwrap();
    // The adapter and head configurations are in AdapterHub's files only.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a_dir.join(files::META)).unwrap()).unwrap();
    assert!(
        meta.get("adapter").is_none() && meta.get("head").is_none(),
        "{meta}"
    );
    // What those files cannot say comes back from ours: the init and the text-pair flag.
    let back = TaskModel::load(&a_dir, &base).unwrap();
    assert_eq!(back.adapter, a.adapter);
    assert_eq!(back.head, a.head);
    // Another run's metadata beside this run's AdapterHub files is refused, naming both.
    let mixed = root.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    for f in std::fs::read_dir(&a_dir).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, mixed.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::copy(b_dir.join(files::META), mixed.join(files::META)).unwrap();
    let msg = TaskModel::load(&mixed, &base).unwrap_err().to_string();
    assert!(
        msg.contains(files::META) && msg.contains("disagree") && msg.contains("mixes"),
        "{msg}"
    );
    // Another run's head config (another task's name) is refused too.
    std::fs::copy(a_dir.join(files::META), mixed.join(files::META)).unwrap();
    std::fs::copy(
        b_dir.join(files::HEAD_CONFIG),
        mixed.join(files::HEAD_CONFIG),
    )
    .unwrap();
    let msg = TaskModel::load(&mixed, &base).unwrap_err().to_string();
    assert!(
        msg.contains(files::HEAD_CONFIG) && msg.contains("`b`"),
        "{msg}"
    );
    // Format 1 kept second copies of both configurations: still read, and they must agree.
    std::fs::copy(
        a_dir.join(files::HEAD_CONFIG),
        mixed.join(files::HEAD_CONFIG),
    )
    .unwrap();
    let mut v1 = meta.clone();
    v1["format"] = serde_json::json!(1);
    v1.as_object_mut().unwrap().remove("adapter_init");
    v1.as_object_mut().unwrap().remove("pair");
    v1["adapter"] = serde_json::to_value(&a.adapter).unwrap();
    v1["head"] = serde_json::to_value(&a.head).unwrap();
    std::fs::write(mixed.join(files::META), v1.to_string()).unwrap();
    let old = TaskModel::load(&mixed, &base).unwrap();
    assert_eq!((old.adapter, old.head), (a.adapter.clone(), a.head.clone()));
    let mut other = a.adapter.clone().unwrap();
    other.ln_after = true;
    v1["adapter"] = serde_json::to_value(&other).unwrap();
    std::fs::write(mixed.join(files::META), v1.to_string()).unwrap();
    let msg = TaskModel::load(&mixed, &base).unwrap_err().to_string();
    assert!(
        msg.contains(files::ADAPTER_CONFIG) && msg.contains("disagree"),
        "{msg}"
    );
    // Unknown keys in our metadata are refused by name.
    let mut extra = meta.clone();
    extra["frobnicate"] = serde_json::json!(1);
    std::fs::write(mixed.join(files::META), extra.to_string()).unwrap();
    let msg = TaskModel::load(&mixed, &base).unwrap_err().to_string();
    assert!(
        msg.contains("frobnicate") && msg.contains(files::META),
        "{msg}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// The base with every weight held as a tensor: every product packs W per call again.
fn without_packing(base: &BaseModel) -> BaseModel {
    let mut b = base.clone();
    b.weights = b.weights.unpacked().unwrap();
    assert_eq!(b.weights.packed_bytes(), 0);
    b
}

/// Whether two runs' outputs agree to float rounding: the panels always take our tile, while a
/// product of W held as a tensor takes the `gemm` crate below the tile's minimum volume (AVX2),
/// which sums in another order.
fn close(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    let (a, b): (Vec<f32>, Vec<f32>) = (a.concat(), b.concat());
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
}

#[test]
fn weights_held_as_panels_give_the_forward_and_training_of_tensors() {
    // 64 wide, 256-row batches: the products take our blocked GEMM, which reads the packed
    // panels where the base has them (CPUs without AVX2 pack nothing and run the same code).
    let packed = random_base(2, 64);
    let plain = without_packing(&packed);
    let data = toy_data();
    if adapterkit::kernels::blocked::enabled() {
        // qkv [192, 64], attention output [64, 64], FFN [128, 64] and [64, 128], per layer,
        // packed at load and held only as panels.
        let floats = 2 * (192 * 64 + 64 * 64 + 128 * 64 + 64 * 128);
        assert_eq!(packed.weights.packed_bytes(), 4 * floats);
        let l = &packed.weights.layers[1];
        for lin in [
            &l.attention.query,
            &l.attention.value,
            &l.attention_output.dense,
            &l.intermediate.dense,
            &l.output.dense,
        ] {
            assert!(
                lin.weight.as_tensor().is_none(),
                "{}",
                lin.weight.key.name()
            );
            assert_eq!(lin.weight.tensor().unwrap().dims(), lin.weight.dims());
        }
    }
    // Full fine-tuning trains its own copy of every weight, unpacked from the panels.
    let full = |b: &BaseModel| {
        let mut t = TaskModel::new(b, "full", TrainableSet::Full, None, head(), 32, 2).unwrap();
        adapterkit::train(b, &mut t, &data, &quick_cfg(1), &mut |_| {}).unwrap();
        evaluate(b, &t, &data.test, 16, &[]).unwrap().outputs
    };
    assert!(close(&full(&packed), &full(&plain)), "full fine-tuning");
    let enc = packed.tokenizer.encode_all(&data.test.inputs, 32).unwrap();
    let rows: Vec<usize> = (0..8).collect();
    let batch = Batch::select(&enc, &rows, 0, &packed.device).unwrap();
    let encode = |b: &BaseModel| {
        let h = b
            .encode(None, &batch, &mut ForwardOptions::default())
            .unwrap();
        vec![h.flatten_all().unwrap().to_vec1::<f32>().unwrap()]
    };
    assert!(close(&encode(&packed), &encode(&plain)), "forward");
    let trained = |b: &BaseModel| {
        let mut t = adapter_task(b, "p", 1e-3, 4);
        adapterkit::train(b, &mut t, &data, &quick_cfg(3), &mut |_| {}).unwrap();
        evaluate(b, &t, &data.test, 16, &[]).unwrap().outputs
    };
    assert!(
        close(&trained(&packed), &trained(&plain)),
        "adapter training"
    );
}

#[test]
fn a_backward_through_layer_cuts_gives_the_gradients_of_one_backward() {
    use adapterkit::encoder::LayerCuts;
    use adapterkit::rng::Rng;
    use adapterkit::train::{batch_loss_from, TrainForward};
    // Four layers, so that the gradient crosses several cuts in turn.
    let tiny = tiny_base();
    let config = adapterkit::BertConfig {
        num_hidden_layers: 4,
        ..tiny.config.clone()
    };
    let base = BaseModel::random(config, tiny.tokenizer.clone(), 3).unwrap();
    let layers = base.config.num_hidden_layers;
    let data = toy_data();
    let enc = base.tokenizer.encode_all(&data.train.inputs, 32).unwrap();
    let rows: Vec<usize> = (0..6).collect();
    let plain = |set: TrainableSet, adapter: Option<AdapterConfig>| {
        TaskModel::new(&base, "c", set, adapter, head(), 32, 9).unwrap()
    };
    // (task, cuts expected): every layer input depends on something trained, except below the
    // top layer of a top-1 task, where nothing is trained and no cut is made.
    let mut cases = vec![
        (
            plain(
                TrainableSet::Adapters { layernorms: true },
                Some(adapters(5e-2)),
            ),
            layers - 1,
        ),
        (plain(TrainableSet::Full, None), layers - 1),
        (plain(TrainableSet::TopK { k: 1 }, None), 0),
    ];
    // Tensors shared by every layer (Compacter's shared rules, the prefix MLP) take a gradient
    // from each layer's part of the backward.
    cases.extend(lora_cases(&base).into_iter().map(|t| (t, layers - 1)));
    cases.extend(compacter_cases(&base).into_iter().map(|t| (t, layers - 1)));
    cases.extend(prefix_cases(&base).into_iter().map(|t| (t, layers - 1)));
    for (task, expected_cuts) in cases {
        let mut var_task = task.clone();
        let mut vars = Vec::new();
        for (name, t) in var_task.params.iter_mut() {
            let v = Var::from_tensor(t).unwrap();
            *t = v.as_tensor().clone();
            vars.push((name.clone(), v));
        }
        // Dropout on, drawn the same on both sides.
        let (mut r1, mut r2) = (Rng::new(5), Rng::new(5));
        let one = TrainForward {
            rng: Some(&mut r1),
            ..TrainForward::default()
        };
        let whole = batch_loss_from(&base, &var_task, &enc, &data.train, &rows, one)
            .unwrap()
            .backward()
            .unwrap();
        let mut cuts = LayerCuts::default();
        let cut = TrainForward {
            rng: Some(&mut r2),
            cuts: Some(&mut cuts),
            ..TrainForward::default()
        };
        let loss = batch_loss_from(&base, &var_task, &enc, &data.train, &rows, cut).unwrap();
        assert_eq!(cuts.len(), expected_cuts, "{}: cuts", task.name);
        let by_layer = cuts.backward(loss).unwrap();
        let mut compared = 0;
        for (name, v) in &vars {
            let (a, b) = (whole.get(v.as_tensor()), by_layer.get(v.as_tensor()));
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (None, None) => continue,
                _ => panic!("{} {name}: a gradient on one side only", task.name),
            };
            let scale = a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_abs_diff(a, b);
            assert!(
                d <= 1e-5 * scale.max(1e-3),
                "{} {name}: gradients differ by {d} (largest {scale})",
                task.name
            );
            assert!(
                !b.track_op(),
                "{} {name}: gradient keeps a graph",
                task.name
            );
            compared += 1;
        }
        assert!(compared > 0, "{}: no gradient compared", task.name);
    }
}
