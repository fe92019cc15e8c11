//! P2P under hostile load (issue 16), on loopback: a parent peer and a super
//! node that send endless bodies, forty readers too slow to take their
//! 64 MiB answers, and a flood of half-sent requests. Memory is read from
//! /proc (peak RSS) and must stay under the configured budgets; health keeps
//! answering; honest clients still get their bytes.
//!
//! Run against an older build (`CARGO_TARGET_DIR` at its target directory)
//! these show what was unbounded before.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use lazybd_tests::cli::{lazybd, ok, MountGuard};
use lazybd_tests::images::noise;
use lazybd_tests::p2p::{
    check_tree, peak_rss_mib, publish_image, publish_tree, Answer, ScriptedServer,
};
use lazybd_tests::registry::Registry;
use lazybd_tests::supernode::Supernode;
use lazybd_tests::{free_port, require_root};
use sha2::{Digest, Sha256};

/// A node whose parent peer answers every chunk with an endless body and
/// whose super node answers the first announce, the ticket keys and every
/// blob request with an endless body: it reads correct data from the
/// registry, its memory stays bounded, and the parent is counted as a
/// lying source.
#[test]
fn endless_bodies_from_a_parent_and_the_super_node_are_cut_off() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let (tree, _blob) = publish_image(tmp.path(), &registry);
    let (parent_port, my_port) = (free_port(), free_port());
    let parent = ScriptedServer::start(
        format!("127.0.0.1:{parent_port}").parse().unwrap(),
        |_, _| Answer::Endless(200),
    );
    let reply = format!(
        r#"{{"ancestors":["127.0.0.1:{parent_port}"],"heartbeat_ms":1000,"member":"127.0.0.1:{my_port}","ticket":"t"}}"#
    );
    let supernode =
        ScriptedServer::start("127.0.0.1:0".parse().unwrap(), move |path, n| match path {
            "/v1/announce" if n > 0 => Answer::Body(200, reply.clone()),
            "/v1/announce" | "/v1/keys" => Answer::Endless(200),
            "/v1/blob" => Answer::Endless(500),
            _ => Answer::Body(404, "no\n".into()),
        });
    let cfg = tmp.path().join("p2p.toml");
    std::fs::write(
        &cfg,
        format!(
            "[p2p]\nsupernode = \"http://{}\"\nlisten = \"127.0.0.1:{my_port}\"\n\
             heartbeat_ms = 1000\npeer_timeout_ms = 5000\nsupernode_timeout_ms = 5000\n",
            supernode.addr
        ),
    )
    .unwrap();
    let (root, dir) = (tmp.path().join("root"), tmp.path().join("mnt"));
    std::fs::create_dir_all(&dir).unwrap();
    let guard = MountGuard::new(&root, &dir);
    ok(&lazybd(&[
        &"mount",
        &"--root",
        &root,
        &"--plain-http",
        &"--read-deadline",
        &"60",
        &"--p2p-config",
        &cfg,
        &registry.reference("p2p:latest"),
        &dir,
    ]));
    // Heartbeats (1 s) replace the endless first announce with the parent.
    std::thread::sleep(Duration::from_millis(2500));
    check_tree(&tree, &dir).expect("correct data, from the registry");
    let stats = guard.stats();
    let pid = stats["pid"].as_u64().unwrap() as u32;
    let peak = peak_rss_mib(pid);
    let sources = stats["stats"]["sources"].as_array().unwrap();
    let source = |name: &str| sources.iter().find(|s| s["name"] == name).cloned();
    eprintln!(
        "peak RSS {peak} MiB; endless bytes sent: parent {} MiB, super node {} MiB; sources {sources:?}",
        parent.endless_bytes.load(std::sync::atomic::Ordering::Relaxed) >> 20,
        supernode.endless_bytes.load(std::sync::atomic::Ordering::Relaxed) >> 20,
    );
    assert!(parent.requests("/v1/blob") > 0, "the node asked its parent");
    assert!(supernode.requests("/v1/blob") > 0, "and the super node");
    let peer = source("peer").expect("peer source");
    assert!(
        peer["overlong_answers"].as_u64().unwrap_or(0) > 0,
        "the parent's endless answer counted as over-long: {peer}"
    );
    assert!(peak < 200, "peak RSS {peak} MiB: a body was buffered");
    drop(guard);
}

