//! The CRI keychain: kubelet's pull credentials reach the snapshotter
//! through its CRI image-service proxy. A lazybd image on a registry with
//! basic auth, no docker config with its credentials on the node: a CRI
//! PullImage with `auth` straight to containerd cannot attach the layers
//! lazily (the snapshotter's fetches are refused; it falls back and says
//! why, and containerd cannot unpack a lazybd layer itself), the same
//! PullImage through the proxy attaches every layer lazily with the
//! credentials it carried. The credentials are kept (root-only, on disk)
//! only once a pull succeeded: they survive a snapshotter restart, and a
//! pull with a wrong password never replaces them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageSpec, PullImageRequest};
use lazybd_tests::cli::{lazybd, ok};
use lazybd_tests::containerd::{Containerd, LazyRun};
use lazybd_tests::images::{noise, publish_rich};
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::SnapshotterDaemon;

const USER: &str = "puller";
const PASSWORD: &str = "pull:s3cret";

/// PullImage with the registry's credentials on the CRI socket `socket`.
fn pull_with_auth(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    image: &str,
) -> Result<String, String> {
    pull_with_password(rt, socket, image, PASSWORD)
}

/// PullImage as `USER` with `password` on the CRI socket `socket`.
fn pull_with_password(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    image: &str,
    password: &str,
) -> Result<String, String> {
    rt.block_on(async {
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
        let mut client = ImageServiceClient::new(channel);
        let call = client.pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth: Some(AuthConfig {
                username: USER.into(),
                password: password.into(),
                ..Default::default()
            }),
            sandbox_config: None,
        });
        match tokio::time::timeout(Duration::from_secs(180), call).await {
            Ok(Ok(reply)) => Ok(reply.into_inner().image_ref),
            Ok(Err(status)) => Err(format!("{status:?}")),
            Err(_) => panic!("PullImage of {image} via {} hung", socket.display()),
        }
    })
}

