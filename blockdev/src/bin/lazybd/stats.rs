//! `lazybd stats DIR`: counters of a running `lazybd mount`, live from its
//! control socket.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::mount_control::{MountState, StatusReply, DEFAULT_ROOT};

/// Show fetch, cache and latency counters of a running `lazybd mount`.
#[derive(clap::Args)]
pub struct Args {
    /// The directory the image is mounted at.
    dir: PathBuf,
    /// The --root given to `lazybd mount` (its control socket is
    /// ROOT/mounts/<an id of DIR>/control.sock).
    #[arg(long, default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Print the raw JSON snapshot.
    #[arg(long)]
    json: bool,
    /// The P2P peer's counters instead (JSON): uploads and downloads per
    /// peer, ancestors per layer; what its `/v1/stats` does not show others.
    #[arg(long)]
    p2p: bool,
}

pub fn run(args: Args) -> Result<()> {
    let state = MountState::for_target(&args.root, &args.dir)?;
    if args.p2p {
        let Some(reply) = state.request("p2p-stats", Duration::from_secs(10))? else {
            bail!("no lazybd mount process serves {}", args.dir.display());
        };
        if let Some(e) = reply.strip_prefix("error: ") {
            bail!("{e}");
        }
        println!("{reply}");
        return Ok(());
    }
    let Some(reply) = state.request("stats", Duration::from_secs(10))? else {
        bail!("no lazybd mount process serves {}", args.dir.display());
    };
    if args.json {
        println!("{reply}");
        return Ok(());
    }
    let s: StatusReply = serde_json::from_str(&reply).context("parsing the stats reply")?;
    println!("{} at {} (pid {})", s.image, s.target.display(), s.pid);
    println!("layers:");
    for l in &s.layers {
        println!(
            "  {}  anchor {}  {:<8} {}/{} chunks cached  {} on {}  {}",
            l.digest,
            l.anchor.as_deref().unwrap_or("none (unanchored)"),
            l.state.as_str(),
            l.chunks_present,
            l.chunks_total,
            l.loop_device.display(),
            l.backing_file.display(),
            l.mountpoint.display()
        );
    }
    let st = &s.stats;
    println!("sources:");
    for src in &st.sources {
        println!(
            "  {:<12} {} requests, {} chunks, {} bytes, {} errors, {} corrupt chunks",
            src.name, src.requests, src.chunks, src.bytes, src.errors, src.corrupt_chunks
        );
    }
    println!(
        "cache: {} hits, {} misses; reads: {} bytes, {} failed",
        st.cache_hits, st.cache_misses, st.bytes_read, st.read_errors
    );
    println!(
        "waiting reads: {} (oldest {} ms)",
        st.waiting_reads, st.oldest_waiting_ms
    );
    let p = &st.prefetch;
    println!(
        "prefetch: {} background requests ({} chunks), {} yields to reads, {} ms rate limited; \
         reads: {} fetches ({} during a prefetch, {} overtook it, {} waited on it); \
         {} handoffs to local files ({} failed)",
        p.background_fetches,
        p.background_chunks,
        p.background_yields,
        p.rate_limited_ms,
        p.demand_fetches,
        p.demand_fetches_while_prefetching,
        p.demand_overtook_background,
        p.demand_waited_on_background,
        p.handoffs,
        p.handoff_failures
    );
    let a = &st.attach;
    println!(
        "attach: {} layers ({} ms on indexes, {} ms on FUSE/loop/EROFS); \
         {} warmed with their startup part ({} KiB into the page cache)",
        a.attaches,
        a.index_ms,
        a.expose_ms,
        a.warmed_layers,
        a.warmed_bytes >> 10
    );
    println!("read latency:");
    let h = &st.read_latency;
    for (i, count) in h.counts.iter().enumerate() {
        let label = match h.bounds_us.get(i) {
            Some(b) => format!("<= {}", human_us(*b)),
            None => format!(">  {}", human_us(*h.bounds_us.last().unwrap_or(&0))),
        };
        println!("  {label:<10} {count}");
    }
    Ok(())
}

fn human_us(us: u64) -> String {
    match us {
        0..=999 => format!("{us}us"),
        1_000..=999_999 => format!("{}ms", us / 1_000),
        _ => format!("{}s", us / 1_000_000),
    }
}
