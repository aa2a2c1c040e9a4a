//! A save killed at any moment (a real SIGKILL of a child process that saves over and over)
//! leaves the directory complete: every file of one task or every file of the other, never a mix.

mod common;

use adapterkit::{AdapterConfig, HeadConfig, TaskModel, TrainableSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const CHILD_ENV: &str = "ADAPTERKIT_TEST_SAVE_LOOP";

/// Two tasks of different shapes (bottleneck, labels), so a mix of their files cannot load.
fn tasks() -> [TaskModel; 2] {
    let base = common::tiny_base();
    let make = |m: usize, labels: &[&str], seed: u64| {
        TaskModel::new(
            &base,
            "t",
            TrainableSet::Adapters { layernorms: true },
            Some(AdapterConfig {
                bottleneck: m,
                ..AdapterConfig::default()
            }),
            HeadConfig::classification(labels.iter().map(|s| s.to_string()).collect()),
            32,
            seed,
        )
        .unwrap()
    };
    [make(4, &["a", "b"], 1), make(8, &["x", "y", "z"], 2)]
}

fn same(a: &TaskModel, b: &TaskModel) -> bool {
    a.head.labels == b.head.labels
        && a.params.len() == b.params.len()
        && a.params.iter().zip(&b.params).all(|((ka, va), (kb, vb))| {
            ka == kb
                && va.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    == vb.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
}

/// The child: saves the two tasks in turn to the directory named by the environment, forever.
#[test]
fn child_save_loop() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let tasks = tasks();
    for i in 0.. {
        tasks[i % 2].save(Path::new(&dir), "tiny-bert").unwrap();
    }
}

#[test]
fn a_save_killed_at_any_moment_leaves_one_complete_directory() {
    let root = std::env::temp_dir().join(format!("ak-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let dir: PathBuf = root.join("task");
    let tasks = tasks();
    tasks[0].save(&dir, "tiny-bert").unwrap();
    let base = common::tiny_base();
    let exe = std::env::current_exe().unwrap();
    let mut seen = [0usize; 2];
    for round in 0..12u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "child_save_loop", "--nocapture"])
            .env(CHILD_ENV, &dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill times spread over a save's duration and beyond.
        std::thread::sleep(Duration::from_millis(60 + (round * 37) % 140));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let loaded = TaskModel::load(&dir, &base)
            .unwrap_or_else(|e| panic!("round {round}: the directory does not load: {e}"));
        let which = tasks.iter().position(|t| same(t, &loaded));
        let Some(which) = which else {
            panic!("round {round}: the directory matches neither task")
        };
        seen[which] += 1;
        let metrics_free: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !adapterkit::task::files::replaceable(n) || n.ends_with(".tmp"))
            .collect();
        assert!(
            metrics_free.is_empty(),
            "round {round}: stray files {metrics_free:?}"
        );
    }
    // The next save removes what the killed ones left beside the directory.
    tasks[1].save(&dir, "tiny-bert").unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "task")
        .collect();
    assert!(
        leftovers.is_empty(),
        "stale staging directories: {leftovers:?}"
    );
    assert!(same(&TaskModel::load(&dir, &base).unwrap(), &tasks[1]));
    eprintln!("kills that left task 0 / task 1: {seen:?}");
}

#[test]
fn a_save_refuses_to_delete_files_that_are_not_its_own() {
    let root = std::env::temp_dir().join(format!("ak-foreign-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("notes.txt"), "mine").unwrap();
    let err = tasks()[0].save(&root, "tiny-bert").unwrap_err().to_string();
    assert!(err.contains("notes.txt"), "{err}");
    assert_eq!(
        std::fs::read_to_string(root.join("notes.txt")).unwrap(),
        "mine"
    );
}