/// Forty clients ask the super node for 64 MiB each and read nothing: the
/// memory held for them stays within the response budget (512 MiB by
/// default), and an honest client meanwhile gets its 64 MiB, byte for byte.
#[test]
fn forty_slow_readers_do_not_pin_the_super_nodes_memory() {
    require_root!();
    const RANGE: u64 = 64 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("payload"), noise(3, (RANGE + (2 << 20)) as usize)).unwrap();
    let blob = publish_tree(tmp.path(), &tree, 1 << 20, &registry);
    let size = blob.written.blob_len;
    assert!(size > RANGE);
    let port = free_port();
    let sn = Supernode::start(
        &tmp.path().join("sn"),
        &format!("127.0.0.1:{port}"),
        &registry.host(),
        &[],
        None,
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let path = format!(
        "/v1/blob?registry={}&repo=p2p&digest={}&size={size}&start=0&end={RANGE}",
        registry.host(),
        blob.digest
    );
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    // An honest first read brings the blocks into the cache.
    let want = {
        let bytes = std::fs::read(&blob.path).unwrap();
        Sha256::digest(&bytes[..RANGE as usize])
    };
    assert_eq!(honest_read(addr, &request, RANGE), want);
    let base = peak_rss_mib(sn.pid());

    let slow: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            s
        })
        .collect();
    // Let the server fill every socket buffer it can.
    std::thread::sleep(Duration::from_secs(5));
    let started = Instant::now();
    assert_eq!(
        honest_read(addr, &request, RANGE),
        want,
        "an honest client is served meanwhile"
    );
    let honest = started.elapsed();
    let peak = peak_rss_mib(sn.pid());
    eprintln!("super node peak RSS {base} MiB before, {peak} MiB with 40 slow readers; honest read {honest:?}");
    assert!(
        peak < 512,
        "peak RSS {peak} MiB: over the 512 MiB response budget"
    );
    drop(slow);
    drop(sn);
}

/// A full GET on its own connection: the body's sha256.
fn honest_read(addr: SocketAddr, request: &str, len: u64) -> sha2::digest::Output<Sha256> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "answer head");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut h = Sha256::new();
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = s.read(&mut buf[..left.min(1 << 20) as usize]).unwrap();
        assert!(n > 0, "answer ended {left} bytes early");
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finalize()
}

/// 1500 connections from one address that send half a request and wait:
/// `/healthz` from another address keeps answering within a second, and the
/// server closes what is over its limits instead of queueing it.
#[test]
fn a_connection_flood_leaves_health_answering() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let sn = Supernode::start(
        &tmp.path().join("sn"),
        &format!("127.0.0.1:{port}"),
        "127.0.0.1:1",
        &[],
        None,
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut flood = Vec::new();
    for _ in 0..1500 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                let _ = s.write_all(b"GET /v1/stats HTTP/1.1\r\nHost: x\r\n");
                flood.push(s);
            }
            Err(_) => break,
        }
    }
    let health = || {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "1", "--interface", "127.0.0.2"])
            .arg(format!("http://127.0.0.1:{port}/healthz"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).trim() == "ok"
    };
    let answered = (0..5)
        .filter(|_| {
            std::thread::sleep(Duration::from_millis(500));
            health()
        })
        .count();
    eprintln!(
        "{} flood connections open; health answered {answered} of 5",
        flood.len()
    );
    assert_eq!(answered, 5, "health did not answer during the flood");
    drop(flood);
    assert!(health());
    drop(sn);
}
