//! Read-only loop devices over a layer's FUSE file.
//!
//! Hand-written over nix ioctls because the crates for this (loopdev,
//! loopdev-3) configure a device in two steps (`LOOP_SET_FD`, then
//! `LOOP_SET_STATUS64`), leaving a window where it is writable and without
//! autoclear, and loopdev-3 needs libclang at build time. `LOOP_CONFIGURE`
//! (Linux 5.8) sets backing file, read-only, autoclear, direct IO and block
//! size in one atomic call.
//!
//! Lifetime: the device is configured with autoclear, and [`LoopDevice`]
//! keeps an fd on it. The EROFS mount holds the device too, so the device
//! exists exactly while either holds it: after `umount` and dropping the
//! `LoopDevice`, the kernel detaches it by itself, also if this process dies.
//! We never clear a device by number, since a device we no longer hold may
//! already belong to someone else.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LOOP_CTL_GET_FREE: u8 = 0x82;
const LOOP_CONFIGURE: u8 = 0x0A;
const LOOP_CHANGE_FD: u8 = 0x06;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

nix::ioctl_none_bad!(
    loop_ctl_get_free,
    nix::request_code_none!(b'L', LOOP_CTL_GET_FREE)
);
nix::ioctl_write_ptr_bad!(
    loop_configure,
    nix::request_code_none!(b'L', LOOP_CONFIGURE),
    LoopConfig
);

nix::ioctl_write_int_bad!(
    loop_change_fd,
    nix::request_code_none!(b'L', LOOP_CHANGE_FD)
);

/// How many times a free device may be taken by someone else between
/// `LOOP_CTL_GET_FREE` and `LOOP_CONFIGURE` before we give up.
const CLAIM_ATTEMPTS: u32 = 16;

#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    number: u32,
    _fd: File,
}

#[derive(Debug, Clone, Copy)]
pub struct LoopOptions {
    /// Loop reads bypass the page cache of the backing file (one cache, the
    /// block device's, instead of two).
    pub direct_io: bool,
    /// Logical block size; 0 keeps the kernel default (512).
    pub block_size: u32,
}

impl LoopDevice {
    /// Attaches a new read-only, autoclear loop device to `backing`.
    pub fn attach(backing: &File, backing_name: &Path, opts: LoopOptions) -> io::Result<Self> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")?;
        let mut name = [0u8; LO_NAME_SIZE];
        let bytes = backing_name.as_os_str().as_encoded_bytes();
        let n = bytes.len().min(LO_NAME_SIZE - 1);
        name[..n].copy_from_slice(&bytes[..n]);
        let mut flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        if opts.direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        let mut last_err = None;
        for _ in 0..CLAIM_ATTEMPTS {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument.
            let number =
                unsafe { loop_ctl_get_free(control.as_raw_fd()) }.map_err(io::Error::from)?;
            let number = u32::try_from(number).map_err(io::Error::other)?;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let dev = match OpenOptions::new().read(true).open(&path) {
                Ok(f) => f,
                // udev may not have created the node yet, or it was removed.
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            let config = LoopConfig {
                fd: backing.as_raw_fd() as u32,
                block_size: opts.block_size,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: flags,
                    lo_file_name: name,
                    lo_crypt_name: [0; LO_NAME_SIZE],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: `config` is a valid loop_config that outlives the call.
            match unsafe { loop_configure(dev.as_raw_fd(), &config) } {
                Ok(_) => {
                    return Ok(LoopDevice {
                        path,
                        number,
                        _fd: dev,
                    })
                }
                // Someone else configured it first: take the next free one.
                Err(nix::errno::Errno::EBUSY) => {
                    last_err = Some(io::Error::from(nix::errno::Errno::EBUSY));
                }
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "LOOP_CONFIGURE {}: {e}",
                        path.display()
                    )))
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no free loop device")))
    }

    /// Holds loop device `number`, configured by someone else (a previous
    /// run of this node), e.g. to switch its backing file.
    pub fn open_existing(number: u32) -> io::Result<Self> {
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let fd = OpenOptions::new().read(true).open(&path)?;
        Ok(LoopDevice {
            path,
            number,
            _fd: fd,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle on the same device (a dup of our fd), for ioctls off
    /// the thread that owns this one. The device stays until both are gone.
    pub fn try_clone(&self) -> io::Result<LoopDevice> {
        Ok(LoopDevice {
            path: self.path.clone(),
            number: self.number,
            _fd: self._fd.try_clone()?,
        })
    }

    pub fn number(&self) -> u32 {
        self.number
    }

    /// Switches the device to another backing file with `LOOP_CHANGE_FD`,
    /// without disturbing the filesystem mounted on it. The kernel allows
    /// this only for a read-only device and a new file of exactly the same
    /// size (else `EINVAL`); in-flight IO is drained first (the queue is
    /// frozen) and the old file is released.
    pub fn change_backing(&self, new: &File) -> io::Result<()> {
        // SAFETY: LOOP_CHANGE_FD takes the new backing fd by value; `new`
        // stays open for the call and the kernel takes its own reference.
        unsafe { loop_change_fd(self._fd.as_raw_fd(), new.as_raw_fd()) }
            .map(|_| ())
            .map_err(|e| io::Error::other(format!("LOOP_CHANGE_FD {}: {e}", self.path.display())))
    }

    /// Sets the device's readahead (the kernel default of 128 KiB splits
    /// large sequential reads into many small FUSE requests).
    pub fn set_read_ahead_kb(&self, kb: u32) -> io::Result<()> {
        std::fs::write(
            format!("/sys/block/loop{}/queue/read_ahead_kb", self.number),
            kb.to_string(),
        )
    }

    /// Drops our hold and waits (bounded) until the kernel has detached the
    /// device from `backing_name`, so callers can rely on nothing being left.
    /// Returns false if it is still attached (something else holds it open).
    pub fn release(self, backing_name: &Path, wait: Duration) -> bool {
        let number = self.number;
        drop(self);
        let deadline = Instant::now() + wait;
        loop {
            if !is_attached_to(number, backing_name) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether loop device `number` is attached to `backing_name` (as sysfs shows it).
pub fn is_attached_to(number: u32, backing_name: &Path) -> bool {
    backing_file(number).is_some_and(|b| b == backing_name)
}

/// The backing file of loop device `number` as sysfs shows it (the path at
/// attach time; the kernel's view after `LOOP_CHANGE_FD` too).
pub fn backing_file(number: u32) -> Option<PathBuf> {
    std::fs::read_to_string(format!("/sys/block/loop{number}/loop/backing_file"))
        .ok()
        .map(|s| PathBuf::from(s.trim_end()))
}

/// Loop devices whose backing file lies under `dir` (for leak checks).
pub fn attached_under(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(n) = name.to_str().and_then(|s| s.strip_prefix("loop")) else {
            continue;
        };
        let Ok(number) = n.parse::<u32>() else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            let backing = PathBuf::from(s.trim_end());
            if backing.starts_with(dir) {
                found.push((number, backing));
            }
        }
    }
    found
}
