//! A FUSE session: mounting (and the INIT handshake), or resuming one that
//! a previous daemon mounted from the descriptors it left in the fd store;
//! the FUSE threads; unmounting.
//!
//! What a resume needs besides the descriptors is what INIT negotiated
//! (the kernel never sends INIT again) and which mount the session serves.
//! Both are written once, at mount, into a sealed memfd that travels with
//! the descriptors ([`SessionState`]): it can neither change nor be stale
//! relative to them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::abi::{self, init_flags, opcode, InHeader, InitIn, InitOut, Pod};
use super::channel::{Channel, Received};
use super::files::LayerFiles;

/// Largest write the kernel may send (never: the filesystem is read-only);
/// it sizes the request buffer, which must hold one.
const MAX_WRITE: u32 = 128 << 10;
const BUFFER_SIZE: usize = MAX_WRITE as usize + 4096;
/// Largest read the kernel sends; with FUSE_MAX_PAGES it honours up to 1 MiB.
pub(in crate::device) const MAX_READAHEAD: u32 = 1 << 20;
const MAX_PAGES: u16 = (MAX_READAHEAD / 4096) as u16;
/// Readahead requests are "background" requests; the default of 16 in
/// flight starves a fast sequential reader.
const MAX_BACKGROUND: u16 = 64;
/// How long unmount waits for the FUSE threads to see the session end.
const THREAD_JOIN_WAIT: Duration = Duration::from_secs(5);

/// The names of a session's descriptors in the fd store.
pub const STATE_FD: &str = "state";
fn channel_fd_name(i: usize) -> String {
    format!("dev{i}")
}

/// What INIT negotiated and which mount the session serves; written once
/// at mount into a sealed memfd stored with the session's descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    pub version: u32,
    /// The protocol minor both sides use.
    pub minor: u32,
    /// What the kernel offered (`flags | flags2 << 32`).
    pub kernel_flags: u64,
    /// `st_dev` of the mountpoint: the session's superblock.
    pub mount_dev: u64,
    pub mountpoint: PathBuf,
}

const STATE_VERSION: u32 = 1;

impl SessionState {
    fn write_sealed(&self) -> io::Result<OwnedFd> {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(
            "lazybd-fuse-session",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let mut file = File::from(fd);
        file.write_all(&serde_json::to_vec(self).map_err(io::Error::other)?)?;
        let seals = nix::fcntl::SealFlag::F_SEAL_WRITE
            | nix::fcntl::SealFlag::F_SEAL_GROW
            | nix::fcntl::SealFlag::F_SEAL_SHRINK
            | nix::fcntl::SealFlag::F_SEAL_SEAL;
        nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_ADD_SEALS(seals))?;
        Ok(OwnedFd::from(file))
    }

    fn read(fd: &OwnedFd) -> Result<Self, String> {
        let file = File::from(fd.try_clone().map_err(|e| e.to_string())?);
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len > 64 << 10 {
            return Err(format!("session state of {len} bytes"));
        }
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, 0).map_err(|e| e.to_string())?;
        serde_json::from_slice(&buf).map_err(|e| format!("session state: {e}"))
    }
}

/// A mounted (or resumed) directory of layer files with its FUSE threads.
pub struct FuseMount {
    mountpoint: PathBuf,
    channels: Vec<Arc<Channel>>,
    state: OwnedFd,
    threads: Vec<JoinHandle<()>>,
}

