//! GC: release every attachment of this network the runtime no longer lists
//! in `cni.dev/valid-attachments`: bring its ENI home, release its IPAM
//! allocation, drop its record. Keeps going past failures and reports them.

use super::{ipam, release_eni};
use crate::config::NetConf;
use crate::env::{Command, Env};
use crate::error::{CniError, Result};
use crate::log;
use crate::state::{Record, Store};
use crate::version::CniVersion;

pub async fn gc(env: &Env, conf: &NetConf) -> Result<()> {
    let valid = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| CniError::InvalidConfig("GC needs cni.dev/valid-attachments".into()))?;
    let is_valid = |r: &Record| {
        valid
            .iter()
            .any(|a| a.container_id == r.container_id && a.ifname == r.ifname)
    };
    let store = Store::open(&conf.state_dir)?;
    let ipam = ipam(conf, env).await?;
    let mut errors = Vec::new();
    for candidate in store.records()? {
        if candidate.network != conf.name || is_valid(&candidate) {
            continue;
        }
        let lock = store.lock(candidate.mac, conf.lock_timeout).await?;
        // Re-read under the lock: a DEL or ADD may have changed it.
        let Some(rec) = store.load(&lock)? else {
            continue;
        };
        if rec.network != conf.name || is_valid(&rec) {
            continue;
        }
        log(format!(
            "GC: releasing ENI {} of container {} ({})",
            rec.mac, rec.container_id, rec.ifname
        ));
        let released = async {
            release_eni(conf, rec.mac, rec.netns.as_deref()).await?;
            if let Some(ipam) = &ipam {
                let their = env.for_attachment(&rec.container_id, &rec.ifname, None);
                ipam.exec(Command::Del, &their).await?;
            }
            store.remove(&lock)
        };
        if let Err(e) = released.await {
            log(format!("GC: ENI {}: {e}", rec.mac));
            errors.push(e);
        }
    }
    if let Some(ipam) = ipam.as_ref().filter(|i| i.speaks(CniVersion::V110)) {
        if let Err(e) = ipam.exec(Command::Gc, env).await {
            errors.push(e);
        }
    }
    match errors.len() {
        0 => Ok(()),
        n => {
            let first = errors.swap_remove(0);
            log(format!("GC: {n} attachment(s) could not be released"));
            Err(first)
        }
    }
}
