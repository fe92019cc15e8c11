//! DEL: bring the ENI home under its parking name and release its addresses.
//! Idempotent: a missing netns, a missing ENI or a missing record is success.
//! It fails only while the ENI is still stuck in the pod netns, or when the
//! IPAM plugin's own DEL fails.

use super::{ipam_del, release_eni};
use crate::config::NetConf;
use crate::env::Env;
use crate::error::Result;
use crate::log;
use crate::mac::Mac;
use crate::state::Store;

pub async fn del(env: &Env, conf: &NetConf) -> Result<()> {
    let store = Store::open(&conf.state_dir)?;
    if let Some(mac) = eni_of(env, conf, &store)? {
        let lock = store.lock(mac, conf.lock_timeout).await?;
        let rec = store.load(&lock)?;
        match &rec {
            Some(r) if !r.is_for(env) => {
                // A late or repeated DEL must not take the NIC away from the
                // pod that owns it now.
                log(format!(
                    "ENI {mac} now belongs to container {} ({}); leaving it alone",
                    r.container_id, r.ifname
                ));
            }
            _ => {
                let netns = env
                    .netns
                    .as_deref()
                    .or(rec.as_ref().and_then(|r| r.netns.as_deref()));
                release_eni(conf, mac, netns, rec.is_some()).await?;
                // The ENI is home: free it for the next pod before asking
                // IPAM, so a failing IPAM DEL (returned, so the runtime
                // retries rather than leak the address) cannot hold it.
                store.remove(&lock)?;
                drop(lock);
                return ipam_del(conf, env).await;
            }
        }
    }
    ipam_del(conf, env).await
}

/// Which ENI this attachment has: the configured MAC, else the one in
/// prevResult's interface for CNI_IFNAME, else the one in our state.
fn eni_of(env: &Env, conf: &NetConf, store: &Store) -> Result<Option<Mac>> {
    if let Some(m) = conf.eni_mac(env)? {
        return Ok(Some(m));
    }
    let from_prev = conf.prev_result.as_ref().and_then(|p| {
        p.interfaces
            .iter()
            .find(|i| i.name == env.ifname && !i.sandbox.is_empty())
            .and_then(|i| i.mac.parse().ok())
    });
    if from_prev.is_some() {
        return Ok(from_prev);
    }
    Ok(store.find(env)?.map(|r| r.mac))
}
