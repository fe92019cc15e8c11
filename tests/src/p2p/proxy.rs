//! A TCP relay in front of the registry that records every request head:
//! this is how a P2P test counts what the registry sent.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::netns::Netns;
use crate::serve::ServerThread;

/// One request the registry saw through the proxy.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    /// `[start, end)` of a range request.
    pub range: Option<(u64, u64)>,
}

pub struct CountingProxy {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Both ends of every relayed connection, shut down on drop.
    conns: Arc<Mutex<Vec<TcpStream>>>,
    /// Bytes the registry sent through the proxy.
    pub egress: Arc<AtomicU64>,
    accept: ServerThread,
}

impl CountingProxy {
    /// Listens on `listen` inside `ns`, relaying to `upstream` (reached from
    /// the test's own netns: the relay threads run there).
    pub fn start(ns: &Netns, listen: SocketAddr, upstream: SocketAddr) -> CountingProxy {
        let listener = ns.run(move || TcpListener::bind(listen).expect("bind proxy"));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let egress = Arc::new(AtomicU64::new(0));
        let (s2, c2, e2) = (seen.clone(), conns.clone(), egress.clone());
        let accept = ServerThread::accept_loop(listener, move |client| {
            let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
                return; // registry down: the client sees a reset
            };
            {
                let mut c = c2.lock().unwrap();
                c.push(client.try_clone().unwrap());
                c.push(up.try_clone().unwrap());
            }
            let (mut up_r, mut cl_w) = (up.try_clone().unwrap(), client.try_clone().unwrap());
            let egress = e2.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = up_r.read(&mut buf) {
                    if n == 0 || cl_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    egress.fetch_add(n as u64, Ordering::Relaxed);
                }
                let _ = cl_w.shutdown(Shutdown::Both);
            });
            let seen = s2.clone();
            std::thread::spawn(move || sniff(client, up, seen));
        });
        CountingProxy {
            seen,
            conns,
            egress,
            accept,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.stop();
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Registry blob ranges for `digest`, without the super node's access and
/// size probes (one and two bytes).
pub fn blob_ranges(seen: &[Seen], digest: &str) -> Vec<(u64, u64)> {
    seen.iter()
        .filter(|s| s.path.ends_with(&format!("/blobs/{digest}")))
        .map(|s| s.range.expect("every blob read is a range read"))
        .filter(|(a, b)| b - a > 2)
        .collect()
}

/// Copies client bytes upstream, recording each request head (GET/HEAD
/// carry no body; a Content-Length body is passed through unparsed).
fn sniff(mut client: TcpStream, mut up: TcpStream, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut skip_body = 0usize;
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = match client.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if up.write_all(&chunk[..n]).is_err() {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            if skip_body > 0 {
                let k = skip_body.min(buf.len());
                buf.drain(..k);
                skip_body -= k;
                if skip_body > 0 {
                    break;
                }
            }
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                break;
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let (request, length) = parse_head(&head);
            skip_body = length;
            seen.lock().unwrap().push(request);
        }
    }
    let _ = up.shutdown(Shutdown::Both);
}

/// The path and range of a request head, and its body's length.
fn parse_head(head: &str) -> (Seen, usize) {
    let mut lines = head.lines();
    let path = lines
        .next()
        .unwrap_or("")
        .split(' ')
        .nth(1)
        .unwrap_or("")
        .to_owned();
    let (mut range, mut length) = (None, 0);
    for l in lines {
        let (k, v) = l.split_once(':').unwrap_or((l, ""));
        let v = v.trim();
        if k.eq_ignore_ascii_case("range") {
            range = v.strip_prefix("bytes=").and_then(|r| {
                let (a, b) = r.split_once('-')?;
                Some((a.parse().ok()?, b.parse::<u64>().ok()? + 1))
            });
        } else if k.eq_ignore_ascii_case("content-length") {
            length = v.parse().unwrap_or(0);
        }
    }
    (Seen { path, range }, length)
}
