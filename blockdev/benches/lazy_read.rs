//! Reads through the lazy device vs. the same EROFS image from a plain local
//! file, side by side in one run (a report, not a timed test). Run as root
//! via hack/bench-read.sh.
//!
//! Both sides are EROFS on a read-only loop device; the only difference is
//! what is under the loop device: our FUSE file (every chunk already cached)
//! or the image file itself. Page caches are dropped before every fio run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use lazybd_blockdev::device::{mounts, LayerManager, LayerState, NodeConfig};
use lazybd_blockdev::format::{write_blob, Layout};
use lazybd_blockdev::layer::LayerSource;
use lazybd_blockdev::source::{ChunkSource, FileSource};

const BIG_MIB: usize = 512;

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("lazy_read bench: needs root (loop devices, mounts); skipped");
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("lazybd-bench-")
        .tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .expect("temp dir");
    let image = build_image(work.path());
    let blob = work.path().join("layer.blob");
    let image_file = std::fs::File::open(&image).unwrap();
    let layout = Layout::fixed(image_file.metadata().unwrap().len(), 1 << 20).unwrap();
    let written = write_blob(
        &image_file,
        std::io::BufWriter::new(std::fs::File::create(&blob).unwrap()),
        &layout,
    )
    .expect("write blob");
    let digest = format!("sha256:{}", hex(&written.blob_digest));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut config = NodeConfig::new(work.path().join("node"));
    if let Ok(v) = std::env::var("LOOP_DIRECT_IO") {
        config.loop_direct_io = v == "1";
    }
    if let Ok(v) = std::env::var("FUSE_THREADS") {
        config.fuse_threads = v.parse().expect("FUSE_THREADS");
    }
    if let Ok(v) = std::env::var("READ_AHEAD_KB") {
        config.read_ahead_kb = v.parse().expect("READ_AHEAD_KB");
    }
    // By default the lazy side stays on FUSE (what this bench is about);
    // HANDOFF=1 measures it after the switch to the local cache file.
    let handoff = std::env::var("HANDOFF").is_ok_and(|v| v == "1");
    config.handoff = handoff;
    let (config_dio, config_ra) = (config.loop_direct_io, config.read_ahead_kb);
    let manager = runtime
        .block_on(async { LayerManager::new(config) })
        .expect("manager");
    let source: Arc<dyn ChunkSource> = Arc::new(FileSource::open("file", &blob).unwrap());
    let attached = runtime
        .block_on(manager.attach(LayerSource {
            digest,
            anchor: Some(format!("sha256:{}", hex::encode(written.anchor()))),
            blob_size: written.blob_len,
            index_location: None,
            sources: vec![source],
            diff_id: None,
        }))
        .expect("attach");
    // Warm the chunk cache: every chunk present before measuring.
    read_all(&attached.mountpoint);
    let status = &manager.layers()[0];
    assert_eq!(
        status.chunks_present, status.chunks_total,
        "cache not complete"
    );
    if handoff {
        // The periodic persister hands a complete layer off within a tick.
        let mut tries = 0;
        while manager.layers()[0].state != LayerState::Local {
            tries += 1;
            assert!(tries < 100, "layer not handed off after 10 s");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    let plain = work.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "erofs", "-o", "ro,loop"])
        .arg(&image)
        .arg(&plain)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount plain image");

    println!(
        "lazy device: {} (loop direct-io {}, readahead {} KiB, on {}); plain: loop on {}",
        attached.loop_device.display(),
        config_dio,
        config_ra,
        manager.layers()[0].backing_file.display(),
        image.display()
    );
    println!(
        "{:<28} {:>14} {:>14} {:>7}   (median of interleaved rounds)",
        "workload", "lazy", "plain file", "ratio"
    );
    let jobs = [
        ("sequential 1 MiB reads", "read", "1M", "MiB/s"),
        ("random 4 KiB reads", "randread", "4k", "IOPS"),
    ];
    let rounds: usize = std::env::var("ROUNDS").map_or(3, |v| v.parse().expect("ROUNDS"));
    let only = std::env::var("WORKLOAD").ok();
    for (name, rw, bs, unit) in jobs {
        if only.as_deref().is_some_and(|w| w != rw) {
            continue;
        }
        // Interleaved rounds, median of each side: the disk is shared, and
        // one noisy run must not decide the ratio.
        let (mut lazy, mut base) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            lazy.push(fio(&attached.mountpoint.join("big.bin"), rw, bs, unit));
            base.push(fio(&plain.join("big.bin"), rw, bs, unit));
        }
        let (lazy, base) = (median(lazy), median(base));
        println!(
            "{name:<28} {lazy:>9.0} {unit:<5}{base:>9.0} {unit:<5}{:>6.2}x",
            lazy / base
        );
    }

    mounts::unmount(&plain, false).expect("unmount plain");
    runtime.block_on(manager.shutdown()).expect("shutdown");
}

fn build_image(work: &Path) -> PathBuf {
    let tree = work.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    // Incompressible, like most layer content that matters for reads.
    let mut x = 0x2545F4914F6CDD1Du64;
    let mut f = std::io::BufWriter::new(std::fs::File::create(tree.join("big.bin")).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..BIG_MIB {
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        std::io::Write::write_all(&mut f, &buf).unwrap();
    }
    drop(f);
    let image = work.join("layer.erofs");
    let ok = Command::new("mkfs.erofs")
        .args(["--quiet", "-T0"])
        .arg(&image)
        .arg(&tree)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.erofs");
    std::fs::remove_dir_all(&tree).unwrap();
    image
}

fn read_all(dir: &Path) {
    let mut f = std::fs::File::open(dir.join("big.bin")).unwrap();
    std::io::copy(&mut f, &mut std::io::sink()).unwrap();
}

fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches");
}

/// Runs one fio job and returns MiB/s or IOPS.
fn fio(file: &Path, rw: &str, bs: &str, unit: &str) -> f64 {
    drop_caches();
    let out = Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=psync",
            "--output-format=json",
            "--size=100%",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        // Random reads run for a fixed time; sequential reads read it all.
        .args(if rw == "read" {
            &[][..]
        } else {
            &["--runtime=8", "--time_based"][..]
        })
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
    let read = &v["jobs"][0]["read"];
    match unit {
        "MiB/s" => read["bw_bytes"].as_f64().unwrap() / (1 << 20) as f64,
        _ => read["iops"].as_f64().unwrap(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
