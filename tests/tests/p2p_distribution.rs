//! P2P distribution end to end (the fabric: [`lazybd_tests::p2p`]): nodes
//! share one registry copy of an image through a super node's trees; dead,
//! lying and slow peers, a dead super node and a dead registry are survived;
//! a private image moves over TLS with a cluster token; snapshotters count
//! uploads per peer. `bench_p2p` (ignored) measures it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;

use lazybd_tests::images::{noise, registry_with_lazy_rich};
use lazybd_tests::lazy_layers::walk;
use lazybd_tests::p2p::{
    announce, blob_ranges, check_tree, curl, docker_config, drop_page_cache, hub_image, hub_proxy,
    hub_supernode, publish_image, publish_tree, snapshotter_node, supernode, CountingProxy, Fabric,
    Fake, FakePeer, Node, Pki, RegistryLink, PEER_PORT, PROXY_PORT, SUPERNODE_PORT, TOKEN,
};
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;
use lazybd_tests::snapshots_api::{attach_layers, prepare};
use lazybd_tests::snapshotter::{metric_or_zero as metric, Mounted};

#[test]
fn eight_nodes_share_one_registry_copy() {
    require_root!();
    const NODES: usize = 8;
    const FANOUT: u64 = 2;
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let (tree, blob) = publish_image(tmp.path(), &registry);
    let fabric = Fabric::new(21, NODES);
    let proxy = hub_proxy(&fabric, &registry);
    let _sn = hub_supernode(
        &fabric,
        &tmp.path().join("sn"),
        FANOUT as usize,
        10_000,
        &[],
    );
    let image = hub_image(&fabric);

    // All mount at once, then all read everything at once.
    let nodes: Vec<Node> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..NODES)
            .map(|i| {
                let (f, t, img) = (&fabric, tmp.path(), &image);
                s.spawn(move || Node::mount(f, t, i, img, "", &[]))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("mount"))
            .collect()
    });
    // Heartbeats (1 s) have told every node its place by now.
    std::thread::sleep(Duration::from_millis(2500));
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|n| {
                let (t, d) = (&tree, &n.dir);
                s.spawn(move || check_tree(t, d))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (n, r) in nodes.iter().zip(&results) {
        assert!(r.is_ok(), "node {}: {:?}", n.i, r);
    }

    // The registry sent no byte of the layer blob twice.
    let seen = proxy.seen();
    let mut ranges = blob_ranges(&seen, &blob.digest);
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "registry sent bytes twice: {w:?} (all: {ranges:?})"
        );
    }
    let sent: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    assert!(
        sent <= blob.written.blob_len,
        "{sent} > blob {}",
        blob.written.blob_len
    );

    // No node uploaded more than fan-out copies of any chunk, and peers did
    // serve each other.
    let mut peer_chunks = 0;
    let mut report = BTreeMap::new();
    for n in &nodes {
        let st = n.p2p_stats();
        assert_eq!(
            st["rebuilt_chunks_sent"], 0,
            "node {}: chunks are sent as the stored bytes the node kept: {st}",
            n.i
        );
        let max = st["max_chunk_uploads"].as_u64().unwrap();
        assert!(
            max <= FANOUT,
            "node {} uploaded a chunk {max} times: {st}",
            n.i
        );
        assert_eq!(st["corrupt_from_peers"], 0, "node {}: {st}", n.i);
        let down: u64 = st["downloaded_from"]
            .as_object()
            .unwrap()
            .values()
            .map(|t| t["chunks"].as_u64().unwrap())
            .sum();
        peer_chunks += down;
        report.insert(
            n.i,
            (
                st["uploaded_chunks"].clone(),
                down,
                n.source_chunks("supernode"),
                n.source_chunks("registry"),
            ),
        );
    }
    eprintln!("per node (uploaded, from peers, from super node, from registry): {report:?}");
    assert!(peer_chunks > 0, "no chunk came from a peer: {report:?}");
    for (i, (_, _, _, reg)) in &report {
        assert_eq!(*reg, 0, "node {i} went to the registry directly");
    }
    let sn = lazybd_tests::http::get_json(
        Some(&fabric.hub.name),
        &format!("{}:{SUPERNODE_PORT}", fabric.hub_ip()),
        "/v1/stats",
    );
    eprintln!("super node: {sn}");
    // Prometheus sees the same counters.
    let (status, metrics) = lazybd_tests::http::request(
        Some(&fabric.hub.name),
        "GET",
        &format!("{}:{SUPERNODE_PORT}", fabric.hub_ip()),
        "/metrics",
        &[],
        b"",
    );
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(status, 200, "{metrics}");
    assert!(
        metrics.contains(&format!(
            "lazybd_supernode_registry_bytes_total {}\n",
            sn["registry_bytes"]
        )),
        "{metrics}\n{sn}"
    );
    drop(nodes);
}

