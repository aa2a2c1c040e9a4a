//! `adapterkit suite` on real data, kept small: one UCI task, short runs. Needs the fetched assets
//! (`python3 tools/fetch_assets.py`), as CI does.

use std::path::PathBuf;
use std::process::Command;

fn home() -> PathBuf {
    std::env::var_os("ADAPTERKIT_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/adapterkit"))
}

fn ak(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_adapterkit"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn suite_runs_resumes_reports_ablates_and_extends() {
    assert!(
        home().join("data/uci/amazon.json").exists(),
        "assets missing: run python3 tools/fetch_assets.py"
    );
    let out = std::env::temp_dir().join(format!("ak-suite-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = out.to_str().unwrap();
    let common = ["--out", o, "--tasks", "amazon", "--quick"];
    let run = |extra: &[&str]| {
        let mut args = vec!["suite", "run"];
        args.extend_from_slice(&common);
        args.extend_from_slice(extra);
        ak(&args)
    };
    let (ok, stdout, stderr) = run(&["--methods", "head,houlsby-m64"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("| head |") && stdout.contains("| houlsby-m64 |"),
        "{stdout}"
    );
    let cached = out.join("runs/amazon/head/lr3e-3-seed0.json");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cached).unwrap()).unwrap();
    assert_eq!(record["epochs"], 3);
    assert!(record["test"]["accuracy"].as_f64().unwrap() > 0.5);
    // A rerun trains nothing: every run is cached.
    let (ok, _, stderr) = run(&["--methods", "head,houlsby-m64"]);
    assert!(ok && !stderr.contains("seed 0 ("), "{stderr}");
    assert!(out.join("table.md").exists() && out.join("table.csv").exists());
    assert!(out.join("params_vs_accuracy.svg").exists());
    let png = std::fs::read(out.join("params_vs_accuracy.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    // One figure per task too, with the seeds' spread as error bars.
    let svg = std::fs::read_to_string(out.join("per_task/amazon.svg")).unwrap();
    assert!(
        svg.contains("amazon: accuracy vs trained parameters"),
        "{svg}"
    );
    assert!(out.join("per_task/amazon.png").exists());
    // Status counts from the cache: both runs finished, LayerNorm-only (not run) still to do.
    let (ok, stdout, stderr) = ak(&[
        "suite",
        "status",
        "--out",
        o,
        "--tasks",
        "amazon",
        "--quick",
        "--methods",
        "head,houlsby-m64,layernorm",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("| amazon | 2 | 1 | layernorm lr 3e-3 seed 0 |"),
        "{stdout}"
    );

    let (ok, stdout, stderr) = ak(&[
        "suite", "ablation", "--out", o, "--tasks", "amazon", "--quick",
    ]);
    assert!(ok, "{stderr}");
    let ab: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ablation.json")).unwrap()).unwrap();
    let grid = ab["amazon"]["removed_i_to_j"].as_array().unwrap();
    assert_eq!(grid.len(), 6, "{stdout}");
    assert_eq!(
        ab["amazon"]["lower_half_removed"].as_f64(),
        grid[0][2].as_f64(),
        "{stdout}"
    );
    assert!(stdout.contains("lower costs less: "), "{stdout}");
    assert!(out.join("ablation_amazon.svg").exists() && out.join("ablation_amazon.png").exists());

    let (ok, stdout, stderr) = ak(&[
        "suite",
        "extend",
        "--out",
        o,
        "--tasks",
        "amazon,yelp",
        "--quick",
        "--epochs",
        "1",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("1 earlier task(s) bit-identical"),
        "{stdout}"
    );

    let (ok, _, stderr) = ak(&["suite", "run", "--out", o, "--tasks", "nope"]);
    assert!(!ok && stderr.contains("unknown task `nope`"), "{stderr}");
    std::fs::remove_dir_all(&out).unwrap();
}