/// A private registry with the rich image converted as `rich:lazy` (and,
/// with another chunk size, so other layer digests, `rich:lazy2`), a
/// snapshotter with the CRI keychain on `proxy`, a node docker config
/// without the registry's credentials, and containerd with CRI on lazybd.
struct Scene {
    _tmp: tempfile::TempDir,
    registry: Registry,
    snapshotter: SnapshotterDaemon,
    ctd: Containerd,
    proxy: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Scene {
    fn start() -> Scene {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let registry = Registry::start_with_htpasswd(USER, PASSWORD);
        publish_rich(t, &registry);
        let creds = registry.docker_config();
        for (tag, chunk) in [("rich:lazy", "65536"), ("rich:lazy2", "131072")] {
            ok(&lazybd(&[
                &"convert",
                &"--plain-http",
                &"--chunk-size",
                &chunk,
                &"--work-dir",
                &t,
                &"--docker-config",
                &creds,
                &registry.reference("rich:v1"),
                &registry.reference(tag),
            ]));
        }
        // The node's docker config has no credentials for the registry.
        let node_config = t.join("node-docker-config.json");
        std::fs::write(&node_config, r#"{"auths":{}}"#).unwrap();

        let sdir = t.join("snapshotter");
        std::fs::create_dir_all(&sdir).unwrap();
        let proxy = sdir.join("cri.sock");
        // containerd's socket is only known once it runs, after the snapshotter:
        // the proxy dials this link at its first call.
        let containerd_cri = t.join("containerd.sock");
        let snapshotter = SnapshotterDaemon::start(
            &sdir,
            &format!(
                "[registry]\nplain_http = [\"{}\"]\ndocker_config = \"{}\"\n\
                 [cri_keychain]\nlisten = \"{}\"\ncontainerd_cri = \"{}\"\n",
                registry.host(),
                node_config.display(),
                proxy.display(),
                containerd_cri.display(),
            ),
        );
        let ctd = Containerd::builder()
            .proxy_snapshotter(snapshotter.proxy())
            .cri_snapshotter("lazybd")
            .plain_http_registry(&registry.host())
            .start();
        std::os::unix::fs::symlink(ctd.socket(), &containerd_cri).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Scene {
            _tmp: tmp,
            registry,
            snapshotter,
            ctd,
            proxy,
            rt,
        }
    }

    fn layers(&self) -> Vec<serde_json::Value> {
        let layers = self
            .snapshotter
            .control(&serde_json::json!({"op": "layers"}));
        layers["layers"].as_array().expect("layers").clone()
    }

    fn keychain_file(&self) -> std::path::PathBuf {
        self.snapshotter.root.join("cri-keychain/credentials.json")
    }
}

#[test]
fn pull_credentials_reach_the_snapshotter_through_the_cri_keychain() {
    require_root!();
    let scene = Scene::start();
    let (snapshotter, ctd, rt, proxy) = (&scene.snapshotter, &scene.ctd, &scene.rt, &scene.proxy);
    let lazy = scene.registry.reference("rich:lazy");

    // Straight to containerd: it has the credentials, the snapshotter not.
    // containerd then unpacks the layer itself, which it cannot do for a
    // lazybd layer: the pull fails.
    let direct = pull_with_auth(rt, &ctd.socket(), &lazy);
    assert!(direct.is_err(), "{direct:?}");
    let log = snapshotter.log();
    assert!(
        log.lines()
            .any(|l| l.contains("not attached lazily, unpacking normally")
                && l.to_lowercase().contains("authoriz")),
        "without the proxy: fallback, the log says why (pull: {direct:?}):\n{log}"
    );
    let layers = snapshotter.control(&serde_json::json!({"op": "layers"}));
    assert_eq!(layers["layers"], serde_json::json!([]), "{layers}");

    // Through the proxy: the credentials are kept, every layer is lazy.
    let image_ref = pull_with_auth(rt, proxy, &lazy)
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", snapshotter.log(), ctd.log_tail()));
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert_eq!(
        ctd.image_status(&lazy)
            .expect("pulled image in CRI's store")
            .id,
        image_ref
    );
    let layers = snapshotter.control(&serde_json::json!({"op": "layers"}));
    let layers = layers["layers"].as_array().expect("layers").clone();
    assert_eq!(layers.len(), 3, "{layers:?}\n{}", snapshotter.log());
    assert!(layers.iter().all(|l| l["state"] == "lazy"), "{layers:?}");
    let log = snapshotter.log();
    assert!(
        log.contains(&format!("cri keychain: credentials for {lazy} kept")),
        "{log}"
    );
    // The proxy forwards the other calls too.
    let listed = rt.block_on(async {
        let channel = containerd_client::connect(proxy).await.unwrap();
        ImageServiceClient::new(channel)
            .list_images(k8s_cri::v1::ListImagesRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .images
    });
    assert!(listed.iter().any(|i| i.id == image_ref), "{listed:?}");
}

/// sha256 of the rich image's `/data/big` and `/data/big2` as busybox's
/// sha256sum prints them.
fn expected_sums() -> String {
    use sha2::Digest;
    let mut big = noise(1, 6 << 20);
    big[2 << 20..4 << 20].fill(0);
    let big2 = noise(3, 3 << 20);
    format!(
        "{}  /data/big\n{}  /data/big2\n",
        hex::encode(sha2::Sha256::digest(&big)),
        hex::encode(sha2::Sha256::digest(&big2))
    )
}

#[test]
fn kept_credentials_survive_a_restart_and_a_wrong_password_never_replaces_them() {
    require_root!();
    let mut scene = Scene::start();
    let lazy = scene.registry.reference("rich:lazy");
    let lazy2 = scene.registry.reference("rich:lazy2");
    pull_with_auth(&scene.rt, &scene.proxy, &lazy)
        .unwrap_or_else(|e| panic!("{e}\n{}", scene.snapshotter.log()));
    assert_eq!(scene.layers().len(), 3, "{}", scene.snapshotter.log());

    // Kept on disk, for root only.
    let file = scene.keychain_file();
    let meta = std::fs::metadata(&file).expect("the keychain file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let dir = std::fs::metadata(file.parent().unwrap()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o700);
    let kept = std::fs::read(&file).unwrap();
    assert!(String::from_utf8_lossy(&kept).contains(PASSWORD));

    // A pull with a wrong password fails and changes nothing.
    let wrong = pull_with_password(&scene.rt, &scene.proxy, &lazy2, "wrong");
    assert!(wrong.is_err(), "{wrong:?}");
    assert_eq!(std::fs::read(&file).unwrap(), kept);
    // The next pull of that repository straight to containerd (which has
    // the right credentials; the snapshotter has only its keychain) still
    // attaches lazily with the kept credentials.
    pull_with_auth(&scene.rt, &scene.ctd.socket(), &lazy2).unwrap_or_else(|e| {
        panic!(
            "after a wrong-password pull: {e}\n{}",
            scene.snapshotter.log()
        )
    });
    let layers = scene.layers();
    assert_eq!(layers.len(), 6, "{layers:?}");

    // Restarted, the snapshotter re-attaches the incomplete private layers
    // and they keep reading: files never read before, from the registry.
    scene.snapshotter.restart();
    let layers = scene.layers();
    assert_eq!(layers.len(), 6, "{layers:?}\n{}", scene.snapshotter.log());
    let present = |layers: &[serde_json::Value]| -> u64 {
        layers
            .iter()
            .map(|l| l["chunks_present"].as_u64().unwrap())
            .sum()
    };
    let before = present(&layers);
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    // containerd may still be reconnecting to the restarted snapshotter:
    // retry, bounded.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    let sums = loop {
        attempt += 1;
        let id = format!("kc{attempt}");
        let out = scene.ctd.ctr(
            &LazyRun {
                image: &lazy,
                id: &id,
                cmd: &["/bin/sh", "-c", "sha256sum /data/big /data/big2"],
                ..LazyRun::default()
            }
            .args(),
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            break stdout;
        }
        assert!(
            Instant::now() < deadline,
            "reading after the restart: {stdout}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            scene.snapshotter.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(sums.replace("\r", ""), expected_sums());
    let after = present(&scene.layers());
    assert!(
        after > before,
        "fetched after the restart: {before} -> {after}"
    );
}
