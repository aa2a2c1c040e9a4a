//! `adapterkit loadgen`: a closed-loop load generator for `adapterkit serve`, bounded in requests
//! and time. Each client thread sends one request at a time from a JSONL file of requests with
//! their expected answers, and every answer is checked: right adapter, right labels, probabilities
//! within a tolerance. Optionally reloads and churns adapters through the admin API meanwhile.

use super::client::{HttpClient, Scored};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args)]
pub(crate) struct LoadgenArgs {
    /// The server, http://HOST:PORT.
    #[arg(long)]
    url: String,
    /// JSONL, one request per line: {"adapter", "text", "pair"?, "expected": {label: probability}}
    /// (`expected` as `adapterkit predict` prints `probabilities`; optional).
    #[arg(long)]
    requests: PathBuf,
    /// Concurrent clients, each with one connection and one request in flight.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Requests to send in all (the file is cycled).
    #[arg(long, default_value_t = 2000)]
    total: usize,
    /// Stop sending after this many seconds, whatever is left.
    #[arg(long, default_value_t = 60.0)]
    max_seconds: f64,
    /// Largest allowed difference between an answer's probability and the expected one.
    #[arg(long, default_value_t = 1e-5)]
    tolerance: f32,
    /// While the load runs, reload NAME from PATH (same weights: its answers must not change) and
    /// load and unload a copy named NAME-churn, over and over. Repeatable; needs the admin token.
    #[arg(long, value_name = "NAME=PATH")]
    reload: Vec<String>,
    /// File with the admin bearer token (for --reload).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Label for this run in the JSON printed.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Deserialize)]
struct Line {
    adapter: String,
    text: String,
    #[serde(default)]
    pair: Option<String>,
    #[serde(default)]
    expected: Option<BTreeMap<String, f32>>,
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    statuses: BTreeMap<u16, usize>,
    lost: usize,
    cross_routed: usize,
    mismatched: usize,
    checked: usize,
    max_abs_diff: f32,
    errors: Vec<String>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The machine's CPU model, for the record.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Checks one answer against its line; returns a message when it is wrong.
fn check(line: &Line, body: &[u8], adapter_header: Option<&str>, tol: f32, t: &mut Tally) {
    if adapter_header != Some(line.adapter.as_str()) {
        t.cross_routed += 1;
        t.errors.push(format!(
            "asked `{}`, answered by {adapter_header:?}",
            line.adapter
        ));
        return;
    }
    let Some(expected) = &line.expected else {
        return;
    };
    let got: Vec<Scored> = match serde_json::from_slice(body) {
        Ok(g) => g,
        Err(e) => {
            t.mismatched += 1;
            t.errors
                .push(format!("answer is not a prediction list: {e}"));
            return;
        }
    };
    t.checked += 1;
    let labels: Vec<&String> = {
        let mut l: Vec<&String> = got.iter().map(|p| &p.label).collect();
        l.sort();
        l
    };
    if labels != expected.keys().collect::<Vec<_>>() {
        t.cross_routed += 1;
        t.errors.push(format!(
            "`{}`: labels {labels:?}, expected {:?}",
            line.adapter,
            expected.keys()
        ));
        return;
    }
    let worst = got
        .iter()
        .map(|p| (p.score - expected[&p.label]).abs())
        .fold(0f32, f32::max);
    t.max_abs_diff = t.max_abs_diff.max(worst);
    if worst > tol {
        t.mismatched += 1;
        t.errors.push(format!(
            "`{}` on {:?}: off by {worst:e}",
            line.adapter, line.text
        ));
    }
}

fn churn(
    url: &str,
    token: &str,
    targets: &[(String, String)],
    stop: &AtomicBool,
) -> (usize, Vec<String>) {
    let mut ops = 0;
    let mut failures = Vec::new();
    let Ok(mut c) = HttpClient::new(url, Duration::from_secs(60)) else {
        return (0, vec!["bad url".into()]);
    };
    let auth = format!("Bearer {token}");
    while !stop.load(Ordering::Relaxed) {
        for (name, path) in targets {
            let churned = format!("{name}-churn");
            let steps = [
                (
                    "POST",
                    "/adapters".to_string(),
                    json!({"name": name, "path": path}).to_string(),
                    200,
                ),
                (
                    "POST",
                    "/adapters".to_string(),
                    json!({"name": churned, "path": path}).to_string(),
                    201,
                ),
                ("DELETE", format!("/adapters/{churned}"), String::new(), 200),
            ];
            for (method, path, body, want) in steps {
                match c.send(method, &path, &[("Authorization", &auth)], body.as_bytes()) {
                    Ok(r) if r.status == want => ops += 1,
                    Ok(r) => failures.push(format!("{method} {path}: {} {}", r.status, r.text())),
                    Err(e) => failures.push(format!("{method} {path}: {e}")),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (ops, failures)
}

pub(crate) fn loadgen(a: LoadgenArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.requests)
        .with_context(|| format!("reading {}", a.requests.display()))?;
    let lines: Vec<Line> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}", a.requests.display(), i + 1))
        })
        .collect::<Result<_>>()?;
    if lines.is_empty() {
        bail!("{}: no requests", a.requests.display());
    }
    if a.clients == 0 || a.total == 0 {
        bail!("--clients and --total must be at least 1");
    }
    let mut targets = Vec::new();
    for r in &a.reload {
        let Some((n, p)) = r.split_once('=') else {
            bail!("--reload {r}: write NAME=PATH");
        };
        targets.push((n.to_string(), p.to_string()));
    }
    let token = match (&a.admin_token_file, targets.is_empty()) {
        (_, true) => String::new(),
        (Some(p), false) => std::fs::read_to_string(p)
            .with_context(|| format!("--admin-token-file {}", p.display()))?
            .trim()
            .to_string(),
        (None, false) => bail!("--reload needs --admin-token-file"),
    };
    // Fail early on a wrong URL.
    HttpClient::new(&a.url, Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("--url {e}"))?
        .get("/health")
        .with_context(|| format!("{}/health", a.url))?;
    let lines = Arc::new(lines);
    let next = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs_f64(a.max_seconds);
    let churner = (!targets.is_empty()).then(|| {
        let (url, stop) = (a.url.clone(), Arc::clone(&stop));
        std::thread::spawn(move || churn(&url, &token, &targets, &stop))
    });
    let start = Instant::now();
    let workers: Vec<_> = (0..a.clients)
        .map(|_| {
            let (lines, next, tally) = (Arc::clone(&lines), Arc::clone(&next), Arc::clone(&tally));
            let (url, total, tol) = (a.url.clone(), a.total, a.tolerance);
            std::thread::spawn(move || {
                let Ok(mut c) = HttpClient::new(&url, Duration::from_secs(120)) else {
                    return;
                };
                let mut local = Tally::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total || Instant::now() >= deadline {
                        break;
                    }
                    let line = &lines[i % lines.len()];
                    let inputs = match &line.pair {
                        Some(p) => json!([line.text, p]),
                        None => json!(line.text),
                    };
                    let body = json!({"inputs": inputs, "adapter": line.adapter}).to_string();
                    let t0 = Instant::now();
                    match c.post_json("/predict", &[], &body) {
                        Ok(r) => {
                            local.latencies_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                            *local.statuses.entry(r.status).or_default() += 1;
                            if r.status == 200 {
                                check(line, &r.body, r.header("x-adapter"), tol, &mut local);
                            } else if local.errors.len() < 5 {
                                local.errors.push(format!("{}: {}", r.status, r.text()));
                            }
                        }
                        Err(e) => {
                            local.lost += 1;
                            local.errors.push(format!("no answer: {e}"));
                        }
                    }
                }
                if let Ok(mut t) = tally.lock() {
                    t.latencies_ms.extend(local.latencies_ms);
                    for (s, n) in local.statuses {
                        *t.statuses.entry(s).or_default() += n;
                    }
                    t.lost += local.lost;
                    t.cross_routed += local.cross_routed;
                    t.mismatched += local.mismatched;
                    t.checked += local.checked;
                    t.max_abs_diff = t.max_abs_diff.max(local.max_abs_diff);
                    t.errors.extend(local.errors.into_iter().take(5));
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (churn_ops, churn_failures) = match churner {
        Some(h) => h
            .join()
            .unwrap_or((0, vec!["churn thread panicked".into()])),
        None => (0, Vec::new()),
    };
    let t = match Arc::try_unwrap(tally) {
        Ok(m) => m.into_inner().unwrap_or_default(),
        Err(_) => bail!("a client thread is still running"),
    };
    let mut lat = t.latencies_ms.clone();
    lat.sort_by(f64::total_cmp);
    let answered = lat.len();
    let server_errors: usize = t
        .statuses
        .iter()
        .filter(|(s, _)| **s >= 500)
        .map(|(_, n)| n)
        .sum();
    let ok = t.statuses.get(&200).copied().unwrap_or(0);
    let report = json!({
        "label": a.label,
        "cpu": cpu_model(),
        "clients": a.clients,
        "sent": answered + t.lost,
        "ok": ok,
        "statuses": t.statuses,
        "lost": t.lost,
        "server_errors": server_errors,
        "cross_routed": t.cross_routed,
        "mismatched": t.mismatched,
        "checked": t.checked,
        "max_abs_diff": t.max_abs_diff,
        "seconds": elapsed,
        "requests_per_s": ok as f64 / elapsed,
        "latency_ms": {"p50": percentile(&lat, 0.5), "p90": percentile(&lat, 0.9), "p99": percentile(&lat, 0.99)},
        "churn_ops": churn_ops,
        "churn_failures": churn_failures.len(),
        "first_errors": t.errors.iter().chain(&churn_failures).take(10).collect::<Vec<_>>(),
    });
    println!("{report}");
    eprintln!(
        "{} ok of {} sent in {elapsed:.1} s ({:.1}/s); lost {}, 5xx {server_errors}, cross-routed {}, mismatched {} (max diff {:e}); churn ops {churn_ops}, failed {}",
        ok,
        answered + t.lost,
        ok as f64 / elapsed,
        t.lost,
        t.cross_routed,
        t.mismatched,
        t.max_abs_diff,
        churn_failures.len()
    );
    Ok(())
}
