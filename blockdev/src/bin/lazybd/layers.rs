//! `lazybd layers`: the lazy layers a running lazybd-snapshotter has
//! attached, their fetch state and the containers using them, from its
//! control API (docs/snapshotter.md#control-api).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// List the lazy layers of a running lazybd-snapshotter.
#[derive(clap::Args)]
pub struct Args {
    /// The snapshotter's control socket: `control_address` in its config
    /// file (/etc/lazybd/snapshotter.toml).
    #[arg(long, default_value = "/run/lazybd/control.sock")]
    control: PathBuf,
    /// Print the raw JSON reply.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let mut stream = UnixStream::connect(&args.control).with_context(|| {
        format!(
            "connecting to {} (is lazybd-snapshotter running?)",
            args.control.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"{\"op\":\"layers\"}\n")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("reading the reply")?;
    let reply: Value = serde_json::from_str(&line).context("parsing the reply")?;
    if let Some(e) = reply.get("error") {
        bail!("snapshotter: {e}");
    }
    if args.json {
        println!("{reply}");
        return Ok(());
    }
    let layers = reply["layers"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<72} {:<72} {:<8} {:>15}  CONTAINERS",
        "LAYER", "ANCHOR", "STATE", "CHUNKS"
    );
    for l in &layers {
        let containers: Vec<&str> = l["containers"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "{:<72} {:<72} {:<8} {:>15}  {}",
            l["digest"].as_str().unwrap_or("?"),
            l["anchor"].as_str().unwrap_or("none (unanchored)"),
            l["state"].as_str().unwrap_or("?"),
            format!("{}/{}", l["chunks_present"], l["chunks_total"]),
            containers.join(",")
        );
    }
    Ok(())
}
