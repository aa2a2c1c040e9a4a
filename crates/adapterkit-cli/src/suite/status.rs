//! `suite status`: progress from the cache and a time model fitted to the finished runs.

use super::*;

/// Per task, the sizes that set a run's cost: mean word pieces per example as the trainer sees them
/// (truncated to the task's max length, unpadded), and the dev-set and training-set sizes; loaded
/// once per task.
struct TaskSizes<'a> {
    tokenizer: &'a adapterkit::tokenizer::TextTokenizer,
    max_train: usize,
    sizes: BTreeMap<String, (f64, usize, usize)>,
}

impl TaskSizes<'_> {
    fn get(&mut self, task: &str) -> Result<(f64, usize, usize)> {
        if let Some(&s) = self.sizes.get(task) {
            return Ok(s);
        }
        let data = load_task_data(task, self.max_train)?;
        let max_len = data::task_spec(task)?.max_len;
        let enc = self
            .tokenizer
            .encode_all(&data.train.inputs, max_len)
            .with_context(|| format!("tokenizing task `{task}`"))?;
        let mean =
            enc.iter().map(|(ids, _)| ids.len()).sum::<usize>() as f64 / enc.len().max(1) as f64;
        let s = (mean, data.dev.len(), data.train.len());
        self.sizes.insert(task.to_string(), s);
        Ok(s)
    }
}

/// A run's work in word pieces: trained (training examples × epochs) and evaluated (dev × epochs).
/// Tokens, not max length, because the trainer does not pad: a BBC document fills its 128 word
/// pieces, a tweet uses half of 64.
#[derive(Clone, Copy)]
struct Work {
    train: f64,
    eval: f64,
}

impl Work {
    fn of(task: &str, train_n: usize, epochs: usize, sizes: &mut TaskSizes) -> Result<Work> {
        let (tokens, dev_n, _) = sizes.get(task)?;
        Ok(Work {
            train: (train_n * epochs) as f64 * tokens,
            eval: (dev_n * epochs) as f64 * tokens,
        })
    }

    /// None when the record predates the `train_n` field.
    fn of_run(r: &RunRecord, sizes: &mut TaskSizes) -> Result<Option<Work>> {
        match r.train_n.filter(|&n| n > 0) {
            Some(n) => Work::of(&r.task, n, r.epochs, sizes).map(Some),
            None => Ok(None),
        }
    }
}

/// Time model fitted on cached runs by least squares on relative error: seconds = overhead + rate
/// of the method × trained tokens + eval rate × evaluated tokens. The overhead (setup, saving,
/// test set) dominates the 800-example tasks; the evaluation term the cheap methods on a large dev
/// set. Fitted on the other finished tasks, it predicted the total time of MR, hedge, SMS, Yelp and
/// IMDB within 16% each, and amazon's 44% under.
struct Pace {
    overhead: f64,
    eval_rate: f64,
    rates: BTreeMap<String, f64>,
}

