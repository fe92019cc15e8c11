//! `eni`: a CNI plugin that hands a host NIC (an ENI) to a pod and gets it
//! back without loss. See docs/cni-eni.md.
//!
//! The flow of one invocation: [`env`] and [`config`] parse the input,
//! [`cmd`] runs the command. ADD takes only an ENI the operator offered
//! ([`offer`]) and the host does not use ([`hostuse`], with [`nexthop`]),
//! finds it by [`mac`] through [`link`] in the namespaces of [`netns`],
//! moves it with [`relocate`], addresses it via [`ipam`] and records
//! ownership in [`state`]; DEL and GC act only on what [`state`] records.
//! [`result`] and [`error`] are the spec's output formats.

pub mod cmd;
pub mod config;
pub mod env;
pub mod error;
pub mod hostuse;
pub mod ipam;
pub mod link;
pub mod mac;
pub mod netns;
pub mod nexthop;
pub mod offer;
pub mod relocate;
pub mod result;
pub mod state;
pub mod version;

use serde_json::Value;

use config::NetConf;
use env::{Command, Env};
use error::{CniError, Result};
use version::CniVersion;

/// One line on stderr, where runtimes collect plugin diagnostics.
pub fn log(msg: impl AsRef<str>) {
    eprintln!("eni[{}]: {}", std::process::id(), msg.as_ref());
}

/// What one invocation prints: a JSON object on stdout, or nothing.
pub struct Outcome {
    pub result: Result<Option<Value>>,
    /// The cniVersion to put in an error object.
    pub version: String,
}

/// Runs one invocation: the environment and the config read from stdin.
pub async fn run(env: Result<Env>, stdin: &[u8]) -> Outcome {
    let requested = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string));
    let version = requested
        .clone()
        .unwrap_or_else(|| CniVersion::V110.as_str().to_string());
    let result = match env {
        Ok(env) => dispatch(&env, stdin, requested.as_deref()).await,
        Err(e) => Err(e),
    };
    Outcome { result, version }
}

async fn dispatch(env: &Env, stdin: &[u8], requested: Option<&str>) -> Result<Option<Value>> {
    if env.command == Command::Version {
        return Ok(Some(version::version_reply(requested)));
    }
    let conf = NetConf::parse(stdin)?;
    if matches!(env.command, Command::Status | Command::Gc) && conf.version < CniVersion::V110 {
        return Err(CniError::IncompatibleVersion(format!(
            "{} needs cniVersion 1.1.0, config has {}",
            env.command.as_str(),
            conf.version
        )));
    }
    match env.command {
        Command::Add => cmd::add::add(env, &conf).await.map(Some),
        Command::Del => cmd::del::del(env, &conf).await.map(|()| None),
        Command::Check => cmd::check::check(env, &conf).await.map(|()| None),
        Command::Status => cmd::status::status(env, &conf).await.map(|()| None),
        Command::Gc => cmd::gc::gc(env, &conf).await.map(|()| None),
        Command::Version => unreachable!("handled above"),
    }
}
