//! ADD: check that the operator offered the ENI and the host does not use
//! it, find it by MAC, move it into the pod as CNI_IFNAME, address it.

use std::time::Instant;

use serde_json::Value;

use super::{ipam, open_pod_netns, require_mac};
use crate::config::{Addressing, NetConf};
use crate::env::{Command, Env};
use crate::error::{CniError, Result};
use crate::hostuse::refuse_if_used;
use crate::ipam::Ipam;
use crate::link::{Link, Netlink};
use crate::log;
use crate::mac::Mac;
use crate::netns::Netns;
use crate::offer::{self, Offer};
use crate::relocate::Ends;
use crate::result::{CniResult, Interface};
use crate::state::{EniLock, Phase, Record, Store};

const NIC_POLL: std::time::Duration = std::time::Duration::from_millis(100);

pub async fn add(env: &Env, conf: &NetConf) -> Result<Value> {
    let mac = require_mac(env, conf)?;
    // First, before any lock file or netlink socket exists for this MAC:
    // a request may name any MAC, only an offered one gets further.
    match offer::check(conf, env, mac)? {
        Offer::Config => log(format!("ENI {mac} is offered by the network config")),
        Offer::Registry(p) => log(format!("ENI {mac} is offered by {}", p.display())),
    }
    let netns_path = env.netns.clone().expect("ADD requires CNI_NETNS");
    let pod = open_pod_netns(&netns_path)?;
    let host = Netns::host()?;
    let (host_nl, pod_nl) = (host.netlink().await?, pod.netlink().await?);
    let ends = Ends {
        host: &host,
        host_nl: &host_nl,
        pod: &pod,
        pod_nl: &pod_nl,
        mac,
        stand_in_kinds: &conf.stand_in_kinds,
    };
    let ipam = ipam(conf, env).await?;

    let store = Store::open(&conf.state_dir)?;
    let lock = store.lock(mac, conf.lock_timeout).await?;
    let rec = store.load(&lock)?;
    match &rec {
        // Another attachment's, whether attached or still being added.
        Some(rec) if !rec.is_for(env) => {
            return Err(CniError::EniBusy {
                mac: mac.to_string(),
                owner: rec.container_id.clone(),
                ifname: rec.ifname.clone(),
            })
        }
        // A second ADD without DEL (the spec forbids it) must not undo the
        // working attachment on its way out.
        Some(rec) if rec.phase == Phase::Attached => {
            return Err(CniError::InterfaceExists(env.ifname.clone()))
        }
        _ => {}
    }

    let eni = match wait_for_eni(&ends, conf).await? {
        Found::InHost(link) => {
            refuse_if_used(&host_nl, &link, mac).await?;
            if pod_nl.by_name(&env.ifname).await?.is_some() {
                return Err(CniError::InterfaceExists(env.ifname.clone()));
            }
            // Written before the move, so a crash in the middle leaves a
            // record that DEL and GC use to bring the ENI back.
            store.save(&lock, &record(mac, conf, env, &link.name))?;
            match ends.move_in(&link, &env.ifname).await {
                Ok(l) => l,
                Err(e) => {
                    forget_if_home(&ends, &store, &lock).await;
                    return Err(e);
                }
            }
        }
        // Already in the pod, but not put there by us: some other plugin's.
        Found::InPod(_) if rec.is_none() => {
            return Err(CniError::NotPermitted(format!(
                "ENI {mac} is already in {} and eni has no record of moving it there; \
                 leaving it alone",
                netns_path.display()
            )))
        }
        Found::InPod(link) => {
            // An earlier ADD for this attachment was interrupted after the
            // move; carry on from where it stopped.
            log(format!(
                "ENI {mac} is already in {}; resuming ADD",
                netns_path.display()
            ));
            resume_name(&pod_nl, link, &env.ifname).await?
        }
    };

    match configure(&pod_nl, &eni, conf, env, ipam.as_ref()).await {
        Ok(ours) => {
            let mut rec = store
                .load(&lock)?
                .unwrap_or_else(|| record(mac, conf, env, &eni.name));
            rec.phase = Phase::Attached;
            store.save(&lock, &rec)?;
            let link = pod_nl
                .find_eni(mac, &conf.stand_in_kinds)
                .await?
                .unwrap_or(eni);
            let result = merge(
                conf.prev_result.clone().unwrap_or_default(),
                ours,
                &link,
                mac,
                env,
            );
            Ok(result.render(conf.version))
        }
        Err(e) => {
            undo_configure(&ends, ipam.as_ref(), env).await;
            forget_if_home(&ends, &store, &lock).await;
            Err(e)
        }
    }
}

fn record(mac: Mac, conf: &NetConf, env: &Env, host_name: &str) -> Record {
    Record {
        mac,
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        phase: Phase::Adding,
        host_name: host_name.to_string(),
    }
}

enum Found {
    InHost(Link),
    InPod(Link),
}

