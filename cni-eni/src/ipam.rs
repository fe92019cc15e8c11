//! Delegation to an IPAM plugin (host-local, static, ...) found via CNI_PATH.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::config::NetConf;
use crate::env::{Command, Env};
use crate::error::{CniError, Result};
use crate::result::CniResult;
use crate::version::{CniVersion, SUPPORTED};

/// A delegate that does not answer within this long is killed: a CNI call
/// must not hang the runtime.
const DELEGATE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Ipam {
    plugin: String,
    exe: PathBuf,
    /// The spec version we talk to it in, and the config rewritten to it.
    version: CniVersion,
    stdin: Vec<u8>,
}

impl Ipam {
    /// Finds `plugin` in `CNI_PATH` and agrees on a spec version. Debian's
    /// standard plugins (1.1.x) stop at 1.0.0, so a 1.1.0 config is passed
    /// to them as 1.0.0 (the IPAM parts are identical); STATUS and GC are
    /// only forwarded to delegates that speak 1.1.0.
    pub async fn locate(plugin: &str, env: &Env, conf: &NetConf) -> Result<Ipam> {
        let exe = env
            .path
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                CniError::InvalidConfig(format!(
                    "IPAM plugin {plugin:?} not found in CNI_PATH {:?}",
                    env.path
                ))
            })?;
        let req = serde_json::json!({"cniVersion": conf.version.as_str()});
        let reply = run(
            plugin,
            &exe,
            Command::Version,
            env,
            req.to_string().as_bytes(),
        )
        .await?;
        let theirs: Vec<String> = reply
            .get("supportedVersions")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        let version = SUPPORTED
            .into_iter()
            .rev()
            .filter(|v| *v <= conf.version)
            .find(|v| theirs.iter().any(|t| t == v.as_str()))
            .ok_or_else(|| {
                CniError::IncompatibleVersion(format!(
                    "IPAM plugin {plugin} supports {theirs:?}, none of which is {} or older and known to eni",
                    conf.version
                ))
            })?;
        let mut cfg = conf.raw.clone();
        cfg["cniVersion"] = Value::from(version.as_str());
        Ok(Ipam {
            plugin: plugin.to_string(),
            exe,
            version,
            stdin: cfg.to_string().into_bytes(),
        })
    }

    pub fn speaks(&self, v: CniVersion) -> bool {
        self.version >= v
    }

    /// ADD: the addresses, routes and DNS to give the ENI.
    pub async fn add(&self, env: &Env) -> Result<CniResult> {
        let v = self.exec(Command::Add, env).await?;
        CniResult::parse(&v, &format!("{} result", self.plugin))
    }

    /// DEL, CHECK, STATUS and GC, which answer nothing on success.
    pub async fn exec(&self, command: Command, env: &Env) -> Result<Value> {
        run(&self.plugin, &self.exe, command, env, &self.stdin).await
    }
}

async fn run(plugin: &str, exe: &Path, command: Command, env: &Env, stdin: &[u8]) -> Result<Value> {
    let ctx = |what: &str| format!("IPAM plugin {plugin} {}: {what}", command.as_str());
    let mut cmd = tokio::process::Command::new(exe);
    cmd.env("CNI_COMMAND", command.as_str())
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_IFNAME", &env.ifname)
        .env("CNI_ARGS", env.args_string())
        .env(
            "CNI_PATH",
            std::env::join_paths(&env.path).unwrap_or_default(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match &env.netns {
        Some(n) => cmd.env("CNI_NETNS", n),
        None => cmd.env_remove("CNI_NETNS"),
    };
    let mut child = cmd.spawn().map_err(|e| CniError::io(ctx("spawn"), e))?;
    let mut input = child.stdin.take().expect("stdin is piped");
    let stdin = stdin.to_vec();
    let feed = async move {
        let r = input.write_all(&stdin).await;
        drop(input);
        r
    };
    let (fed, out) = tokio::time::timeout(DELEGATE_TIMEOUT, async {
        tokio::join!(feed, child.wait_with_output())
    })
    .await
    .map_err(|_| {
        CniError::TryAgainLater(ctx(&format!(
            "no answer within {DELEGATE_TIMEOUT:?}, killed"
        )))
    })?;
    let out = out.map_err(|e| CniError::io(ctx("wait"), e))?;
    // A plugin may exit without reading stdin (VERSION often does); its
    // exit status and stdout are the answer then, as with libcni.
    match fed {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(CniError::io(ctx("write config"), e))
        }
        _ => {}
    }
    let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    if out.status.success() {
        return Ok(parsed.unwrap_or(Value::Null));
    }
    let field = |k: &str| parsed.as_ref().and_then(|v| v.get(k)).cloned();
    Err(CniError::Delegate {
        plugin: plugin.to_string(),
        code: field("code")
            .and_then(|c| c.as_u64())
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(crate::error::codes::IO),
        msg: field("msg")
            .and_then(|m| m.as_str().map(str::to_string))
            .unwrap_or_else(|| {
                format!(
                    "exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            }),
        details: field("details")
            .and_then(|m| m.as_str().map(str::to_string))
            .unwrap_or_default(),
    })
}
