//! Answering one request: the opcodes of a flat, read-only directory.
//!
//! Reads whose chunks are all cached are answered on the FUSE thread with a
//! `pread` of the cache file. Any other read moves to the tokio runtime with
//! its channel, so a slow or dead source never blocks the FUSE threads; the
//! fetcher's read deadline bounds every such read. Every opcode we do not
//! implement gets ENOSYS, which the kernel remembers for most of them.

use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::abi::{
    self, opcode, AttrOut, Dirent, EntryOut, InHeader, Kstatfs, OpenIn, OpenOut, Pod, ReadIn,
};
use super::channel::Channel;
use super::files::{Known, LayerFile, LayerFiles, Parked};

/// Attributes never change for an inode (a layer's image is immutable).
const ATTR_TTL: Duration = Duration::from_secs(3600);
/// Names come and go with attach and detach: the kernel never caches a name.
const ENTRY_TTL: Duration = Duration::ZERO;

thread_local! {
    /// Each FUSE thread's buffer for reads served from the cache.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Answers the request in `req` (one read from `ch`).
pub(super) fn dispatch(files: &LayerFiles, ch: &Arc<Channel>, req: &[u8]) {
    if req.len() < size_of::<InHeader>() {
        warn!("FUSE request of {} bytes: shorter than a header", req.len());
        return;
    }
    let h = InHeader::read_from(req);
    let arg = &req[size_of::<InHeader>()..req.len().min(h.len as usize)];
    let reply = Reply {
        ch,
        unique: h.unique,
    };
    match h.opcode {
        opcode::LOOKUP => lookup(files, &reply, h.nodeid, arg),
        opcode::GETATTR => {
            if h.nodeid == abi::ROOT_ID {
                return reply.attr(&files.root_attr());
            }
            match known(files, &h, req, ch) {
                Known::File(f) => reply.attr(&f.attr),
                Known::Parked => {}
                Known::Unknown => reply.error(libc::ENOENT),
            }
        }
        opcode::OPEN => {
            match known(files, &h, req, ch) {
                Known::File(_) => {}
                Known::Parked => return,
                Known::Unknown => return reply.error(libc::ENOENT),
            }
            if OpenIn::read_from(arg).flags as i32 & libc::O_ACCMODE != libc::O_RDONLY {
                return reply.error(libc::EROFS);
            }
            // The image never changes: keep its pages across opens.
            reply.ok(&OpenOut {
                fh: h.nodeid,
                open_flags: abi::FOPEN_KEEP_CACHE,
                backing_id: 0,
            });
        }
        opcode::READ => {
            let f = match known(files, &h, req, ch) {
                Known::File(f) => f,
                Known::Parked => return,
                Known::Unknown => return reply.error(libc::EIO),
            };
            let r = ReadIn::read_from(arg);
            read(files, ch, h.unique, f, r.offset, r.size);
        }
        opcode::OPENDIR => {
            if h.nodeid != abi::ROOT_ID {
                return reply.error(libc::ENOTDIR);
            }
            reply.ok(&OpenOut::default());
        }
        opcode::READDIR => {
            if h.nodeid != abi::ROOT_ID {
                return reply.error(libc::ENOTDIR);
            }
            let r = ReadIn::read_from(arg);
            reply.data(&readdir(files, r.offset, r.size as usize));
        }
        opcode::RELEASE | opcode::RELEASEDIR | opcode::DESTROY => reply.empty(),
        // Read-only files have nothing to flush or sync; the loop driver
        // and close(2) ask anyway.
        opcode::FLUSH | opcode::FSYNC => reply.empty(),
        opcode::STATFS => reply.ok(&Kstatfs {
            bsize: 4096,
            frsize: 4096,
            namelen: 255,
            ..Kstatfs::default()
        }),
        // No reply: the kernel expects none.
        opcode::FORGET | opcode::BATCH_FORGET => {}
        // Reads end by themselves within the read deadline; ENOSYS tells
        // the kernel to stop sending interrupts.
        opcode::INTERRUPT => reply.error(libc::ENOSYS),
        opcode::INIT => {
            warn!("FUSE INIT on an initialised session; ignored");
            reply.error(libc::EIO);
        }
        other => {
            debug!("FUSE opcode {other}: not implemented");
            reply.error(libc::ENOSYS);
        }
    }
}

fn known(files: &LayerFiles, h: &InHeader, req: &[u8], ch: &Arc<Channel>) -> Known {
    let known = files.find_or_park(h.nodeid, req, ch);
    if let Known::Parked = known {
        debug!(
            "inode {:#x}: request {} parked until its layer is back",
            h.nodeid, h.opcode
        );
    }
    known
}

fn lookup(files: &LayerFiles, reply: &Reply, parent: u64, name: &[u8]) {
    if parent != abi::ROOT_ID {
        return reply.error(libc::ENOENT);
    }
    let name = name.split(|&b| b == 0).next().unwrap_or_default();
    match files.by_name(name) {
        Some(f) => reply.ok(&EntryOut {
            nodeid: f.attr.ino,
            generation: f.generation,
            entry_valid: ENTRY_TTL.as_secs(),
            attr_valid: ATTR_TTL.as_secs(),
            attr: f.attr,
            ..EntryOut::default()
        }),
        None => reply.error(libc::ENOENT),
    }
}

fn read(
    files: &LayerFiles,
    ch: &Arc<Channel>,
    unique: u64,
    file: Arc<LayerFile>,
    offset: u64,
    size: u32,
) {
    let mut served = false;
    READ_BUF.with_borrow_mut(|buf| {
        if let Some(result) = file.layer.read_cached(offset, size, buf) {
            served = true;
            let data = result.as_ref().map(|&n| &buf[..n]);
            send_read(ch, unique, &file, offset, data);
        }
    });
    if !served {
        let ch = ch.clone();
        files.runtime.spawn(async move {
            let result = file.layer.read(offset, size).await;
            send_read(&ch, unique, &file, offset, result.as_deref());
        });
    }
}

fn send_read(
    ch: &Channel,
    unique: u64,
    file: &LayerFile,
    offset: u64,
    result: Result<&[u8], &crate::fetch::ReadError>,
) {
    let reply = Reply { ch, unique };
    match result {
        Ok(data) => reply.data(data),
        Err(e) => {
            // The fetcher already logged the cause in full; this line ties it
            // to the read the kernel saw fail.
            warn!(
                "EIO for read of {} at offset {offset}: {e}",
                file.name.to_string_lossy()
            );
            reply.error(libc::EIO);
        }
    }
}

/// Directory entries from entry `offset` on, as many as fit in `size` bytes.
fn readdir(files: &LayerFiles, offset: u64, size: usize) -> Vec<u8> {
    let mut entries = vec![
        (abi::ROOT_ID, abi::DT_DIR, std::ffi::OsString::from(".")),
        (abi::ROOT_ID, abi::DT_DIR, "..".into()),
    ];
    entries.extend(files.list().into_iter().map(|(i, n)| (i, abi::DT_REG, n)));
    let mut out = Vec::new();
    for (i, (ino, typ, name)) in entries.into_iter().enumerate().skip(offset as usize) {
        let name = name.as_bytes();
        let len = (size_of::<Dirent>() + name.len()).next_multiple_of(8);
        if out.len() + len > size {
            break;
        }
        let d = Dirent {
            ino,
            off: i as u64 + 1,
            namelen: name.len() as u32,
            typ,
        };
        out.extend_from_slice(d.as_bytes());
        out.extend_from_slice(name);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

/// A parked request whose layer did not come back.
pub(super) fn fail_parked(p: &Parked) {
    let h = InHeader::read_from(&p.request);
    let reply = Reply {
        ch: &p.channel,
        unique: h.unique,
    };
    reply.error(if h.opcode == opcode::READ {
        libc::EIO
    } else {
        libc::ENOENT
    });
}

/// The answer to one request.
struct Reply<'a> {
    ch: &'a Channel,
    unique: u64,
}

impl Reply<'_> {
    fn send(&self, error: i32, parts: &[&[u8]]) {
        if let Err(e) = self.ch.send(self.unique, error, parts) {
            // ENOENT: the request was interrupted or resent meanwhile.
            if e.raw_os_error() != Some(libc::ENOENT) {
                warn!("FUSE reply to request {}: {e}", self.unique);
            }
        }
    }

    fn error(&self, errno: i32) {
        self.send(-errno, &[]);
    }

    fn empty(&self) {
        self.send(0, &[]);
    }

    fn ok<T: Pod>(&self, v: &T) {
        self.send(0, &[v.as_bytes()]);
    }

    fn data(&self, data: &[u8]) {
        self.send(0, &[data]);
    }

    fn attr(&self, attr: &abi::Attr) {
        self.ok(&AttrOut {
            attr_valid: ATTR_TTL.as_secs(),
            attr: *attr,
            ..AttrOut::default()
        });
    }
}