impl FuseMount {
    /// Mounts a new FUSE session at `mountpoint`, negotiates it, and starts
    /// `threads` FUSE threads, each on its own clone of the session fd.
    pub fn mount(mountpoint: &Path, files: Arc<LayerFiles>, threads: usize) -> io::Result<Self> {
        let main = Channel::open_device()?;
        let opts = format!(
            "fd={},rootmode=40000,user_id={},group_id={}",
            main.raw(),
            nix::unistd::getuid(),
            nix::unistd::getgid()
        );
        mount(
            Some("lazybd"),
            mountpoint,
            Some("fuse.lazybd"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(opts.as_str()),
        )
        .map_err(|e| io::Error::other(format!("mount FUSE at {}: {e}", mountpoint.display())))?;
        let negotiated = handshake(&main).and_then(|(minor, kernel_flags)| {
            let state = SessionState {
                version: STATE_VERSION,
                minor,
                kernel_flags,
                mount_dev: mount_dev(mountpoint)?,
                mountpoint: mountpoint.to_owned(),
            };
            let mut channels = vec![Arc::new(main)];
            for _ in 1..threads.max(1) {
                channels.push(Arc::new(channels[0].clone_session()?));
            }
            Ok((state, channels))
        });
        let (state, channels) = match negotiated {
            Ok(n) => n,
            Err(e) => {
                let _ = umount2(mountpoint, MntFlags::MNT_DETACH);
                return Err(e);
            }
        };
        if state.kernel_flags & init_flags::HAS_RESEND == 0 {
            warn!(
                "this kernel cannot resend FUSE requests (Linux 6.9+): a restart of this \
                 daemon will not resume the session at {}",
                mountpoint.display()
            );
        }
        let state_fd = state.write_sealed()?;
        let mut m = FuseMount {
            mountpoint: mountpoint.to_owned(),
            channels,
            state: state_fd,
            threads: Vec::new(),
        };
        m.start(files, threads);
        Ok(m)
    }

    /// Takes over the session a previous daemon left in the fd store
    /// (`held`: its descriptors by name) at `mountpoint`: checks that it
    /// still serves that mount, asks the kernel to resend what the previous
    /// daemon read but never answered, and starts serving. Requests for
    /// layers not attached yet wait in `files` (a restoring directory).
    pub fn resume(
        mountpoint: &Path,
        files: Arc<LayerFiles>,
        threads: usize,
        mut held: HashMap<String, OwnedFd>,
    ) -> Result<Self, String> {
        let state_fd = held
            .remove(STATE_FD)
            .ok_or("no session state among the held descriptors")?;
        let state = SessionState::read(&state_fd)?;
        if state.version != STATE_VERSION || state.minor < abi::MIN_MINOR {
            return Err(format!("unsupported session state {state:?}"));
        }
        if state.mountpoint != mountpoint {
            return Err(format!(
                "the session serves {}, not {}",
                state.mountpoint.display(),
                mountpoint.display()
            ));
        }
        if state.kernel_flags & init_flags::HAS_RESEND == 0 {
            return Err("the kernel cannot resend requests (Linux 6.9+ can)".into());
        }
        let dev = mount_dev(mountpoint).map_err(|e| e.to_string())?;
        if dev != state.mount_dev || !is_lazybd_fuse(mountpoint) {
            return Err(format!(
                "{} is no longer the session's mount",
                mountpoint.display()
            ));
        }
        let mut channels = Vec::new();
        while let Some(fd) = held.remove(&channel_fd_name(channels.len())) {
            channels.push(Arc::new(Channel::from_fd(fd)));
        }
        if channels.is_empty() {
            return Err("no /dev/fuse descriptor among the held descriptors".into());
        }
        for name in held.keys() {
            debug!("ignoring held descriptor {name}");
        }
        // Before any thread reads: a request read now could otherwise be
        // sent to us twice.
        channels[0]
            .notify_resend()
            .map_err(|e| format!("FUSE_NOTIFY_RESEND: {e}"))?;
        while channels.len() < threads {
            let clone = channels[0]
                .clone_session()
                .map_err(|e| format!("cloning the session fd: {e}"))?;
            channels.push(Arc::new(clone));
        }
        info!(
            "resumed the FUSE session at {} ({} descriptors, protocol 7.{})",
            mountpoint.display(),
            channels.len(),
            state.minor
        );
        let mut m = FuseMount {
            mountpoint: mountpoint.to_owned(),
            channels,
            state: state_fd,
            threads: Vec::new(),
        };
        m.start(files, threads);
        Ok(m)
    }

    fn start(&mut self, files: Arc<LayerFiles>, threads: usize) {
        for (i, ch) in self.channels.iter().take(threads.max(1)).enumerate() {
            let (ch, files) = (ch.clone(), files.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || serve(&ch, &files));
            match spawned {
                Ok(t) => self.threads.push(t),
                Err(e) => warn!("starting FUSE thread {i}: {e}"),
            }
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The descriptors that must outlive this process for a next daemon to
    /// resume the session, by name: every channel (a request read from one
    /// stays on it until answered or resent) and the session state.
    pub fn held_fds(&self) -> Vec<(String, BorrowedFd<'_>)> {
        let mut fds: Vec<_> = self
            .channels
            .iter()
            .enumerate()
            .map(|(i, ch)| (channel_fd_name(i), ch.as_fd()))
            .collect();
        fds.push((STATE_FD.to_owned(), self.state.as_fd()));
        fds
    }

    /// Unmounts; the kernel ends the session and the threads stop.
    pub fn unmount(self) -> io::Result<()> {
        umount2(&self.mountpoint, MntFlags::empty())
            .map_err(|e| io::Error::other(format!("umount {}: {e}", self.mountpoint.display())))?;
        let deadline = Instant::now() + THREAD_JOIN_WAIT;
        for t in self.threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                warn!("a FUSE thread did not stop after the unmount; left running");
            }
        }
        Ok(())
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the channel owns the descriptor for as long as the borrow.
        unsafe { BorrowedFd::borrow_raw(self.raw()) }
    }
}

/// Reads INIT and answers it; returns the protocol minor both sides use
/// and what the kernel offered.
fn handshake(ch: &Channel) -> io::Result<(u32, u64)> {
    let mut buf = vec![0u8; BUFFER_SIZE];
    let n = match ch.receive(&mut buf)? {
        Received::Request(n) => n,
        Received::Gone => return Err(io::Error::other("FUSE session ended before INIT")),
    };
    let h = InHeader::read_from(&buf[..n]);
    if h.opcode != opcode::INIT {
        let _ = ch.send(h.unique, -libc::EIO, &[]);
        return Err(io::Error::other(format!(
            "FUSE opcode {} before INIT",
            h.opcode
        )));
    }
    let init = InitIn::read_from(&buf[size_of::<InHeader>()..n]);
    if init.major != abi::KERNEL_VERSION || init.minor < abi::MIN_MINOR {
        let _ = ch.send(h.unique, -libc::EPROTO, &[]);
        return Err(io::Error::other(format!(
            "FUSE protocol {}.{} of the kernel is older than 7.{}",
            init.major,
            init.minor,
            abi::MIN_MINOR
        )));
    }
    let mut offered = u64::from(init.flags);
    if offered & init_flags::INIT_EXT != 0 {
        offered |= u64::from(init.flags2) << 32;
    }
    // With loop direct IO, the loop device's reads become direct reads of
    // our files; async DIO lets the kernel keep several in flight instead
    // of one synchronous request at a time.
    let wanted = init_flags::ASYNC_READ
        | init_flags::BIG_WRITES
        | init_flags::ASYNC_DIO
        | init_flags::PARALLEL_DIROPS
        | init_flags::MAX_PAGES;
    if offered & init_flags::ASYNC_DIO == 0 {
        debug!("fuse init: kernel lacks FUSE_ASYNC_DIO");
    }
    let minor = init.minor.min(abi::OUR_MINOR);
    let out = InitOut {
        major: abi::KERNEL_VERSION,
        minor,
        max_readahead: init.max_readahead.min(MAX_READAHEAD),
        flags: (offered & wanted) as u32,
        max_background: MAX_BACKGROUND,
        congestion_threshold: MAX_BACKGROUND * 3 / 4,
        max_write: MAX_WRITE,
        time_gran: 1,
        max_pages: MAX_PAGES,
        ..InitOut::default()
    };
    ch.send(h.unique, 0, &[out.as_bytes()])?;
    debug!(
        "fuse init: protocol 7.{minor}, flags {:#x}, max_readahead {}",
        out.flags, out.max_readahead
    );
    Ok((minor, offered))
}

/// One FUSE thread: reads requests from `ch` and answers them until the
/// session ends.
fn serve(ch: &Arc<Channel>, files: &LayerFiles) {
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        match ch.receive(&mut buf) {
            Ok(Received::Request(n)) => super::ops::dispatch(files, ch, &buf[..n]),
            Ok(Received::Gone) => return,
            Err(e) => {
                warn!("reading a FUSE request: {e}; this FUSE thread stops");
                return;
            }
        }
    }
}

/// The device number of the mount at `path`, from mountinfo: a `stat` of
/// the mountpoint would be a FUSE request, and nobody serves yet.
fn mount_dev(path: &Path) -> io::Result<u64> {
    let (major, minor) = crate::device::mounts::mount_device(path)
        .ok_or_else(|| io::Error::other(format!("{} is not a mount point", path.display())))?;
    Ok(libc::makedev(major, minor))
}

/// Whether `path` is a lazybd FUSE mount (mountinfo's filesystem type).
fn is_lazybd_fuse(path: &Path) -> bool {
    crate::device::mounts::mount_fstype(path).is_some_and(|t| t == "fuse.lazybd")
}
