//! One module per CNI command; shared steps live here.

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod status;

use std::io::ErrorKind;
use std::path::Path;

use crate::config::{Addressing, NetConf, MAC_ARG};
use crate::env::{Command, Env};
use crate::error::{CniError, Result};
use crate::ipam::Ipam;
use crate::log;
use crate::mac::Mac;
use crate::netns::Netns;
use crate::relocate::{rehome, Ends};

fn require_mac(env: &Env, conf: &NetConf) -> Result<Mac> {
    conf.eni_mac(env)?.ok_or_else(|| {
        CniError::InvalidConfig(format!(
            "no ENI MAC: set runtimeConfig.eniMac, {MAC_ARG} in CNI_ARGS, or mac in the config"
        ))
    })
}

/// The pod netns for ADD and CHECK, where it must exist.
fn open_pod_netns(path: &Path) -> Result<Netns> {
    Netns::open(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => {
            CniError::InvalidEnv(format!("CNI_NETNS {} does not exist", path.display()))
        }
        ErrorKind::InvalidInput => CniError::InvalidEnv(format!("CNI_NETNS: {e}")),
        _ => CniError::io(format!("open CNI_NETNS {}", path.display()), e),
    })
}

async fn ipam(conf: &NetConf, env: &Env) -> Result<Option<Ipam>> {
    match &conf.addressing {
        Addressing::Ipam { plugin } => Ipam::locate(plugin, env, conf).await.map(Some),
        Addressing::Static(_) => Ok(None),
    }
}

/// Brings the ENI home: out of `netns` if it is still there (under its
/// parking name), and, if we had moved it (`ours`), renames it to the parking
/// name when the kernel returned it by itself. Errors only while the ENI is
/// still in a pod netns; once it is in the host it is safe, and a failed
/// cosmetic rename there is only logged.
async fn release_eni(conf: &NetConf, mac: Mac, netns: Option<&Path>, ours: bool) -> Result<()> {
    let host = Netns::host()?;
    let host_nl = host.netlink().await?;
    if let Some(path) = netns {
        match Netns::open(path) {
            Ok(pod) => {
                let pod_nl = pod.netlink().await?;
                let ends = Ends {
                    host: &host,
                    host_nl: &host_nl,
                    pod: &pod,
                    pod_nl: &pod_nl,
                    mac,
                    stand_in_kinds: &conf.stand_in_kinds,
                };
                if ends.park().await? {
                    log(format!(
                        "ENI {mac} is back in the host as {}",
                        mac.parking_name()
                    ));
                }
            }
            // A deleted netns (or a leftover file that is no longer a netns
            // mount): the kernel has already returned or destroyed the NIC.
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::InvalidInput) => {
                log(format!(
                    "netns {} is gone ({e}); looking for ENI {mac} in the host",
                    path.display()
                ));
            }
            Err(e) => return Err(CniError::io(format!("open netns {}", path.display()), e)),
        }
    }
    if ours {
        if let Err(e) = rehome(&host_nl, mac, &conf.stand_in_kinds).await {
            log(format!(
                "ENI {mac} is in the host but could not get its parking name: {e}"
            ));
        }
    }
    Ok(())
}

/// Releases the IPAM allocation of `env`'s attachment, if IPAM is delegated.
async fn ipam_del(conf: &NetConf, env: &Env) -> Result<()> {
    if let Some(ipam) = ipam(conf, env).await? {
        ipam.exec(Command::Del, env).await?;
    }
    Ok(())
}
