//! `lazybd convert --record-profile`: a startup profile recorded at
//! conversion time, as `ctr-remote image optimize` records one, in the
//! format nodes record traces in (crate `lazybd_blockdev::trace`).
//!
//! 1. **copy** a registry source into the scratch dir once (both passes
//!    then convert the same image, downloaded once);
//! 2. **pass 1** converts it, without a profile, into a scratch OCI layout;
//! 3. **record**: that image is mounted lazily by this process
//!    ([`rootfs`]) and its entrypoint runs under runc ([`spec`], [`runc`])
//!    until it exits or `--record-secs` pass; every image byte its layers
//!    were read for, in first-read order, is the profile. It runs twice,
//!    from a fresh mount each time: with 4 KiB of readahead (one page, the
//!    profile's narrow part, what a node on a slow link reads) and with
//!    `--record-read-ahead-kb` (what a node reading ahead that far reads
//!    besides, stored after it); once when that is 4 or less. Each layer
//!    is named there by its source diff_id too;
//! 4. **pass 2** converts the source again with that profile (the EROFS
//!    image of a layer is the same in both passes, so the profile's offsets
//!    hold) into DST.
//!
//! Everything lives under one scratch dir in `--work-dir`; mounts, loop
//! devices, the container and the scratch dir are removed on every path,
//! a failure or SIGINT/SIGTERM/SIGHUP ([`interrupt`]) included.

mod interrupt;
mod rootfs;
mod runc;
mod spec;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lazybd_blockdev::convert::{self, ConvertOptions, Converted, ImageStore, LayoutStore};
use lazybd_blockdev::format::NARROW_READ_AHEAD_KB;
use lazybd_blockdev::trace::Trace;
use tracing::{info, warn};

use crate::image_source::OpenImage;
use crate::registry_args::RegistryArgs;
use interrupt::Interrupt;
use rootfs::LazyRootfs;
use runc::{Ended, Runc};
use spec::Workload;

/// What `--record-profile` was told.
pub struct Recording {
    /// How long the workload may run (it is stopped then).
    pub limit: Duration,
    /// The runc binary (a name is looked up on PATH).
    pub runc: PathBuf,
    /// Where to write the recorded profile too.
    pub profile_out: Option<PathBuf>,
    /// Where to write the workload's stdout and stderr (default: a scratch
    /// file, shown in part if the workload fails).
    pub log: Option<PathBuf>,
    /// The most the nodes' lazy devices read ahead, KiB: the readahead of
    /// the layers' loop devices while the workload runs (after a run with
    /// [`NARROW_READ_AHEAD_KB`] when this is more).
    pub read_ahead_kb: u32,
}

/// Converts `src` into `dst` with a startup profile recorded by running
/// the image once. `src_is_local`: `src` is an OCI layout (not copied first).
pub fn convert_recorded(
    src: Arc<dyn ImageStore>,
    src_is_local: bool,
    dst: Arc<dyn ImageStore>,
    opts: &ConvertOptions,
    rec: &Recording,
    registry: &RegistryArgs,
) -> Result<Converted> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "--record-profile must run as root: it mounts the image (FUSE, loop devices, \
             EROFS, overlayfs) and runs its entrypoint in a container"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // A registry store owns a tokio runtime, which must not be dropped on
    // an async thread: the last references to the stores are these.
    let stores = (src.clone(), dst.clone());
    let result = runtime.block_on(async {
        let mut interrupt = Interrupt::new()?;
        let scratch = tempfile::Builder::new()
            .prefix("lazybd-record-")
            .tempdir_in(&opts.work_dir)
            .with_context(|| format!("creating a scratch dir in {}", opts.work_dir.display()))?;
        let result = Passes {
            scratch: scratch.path(),
            opts,
            rec,
            registry,
            interrupt: &mut interrupt,
        }
        .run(src, src_is_local, dst)
        .await;
        remove_scratch(scratch);
        result
    });
    // An interrupted pass may still run on a blocking thread: it ends with
    // the process, instead of the runtime waiting for it here.
    runtime.shutdown_background();
    drop(stores);
    result
}

