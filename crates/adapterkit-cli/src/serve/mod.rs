//! `adapterkit serve`: one base model, every adapter under a root, over HTTP. Requests for
//! different adapters are batched together and run as one forward of the shared base, each row
//! through its own adapter and head.

mod api;
mod batcher;
pub(crate) mod client;
pub(crate) mod loadgen;
mod metrics;
mod registry;

use anyhow::{bail, Context, Result};
use api::{parse_body, parse_inputs, predictions, ApiError, LoadRequest, PredictRequest};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use batcher::{Answer, Budget, Job};
use clap::Args;
use metrics::Metrics;
use registry::Registry;
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Semaphore};

/// Environment variable that may hold the admin token (when --admin-token-file is not given).
pub(crate) const ADMIN_TOKEN_ENV: &str = "ADAPTERKIT_ADMIN_TOKEN";

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Base model directory [default: the cached all-MiniLM-L6-v2].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Number format of the frozen projections' products: f32, or fp16 (fp16 products with f32
    /// sums, on CPUs with AVX512_FP16; about 4e-3 from f32 on MiniLM's hidden states).
    #[arg(long, default_value = "f32")]
    precision: adapterkit::Precision,
    /// Directory whose subdirectories are adapter directories (ours or AdapterHub's); each is
    /// served under its directory name. Admin loads must come from inside it.
    #[arg(long)]
    adapters: PathBuf,
    /// Address to listen on (loopback by default; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: String,
    /// Adapter for requests that name none [default: the only adapter, when there is one].
    #[arg(long)]
    default_adapter: Option<String>,
    /// Padded tokens per forward of the base (rows × longest row).
    #[arg(long, default_value_t = 16384)]
    max_batch_tokens: usize,
    /// Requests batched together at most.
    #[arg(long, default_value_t = 64)]
    max_batch_requests: usize,
    /// Milliseconds the first request of an idle server waits for others to share its batch (0:
    /// run at once; requests that arrive while a batch runs are batched anyway).
    #[arg(long, default_value_t = 0)]
    max_batch_wait_ms: u64,
    /// What one forward costs beyond its padded tokens, in tokens: rows of very different lengths
    /// run in separate forwards when the padding saved is worth more.
    #[arg(long, default_value_t = 64)]
    forward_cost_tokens: usize,
    /// Requests accepted at once (queued or running); more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 512)]
    max_concurrent_requests: usize,
    /// Inputs per request at most (more: 422).
    #[arg(long, default_value_t = 32)]
    max_client_batch_size: usize,
    /// Request body bytes at most (more: 413).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Milliseconds a request may wait for its answer (then 504, and its rows are not run).
    #[arg(long, default_value_t = 30_000)]
    request_timeout_ms: u64,
    /// File holding the bearer token for the admin endpoints (POST/DELETE /adapters); without it,
    /// $ADAPTERKIT_ADMIN_TOKEN; without either, admin is disabled.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
}

/// What every handler shares.
struct AppState {
    base: Arc<adapterkit::BaseModel>,
    model_dir: PathBuf,
    registry: Registry,
    default_adapter: Option<String>,
    admin_token: Option<String>,
    permits: Arc<Semaphore>,
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    limits: serde_json::Value,
    max_client_batch_size: usize,
    timeout: Duration,
}

fn admin_token(a: &ServeArgs) -> Result<Option<String>> {
    let token = match &a.admin_token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("--admin-token-file {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .map(|t| t.trim().to_string()),
    };
    match token {
        Some(t) if t.len() < 16 => bail!(
            "the admin token is {} characters; use at least 16 (e.g. `openssl rand -hex 32`)",
            t.len()
        ),
        t => Ok(t),
    }
}

