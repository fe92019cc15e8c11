//! Harness for the `eni` CNI plugin tests: private network namespaces,
//! veth/macvlan stand-in ENIs in the host netns, and direct CNI invocations
//! (what `cnitool` or containerd's go-cni do: env + config on stdin).
//!
//! Every name carries a per-test tag (`t` + pid + counter), every MAC is
//! unique per process, and every namespace and link is removed by a Drop
//! guard, also when the test fails.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{json, Value};
use tempfile::TempDir;

pub use crate::netns::ip;
use crate::netns::{ip_quiet, Netns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A short tag unique to this process and call, for link and netns names.
/// Link names must fit 15 bytes: tag (<= 8) + a short role suffix.
pub fn tag() -> String {
    format!("t{:04x}{:02x}", std::process::id() & 0xffff, next() & 0xff)
}

/// A locally administered unicast MAC unique to this process and call.
pub fn unique_mac() -> String {
    let pid = std::process::id();
    let n = next();
    format!(
        "02:e1:{:02x}:{:02x}:{:02x}:{:02x}",
        (pid >> 8) & 0xff,
        pid & 0xff,
        (n >> 8) & 0xff,
        n & 0xff
    )
}

/// The host name the plugin gives an ENI it brought home.
pub fn parking_name(mac: &str) -> String {
    format!("eni{}", mac.replace(':', ""))
}

/// A network namespace for a test pod, named after `tag`; deleted on drop.
pub fn pod_netns(tag: &str) -> Netns {
    Netns::create(&format!("lzbeni-{tag}"))
}

/// The scene most tests need: the plugin, a pod netns, a veth stand-in ENI
/// (`<tag>e0`) with a unique MAC, and the pod's call (`<tag>-pod`). Fields
/// drop in order: the ENI's veth, then the netns, then the state dir.
pub struct OnePod {
    pub call: Call,
    pub nic: StandIn,
    pub mac: String,
    pub ns: Netns,
    pub eni: Eni,
    /// The tag the names carry.
    pub t: String,
}

impl OnePod {
    pub fn create() -> OnePod {
        let t = tag();
        let eni = Eni::new();
        let ns = pod_netns(&t);
        let mac = unique_mac();
        let nic = StandIn::veth(&format!("{t}e0"), &mac);
        let call = Call::new(&format!("{t}-pod"), &ns);
        OnePod {
            call,
            nic,
            mac,
            ns,
            eni,
            t,
        }
    }
}

/// The ENI with `mac` is back in the host netns under its parking name.
#[track_caller]
pub fn assert_parked(mac: &str) {
    let link = link_by_mac(None, mac).unwrap_or_else(|| panic!("ENI {mac} not in the host"));
    assert_eq!(link.name, parking_name(mac));
}

/// A stand-in ENI in the host netns: one end of a veth pair (or a macvlan
/// on such an end) with a chosen MAC. The other end stays in the host, so
/// deleting it on drop removes the stand-in wherever it has been moved.
pub struct StandIn {
    pub name: String,
    pub mac: String,
    anchor: String,
}

impl StandIn {
    pub fn veth(name: &str, mac: &str) -> StandIn {
        // Its own tag: `name` may be reused while this stand-in exists (the
        // collision test hands an ENI's old name to a newcomer).
        let anchor = format!("{}p", tag());
        ip(&[
            "link", "add", name, "address", mac, "type", "veth", "peer", "name", &anchor,
        ]);
        StandIn {
            name: name.into(),
            mac: mac.into(),
            anchor,
        }
    }

    /// A macvlan child of a host-side veth end.
    pub fn macvlan(name: &str, mac: &str) -> StandIn {
        let anchor = format!("{}l", tag());
        let other = format!("{}m", tag());
        ip(&[
            "link", "add", &anchor, "type", "veth", "peer", "name", &other,
        ]);
        ip(&[
            "link", "add", name, "link", &anchor, "address", mac, "type", "macvlan", "mode",
            "bridge",
        ]);
        StandIn {
            name: name.into(),
            mac: mac.into(),
            anchor,
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        ip_quiet(&["link", "del", &self.anchor]);
    }
}

/// A link as `ip -j -d link` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkInfo {
    pub name: String,
    pub mac: String,
    pub kind: Option<String>,
    pub up: bool,
}

/// Links of the host netns (`None`) or of a named netns.
pub fn links(netns: Option<&str>) -> Vec<LinkInfo> {
    let mut args = vec![];
    if let Some(n) = netns {
        args.extend(["-n", n]);
    }
    args.extend(["-j", "-d", "link", "show"]);
    let v: Value = serde_json::from_str(&ip(&args)).expect("ip -j output");
    v.as_array()
        .expect("array")
        .iter()
        .map(|l| LinkInfo {
            name: l["ifname"].as_str().unwrap_or_default().into(),
            mac: l["address"].as_str().unwrap_or_default().into(),
            kind: l["linkinfo"]["info_kind"].as_str().map(str::to_string),
            up: l["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP")),
        })
        .collect()
}