#[test]
fn faults_dead_and_lying_peers_super_node_and_registry_down() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let mut registry = Registry::start();
    let (tree, blob) = publish_image(tmp.path(), &registry);
    let fabric = Fabric::new(22, 3);
    let hub = fabric.hub_ip();
    let proxy = hub_proxy(&fabric, &registry);
    // Fan-out 1 makes the tree a chain in join order: dying peer, A, liar, B.
    let mut sn = hub_supernode(&fabric, &tmp.path().join("sn"), 1, 120_000, &[]);
    let image = hub_image(&fabric);
    let dying = FakePeer::start(
        &fabric.hub,
        format!("{hub}:7071").parse().unwrap(),
        Fake::Truncate,
    );
    let liar = FakePeer::start(
        &fabric.hub,
        format!("{hub}:7072").parse().unwrap(),
        Fake::Corrupt,
    );
    announce(&fabric, &blob, &format!("{hub}:7071"));
    let a = Node::mount(&fabric, tmp.path(), 0, &image, "", &[]);
    announce(&fabric, &blob, &format!("{hub}:7072"));
    let b = Node::mount(&fabric, tmp.path(), 1, &image, "", &[]);
    std::thread::sleep(Duration::from_millis(2500));

    // A's parent dies mid-transfer on every request: A fetches elsewhere.
    check_tree(&tree, &a.dir).expect("node A reads correct data");
    let st_a = a.p2p_stats();
    assert!(
        dying.requests.load(Ordering::SeqCst) > 0,
        "A asked its parent: {st_a}"
    );
    assert!(st_a["peer_failures"].as_u64().unwrap() > 0, "{st_a}");
    assert!(a.source_chunks("supernode") > 0);

    // B's parent lies: verification rejects, it is counted, and B gets the
    // chunks from the next ancestor up, A.
    check_tree(&tree, &b.dir).expect("node B reads correct data");
    let st_b = b.p2p_stats();
    assert!(liar.requests.load(Ordering::SeqCst) > 0, "{st_b}");
    assert!(st_b["corrupt_from_peers"].as_u64().unwrap() > 0, "{st_b}");
    let from_a = st_b["downloaded_from"][&a.addr]["chunks"]
        .as_u64()
        .unwrap_or(0);
    assert!(from_a > 0, "B fetched from A after the liar: {st_b}");
    assert!(b.source_chunks("peer") > 0);

    // The super node goes down: a new node falls back to the registry.
    sn.kill();
    let c = Node::mount(&fabric, tmp.path(), 2, &image, "", &[]);
    check_tree(&tree, &c.dir).expect("node C reads correct data without the super node");
    assert!(c.source_chunks("registry") > 0);
    assert!(!blob_ranges(&proxy.seen(), &blob.digest).is_empty());

    // The registry goes down too: every node holds every chunk it read, so
    // reading everything again (page cache dropped) still works.
    registry.stop();
    drop(proxy);
    drop_page_cache();
    for n in [&a, &b, &c] {
        check_tree(&tree, &n.dir)
            .unwrap_or_else(|e| panic!("node {} after registry down: {e}", n.i));
    }
    drop((a, b, c));
}

