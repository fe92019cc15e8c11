//! A peer that answers every chunk request badly, for the fault tests.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::netns::Netns;
use crate::serve::ServerThread;

/// How a [`FakePeer`] misbehaves.
#[derive(Clone, Copy, PartialEq)]
pub enum Fake {
    /// The right length of garbage.
    Corrupt,
    /// A full Content-Length, then half the body and a closed connection,
    /// like a peer killed mid-transfer.
    Truncate,
    /// Nothing for 8 s (longer than the nodes' peer timeout), then garbage.
    Slow,
}

pub struct FakePeer {
    /// Requests it answered (badly).
    pub requests: Arc<AtomicU64>,
    _server: ServerThread,
}

impl FakePeer {
    /// Listens on `addr` inside `ns`; answers one request per connection.
    pub fn start(ns: &Netns, addr: SocketAddr, mode: Fake) -> FakePeer {
        let listener = ns.run(move || TcpListener::bind(addr).expect("bind fake peer"));
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let server = ServerThread::accept_loop(listener, move |s| answer(s, mode, &counter));
        FakePeer {
            requests,
            _server: server,
        }
    }
}

/// Reads one request head, counts it and answers it as `mode` says.
fn answer(mut s: TcpStream, mode: Fake, requests: &AtomicU64) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        if s.read(&mut b).unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let query = line
        .split(' ')
        .nth(1)
        .and_then(|p| p.split_once('?'))
        .map(|x| x.1.to_owned());
    let q: BTreeMap<String, String> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect();
    let (start, end): (u64, u64) = (
        q.get("start").and_then(|v| v.parse().ok()).unwrap_or(0),
        q.get("end").and_then(|v| v.parse().ok()).unwrap_or(0),
    );
    let len = (end - start.min(end)) as usize;
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    if mode == Fake::Slow {
        std::thread::sleep(Duration::from_secs(8));
    }
    let body = vec![0x5au8; if mode == Fake::Truncate { len / 2 } else { len }];
    let _ = s.write_all(&body);
    let _ = s.shutdown(Shutdown::Both);
}
