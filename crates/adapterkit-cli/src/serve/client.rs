//! A small blocking HTTP/1.1 client over one kept-alive loopback connection: what
//! `predict --server`, the load generator and the server's tests need, without a client crate.
//! Plain `http://` only. Uses the standard library and serde alone, so tests can include this file as is.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One `{"label", "score"}` of a `/predict` answer.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Scored {
    /// The label.
    pub label: String,
    /// Its probability or raw score.
    pub score: f32,
}

/// An answer: status, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One connection to a server.
pub struct HttpClient {
    host: String,
    stream: Option<BufReader<TcpStream>>,
    timeout: Duration,
}

/// `host:port` of an `http://host:port[/]` URL.
pub fn host_of(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(format!(
            "{url}: give the server's address only, e.g. http://127.0.0.1:8080"
        ));
    }
    Ok(host.to_string())
}

impl HttpClient {
    /// A client for `http://host:port`; connects on first use.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        Ok(HttpClient {
            host: host_of(url)?,
            stream: None,
            timeout,
        })
    }

    fn connect(&mut self) -> std::io::Result<&mut BufReader<TcpStream>> {
        if self.stream.is_none() {
            let s = TcpStream::connect(&self.host)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            self.stream = Some(BufReader::new(s));
        }
        match self.stream.as_mut() {
            Some(s) => Ok(s),
            None => Err(std::io::Error::other("no connection")),
        }
    }

    /// Sends one request and reads its answer; a connection the server closed is reopened once.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<HttpResponse> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let reused = self.stream.is_some();
        match self.exchange(head.as_bytes(), body) {
            Ok(r) => Ok(r),
            Err(_) if reused => {
                self.stream = None;
                self.exchange(head.as_bytes(), body)
            }
            Err(e) => Err(e),
        }
    }

    /// `send` with a JSON body.
    pub fn post_json(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> std::io::Result<HttpResponse> {
        self.send("POST", path, headers, body.as_bytes())
    }

    /// `send` of a GET.
    pub fn get(&mut self, path: &str) -> std::io::Result<HttpResponse> {
        self.send("GET", path, &[], b"")
    }

    fn exchange(&mut self, head: &[u8], body: &[u8]) -> std::io::Result<HttpResponse> {
        let result = (|| {
            let s = self.connect()?;
            let w = s.get_mut();
            w.write_all(head)?;
            w.write_all(body)?;
            w.flush()?;
            read_response(s)
        })();
        match result {
            Ok((r, keep)) => {
                if !keep {
                    self.stream = None;
                }
                Ok(r)
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Reads one response; also says whether the connection stays open.
fn read_response(s: &mut BufReader<TcpStream>) -> std::io::Result<(HttpResponse, bool)> {
    let mut line = String::new();
    if s.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        s.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let keep = !find("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let body = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            line.clear();
            s.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
            let mut chunk = vec![0; size + 2];
            s.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
        body
    } else {
        let n: usize = match find("content-length") {
            Some(v) => v
                .parse()
                .map_err(|_| bad(format!("bad content-length {v:?}")))?,
            None => 0,
        };
        let mut body = vec![0; n];
        s.read_exact(&mut body)?;
        body
    };
    Ok((
        HttpResponse {
            status,
            headers,
            body,
        },
        keep,
    ))
}
