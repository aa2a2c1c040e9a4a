//! End to end on the real all-MiniLM-L6-v2 and the real MR data: a short Houlsby adapter run must
//! reach clearly above chance on dev, and the saved adapter must reload to the same predictions.

mod common;
use adapterkit::data::load_registry_task;
use adapterkit::train::evaluate;
use adapterkit::{AdapterConfig, BaseModel, HeadConfig, TaskModel, TrainConfig, TrainableSet};
use common::assets_home;

// As in the binary: glibc malloc's page-fault churn on tensor buffers costs more than the matmuls.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[test]
fn houlsby_adapter_learns_mr_and_reloads() {
    let home = assets_home();
    let base = BaseModel::load(&home.join("models/all-MiniLM-L6-v2")).unwrap();
    let data = load_registry_task(&home, "mr", 0).unwrap();
    assert_eq!(
        (data.train.len(), data.dev.len(), data.test.len()),
        (3200, 400, 400)
    );
    let mut task = TaskModel::new(
        &base,
        "mr",
        TrainableSet::Adapters { layernorms: true },
        Some(AdapterConfig::default()),
        HeadConfig::classification(data.labels.clone()),
        64,
        42,
    )
    .unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 32,
        lr: 1e-3,
        max_steps: Some(100),
        ..TrainConfig::default()
    };
    let report = adapterkit::train(&base, &mut task, &data, &cfg, &mut |_| {}).unwrap();
    assert_eq!(report.steps, 100);
    let dev = report.best_dev.primary();
    eprintln!(
        "MR dev accuracy after {} steps: {dev:.4} ({:.1} s)",
        report.steps, report.seconds
    );
    assert!(dev > 0.70, "dev accuracy after 100 steps: {dev}");

    let dir = std::env::temp_dir().join(format!("ak-e2e-{}", std::process::id()));
    task.save(&dir, "all-MiniLM-L6-v2").unwrap();
    let bytes = adapterkit::format::dir_size(&dir).unwrap();
    assert!(bytes < 5_000_000, "adapter directory is {bytes} bytes");
    let loaded = TaskModel::load(&dir, &base).unwrap();
    let a = evaluate(&base, &task, &data.dev, 64, &[]).unwrap();
    let b = evaluate(&base, &loaded, &data.dev, 64, &[]).unwrap();
    assert_eq!(a.outputs, b.outputs);
    assert!((a.metrics.primary() - dev).abs() < 1e-12);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_registry_task_loads_with_its_documented_size_and_classes() {
    let home = common::assets_home();
    let expect: &[(&str, usize, &[usize])] = &[
        ("mr", 4000, &[2000, 2000]),
        ("hedge", 3000, &[1500, 1500]),
        ("amazon", 1000, &[500, 500]),
        ("imdb", 1000, &[500, 500]),
        ("yelp", 1000, &[500, 500]),
        ("tweets", 17824, &[10099, 5612, 2113]),
        ("sms", 4862, &[4220, 642]),
        ("bbc", 2225, &[510, 386, 417, 511, 401]),
    ];
    for &(name, n, per_class) in expect {
        let d = load_registry_task(&home, name, 0).unwrap_or_else(|e| panic!("{name}: {e}"));
        let all: Vec<usize> = [&d.train, &d.dev, &d.test]
            .iter()
            .flat_map(|s| s.labels.iter().copied())
            .collect();
        assert_eq!(all.len(), n, "{name}");
        let counts: Vec<usize> = (0..d.labels.len())
            .map(|c| all.iter().filter(|&&l| l == c).count())
            .collect();
        assert_eq!(counts, per_class, "{name}: {:?}", d.labels);
        // Stratified 80/10/10: every class appears in dev and test.
        for c in 0..d.labels.len() {
            assert!(
                d.test.labels.contains(&c) && d.dev.labels.contains(&c),
                "{name}"
            );
        }
        assert!(
            d.train.inputs.iter().all(|(t, _)| !t.trim().is_empty()),
            "{name}"
        );
    }
}
