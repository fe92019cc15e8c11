//! P2P as an attacker on the datacenter network sees it (issue 14): a peer
//! serves a private chunk only to a caller with a ticket the super node
//! signed for that blob and that caller, nothing open lists digests or
//! holders, trees hold only addresses the super node verified, a trace
//! cannot be replaced by another node, and plain HTTP off loopback is
//! refused unless explicitly allowed.
//!
//! Each test collects every attack that got through and fails with the
//! list, so one run against an older build shows all of them (run with
//! `CARGO_TARGET_DIR` pointing at that build's target directory).

use std::process::Command;
use std::time::{Duration, Instant};

use lazybd_blockdev::oci::LayerId;
use lazybd_blockdev::trace::{trace_key, LayerTrace, Trace};
use lazybd_tests::bin_path;
use lazybd_tests::netns::enter_netns;
use lazybd_tests::p2p::{
    check_tree, curl, docker_config, hub_proxy, hub_supernode, publish_image, Fabric, Node, Pki,
    PROXY_PORT, SUPERNODE_PORT, TOKEN,
};
use lazybd_tests::registry::Registry;
use lazybd_tests::supernode::Supernode;
use lazybd_tests::{free_port, require_root};

/// Attacks that got through.
#[derive(Default)]
struct Breaches(Vec<String>);

impl Breaches {
    fn check(&mut self, held: bool, what: impl Into<String>) {
        if !held {
            let what = what.into();
            eprintln!("attack got through: {what}");
            self.0.push(what);
        }
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "attacks that got through:\n  {}",
            self.0.join("\n  ")
        );
    }
}

