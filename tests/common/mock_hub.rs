//! A small HTTP server on 127.0.0.1 that answers like the Hugging Face hub's `resolve` URLs
//! (../shared/docs/hub.md A4): HEAD and GET, ETag / X-Repo-Commit, Range, 404 with
//! X-Error-Code, and for "LFS" files a 302 to a CDN-style `/cdn/<sha256>` path with
//! X-Linked-Etag / X-Linked-Size. Requests are counted so tests can prove "no request".

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// The commit every served revision resolves to.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Files above this size are served like LFS files: a 302 to the CDN.
const LFS_MIN: usize = 1_000_000;

pub struct MockHub {
    pub endpoint: String,
    pub requests: Arc<AtomicUsize>,
    pub log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    addr: std::net::SocketAddr,
}

struct Repo {
    /// "models" or "datasets"
    kind: &'static str,
    id: String,
    dir: PathBuf,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl MockHub {
    /// Serves `repos`: (kind "models" | "datasets", "owner/name", local folder).
    pub fn start(repos: Vec<(&'static str, &str, PathBuf)>) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoint = format!("http://{addr}");
        let repos: Vec<Repo> = repos
            .into_iter()
            .map(|(kind, id, dir)| Repo {
                kind,
                id: id.into(),
                dir,
            })
            .collect();
        let requests = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r2, l2, s2, ep) = (
            requests.clone(),
            log.clone(),
            stop.clone(),
            endpoint.clone(),
        );
        let thread = std::thread::spawn(move || {
            let cdn: Mutex<HashMap<String, PathBuf>> = Mutex::new(HashMap::new());
            for conn in listener.incoming() {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = conn else { continue };
                r2.fetch_add(1, Ordering::SeqCst);
                let _ = handle(stream, &repos, &cdn, &l2, &ep);
            }
        });
        MockHub {
            endpoint,
            requests,
            log,
            stop,
            thread: Some(thread),
            addr,
        }
    }

    pub fn request_count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops the server; its port refuses connections afterwards.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn handle(
    mut stream: TcpStream,
    repos: &[Repo],
    cdn: &Mutex<HashMap<String, PathBuf>>,
    log: &Mutex<Vec<String>>,
    endpoint: &str,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    log.lock().unwrap().push(format!("{method} {target}"));
    let head = method == "HEAD";
    let path = target.split('?').next().unwrap_or("");

    let respond = |stream: &mut TcpStream,
                   status: &str,
                   hdrs: &[(String, String)],
                   body: &[u8]|
     -> std::io::Result<()> {
        let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in hdrs {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        stream.write_all(out.as_bytes())?;
        if !head {
            stream.write_all(body)?;
        }
        stream.flush()
    };
    let serve =
        |stream: &mut TcpStream, data: &[u8], etag: &str, commit: &str| -> std::io::Result<()> {
            let total = data.len();
            let mut hdrs = vec![
                ("ETag".to_string(), format!("\"{etag}\"")),
                ("X-Repo-Commit".to_string(), commit.to_string()),
                ("Accept-Ranges".to_string(), "bytes".to_string()),
            ];
            if let Some(range) = headers.get("range").and_then(|r| r.strip_prefix("bytes=")) {
                let (a, b) = range.split_once('-').unwrap_or((range, ""));
                let start: usize = a.parse().unwrap_or(0).min(total);
                let end: usize = b
                    .parse::<usize>()
                    .map(|e| e + 1)
                    .unwrap_or(total)
                    .min(total);
                hdrs.push((
                    "Content-Range".into(),
                    format!("bytes {start}-{}/{total}", end.saturating_sub(1)),
                ));
                hdrs.push(("Content-Length".into(), (end - start).to_string()));
                return respond(stream, "206 Partial Content", &hdrs, &data[start..end]);
            }
            hdrs.push(("Content-Length".into(), total.to_string()));
            respond(stream, "200 OK", &hdrs, data)
        };

    if let Some(sha) = path.strip_prefix("/cdn/") {
        let file = cdn.lock().unwrap().get(sha).cloned();
        return match file {
            Some(f) => serve(&mut stream, &std::fs::read(f)?, sha, COMMIT),
            None => respond(
                &mut stream,
                "404 Not Found",
                &[("Content-Length".into(), "0".into())],
                b"",
            ),
        };
    }

    // /[datasets/]{owner}/{name}/resolve/{rev}/{path...}
    let (kind, rest) = match path.strip_prefix("/datasets/") {
        Some(r) => ("datasets", r),
        None => ("models", path.trim_start_matches('/')),
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let not_found = |stream: &mut TcpStream, code: &str| {
        let body = format!("{{\"error\": \"{code}\"}}");
        respond(
            stream,
            "404 Not Found",
            &[
                ("X-Repo-Commit".into(), COMMIT.into()),
                ("X-Error-Code".into(), code.into()),
                ("Content-Type".into(), "application/json".into()),
                ("Content-Length".into(), body.len().to_string()),
            ],
            body.as_bytes(),
        )
    };
    if segs.len() < 5 || segs[2] != "resolve" {
        return not_found(&mut stream, "RepoNotFound");
    }
    let id = format!("{}/{}", segs[0], segs[1]);
    let rev = percent_decode(segs[3]);
    let file: Vec<String> = segs[4..].iter().map(|s| percent_decode(s)).collect();
    let Some(repo) = repos.iter().find(|r| r.kind == kind && r.id == id) else {
        return not_found(&mut stream, "RepoNotFound");
    };
    // "main" resolves to COMMIT; a pinned 40-hex commit resolves to itself.
    let is_sha = rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit());
    if rev != "main" && !is_sha {
        return not_found(&mut stream, "RevisionNotFound");
    }
    let commit = if is_sha {
        rev.clone()
    } else {
        COMMIT.to_string()
    };
    let local = file.iter().fold(repo.dir.clone(), |p, s| p.join(s));
    if !local.is_file() {
        return not_found(&mut stream, "EntryNotFound");
    }
    let data = std::fs::read(&local)?;
    let sha = sha256_hex(&data);
    if data.len() >= LFS_MIN {
        cdn.lock().unwrap().insert(sha.clone(), local.clone());
        let hdrs = vec![
            ("Location".to_string(), format!("{endpoint}/cdn/{sha}")),
            ("X-Linked-Etag".to_string(), format!("\"{sha}\"")),
            ("X-Linked-Size".to_string(), data.len().to_string()),
            ("X-Repo-Commit".to_string(), commit.clone()),
            ("ETag".to_string(), format!("\"{}\"", &sha[..40])),
            ("Content-Length".to_string(), "0".to_string()),
        ];
        return respond(&mut stream, "302 Found", &hdrs, b"");
    }
    serve(&mut stream, &data, &sha, &commit)
}
