//! `lazybd fd-holder`: keep the FUSE sessions of lazybd daemons while they
//! restart, where systemd's fd store is not available (a DaemonSet, the
//! quickstart). It does nothing else; its rules are in
//! `lazybd_blockdev::device::holder`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lazybd_blockdev::device::holder::{Holder, DEFAULT_SOCKET};
use tracing::info;

/// Hold the FUSE session descriptors of lazybd daemons across their
/// restarts (docs/operations.md).
#[derive(clap::Args)]
pub struct Args {
    /// The socket daemons connect to (mode 0600).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let holder =
        Holder::bind(&args.socket).with_context(|| format!("binding {}", args.socket.display()))?;
    info!("holding FUSE sessions on {}", args.socket.display());
    holder.run().context("serving the fd holder socket")
}