#[test]
fn private_chunks_need_a_ticket_and_nothing_open_lists_them() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let (user, password) = ("p2puser", "p2p-secret");
    let registry = Registry::start_with_htpasswd(user, password);
    let (tree, blob) = publish_image(tmp.path(), &registry);
    let fabric = Fabric::new(27, 2);
    let hub = fabric.hub_ip();
    let _proxy = hub_proxy(&fabric, &registry);
    let pki = Pki::new(&tmp.path().join("pki"), &fabric);
    let sn_args = pki.supernode_args();
    let sn_args: Vec<&dyn AsRef<std::ffi::OsStr>> = sn_args.iter().map(|a| a as _).collect();
    let _sn = hub_supernode(&fabric, &tmp.path().join("sn"), 1, 60_000, &sn_args);
    let creds = docker_config(&tmp.path().join("auth.json"), &fabric, user, password);
    let image = format!("{hub}:{PROXY_PORT}/p2p:latest");
    let toml = pki.node_toml();
    let mount = |i| {
        Node::mount(
            &fabric,
            tmp.path(),
            i,
            &image,
            &toml,
            &[&"--docker-config", &creds],
        )
    };
    let (a, b) = (mount(0), mount(1));
    std::thread::sleep(Duration::from_millis(2500));
    check_tree(&tree, &a.dir).expect("node A reads correct data");
    check_tree(&tree, &b.dir).expect("node B reads correct data");
    assert!(b.source_chunks("peer") > 0, "B read from A with its ticket");

    let mut breaches = Breaches::default();
    // One stored chunk of the private blob, as an attacker asks A for it.
    let index = &blob.written.index;
    let c = index.blob_order().next().unwrap();
    let range = index.chunks[c as usize].stored_range();
    let chunk_url = format!(
        "https://{}/v1/blob?digest={}&anchor={}&start={}&end={}",
        a.addr,
        blob.digest,
        blob.anchor(),
        range.start,
        range.end
    );
    let got = tmp.path().join("got");
    let ask = |ns: &str, token: bool, ticket: Option<&str>| -> u16 {
        let _ = std::fs::remove_file(&got);
        let mut args = pki.curl_args(token);
        if let Some(t) = ticket {
            args.extend(["-H".into(), format!("X-Lazybd-Ticket: {t}")]);
        }
        args.extend(["-o".into(), got.display().to_string(), chunk_url.clone()]);
        curl(ns, &args.iter().map(String::as_str).collect::<Vec<_>>()).0
    };
    let hub_ns = fabric.hub.name.clone();
    breaches.check(
        ask(&hub_ns, false, None) == 401,
        "a tokenless caller read a chunk",
    );
    let status = ask(&hub_ns, true, None);
    breaches.check(
        status == 403,
        format!("a token-only caller got {status} for a private chunk"),
    );
    let status = ask(&hub_ns, true, Some("7b7d.00"));
    breaches.check(status == 403, format!("a forged ticket got {status}"));

    // Announce: who holds the blob, and a ticket, only for credentials the
    // registry accepts; and only for the caller's own address.
    let announce = |addr: &str, auth: Option<(&str, &str)>| -> (u16, String) {
        let mut args = pki.curl_args(true);
        if let Some((u, p)) = auth {
            let header = format!(
                "X-Lazybd-Registry-Auth: basic {}:{}",
                hex::encode(u),
                hex::encode(p)
            );
            args.extend(["-H".into(), header]);
        }
        args.extend([
            "-X".into(),
            "POST".into(),
            format!(
                "https://{hub}:{SUPERNODE_PORT}/v1/announce?registry={hub}:{PROXY_PORT}&repo=p2p\
                 &blob={}&anchor={}&addr={addr}",
                blob.digest,
                blob.anchor()
            ),
        ]);
        curl(
            &hub_ns,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let me = format!("{hub}:7099");
    for (auth, what) in [
        (None, "no credentials"),
        (Some((user, "nope")), "wrong credentials"),
    ] {
        let (status, body) = announce(&me, auth);
        breaches.check(
            status == 403 && !body.contains(&a.addr),
            format!("announce with {what}: {status} {body}"),
        );
    }
    let (status, body) = announce(&a.addr, Some((user, password)));
    breaches.check(
        status == 403,
        format!("announce of A's address from the hub: {status} {body}"),
    );
    let (status, body) = announce(&me, Some((user, password)));
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    for ancestor in reply["ancestors"].as_array().unwrap() {
        let ancestor = ancestor.as_str().unwrap();
        breaches.check(
            ancestor == a.addr || ancestor == b.addr,
            format!("the tree holds an address no node announced: {ancestor}"),
        );
    }
    // The hub's own ticket reads the chunk from the hub, byte for byte...
    if let Some(ticket) = reply["ticket"].as_str() {
        assert_eq!(ask(&hub_ns, true, Some(ticket)), 200);
        let want = &std::fs::read(&blob.path).unwrap()[range.start as usize..range.end as usize];
        assert!(std::fs::read(&got).unwrap() == want, "the stored bytes");
        // ...but is worth nothing from another address (B's).
        let status = ask(&fabric.nodes[1].name, true, Some(ticket));
        breaches.check(
            status == 403,
            format!("a ticket used by another host: {status}"),
        );
    } else {
        breaches.check(false, "no ticket in the announce reply");
    }

    // Nothing open lists digests or holders: the stats are aggregates.
    let hex_of = |d: &str| d.trim_start_matches("sha256:").to_owned();
    for url in [
        format!("https://{}/v1/stats", a.addr),
        format!("https://{hub}:{SUPERNODE_PORT}/v1/stats"),
    ] {
        let mut args = pki.curl_args(true);
        args.push(url.clone());
        let (status, body) = curl(
            &hub_ns,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert_eq!(status, 200, "{url}: {body}");
        for secret in [
            hex_of(&blob.digest),
            hex_of(&blob.anchor()),
            a.addr.clone(),
            b.addr.clone(),
        ] {
            breaches.check(
                !body.contains(&secret),
                format!("{url} shows {secret}: {body}"),
            );
        }
    }
    // Leaving for someone else's address is refused too.
    let mut args = pki.curl_args(true);
    args.extend([
        "-X".into(),
        "POST".into(),
        format!(
            "https://{hub}:{SUPERNODE_PORT}/v1/leave?blob={}&anchor={}&addr={}",
            blob.digest,
            blob.anchor(),
            a.addr
        ),
    ]);
    let (status, _) = curl(
        &hub_ns,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    breaches.check(status == 403, format!("leave for A's address: {status}"));
    drop((a, b));
    breaches.assert_none();
}

/// Traces: the first writer of an image's trace owns it; another node's
/// write is refused, and nodes without tickets for the image's layers can
/// neither read nor write it. Loopback: the clients are 127.0.0.2-4.
#[test]
fn a_trace_is_not_replaced_by_another_node() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let (_tree, blob) = publish_image(tmp.path(), &registry);
    let token = tmp.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let port = free_port();
    let sn = Supernode::start(
        &tmp.path().join("sn"),
        &format!("127.0.0.1:{port}"),
        &registry.host(),
        &[&"--cluster-token-file", &token],
        None,
    );
    let base = format!("http://127.0.0.1:{port}");
    let from = |ip: &str, args: &[&str]| -> (u16, String) {
        let mut a = vec![
            "-sS",
            "--max-time",
            "20",
            "--interface",
            ip,
            "-w",
            "\n%{http_code}",
            "-H",
        ];
        let token_header = format!("X-Lazybd-Token: {TOKEN}");
        a.push(&token_header);
        a.extend_from_slice(args);
        let out = Command::new("curl").args(&a).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    };
    let announce = |ip: &str| {
        let url = format!(
            "{base}/v1/announce?registry={}&repo=p2p&blob={}&anchor={}&addr={ip}:7000",
            registry.host(),
            blob.digest,
            blob.anchor()
        );
        let (status, body) = from(ip, &["-X", "POST", &url]);
        assert_eq!(status, 200, "announce from {ip}: {body}");
    };
    let layer = LayerId::anchored(&blob.anchor()).unwrap();
    let key = trace_key(&[&layer]);
    let url = format!("{base}/v1/trace?key={key}&chain={layer}");
    let trace_file = |name: &str, offset: u64| {
        let t = Trace::new([LayerTrace {
            layer: layer.clone(),
            diff_id: None,
            ranges: vec![[offset, 4096]],
            narrow: None,
        }]);
        let p = tmp.path().join(name);
        std::fs::write(&p, t.encode()).unwrap();
        format!("@{}", p.display())
    };
    let put = |ip: &str, body: &str| from(ip, &["-X", "PUT", "--data-binary", body, &url]).0;
    let (x, y, z) = ("127.0.0.2", "127.0.0.3", "127.0.0.4");
    let mut breaches = Breaches::default();
    announce(x);
    announce(y);
    let (first, second) = (trace_file("first", 0), trace_file("second", 8192));
    assert_eq!(put(x, &first), 200, "the first writer stores its trace");
    let status = put(y, &second);
    breaches.check(
        status == 409,
        format!("another node replaced the trace: {status}"),
    );
    let (status, body) = from(y, &[&url]);
    assert_eq!(status, 200, "{body}");
    breaches.check(
        body.contains("[0,4096]"),
        format!("the stored trace is not the first writer's: {body}"),
    );
    let status = put(z, &second);
    breaches.check(
        status == 403,
        format!("a node without tickets wrote a trace: {status}"),
    );
    let (status, _) = from(z, &[&url]);
    breaches.check(
        status == 403,
        format!("a node without tickets read a trace: {status}"),
    );
    // A trace naming a layer its writer holds no ticket for.
    let forged = Trace::new([LayerTrace {
        layer: LayerId::anchored(&format!("sha256:{}", "ab".repeat(32))).unwrap(),
        diff_id: None,
        ranges: vec![[0, 4096]],
        narrow: None,
    }]);
    let p = tmp.path().join("forged");
    std::fs::write(&p, forged.encode()).unwrap();
    let status = put(x, &format!("@{}", p.display()));
    breaches.check(
        status == 403,
        format!("a trace of foreign layers was stored: {status}"),
    );
    assert_eq!(put(x, &second), 200, "the owner replaces its own trace");
    drop(sn);
    breaches.assert_none();
}

/// Off loopback, the super node and a node's peer server need TLS and a
/// token, and a node sends nothing to a plain-HTTP super node, unless
/// insecure operation is allowed explicitly (then they say so loudly).
#[test]
fn plain_http_off_loopback_is_refused_unless_allowed() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let (_tree, _blob) = publish_image(tmp.path(), &registry);
    let fabric = Fabric::new(28, 1);
    let hub = fabric.hub_ip();
    let _proxy = hub_proxy(&fabric, &registry);
    let mut breaches = Breaches::default();

    // A node with a plain-HTTP super node off loopback, no override (no
    // super node runs yet: the node must refuse before it sends anything).
    let cfg = tmp.path().join("plain.toml");
    std::fs::write(
        &cfg,
        format!(
            "[p2p]\nsupernode = \"http://{hub}:{SUPERNODE_PORT}\"\nlisten = \"{}:7070\"\n",
            fabric.node_ip(0)
        ),
    )
    .unwrap();
    let image = format!("{hub}:{PROXY_PORT}/p2p:latest");
    match Node::try_mount(&fabric, tmp.path(), 0, &image, &cfg, &[]) {
        Ok(node) => {
            breaches.check(
                false,
                "a node sent its credentials to a plain-HTTP super node",
            );
            drop(node);
        }
        Err(e) => assert!(e.contains("allow_insecure"), "{e}"),
    }

    let mut cmd = Command::new(bin_path("lazybd-supernode"));
    cmd.args(["--listen", &format!("{hub}:{SUPERNODE_PORT}")])
        .args(["--registry", &format!("{hub}:{PROXY_PORT}"), "--plain-http"])
        .arg("--cache-dir")
        .arg(tmp.path().join("refused"));
    let (exited, stderr) = run_briefly(cmd, &fabric.hub.name, Duration::from_secs(10));
    breaches.check(
        exited && stderr.contains("needs TLS and a cluster token"),
        format!("a plain-HTTP super node off loopback started (exited: {exited}): {stderr}"),
    );
    // Allowed explicitly, it starts and says so.
    let sn = hub_supernode(&fabric, &tmp.path().join("sn"), 1, 60_000, &[]);
    assert!(sn.log().contains("INSECURE"), "{}", sn.log());
    drop(sn);
    breaches.assert_none();
}

/// Runs `cmd` in netns `ns` for at most `within`: whether it exited by
/// itself, and its stderr.
fn run_briefly(mut cmd: Command, ns: &str, within: Duration) -> (bool, String) {
    let err = tempfile::NamedTempFile::new().unwrap();
    enter_netns(&mut cmd, ns);
    cmd.stdout(std::process::Stdio::null())
        .stderr(err.reopen().unwrap());
    let mut child = cmd.spawn().expect("spawn");
    let deadline = Instant::now() + within;
    let exited = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        exited,
        std::fs::read_to_string(err.path()).unwrap_or_default(),
    )
}
