//! `adapterkit serve` on an ephemeral loopback port with the tiny fixture model: answers equal
//! local predictions for every adapter in mixed batches; the limits, auth, path checks and admin
//! changes under load behave as documented.

#[allow(dead_code)]
#[path = "../src/serve/client.rs"]
mod client;

use client::{HttpClient, HttpResponse};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

const TOKEN: &str = "test-token-0123456789abcdef";

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../adapterkit/tests/fixtures/tiny-bert")
}

fn ak() -> Command {
    Command::new(env!("CARGO_BIN_EXE_adapterkit"))
}

/// A temporary root with three trained adapters (`sent`: 2 classes, `topic`: 3 classes, LoRA;
/// `pairs`: sentence pairs, Compacter), made once for all tests.
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ak-serve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let data = [
            (
                "sent",
                "text,label\n",
                &["\"the movie was good\",pos", "\"the movie was awful\",neg"][..],
            ),
            (
                "topic",
                "text,label\n",
                &[
                    "\"great food here\",food",
                    "\"a fast car\",cars",
                    "\"rain again today\",weather",
                ][..],
            ),
            (
                "pairs",
                "text,pair,label\n",
                &[
                    "\"a man sleeps\",\"a person rests\",yes",
                    "\"a man sleeps\",\"a dog runs\",no",
                ][..],
            ),
        ];
        for (name, header, rows) in data {
            let mut csv = String::from(header);
            for i in 0..48 {
                csv.push_str(rows[i % rows.len()]);
                csv.push('\n');
            }
            let file = dir.join(format!("{name}.csv"));
            std::fs::write(&file, csv).unwrap();
            let mut args = vec![
                "train".to_string(),
                "--model".into(),
                tiny().to_str().unwrap().into(),
                "--train-file".into(),
                file.to_str().unwrap().into(),
                "--header".into(),
                "--epochs".into(),
                "2".into(),
                "--lr".into(),
                "0.01".into(),
                "--out".into(),
                root.join(name).to_str().unwrap().into(),
            ];
            if name == "pairs" {
                args.extend(["--pair-column".into(), "pair".into()]);
            }
            // `topic` is LoRA (q, v and the FFN's first projection), served as factors whose
            // updates run per row group, so its rows share forwards with the others'; `pairs` is
            // Compacter, whose PHM projections are built once at load.
            match name {
                "topic" => args.extend([
                    "--adapter-config".into(),
                    "lora[r=4,alpha=8,intermediate_lora=True]".into(),
                ]),
                "pairs" => args.extend([
                    "--adapter-config".into(),
                    "compacter[reduction_factor=4, phm_dim=2]".into(),
                ]),
                _ => args.extend(["--bottleneck".into(), "4".into()]),
            }
            let o = ak().args(&args).output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        std::fs::write(dir.join("token"), TOKEN).unwrap();
        root
    })
}

/// A running server; killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let root = root();
        let token = root.parent().unwrap().join("token");
        let mut child = ak()
            .args(["serve", "--model", tiny().to_str().unwrap(), "--adapters"])
            .arg(root)
            .args(["--bind", "127.0.0.1:0", "--admin-token-file"])
            .arg(&token)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Server { child, url: addr }
    }

    /// `predict` on another thread, to be joined for its answer.
    fn predict_in_background(&self, body: Value) -> std::thread::JoinHandle<HttpResponse> {
        let url = self.url.clone();
        std::thread::spawn(move || {
            let mut c = HttpClient::new(&url, Duration::from_secs(60)).unwrap();
            c.post_json("/predict", &[], &body.to_string()).unwrap()
        })
    }

    fn client(&self) -> HttpClient {
        HttpClient::new(&self.url, Duration::from_secs(60)).unwrap()
    }

    fn predict(&self, body: Value) -> HttpResponse {
        self.client()
            .post_json("/predict", &[], &body.to_string())
            .unwrap()
    }
}

fn json_of(r: &HttpResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

/// `adapterkit predict` of `adapter` for `texts` (`TEXT\tPAIR` for pairs): probabilities per label.
fn local(adapter: &str, texts: &[&str]) -> Vec<serde_json::Map<String, Value>> {
    let o = ak()
        .args(["predict", "--model", tiny().to_str().unwrap(), "--adapter"])
        .arg(root().join(adapter))
        .args(texts)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["probabilities"]
                .as_object()
                .unwrap()
                .clone()
        })
        .collect()
}

fn assert_close(got: &Value, want: &serde_json::Map<String, Value>) {
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for p in got {
        let w = want[p["label"].as_str().unwrap()].as_f64().unwrap();
        let g = p["score"].as_f64().unwrap();
        assert!((g - w).abs() <= 1e-5, "{got:?} vs {want:?}");
    }
    let scores: Vec<f64> = got.iter().map(|p| p["score"].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "not sorted: {scores:?}"
    );
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in metrics"))
}

