//! Plain HTTP/1.1 requests to the daemons' small HTTP APIs (metrics, the
//! super node, P2P peers), written by hand so a test sees exactly what goes
//! over the wire; bounded by socket timeouts, optionally from inside a
//! network namespace. Bodies here are small and not chunked-encoded (the
//! daemons send Content-Length for full bodies).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::netns::in_netns;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Replies are read up to this size: the APIs answer with small bodies.
const MAX_REPLY: u64 = 16 << 20;

/// One request to `addr` (`ip:port`) with `Connection: close`, from inside
/// `netns` if given; returns (status, body).
pub fn request(
    netns: Option<&str>,
    method: &str,
    addr: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut head = format!("{method} {path_and_query} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += &format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let (addr, body) = (addr.to_owned(), body.to_vec());
    let exchange = move || exchange(&addr, head.as_bytes(), &body);
    let reply = match netns {
        Some(ns) => in_netns(ns, exchange),
        None => exchange(),
    };
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n");
    let head = String::from_utf8_lossy(&reply[..split.unwrap_or(reply.len())]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    let body = split.map(|at| reply[at + 4..].to_vec()).unwrap_or_default();
    (status, body)
}

/// `GET` from the test's own network namespace.
pub fn get(addr: &str, path: &str) -> (u16, Vec<u8>) {
    request(None, "GET", addr, path, &[], b"")
}

/// `GET` of a JSON document that must answer 200, from inside `netns`.
pub fn get_json(netns: Option<&str>, addr: &str, path: &str) -> serde_json::Value {
    let (status, body) = request(netns, "GET", addr, path, &[], b"");
    assert_eq!(
        status,
        200,
        "{addr}{path}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).expect("JSON")
}

fn exchange(addr: &str, head: &[u8], body: &[u8]) -> Vec<u8> {
    let sa: SocketAddr = addr
        .parse()
        .unwrap_or_else(|e| panic!("address {addr}: {e}"));
    let mut s = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(head).unwrap();
    // The server may answer (and close) before taking all of a body it refuses.
    let _ = s.write_all(body);
    let mut reply = Vec::new();
    // A reset after the reply (a refused body) still leaves the reply read.
    let _ = s.take(MAX_REPLY).read_to_end(&mut reply);
    reply
}
