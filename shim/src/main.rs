//! containerd-shim-lazybd-v2: the containerd runtime v2 shim of lazybd.
//!
//! containerd runs the binary three ways: `start` (launch or reuse a shim
//! server, print its address), `delete` (clean up after a dead shim), and,
//! through `start`, without an action as the server itself.

use std::io::Write;

use anyhow::Context;
use containerd_shim_protos::protobuf::Message;

fn main() {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("containerd-shim-lazybd-v2: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&flags) {
        eprintln!("containerd-shim-lazybd-v2: {e:#}");
        std::process::exit(1);
    }
}

fn run(flags: &containerd_shim::Flags) -> anyhow::Result<()> {
    if flags.version {
        println!(
            "containerd-shim-lazybd-v2:\n  Version: {}\n  Runtime: {}",
            env!("CARGO_PKG_VERSION"),
            lazybd_shim::RUNTIME_NAME
        );
        return Ok(());
    }
    let mut stdout = std::io::stdout();
    match flags.action.as_str() {
        "start" => {
            let address = lazybd_shim::start::start(flags)?;
            // containerd 1.6 reads the bare address; 1.7 and 2.x accept it as a v2 shim.
            stdout.write_all(address.as_bytes())?;
        }
        "delete" => {
            let response = runtime()?.block_on(lazybd_shim::delete::delete(flags))?;
            stdout.write_all(&response.write_to_bytes()?)?;
        }
        "" if !flags.socket.is_empty() => {
            runtime()?.block_on(lazybd_shim::server::serve(flags))?;
        }
        other => anyhow::bail!("unknown action {other:?} (want start or delete)"),
    }
    stdout.flush()?;
    Ok(())
}

/// One thread: a shim waits on runc, fifos and sockets, and every extra
/// worker thread costs resident memory in each of hundreds of shims.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}
