//! Builds a reproducible EROFS image from a directory with mkfs.erofs.
//!
//! mkfs.erofs (erofs-utils 1.5, what Debian ships) is the reference builder;
//! writing EROFS ourselves would duplicate it for no gain. It is not
//! reproducible on its own: the superblock records the build time, and
//! "compact" inodes take their mtime from it. We ask for extended inodes
//! only (each carries its own mtime) and then set the build time to zero and
//! recompute the superblock checksum. `-T` is no help: it overrides every
//! file's mtime. The UUID is derived from the source layer digest.
//!
//! `noinline_data` keeps file contents out of the inode blocks: without it
//! a small file's bytes sit inside the metadata, which then is most of the
//! image's small-file data (4.5 MB of the python image's base layer instead
//! of 0.15 MB). Kept apart, the metadata every path lookup reads is small
//! enough to fetch whole when a layer is attached (docs/format.md), and a
//! file read fetches that file.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use thiserror::Error;

const SUPERBLOCK_OFFSET: u64 = 1024;
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
const FEATURE_COMPAT_SB_CHKSUM: u32 = 1;
/// The checksum covers the rest of the first 4 KiB block from the superblock on.
const CHECKSUMMED_LEN: usize = 4096 - SUPERBLOCK_OFFSET as usize;
const BUILD_TIME_AT: usize = 24;
const BUILD_TIME_NSEC_AT: usize = 32;

#[derive(Debug, Error)]
pub enum ErofsError {
    #[error("running mkfs.erofs (is erofs-utils installed?): {0}")]
    Spawn(#[source] io::Error),
    #[error("mkfs.erofs failed ({status}): {stderr}")]
    Mkfs { status: String, stderr: String },
    #[error("normalizing the EROFS superblock of {path}: {reason}")]
    Superblock { path: String, reason: String },
}

/// Builds `image` from `dir`. `uuid_seed` (e.g. the layer diff_id) fixes the UUID.
pub fn build_image(dir: &Path, image: &Path, uuid_seed: &str) -> Result<(), ErofsError> {
    let out = Command::new("mkfs.erofs")
        .arg("-E")
        .arg("force-inode-extended,noinline_data")
        .arg("--preserve-mtime")
        .arg(format!("-U{}", uuid_from(uuid_seed)))
        .arg(image)
        .arg(dir)
        .output()
        .map_err(ErofsError::Spawn)?;
    if !out.status.success() {
        return Err(ErofsError::Mkfs {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    zero_build_time(image).map_err(|reason| ErofsError::Superblock {
        path: image.display().to_string(),
        reason,
    })
}

fn uuid_from(seed: &str) -> String {
    let h = hex::encode(&crate::format::sha256(seed.as_bytes())[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn zero_build_time(image: &Path) -> Result<(), String> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| e.to_string())?;
    let mut sb = vec![0u8; CHECKSUMMED_LEN];
    f.read_exact_at(&mut sb, SUPERBLOCK_OFFSET)
        .map_err(|e| e.to_string())?;
    let word =
        |sb: &[u8], at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().expect("4 bytes"));
    if word(&sb, 0) != EROFS_MAGIC {
        return Err(format!("bad magic {:#x}", word(&sb, 0)));
    }
    sb[BUILD_TIME_AT..BUILD_TIME_AT + 8].fill(0);
    sb[BUILD_TIME_NSEC_AT..BUILD_TIME_NSEC_AT + 4].fill(0);
    if word(&sb, 8) & FEATURE_COMPAT_SB_CHKSUM != 0 {
        sb[4..8].fill(0);
        let crc = crc32c_raw(!0, &sb);
        sb[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    f.write_all_at(&sb, SUPERBLOCK_OFFSET)
        .map_err(|e| e.to_string())?;
    f.sync_all().map_err(|e| e.to_string())
}

/// CRC32C without the final inversion, as erofs-utils and the kernel
/// (`crc32c(~0, sb, len)`) compute it; 3 KiB once per layer needs no table.
fn crc32c_raw(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ if crc & 1 == 1 { 0x82F6_3B78 } else { 0 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // CRC-32C("123456789") = 0xE3069283 with the usual final inversion.
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn uuid_is_stable_and_well_formed() {
        let u = uuid_from("sha256:abc");
        assert_eq!(u, uuid_from("sha256:abc"));
        assert_eq!(u.len(), 36);
        assert_ne!(u, uuid_from("sha256:abd"));
    }
}