/// A node whose cache was filled before it took part in P2P (no stored
/// bytes kept) still serves its chunks: rebuilt from the image, counted,
/// verified by the receiver like any other.
#[test]
fn a_cache_from_before_p2p_is_served_rebuilt() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let (tree, _blob) = publish_image(tmp.path(), &registry);
    let fabric = Fabric::new(29, 2);
    let _proxy = hub_proxy(&fabric, &registry);
    let _sn = hub_supernode(&fabric, &tmp.path().join("sn"), 1, 120_000, &[]);
    let image = hub_image(&fabric);
    let before = Node::mount_direct(&fabric, tmp.path(), 0, &image);
    check_tree(&tree, &before.dir).expect("node A reads the registry");
    drop(before);
    let a = Node::mount(&fabric, tmp.path(), 0, &image, "", &[]);
    let b = Node::mount(&fabric, tmp.path(), 1, &image, "", &[]);
    std::thread::sleep(Duration::from_millis(2500));
    check_tree(&tree, &b.dir).expect("node B reads correct data from A");
    let st = a.p2p_stats();
    assert!(st["rebuilt_chunks_sent"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(b.p2p_stats()["corrupt_from_peers"], 0);
    assert!(b.source_chunks("peer") > 0);
    assert_eq!(b.source_chunks("registry"), 0);
    drop((a, b));
}

#[test]
fn slow_parent_is_skipped_after_the_peer_timeout() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let (tree, blob) = publish_image(tmp.path(), &registry);
    let fabric = Fabric::new(26, 1);
    let hub = fabric.hub_ip();
    let _proxy = hub_proxy(&fabric, &registry);
    let _sn = hub_supernode(&fabric, &tmp.path().join("sn"), 1, 120_000, &[]);
    let slow = FakePeer::start(
        &fabric.hub,
        format!("{hub}:7073").parse().unwrap(),
        Fake::Slow,
    );
    announce(&fabric, &blob, &format!("{hub}:7073"));
    let a = Node::mount(&fabric, tmp.path(), 0, &hub_image(&fabric), "", &[]);
    std::thread::sleep(Duration::from_millis(1500));
    check_tree(&tree, &a.dir).expect("node A reads correct data past its slow parent");
    let st = a.p2p_stats();
    assert!(slow.requests.load(Ordering::SeqCst) > 0, "{st}");
    assert!(st["peer_failures"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(
        st["corrupt_from_peers"], 0,
        "the late garbage never arrived: {st}"
    );
    assert!(a.source_chunks("supernode") > 0);
    drop(a);
}

#[test]
fn private_image_over_tls_with_cluster_token() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let (user, password) = ("p2puser", "p2p-secret");
    let registry = Registry::start_with_htpasswd(user, password);
    let (tree, blob) = publish_image(tmp.path(), &registry);
    let fabric = Fabric::new(23, 2);
    let hub = fabric.hub_ip();
    let _proxy = hub_proxy(&fabric, &registry);

    let pki = Pki::new(&tmp.path().join("pki"), &fabric);
    let sn_args = pki.supernode_args();
    let sn_args: Vec<&dyn AsRef<std::ffi::OsStr>> = sn_args.iter().map(|a| a as _).collect();
    let _sn = hub_supernode(&fabric, &tmp.path().join("sn"), 1, 60_000, &sn_args);
    let docker_config = docker_config(
        &tmp.path().join("docker-config.json"),
        &fabric,
        user,
        password,
    );
    let toml = pki.node_toml();
    let image = format!("{hub}:{PROXY_PORT}/p2p:latest");
    let mount = |i| {
        let args: [&dyn AsRef<std::ffi::OsStr>; 2] = [&"--docker-config", &docker_config];
        Node::mount(&fabric, tmp.path(), i, &image, &toml, &args)
    };
    let (a, b) = (mount(0), mount(1));
    std::thread::sleep(Duration::from_millis(2500));
    check_tree(&tree, &a.dir).expect("node A reads correct data");
    check_tree(&tree, &b.dir).expect("node B reads correct data");

    let ca_arg = pki.ca.to_str().unwrap();
    let token_hdr = format!("X-Lazybd-Token: {TOKEN}");
    let token_hdr = token_hdr.as_str();
    let st_b = b.p2p_stats();
    let from_a = st_b["downloaded_from"][&a.addr]["chunks"]
        .as_u64()
        .unwrap_or(0);
    assert!(from_a > 0, "B got chunks from A over TLS: {st_b}");

    // Without the token: nothing, from peers or the super node.
    let sn = format!("https://{hub}:{SUPERNODE_PORT}");
    let range = format!(
        "/v1/blob?registry={hub}:{PROXY_PORT}&repo=p2p&digest={}&size={}&start=0&end=4096",
        blob.digest, blob.written.blob_len
    );
    let (status, _) = curl(
        &fabric.hub.name,
        &["--cacert", ca_arg, &format!("https://{}/v1/stats", a.addr)],
    );
    assert_eq!(status, 401);
    let (status, _) = curl(
        &fabric.hub.name,
        &["--cacert", ca_arg, &format!("{sn}{range}")],
    );
    assert_eq!(status, 401);
    // With the token but no registry credentials: the registry's refusal,
    // although the super node has these bytes cached.
    let (status, body) = curl(
        &fabric.hub.name,
        &["--cacert", ca_arg, "-H", token_hdr, &format!("{sn}{range}")],
    );
    assert_eq!(status, 403, "{body}");
    // Wrong credentials: refused too; right ones: the bytes.
    let wrong = format!(
        "X-Lazybd-Registry-Auth: basic {}:{}",
        hex::encode(user),
        hex::encode("nope")
    );
    let (status, _) = curl(
        &fabric.hub.name,
        &[
            "--cacert",
            ca_arg,
            "-H",
            token_hdr,
            "-H",
            &wrong,
            &format!("{sn}{range}"),
        ],
    );
    assert_eq!(status, 403);
    let right = format!(
        "X-Lazybd-Registry-Auth: basic {}:{}",
        hex::encode(user),
        hex::encode(password)
    );
    let (status, body) = curl(
        &fabric.hub.name,
        &[
            "--cacert",
            ca_arg,
            "-H",
            token_hdr,
            "-H",
            &right,
            &format!("{sn}{range}"),
        ],
    );
    // (The body is binary; curl's stdout went through a lossy UTF-8 view.)
    assert_eq!(status, 200, "{body}");
    // Plain HTTP to the TLS port gets nothing.
    let (status, _) = curl(
        &fabric.hub.name,
        &[&format!("http://{hub}:{SUPERNODE_PORT}/healthz")],
    );
    assert_ne!(status, 200);
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshotters_share_chunks_and_count_uploads_per_peer() {
    require_root!();
    let (tmp, registry, img) = registry_with_lazy_rich();
    let fabric = Fabric::new(24, 2);
    let hub = fabric.hub_ip();
    let proxy = hub_proxy(&fabric, &registry);
    let _sn = hub_supernode(&fabric, &tmp.path().join("sn"), 1, 30_000, &[]);
    let image = format!("{hub}:{PROXY_PORT}/rich:lazy");

    let nodes = [
        snapshotter_node(&fabric, tmp.path(), 0),
        snapshotter_node(&fabric, tmp.path(), 1),
    ];
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(n.client().await);
    }
    // Node 0 attaches every layer first (joins each tree first), then node 1.
    let mut top = String::new();
    for (ni, c) in clients.iter_mut().enumerate() {
        let log = || format!("node {ni}:\n{}", nodes[ni].log());
        top = attach_layers(c, &image, &img, log).await;
    }
    std::thread::sleep(Duration::from_millis(2500));

    // Node 1 reads the whole image; node 0 relays it (it has read nothing).
    let dir = tmp.path().join("rootfs1");
    std::fs::create_dir_all(&dir).unwrap();
    let mounts = prepare(&mut clients[1], "container", &top, HashMap::new())
        .await
        .unwrap();
    {
        let _m = Mounted::new(&mounts, &dir);
        assert_eq!(
            std::fs::read_to_string(dir.join("etc/hostname")).unwrap(),
            "lazybd-2\n"
        );
        assert_eq!(std::fs::read(dir.join("data/big")).unwrap().len(), 6 << 20);
        for p in walk(&dir) {
            if dir.join(&p).is_file() {
                std::fs::read(dir.join(&p)).unwrap();
            }
        }
    }
    let m0 = nodes[0].metrics();
    let m1 = nodes[1].metrics();
    let node1 = format!("{}:{PEER_PORT}", fabric.node_ip(1));
    let up = metric(
        &m0,
        &format!("lazybd_p2p_uploaded_chunks_total{{peer=\"{node1}\"}}"),
    );
    assert!(up > 0.0, "node 0 uploaded to node 1:\n{m0}");
    assert!(metric(&m0, "lazybd_p2p_max_chunk_uploads") <= 1.0);
    assert_eq!(metric(&m0, "lazybd_p2p_rebuilt_chunks_sent_total"), 0.0);
    assert!(metric(&m0, "lazybd_p2p_stored_chunks_sent_total") > 0.0);
    assert!(
        metric(&m1, r#"lazybd_source_chunks_total{source="peer"}"#) > 0.0,
        "{m1}"
    );
    assert_eq!(
        metric(&m1, r#"lazybd_source_chunks_total{source="registry"}"#),
        0.0
    );
    // The registry saw each blob byte at most once across both nodes.
    let seen = proxy.seen();
    for layer in &img.layers {
        let mut r = blob_ranges(&seen, layer);
        r.sort();
        for w in r.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "{layer}: registry sent bytes twice: {w:?}"
            );
        }
    }
    drop(clients);
    drop(nodes);
}

/// `hack/bench-p2p.sh` runs this: distribution of one image to 1/4/8 nodes
/// over a shaped registry link, P2P against every node reading the registry
/// directly. Prints one markdown table row per run. Env:
/// LAZYBD_BENCH_NODES (default "1,4,8"), LAZYBD_BENCH_RATE (tc rate, default
/// "200mbit"), LAZYBD_BENCH_MIB (image payload, default 32).
#[test]
#[ignore = "benchmark: run with hack/bench-p2p.sh"]
fn bench_p2p() {
    require_root!();
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let counts: Vec<usize> = env("LAZYBD_BENCH_NODES", "1,4,8")
        .split(',')
        .map(|n| n.trim().parse().expect("LAZYBD_BENCH_NODES"))
        .collect();
    let rate = env("LAZYBD_BENCH_RATE", "200mbit");
    let mib: usize = env("LAZYBD_BENCH_MIB", "32").parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("data")).unwrap();
    std::fs::write(tree.join("data/payload.bin"), noise(11, mib << 20)).unwrap();
    publish_tree(tmp.path(), &tree, 1 << 20, &registry);
    println!("| nodes | mode | registry egress (MiB) | time to all complete (s) |");
    println!("|---|---|---|---|");
    for &n in &counts {
        for p2p in [false, true] {
            let run = tmp.path().join(format!("run-{n}-{p2p}"));
            std::fs::create_dir_all(&run).unwrap();
            let fabric = Fabric::new(25, n);
            let link = RegistryLink::new(&fabric, &rate);
            let reg = format!("{}:{PROXY_PORT}", link.ip);
            let proxy = CountingProxy::start(
                &link.ns,
                reg.parse().unwrap(),
                registry.host().parse().unwrap(),
            );
            let image = format!("{reg}/p2p:latest");
            let sn = p2p.then(|| supernode(&fabric, &run.join("sn"), 4, 10_000, &[], &reg));
            let nodes: Vec<Node> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..n)
                    .map(|i| {
                        let (f, r, img) = (&fabric, &run, &image);
                        s.spawn(move || {
                            if p2p {
                                Node::mount(f, r, i, img, "", &[])
                            } else {
                                Node::mount_direct(f, r, i, img)
                            }
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().expect("mount")).collect()
            });
            std::thread::sleep(Duration::from_millis(1500));
            let before = proxy.egress.load(Ordering::Relaxed);
            let started = std::time::Instant::now();
            std::thread::scope(|s| {
                for node in &nodes {
                    let (t, d) = (&tree, &node.dir);
                    s.spawn(move || check_tree(t, d).expect("read"));
                }
            });
            let secs = started.elapsed().as_secs_f64();
            let egress = proxy.egress.load(Ordering::Relaxed) - before;
            println!(
                "| {n} | {} | {:.1} | {secs:.2} |",
                if p2p { "P2P" } else { "direct" },
                egress as f64 / f64::from(1 << 20)
            );
            drop(nodes);
            drop(sn);
            drop(proxy);
            drop(link);
            drop(fabric);
        }
    }
}
