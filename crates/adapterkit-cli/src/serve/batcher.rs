//! The batcher: one thread that takes queued requests of any adapters up to a token budget, sorts
//! their rows by length, and runs each cut of them as one forward of the shared base in which every
//! row goes through its own adapter and head (`BaseModel::predict_mixed`).

use super::metrics::Metrics;
use super::registry::Served;
use adapterkit::BaseModel;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// One request's rows for one adapter, and where its answer goes.
pub(crate) struct Job {
    /// The adapter, as it was when the request arrived.
    pub served: Arc<Served>,
    /// Token and segment ids per input.
    pub rows: Vec<(Vec<u32>, Vec<u32>)>,
    /// When it was queued.
    pub enqueued: Instant,
    /// Set by the handler when it stopped waiting (timeout): the rows are not run.
    pub cancelled: Arc<AtomicBool>,
    /// The answer: the head's raw outputs per row, or what went wrong.
    pub reply: oneshot::Sender<Result<Answer, String>>,
}

/// What a job gets back.
pub(crate) struct Answer {
    /// The head's raw outputs (logits, or the regression value) per row, in input order.
    pub outputs: Vec<Vec<f32>>,
    /// Time from queueing to the first forward that held its rows.
    pub queue: Duration,
    /// Time of the forwards that held its rows.
    pub inference: Duration,
}

/// How big one batch may grow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Padded tokens per forward (rows × longest row).
    pub max_tokens: usize,
    /// Requests taken together.
    pub max_requests: usize,
    /// How long the first request of an empty queue waits for others to join its batch.
    pub max_wait: Duration,
    /// The fixed cost of one forward, in tokens, against which padding is weighed.
    pub forward_cost: usize,
}

/// Row `row` of job `job`, its length and the batch class it may share a forward with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RowRef {
    class: usize,
    len: usize,
    job: usize,
    row: usize,
}

/// Cuts rows into forwards: rows of one class together, sorted by length, and split where that
/// pays: every forward costs its padded tokens (rows × longest row) plus `forward_cost` tokens
/// for what does not scale with rows (weight packing, dispatch), and the split with the least
/// total cost is taken (a short row is not padded to a long one's length when running it in a
/// forward of its own costs less). No forward exceeds `max_tokens` padded tokens unless it is one
/// row; none is empty.
fn plan(mut rows: Vec<RowRef>, max_tokens: usize, forward_cost: usize) -> Vec<Vec<RowRef>> {
    rows.sort_by_key(|r| (r.class, r.len, r.job, r.row));
    let mut cuts: Vec<Vec<RowRef>> = Vec::new();
    let mut rest = rows.as_slice();
    while let Some(first) = rest.first() {
        let n = rest.iter().take_while(|r| r.class == first.class).count();
        let (class, tail) = rest.split_at(n);
        rest = tail;
        // best[j]: least cost of rows [0, j); from[j]: where its last forward starts.
        let mut best = vec![usize::MAX; n + 1];
        let mut from = vec![0; n + 1];
        best[0] = 0;
        for j in 1..=n {
            let longest = class[j - 1].len;
            for i in (0..j).rev() {
                let padded = (j - i) * longest;
                if padded > max_tokens && j - i > 1 {
                    break;
                }
                let c = best[i].saturating_add(padded + forward_cost);
                if c < best[j] {
                    best[j] = c;
                    from[j] = i;
                }
            }
        }
        let mut bounds = Vec::new();
        let mut j = n;
        while j > 0 {
            bounds.push((from[j], j));
            j = from[j];
        }
        for (i, j) in bounds.into_iter().rev() {
            cuts.push(class[i..j].to_vec());
        }
    }
    cuts
}

/// Runs the batcher until every sender of `rx` is gone and the queue is empty.
pub(crate) fn run(base: Arc<BaseModel>, rx: Receiver<Job>, budget: Budget, metrics: Arc<Metrics>) {
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv() {
                Ok(j) => pending.push_back(j),
                Err(_) => return,
            }
            let deadline = Instant::now() + budget.max_wait;
            while pending.len() < budget.max_requests {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(left) {
                    Ok(j) => pending.push_back(j),
                    Err(_) => break,
                }
            }
        }
        while let Ok(j) = rx.try_recv() {
            pending.push_back(j);
        }
        let mut taken = Vec::new();
        let mut tokens = 0;
        while let Some(j) = pending.front() {
            let t: usize = j.rows.iter().map(|r| r.0.len()).sum();
            let full = tokens + t > budget.max_tokens || taken.len() >= budget.max_requests;
            if !taken.is_empty() && full {
                break;
            }
            let Some(j) = pending.pop_front() else { break };
            metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            if j.cancelled.load(Ordering::Relaxed) {
                continue;
            }
            tokens += t;
            taken.push(j);
        }
        if !taken.is_empty() {
            run_jobs(&base, taken, budget, &metrics);
        }
    }
}

