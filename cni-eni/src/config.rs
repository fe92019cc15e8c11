//! The network configuration the runtime passes on stdin.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::env::Env;
use crate::error::{CniError, Result};
use crate::mac::Mac;
use crate::result::{CniResult, Dns, IpConfig, Route};
use crate::version::CniVersion;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/cni/lazybd-eni";
const DEFAULT_NIC_WAIT_MS: u64 = 10_000;
const DEFAULT_LOCK_TIMEOUT_MS: u64 = 30_000;
/// Upper bound for both waits: a runtime's own CNI timeout is minutes at most.
const MAX_WAIT_MS: u64 = 300_000;

/// The key in `CNI_ARGS` that names the ENI.
pub const MAC_ARG: &str = "ENI_MAC";
/// The pod annotation that names the ENI, for runtimes (containerd CRI)
/// that pass pod annotations to CNI but no per-pod CNI_ARGS. Its value is
/// the pod author's to choose, so it is a MAC source only where the config
/// sets `allowPodAnnotation` (see [`NetConf::eni_mac`]).
pub const MAC_ANNOTATION: &str = "lazybd.io/eni-mac";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: String,
    name: String,
    #[serde(rename = "type")]
    plugin_type: String,
    mac: Option<Mac>,
    #[serde(default)]
    allowed_macs: Vec<Mac>,
    #[serde(default)]
    allow_pod_annotation: bool,
    mtu: Option<u32>,
    ipam: Option<IpamRef>,
    #[serde(default)]
    addresses: Vec<IpConfig>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    dns: Dns,
    state_dir: Option<PathBuf>,
    nic_wait_ms: Option<u64>,
    lock_timeout_ms: Option<u64>,
    #[serde(default)]
    stand_in_link_kinds: Vec<String>,
    #[serde(default)]
    runtime_config: RuntimeConfig,
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    /// The key spec 1.1.0 printed; libcni sends both, so both are read.
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<Attachment>>,
}

#[derive(Deserialize)]
struct IpamRef {
    #[serde(rename = "type")]
    plugin_type: String,
}

/// MACs from the runtime are kept as text and parsed only by the commands
/// that use them (ADD, CHECK): a bad value there must not make DEL fail and
/// strand the pod.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RuntimeConfig {
    eni_mac: Option<String>,
    /// containerd's and CRI-O's pod-annotations capability.
    #[serde(rename = "io.kubernetes.cri.pod-annotations", default)]
    pod_annotations: std::collections::HashMap<String, String>,
}

/// One live attachment as listed by the runtime in a GC request.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// Where the addresses and routes come from.
#[derive(Clone, Debug)]
pub enum Addressing {
    /// A delegated IPAM plugin (`ipam.type`, found through `CNI_PATH`).
    Ipam { plugin: String },
    /// Fixed `addresses`, `routes` and `dns` from this config.
    Static(CniResult),
}