/// Solves the square system `a x = b` by Gaussian elimination with partial pivoting; None when it
/// is singular (too few distinct runs to tell the terms apart).
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() < 1e-12 * a[piv].iter().map(|v| v.abs()).fold(1e-300, f64::max) {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            let (above, below) = a.split_at_mut(row);
            for (v, p) in below[0][col..].iter_mut().zip(&above[col][col..]) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

impl Pace {
    /// Fits the model to (method, seconds, work) of finished runs.
    fn fit(rows: &[(&str, f64, Work)]) -> Option<Pace> {
        let methods: Vec<&str> = rows
            .iter()
            .map(|r| r.0)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let n = methods.len() + 2;
        let (mut ata, mut atb) = (vec![vec![0.0; n]; n], vec![0.0; n]);
        // Token counts are ~1e5–1e6: scaling them to millions keeps the system well conditioned.
        let scale = 1e-6;
        for &(method, seconds, w) in rows.iter().filter(|r| r.1 > 0.0) {
            let mut x = vec![0.0; n];
            x[0] = 1.0;
            x[1] = w.eval * scale;
            if let Some(i) = methods.iter().position(|m| *m == method) {
                x[2 + i] = w.train * scale;
            }
            let wt = 1.0 / (seconds * seconds);
            for i in 0..n {
                for j in 0..n {
                    ata[i][j] += wt * x[i] * x[j];
                }
                atb[i] += wt * x[i] * seconds;
            }
        }
        let c = solve(ata, atb)?;
        Some(Pace {
            overhead: c[0].max(0.0),
            eval_rate: (c[1] * scale).max(0.0),
            rates: methods
                .into_iter()
                .zip(&c[2..])
                .map(|(m, &v)| (m.to_string(), (v * scale).max(0.0)))
                .collect(),
        })
    }

    fn seconds(&self, method: &str, w: Work) -> Option<f64> {
        Some(self.overhead + self.rates.get(method)? * w.train + self.eval_rate * w.eval)
    }

    /// [`Pace::seconds`], or for a method with no finished run yet the slowest fitted method's
    /// rate (a bound, not a guess of zero); `true` when it is that stand-in.
    fn estimate(&self, method: &str, w: Work) -> Option<(f64, bool)> {
        if let Some(t) = self.seconds(method, w) {
            return Some((t, false));
        }
        let slowest = self.rates.values().copied().reduce(f64::max)?;
        Some((
            self.overhead + slowest * w.train + self.eval_rate * w.eval,
            true,
        ))
    }
}

/// `suite status`: per task, the runs `run` would make that are cached and those still to do, with
/// an estimate of the time left.
pub(super) fn status(p: &Plan, model: &Path, out: &mut dyn std::io::Write) -> Result<()> {
    // The pace is fitted on every cached run, of every task and method, not only those asked
    // about: more runs pin it down, and a method not run yet borrows the slowest one's.
    let runs = cached(&Plan {
        tasks: data::REGISTRY.iter().map(|t| t.name.to_string()).collect(),
        methods: super::METHODS.iter().collect(),
        ..p.clone()
    })?;
    let tokenizer = adapterkit::tokenizer::TextTokenizer::from_dir(model)
        .with_context(|| format!("loading the tokenizer of {}", model.display()))?;
    let mut sizes = TaskSizes {
        tokenizer: &tokenizer,
        max_train: p.max_train,
        sizes: BTreeMap::new(),
    };
    let mut rows = Vec::new();
    for r in &runs {
        if let Some(w) = Work::of_run(r, &mut sizes)? {
            rows.push((r.method.as_str(), r.seconds, w));
        }
    }
    let pace_model = Pace::fit(&rows);
    let predict = |m: &str, w: Work| pace_model.as_ref().and_then(|p| p.seconds(m, w));
    let (mut all_done, mut all_left, mut all_secs) = (0, 0, 0.0);
    let mut unknown = false;
    writeln!(
        out,
        "| task | finished | to do | next | estimated time left |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    for task in &p.tasks {
        let train_n = sizes.get(task)?.2;
        let work = Work::of(task, train_n, epochs(p, task), &mut sizes)?;
        // What tokens do not capture (attention grows with length, loading) differs by task, so
        // the pace is calibrated on the task's own finished runs where there are some (median of
        // actual over predicted time).
        let mut ratios = Vec::new();
        for r in runs.iter().filter(|r| r.task == *task) {
            if let Some(w) = Work::of_run(r, &mut sizes)? {
                if let Some(t) = predict(&r.method, w).filter(|&t| t > 0.0) {
                    ratios.push(r.seconds / t);
                }
            }
        }
        let pace = adapterkit::metrics::median(&ratios).unwrap_or(1.0);
        let (mut done, mut left, mut secs) = (0, 0, 0.0);
        let mut next: Option<String> = None;
        for m in &p.methods {
            let sweep = lrs(p, m);
            let mut best: Option<(f64, f64)> = None;
            let mut todo: Vec<(f64, u64)> = Vec::new();
            for &lr in &sweep {
                let path = run_path(&p.out, task, m.name, lr, 0);
                if path.exists() {
                    let r: RunRecord = adapterkit::io::read_json(&path)
                        .with_context(|| format!("reading cached run {}", path.display()))?;
                    done += 1;
                    if best.is_none_or(|b| r.dev > b.1) {
                        best = Some((lr, r.dev));
                    }
                } else {
                    todo.push((lr, 0));
                }
            }
            for seed in 1..p.seeds {
                // Until the sweep is finished the best rate is not known: the extra seeds count as
                // to do.
                match best.filter(|_| todo.is_empty()) {
                    Some((lr, _)) if run_path(&p.out, task, m.name, lr, seed).exists() => done += 1,
                    Some((lr, _)) => todo.push((lr, seed)),
                    None => todo.push((f64::NAN, seed)),
                }
            }
            left += todo.len();
            match pace_model.as_ref().and_then(|p| p.estimate(m.name, work)) {
                Some((t, stand_in)) => {
                    secs += t * pace * todo.len() as f64;
                    unknown |= stand_in && !todo.is_empty();
                }
                None if !todo.is_empty() => unknown = true,
                None => {}
            }
            if next.is_none() {
                next = todo.first().map(|(lr, seed)| {
                    if lr.is_nan() {
                        format!("{} seed {seed}", m.name)
                    } else {
                        format!("{} lr {lr:e} seed {seed}", m.name)
                    }
                });
            }
        }
        writeln!(
            out,
            "| {task} | {done} | {left} | {} | {:.0} min |",
            next.as_deref().unwrap_or("—"),
            secs / 60.0
        )?;
        (all_done, all_left, all_secs) = (all_done + done, all_left + left, all_secs + secs);
    }
    writeln!(
        out,
        "\n{all_done} finished, {all_left} to do, about {:.0} min left at the cached runs' pace{}.",
        all_secs / 60.0,
        if unknown {
            " (a method with no cached run yet is counted at the slowest cached method's pace)"
        } else {
            ""
        }
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_recovers_a_known_solution_and_refuses_a_singular_system() {
        let a = vec![
            vec![2.0, 1.0, -1.0],
            vec![-3.0, -1.0, 2.0],
            vec![-2.0, 1.0, 2.0],
        ];
        let x = solve(a, vec![8.0, -11.0, -3.0]).unwrap();
        for (got, want) in x.iter().zip([2.0, 3.0, -1.0]) {
            assert!((got - want).abs() < 1e-9, "{x:?}");
        }
        assert!(solve(vec![vec![1.0, 2.0], vec![2.0, 4.0]], vec![1.0, 2.0]).is_none());
    }

    #[test]
    fn pace_fit_recovers_overhead_and_rates_and_predicts_an_unseen_size() {
        // seconds = 12 + 2e-4 × train (full) or 5e-5 × train (head) + 3e-5 × eval.
        let truth = |m: &str, w: Work| {
            12.0 + if m == "full" { 2e-4 } else { 5e-5 } * w.train + 3e-5 * w.eval
        };
        let mut rows = Vec::new();
        for (train, eval) in [(6e4, 1e4), (4e5, 5e4), (3.6e5, 1.6e5), (2e5, 2e4)] {
            let w = Work { train, eval };
            for m in ["full", "head"] {
                rows.push((m, truth(m, w), w));
            }
        }
        let pace = Pace::fit(&rows).unwrap();
        assert!((pace.overhead - 12.0).abs() < 1e-6, "{}", pace.overhead);
        let big = Work {
            train: 1.1e6,
            eval: 1.4e5,
        };
        for m in ["full", "head"] {
            let (got, want) = (pace.seconds(m, big).unwrap(), truth(m, big));
            assert!((got / want - 1.0).abs() < 1e-6, "{m}: {got} vs {want}");
        }
        assert!(pace.seconds("layernorm", big).is_none());
        // A method with no run yet is estimated at the slowest method's (full's) pace.
        let (t, stand_in) = pace.estimate("layernorm", big).unwrap();
        assert!(
            stand_in && (t / truth("full", big) - 1.0).abs() < 1e-6,
            "{t}"
        );
        assert_eq!(pace.estimate("head", big).map(|e| e.1), Some(false));
        // One run cannot separate overhead from rate.
        assert!(Pace::fit(&rows[..1]).is_none());
    }
}