/// Runs the taken jobs' rows in as few forwards as the budget allows and answers each job.
fn run_jobs(base: &BaseModel, jobs: Vec<Job>, budget: Budget, metrics: &Metrics) {
    let started = Instant::now();
    // Adapters that train their own encoder weights run alone: one class per such adapter.
    let mut solo: Vec<*const Served> = Vec::new();
    let mut rows = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let class = if job.served.shares_encoder {
            0
        } else {
            let p = Arc::as_ptr(&job.served);
            1 + solo.iter().position(|&q| q == p).unwrap_or_else(|| {
                solo.push(p);
                solo.len() - 1
            })
        };
        for (r, (ids, _)) in job.rows.iter().enumerate() {
            rows.push(RowRef {
                class,
                len: ids.len(),
                job: j,
                row: r,
            });
        }
    }
    let mut outputs: Vec<Vec<Vec<f32>>> = jobs
        .iter()
        .map(|j| vec![Vec::new(); j.rows.len()])
        .collect();
    let mut failed: Vec<Option<String>> = vec![None; jobs.len()];
    let mut first_run: Vec<Option<Duration>> = vec![None; jobs.len()];
    let mut busy = vec![Duration::ZERO; jobs.len()];
    for cut in plan(rows, budget.max_tokens, budget.forward_cost) {
        let t0 = Instant::now();
        let batch: Vec<adapterkit::task::TaskRow<'_>> = cut
            .iter()
            .map(|r| (&jobs[r.job].served.task, &jobs[r.job].rows[r.row]))
            .collect();
        let result = catch_unwind(AssertUnwindSafe(|| base.predict_mixed(&batch, false)));
        let took = t0.elapsed();
        let longest = cut.iter().map(|r| r.len).max().unwrap_or(0);
        let mut adapters: Vec<*const Served> = cut
            .iter()
            .map(|r| Arc::as_ptr(&jobs[r.job].served))
            .collect();
        adapters.sort();
        adapters.dedup();
        metrics.batch(cut.len(), cut.len() * longest, adapters.len(), took);
        let result = match result {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(format!("inference failed: {e}")),
            Err(_) => Err("inference failed: internal error (a bug; see the server log)".into()),
        };
        for r in &cut {
            busy[r.job] += took;
            first_run[r.job].get_or_insert(t0 - started);
        }
        match result {
            Ok(out) => {
                for (r, o) in cut.iter().zip(out) {
                    outputs[r.job][r.row] = o;
                }
            }
            Err(msg) => {
                tracing::error!("{msg}");
                for r in &cut {
                    failed[r.job] = Some(msg.clone());
                }
            }
        }
    }
    for (j, job) in jobs.into_iter().enumerate() {
        let waited = started.duration_since(job.enqueued) + first_run[j].unwrap_or_default();
        metrics.queued(waited);
        let answer = match failed[j].take() {
            Some(msg) => Err(msg),
            None => Ok(Answer {
                outputs: std::mem::take(&mut outputs[j]),
                queue: waited,
                inference: busy[j],
            }),
        };
        // The handler may have stopped waiting (timeout); nothing to do then.
        let _ = job.reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(class: usize, len: usize, job: usize, row: usize) -> RowRef {
        RowRef {
            class,
            len,
            job,
            row,
        }
    }

    fn lens(cuts: &[Vec<RowRef>]) -> Vec<Vec<(usize, usize)>> {
        cuts.iter()
            .map(|c| c.iter().map(|x| (x.class, x.len)).collect())
            .collect()
    }

    #[test]
    fn plan_sorts_by_length_keeps_classes_apart_and_respects_the_budget() {
        let rows = vec![
            r(0, 30, 0, 0),
            r(0, 5, 1, 0),
            r(1, 7, 2, 0),
            r(0, 6, 1, 1),
            r(0, 31, 0, 1),
        ];
        // A costly forward: everything of a class in one forward (4 × 31 = 124 ≤ 128).
        assert_eq!(
            lens(&plan(rows.clone(), 128, 1000)),
            vec![vec![(0, 5), (0, 6), (0, 30), (0, 31)], vec![(1, 7)]]
        );
        // A cheap forward: the short rows are not padded to 31 (2 × 6 + 2 × 31 + 2 × 10 = 94
        // against 4 × 31 + 10 = 134).
        assert_eq!(
            lens(&plan(rows.clone(), 128, 10)),
            vec![vec![(0, 5), (0, 6)], vec![(0, 30), (0, 31)], vec![(1, 7)]]
        );
        // The budget caps a forward: 3 × 31 > 64.
        for cut in plan(rows, 64, 1000) {
            let longest = cut.iter().map(|x| x.len).max().unwrap();
            assert!(cut.len() * longest <= 64, "{cut:?}");
        }
        // A row longer than the budget still runs, alone.
        let cuts = plan(vec![r(0, 100, 0, 0), r(0, 100, 0, 1)], 64, 0);
        assert_eq!(cuts.len(), 2);
        // Every row is planned exactly once.
        let many: Vec<RowRef> = (0..50).map(|i| r(i % 3, 1 + (i * 7) % 40, i, 0)).collect();
        let mut planned: Vec<usize> = plan(many, 200, 16).concat().iter().map(|x| x.job).collect();
        planned.sort();
        assert_eq!(planned, (0..50).collect::<Vec<_>>());
    }
}