/// Loads everything, binds, prints `listening on http://ADDR`, serves until SIGINT/SIGTERM and
/// then drains what was accepted.
pub(crate) fn serve(a: ServeArgs) -> Result<()> {
    for (flag, v) in [
        ("--max-batch-tokens", a.max_batch_tokens),
        ("--max-batch-requests", a.max_batch_requests),
        ("--max-concurrent-requests", a.max_concurrent_requests),
        ("--max-client-batch-size", a.max_client_batch_size),
        ("--max-body-bytes", a.max_body_bytes),
    ] {
        if v == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    let admin_token = admin_token(&a)?;
    let registry = Registry::new(&a.adapters)?;
    let found = registry::discover(&registry.root)?;
    let model_dir = a
        .model
        .clone()
        .unwrap_or_else(adapterkit::default_model_dir);
    let base = Arc::new(crate::cmd::load_base_in(&a.model, a.precision)?);
    for (name, dir) in &found {
        registry.insert(registry::load(&base, name, dir)?);
    }
    let default_adapter = match &a.default_adapter {
        Some(d) => {
            if registry.get(d).is_none() {
                bail!(
                    "--default-adapter {d}: no adapter directory `{d}` under {}",
                    registry.root.display()
                );
            }
            Some(d.clone())
        }
        None if found.len() == 1 => Some(found[0].0.clone()),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&a.bind))
        .with_context(|| format!("--bind {}", a.bind))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = mpsc::channel::<Job>();
    let budget = Budget {
        max_tokens: a.max_batch_tokens,
        max_requests: a.max_batch_requests,
        max_wait: Duration::from_millis(a.max_batch_wait_ms),
        forward_cost: a.forward_cost_tokens,
    };
    let batcher = {
        let (base, metrics) = (Arc::clone(&base), Arc::clone(&metrics));
        // Inference runs on a worker of the pool that does its parallel work, as in the CLI.
        let pool = rayon::ThreadPoolBuilder::new()
            .build()
            .context("starting the inference thread pool")?;
        std::thread::Builder::new()
            .name("batcher".into())
            .spawn(move || pool.install(|| batcher::run(base, rx, budget, metrics)))
            .context("starting the batcher thread")?
    };
    let state = Arc::new(AppState {
        base,
        model_dir,
        registry,
        default_adapter,
        admin_token,
        permits: Arc::new(Semaphore::new(a.max_concurrent_requests)),
        jobs: tx,
        metrics,
        limits: json!({
            "max_batch_tokens": a.max_batch_tokens,
            "max_batch_requests": a.max_batch_requests,
            "max_batch_wait_ms": a.max_batch_wait_ms,
            "forward_cost_tokens": a.forward_cost_tokens,
            "max_concurrent_requests": a.max_concurrent_requests,
            "max_client_batch_size": a.max_client_batch_size,
            "max_body_bytes": a.max_body_bytes,
            "request_timeout_ms": a.request_timeout_ms,
        }),
        max_client_batch_size: a.max_client_batch_size,
        timeout: Duration::from_millis(a.request_timeout_ms),
    });
    let n = state.registry.snapshot().len();
    let app = router(state, a.max_body_bytes);
    println!("listening on http://{addr} ({n} adapters)");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    runtime
        .block_on(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
        })
        .context("serving")?;
    // Every connection is closed, so every request was answered; the batcher stops once the
    // last handler's copy of the queue is gone.
    let wait = Instant::now();
    while !batcher.is_finished() && wait.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    if batcher.is_finished() && batcher.join().is_err() {
        bail!("the batcher thread panicked");
    }
    eprintln!("shut down: every accepted request was answered");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/predict", post(predict))
        .route("/adapters", get(list_adapters).post(load_adapter))
        .route("/adapters/{name}", delete(unload_adapter))
        .route("/info", get(info))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// A body, or the error saying why it could not be read (413 over the limit).
fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body is over the size limit (--max-body-bytes)".to_string()
        } else {
            format!("request body: {}", e.body_text())
        };
        ApiError::new(status, message)
    })
}

fn ms(d: Duration) -> HeaderValue {
    HeaderValue::from(d.as_millis() as u64)
}

async fn predict(State(s): State<Arc<AppState>>, raw: Result<Bytes, BytesRejection>) -> Response {
    let start = Instant::now();
    let (name, result) = predict_inner(&s, raw, start).await;
    let status = match &result {
        Ok(_) => StatusCode::OK,
        Err(e) => e.status,
    };
    s.metrics.request(&name, status.as_u16());
    match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The `/predict` work; returns the adapter name for the metrics (`<unknown>` when none resolved).
async fn predict_inner(
    s: &Arc<AppState>,
    raw: Result<Bytes, BytesRejection>,
    start: Instant,
) -> (String, Result<Response, ApiError>) {
    let unknown = "<unknown>".to_string();
    let Ok(_permit) = Arc::clone(&s.permits).try_acquire_owned() else {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "the server is at --max-concurrent-requests; retry later",
        );
        e.retry_after = Some(1);
        return (unknown, Err(e));
    };
    let req: PredictRequest = match body(raw).and_then(|b| parse_body(&b)) {
        Ok(r) => r,
        Err(e) => return (unknown, Err(e)),
    };
    let Some(name) = req.adapter.clone().or_else(|| s.default_adapter.clone()) else {
        return (
            unknown,
            Err(ApiError::invalid(format!(
                "`adapter` is missing and the server has no default adapter; name one of: {}",
                loaded_names(s)
            ))),
        );
    };
    let Some(served) = s.registry.get(&name) else {
        return (
            unknown,
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "adapter `{}` is not loaded; loaded: {}",
                    name.escape_debug(),
                    loaded_names(s)
                ),
            )),
        );
    };
    let r = run_predict(s, &req, Arc::clone(&served), start).await;
    (name, r)
}

/// The served names, for errors.
fn loaded_names(s: &AppState) -> String {
    let names: Vec<String> = s.registry.snapshot().keys().cloned().collect();
    if names.is_empty() {
        "(none)".into()
    } else {
        names.join(", ")
    }
}

