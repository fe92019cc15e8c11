//! A hostile HTTP server for the bounds tests: answers each request as a
//! script says, by path and by how many requests for that path came before;
//! "endless" answers stream garbage until the client hangs up (or a cap, so a
//! client that never stops reading cannot exhaust the test machine).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::serve::ServerThread;

/// Most bytes one endless answer sends.
pub const ENDLESS_CAP: u64 = 512 << 20;
/// Connections handled at once (more are closed).
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, Clone)]
pub enum Answer {
    /// `status` with this body.
    Body(u16, String),
    /// `status`, then chunked garbage without end.
    Endless(u16),
}

type Script = dyn Fn(&str, u64) -> Answer + Send + Sync;

pub struct ScriptedServer {
    pub addr: SocketAddr,
    /// Requests seen, by path.
    seen: Arc<Mutex<HashMap<String, u64>>>,
    /// Bytes of endless answers sent.
    pub endless_bytes: Arc<std::sync::atomic::AtomicU64>,
    _server: ServerThread,
}

impl ScriptedServer {
    /// Listens on `addr` (in the test's network namespace) and answers the
    /// `n`th request (from 0) for `path` with `script(path, n)`.
    pub fn start(
        addr: SocketAddr,
        script: impl Fn(&str, u64) -> Answer + Send + Sync + 'static,
    ) -> ScriptedServer {
        let listener = TcpListener::bind(addr).expect("bind scripted server");
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let endless_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let script: Arc<Script> = Arc::new(script);
        let open = Arc::new(AtomicUsize::new(0));
        let (s2, e2) = (seen.clone(), endless_bytes.clone());
        let server = ServerThread::accept_loop(listener, move |stream| {
            if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            let (script, seen, endless, open) =
                (script.clone(), s2.clone(), e2.clone(), open.clone());
            std::thread::spawn(move || {
                serve(stream, &*script, &seen, &endless);
                open.fetch_sub(1, Ordering::SeqCst);
            });
        });
        ScriptedServer {
            addr,
            seen,
            endless_bytes,
            _server: server,
        }
    }

    /// Requests seen for `path`.
    pub fn requests(&self, path: &str) -> u64 {
        self.seen.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// Answers the requests of one keep-alive connection until it closes.
fn serve(
    stream: TcpStream,
    script: &Script,
    seen: &Mutex<HashMap<String, u64>>,
    endless: &std::sync::atomic::AtomicU64,
) {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line
            .split(' ')
            .nth(1)
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("")
            .to_owned();
        let mut body_len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    body_len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; body_len.min(8 << 20)];
        if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
            return;
        }
        let n = {
            let mut s = seen.lock().unwrap();
            let c = s.entry(path.clone()).or_default();
            *c += 1;
            *c - 1
        };
        match script(&path, n) {
            Answer::Body(status, text) => {
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n",
                    text.len()
                );
                if out.write_all(head.as_bytes()).is_err()
                    || out.write_all(text.as_bytes()).is_err()
                {
                    return;
                }
            }
            Answer::Endless(status) => {
                let head = format!("HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n");
                if out.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let piece = vec![b'{'; 64 << 10];
                let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                chunk.extend_from_slice(&piece);
                chunk.extend_from_slice(b"\r\n");
                let mut sent = 0u64;
                while sent < ENDLESS_CAP {
                    if out.write_all(&chunk).is_err() {
                        return;
                    }
                    sent += piece.len() as u64;
                    endless.fetch_add(piece.len() as u64, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}
