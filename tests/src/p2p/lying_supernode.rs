//! A super node that lies: it answers every blob range with the same range
//! of another blob (a self-consistent foreign blob of the same length), so
//! what a node reads from it parses and verifies against the foreign
//! index. Announces get an empty tree, traces are unknown. For the content
//! trust tests: only the layer's anchor tells the lie apart.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::serve::ServerThread;

pub struct LyingSupernode {
    /// `ip:port` it listens on.
    pub addr: SocketAddr,
    /// Blob range requests it answered (with the foreign bytes).
    pub blob_requests: Arc<AtomicU64>,
    _server: ServerThread,
}

impl LyingSupernode {
    /// Listens on a free port of 127.0.0.1, serving `foreign` (a blob file)
    /// whatever blob is asked for.
    pub fn start(foreign: &Path) -> LyingSupernode {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind lying super node");
        let addr = listener.local_addr().unwrap();
        let blob = Arc::new(std::fs::read(foreign).expect("read the foreign blob"));
        let blob_requests = Arc::new(AtomicU64::new(0));
        let counter = blob_requests.clone();
        let server = ServerThread::accept_loop(listener, move |s| answer(s, &blob, &counter));
        LyingSupernode {
            addr,
            blob_requests,
            _server: server,
        }
    }
}

/// Reads one request head and answers it.
fn answer(mut s: TcpStream, blob: &[u8], blob_requests: &AtomicU64) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        if s.read(&mut b).unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let target = line.split(' ').nth(1).unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let q: BTreeMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let (status, body): (&str, Vec<u8>) = match path {
        "/v1/announce" => (
            "200 OK",
            br#"{"ancestors":[],"heartbeat_ms":1000}"#.to_vec(),
        ),
        "/v1/leave" => ("200 OK", Vec::new()),
        "/v1/blob" => {
            let num = |k: &str| q.get(k).and_then(|v| v.parse::<usize>().ok());
            match (num("start"), num("end")) {
                (Some(start), Some(end)) if start < end && end <= blob.len() => {
                    blob_requests.fetch_add(1, Ordering::SeqCst);
                    ("200 OK", blob[start..end].to_vec())
                }
                _ => ("400 Bad Request", b"bad range\n".to_vec()),
            }
        }
        _ => ("404 Not Found", Vec::new()),
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(&body);
    let _ = s.shutdown(Shutdown::Both);
}
