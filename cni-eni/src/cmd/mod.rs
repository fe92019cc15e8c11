//! One module per CNI command; shared steps live here.

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod status;

use std::io::ErrorKind;
use std::path::Path;

use crate::config::{Addressing, NetConf, MAC_ANNOTATION, MAC_ARG};
use crate::env::{Command, Env};
use crate::error::{CniError, Result};
use crate::hostuse::HostView;
use crate::ipam::Ipam;
use crate::link::Netlink;
use crate::log;
use crate::mac::Mac;
use crate::netns::Netns;
use crate::relocate::{rehome, Ends};

fn require_mac(env: &Env, conf: &NetConf) -> Result<Mac> {
    conf.eni_mac(env)?.ok_or_else(|| {
        CniError::InvalidConfig(format!(
            "no ENI MAC: set runtimeConfig.eniMac, the pod annotation {MAC_ANNOTATION} (with \
             allowPodAnnotation), {MAC_ARG} in CNI_ARGS, or mac in the config"
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

/// Brings a recorded ENI home: out of `netns` if it is still there (under
/// its parking name), and renames it to the parking name when the kernel
/// returned it by itself. Only for ENIs with a record: that is what makes
/// them ours. Errors only while the ENI is still in a pod netns; once it is
/// in the host it is safe, and a failed cosmetic rename there is only logged.
async fn release_eni(conf: &NetConf, mac: Mac, netns: Option<&Path>) -> Result<()> {
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
    if let Err(e) = park_name_in_host(conf, &host_nl, mac).await {
        log(format!(
            "ENI {mac} is in the host but could not get its parking name: {e}"
        ));
    }
    Ok(())
}

/// Gives an ENI the kernel (or an interrupted ADD) left in the host its
/// parking name, unless the host has meanwhile started using it: a record
/// from an ADD that never moved it is no licence to rename a host link.
async fn park_name_in_host(conf: &NetConf, host_nl: &Netlink, mac: Mac) -> Result<()> {
    let Some(link) = host_nl.find_eni(mac, &conf.stand_in_kinds).await? else {
        return Ok(());
    };
    let why = HostView::read(host_nl).await?.uses(&link);
    if !why.is_empty() {
        log(format!(
            "ENI {mac} is in the host as {} and used by it ({}); leaving its name",
            link.name,
            why.join("; ")
        ));
        return Ok(());
    }
    rehome(host_nl, mac, &conf.stand_in_kinds).await.map(drop)
}

/// Releases the IPAM allocation of `env`'s attachment, if IPAM is delegated.
async fn ipam_del(conf: &NetConf, env: &Env) -> Result<()> {
    if let Some(ipam) = ipam(conf, env).await? {
        ipam.exec(Command::Del, env).await?;
    }
    Ok(())
}