/// A just hot-plugged NIC can take a moment to show up: poll for it until
/// `nicWaitMs`, then give up with "try again later".
async fn wait_for_eni(ends: &Ends<'_>, conf: &NetConf) -> Result<Found> {
    let deadline = Instant::now() + conf.nic_wait;
    let mut said = false;
    loop {
        if let Some(l) = ends
            .host_nl
            .find_eni(ends.mac, &conf.stand_in_kinds)
            .await?
        {
            return Ok(Found::InHost(l));
        }
        if let Some(l) = ends.pod_nl.find_eni(ends.mac, &conf.stand_in_kinds).await? {
            return Ok(Found::InPod(l));
        }
        if Instant::now() >= deadline {
            return Err(CniError::TryAgainLater(format!(
                "no physical link with MAC {} in the host netns after waiting {:?}",
                ends.mac, conf.nic_wait
            )));
        }
        if !said {
            log(format!(
                "ENI {} not visible yet; waiting up to {:?}",
                ends.mac, conf.nic_wait
            ));
            said = true;
        }
        tokio::time::sleep(NIC_POLL).await;
    }
}

async fn resume_name(pod_nl: &Netlink, link: Link, ifname: &str) -> Result<Link> {
    if link.name == ifname {
        return Ok(link);
    }
    if pod_nl.by_name(ifname).await?.is_some() {
        return Err(CniError::InterfaceExists(ifname.to_string()));
    }
    pod_nl.rename(&link, ifname).await?;
    Ok(Link {
        name: ifname.to_string(),
        ..link
    })
}

/// Addresses, MTU, up, routes. Returns what was applied (ips, routes, dns).
async fn configure(
    pod_nl: &Netlink,
    eni: &Link,
    conf: &NetConf,
    env: &Env,
    ipam: Option<&Ipam>,
) -> Result<CniResult> {
    let mut ours = match (ipam, &conf.addressing) {
        (Some(ipam), _) => ipam.add(env).await?,
        (None, Addressing::Static(r)) => r.clone(),
        (None, Addressing::Ipam { .. }) => CniResult::default(),
    };
    ours.interfaces.clear();
    if let Some(mtu) = conf.mtu {
        pod_nl.set_mtu(eni, mtu).await?;
    }
    for ip in &ours.ips {
        pod_nl.add_address(eni, ip.address).await?;
    }
    pod_nl.set_up(eni, true).await?;
    for r in &ours.routes {
        // Like libcni's ConfigureIface: a route without gw goes via the
        // gateway of the first address of its family.
        let gw = r.gw.or_else(|| {
            ours.ips
                .iter()
                .filter(|ip| ip.address.addr().is_ipv4() == r.dst.addr().is_ipv4())
                .find_map(|ip| ip.gateway)
        });
        pod_nl.add_route(eni, r.dst, gw).await?;
    }
    Ok(ours)
}

/// After a failed configure: release the IPAM allocation and park the ENI.
/// Failures are logged; the ENI stays findable by MAC for DEL and GC.
async fn undo_configure(ends: &Ends<'_>, ipam: Option<&Ipam>, env: &Env) {
    if let Some(ipam) = ipam {
        if let Err(e) = ipam.exec(Command::Del, env).await {
            log(format!("undo: IPAM DEL failed: {e}"));
        }
    }
    if let Err(e) = ends.park().await {
        log(format!("undo: could not park ENI {}: {e}", ends.mac));
    }
}

/// After a failed ADD undid itself: drop the record only if the ENI is
/// really back in the host. If the undo failed, the record (phase `adding`)
/// stays so the runtime's DEL, or GC, finds the ENI and brings it home.
async fn forget_if_home(ends: &Ends<'_>, store: &Store, lock: &EniLock) {
    let home = ends.host_nl.find_eni(ends.mac, ends.stand_in_kinds).await;
    let outcome = match home {
        Ok(Some(_)) => store.remove(lock),
        Ok(None) => {
            log(format!(
                "ENI {} is not back in the host; keeping its record for DEL/GC",
                ends.mac
            ));
            Ok(())
        }
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        log(format!("undo: ENI {}: {e}", ends.mac));
    }
}

/// prevResult (when chained) plus our interface, addresses and routes.
fn merge(mut prev: CniResult, ours: CniResult, link: &Link, mac: Mac, env: &Env) -> CniResult {
    let index = prev.interfaces.len();
    prev.interfaces.push(Interface {
        name: env.ifname.clone(),
        mac: link.mac.unwrap_or(mac).to_string(),
        mtu: Some(link.mtu).filter(|m| *m > 0),
        sandbox: env
            .netns
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        extra: Default::default(),
    });
    prev.ips.extend(ours.ips.into_iter().map(|mut ip| {
        ip.interface = Some(index);
        ip
    }));
    prev.routes.extend(ours.routes);
    if !ours.dns.is_empty() {
        prev.dns = ours.dns;
    }
    prev
}
