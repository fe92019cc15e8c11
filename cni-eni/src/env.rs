//! The CNI_* environment of one invocation.

use std::path::PathBuf;

use crate::error::{CniError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    fn parse(s: &str) -> Result<Command> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::InvalidEnv(format!(
                    "unknown CNI_COMMAND {other:?}"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

/// One invocation's environment, validated for its command (spec section
/// "Parameters": which variables each command requires).
#[derive(Clone, Debug)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Absent for DEL when the runtime already lost the netns.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (`FOO=BAR;ABC=123`).
    pub args: Vec<(String, String)>,
    pub path: Vec<PathBuf>,
}

impl Env {
    pub fn from_process() -> Result<Env> {
        Env::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Env> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = Command::parse(
            &get("CNI_COMMAND")
                .ok_or_else(|| CniError::InvalidEnv("CNI_COMMAND is not set".into()))?,
        )?;
        let need = |k: &str| {
            get(k).ok_or_else(|| {
                CniError::InvalidEnv(format!("{k} is required for {}", command.as_str()))
            })
        };
        let (container_id, netns, ifname) = match command {
            Command::Add | Command::Check => (
                need("CNI_CONTAINERID")?,
                Some(PathBuf::from(need("CNI_NETNS")?)),
                need("CNI_IFNAME")?,
            ),
            Command::Del => (
                need("CNI_CONTAINERID")?,
                get("CNI_NETNS").map(PathBuf::from),
                need("CNI_IFNAME")?,
            ),
            Command::Status | Command::Gc | Command::Version => (
                get("CNI_CONTAINERID").unwrap_or_default(),
                None,
                get("CNI_IFNAME").unwrap_or_default(),
            ),
        };
        if let Some(bad) = [&container_id, &ifname]
            .into_iter()
            .find(|v| v.contains(['/', '\0']))
        {
            return Err(CniError::InvalidEnv(format!("{bad:?} contains '/' or NUL")));
        }
        if ifname.len() > 15 {
            return Err(CniError::InvalidEnv(format!(
                "CNI_IFNAME {ifname:?} is longer than 15 bytes"
            )));
        }
        let args = get("CNI_ARGS")
            .map(|a| parse_args(&a))
            .transpose()?
            .unwrap_or_default();
        let path = get("CNI_PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        Ok(Env {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }

    /// `CNI_ARGS` as it was given, for delegates.
    pub fn args_string(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The same invocation for another attachment (GC releases records of
    /// other containers through the IPAM delegate).
    pub fn for_attachment(&self, container_id: &str, ifname: &str, netns: Option<PathBuf>) -> Env {
        Env {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
            netns,
            ..self.clone()
        }
    }

    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_args(s: &str) -> Result<Vec<(String, String)>> {
    s.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    CniError::InvalidEnv(format!("CNI_ARGS item {kv:?} is not KEY=VALUE"))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Env> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn add_requires_netns_del_does_not() {
        let base = [("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")];
        let e = env(&[base[0], base[1], ("CNI_COMMAND", "ADD")]).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(e.to_string().contains("CNI_NETNS"));
        let d = env(&[base[0], base[1], ("CNI_COMMAND", "DEL")]).unwrap();
        assert_eq!(d.netns, None);
    }

    #[test]
    fn args_and_path_parse() {
        let e = env(&[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_ARGS", "IgnoreUnknown=1;ENI_MAC=02:00:00:00:00:01"),
            ("CNI_PATH", "/a:/b"),
        ])
        .unwrap();
        assert_eq!(e.arg("ENI_MAC"), Some("02:00:00:00:00:01"));
        assert_eq!(e.path, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert!(env(&[("CNI_COMMAND", "VERSION"), ("CNI_ARGS", "novalue")]).is_err());
    }

    #[test]
    fn rejects_unknown_command_and_long_ifname() {
        assert_eq!(env(&[("CNI_COMMAND", "FOO")]).unwrap_err().code(), 4);
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "a-very-long-ifname"),
        ])
        .unwrap_err();
        assert_eq!(e.code(), 4);
    }
}