#[test]
fn mixed_adapter_batches_answer_as_each_adapter_alone() {
    // A batching window makes the concurrent requests below share forwards.
    let server = Server::start(&["--max-batch-wait-ms", "300"]);
    let sent = ["the movie was good", "the movie was awful", "good"];
    let topic = ["great food here", "a fast car", "rain"];
    let want_sent = local("sent", &sent);
    let want_topic = local("topic", &topic);
    let want_pairs = local("pairs", &["a man sleeps\ta person rests"]);
    let handles: Vec<_> = (0..9)
        .map(|i| {
            let url = server.url.clone();
            std::thread::spawn(move || {
                let mut c = HttpClient::new(&url, Duration::from_secs(60)).unwrap();
                let body = match i % 3 {
                    0 => json!({"inputs": sent[i / 3], "adapter": "sent"}),
                    1 => json!({"inputs": [topic[i / 3]], "adapter": "topic"}),
                    _ => json!({"inputs": ["a man sleeps", "a person rests"], "adapter": "pairs"}),
                };
                let r = c.post_json("/predict", &[], &body.to_string()).unwrap();
                (i, r)
            })
        })
        .collect();
    for h in handles {
        let (i, r) = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let v = json_of(&r);
        match i % 3 {
            0 => {
                assert_eq!(r.header("x-adapter"), Some("sent"));
                assert_close(&v, &want_sent[i / 3]);
            }
            1 => assert_close(&v[0], &want_topic[i / 3]),
            _ => assert_close(&v, &want_pairs[0]),
        }
        for h in ["x-queue-time", "x-inference-time", "x-total-time"] {
            assert!(r.header(h).is_some(), "no {h}");
        }
    }
    let m = server.client().get("/metrics").unwrap().text();
    // At least one forward ran rows of more than one adapter.
    let forwards = metric(&m, "adapterkit_batch_adapters_count");
    let adapters = metric(&m, "adapterkit_batch_adapters_sum");
    assert!(
        adapters > forwards,
        "no mixed forward: {adapters} adapters in {forwards} forwards"
    );
    assert!(
        m.contains("adapterkit_requests_total{adapter=\"sent\",status=\"200\"} 3"),
        "{m}"
    );
    // A batch request answers a list per input, raw scores on request.
    let r = server.predict(json!({"inputs": sent, "adapter": "sent", "raw_scores": true}));
    let v = json_of(&r);
    assert_eq!(v.as_array().unwrap().len(), 3);
    let sum: f64 = v[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["score"].as_f64().unwrap())
        .sum();
    assert!(
        (sum - 1.0).abs() > 1e-3,
        "raw scores look like probabilities: {v}"
    );
    // `predict --server` prints what local `predict` prints.
    let o = ak()
        .args(["predict", "--server", &server.url, "--name", "topic"])
        .args(topic)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (line, want) in String::from_utf8_lossy(&o.stdout).lines().zip(&want_topic) {
        let v: Value = serde_json::from_str(line).unwrap();
        for (k, w) in want {
            let g = v["probabilities"][k].as_f64().unwrap();
            assert!((g - w.as_f64().unwrap()).abs() <= 1e-5);
        }
    }
}

#[test]
fn bad_requests_get_the_status_and_a_message_naming_the_field() {
    let server = Server::start(&["--max-body-bytes", "2048", "--max-client-batch-size", "4"]);
    let mut c = server.client();
    let r = c.post_json("/predict", &[], "{\"inputs\": ").unwrap();
    assert_eq!(r.status, 400);
    assert!(
        json_of(&r)["error"].as_str().unwrap().contains("EOF"),
        "{}",
        r.text()
    );
    let r = c
        .post_json(
            "/predict",
            &[],
            "{\"inputz\": \"x\", \"adapter\": \"sent\"}",
        )
        .unwrap();
    assert_eq!(r.status, 422);
    assert!(r.text().contains("inputz"), "{}", r.text());
    let r = server.predict(json!({"inputs": "x", "adapter": "nope"}));
    assert_eq!(r.status, 404);
    let e = json_of(&r);
    assert!(e["error"].as_str().unwrap().contains("`nope`"), "{e}");
    assert_eq!(e["error_type"], "NotFound");
    // Three adapters and no --default-adapter: a request without one is refused, naming them.
    let r = server.predict(json!({"inputs": "x"}));
    assert_eq!(r.status, 422);
    assert!(r.text().contains("pairs, sent, topic"), "{}", r.text());
    let r = server.predict(json!({"inputs": ["a", "b", "c", "d", "e"], "adapter": "sent"}));
    assert_eq!(r.status, 422);
    assert!(r.text().contains("--max-client-batch-size"), "{}", r.text());
    let r = server.predict(json!({"inputs": "a", "adapter": "pairs"}));
    assert_eq!(r.status, 422);
    assert!(r.text().contains("pair"), "{}", r.text());
    let long = "word ".repeat(500);
    let r = server.predict(json!({"inputs": long.clone(), "adapter": "sent"}));
    assert_eq!(r.status, 413, "{}", r.text());
    let r = server
        .predict(json!({"inputs": "word ".repeat(200), "adapter": "sent", "truncate": false}));
    assert_eq!(r.status, 413);
    assert!(r.text().contains("truncate"), "{}", r.text());
    let r = server.predict(json!({"inputs": "word ".repeat(200), "adapter": "sent"}));
    assert_eq!(r.status, 200, "{}", r.text());
    // The connection still works after errors.
    assert_eq!(c.get("/health").unwrap().status, 200);
}

