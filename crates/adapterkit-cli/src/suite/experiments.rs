//! The paper's other experiments on trained suite runs: the layer ablation (Figure 6), the init
//! sweep (Figure 7) and tasks added one at a time (extensibility).

use super::*;

pub(super) fn ablation(base: &BaseModel, p: &Plan) -> Result<()> {
    let mut all = serde_json::Map::new();
    for task in &p.tasks {
        let data = load_task_data(task, p.max_train)?;
        let m = method("houlsby-m64")?;
        // The adapter of the dev-best learning rate (seed 0) from `suite run`; trained here if absent.
        let runs = cached(&Plan {
            tasks: vec![task.clone()],
            methods: vec![m],
            ..p.clone()
        })?;
        let lr = runs
            .iter()
            .filter(|r| r.seed == 0)
            .max_by(|a, b| dev_then_lower_lr(a, b))
            .map(|r| r.lr)
            .unwrap_or(1e-3);
        let dir = p
            .out
            .join("adapters")
            .join(format!("{task}-{}-lr{lr:e}", m.name));
        if !dir.join("adapterkit.json").exists() {
            let spec = RunSpec {
                data: &data,
                method: m,
                lr,
                seed: 0,
                epochs: epochs(p, task),
                init_std: None,
                keep_dir: Some(dir.clone()),
            };
            let (r, _) = train_one(base, &spec)?;
            adapterkit::io::write_json(&run_path(&p.out, task, m.name, lr, 0), &r)?;
        }
        let t = TaskModel::load(&dir, base)?;
        let layers = base.config.num_hidden_layers;
        let enc = adapterkit::train::tokenize_set(base, &data.test, t.max_len)?;
        let acc = |skip: &[usize]| -> Result<f64> {
            Ok(
                adapterkit::train::evaluate_encoded(base, &t, &data.test, &enc, 64, skip)?
                    .metrics
                    .primary(),
            )
        };
        let full = acc(&[])?;
        let mut grid = vec![vec![f64::NAN; layers]; layers];
        for (i, row) in grid.iter_mut().enumerate() {
            for (j, cell) in row.iter_mut().enumerate().skip(i) {
                let skip: Vec<usize> = (i..=j).collect();
                *cell = acc(&skip)?;
            }
        }
        println!(
            "{task}: all adapters {:.4}; removing layers i..=j (rows i, columns j):",
            full
        );
        for (i, row) in grid.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    if j < i {
                        "   —  ".into()
                    } else {
                        format!("{v:.4}")
                    }
                })
                .collect();
            println!("  {i}: {}", cells.join(" "));
        }
        // The paper's claim: the lower layers' adapters matter less than the upper ones.
        let half = layers / 2;
        let halves = (layers >= 2).then(|| (grid[0][half - 1], grid[half][layers - 1]));
        if let Some((lower, upper)) = halves {
            println!(
                "  lower layers 0–{} removed: {:.4} (−{:.1} points); upper layers {half}–{} removed: {:.4} (−{:.1}); lower costs less: {}",
                half - 1,
                lower,
                100.0 * (full - lower),
                layers - 1,
                upper,
                100.0 * (full - upper),
                if lower > upper { "yes" } else { "no" }
            );
        }
        let heat = chart::heat_map(
            &format!(
                "{task}: test accuracy with adapters of layers i..j removed (all kept: {:.1})",
                100.0 * full
            ),
            "last removed layer j",
            "first removed layer i",
            grid.clone(),
        );
        std::fs::create_dir_all(&p.out)?;
        chart::write(&heat, &p.out, &format!("ablation_{task}"))?;
        all.insert(
            task.clone(),
            json!({"adapter": dir, "lr": lr, "all_kept": full, "removed_i_to_j": grid,
                "lower_half_removed": halves.map(|h| h.0),
                "upper_half_removed": halves.map(|h| h.1)}),
        );
    }
    merge_json(&p.out.join("ablation.json"), all)?;
    println!(
        "written: {}/ablation.json, ablation_<task>.svg, .png",
        p.out.display()
    );
    Ok(())
}

/// Writes `entries` (one per task) into the JSON object at `path`, keeping the other tasks'
/// entries a run for different `--tasks` wrote earlier.
fn merge_json(path: &Path, entries: serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let mut all: serde_json::Map<String, serde_json::Value> = if path.exists() {
        adapterkit::io::read_json(path)
            .with_context(|| format!("{}: expected a JSON object keyed by task", path.display()))?
    } else {
        serde_json::Map::new()
    };
    all.extend(entries);
    adapterkit::io::write_json(path, &all)?;
    Ok(())
}

