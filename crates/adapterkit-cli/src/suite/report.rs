//! `suite report`: the table, the paper's claims checked against it, and the figures.

use super::*;

/// One table cell: the best dev setting's test accuracy over seeds.
#[derive(Debug, Clone, Serialize)]
struct Cell {
    swept: usize,
    lr: f64,
    dev: f64,
    test_mean: f64,
    test_std: f64,
    seeds: usize,
    trainable_params: usize,
    percent: f64,
    bytes: u64,
    minority_f1: f64,
}

fn cells(p: &Plan, runs: &[RunRecord]) -> BTreeMap<(String, String), Cell> {
    let mut out = BTreeMap::new();
    for t in &p.tasks {
        for m in &p.methods {
            let mine: Vec<&RunRecord> = runs
                .iter()
                .filter(|r| &r.task == t && r.method == m.name)
                .collect();
            let Some(best) = mine
                .iter()
                .filter(|r| r.seed == 0)
                .max_by(|a, b| dev_then_lower_lr(a, b))
            else {
                continue;
            };
            let at_best: Vec<&&RunRecord> = mine.iter().filter(|r| r.lr == best.lr).collect();
            let tests: Vec<f64> = at_best.iter().map(|r| r.test.primary()).collect();
            let (mean, std) = mean_std(&tests);
            let minority = at_best
                .iter()
                .map(|r| {
                    r.test_class_f1
                        .iter()
                        .cloned()
                        .fold(f64::INFINITY, f64::min)
                })
                .sum::<f64>()
                / at_best.len() as f64;
            let swept = mine.iter().filter(|r| r.seed == 0).count();
            out.insert(
                (t.clone(), m.name.to_string()),
                Cell {
                    swept,
                    lr: best.lr,
                    dev: best.dev,
                    test_mean: mean,
                    test_std: std,
                    seeds: tests.len(),
                    trainable_params: best.trainable_params,
                    percent: 100.0 * best.trainable_params as f64 / best.base_params as f64,
                    bytes: best.bytes,
                    minority_f1: minority,
                },
            );
        }
    }
    out
}