#[derive(Clone, Debug)]
pub struct NetConf {
    pub version: CniVersion,
    pub name: String,
    /// The network's own ENI; like `allowed_macs`, offered by the operator.
    pub mac: Option<Mac>,
    /// `allowedMacs`: ENIs the operator offers to this network (see [`crate::offer`]).
    pub allowed_macs: Vec<Mac>,
    /// `allowPodAnnotation`: whether the pod annotation may name the ENI.
    pub allow_pod_annotation: bool,
    /// `runtimeConfig.eniMac`, unparsed.
    pub runtime_mac: Option<String>,
    /// The pod annotation `lazybd.io/eni-mac`, unparsed.
    pub annotation_mac: Option<String>,
    pub mtu: Option<u32>,
    pub addressing: Addressing,
    pub state_dir: PathBuf,
    pub nic_wait: Duration,
    pub lock_timeout: Duration,
    /// Link kinds accepted besides physical links (no `IFLA_LINKINFO`).
    /// Empty in production; tests name `veth` or `macvlan` stand-ins here.
    pub stand_in_kinds: Vec<String>,
    pub prev_result: Option<CniResult>,
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The config exactly as received, handed to the IPAM delegate.
    pub raw: Value,
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<NetConf> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| CniError::Decode {
            what: "network config".into(),
            reason: e.to_string(),
        })?;
        let version_str = raw
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| CniError::InvalidConfig("cniVersion is missing".into()))?;
        let version = CniVersion::parse(version_str)?;
        let c: RawConf = serde_json::from_value(raw.clone())
            .map_err(|e| CniError::InvalidConfig(e.to_string()))?;
        debug_assert_eq!(c.cni_version, version_str);
        if c.name.is_empty() || c.plugin_type.is_empty() {
            return Err(CniError::InvalidConfig(
                "name and type must not be empty".into(),
            ));
        }
        let addressing = match c.ipam {
            Some(_) if !c.addresses.is_empty() || !c.routes.is_empty() => {
                return Err(CniError::InvalidConfig(
                    "use either ipam or static addresses/routes, not both".into(),
                ))
            }
            Some(i) if i.plugin_type.is_empty() || i.plugin_type.contains('/') => {
                return Err(CniError::InvalidConfig(format!(
                    "ipam.type {:?} is not a plugin name",
                    i.plugin_type
                )))
            }
            Some(i) => Addressing::Ipam {
                plugin: i.plugin_type,
            },
            None => Addressing::Static(static_result(c.addresses, c.routes, c.dns)?),
        };
        let state_dir = c.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        if !state_dir.is_absolute() {
            return Err(CniError::InvalidConfig(format!(
                "stateDir {} must be absolute",
                state_dir.display()
            )));
        }
        let prev_result = c
            .prev_result
            .map(|p| CniResult::parse(&p, "prevResult"))
            .transpose()?;
        Ok(NetConf {
            version,
            name: c.name,
            mac: c.mac,
            allowed_macs: c.allowed_macs,
            allow_pod_annotation: c.allow_pod_annotation,
            runtime_mac: c.runtime_config.eni_mac,
            annotation_mac: c
                .runtime_config
                .pod_annotations
                .get(MAC_ANNOTATION)
                .cloned(),
            mtu: c.mtu,
            addressing,
            state_dir,
            nic_wait: wait("nicWaitMs", c.nic_wait_ms, DEFAULT_NIC_WAIT_MS)?,
            lock_timeout: wait("lockTimeoutMs", c.lock_timeout_ms, DEFAULT_LOCK_TIMEOUT_MS)?,
            stand_in_kinds: c.stand_in_link_kinds,
            prev_result,
            valid_attachments: c.valid_attachments.or(c.attachments),
            raw,
        })
    }

    /// The ENI's MAC for ADD and CHECK: `runtimeConfig.eniMac` (capability
    /// `eniMac`), else the pod annotation `lazybd.io/eni-mac` (capability
    /// `io.kubernetes.cri.pod-annotations`), else `ENI_MAC` in `CNI_ARGS`,
    /// else `mac` in the config. Naming a MAC is not permission to take it:
    /// that is [`crate::offer`]'s decision.
    ///
    /// The annotation is written by the pod's author, so it counts only with
    /// `allowPodAnnotation`; without it, a pod that carries the annotation is
    /// refused rather than silently given some other NIC.
    pub fn eni_mac(&self, env: &Env) -> Result<Option<Mac>> {
        if self.annotation_mac.is_some() && !self.allow_pod_annotation {
            return Err(CniError::NotPermitted(format!(
                "the pod annotation {MAC_ANNOTATION} names an ENI, but this network's config \
                 does not set allowPodAnnotation"
            )));
        }
        let parse = |what: &str, v: &str| {
            v.parse()
                .map(Some)
                .map_err(|e| CniError::InvalidConfig(format!("{what}: {e}")))
        };
        if let Some(m) = &self.runtime_mac {
            return parse("runtimeConfig.eniMac", m);
        }
        if let Some(a) = &self.annotation_mac {
            return parse(&format!("pod annotation {MAC_ANNOTATION}"), a);
        }
        if let Some(a) = env.arg(MAC_ARG) {
            return a
                .parse()
                .map(Some)
                .map_err(|e| CniError::InvalidEnv(format!("CNI_ARGS {MAC_ARG}: {e}")));
        }
        Ok(self.mac)
    }

    /// Whether the config itself offers `mac` (`mac` or `allowedMacs`).
    pub fn offers(&self, mac: Mac) -> bool {
        self.mac == Some(mac) || self.allowed_macs.contains(&mac)
    }
}

fn wait(key: &str, ms: Option<u64>, default: u64) -> Result<Duration> {
    match ms.unwrap_or(default) {
        ms if ms <= MAX_WAIT_MS => Ok(Duration::from_millis(ms)),
        ms => Err(CniError::InvalidConfig(format!(
            "{key} {ms} exceeds {MAX_WAIT_MS}"
        ))),
    }
}

