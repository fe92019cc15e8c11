//! containerd's registry host configuration (hosts.toml) drives lazybd as it
//! drives containerd, with real docker-registry daemons: a pull-through
//! cache (`proxy.remoteurl`) as the mirror of an origin serves the lazy
//! layers' range reads, the origin sends each blob once (to the mirror),
//! and with the mirror down reads fall back to the origin; a TLS registry
//! whose CA only hosts.toml names works with it and is a clear error
//! without.

use std::path::{Path, PathBuf};

use lazybd_tests::cli::{fails, lazybd, ok, MountGuard};
use lazybd_tests::images::publish_lazy_rich;
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;

/// Writes `<dir>/<host_port_>/hosts.toml` as containerd expects it.
fn hosts_toml(dir: &Path, registry: &str, text: &str) {
    let (host, port) = registry.rsplit_once(':').unwrap();
    let d = dir.join(format!("{host}_{port}_"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("hosts.toml"), text).unwrap();
}

fn mount(root: &Path, dir: &Path, image: &str, hosts: &Path) -> MountGuard {
    std::fs::create_dir_all(dir).unwrap();
    ok(&lazybd(&[
        &"mount",
        &"--hosts-dir",
        &hosts,
        &"--root",
        &root,
        &image,
        &dir,
    ]));
    MountGuard::new(root, dir)
}

/// Every regular file under `dir`, read whole: what a container would see.
fn read_all(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn lazy_layers_come_through_a_mirror_and_fall_back_to_the_origin() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let origin = Registry::start();
    publish_lazy_rich(t, &origin);
    let mirror = Registry::start_mirror_of(&origin);
    let hosts = t.join("certs.d");
    hosts_toml(
        &hosts,
        &origin.host(),
        &format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            origin.host(),
            mirror.host()
        ),
    );
    let image = origin.reference("rich:lazy");
    let before = origin.blob_gets();

    let m = mount(&t.join("root-1"), &t.join("mnt-1"), &image, &hosts);
    let through_mirror = read_all(&t.join("mnt-1"));
    assert!(through_mirror
        .iter()
        .any(|(p, d)| p.ends_with("data/big") && d.len() == 6 << 20));
    drop(m);
    let mirror_served = mirror.blob_gets();
    let origin_sent = origin.blob_gets() - before;
    // Every index and range read went to the mirror; the origin only
    // answered the mirror's fetches (a pull-through cache fetches a blob
    // again while an earlier fetch of it is still in flight).
    eprintln!("blob requests: the mirror answered {mirror_served}, the origin {origin_sent}");
    assert!(
        mirror_served > 3 && origin_sent < mirror_served,
        "the origin answered {origin_sent} blob requests, the mirror {mirror_served}"
    );

    // The mirror down: a fresh node reads the same through the origin.
    drop(mirror);
    let before = origin.blob_gets();
    let m = mount(&t.join("root-2"), &t.join("mnt-2"), &image, &hosts);
    let through_origin = read_all(&t.join("mnt-2"));
    drop(m);
    let strip = |files: Vec<(PathBuf, Vec<u8>)>, root: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        files
            .into_iter()
            .map(|(p, d)| (p.strip_prefix(root).unwrap().to_owned(), d))
            .collect()
    };
    assert!(
        strip(through_origin, &t.join("mnt-2")) == strip(through_mirror, &t.join("mnt-1")),
        "the origin served other bytes than the mirror"
    );
    assert!(
        origin.blob_gets() > before,
        "the fallback did not reach the origin"
    );
}

#[test]
fn a_private_ca_named_only_in_hosts_toml_is_trusted_for_that_registry() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let plain = Registry::start();
    publish_lazy_rich(t, &plain);
    let tls = Registry::start_tls();
    let copied = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(format!("docker://{}", plain.reference("rich:lazy")))
        .arg(format!("docker://{}", tls.reference("rich:lazy")))
        .output()
        .unwrap();
    assert!(copied.status.success(), "{copied:?}");
    let image = tls.reference("rich:lazy");

    // Without the CA: a clear error naming the certificate.
    let hosts = t.join("certs.d");
    std::fs::create_dir_all(&hosts).unwrap();
    let err = fails(&lazybd(&[&"inspect", &"--hosts-dir", &hosts, &image]));
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // skip_verify: any certificate, as containerd's hosts.toml says.
    hosts_toml(
        &hosts,
        &tls.host(),
        &format!("server = \"https://{}\"\nskip_verify = true\n", tls.host()),
    );
    ok(&lazybd(&[&"inspect", &"--hosts-dir", &hosts, &image]));

    hosts_toml(
        &hosts,
        &tls.host(),
        &format!(
            "server = \"https://{}\"\nca = \"{}\"\n",
            tls.host(),
            tls.ca().unwrap().display()
        ),
    );
    let summary = ok(&lazybd(&[
        &"inspect",
        &"--hosts-dir",
        &hosts,
        &"--json",
        &image,
    ]));
    let layers: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(layers.as_array().unwrap().len(), 3, "{layers}");
    let m = mount(&t.join("root"), &t.join("mnt"), &image, &hosts);
    let files = read_all(&t.join("mnt"));
    assert!(files
        .iter()
        .any(|(p, d)| p.ends_with("data/big") && d.len() == 6 << 20));
    drop(m);
}