pub(super) fn init_sweep(base: &BaseModel, p: &Plan, epochs: usize) -> Result<()> {
    let stds: Vec<f64> = (-7..=0).map(|e| 10f64.powi(e)).collect();
    let m = method("houlsby-m64")?;
    let mut series = Vec::new();
    let mut all = serde_json::Map::new();
    for task in &p.tasks {
        let data = load_task_data(task, p.max_train)?;
        let mut pts = Vec::new();
        let mut errs = Vec::new();
        let mut rows = Vec::new();
        for &std in &stds {
            let mut accs = Vec::new();
            for seed in 0..p.seeds {
                let path = p
                    .out
                    .join("init")
                    .join(task)
                    .join(format!("std{std:e}-seed{seed}.json"));
                let r: RunRecord = if path.exists() {
                    let r = adapterkit::io::read_json(&path)?;
                    check_cached(&r, &data, &path)?;
                    r
                } else {
                    eprintln!("[{}] init {task} std {std:e} seed {seed} …", chrono_now());
                    let spec = RunSpec {
                        data: &data,
                        method: m,
                        lr: 1e-3,
                        seed,
                        epochs,
                        init_std: Some(std),
                        keep_dir: None,
                    };
                    let (r, _) = train_one(base, &spec)?;
                    adapterkit::io::write_json(&path, &r)?;
                    r
                };
                accs.push(r.test.primary());
            }
            let (mean, sd) = mean_std(&accs);
            println!(
                "{task} init std {std:e}: test {:.4} ± {:.4} ({} seeds)",
                mean,
                sd,
                accs.len()
            );
            pts.push((std, 100.0 * mean, format!("±{:.1}", 100.0 * sd)));
            errs.push(100.0 * sd);
            rows.push(json!({"std": std, "test_mean": mean, "test_std": sd, "seeds": accs.len()}));
        }
        series.push(chart::Series {
            name: task.clone(),
            points: pts,
            errors: errs,
        });
        all.insert(task.clone(), json!(rows));
    }
    let plot = chart::line_plot(
        &format!(
            "Adapter init std vs test accuracy (m=64, lr 1e-3, {epochs} epochs, mean ± std of seeds)"
        ),
        "init std (log scale)",
        "test accuracy (%)",
        series,
        true,
    );
    std::fs::create_dir_all(&p.out)?;
    chart::write(&plot, &p.out, "init")?;
    merge_json(&p.out.join("init.json"), all)?;
    println!("written: {}/init.json, init.svg, init.png", p.out.display());
    Ok(())
}

pub(super) fn extend(base: &BaseModel, p: &Plan, epochs: usize) -> Result<()> {
    let store = p.out.join("store");
    let m = method("houlsby-m64")?;
    let mut reference: Vec<(String, Vec<u32>)> = Vec::new();
    let mut log = Vec::new();
    let bits = |rows: &[Vec<f32>]| -> Vec<u32> {
        rows.iter()
            .flat_map(|r| r.iter().map(|x| x.to_bits()))
            .collect()
    };
    for task in &p.tasks {
        let data = load_task_data(task, p.max_train)?;
        let spec = RunSpec {
            data: &data,
            method: m,
            lr: 1e-3,
            seed: 0,
            epochs,
            init_std: None,
            keep_dir: Some(store.join(task)),
        };
        let (r, _) = train_one(base, &spec)?;
        let mine = TaskModel::load(&store.join(task), base)?;
        let out = evaluate(base, &mine, &data.test, 64, &[])?;
        reference.push((task.clone(), bits(&out.outputs)));
        // Every earlier task, reloaded from the store, must predict exactly as before.
        let mut identical = Vec::new();
        for (earlier, want) in &reference {
            let d = load_task_data(earlier, p.max_train)?;
            let t = TaskModel::load(&store.join(earlier), base)?;
            let got = bits(&evaluate(base, &t, &d.test, 64, &[])?.outputs);
            identical.push(json!({"task": earlier, "bit_identical": &got == want}));
            if &got != want {
                bail!("after adding {task}, {earlier}'s test predictions changed");
            }
        }
        println!(
            "added {task} (test {:.4}); {} earlier task(s) bit-identical",
            r.test.primary(),
            reference.len() - 1
        );
        log.push(json!({"added": task, "test": r.test.primary(), "checked": identical}));
    }
    adapterkit::io::write_json(&p.out.join("extend.json"), &log)?;
    println!("written: {}/extend.json", p.out.display());
    Ok(())
}
