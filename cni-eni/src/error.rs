//! CNI errors: every failure the plugin reports maps to one spec error code.

use serde_json::json;

/// Plugin-specific codes (the spec reserves 0-99).
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const ENI_BUSY: u32 = 100;
    pub const NETLINK: u32 = 101;
    pub const INTERFACE_EXISTS: u32 = 102;
    pub const CHECK_FAILED: u32 = 103;
    pub const AMBIGUOUS_MAC: u32 = 104;
    pub const NOT_PERMITTED: u32 = 105;
    pub const HOST_IN_USE: u32 = 106;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("incompatible CNI version: {0}")]
    IncompatibleVersion(String),
    #[error("unsupported field: {0}")]
    UnsupportedField(String),
    #[error("invalid environment: {0}")]
    InvalidEnv(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decode {what}: {reason}")]
    Decode { what: String, reason: String },
    #[error("invalid network config: {0}")]
    InvalidConfig(String),
    #[error("try again later: {0}")]
    TryAgainLater(String),
    #[error("plugin not available: {0}")]
    NotAvailable(String),
    #[error("ENI {mac} is attached to container {owner} ({ifname})")]
    EniBusy {
        mac: String,
        owner: String,
        ifname: String,
    },
    #[error("{context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {0} already exists in the container netns")]
    InterfaceExists(String),
    #[error("check failed: {0}")]
    CheckFailed(String),
    #[error("ambiguous ENI: {0}")]
    AmbiguousMac(String),
    /// The operator has not offered this NIC to eni (or not to this pod),
    /// or the request names it through a source the config does not allow.
    #[error("not permitted: {0}")]
    NotPermitted(String),
    /// The NIC carries the host's own traffic; eni never moves it.
    #[error("link {link} ({mac}) carries the host's own traffic, eni never moves it: {why}")]
    HostInUse {
        link: String,
        mac: String,
        why: String,
    },
    /// An error a delegated (IPAM) plugin reported, passed through with its code.
    #[error("{plugin}: {msg}")]
    Delegate {
        plugin: String,
        code: u32,
        msg: String,
        details: String,
    },
}

impl CniError {
    pub fn code(&self) -> u32 {
        use codes::*;
        match self {
            CniError::IncompatibleVersion(_) => INCOMPATIBLE_VERSION,
            CniError::UnsupportedField(_) => UNSUPPORTED_FIELD,
            CniError::InvalidEnv(_) => INVALID_ENV,
            CniError::Io { .. } => IO,
            CniError::Decode { .. } => DECODE,
            CniError::InvalidConfig(_) => INVALID_CONFIG,
            CniError::TryAgainLater(_) => TRY_AGAIN_LATER,
            CniError::NotAvailable(_) => NOT_AVAILABLE,
            CniError::EniBusy { .. } => ENI_BUSY,
            CniError::Netlink { .. } => NETLINK,
            CniError::InterfaceExists(_) => INTERFACE_EXISTS,
            CniError::CheckFailed(_) => CHECK_FAILED,
            CniError::AmbiguousMac(_) => AMBIGUOUS_MAC,
            CniError::NotPermitted(_) => NOT_PERMITTED,
            CniError::HostInUse { .. } => HOST_IN_USE,
            CniError::Delegate { code, .. } => *code,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> CniError {
        CniError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn netlink(context: impl Into<String>, source: rtnetlink::Error) -> CniError {
        CniError::Netlink {
            context: context.into(),
            source,
        }
    }

    /// The kernel errno behind a netlink failure, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            CniError::Netlink {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => Some(m.raw_code().abs()),
            _ => None,
        }
    }

    /// The spec's error object (printed on stdout, exit status non-zero).
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let details = match self {
            CniError::Delegate { details, .. } => details.clone(),
            other => std::error::Error::source(other)
                .map(|s| s.to_string())
                .unwrap_or_default(),
        };
        json!({
            "cniVersion": cni_version,
            "code": self.code(),
            "msg": self.to_string(),
            "details": details,
        })
    }
}

pub type Result<T, E = CniError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_spec_fields() {
        let e = CniError::InvalidConfig("no mac".into());
        let v = e.to_json("1.1.0");
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "invalid network config: no mac");
    }

    #[test]
    fn delegate_errors_keep_their_code() {
        let e = CniError::Delegate {
            plugin: "host-local".into(),
            code: 11,
            msg: "busy".into(),
            details: "d".into(),
        };
        assert_eq!(e.to_json("1.0.0")["code"], 11);
        assert_eq!(e.to_json("1.0.0")["details"], "d");
    }
}
