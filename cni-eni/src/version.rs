//! CNI spec versions this plugin speaks, and the VERSION reply.

use std::fmt;

use serde_json::json;

use crate::error::{CniError, Result};

/// Spec versions, oldest first. 0.4.0 configs are accepted for older
/// runtimes; STATUS and GC exist only from 1.1.0 on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CniVersion {
    V040,
    V100,
    V110,
}

pub const SUPPORTED: [CniVersion; 3] = [CniVersion::V040, CniVersion::V100, CniVersion::V110];

impl CniVersion {
    pub fn parse(s: &str) -> Result<CniVersion> {
        SUPPORTED
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                CniError::IncompatibleVersion(format!(
                    "config cniVersion {s:?} is not one of {}",
                    supported_list().join(", ")
                ))
            })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V040 => "0.4.0",
            CniVersion::V100 => "1.0.0",
            CniVersion::V110 => "1.1.0",
        }
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub fn supported_list() -> Vec<&'static str> {
    SUPPORTED.iter().map(|v| v.as_str()).collect()
}

/// The VERSION reply. It echoes the requested version when we support it
/// (that is what libcni's skel does), else our newest.
pub fn version_reply(requested: Option<&str>) -> serde_json::Value {
    let v = requested
        .and_then(|r| CniVersion::parse(r).ok())
        .unwrap_or(CniVersion::V110);
    json!({"cniVersion": v.as_str(), "supportedVersions": supported_list()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_known_and_reject_unknown() {
        assert_eq!(CniVersion::parse("1.1.0").unwrap(), CniVersion::V110);
        assert_eq!(CniVersion::parse("0.4.0").unwrap(), CniVersion::V040);
        let e = CniVersion::parse("0.3.1").unwrap_err();
        assert_eq!(e.code(), 1);
    }

    #[test]
    fn version_reply_lists_all() {
        let v = version_reply(Some("1.0.0"));
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
        assert_eq!(version_reply(Some("9.9.9"))["cniVersion"], "1.1.0");
    }
}