struct Passes<'a> {
    scratch: &'a Path,
    opts: &'a ConvertOptions,
    rec: &'a Recording,
    registry: &'a RegistryArgs,
    interrupt: &'a mut Interrupt,
}

impl Passes<'_> {
    async fn run(
        mut self,
        src: Arc<dyn ImageStore>,
        src_is_local: bool,
        dst: Arc<dyn ImageStore>,
    ) -> Result<Converted> {
        let runc = Runc::find(
            &self.rec.runc,
            self.scratch.join("runc"),
            format!("lazybd-record-{}", std::process::id()),
        )?;
        // What to run, checked before any layer is converted.
        let s = src.clone();
        let opts = self.opts.clone();
        let config = self
            .blocking("reading the image config", move || {
                convert::source_config(s.as_ref(), &opts)
            })
            .await?;
        let workload = Workload::from_image_config(&config)?;

        let src = if src_is_local {
            src
        } else {
            let copy = Arc::new(LayoutStore::create(
                &self.scratch.join("source"),
                Some("source".into()),
            )?);
            let (s, c, opts, scratch) = (
                src.clone(),
                copy.clone(),
                self.opts.clone(),
                self.scratch.to_owned(),
            );
            info!("copying {} into the scratch dir", src.describe());
            self.blocking("copying the source image", move || {
                convert::copy_image(s.as_ref(), &c, &opts, &scratch)
            })
            .await?;
            copy as Arc<dyn ImageStore>
        };

        let first = self.scratch.join("unprofiled");
        info!("pass 1 of 2: converting without a profile, to record one");
        self.convert(
            src.clone(),
            Arc::new(LayoutStore::create(&first, Some("record".into()))?),
            Default::default(),
        )
        .await
        .context("pass 1 (the image to record on)")?;
        let image = format!("oci:{}:record", first.display());
        let trace = self.record(&image, &workload, &runc).await?;
        if let Some(path) = &self.rec.profile_out {
            write_atomic(path, &trace.encode())
                .with_context(|| format!("writing the profile to {}", path.display()))?;
            info!("profile written to {}", path.display());
        }
        // Not needed any more; frees its space for pass 2.
        let _ = std::fs::remove_dir_all(&first);

        info!("pass 2 of 2: converting with the recorded profile");
        let profile = convert::profile_of(&trace);
        self.convert(src, dst, profile)
            .await
            .context("pass 2 (with the profile)")
    }

    /// One conversion, on a blocking thread (stopped at a signal).
    async fn convert(
        &mut self,
        src: Arc<dyn ImageStore>,
        dst: Arc<dyn ImageStore>,
        profile: std::collections::HashMap<String, convert::LayerProfile>,
    ) -> Result<Converted> {
        let opts = ConvertOptions {
            profile,
            work_dir: self.scratch.to_owned(),
            ..self.opts.clone()
        };
        let what = format!("converting {} to {}", src.describe(), dst.describe());
        self.blocking(&what, move || {
            convert::convert_image(src.as_ref(), dst.as_ref(), &opts)
        })
        .await
    }

    /// Runs the pass-1 image's workload and returns what it read: with
    /// `--record-read-ahead-kb` above the narrow readahead, once with that
    /// (the narrow part) and again with `--record-read-ahead-kb`, the
    /// second run's other reads after the first's.
    async fn record(&mut self, image: &str, workload: &Workload, runc: &Runc) -> Result<Trace> {
        let (narrow, wide) = (NARROW_READ_AHEAD_KB, self.rec.read_ahead_kb);
        if wide <= narrow {
            return self.record_once(image, workload, runc, wide).await;
        }
        let first = self.record_once(image, workload, runc, narrow).await?;
        let second = self.record_once(image, workload, runc, wide).await?;
        Ok(Trace::narrow_then_wide(first, second))
    }

    /// Mounts the pass-1 image afresh (nothing cached), runs its workload
    /// with `read_ahead_kb` of readahead, returns what it read.
    async fn record_once(
        &mut self,
        image: &str,
        workload: &Workload,
        runc: &Runc,
        read_ahead_kb: u32,
    ) -> Result<Trace> {
        let layers = OpenImage::open(image, self.registry)
            .await?
            .lazy_layers(image, false)?;
        let dir = self.scratch.join(format!("mount-{read_ahead_kb}"));
        info!("recording with {read_ahead_kb} KiB of readahead");
        let rootfs = LazyRootfs::mount(layers, &dir, read_ahead_kb).await?;
        let recorded = self.run_workload(&rootfs, workload, runc).await;
        let down = rootfs.unmount().await;
        let trace = recorded?;
        down?;
        Ok(trace)
    }

    async fn run_workload(
        &mut self,
        rootfs: &LazyRootfs,
        workload: &Workload,
        runc: &Runc,
    ) -> Result<Trace> {
        // From before the user lookup: a runtime reads /etc/passwd at a
        // container's start too.
        rootfs.start_recording();
        let user = spec::resolve_user(&workload.user, rootfs.path())?;
        let bundle = self.scratch.join("bundle");
        std::fs::create_dir_all(&bundle)?;
        let spec = spec::runtime_spec(workload, &user, rootfs.path(), "lazybd-record");
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec)?,
        )?;
        let log_path = self
            .rec
            .log
            .clone()
            .unwrap_or_else(|| self.scratch.join("workload.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        info!(
            "recording: running {:?} as {}:{} for at most {:?}",
            workload.args, user.uid, user.gid, self.rec.limit
        );
        let ended = runc
            .run(&bundle, log, self.rec.limit, self.interrupt)
            .await?;
        let trace = rootfs.stop_recording();
        let (ranges, bytes) = (trace.range_count(), traced_bytes(&trace));
        match ended {
            Ended::Interrupted(name) => {
                bail!("interrupted by {name}: the workload was stopped and everything removed")
            }
            Ended::Deadline => info!(
                "the workload ran for all of {:?} and was stopped; recorded {ranges} ranges, \
                 {bytes} bytes in {} layers",
                self.rec.limit,
                trace.layers.len()
            ),
            Ended::Exited(status, after) if status.success() => info!(
                "the workload exited after {after:.1?}; recorded {ranges} ranges, {bytes} bytes \
                 in {} layers",
                trace.layers.len()
            ),
            Ended::Exited(status, after) => warn!(
                "the workload failed ({status}) after {after:.1?}; the profile holds what it \
                 read until then: {ranges} ranges, {bytes} bytes. Its output ({}) ends:\n{}",
                log_path.display(),
                tail(&log_path)
            ),
        }
        if trace.is_empty() {
            bail!(
                "the workload read nothing from the image (output in {}): no profile to store",
                log_path.display()
            );
        }
        Ok(trace)
    }

    /// Runs `f` on a blocking thread; a signal stops the wait (the thread
    /// goes on until the process exits).
    async fn blocking<T: Send + 'static, E>(
        &mut self,
        what: &str,
        f: impl FnOnce() -> Result<T, E> + Send + 'static,
    ) -> Result<T>
    where
        E: Into<anyhow::Error> + Send + 'static,
    {
        let task = tokio::task::spawn_blocking(f);
        tokio::select! {
            r = task => r.with_context(|| format!("{what}: the task failed"))?.map_err(Into::into),
            name = self.interrupt.recv() => bail!("{what}: interrupted by {name}"),
        }
    }
}

fn traced_bytes(trace: &Trace) -> u64 {
    trace
        .layers
        .iter()
        .flat_map(|l| l.ranges.iter())
        .map(|[_, n]| n)
        .sum()
}

/// The last lines of a log (its last 2 KiB).
fn tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(2048)))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(s) if s.trim().is_empty() => "(nothing)".to_owned(),
        Ok(s) => s.trim_end().to_owned(),
        Err(e) => format!("(unreadable: {e})"),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path))
}

/// Removes the scratch dir; a pass stopped by a signal may still be
/// writing into it, so a few tries.
fn remove_scratch(scratch: tempfile::TempDir) {
    let path = scratch.keep();
    for _ in 0..5 {
        match std::fs::remove_dir_all(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            _ if !path.exists() => return,
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    warn!("could not remove the scratch dir {}", path.display());
}
