//! Where each regular file's data lies in an EROFS image we built, and
//! which inode it is. The converter cuts chunks at these edges, so reading
//! one file fetches that file, and everything else (superblock, inodes,
//! directories, symlinks: the metadata every path lookup reads) is fetched
//! up front. A node maps its startup part's chunks to files with it, to
//! read them into the page cache ahead of the container (`device::warm`).
//!
//! Hand-written because no crate reads EROFS, and only a sliver of it is
//! needed: the images come from our own `mkfs.erofs` run (uncompressed,
//! `FLAT_PLAIN` and `FLAT_INLINE` inodes), and all this returns is block
//! ranges. Anything unexpected is an error: the converter then falls back
//! to plain fixed-size chunks, which are always correct, just less precise,
//! and a node does not warm the layer. On a node the image is verified but
//! its author untrusted: every read is bounds-checked and the walk bounded.

use std::collections::HashSet;
use std::fs::File;
use std::ops::Range;

use thiserror::Error;

use crate::format::ReadAt;

const SUPERBLOCK_OFFSET: u64 = 1024;
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
const BLOCK: u64 = 4096;
/// Inodes are addressed in 32-byte slots from the metadata area's start.
const INODE_SLOT: u64 = 32;
const DIRENT_LEN: usize = 12;
const S_IFMT: u16 = 0o170_000;
const S_IFDIR: u16 = 0o040_000;
const S_IFREG: u16 = 0o100_000;
const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 2;
/// Bounds on what a walk may visit, far above any real layer.
pub const MAX_INODES: usize = 16 << 20;
const MAX_DIR_BYTES: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum MapError {
    #[error("reading the image: {0}")]
    Io(#[from] std::io::Error),
    #[error("not an EROFS image this reader understands: {0}")]
    Unsupported(String),
}

/// The block ranges (as image byte ranges) of every regular file's data,
/// sorted; inline tails are not included (they live with the metadata).
pub fn data_ranges(image: &File) -> Result<Vec<Range<u64>>, MapError> {
    let size = image.metadata()?.len();
    let files = files(image, size, MAX_INODES)?;
    Ok(files.into_iter().map(|f| f.data).collect())
}

/// One regular file's whole data blocks in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileData {
    /// Its inode number (what the kernel's EROFS calls its `nid`, and its
    /// file handle holds).
    pub nid: u64,
    /// Its whole blocks, as image bytes (an inline tail is not included).
    pub data: Range<u64>,
}

/// Every regular file with whole data blocks in the `size` bytes of
/// `image`, sorted by where its data starts; a walk that would visit more
/// than `max_inodes` inodes is refused.
pub fn files(image: &impl ReadAt, size: u64, max_inodes: usize) -> Result<Vec<FileData>, MapError> {
    let (walker, root) = Walker::new(image, size, max_inodes)?;
    walker.walk(root)
}

struct Walker<'a, R> {
    image: &'a R,
    size: u64,
    meta: u64,
    max_inodes: usize,
    /// Directory bytes the walk may still read: a real image's directories
    /// take less room than the image, so an image whose directories all
    /// name the same huge blocks cannot make the walk read them over and
    /// over.
    dir_budget: std::cell::Cell<u64>,
}

struct Inode {
    mode: u16,
    layout: u16,
    size: u64,
    raw_blkaddr: u64,
    /// Where an inline tail starts (after the inode and its xattrs).
    tail_at: u64,
}