async fn run_predict(
    s: &Arc<AppState>,
    req: &PredictRequest,
    served: Arc<registry::Served>,
    start: Instant,
) -> Result<Response, ApiError> {
    if let Some(d) = req.truncation_direction.as_deref() {
        if !d.eq_ignore_ascii_case("right") {
            return Err(ApiError::invalid(format!(
                "`truncation_direction` {d:?} is not supported; only \"right\""
            )));
        }
    }
    let inputs = parse_inputs(&req.inputs, served.info.pair, &served.info.name)?;
    if inputs.items.len() > s.max_client_batch_size {
        return Err(ApiError::invalid(format!(
            "`inputs` has {} items; at most {} per request (--max-client-batch-size)",
            inputs.items.len(),
            s.max_client_batch_size
        )));
    }
    let encoded = s
        .base
        .tokenizer
        .encode_checked(&inputs.items, served.task.max_len)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if !req.truncate {
        if let Some(i) = encoded.iter().position(|e| e.truncated) {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "`inputs[{i}]` is longer than adapter `{}`'s {} tokens and `truncate` is false",
                    served.info.name, served.task.max_len
                ),
            ));
        }
    }
    let tokenized = Instant::now();
    s.metrics.tokenization(tokenized - start);
    let (reply, answer) = oneshot::channel();
    let cancelled = Arc::new(AtomicBool::new(false));
    let job = Job {
        served: Arc::clone(&served),
        rows: encoded.into_iter().map(|e| (e.ids, e.type_ids)).collect(),
        enqueued: tokenized,
        cancelled: Arc::clone(&cancelled),
        reply,
    };
    s.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    if s.jobs.send(job).is_err() {
        s.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    let answer: Answer = match tokio::time::timeout(s.timeout, answer).await {
        Ok(Ok(Ok(a))) => a,
        Ok(Ok(Err(msg))) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg)),
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the batcher dropped the request (a bug; see the server log)",
            ))
        }
        Err(_) => {
            cancelled.store(true, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "no answer within {} ms (--request-timeout-ms)",
                    s.timeout.as_millis()
                ),
            ));
        }
    };
    let rows: Vec<Vec<api::Prediction>> = answer
        .outputs
        .iter()
        .map(|o| predictions(&served.info.labels, o, req.raw_scores))
        .collect();
    let body = if inputs.single {
        json!(rows.into_iter().next().unwrap_or_default())
    } else {
        json!(rows)
    };
    let mut r = Json(body).into_response();
    let h = r.headers_mut();
    h.insert(
        "x-adapter",
        HeaderValue::from_str(&served.info.name).unwrap_or(HeaderValue::from_static("?")),
    );
    h.insert("x-tokenization-time", ms(tokenized - start));
    h.insert("x-queue-time", ms(answer.queue));
    h.insert("x-inference-time", ms(answer.inference));
    h.insert("x-total-time", ms(start.elapsed()));
    Ok(r)
}

async fn list_adapters(State(s): State<Arc<AppState>>) -> Response {
    let snap = s.registry.snapshot();
    let list: Vec<&registry::AdapterInfo> = snap.values().map(|a| &a.info).collect();
    Json(json!(list)).into_response()
}

async fn info(State(s): State<Arc<AppState>>) -> Response {
    let c = &s.base.config;
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "revision": env!("ADAPTERKIT_BUILD_REVISION"),
        "model": {
            "dir": s.model_dir,
            "model_type": c.model_type,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "parameters": s.base.num_params(),
        },
        "adapter_root": s.registry.root,
        "adapters": s.registry.snapshot().len(),
        "default_adapter": s.default_adapter,
        "admin": s.admin_token.is_some(),
        "limits": s.limits,
    }))
    .into_response()
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    Json(json!({"status": "ok", "adapters": s.registry.snapshot().len()})).into_response()
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    let text = s.metrics.render(s.registry.snapshot().len());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Constant-time equality, so the comparison does not tell how much of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &s.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "admin is disabled: start the server with --admin-token-file or ${ADMIN_TOKEN_ENV}"
            ),
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_secret(g.trim().as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the bearer token is wrong",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "admin endpoints need `Authorization: Bearer <token>`",
        )),
    }
}

async fn load_adapter(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    match load_inner(&s, &headers, raw).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn load_inner(
    s: &Arc<AppState>,
    headers: &HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(s, headers)?;
    let req: LoadRequest = parse_body(&body(raw)?)?;
    registry::validate_name(&req.name).map_err(|m| ApiError::invalid(format!("`name`: {m}")))?;
    let dir = s.registry.resolve(&req.path).map_err(|m| {
        let status = if m.contains("outside the adapter root") || m.contains("`..`") {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        ApiError::new(status, m)
    })?;
    let (base, name) = (Arc::clone(&s.base), req.name.clone());
    let served = tokio::task::spawn_blocking(move || registry::load(&base, &name, &dir))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    let info = served.info.clone();
    let replaced = s.registry.insert(served);
    let status = if replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    tracing::info!(
        "adapter `{}` loaded from {}",
        info.name,
        info.source.display()
    );
    Ok((status, Json(json!({"adapter": info, "replaced": replaced}))).into_response())
}

async fn unload_adapter(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    if let Err(e) = authorize(&s, &headers) {
        return e.into_response();
    }
    if s.registry.remove(&name) {
        tracing::info!("adapter `{name}` unloaded");
        Json(json!({"unloaded": name})).into_response()
    } else {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("adapter `{}` is not loaded", name.escape_debug()),
        )
        .into_response()
    }
}
