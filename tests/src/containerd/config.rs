//! The files the harness's containerd reads: config.toml (a node's config,
//! docs/containerd.md, on private paths), and with CRI the CNI network
//! config and the registry hosts dirs.

use std::path::Path;

use super::{ContainerdBuilder, CriSettings};
use crate::busybox::PAUSE_IMAGE;

/// The runtime handler of our shim in the CRI config.
pub const LAZYBD_HANDLER: &str = "lazybd";
/// The pods' subnet with a pod network: only inside containerd's netns.
pub const POD_SUBNET: &str = "10.233.70.0/24";

/// config.toml for a containerd under `d`.
pub(super) fn render(d: &Path, b: &ContainerdBuilder) -> String {
    let disabled = if b.cri.is_some() {
        ""
    } else {
        "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
    };
    let mut config = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
{disabled}[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  level = "debug"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
        d = d.display()
    );
    for p in &b.proxies {
        config += &format!(
            "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n  [proxy_plugins.{name}.exports]\n    root = \"{}\"\n",
            p.socket.display(),
            p.root.display(),
            name = p.name,
        );
    }
    if let Some(cri) = &b.cri {
        config += &cri_section(d, cri);
    }
    config += &b.extra_config;
    config
}

fn cri_section(d: &Path, cri: &CriSettings) -> String {
    let plugin = r#"plugins."io.containerd.grpc.v1.cri""#;
    format!(
        r#"[{plugin}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Loading containerd's AppArmor profile would change the host's policy.
  disable_apparmor = true
  # Tests may run in a container without CAP_SYS_RESOURCE, where the
  # sandbox's oom_score_adj of -998 is refused: cap it at containerd's own.
  restrict_oom_score_adj = true
  [{plugin}.containerd]
    snapshotter = "{snap}"
    disable_snapshot_annotations = false
    default_runtime_name = "runc"
    [{plugin}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{plugin}.containerd.runtimes.runc.options]
        Root = "{d}/runc"
    # CRI decodes `options` into runc's Options only for io.containerd.runc.*
    # runtime types; for ours it sends runtimeoptions.v1.Options, dropping
    # BinaryName/Root: our shim runs `runc` from PATH with its state under
    # /run/containerd/runc/k8s.io (Drop cleans up our containers there).
    [{plugin}.containerd.runtimes.{LAZYBD_HANDLER}]
      runtime_type = "io.containerd.lazybd.v2"
  [{plugin}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
  [{plugin}.registry]
    config_path = "{d}/certs.d"
"#,
        d = d.display(),
        snap = cri.snapshotter,
    )
}

/// The CNI network config, the hosts dirs of plain-HTTP registries and the
/// dirs CRI writes to.
pub(super) fn write_cri_files(d: &Path, cri: &CriSettings) {
    for sub in ["cni/net.d", "certs.d", "pods", "runc"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    std::fs::write(
        d.join("cni/net.d/10-lazybd-test.conflist"),
        cni_conflist(d, cri.pod_network),
    )
    .unwrap();
    for host in &cri.plain_http_registries {
        let hosts_dir = d.join("certs.d").join(host);
        std::fs::create_dir_all(&hosts_dir).unwrap();
        std::fs::write(
            hosts_dir.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
    }
}

/// A bridge network on [`POD_SUBNET`] (host-local IPAM with its state in
/// `d`, no masquerading), or loopback only: with host-network pods CNI is
/// never called, but CRI wants a network config to report NetworkReady.
fn cni_conflist(d: &Path, pod_network: bool) -> String {
    let plugins = if pod_network {
        serde_json::json!([{
            "type": "bridge",
            "bridge": "lbtcni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_SUBNET}]],
                "dataDir": d.join("cni/ipam"),
            },
        }])
    } else {
        serde_json::json!([{"type": "loopback"}])
    };
    serde_json::json!({"cniVersion": "1.0.0", "name": "lazybd-test", "plugins": plugins})
        .to_string()
}