impl<'a, R: ReadAt> Walker<'a, R> {
    /// A walker of `image` from its superblock, and the root directory's
    /// inode number.
    fn new(image: &'a R, size: u64, max_inodes: usize) -> Result<(Self, u64), MapError> {
        let mut sb = [0u8; 128];
        image.read_exact_at(&mut sb, SUPERBLOCK_OFFSET)?;
        let magic = u32_at(&sb, 0);
        if magic != EROFS_MAGIC {
            return Err(MapError::Unsupported(format!("magic {magic:#x}")));
        }
        if sb[12] != 12 {
            return Err(MapError::Unsupported(format!("block size 2^{}", sb[12])));
        }
        let root = u64::from(u16::from_le_bytes([sb[14], sb[15]]));
        let walker = Walker {
            image,
            size,
            meta: u64::from(u32_at(&sb, 40)) * BLOCK,
            max_inodes,
            dir_budget: std::cell::Cell::new(size),
        };
        Ok((walker, root))
    }

    fn walk(&self, root: u64) -> Result<Vec<FileData>, MapError> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![root];
        while let Some(nid) = stack.pop() {
            if !seen.insert(nid) {
                continue;
            }
            if seen.len() > self.max_inodes {
                return Err(MapError::Unsupported("too many inodes".into()));
            }
            let inode = self.inode(nid)?;
            let kind = inode.mode & S_IFMT;
            if kind == S_IFREG {
                out.extend(self.blocks(&inode)?.map(|data| FileData { nid, data }));
            }
            if kind == S_IFDIR {
                let children = self.children(&inode)?;
                // Entries wait on the stack before `seen` weeds out those
                // named twice: bounded too, or directories naming one inode
                // over and over would fill memory.
                if stack.len() + children.len() > self.max_inodes {
                    return Err(MapError::Unsupported("too many directory entries".into()));
                }
                stack.extend(children);
            }
        }
        out.sort_by_key(|f| f.data.start);
        Ok(out)
    }

    fn inode(&self, nid: u64) -> Result<Inode, MapError> {
        let at = nid
            .checked_mul(INODE_SLOT)
            .and_then(|o| o.checked_add(self.meta))
            .filter(|&o| o.checked_add(64).is_some_and(|end| end <= self.size))
            .ok_or_else(|| MapError::Unsupported(format!("inode {nid} past the image")))?;
        let mut b = [0u8; 64];
        self.image.read_exact_at(&mut b, at)?;
        let format = u16::from_le_bytes([b[0], b[1]]);
        let xattr_count = u64::from(u16::from_le_bytes([b[2], b[3]]));
        let mode = u16::from_le_bytes([b[4], b[5]]);
        let extended = format & 1 == 1;
        let (size, inode_len) = if extended {
            (
                u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
                64,
            )
        } else {
            (u64::from(u32_at(&b, 8)), 32)
        };
        let xattrs = if xattr_count == 0 {
            0
        } else {
            12 + (xattr_count - 1) * 4
        };
        Ok(Inode {
            mode,
            layout: (format >> 1) & 7,
            size,
            raw_blkaddr: u64::from(u32_at(&b, 16)),
            tail_at: at + inode_len + xattrs,
        })
    }

    /// The inode's whole data blocks, as image bytes.
    fn blocks(&self, inode: &Inode) -> Result<Option<Range<u64>>, MapError> {
        let count = match inode.layout {
            LAYOUT_FLAT_PLAIN => inode.size.div_ceil(BLOCK),
            LAYOUT_FLAT_INLINE => inode.size / BLOCK,
            other => {
                return Err(MapError::Unsupported(format!("data layout {other}")));
            }
        };
        if count == 0 {
            return Ok(None);
        }
        let start = inode.raw_blkaddr * BLOCK;
        let end = count
            .checked_mul(BLOCK)
            .and_then(|len| start.checked_add(len))
            .filter(|&e| e <= self.size)
            .ok_or_else(|| MapError::Unsupported("data blocks past the image".into()))?;
        Ok(Some(start..end))
    }

    /// The inode numbers a directory names (without `.` and `..`).
    fn children(&self, dir: &Inode) -> Result<Vec<u64>, MapError> {
        if dir.size > MAX_DIR_BYTES {
            return Err(MapError::Unsupported("directory too large".into()));
        }
        let budget = self.dir_budget.get().checked_sub(dir.size).ok_or_else(|| {
            MapError::Unsupported("its directories take more room than the image".into())
        })?;
        self.dir_budget.set(budget);
        let mut data = vec![0u8; dir.size as usize];
        let full = match dir.layout {
            LAYOUT_FLAT_INLINE => (dir.size / BLOCK * BLOCK) as usize,
            _ => data.len(),
        };
        if full > 0 {
            self.image
                .read_exact_at(&mut data[..full], dir.raw_blkaddr * BLOCK)?;
        }
        if full < data.len() {
            self.image.read_exact_at(&mut data[full..], dir.tail_at)?;
        }
        let mut out = Vec::new();
        for block in data.chunks(BLOCK as usize) {
            if block.len() < DIRENT_LEN {
                return Err(MapError::Unsupported("short directory block".into()));
            }
            // The first entry's name offset says how many entries there are.
            let count = usize::from(u16::from_le_bytes([block[8], block[9]])) / DIRENT_LEN;
            if count == 0 || count * DIRENT_LEN > block.len() {
                return Err(MapError::Unsupported("bad directory block".into()));
            }
            let entries: Vec<&[u8]> = block[..count * DIRENT_LEN].chunks(DIRENT_LEN).collect();
            let name_at = |e: &[u8]| usize::from(u16::from_le_bytes([e[8], e[9]]));
            for (i, e) in entries.iter().enumerate() {
                let nid = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes"));
                // A name runs to the next one's start; the last one to the
                // block's end or its first NUL.
                let end = entries.get(i + 1).map_or(block.len(), |n| name_at(n));
                let name = block.get(name_at(e)..end).unwrap_or_default();
                let name = name.split(|&b| b == 0).next().unwrap_or_default();
                if name != b"." && name != b".." {
                    out.push(nid);
                }
            }
        }
        Ok(out)
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    /// `root` as an EROFS image in `dir`, as the converter builds it.
    fn mkfs(root: &Path, dir: &Path) -> PathBuf {
        let image = dir.join("img.erofs");
        let out = std::process::Command::new("mkfs.erofs")
            .args(["-E", "force-inode-extended"])
            .arg(&image)
            .arg(root)
            .output()
            .expect("mkfs.erofs is needed (erofs-utils; hack/install-deps.sh installs it)");
        assert!(out.status.success(), "{out:?}");
        image
    }

    /// Every regular file with whole blocks is found where its bytes are.
    #[test]
    fn finds_each_files_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        let files: Vec<(String, Vec<u8>)> = (0..20u32)
            .map(|i| {
                let len = 1000 + i as usize * 3001;
                let name = format!("sub/deeper/f{i}");
                (name, (0..len).map(|b| (b as u32 * 7 + i) as u8).collect())
            })
            .collect();
        for (name, data) in &files {
            std::fs::write(root.join(name), data).unwrap();
        }
        std::fs::write(root.join("tiny"), b"x").unwrap();
        let image = mkfs(&root, dir.path());
        let f = File::open(&image).unwrap();
        let ranges = data_ranges(&f).unwrap();
        let bytes = std::fs::read(&image).unwrap();
        for (name, data) in &files {
            let whole = data.len() / 4096 * 4096;
            if whole == 0 {
                continue;
            }
            let found = ranges.iter().any(|r| {
                let r = r.start as usize..r.end as usize;
                bytes.get(r.start..r.start + whole) == Some(&data[..whole])
            });
            assert!(found, "{name}: no range holds its blocks");
        }
    }

    #[test]
    fn refuses_what_is_not_erofs() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        assert!(matches!(data_ranges(&f), Err(MapError::Unsupported(_))));
    }

    /// Directories whose entries all name one inode leave `seen` small but
    /// would pile the entries up: refused once they outnumber the inodes
    /// a walk may visit.
    #[test]
    fn entries_naming_one_inode_over_and_over_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        for f in 0..500 {
            std::fs::write(root.join(format!("d/{f:0>40}")), b"").unwrap();
        }
        let image = mkfs(&root, dir.path());
        let f = File::open(&image).unwrap();
        let size = f.metadata().unwrap().len();
        let (walker, root_nid) = Walker::new(&f, size, MAX_INODES).unwrap();
        let d = walker.children(&walker.inode(root_nid).unwrap()).unwrap()[0];
        let d = walker.inode(d).unwrap();
        let one = walker.children(&d).unwrap()[0];
        assert!(files(&f, size, 100).is_err(), "500 files are more than 100");
        assert!(files(&f, size, 1000).is_ok());

        // Every entry of d's whole blocks names the same file.
        let mut bytes = std::fs::read(&image).unwrap();
        let start = (d.raw_blkaddr * BLOCK) as usize;
        let blocks = (d.size / BLOCK) as usize;
        assert!(blocks > 0, "d has whole blocks");
        for b in 0..blocks {
            let block = &mut bytes[start + b * BLOCK as usize..][..BLOCK as usize];
            let count = usize::from(u16::from_le_bytes([block[8], block[9]])) / DIRENT_LEN;
            for e in 0..count {
                block[e * DIRENT_LEN..e * DIRENT_LEN + 8].copy_from_slice(&one.to_le_bytes());
            }
        }
        let hostile = dir.path().join("hostile.erofs");
        std::fs::write(&hostile, &bytes).unwrap();
        let f = File::open(&hostile).unwrap();
        match files(&f, size, 100) {
            Err(MapError::Unsupported(why)) => assert!(why.contains("entries"), "{why}"),
            other => panic!("walked: {other:?}"),
        }
    }

    /// An image whose directories all name one big directory's blocks
    /// would make a walk read them once per directory: refused once the
    /// directories read exceed the image.
    #[test]
    fn directories_larger_than_the_image_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for d in 0..64 {
            std::fs::create_dir_all(root.join(format!("d{d}"))).unwrap();
        }
        // One directory of some 40 blocks of entries.
        for f in 0..2000 {
            std::fs::write(root.join(format!("d0/{f:0>40}")), b"").unwrap();
        }
        let image = mkfs(&root, dir.path());
        let f = File::open(&image).unwrap();
        let size = f.metadata().unwrap().len();
        assert!(
            files(&f, size, MAX_INODES).is_ok(),
            "the image as built walks"
        );

        // Every directory but the root gets d0's size and blocks.
        let (walker, root_nid) = Walker::new(&f, size, MAX_INODES).unwrap();
        let subdirs = walker.children(&walker.inode(root_nid).unwrap()).unwrap();
        let big = subdirs
            .iter()
            .map(|&nid| (nid, walker.inode(nid).unwrap()))
            .max_by_key(|(_, i)| i.size)
            .unwrap();
        // Its whole blocks only: a FLAT_PLAIN copy has no inline tail.
        let full = big.1.size / BLOCK * BLOCK;
        assert!(
            full * 64 > size,
            "the directories together outgrow the image"
        );
        let mut bytes = std::fs::read(&image).unwrap();
        for &nid in &subdirs {
            let at = (walker.meta + nid * INODE_SLOT) as usize;
            bytes[at..at + 2].copy_from_slice(&(LAYOUT_FLAT_PLAIN << 1 | 1).to_le_bytes());
            bytes[at + 8..at + 16].copy_from_slice(&full.to_le_bytes());
            bytes[at + 16..at + 20].copy_from_slice(&(big.1.raw_blkaddr as u32).to_le_bytes());
        }
        let hostile = dir.path().join("hostile.erofs");
        std::fs::write(&hostile, &bytes).unwrap();
        let f = File::open(&hostile).unwrap();
        match files(&f, size, MAX_INODES) {
            Err(MapError::Unsupported(why)) => assert!(why.contains("more room"), "{why}"),
            other => panic!("walked: {other:?}"),
        }
    }
}
