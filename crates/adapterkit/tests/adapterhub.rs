//! AdapterHub interoperability against golden fixtures from the Python `adapters` library
//! (tools/fixtures/make_adapterhub_fixtures.py): its saved directories load here and give its logits.

mod common;

use adapterkit::adapter::lora::{Composition, LoraInit, Projection};
use adapterkit::adapter::{Placement, Residual, Scaling};
use adapterkit::task::files;
use adapterkit::{BaseModel, Batch, Error, ForwardOptions, HeadKind, TaskModel};
use candle_core::Tensor;
use common::{fixtures, max_abs_diff, tiny_base};
use std::path::{Path, PathBuf};

const CASES: &[&str] = &[
    "houlsby_safetensors",
    "houlsby_bin",
    "pfeiffer_regression",
    "pfeiffer_regression_bin",
    "lns_learned_scaling",
    "post_add_attention_only",
    "channel_scaling",
    "parallel",
    "parallel_channel_lns",
    "lora_qv",
    "lora_all",
    "ia3",
    "compacter",
    "compacter_pp_local_rules",
    "compacter_shared_w",
    "prefix_mlp",
    "prefix_flat",
    "prefix_ejected",
];

fn case_dir(name: &str) -> PathBuf {
    fixtures().join("adapterhub").join(name)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("adapterkit-hub-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The fixture's inputs as a batch, and the Python logits.
fn expected(dir: &Path, base: &BaseModel) -> (Batch, Tensor) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let rows: Vec<Vec<u32>> = v["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(v["attention_mask"].as_array().unwrap())
        .map(|(ids, mask)| {
            ids.as_array()
                .unwrap()
                .iter()
                .zip(mask.as_array().unwrap())
                .filter(|(_, m)| m.as_u64() == Some(1))
                .map(|(t, _)| t.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let types: Vec<Vec<u32>> = rows.iter().map(|r| vec![0; r.len()]).collect();
    let pairs: Vec<(&[u32], &[u32])> = rows
        .iter()
        .zip(&types)
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let batch = Batch::new(&pairs, 0, &base.device).unwrap();
    let logits: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
    (batch, Tensor::new(logits, &base.device).unwrap())
}

fn logits(base: &BaseModel, task: &TaskModel, batch: &Batch, skip: &[usize]) -> Tensor {
    let mut opts = ForwardOptions {
        skip_adapter_layers: skip,
        ..ForwardOptions::default()
    };
    base.logits(task, batch, &mut opts).unwrap()
}

#[test]
fn adapterhub_directories_give_pythons_logits() {
    let base = tiny_base();
    for &case in CASES {
        let dir = case_dir(case);
        let task = TaskModel::load(&dir, &base).unwrap_or_else(|e| panic!("{case}: {e}"));
        let (batch, want) = expected(&dir, &base);
        let got = logits(&base, &task, &batch, &[]);
        let diff = max_abs_diff(&got, &want);
        println!("{case}: max abs diff {diff:.2e}");
        assert!(diff < 1e-5, "{case}: max abs diff {diff}");
        // The adapters matter: without them the logits move well beyond the tolerance.
        let bare = if task.lora.is_some() || task.prefix.is_some() {
            let mut bare = task.clone();
            bare.lora = None;
            bare.prefix = None;
            bare.unmerge();
            logits(&base, &bare, &batch, &[])
        } else {
            logits(&base, &task, &batch, &[0, 1])
        };
        assert!(
            max_abs_diff(&bare, &want) > 1e-3,
            "{case}: adapters had no effect"
        );
    }
}

#[test]
fn adapterhub_configs_are_read_as_written() {
    let base = tiny_base();
    let load = |c: &str| TaskModel::load(&case_dir(c), &base).unwrap();
    let h = load("houlsby_safetensors");
    let a = h.adapter.as_ref().unwrap();
    assert_eq!(a.placement, Placement::Houlsby);
    assert_eq!(a.bottleneck, 8);
    assert_eq!(a.nonlinearity.name(), "swish");
    assert_eq!(h.head.labels, ["neg", "neu", "pos"]);
    assert_eq!(h.name, "houlsby_safetensors");

    let p = load("pfeiffer_regression");
    let a = p.adapter.as_ref().unwrap();
    assert_eq!(a.placement, Placement::Pfeiffer);
    assert!(a.original_ln_before && a.original_ln_after);
    assert_eq!((a.bottleneck_at(0), a.bottleneck_at(1)), (8, 4));
    assert_eq!(p.head.kind, HeadKind::Regression);
    assert_eq!(p.head.pooling, adapterkit::Pooling::Pooler);

    let l = load("lns_learned_scaling");
    let a = l.adapter.as_ref().unwrap();
    assert!(a.ln_before && a.ln_after && a.adapter_residual_before_ln);
    assert_eq!(a.residual, Residual::AdapterInput);
    assert_eq!(a.scaling, Scaling::Learned);
    assert_eq!(a.leave_out, [0]);
    assert_eq!(l.head.layers, 3);

    let q = load("post_add_attention_only");
    let a = q.adapter.as_ref().unwrap();
    assert_eq!(a.placement, Placement::Attention);
    assert_eq!(a.residual, Residual::PostAdd);
    assert_eq!(a.scaling, Scaling::Fixed(0.5));
    assert!(q.head.activation.is_none());

    let c = load("channel_scaling");
    let a = c.adapter.as_ref().unwrap();
    assert_eq!(a.scaling, Scaling::Channel);
    assert_eq!(a.bottleneck, 12); // int(32 // 2.5)
    assert!(!c.head.bias);

    let par = load("parallel");
    let a = par.adapter.as_ref().unwrap();
    assert!(a.parallel && a.original_ln_after);
    assert_eq!(a.placement, Placement::Pfeiffer);
    assert_eq!(a.scaling, Scaling::Fixed(4.0));
    assert_eq!(a.bottleneck, 8);
    assert_eq!(a.nonlinearity.name(), "relu");

    let lq = load("lora_qv");
    let l = lq.lora.as_ref().unwrap();
    assert_eq!(l.targets, [Projection::Query, Projection::Value]);
    assert_eq!((l.r, l.alpha, l.composition), (4, 8.0, Composition::Add));
    assert!(lq.adapter.is_none() && lq.is_merged() && !lq.shares_encoder());
    let la = load("lora_all");
    let l = la.lora.as_ref().unwrap();
    assert_eq!(l.targets.len(), 5);
    assert_eq!(l.leave_out, [0]);
    let ia = load("ia3");
    let l = ia.lora.as_ref().unwrap();
    assert_eq!(
        l.targets,
        [Projection::Key, Projection::Value, Projection::Intermediate]
    );
    assert_eq!(
        (l.r, l.composition, l.init),
        (1, Composition::Scale, LoraInit::Ia3)
    );

    let c = load("compacter");
    let a = c.adapter.as_ref().unwrap();
    let p = a.phm.as_ref().unwrap();
    assert_eq!(a.placement, Placement::Houlsby);
    assert_eq!((a.bottleneck, p.phm_dim, p.phm_rank), (8, 4, 1));
    assert!(p.shared_phm_rule && p.factorized_phm_w && !p.shared_w_phm && p.phm_bias);
    assert!(c.is_merged() && c.shares_encoder());
    let c = load("compacter_pp_local_rules");
    let a = c.adapter.as_ref().unwrap();
    let p = a.phm.as_ref().unwrap();
    assert_eq!(a.placement, Placement::Pfeiffer);
    assert!(a.original_ln_before);
    assert_eq!(p.phm_dim, 2);
    assert!(!p.shared_phm_rule && p.factorized_phm_rule && !p.factorized_phm_w && !p.phm_bias);
    let c = load("compacter_shared_w");
    let a = c.adapter.as_ref().unwrap();
    let p = a.phm.as_ref().unwrap();
    assert!(p.shared_w_phm && a.ln_before);
    assert_eq!((a.bottleneck, p.phm_rank), (4, 2));

    let pm = load("prefix_mlp");
    let p = pm.prefix.as_ref().unwrap();
    assert_eq!((p.prefix_length, p.bottleneck_size, p.flat), (4, 6, false));
    assert!(pm.is_merged() && !pm.shares_encoder() && pm.adapter.is_none());
    // Saved after `eject_prefix_tuning`: the config says MLP, the tensors are flat.
    let pe = load("prefix_ejected");
    assert!(pe.prefix.as_ref().unwrap().flat);
    let pf = load("prefix_flat");
    let p = pf.prefix.as_ref().unwrap();
    assert!(p.flat && p.leave_out == [0] && p.prefix_length == 3);

    let pc = load("parallel_channel_lns");
    let a = pc.adapter.as_ref().unwrap();
    assert!(a.parallel && a.ln_after && !a.original_ln_after);
    assert_eq!(a.placement, Placement::Houlsby);
    assert_eq!(a.scaling, Scaling::Channel);
}

#[test]
fn adapterhub_tasks_round_trip_through_our_format() {
    let base = tiny_base();
    for &case in CASES {
        let task = TaskModel::load(&case_dir(case), &base).unwrap();
        let (batch, _) = expected(&case_dir(case), &base);
        let before = logits(&base, &task, &batch, &[]);
        let dir = tmpdir(case);
        task.save(&dir, "tiny-bert").unwrap();
        // Ours: through adapterkit.json.
        let again = TaskModel::load(&dir, &base).unwrap();
        assert_eq!(again.adapter, task.adapter, "{case}");
        assert_eq!(again.lora, task.lora, "{case}");
        assert_eq!(again.prefix, task.prefix, "{case}");
        assert_eq!(
            max_abs_diff(&logits(&base, &again, &batch, &[]), &before),
            0.0
        );
        // What the Python library would read: only its own files, as it writes them.
        std::fs::remove_file(dir.join(files::META)).unwrap();
        let hub = TaskModel::load(&dir, &base).unwrap();
        assert_eq!(hub.adapter, task.adapter, "{case}");
        assert_eq!(hub.lora, task.lora, "{case}");
        assert_eq!(hub.prefix, task.prefix, "{case}");
        assert_eq!(hub.head, task.head, "{case}");
        assert_eq!(
            max_abs_diff(&logits(&base, &hub, &batch, &[]), &before),
            0.0
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Loads `case` after `edit` changed its adapter_config.json; returns the error text.
fn edited_error(case: &str, tag: &str, edit: impl Fn(&mut serde_json::Value)) -> String {
    let base = tiny_base();
    let dir = tmpdir(tag);
    copy_dir(&case_dir(case), &dir);
    let path = dir.join(files::ADAPTER_CONFIG);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
    let e = TaskModel::load(&dir, &base).expect_err(tag);
    std::fs::remove_dir_all(&dir).unwrap();
    e.to_string()
}

#[test]
fn unsupported_adapterhub_options_are_named() {
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("use_gating", serde_json::json!(true), "true"),
        ("inv_adapter", serde_json::json!("nice"), "nice"),
        ("architecture", serde_json::json!("lora"), "lora"),
        ("non_linearity", serde_json::json!("softplus"), "softplus"),
        (
            "residual_before_ln",
            serde_json::json!("sideways"),
            "sideways",
        ),
        ("scaling", serde_json::json!("wild"), "wild"),
        ("init_weights", serde_json::json!("xavier"), "xavier"),
        ("stochastic_depth", serde_json::json!(0.1), "0.1"),
        ("reduction_factor", serde_json::json!({"7": 2}), "7"),
        ("frobnicate", serde_json::json!(1), "frobnicate"),
    ];
    for (key, value, shown) in cases {
        let msg = edited_error("houlsby_safetensors", key, |v| {
            v["config"][*key] = value.clone();
        });
        assert!(
            msg.contains(key) && msg.contains(shown) && msg.contains("adapter_config.json"),
            "{key}: {msg}"
        );
    }
    // A required key that is missing.
    let msg = edited_error("houlsby_safetensors", "missing", |v| {
        v["config"]
            .as_object_mut()
            .unwrap()
            .remove("reduction_factor");
    });
    assert!(
        msg.contains("reduction_factor") && msg.contains("missing"),
        "{msg}"
    );
    // post_add without the original LayerNorm before the adapter is meaningless.
    let msg = edited_error("post_add_attention_only", "post_add", |v| {
        v["config"]["original_ln_before"] = serde_json::json!(false);
    });
    assert!(
        msg.contains("post_add") && msg.contains("original_ln_before"),
        "{msg}"
    );
}

#[test]
fn unsupported_phm_options_are_named() {
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("learn_phm", serde_json::json!(false), "frozen PHM"),
        ("phm_dim", serde_json::json!(3), "does not divide"),
        ("phm_dim", serde_json::json!(0), "≥ 1"),
        ("phm_rank", serde_json::json!(0), "≥ 1"),
        ("phm_c_init", serde_json::json!("xavier"), "xavier"),
        (
            "hypercomplex_nonlinearity",
            serde_json::json!("tanh"),
            "tanh",
        ),
        (
            "init_weights",
            serde_json::json!("mam_adapter"),
            "PHM layer",
        ),
        (
            "factorized_phm_W",
            serde_json::json!("yes"),
            "true or false",
        ),
        ("phm_init_range", serde_json::json!(-1), "≥ 0"),
    ];
    for (key, value, shown) in cases {
        let msg = edited_error("compacter", key, |v| {
            v["config"][*key] = value.clone();
        });
        assert!(
            msg.contains(key) && msg.contains(shown) && msg.contains("adapter_config.json"),
            "{key}: {msg}"
        );
    }
    // Shared weights must be factorised (AdapterHub itself fails otherwise).
    let msg = edited_error("compacter_shared_w", "shared-unfactorised", |v| {
        v["config"]["factorized_phm_W"] = serde_json::json!(false);
    });
    assert!(msg.contains("shared_W_phm"), "{msg}");
    // Turning PHM off leaves PHM tensors the plain config does not account for.
    let msg = edited_error("compacter", "phm-off", |v| {
        v["config"]["phm_layer"] = serde_json::json!(false);
    });
    assert!(msg.contains("adapter_down.0.weight"), "{msg}");
}

#[test]
fn unsupported_prefix_options_are_named() {
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("use_gating", serde_json::json!(true), "gated"),
        ("dropout", serde_json::json!(0.1), "prefix dropout"),
        (
            "encoder_prefix",
            serde_json::json!(false),
            "nothing would be adapted",
        ),
        ("non_linearity", serde_json::json!("softplus"), "softplus"),
        ("prefix_length", serde_json::json!(0), "prefix_length"),
        ("leave_out", serde_json::json!([0, 1]), "every layer"),
        (
            "prefix_frobnicate",
            serde_json::json!(1),
            "prefix_frobnicate",
        ),
    ];
    for (key, value, shown) in cases {
        let msg = edited_error("prefix_mlp", key, |v| {
            v["config"][*key] = value.clone();
        });
        assert!(
            msg.contains(shown) && msg.contains("adapter_config.json"),
            "{key}: {msg}"
        );
    }
    // A config that claims the flat form for MLP tensors: the tensors are named.
    let msg = edited_error("prefix_mlp", "flat-claim", |v| {
        v["config"]["flat"] = serde_json::json!(true);
    });
    assert!(msg.contains("control_trans"), "{msg}");
}

#[test]
fn prefix_copies_that_differ_from_the_pool_are_refused() {
    let base = tiny_base();
    let task = TaskModel::load(&case_dir("prefix_flat"), &base).unwrap();
    let dir = tmpdir("prefix-copies");
    task.save(&dir, "tiny-bert").unwrap();
    let file = dir.join("adapter.safetensors");
    let mut tensors: std::collections::BTreeMap<String, Tensor> =
        adapterkit::io::load_tensors(&file)
            .unwrap()
            .into_iter()
            .collect();
    let (name, t) = tensors
        .iter()
        .find(|(k, _)| k.starts_with("bert.prefix_tuning."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    let copy = name.replace(
        "bert.prefix_tuning.",
        "bert.encoder.layer.1.attention.self.prefix_tuning.pool.",
    );
    // AdapterHub's per-layer copy, equal to the pool's tensor: accepted.
    tensors.insert(copy.clone(), t.clone());
    adapterkit::io::save_safetensors(&file, &tensors).unwrap();
    let again = TaskModel::load(&dir, &base).unwrap();
    assert_eq!(again.prefix, task.prefix);
    // A copy that differs (a mix of runs): refused, naming it.
    tensors.insert(copy.clone(), (t + 1.0).unwrap());
    adapterkit::io::save_safetensors(&file, &tensors).unwrap();
    let msg = TaskModel::load(&dir, &base).unwrap_err().to_string();
    assert!(
        msg.contains(&copy["bert.".len()..]) && msg.contains("differs"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unsupported_lora_options_are_named() {
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("use_dora", serde_json::json!(true), "DoRA"),
        ("use_gating", serde_json::json!(true), "true"),
        ("vera_d", serde_json::json!(0.1), "0.1"),
        ("dropout", serde_json::json!(0.1), "merged"),
        ("composition_mode", serde_json::json!("mul"), "mul"),
        ("attn_matrices", serde_json::json!(["q", "o"]), "\"o\""),
        ("init_weights", serde_json::json!("vera"), "vera"),
        ("r", serde_json::json!(0), "at least 1"),
        (
            "r",
            serde_json::json!(64),
            "above the smallest adapted width",
        ),
        ("leave_out", serde_json::json!([0, 1]), "every layer"),
        ("lora_frobnicate", serde_json::json!(1), "lora_frobnicate"),
    ];
    for (key, value, shown) in cases {
        let msg = edited_error("lora_qv", key, |v| {
            v["config"][*key] = value.clone();
        });
        assert!(
            msg.contains(shown) && msg.contains("adapter_config.json"),
            "{key}: {msg}"
        );
    }
    // (IA)³ is rank 1.
    let msg = edited_error("ia3", "ia3-rank", |v| {
        v["config"]["r"] = serde_json::json!(2);
    });
    assert!(msg.contains("r = 1"), "{msg}");
}

#[test]
fn adapterhub_adapter_for_another_base_is_refused() {
    let msg = edited_error("houlsby_safetensors", "hidden", |v| {
        v["hidden_size"] = serde_json::json!(768);
    });
    assert!(msg.contains("does not fit") && msg.contains("768"), "{msg}");
    let msg = edited_error("houlsby_safetensors", "type", |v| {
        v["model_type"] = serde_json::json!("roberta");
    });
    assert!(
        msg.contains("does not fit") && msg.contains("roberta"),
        "{msg}"
    );
}

#[test]
fn adapterhub_weight_problems_are_named() {
    let base = tiny_base();
    // A config that claims a bigger bottleneck than the weights have: tensor and both shapes named.
    let msg = edited_error("houlsby_safetensors", "shape", |v| {
        v["config"]["reduction_factor"] = serde_json::json!(2);
    });
    assert!(
        msg.contains("adapter_down.0.weight")
            && msg.contains("[16, 32]")
            && msg.contains("[8, 32]"),
        "{msg}"
    );
    // Tensors the configuration does not account for are not silently dropped.
    let msg = edited_error("houlsby_safetensors", "extra", |v| {
        v["config"]["mh_adapter"] = serde_json::json!(false);
    });
    assert!(
        msg.contains("attention.output.adapters") && msg.contains("does not account"),
        "{msg}"
    );
    // No weight file at all.
    let dir = tmpdir("noweights");
    copy_dir(&case_dir("houlsby_safetensors"), &dir);
    std::fs::remove_file(dir.join("adapter.safetensors")).unwrap();
    let e = TaskModel::load(&dir, &base).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    assert!(e.to_string().contains("pytorch_adapter.bin"), "{e}");
    // An adapter saved without its head.
    copy_dir(&case_dir("houlsby_safetensors"), &dir);
    std::fs::remove_file(dir.join(files::HEAD_CONFIG)).unwrap();
    let msg = TaskModel::load(&dir, &base).unwrap_err().to_string();
    assert!(
        msg.contains("without a prediction head") && msg.contains("with_head=True"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // A head type we do not implement.
    copy_dir(&case_dir("houlsby_safetensors"), &dir);
    let path = dir.join(files::HEAD_CONFIG);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["config"]["head_type"] = serde_json::json!("tagging");
    std::fs::write(&path, v.to_string()).unwrap();
    let msg = TaskModel::load(&dir, &base).unwrap_err().to_string();
    assert!(
        msg.contains("head_type") && msg.contains("tagging"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
