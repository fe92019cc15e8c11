//! DEL: bring the ENI home under its parking name and release its addresses.
//! Idempotent: a missing netns, a missing ENI or a missing record is success.
//! It fails only while the ENI is still stuck in the pod netns, or when the
//! IPAM plugin's own DEL fails.
//!
//! DEL touches only the ENI recorded for this attachment. The MACs a request
//! names (config, CNI_ARGS, annotation, prevResult) say at most where to look
//! first: an ENI that ADD refused, or that some other plugin put into the
//! pod, has no record and is left alone.

use super::{ipam_del, release_eni};
use crate::config::NetConf;
use crate::env::Env;
use crate::error::Result;
use crate::log;
use crate::mac::Mac;
use crate::state::Store;

pub async fn del(env: &Env, conf: &NetConf) -> Result<()> {
    let store = Store::open(&conf.state_dir)?;
    if let Some(mac) = recorded_eni(env, conf, &store)? {
        let lock = store.lock(mac, conf.lock_timeout).await?;
        // Read again under the lock: another invocation may have changed it.
        match store.load(&lock)? {
            Some(rec) if rec.is_for(env) => {
                let netns = env.netns.as_deref().or(rec.netns.as_deref());
                release_eni(conf, mac, netns).await?;
                // The ENI is home: free it for the next pod before asking
                // IPAM, so a failing IPAM DEL (returned, so the runtime
                // retries rather than leak the address) cannot hold it.
                store.remove(&lock)?;
            }
            // A late or repeated DEL must not take the NIC away from the
            // pod that owns it now.
            Some(rec) => log(format!(
                "ENI {mac} now belongs to container {} ({}); leaving it alone",
                rec.container_id, rec.ifname
            )),
            None => {}
        }
    }
    ipam_del(conf, env).await
}

/// The ENI recorded for this attachment, if any. prevResult's interface
/// for CNI_IFNAME and the config's `mac` are tried first (one file each);
/// otherwise every record is looked at.
fn recorded_eni(env: &Env, conf: &NetConf, store: &Store) -> Result<Option<Mac>> {
    let from_prev = conf.prev_result.as_ref().and_then(|p| {
        p.interfaces
            .iter()
            .find(|i| i.name == env.ifname && !i.sandbox.is_empty())
            .and_then(|i| i.mac.parse().ok())
    });
    for mac in from_prev.into_iter().chain(conf.mac) {
        if store.peek(mac)?.is_some_and(|r| r.is_for(env)) {
            return Ok(Some(mac));
        }
    }
    Ok(store.find(env)?.map(|r| r.mac))
}