pub fn link_by_mac(netns: Option<&str>, mac: &str) -> Option<LinkInfo> {
    links(netns).into_iter().find(|l| l.mac == mac)
}

pub fn link_by_name(netns: Option<&str>, name: &str) -> Option<LinkInfo> {
    links(netns).into_iter().find(|l| l.name == name)
}

/// Addresses (CIDR) on `dev` in `netns`.
pub fn addresses(netns: &str, dev: &str) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&ip(&["-n", netns, "-j", "addr", "show", "dev", dev])).unwrap();
    v[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// The outcome of one plugin invocation.
#[derive(Debug)]
pub struct CniOutput {
    pub success: bool,
    /// Parsed stdout (Null when empty).
    pub json: Value,
    pub stderr: String,
}

impl CniOutput {
    /// The spec error code (panics if the call succeeded).
    pub fn code(&self) -> u64 {
        assert!(!self.success, "expected an error, got {:?}", self.json);
        self.json["code"].as_u64().expect("error object has a code")
    }

    pub fn msg(&self) -> &str {
        self.json["msg"].as_str().unwrap_or_default()
    }

    #[track_caller]
    pub fn ok(self) -> Value {
        assert!(
            self.success,
            "plugin failed: {} / {}",
            self.json, self.stderr
        );
        self.json
    }
}

/// The plugin with a private state dir and host-local data dir.
pub struct Eni {
    pub bin: PathBuf,
    pub dir: TempDir,
}

impl Default for Eni {
    fn default() -> Self {
        Eni::new()
    }
}

impl Eni {
    pub fn new() -> Eni {
        Eni {
            bin: crate::bin_path("eni"),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// Number of addresses host-local currently holds for `network`.
    pub fn ipam_allocations(&self, network: &str) -> usize {
        std::fs::read_dir(self.ipam_dir().join(network))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .parse::<std::net::IpAddr>()
                            .is_ok()
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// State records currently on disk.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_dir(self.state_dir().join("enis"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A config for `mac` with veth/macvlan stand-ins allowed, host-local
    /// IPAM on `subnet` (x.y.z.0/24, gateway .1) and a short NIC wait.
    pub fn conf(&self, version: &str, name: &str, mac: &str, subnet: &str) -> Value {
        let net = subnet.trim_end_matches(".0/24");
        json!({
            "cniVersion": version,
            "name": name,
            "type": "eni",
            "mac": mac,
            "stateDir": self.state_dir(),
            "nicWaitMs": 500,
            "standInLinkKinds": ["veth", "macvlan"],
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet, "gateway": format!("{net}.1")}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.ipam_dir(),
            }
        })
    }

    pub fn call(&self, command: &str, conf: &Value, call: &Call) -> CniOutput {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", "/usr/lib/cni")
            .env("CNI_CONTAINERID", &call.container)
            .env("CNI_IFNAME", &call.ifname)
            .env("CNI_ARGS", &call.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(n) = &call.netns {
            cmd.env("CNI_NETNS", n);
        }
        let mut child = cmd.spawn().expect("spawn eni");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().expect("wait eni");
        CniOutput {
            success: out.status.success(),
            json: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// The per-attachment part of an invocation.
#[derive(Clone, Debug)]
pub struct Call {
    pub container: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: String,
}

impl Call {
    pub fn new(container: &str, netns: &Netns) -> Call {
        Call {
            container: container.into(),
            netns: Some(netns.path()),
            ifname: "eth0".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAME=test".into(),
        }
    }

    pub fn without_netns(&self) -> Call {
        Call {
            netns: None,
            ..self.clone()
        }
    }
}

/// `conf` with `prevResult` set, as the runtime sends it to CHECK and DEL.
pub fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}