/// Static addressing: all addresses belong to the ENI, routes honour only
/// `dst` and `gw`, so anything else is refused rather than silently dropped.
fn static_result(addresses: Vec<IpConfig>, routes: Vec<Route>, dns: Dns) -> Result<CniResult> {
    let unsupported = addresses
        .iter()
        .flat_map(|a| a.extra.keys().map(|k| format!("addresses[].{k}")))
        .chain(
            routes
                .iter()
                .flat_map(|r| r.extra.keys().map(|k| format!("routes[].{k}"))),
        )
        .chain(
            addresses
                .iter()
                .filter(|a| a.interface.is_some())
                .map(|_| "addresses[].interface".into()),
        )
        .collect::<Vec<_>>();
    if !unsupported.is_empty() {
        return Err(CniError::UnsupportedField(unsupported.join(", ")));
    }
    Ok(CniResult {
        interfaces: vec![],
        ips: addresses,
        routes,
        dns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf> {
        NetConf::parse(v.to_string().as_bytes())
    }

    fn base() -> Value {
        json!({"cniVersion": "1.1.0", "name": "n", "type": "eni", "mac": "02:00:00:00:00:01"})
    }

    #[test]
    fn minimal_config_uses_defaults() {
        let c = parse(base()).unwrap();
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.nic_wait, Duration::from_secs(10));
        assert!(c.stand_in_kinds.is_empty());
        assert!(matches!(c.addressing, Addressing::Static(ref r) if r.ips.is_empty()));
        assert!(
            !c.allow_pod_annotation,
            "the pod annotation is off by default"
        );
        assert!(c.allowed_macs.is_empty());
        assert!(c.offers("02:00:00:00:00:01".parse().unwrap()));
        assert!(!c.offers("02:00:00:00:00:02".parse().unwrap()));
    }

    #[test]
    fn error_codes_for_bad_configs() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code(), 6);
        let mut v = base();
        v["cniVersion"] = "0.3.1".into();
        assert_eq!(parse(v).unwrap_err().code(), 1);
        let mut v = base();
        v["mac"] = "nope".into();
        assert_eq!(parse(v).unwrap_err().code(), 7);
        let mut v = base();
        v["ipam"] = json!({"type": "host-local"});
        v["addresses"] = json!([{"address": "10.0.0.2/24"}]);
        assert_eq!(parse(v).unwrap_err().code(), 7);
        let mut v = base();
        v["routes"] = json!([{"dst": "0.0.0.0/0", "table": 5}]);
        assert_eq!(parse(v).unwrap_err().code(), 2);
        let mut v = base();
        v["stateDir"] = "relative".into();
        assert_eq!(parse(v).unwrap_err().code(), 7);
        let mut v = base();
        v["allowedMacs"] = json!(["02:00:00:00:00:02", "bad"]);
        assert_eq!(parse(v).unwrap_err().code(), 7);
        let mut v = base();
        v["allowPodAnnotation"] = "yes".into();
        assert_eq!(parse(v).unwrap_err().code(), 7);
    }

    #[test]
    fn mac_precedence_runtime_then_args_then_config() {
        let mut v = base();
        let env = |args: &str| {
            Env::from_vars(|k| match k {
                "CNI_COMMAND" => Some("VERSION".into()),
                "CNI_ARGS" => Some(args.into()),
                _ => None,
            })
            .unwrap()
        };
        let c = parse(v.clone()).unwrap();
        assert_eq!(
            c.eni_mac(&env("")).unwrap().unwrap().to_string(),
            "02:00:00:00:00:01"
        );
        assert_eq!(
            c.eni_mac(&env("ENI_MAC=02:00:00:00:00:02"))
                .unwrap()
                .unwrap()
                .to_string(),
            "02:00:00:00:00:02"
        );
        assert_eq!(c.eni_mac(&env("ENI_MAC=x")).unwrap_err().code(), 4);
        v["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": {"lazybd.io/eni-mac": "02:00:00:00:00:04"}});
        v["allowPodAnnotation"] = json!(true);
        let c = parse(v.clone()).unwrap();
        assert_eq!(
            c.eni_mac(&env("ENI_MAC=02:00:00:00:00:02"))
                .unwrap()
                .unwrap()
                .to_string(),
            "02:00:00:00:00:04"
        );
        v["runtimeConfig"]["eniMac"] = json!("02:00:00:00:00:03");
        let c = parse(v).unwrap();
        assert_eq!(
            c.eni_mac(&env("ENI_MAC=02:00:00:00:00:02"))
                .unwrap()
                .unwrap()
                .to_string(),
            "02:00:00:00:00:03"
        );
    }

    #[test]
    fn pod_annotation_needs_the_opt_in() {
        let env = Env::from_vars(|k| (k == "CNI_COMMAND").then(|| "VERSION".into())).unwrap();
        let mut v = base();
        v["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": {"lazybd.io/eni-mac": "02:00:00:00:00:04"}});
        // Off: refused, not silently replaced by the config's own mac.
        let e = parse(v.clone()).unwrap().eni_mac(&env).unwrap_err();
        assert_eq!(e.code(), 105);
        assert!(e.to_string().contains("allowPodAnnotation"), "{e}");
        // Other annotations do not matter.
        v["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": {"team": "x"}});
        let c = parse(v).unwrap();
        assert_eq!(c.eni_mac(&env).unwrap(), c.mac);
    }

    #[test]
    fn bad_runtime_macs_fail_only_the_commands_that_use_them() {
        let env = Env::from_vars(|k| (k == "CNI_COMMAND").then(|| "VERSION".into())).unwrap();
        let mut v = base();
        v["allowPodAnnotation"] = json!(true);
        v["runtimeConfig"] =
            json!({"io.kubernetes.cri.pod-annotations": {"lazybd.io/eni-mac": "garbage"}});
        // Parsing (what DEL and GC need) succeeds; ADD/CHECK get code 7.
        let c = parse(v.clone()).unwrap();
        assert_eq!(c.eni_mac(&env).unwrap_err().code(), 7);
        v["runtimeConfig"] = json!({"eniMac": "01:00:5e:00:00:01"});
        let c = parse(v).unwrap();
        assert_eq!(c.eni_mac(&env).unwrap_err().code(), 7);
    }

    /// The conflist in docs/cni-eni.md, as libcni hands its plugin entry to
    /// us: name and cniVersion injected, capabilities turned into runtimeConfig.
    #[test]
    fn documented_conflist_parses_as_libcni_passes_it() {
        let list: Value =
            serde_json::from_str(include_str!("../examples/10-eni.conflist")).unwrap();
        let mut plugin = list["plugins"][0].clone();
        plugin["name"] = list["name"].clone();
        plugin["cniVersion"] = list["cniVersion"].clone();
        plugin.as_object_mut().unwrap().remove("capabilities");
        plugin["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": {"lazybd.io/eni-mac": "00:16:3e:12:34:56"}});
        let c = parse(plugin).unwrap();
        assert_eq!(c.version, CniVersion::V100);
        assert_eq!(c.mtu, Some(9001));
        assert!(matches!(c.addressing, Addressing::Ipam { ref plugin } if plugin == "host-local"));
        assert!(
            c.allow_pod_annotation,
            "the shipped config names ENIs by annotation"
        );
        assert!(
            c.allowed_macs.is_empty() && c.mac.is_none(),
            "the shipped config offers nothing itself: the registry does"
        );
        let env = Env::from_vars(|k| (k == "CNI_COMMAND").then(|| "VERSION".into())).unwrap();
        assert_eq!(
            c.eni_mac(&env).unwrap(),
            Some("00:16:3e:12:34:56".parse().unwrap())
        );
        assert!(
            c.stand_in_kinds.is_empty(),
            "production config matches physical links only"
        );
    }

    /// docs/operations.md ships the example as deploy/cni/20-eni.conflist.
    #[test]
    fn deployed_conflist_is_the_documented_one() {
        assert_eq!(
            include_str!("../examples/10-eni.conflist"),
            include_str!("../../deploy/cni/20-eni.conflist")
        );
    }

    #[test]
    fn gc_attachments_accept_both_keys() {
        let mut v = base();
        v["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
        assert_eq!(parse(v).unwrap().valid_attachments.unwrap().len(), 1);
        let mut v = base();
        v["cni.dev/attachments"] = json!([]);
        assert_eq!(parse(v.clone()).unwrap().valid_attachments, Some(vec![]));
        v["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
        assert_eq!(parse(v).unwrap().valid_attachments.unwrap().len(), 1);
    }
}
