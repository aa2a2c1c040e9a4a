//! Resumable training, end to end: a run killed with SIGKILL (twice, at whatever step it reached)
//! and resumed ends with weights bit-identical to an uninterrupted run with the same seed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../adapterkit/tests/fixtures/tiny-bert")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A work directory with a 2000-row CSV, long enough on the tiny model to be killed mid-run.
fn setup(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ak-resume-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let words = [
        "good", "awful", "fine", "bad", "great", "poor", "nice", "dull",
    ];
    let mut rows = String::from("sentence,sentiment\n");
    for i in 0..2000usize {
        let (a, b) = (i * 7 % 8, i * 5 % 8);
        let label = if a % 2 == 0 { "pos" } else { "neg" };
        rows.push_str(&format!(
            "\"the movie was {} and {}\",{label}\n",
            words[a], words[b]
        ));
    }
    std::fs::write(dir.join("toy.csv"), rows).unwrap();
    dir
}

fn train_cmd(dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_adapterkit"));
    c.current_dir(dir)
        .args(["train", "--model"])
        .arg(tiny())
        .args([
            "--train-file",
            "toy.csv",
            "--header",
            "--text-column",
            "sentence",
            "--label-column",
            "sentiment",
            "--epochs",
            "4",
            "--batch-size",
            "8",
            "--bottleneck",
            "4",
        ])
        .args(extra);
    // Learning rate and seed of every run, unless the test gives its own.
    for (opt, value) in [("--lr", "0.003"), ("--seed", "7")] {
        if !extra.contains(&opt) {
            c.args([opt, value]);
        }
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn run(dir: &Path, extra: &[&str]) -> Output {
    train_cmd(dir, extra).output().unwrap()
}

/// The step the checkpoint in `ckpt` records, if one is readable now (a save may be swapping it).
fn checkpoint_step(ckpt: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(ckpt.join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["step"].as_u64()
}

/// Starts training, SIGKILLs it once its checkpoint records a step past `after`, and returns that
/// step; panics when the run ended before it could be killed (the test would prove nothing).
fn kill_after(dir: &Path, extra: &[&str], after: u64) -> u64 {
    let ckpt = dir.join("out.checkpoint");
    let mut child = train_cmd(dir, extra).spawn().unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(s) = checkpoint_step(&ckpt).filter(|&s| s > after) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(!out.status.success(), "the run finished before the kill");
            return s;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the run ended ({status}) before step {after}: {}",
                text(&out.stderr)
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn killed_twice_and_resumed_gives_the_uninterrupted_weights_bit_for_bit() {
    let dir = setup("kill");
    let reference = run(&dir, &["--out", "reference"]);
    assert!(reference.status.success(), "{}", text(&reference.stderr));

    let every = ["--checkpoint-every", "5", "--out", "out"];
    let first = kill_after(&dir, &every, 40);
    let resume = [
        "--checkpoint-every",
        "5",
        "--out",
        "out",
        "--resume",
        "out.checkpoint",
    ];
    let second = kill_after(&dir, &resume, first + 150);
    assert!(second > first, "{second} <= {first}");
    let done = run(&dir, &resume);
    assert!(done.status.success(), "{}", text(&done.stderr));

    for f in [
        "adapter.safetensors",
        "model_head.safetensors",
        "adapterkit_params.safetensors",
    ] {
        let (a, b) = (dir.join("reference").join(f), dir.join("out").join(f));
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{f} differs after kills at steps {first} and {second}"
        );
    }
    let epochs = |d: &str| {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(d).join("metrics.json")).unwrap())
                .unwrap();
        let e = v["epochs"].as_array().unwrap().clone();
        e.iter()
            .map(|e| (e["train_loss"].as_f64(), e["dev"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(epochs("reference"), epochs("out"));
    assert!(
        !dir.join("out.checkpoint").exists(),
        "the checkpoint of a finished run is removed"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_refuses_another_run_and_a_missing_checkpoint() {
    let dir = setup("refuse");
    let first = kill_after(&dir, &["--checkpoint-every", "3", "--out", "out"], 6);
    assert!(first > 6);
    let o = run(
        &dir,
        &["--out", "out", "--resume", "out.checkpoint", "--seed", "8"],
    );
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("written by a different run")
            && err.contains("`train_config.seed` is 7 there, 8 here"),
        "{err}"
    );
    // So is the same run in another precision, where the CPU has fp16 products.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512fp16") {
        let o = run(
            &dir,
            &[
                "--out",
                "out",
                "--resume",
                "out.checkpoint",
                "--precision",
                "fp16",
            ],
        );
        let err = text(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains("`precision`"), "{err}");
        // A finished fp16 run says so in its record; an f32 one keeps the record's old keys.
        for (precision, out) in [("fp16", "o16"), ("f32", "o32")] {
            let o = run(
                &dir,
                &["--out", out, "--precision", precision, "--max-steps", "3"],
            );
            assert!(o.status.success(), "{}", text(&o.stderr));
            let m: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join(out).join("metrics.json")).unwrap(),
            )
            .unwrap();
            let want = (precision == "fp16").then(|| serde_json::json!("fp16"));
            assert_eq!(m.get("precision").cloned(), want, "{out}");
        }
    }
    // Other data is another run too, even with the same options.
    std::fs::write(
        dir.join("toy.csv"),
        std::fs::read_to_string(dir.join("toy.csv"))
            .unwrap()
            .replace("good", "fine"),
    )
    .unwrap();
    let o = run(&dir, &["--out", "out", "--resume", "out.checkpoint"]);
    let err = text(&o.stderr);
    assert!(
        err.contains("`data.dev` is") || err.contains("`data.train` is"),
        "{err}"
    );

    let o = run(&dir, &["--out", "out", "--resume", "nowhere"]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("checkpoint nowhere: no state.json there"),
        "{err}"
    );
    assert!(!dir.join("out").exists(), "nothing was saved");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_diverging_run_names_the_step_and_the_learning_rate_and_keeps_its_checkpoint() {
    let dir = setup("nan");
    let o = run(
        &dir,
        &[
            "--out",
            "out",
            "--lr",
            "1e30",
            "--weight-decay",
            "0",
            "--checkpoint-every",
            "1",
        ],
    );
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("training stopped at step") && err.contains("lower the learning rate")
            || err.contains("Lower the learning rate"),
        "{err}"
    );
    assert!(
        err.contains("The last checkpoint, in out.checkpoint, is kept"),
        "{err}"
    );
    assert!(checkpoint_step(&dir.join("out.checkpoint")).is_some());
    assert!(!dir.join("out").exists(), "a diverged run saves nothing");
    std::fs::remove_dir_all(&dir).unwrap();
}
