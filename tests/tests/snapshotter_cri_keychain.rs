//! The CRI keychain: kubelet's pull credentials reach the snapshotter
//! through its CRI image-service proxy. A lazybd image on a registry with
//! basic auth, no docker config with its credentials on the node: a CRI
//! PullImage with `auth` straight to containerd cannot attach the layers
//! lazily (the snapshotter's fetches are refused; it falls back and says
//! why, and containerd cannot unpack a lazybd layer itself), the same
//! PullImage through the proxy attaches every layer lazily with the
//! credentials it carried.

use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageSpec, PullImageRequest};
use lazybd_tests::cli::{lazybd, ok};
use lazybd_tests::containerd::Containerd;
use lazybd_tests::images::publish_rich;
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
                password: PASSWORD.into(),
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

#[test]
fn pull_credentials_reach_the_snapshotter_through_the_cri_keychain() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let registry = Registry::start_with_htpasswd(USER, PASSWORD);
    publish_rich(t, &registry);
    let lazy = registry.reference("rich:lazy");
    let creds = registry.docker_config();
    ok(&lazybd(&[
        &"convert",
        &"--plain-http",
        &"--chunk-size",
        &"65536",
        &"--work-dir",
        &t,
        &"--docker-config",
        &creds,
        &registry.reference("rich:v1"),
        &lazy,
    ]));
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

    // Straight to containerd: it has the credentials, the snapshotter not.
    // containerd then unpacks the layer itself, which it cannot do for a
    // lazybd layer: the pull fails.
    let direct = pull_with_auth(&rt, &ctd.socket(), &lazy);
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
    let image_ref = pull_with_auth(&rt, &proxy, &lazy)
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
        let channel = containerd_client::connect(&proxy).await.unwrap();
        ImageServiceClient::new(channel)
            .list_images(k8s_cri::v1::ListImagesRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .images
    });
    assert!(listed.iter().any(|i| i.id == image_ref), "{listed:?}");
    drop(ctd);
    drop(snapshotter);
}
