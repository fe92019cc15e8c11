//! The fixed-size record at the very end of a blob; it locates the index.

use super::Fields;
use super::{
    entry_len, max_index_len, FieldsMut, FormatError, Sha256Digest, FOOTER_LEN, FOOTER_MAGIC,
    FORMAT_V1, FORMAT_VERSION, HEADER_LEN,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub version: u32,
    pub index_offset: u64,
    pub index_length: u64,
    /// sha256 of the index bytes: the layer's content anchor.
    pub index_digest: Sha256Digest,
}

impl Footer {
    /// Parses the last [`FOOTER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        if (bytes.len() as u64) < FOOTER_LEN {
            return Err(FormatError::TooSmall {
                len: bytes.len() as u64,
            });
        }
        let b = &bytes[bytes.len() - FOOTER_LEN as usize..];
        let mut r = Fields(b);
        let magic = r.array::<8>();
        if magic != FOOTER_MAGIC {
            return Err(FormatError::BadMagic {
                what: "footer",
                found: magic,
            });
        }
        let version = r.u32();
        if !(FORMAT_V1..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if r.u32() != 0 {
            return Err(FormatError::ReservedNotZero("footer.reserved"));
        }
        let index_offset = r.u64();
        let index_length = r.u64();
        let index_digest = r.array::<32>();
        if !(HEADER_LEN..=max_index_len(version)).contains(&index_length)
            || (index_length - HEADER_LEN) % entry_len(version) != 0
        {
            return Err(FormatError::BadIndexLength(index_length));
        }
        Ok(Footer {
            version,
            index_offset,
            index_length,
            index_digest,
        })
    }

    /// Checks that index and footer exactly end the blob.
    pub fn check_blob_len(&self, blob_len: u64) -> Result<(), FormatError> {
        if self.checked_blob_len() != Some(blob_len) {
            return Err(FormatError::IndexOutOfBounds {
                offset: self.index_offset,
                length: self.index_length,
                blob_len,
            });
        }
        Ok(())
    }

    fn checked_blob_len(&self) -> Option<u64> {
        self.index_offset
            .checked_add(self.index_length)
            .and_then(|e| e.checked_add(FOOTER_LEN))
    }

    /// Total blob length this footer describes (saturating: a parsed footer
    /// whose sum overflows fails [`check_blob_len`](Self::check_blob_len)).
    pub fn blob_len(&self) -> u64 {
        self.checked_blob_len().unwrap_or(u64::MAX)
    }

    /// The blob's tail (index and footer) as one range of the blob.
    pub fn tail_len(&self) -> u64 {
        self.index_length + FOOTER_LEN
    }

    pub fn to_bytes(&self) -> [u8; FOOTER_LEN as usize] {
        let mut out = [0u8; FOOTER_LEN as usize];
        let mut w = FieldsMut(&mut out[..]);
        w.put(&FOOTER_MAGIC);
        w.put(&self.version.to_le_bytes());
        w.put(&0u32.to_le_bytes());
        w.put(&self.index_offset.to_le_bytes());
        w.put(&self.index_length.to_le_bytes());
        w.put(&self.index_digest);
        out
    }
}
