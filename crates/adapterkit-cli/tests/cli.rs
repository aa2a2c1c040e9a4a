//! The binary end to end on the tiny fixture model: train on a user CSV, predict, info, errors.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../adapterkit/tests/fixtures/tiny-bert")
}

fn ak(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_adapterkit"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = stdin.unwrap_or("").to_string();
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(input.as_bytes()).unwrap();
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn train_predict_info_on_a_user_csv() {
    let dir = std::env::temp_dir().join(format!("ak-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("toy.csv");
    let mut rows = String::from("sentence,sentiment\n");
    for i in 0..60 {
        let (w, l) = if i % 2 == 0 {
            ("good", "pos")
        } else {
            ("awful", "neg")
        };
        rows.push_str(&format!("\"the movie was {w}\",{l}\n"));
    }
    std::fs::write(&csv, rows).unwrap();
    let out = dir.join("adapter");
    let model = tiny();
    let (model_s, csv_s) = (model.to_str().unwrap(), csv.to_str().unwrap());
    let train_on_csv = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            model_s,
            "--train-file",
            csv_s,
            "--header",
            "--text-column",
            "sentence",
            "--label-column",
            "sentiment",
        ];
        args.extend_from_slice(extra);
        ak(&args, None)
    };
    let o = train_on_csv(&[
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--bottleneck",
        "4",
        "--lr",
        "0.01",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(
        stdout.contains("adapters on toy: dev") && stdout.contains("test"),
        "{stdout}"
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["split_sizes"]["train"], 48);
    assert!(metrics["test"]["accuracy"].as_f64().unwrap() >= 0.0);

    let o = ak(
        &[
            "predict",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
        ],
        Some("it was good\n\nbad plot\n"),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines: Vec<serde_json::Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // One output line per input line, blank ones included, so that line i answers line i.
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["text"], "");
    assert_eq!(lines[2]["text"], "bad plot");
    let p = &lines[0]["probabilities"];
    let sum = p["neg"].as_f64().unwrap() + p["pos"].as_f64().unwrap();
    assert!((sum - 1.0).abs() < 1e-5);
    assert!(["neg", "pos"].contains(&lines[2]["label"].as_str().unwrap()));

    // Full fine-tuning and top-k release the base's copy of what they train (the train command
    // holds the model once): training, evaluation and the save read only the task's copies, and
    // the saved task predicts on a fresh base.
    for method in [
        &["--method", "full"][..],
        &["--method", "top-k", "--top-k", "1"],
    ] {
        let own = dir.join(format!("own-{}", method[1]));
        let mut args = method.to_vec();
        args.extend([
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            own.to_str().unwrap(),
        ]);
        let o = train_on_csv(&args);
        assert!(o.status.success(), "{method:?}: {}", text(&o.stderr));
        let o = ak(
            &[
                "predict",
                "--model",
                model_s,
                "--adapter",
                own.to_str().unwrap(),
            ],
            Some("it was good\n"),
        );
        assert!(o.status.success(), "{method:?}: {}", text(&o.stderr));
        assert!(
            text(&o.stdout).contains("probabilities"),
            "{}",
            text(&o.stdout)
        );
    }

    // A length the model cannot take is refused before training, naming the option.
    let o = train_on_csv(&[
        "--max-len",
        "100",
        "--out",
        dir.join("never").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("--max-len 100"),
        "{}",
        text(&o.stderr)
    );
    assert!(!dir.join("never").exists());

    let o = ak(
        &[
            "info",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let info: serde_json::Value = serde_json::from_str(&text(&o.stdout)).unwrap();
    assert!(info["adapter"]["trainable_params"].as_u64().unwrap() > 0);
    assert!(info["adapter"]["bytes_on_disk"].as_u64().unwrap() > 0);

    // Errors are one clear line naming what is wrong, with a non-zero exit and no panic.
    let o = ak(
        &[
            "train",
            "--model",
            model.to_str().unwrap(),
            "--train-file",
            csv.to_str().unwrap(),
            "--header",
            "--text-column",
            "body",
        ],
        None,
    );
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no column `body`") && !err.contains("panicked"),
        "{err}"
    );
    let o = ak(
        &[
            "train",
            "--model",
            model.to_str().unwrap(),
            "--train-file",
            "/nonexistent/x.csv",
        ],
        None,
    );
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && err.contains("/nonexistent/x.csv"),
        "{err}"
    );
    let o = ak(
        &[
            "predict",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            "/nonexistent/adapter",
            "hi",
        ],
        None,
    );
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && err.contains("adapterkit.json"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn adapterhub_configs_and_directories_through_the_cli() {
    let dir = std::env::temp_dir().join(format!("ak-cli-hub-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("toy.csv");
    let mut rows = String::from("text,label\n");
    for i in 0..40 {
        let (w, l) = if i % 2 == 0 {
            ("good", "pos")
        } else {
            ("awful", "neg")
        };
        rows.push_str(&format!("\"the film was {w}\",{l}\n"));
    }
    std::fs::write(&csv, rows).unwrap();
    let model = tiny();
    // A user's AdapterHub config file with options beyond the plain adapter.
    let cfg = dir.join("my_config.json");
    std::fs::write(
        &cfg,
        r#"{"config": {"mh_adapter": true, "output_adapter": true, "reduction_factor": {"0": 8, "default": 4},
            "non_linearity": "gelu", "ln_before": true, "scaling": "learned", "residual_before_ln": false,
            "original_ln_before": true, "init_weights": "mam_adapter"}}"#,
    )
    .unwrap();
    for (tag, spec) in [
        ("preset", "seq_bn".to_string()),
        ("file", cfg.to_str().unwrap().to_string()),
        (
            "string",
            "scaled_par_bn[reduction_factor=4, leave_out=[0]]".to_string(),
        ),
        ("lora", "lora[r=4, alpha=16, output_lora=True]".to_string()),
        ("ia3", "ia3".to_string()),
        (
            "compacter",
            "compacter[reduction_factor=4, phm_dim=2]".to_string(),
        ),
        (
            "prefix",
            "prefix_tuning[prefix_length=4, bottleneck_size=8]".to_string(),
        ),
    ] {
        let out = dir.join(tag);
        let o = ak(
            &[
                "train",
                "--model",
                model.to_str().unwrap(),
                "--train-file",
                csv.to_str().unwrap(),
                "--header",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--adapter-config",
                &spec,
                "--out",
                out.to_str().unwrap(),
            ],
            None,
        );
        assert!(o.status.success(), "{tag}: {}", text(&o.stderr));
        let written: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let c = &written["config"];
        match tag {
            "compacter" => {
                assert_eq!(
                    (c["phm_layer"].clone(), c["phm_dim"].clone()),
                    (true.into(), 2.into())
                );
                assert_eq!(c["mh_adapter"], true);
            }
            "prefix" => {
                // Trained through the MLP, saved folded into flat prefixes.
                assert_eq!(c["architecture"], "prefix_tuning");
                assert_eq!(
                    (c["flat"].clone(), c["prefix_length"].clone()),
                    (true.into(), 4.into())
                );
            }
            // AdapterHub's LoRAConfig, with the string's keys over the preset's.
            "lora" => {
                assert_eq!(c["architecture"], "lora");
                assert_eq!(
                    (c["r"].clone(), c["alpha"].clone()),
                    (serde_json::json!(4), serde_json::json!(16))
                );
                assert_eq!(c["output_lora"], true);
                assert_eq!(c["composition_mode"], "add");
            }
            "ia3" => {
                assert_eq!(c["architecture"], "lora");
                assert_eq!(c["composition_mode"], "scale");
                assert_eq!(c["attn_matrices"], serde_json::json!(["k", "v"]));
            }
            // AdapterHub's scaled_par_bn preset with the string's keys over it.
            "string" => {
                assert_eq!(c["is_parallel"], true);
                assert_eq!(c["scaling"], "learned");
                assert_eq!(c["reduction_factor"], 4.0);
                assert_eq!(c["leave_out"], serde_json::json!([0]));
            }
            "file" => {
                assert_eq!(c["ln_before"], true);
                assert_eq!(c["scaling"], "learned");
                assert_eq!(c["residual_before_ln"], false);
                assert_eq!(c["init_weights"], "mam_adapter");
            }
            _ => {
                assert_eq!(c["original_ln_before"], true);
                assert_eq!(c["non_linearity"], "relu");
            }
        }
        // And every method's directory predicts.
        let o = ak(
            &[
                "predict",
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                out.to_str().unwrap(),
                "the film was good",
            ],
            None,
        );
        assert!(o.status.success(), "{tag}: {}", text(&o.stderr));
        assert!(text(&o.stdout).contains("\"label\""), "{}", text(&o.stdout));
    }
    // A bad key in the user's config is named with its value.
    std::fs::write(
        &cfg,
        r#"{"mh_adapter": true, "output_adapter": true, "reduction_factor": 4, "non_linearity": "relu", "use_gating": true}"#,
    )
    .unwrap();
    let o = ak(
        &[
            "train",
            "--model",
            model.to_str().unwrap(),
            "--train-file",
            csv.to_str().unwrap(),
            "--header",
            "--adapter-config",
            cfg.to_str().unwrap(),
        ],
        None,
    );
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && err.contains("use_gating") && err.contains("true"),
        "{err}"
    );
    // A directory saved by the Python library predicts, with its label names and raw logits.
    let hub = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../adapterkit/tests/fixtures/adapterhub/houlsby_safetensors");
    let o = ak(
        &[
            "predict",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            hub.to_str().unwrap(),
            "--logits",
            "the movie was good",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let line: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert!(["neg", "neu", "pos"].contains(&line["label"].as_str().unwrap()));
    assert_eq!(line["logits"].as_array().unwrap().len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn version_names_the_build_revision() {
    let o = ak(&["--version"], None);
    assert!(o.status.success());
    let v = text(&o.stdout);
    // "adapterkit 0.1.0 (abc1234)" or "(abc1234+dirty)"; "unknown" only outside a git checkout.
    let rev = v
        .trim()
        .rsplit_once(" (")
        .and_then(|(_, r)| r.strip_suffix(')'))
        .unwrap_or("");
    let hex = rev.trim_end_matches("+dirty");
    let in_git = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .is_ok_and(|o| o.status.success());
    if in_git {
        assert!(
            hex.len() >= 7 && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "{v}"
        );
    } else {
        assert_eq!(hex, "unknown", "{v}");
    }
}
