//! The part of the FUSE kernel ABI (`<linux/fuse.h>`) our filesystem
//! speaks: the request and reply structs of the opcodes we answer, the INIT
//! flags we ask for, and the resend notification. Layouts are the kernel's,
//! checked by the size tests below.

#![allow(dead_code)] // Kernel structs carry fields we never read.

/// The protocol we implement: 7.31 is the oldest with everything we ask
/// for (`FUSE_MAX_PAGES` 7.28, `max_pages` in the INIT reply).
pub const KERNEL_VERSION: u32 = 7;
pub const MIN_MINOR: u32 = 31;
/// What we answer INIT with (the kernel uses the lower of ours and its own).
pub const OUR_MINOR: u32 = 38;

pub const ROOT_ID: u64 = 1;

pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
}

pub mod init_flags {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const ASYNC_DIO: u64 = 1 << 15;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const INIT_EXT: u64 = 1 << 30;
    /// Offered by kernels (6.9+) that re-queue requests on
    /// [`NOTIFY_RESEND`](super::NOTIFY_RESEND); in `flags2`.
    pub const HAS_RESEND: u64 = 1 << 39;
}

/// `fuse_notify_code`: re-queue every request a daemon read but did not
/// answer (Linux 6.9+).
pub const NOTIFY_RESEND: i32 = 7;

/// `FUSE_DEV_IOC_CLONE`: `_IOR(229, 0, uint32_t)`.
pub const DEV_IOC_MAGIC: u8 = 229;

pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const DT_DIR: u32 = 4;
pub const DT_REG: u32 = 8;

pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
    pub padding: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct OutHeader {
    pub len: u32,
    pub error: i32,
    pub unique: u64,
}

/// INIT as kernels since 7.36 send it (older ones send the first 16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub flags2: u32,
    pub unused: [u32; 11],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub map_alignment: u16,
    pub flags2: u32,
    pub unused: [u32; 7],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct AttrOut {
    pub attr_valid: u64,
    pub attr_valid_nsec: u32,
    pub dummy: u32,
    pub attr: Attr,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenIn {
    pub flags: u32,
    pub open_flags: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOut {
    pub fh: u64,
    pub open_flags: u32,
    pub backing_id: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Kstatfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub padding: u32,
    pub spare: [u32; 6],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Dirent {
    pub ino: u64,
    pub off: u64,
    pub namelen: u32,
    pub typ: u32,
}

/// Plain old data: every bit pattern is a valid value and there is no
/// padding the compiler could leave uninitialised (checked by the size
/// tests: each struct's size is the sum of its fields').
///
/// # Safety
/// Implement only for `#[repr(C)]` structs of integers without padding.
pub unsafe trait Pod: Copy + Default {
    /// The value's bytes, as the kernel reads them.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: Pod types have no padding and are plain integers.
        unsafe { std::slice::from_raw_parts(self as *const Self as *const u8, size_of::<Self>()) }
    }

    /// Reads a value from the start of `bytes`; a short slice is
    /// zero-extended (older kernels send shorter INIT structs).
    fn read_from(bytes: &[u8]) -> Self {
        let mut v = Self::default();
        let n = bytes.len().min(size_of::<Self>());
        // SAFETY: any bytes form a valid Pod value; n fits both buffers.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), &mut v as *mut Self as *mut u8, n);
        }
        v
    }
}

// SAFETY: all #[repr(C)] structs of integers without padding (size tests).
unsafe impl Pod for InHeader {}
unsafe impl Pod for OutHeader {}
unsafe impl Pod for InitIn {}
unsafe impl Pod for InitOut {}
unsafe impl Pod for Attr {}
unsafe impl Pod for EntryOut {}
unsafe impl Pod for AttrOut {}
unsafe impl Pod for OpenIn {}
unsafe impl Pod for OpenOut {}
unsafe impl Pod for ReadIn {}
unsafe impl Pod for Kstatfs {}
unsafe impl Pod for Dirent {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_kernel_headers() {
        assert_eq!(size_of::<InHeader>(), 40);
        assert_eq!(size_of::<OutHeader>(), 16);
        assert_eq!(size_of::<InitIn>(), 64);
        assert_eq!(size_of::<InitOut>(), 64);
        assert_eq!(size_of::<Attr>(), 88);
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<AttrOut>(), 104);
        assert_eq!(size_of::<OpenIn>(), 8);
        assert_eq!(size_of::<OpenOut>(), 16);
        assert_eq!(size_of::<ReadIn>(), 40);
        assert_eq!(size_of::<Kstatfs>(), 80);
        assert_eq!(size_of::<Dirent>(), 24);
    }

    #[test]
    fn short_input_is_zero_extended() {
        let init = InitIn::read_from(&[7, 0, 0, 0, 31, 0, 0, 0]);
        assert_eq!((init.major, init.minor, init.flags2), (7, 31, 0));
    }
}
