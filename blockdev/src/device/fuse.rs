//! The FUSE filesystem: one flat directory with one read-only file per
//! attached layer, whose bytes are the layer's uncompressed EROFS image.
//!
//! Reads whose chunks are all cached are answered on the FUSE thread with a
//! `pread` of the cache file. Any other read is moved to the tokio runtime
//! together with its `Reply`, so a slow or dead source never blocks the FUSE
//! threads; the fetcher's read deadline bounds every such read.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, Request,
};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::layer::LazyLayer;

/// Attributes never change for an inode (a layer's image is immutable).
const ATTR_TTL: Duration = Duration::from_secs(3600);
/// Names come and go with attach/detach, and a re-attached layer gets a new
/// inode: never let the kernel cache a name.
const ENTRY_TTL: Duration = Duration::ZERO;
/// Largest read the kernel sends; with FUSE_MAX_PAGES it honours up to 1 MiB.
const MAX_READAHEAD: u32 = 1 << 20;

struct LayerFile {
    name: OsString,
    layer: Arc<LazyLayer>,
    attr: FileAttr,
}

#[derive(Default)]
struct Files {
    by_ino: HashMap<u64, Arc<LayerFile>>,
    by_name: HashMap<OsString, u64>,
    next_ino: u64,
}

/// The directory's contents, shared by the FUSE threads and the manager.
pub struct LayerFiles {
    files: RwLock<Files>,
    runtime: Handle,
    created: SystemTime,
}

impl LayerFiles {
    pub fn new(runtime: Handle) -> Arc<Self> {
        Arc::new(LayerFiles {
            files: RwLock::new(Files {
                next_ino: 2,
                ..Files::default()
            }),
            runtime,
            created: SystemTime::now(),
        })
    }

    /// Adds a file named `name` serving `layer`; fails if the name is taken.
    pub fn add(&self, name: &str, layer: Arc<LazyLayer>) -> io::Result<()> {
        let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
        if files.by_name.contains_key(OsStr::new(name)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("layer file {name} already exists"),
            ));
        }
        let ino = files.next_ino;
        files.next_ino += 1;
        let size = layer.image_size();
        let attr = FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::RegularFile,
            perm: 0o444,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        files.by_name.insert(name.into(), ino);
        files.by_ino.insert(
            ino,
            Arc::new(LayerFile {
                name: name.into(),
                layer,
                attr,
            }),
        );
        Ok(())
    }

    pub fn remove(&self, name: &str) {
        let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
        if let Some(ino) = files.by_name.remove(OsStr::new(name)) {
            files.by_ino.remove(&ino);
        }
    }

    fn by_ino(&self, ino: INodeNo) -> Option<Arc<LayerFile>> {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        files.by_ino.get(&ino.0).cloned()
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

struct LayerFs(Arc<LayerFiles>);

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let readahead = config
            .set_max_readahead(MAX_READAHEAD)
            .map_or_else(|max| max, |_| MAX_READAHEAD);
        // Readahead requests are "background" requests; the default of 16 in
        // flight starves a fast sequential reader.
        let _ = config.set_max_background(64);
        // With loop direct IO, the loop device's reads become direct reads of
        // our file; async DIO lets the kernel keep several in flight instead
        // of one synchronous request at a time.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            debug!("fuse init: kernel lacks {missing:?}");
        }
        debug!("fuse init: max_readahead {readahead}");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let files = self.0.files.read().unwrap_or_else(|e| e.into_inner());
        match files
            .by_name
            .get(name)
            .and_then(|ino| files.by_ino.get(ino))
        {
            Some(f) => reply.entry(&ENTRY_TTL, &f.attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            return reply.attr(&ATTR_TTL, &self.0.root_attr());
        }
        match self.0.by_ino(ino) {
            Some(f) => reply.attr(&ATTR_TTL, &f.attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.0.by_ino(ino).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // The image never changes: keep its pages across opens.
        reply.opened(FileHandle(ino.0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(file) = self.0.by_ino(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut reply = Some(reply);
        READ_BUF.with_borrow_mut(|buf| {
            if let Some(result) = file.layer.read_cached(offset, size, buf) {
                let data = result.as_ref().map(|&n| &buf[..n]);
                send(&file, offset, data, reply.take().expect("unanswered"));
            }
        });
        if let Some(reply) = reply {
            self.0.runtime.spawn(async move {
                let result = file.layer.read(offset, size).await;
                send(&file, offset, result.as_deref(), reply);
            });
        }
    }

    /// Read-only files have nothing to flush or sync; the loop driver and
    /// `close(2)` ask anyway, and fuser's default answers ENOSYS with a
    /// warning each time.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries: Vec<(u64, FileType, OsString)> = vec![
            (1, FileType::Directory, ".".into()),
            (1, FileType::Directory, "..".into()),
        ];
        {
            let files = self.0.files.read().unwrap_or_else(|e| e.into_inner());
            let mut names: Vec<_> = files
                .by_ino
                .values()
                .map(|f| (f.attr.ino.0, f.name.clone()))
                .collect();
            names.sort();
            entries.extend(
                names
                    .into_iter()
                    .map(|(i, n)| (i, FileType::RegularFile, n)),
            );
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

thread_local! {
    /// Each FUSE thread's buffer for reads served from the cache.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn send(
    file: &LayerFile,
    offset: u64,
    result: Result<&[u8], &crate::fetch::ReadError>,
    reply: ReplyData,
) {
    match result {
        Ok(data) => reply.data(data),
        Err(e) => {
            // The fetcher already logged the cause in full; this line ties it
            // to the read the kernel saw fail.
            warn!(
                "EIO for read of {} at offset {offset}: {e}",
                file.name.to_string_lossy()
            );
            reply.error(Errno::EIO);
        }
    }
}

/// A mounted [`LayerFiles`] directory; unmounted by [`FuseMount::unmount`].
pub struct FuseMount {
    session: BackgroundSession,
    mountpoint: PathBuf,
}

impl FuseMount {
    pub fn mount(mountpoint: &Path, files: Arc<LayerFiles>, threads: usize) -> io::Result<Self> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName("lazybd".into()),
            MountOption::Subtype("lazybd".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        config.n_threads = Some(threads.max(1));
        config.clone_fd = threads > 1;
        let session = fuser::Session::new(LayerFs(files), mountpoint, &config)?.spawn()?;
        Ok(FuseMount {
            session,
            mountpoint: mountpoint.to_owned(),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn unmount(self) -> io::Result<()> {
        self.session.umount_and_join()
    }
}