pub(super) fn report(p: &Plan) -> Result<()> {
    let runs = cached(p)?;
    if runs.is_empty() {
        bail!(
            "no cached runs under {}: run `adapterkit suite run` first",
            p.out.display()
        );
    }
    let cells = cells(p, &runs);
    let base_params = runs[0].base_params;
    let mut md = String::new();
    md.push_str(&format!(
        "Test accuracy (%), mean ± std over seeds at the learning rate picked on dev (seed 0). Base: {} parameters. Made by `{}` at revision {} from {} cached runs (each run records the revision that trained it).\n\n",
        base_params,
        command_line(),
        git_revision(),
        runs.len()
    ));
    md.push_str("| method |");
    for t in &p.tasks {
        md.push_str(&format!(" {t} |"));
    }
    md.push_str(
        " average | trained / task | % of base | serve all tasks (× base) | bytes / task |\n|---|",
    );
    for _ in 0..p.tasks.len() + 5 {
        md.push_str("---|");
    }
    md.push('\n');
    let mut csv = String::from(
        "method,task,lr,dev,test_mean,test_std,seeds,trainable_params,percent,bytes,min_class_f1\n",
    );
    let mut points = Vec::new();
    for m in &p.methods {
        md.push_str(&format!("| {} |", m.name));
        let mut accs = Vec::new();
        let mut params = Vec::new();
        let mut bytes = Vec::new();
        for t in &p.tasks {
            match cells.get(&(t.clone(), m.name.to_string())) {
                Some(c) => {
                    let want_lrs = lrs(p, m).len();
                    let seeds = if c.swept < want_lrs {
                        format!(" (lr sweep {}/{want_lrs})", c.swept)
                    } else if c.seeds < p.seeds as usize {
                        format!(" ({}/{} seeds)", c.seeds, p.seeds)
                    } else {
                        String::new()
                    };
                    md.push_str(&format!(
                        " {:.1} ± {:.1}{seeds} |",
                        100.0 * c.test_mean,
                        100.0 * c.test_std
                    ));
                    accs.push(c.test_mean);
                    params.push(c.trainable_params as f64);
                    bytes.push(c.bytes as f64);
                    csv.push_str(&format!(
                        "{},{},{:e},{:.4},{:.4},{:.4},{},{},{:.3},{},{:.4}\n",
                        m.name,
                        t,
                        c.lr,
                        c.dev,
                        c.test_mean,
                        c.test_std,
                        c.seeds,
                        c.trainable_params,
                        c.percent,
                        c.bytes,
                        c.minority_f1
                    ));
                }
                None => md.push_str(" — |"),
            }
        }
        if accs.len() == p.tasks.len() && !accs.is_empty() {
            let avg = accs.iter().sum::<f64>() / accs.len() as f64;
            let per_task = params.iter().sum::<f64>() / params.len() as f64;
            let n = p.tasks.len() as f64;
            let serve = if m.name == "full" {
                n
            } else {
                1.0 + n * per_task / base_params as f64
            };
            md.push_str(&format!(
                " **{:.1}** | {:.0} | {:.2}% | {:.2} | {:.2} MB |\n",
                100.0 * avg,
                per_task,
                100.0 * per_task / base_params as f64,
                serve,
                bytes.iter().sum::<f64>() / bytes.len() as f64 / 1e6
            ));
            points.push((m.family, m.name, per_task, 100.0 * avg));
        } else {
            md.push_str(" (incomplete) | | | | |\n");
        }
    }
    if p.tasks.iter().any(|t| t == "sms") {
        let f1: Vec<String> = p
            .methods
            .iter()
            .filter_map(|m| {
                let c = cells.get(&("sms".to_string(), m.name.to_string()))?;
                Some(format!("{} {:.1}", m.name, 100.0 * c.minority_f1))
            })
            .collect();
        md.push_str(&format!(
            "\nSMS: F1 of the spam class on test (mean over seeds; the minority class): {}.\n",
            f1.join("; ")
        ));
    }
    md.push_str(&claims(p, &cells));
    std::fs::create_dir_all(&p.out)?;
    adapterkit::io::write_atomic(&p.out.join("table.md"), md.as_bytes())?;
    adapterkit::io::write_atomic(&p.out.join("table.csv"), csv.as_bytes())?;
    let avg_points: Vec<FigPoint> = points.iter().map(|x| (x.0, x.1, x.2, x.3, 0.0)).collect();
    let plot = accuracy_figure(
        "Accuracy vs trained parameters per task (average over tasks)",
        &avg_points,
    );
    chart::write(&plot, &p.out, "params_vs_accuracy")?;
    // Per task, as the paper's Figures 3–4 draw them: an average can hide a task that disagrees.
    let per_task_dir = p.out.join("per_task");
    let mut per_task_written = Vec::new();
    for t in &p.tasks {
        let pts: Vec<FigPoint> = p
            .methods
            .iter()
            .filter_map(|m| {
                let c = cells.get(&(t.clone(), m.name.to_string()))?;
                Some((
                    m.family,
                    m.name,
                    c.trainable_params as f64,
                    100.0 * c.test_mean,
                    100.0 * c.test_std,
                ))
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        let plot = accuracy_figure(
            &format!("{t}: accuracy vs trained parameters (mean ± std over seeds)"),
            &pts,
        );
        chart::write(&plot, &per_task_dir, t)?;
        per_task_written.push(t.as_str());
    }
    print!("{md}");
    println!(
        "\nwritten: {}/table.md, table.csv, params_vs_accuracy.svg, .png; per_task/{{{}}}.svg, .png",
        p.out.display(),
        per_task_written.join(",")
    );
    Ok(())
}

/// One point of an accuracy figure: family, method, trained parameters, accuracy (%), ± std.
type FigPoint = (&'static str, &'static str, f64, f64, f64);

/// Accuracy against trained parameters on a log axis, one series per method family: relative to
/// full fine-tuning when it is among the points (the paper's Figure 3), else absolute.
fn accuracy_figure(title: &str, points: &[FigPoint]) -> chart::Chart {
    let full = points.iter().find(|x| x.1 == "full").map(|x| x.3);
    // Every method family but full fine-tuning (the zero line the others are drawn against).
    let series: Vec<chart::Series> = [
        "houlsby",
        "pfeiffer",
        "parallel",
        "lora",
        "ia3",
        "compacter",
        "prefix",
        "top-k",
        "layernorm",
        "head",
    ]
    .iter()
    .map(|fam| {
        let mine: Vec<&FigPoint> = points.iter().filter(|x| x.0 == *fam).collect();
        chart::Series {
            name: fam.to_string(),
            points: mine
                .iter()
                .map(|x| (x.2, x.3 - full.unwrap_or(0.0), x.1.to_string()))
                .collect(),
            errors: if mine.iter().any(|x| x.4 > 0.0) {
                mine.iter().map(|x| x.4).collect()
            } else {
                Vec::new()
            },
        }
    })
    .filter(|s| !s.points.is_empty())
    .collect();
    chart::line_plot(
        title,
        "trained parameters per task (log scale)",
        if full.is_some() {
            "accuracy − full fine-tuning (points)"
        } else {
            "accuracy (%)"
        },
        series,
        true,
    )
}

/// The paper's claims (issue 5's expectations) checked against the table, each with its numbers:
/// only over tasks where every method involved has a result.
fn claims(p: &Plan, cells: &BTreeMap<(String, String), Cell>) -> String {
    let get = |t: &str, m: &str| cells.get(&(t.to_string(), m.to_string()));
    let houlsby = ["houlsby-m2", "houlsby-m8", "houlsby-m64", "houlsby-m256"];
    let mut needed: Vec<&str> = houlsby.to_vec();
    needed.extend(["full", "top-1", "top-2", "layernorm"]);
    let tasks: Vec<&String> = p
        .tasks
        .iter()
        .filter(|t| needed.iter().all(|m| get(t, m).is_some()))
        .collect();
    let mut out = String::from("\nAgainst the paper's claims");
    if tasks.is_empty() {
        out.push_str(": no task has every method yet.\n");
        return out;
    }
    let names: Vec<&str> = tasks.iter().map(|t| t.as_str()).collect();
    out.push_str(&format!(
        " (tasks with every method: {}):\n\n",
        names.join(", ")
    ));
    let n = tasks.len() as f64;
    let mean = |m: &str, f: fn(&Cell) -> f64| -> f64 {
        tasks.iter().filter_map(|t| get(t, m)).map(f).sum::<f64>() / n
    };
    let avg = |m: &str| 100.0 * mean(m, |c| c.test_mean);
    let params = |m: &str| mean(m, |c| c.percent);
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    // Standard error of a method's average from its seeds' spread per task, in points: a margin
    // smaller than about twice the error of the difference is a tie, whichever side it falls.
    let std_err = |m: &str| {
        100.0
            * tasks
                .iter()
                .filter_map(|t| get(t, m))
                .map(|c| c.test_std.powi(2) / c.seeds.max(1) as f64)
                .sum::<f64>()
                .sqrt()
            / n
    };
    let margin = |a: &str, b: &str| {
        let (d, e) = (avg(a) - avg(b), std_err(a).hypot(std_err(b)));
        let reading = if d.abs() < 2.0 * e {
            "a tie within seed noise"
        } else {
            "beyond seed noise"
        };
        format!("{d:+.2} ± {e:.2} standard error, {reading}")
    };
    let full = avg("full");
    // The bottleneck size per task is picked on dev (seed 0 at its best rate), as the paper picks
    // on validation; picking on test would flatter the adapters.
    let mut picks = Vec::new();
    let mut best_sum = 0.0;
    for t in &tasks {
        // Reversed so that on a dev tie `max_by` (which keeps the last maximum) takes the smaller.
        let (m, c) = houlsby
            .iter()
            .rev()
            .filter_map(|m| get(t, m).map(|c| (m, c)))
            .max_by(|a, b| a.1.dev.total_cmp(&b.1.dev))
            .expect("every Houlsby size is present for these tasks");
        picks.push(format!("{t} {}", m.trim_start_matches("houlsby-")));
        best_sum += c.test_mean;
    }
    let best = 100.0 * best_sum / n;
    out.push_str(&format!(
        "- Houlsby, bottleneck picked per task on dev ({}): {best:.1} against full fine-tuning's \
         {full:.1} ({:+.1}); within 1.0 point: {}.\n",
        picks.join(", "),
        best - full,
        verdict(best >= full - 1.0)
    ));
    let m64 = avg("houlsby-m64");
    let m64p = params("houlsby-m64");
    out.push_str(&format!(
        "- Houlsby m=64: {m64:.1} ({:+.1}); within 1.5 points: {}; {m64p:.2}% of the base per \
         task, ≤ 4%: {}.\n",
        m64 - full,
        verdict(m64 >= full - 1.5),
        verdict(m64p <= 4.0)
    ));
    // "At a similar parameter count": the best Houlsby size that trains no more than the
    // baseline does.
    for base in ["layernorm", "top-1", "top-2"] {
        let budget = params(base);
        let rival = houlsby
            .iter()
            .filter(|m| params(m) <= budget * 1.5)
            .map(|m| (m, avg(m)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let b = avg(base);
        match rival {
            Some((m, a)) => out.push_str(&format!(
                "- {base} ({budget:.2}% of the base): {b:.1}; the best Houlsby size with at most \
                 1.5× its parameters ({m}, {:.2}%): {a:.1}; adapters above: {} ({}).\n",
                params(m),
                verdict(a > b),
                margin(m, base)
            )),
            None => out.push_str(&format!(
                "- {base} ({budget:.2}% of the base): {b:.1}; no Houlsby size is that small.\n"
            )),
        }
    }
    // The other adapter methods, each against the Houlsby size nearest to it in trained
    // parameters (on a log scale), on the same tasks.
    let others: Vec<&Method> = p
        .methods
        .iter()
        .copied()
        .filter(|m| !needed.contains(&m.name) && m.name != "head")
        .collect();
    if !others.is_empty() {
        out.push_str(
            "\nOther adapter methods against the Houlsby size nearest in trained parameters, on \
             the same tasks:\n\n",
        );
    }
    for method in others {
        let m = method.name;
        // Only finished cells (every learning rate swept, every seed run) are compared: a
        // partial one would compare a different recipe.
        let done = |t: &&&String| {
            get(t, m)
                .is_some_and(|c| c.swept >= lrs(p, method).len() && c.seeds >= p.seeds as usize)
        };
        let have = tasks.iter().filter(done).count();
        if have < tasks.len() {
            out.push_str(&format!(
                "- {m}: finished on {have} of these {} tasks so far; compared once it has them all.\n",
                tasks.len()
            ));
            continue;
        }
        let pm = params(m);
        let distance = |h: &&str| (params(h) / pm).ln().abs();
        let Some(rival) = houlsby
            .iter()
            .min_by(|a, b| distance(a).total_cmp(&distance(b)))
        else {
            continue;
        };
        out.push_str(&format!(
            "- {m} ({pm:.2}% of the base): {:.1}; {rival} ({:.2}%): {:.1}; {m} minus {rival}: {}.\n",
            avg(m),
            params(rival),
            avg(rival),
            margin(m, rival)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accuracy_figure_draws_every_method_of_the_suite() {
        let points: Vec<FigPoint> = crate::suite::METHODS
            .iter()
            .enumerate()
            .map(|(i, m)| (m.family, m.name, 1e3 * (i + 1) as f64, 80.0, 0.0))
            .collect();
        let chart::Chart::Lines { series, .. } = accuracy_figure("t", &points) else {
            panic!("a line plot");
        };
        let drawn: Vec<&str> = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.2.as_str()))
            .collect();
        for m in crate::suite::METHODS.iter().filter(|m| m.family != "full") {
            assert!(
                drawn.contains(&m.name),
                "{} ({}) is not drawn",
                m.name,
                m.family
            );
        }
    }

    #[test]
    fn claims_call_a_margin_inside_the_seed_noise_a_tie() {
        let methods = [
            ("full", 0.90, 100.0),
            ("layernorm", 0.880, 0.7),
            ("houlsby-m2", 0.881, 0.8),
            ("houlsby-m8", 0.870, 1.0),
            ("houlsby-m64", 0.885, 3.3),
            ("houlsby-m256", 0.889, 11.1),
            ("top-1", 0.850, 8.5),
            ("top-2", 0.870, 16.3),
            ("lora-r8", 0.900, 0.9),
        ];
        let cells: BTreeMap<(String, String), Cell> = methods
            .iter()
            .map(|&(m, acc, percent)| {
                let cell = Cell {
                    swept: 3,
                    lr: 1e-3,
                    dev: acc,
                    test_mean: acc,
                    test_std: 0.01,
                    seeds: 3,
                    trainable_params: 1,
                    percent,
                    bytes: 1,
                    minority_f1: acc,
                };
                (("mr".to_string(), m.to_string()), cell)
            })
            .collect();
        // A method whose sweep is unfinished (one of three rates) is not compared yet.
        let mut cells = cells;
        if let Some(c) = cells
            .get(&("mr".to_string(), "lora-r8".to_string()))
            .cloned()
        {
            cells.insert(
                ("mr".to_string(), "compacter".to_string()),
                Cell { swept: 1, ..c },
            );
        }
        let plan = Plan {
            max_train: 0,
            out: PathBuf::new(),
            tasks: vec!["mr".into()],
            methods: METHODS.iter().collect(),
            seeds: 3,
            quick: false,
        };
        let text = claims(&plan, &cells);
        // One task, std 1 point over 3 seeds: the error of a difference is 0.82 points.
        assert!(
            text.contains(
                "adapters above: met (+0.10 ± 0.82 standard error, a tie within seed noise)"
            ),
            "{text}"
        );
        assert!(
            text.contains("(+3.90 ± 0.82 standard error, beyond seed noise)"),
            "{text}"
        );
        assert!(
            text.contains("bottleneck picked per task on dev (mr m256)"),
            "{text}"
        );
        // Other methods meet the Houlsby size nearest in parameters on a log scale (m8 at 1.0%
        // for 0.9%, nearer than m2 at 0.8%).
        assert!(
            text.contains(
                "- lora-r8 (0.90% of the base): 90.0; houlsby-m8 (1.00%): 87.0; lora-r8 minus \
                 houlsby-m8: +3.00 ± 0.82 standard error, beyond seed noise."
            ),
            "{text}"
        );
        assert!(
            text.contains("- ia3: finished on 0 of these 1 tasks so far"),
            "{text}"
        );
        assert!(
            text.contains("- compacter: finished on 0 of these 1 tasks so far"),
            "{text}"
        );
    }
}
