//! The CNI result object, and how it is written for each spec version.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{CniError, Result};
use crate::version::CniVersion;

/// A success result (also the shape of `prevResult` and of IPAM results).
/// Fields this plugin does not interpret are kept in `extra` so a chained
/// `prevResult` is passed on unchanged, as the spec requires.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

/// Fields that only exist from spec 1.1.0 on.
const V110_INTERFACE_FIELDS: [&str; 3] = ["mtu", "socketPath", "pciID"];
const V110_ROUTE_FIELDS: [&str; 5] = ["mtu", "advmss", "priority", "table", "scope"];

impl CniResult {
    pub fn parse(value: &Value, what: &str) -> Result<CniResult> {
        serde_json::from_value(value.clone()).map_err(|e| CniError::Decode {
            what: what.to_string(),
            reason: e.to_string(),
        })
    }

    /// Writes the result in the format of `version`: 0.4.0 wants
    /// `ips[].version`, 1.0.0 forbids it, and fields added in 1.1.0 are left
    /// out for older readers.
    pub fn render(&self, version: CniVersion) -> Value {
        let mut v = serde_json::to_value(self).expect("result serializes");
        let obj = v.as_object_mut().expect("result is an object");
        obj.insert("cniVersion".into(), version.as_str().into());
        for ip in array(obj, "ips") {
            if version == CniVersion::V040 {
                let fam = match ip.get("address").and_then(Value::as_str) {
                    Some(a) if a.contains(':') => "6",
                    _ => "4",
                };
                ip.insert("version".into(), fam.into());
            } else {
                ip.remove("version");
            }
        }
        if version < CniVersion::V110 {
            for i in array(obj, "interfaces") {
                V110_INTERFACE_FIELDS
                    .iter()
                    .for_each(|f| drop(i.remove(*f)));
            }
            for r in array(obj, "routes") {
                V110_ROUTE_FIELDS.iter().for_each(|f| drop(r.remove(*f)));
            }
        }
        v
    }
}

fn array<'a>(
    obj: &'a mut Map<String, Value>,
    key: &str,
) -> impl Iterator<Item = &'a mut Map<String, Value>> {
    obj.get_mut(key)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object_mut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult::parse(
            &json!({
                "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "mtu": 1500, "sandbox": "/run/netns/x"}],
                "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 0, "version": "4"}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1", "priority": 5}],
                "dns": {"nameservers": ["10.0.0.53"]}
            }),
            "test",
        )
        .unwrap()
    }

    #[test]
    fn renders_1_1_0_with_mtu_and_no_ip_version() {
        let v = sample().render(CniVersion::V110);
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["interfaces"][0]["mtu"], 1500);
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["ips"][0]["address"], "10.0.0.2/24");
        assert_eq!(v["routes"][0]["priority"], 5);
        assert_eq!(v["dns"]["nameservers"][0], "10.0.0.53");
    }

    #[test]
    fn renders_0_4_0_with_ip_version_and_without_1_1_fields() {
        let v = sample().render(CniVersion::V040);
        assert_eq!(v["ips"][0]["version"], "4");
        assert!(v["interfaces"][0].get("mtu").is_none());
        assert!(v["routes"][0].get("priority").is_none());
    }

    #[test]
    fn keeps_unknown_interface_fields_of_prev_result() {
        let r = CniResult::parse(
            &json!({"interfaces": [{"name": "x", "socketPath": "/s"}]}),
            "prevResult",
        )
        .unwrap();
        assert_eq!(
            r.render(CniVersion::V110)["interfaces"][0]["socketPath"],
            "/s"
        );
    }

    #[test]
    fn bad_address_is_a_decode_error() {
        let e =
            CniResult::parse(&json!({"ips": [{"address": "10.0.0.300/24"}]}), "ipam").unwrap_err();
        assert_eq!(e.code(), 6);
    }
}
