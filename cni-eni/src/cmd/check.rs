//! CHECK: the ENI is in the pod under CNI_IFNAME, up, with the addresses and
//! routes of prevResult.

use super::{ipam, open_pod_netns, require_mac};
use crate::config::NetConf;
use crate::env::{Command, Env};
use crate::error::{CniError, Result};
use crate::state::{Phase, Store};

pub async fn check(env: &Env, conf: &NetConf) -> Result<()> {
    let fail = |m: String| Err(CniError::CheckFailed(m));
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::InvalidConfig("CHECK needs prevResult".into()))?;
    let mac = require_mac(env, conf)?;
    let netns_path = env.netns.clone().expect("CHECK requires CNI_NETNS");
    let pod = open_pod_netns(&netns_path)?;
    let pod_nl = pod.netlink().await?;

    let store = Store::open(&conf.state_dir)?;
    let lock = store.lock(mac, conf.lock_timeout).await?;
    match store.load(&lock)? {
        Some(r) if r.is_for(env) && r.phase == Phase::Attached => {}
        Some(r) => {
            return fail(format!(
                "ENI {mac} is recorded for container {} ({}) in phase {:?}",
                r.container_id, r.ifname, r.phase
            ))
        }
        None => return fail(format!("no attachment of ENI {mac} is recorded")),
    }
    let Some(link) = pod_nl.find_eni(mac, &conf.stand_in_kinds).await? else {
        return fail(format!("ENI {mac} is not in {}", netns_path.display()));
    };
    if link.name != env.ifname {
        return fail(format!(
            "ENI {mac} is named {}, not {}",
            link.name, env.ifname
        ));
    }
    if !link.up {
        return fail(format!("{} is down", link.name));
    }
    if let Some(mtu) = conf.mtu.filter(|m| *m != link.mtu) {
        return fail(format!("{} has mtu {}, want {mtu}", link.name, link.mtu));
    }
    let sandbox = netns_path.display().to_string();
    let Some(index) = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox == sandbox)
    else {
        return fail(format!(
            "prevResult has no interface {} in {sandbox}",
            env.ifname
        ));
    };
    if prev.interfaces[index].mac.parse().ok() != Some(mac) {
        return fail(format!(
            "prevResult gives {} MAC {:?}, want {mac}",
            env.ifname, prev.interfaces[index].mac
        ));
    }
    let have = pod_nl.addresses(&link).await?;
    for ip in prev.ips.iter().filter(|ip| ip.interface == Some(index)) {
        if !have.contains(&ip.address) {
            return fail(format!("{} lacks address {}", link.name, ip.address));
        }
    }
    // Routes in a result are not tied to an interface; they are ours to
    // check only when we are the result's only interface in a sandbox.
    if prev
        .interfaces
        .iter()
        .filter(|i| !i.sandbox.is_empty())
        .count()
        == 1
    {
        let routes = pod_nl.routes(&link).await?;
        for r in &prev.routes {
            let present = routes
                .iter()
                .any(|(dst, gw)| *dst == r.dst && (r.gw.is_none() || *gw == r.gw));
            if !present {
                return fail(format!("route to {} via {:?} is missing", r.dst, r.gw));
            }
        }
    }
    if let Some(ipam) = ipam(conf, env).await? {
        ipam.exec(Command::Check, env).await?;
    }
    Ok(())
}