#[test]
fn admin_needs_the_token_and_stays_inside_the_root() {
    let server = Server::start(&[]);
    let mut c = server.client();
    let body = json!({"name": "copy", "path": "sent"}).to_string();
    let r = c.post_json("/adapters", &[], &body).unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = c
        .post_json(
            "/adapters",
            &[("Authorization", "Bearer wrong-token-0123456789")],
            &body,
        )
        .unwrap();
    assert_eq!(r.status, 401);
    let auth = format!("Bearer {TOKEN}");
    let h = [("Authorization", auth.as_str())];
    let r = c.send("DELETE", "/adapters/sent", &[], b"").unwrap();
    assert_eq!(r.status, 401);
    for (path, status) in [("../root/sent", 403), ("/etc", 403), ("missing", 422)] {
        let r = c
            .post_json(
                "/adapters",
                &h,
                &json!({"name": "x", "path": path}).to_string(),
            )
            .unwrap();
        assert_eq!(r.status, status, "{path}: {}", r.text());
    }
    // A symlink inside the root that points out of it is refused too.
    let link = root().join("escape");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(root().parent().unwrap(), &link).unwrap();
    let r = c
        .post_json(
            "/adapters",
            &h,
            &json!({"name": "x", "path": "escape"}).to_string(),
        )
        .unwrap();
    std::fs::remove_file(&link).unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    let r = c
        .post_json(
            "/adapters",
            &h,
            &json!({"name": "../x", "path": "sent"}).to_string(),
        )
        .unwrap();
    assert_eq!(r.status, 422);
    let r = c.post_json("/adapters", &h, &body).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let list = json_of(&c.get("/adapters").unwrap());
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["copy", "pairs", "sent", "topic"]);
    assert_eq!(
        server
            .predict(json!({"inputs": "good", "adapter": "copy"}))
            .status,
        200
    );
    assert_eq!(
        c.send("DELETE", "/adapters/copy", &h, b"").unwrap().status,
        200
    );
    assert_eq!(
        c.send("DELETE", "/adapters/copy", &h, b"").unwrap().status,
        404
    );
    assert_eq!(
        server
            .predict(json!({"inputs": "good", "adapter": "copy"}))
            .status,
        404
    );
}

#[test]
fn a_full_queue_answers_429_and_a_slow_answer_504() {
    let server = Server::start(&[
        "--max-concurrent-requests",
        "1",
        "--max-batch-wait-ms",
        "800",
    ]);
    let first = server.predict_in_background(json!({"inputs": "good", "adapter": "sent"}));
    std::thread::sleep(Duration::from_millis(300));
    let r = server.predict(json!({"inputs": "good", "adapter": "sent"}));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(first.join().unwrap().status, 200);
    drop(server);
    let server = Server::start(&["--request-timeout-ms", "100", "--max-batch-wait-ms", "600"]);
    let r = server.predict(json!({"inputs": "good", "adapter": "sent"}));
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("--request-timeout-ms"));
}

#[test]
fn adapters_load_and_unload_while_requests_are_in_flight() {
    let server = Server::start(&[]);
    let want = local("sent", &["the movie was good"])[0].clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (url, stop, want) = (server.url.clone(), stop.clone(), want.clone());
            std::thread::spawn(move || {
                let mut c = HttpClient::new(&url, Duration::from_secs(60)).unwrap();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let body = json!({"inputs": "the movie was good", "adapter": "sent"});
                    let r = c.post_json("/predict", &[], &body.to_string()).unwrap();
                    assert_eq!(r.status, 200, "{}", r.text());
                    assert_close(&json_of(&r), &want);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut c = server.client();
    let auth = format!("Bearer {TOKEN}");
    let h = [("Authorization", auth.as_str())];
    for i in 0..10 {
        // Replace the adapter in use (same weights) and add and drop another.
        let r = c
            .post_json(
                "/adapters",
                &h,
                &json!({"name": "sent", "path": "sent"}).to_string(),
            )
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let name = format!("extra{i}");
        let r = c
            .post_json(
                "/adapters",
                &h,
                &json!({"name": name, "path": "topic"}).to_string(),
            )
            .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(
            c.send("DELETE", &format!("/adapters/{name}"), &h, b"")
                .unwrap()
                .status,
            200
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered: usize = clients.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(answered > 0);
}

#[test]
fn sigterm_drains_accepted_requests() {
    let mut server = Server::start(&["--max-batch-wait-ms", "700"]);
    let pending = server.predict_in_background(json!({"inputs": "good", "adapter": "sent"}));
    std::thread::sleep(Duration::from_millis(250));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert_eq!(pending.join().unwrap().status, 200);
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
