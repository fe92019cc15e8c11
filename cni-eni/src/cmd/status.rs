//! STATUS: ready when the state dir is usable and the IPAM delegate is.

use super::ipam;
use crate::config::NetConf;
use crate::env::{Command, Env};
use crate::error::{CniError, Result};
use crate::state::Store;
use crate::version::CniVersion;

pub async fn status(env: &Env, conf: &NetConf) -> Result<()> {
    let not_ready = |e: CniError| CniError::NotAvailable(e.to_string());
    Store::open(&conf.state_dir).map_err(not_ready)?;
    if let Some(ipam) = ipam(conf, env).await.map_err(not_ready)? {
        if ipam.speaks(CniVersion::V110) {
            ipam.exec(Command::Status, env).await?;
        }
    }
    Ok(())
}
