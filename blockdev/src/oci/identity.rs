//! What a layer *is* on a node, as opposed to where its bytes are fetched
//! from: [`LayerId`].
//!
//! A blob digest only says what to ask a registry, mirror, super node or
//! peer for; any of them may answer with other, self-consistent bytes (see
//! docs/security.md). A version 2 or 3 layer's identity is its **anchor**, the
//! sha256 of its index, which the image's manifest carries and the node
//! checks before it uses a byte of the layer; every chunk is then checked
//! against that index. So two images that name one blob digest with
//! different anchors never share an attachment, cache, saved index or
//! trace, and two blobs with one anchor have the same content and may.
//!
//! Version 1 layers have no anchor; a node attaches them only when its
//! operator allows it, under their blob digest in a namespace of their own
//! (`unanchored:`), which can never equal an anchored identity.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{digest_hex, OciError};

/// Prefix of the identities of unanchored (version 1) layers.
const UNANCHORED: &str = "unanchored:";

/// A layer's identity on a node. Its text form ([`as_str`](Self::as_str)) is
/// the anchor (`sha256:<hex>`) of an anchored layer, or `unanchored:` and the
/// blob digest of an unanchored one; that is how it appears in JSON, logs
/// and startup traces.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LayerId(String);

impl LayerId {
    /// The identity of the layer whose index hashes to `anchor`.
    pub fn anchored(anchor: &str) -> Result<Self, OciError> {
        digest_hex(anchor)?;
        Ok(LayerId(anchor.to_owned()))
    }

    /// The identity of an unanchored (version 1) layer, by its blob digest.
    pub fn unanchored(blob_digest: &str) -> Result<Self, OciError> {
        digest_hex(blob_digest)?;
        Ok(LayerId(format!("{UNANCHORED}{blob_digest}")))
    }

    /// The identity of blob `blob_digest` whose descriptor carries `anchor`
    /// (`None`: unanchored). Both must be valid digests.
    pub fn of(blob_digest: &str, anchor: Option<&str>) -> Result<Self, OciError> {
        digest_hex(blob_digest)?;
        match anchor {
            Some(a) => Self::anchored(a),
            None => Self::unanchored(blob_digest),
        }
    }

    /// Reads the text form back.
    pub fn parse(text: &str) -> Result<Self, OciError> {
        match text.strip_prefix(UNANCHORED) {
            Some(blob) => Self::unanchored(blob),
            None => Self::anchored(text),
        }
    }

    /// `sha256:<hex>` of the index, for an anchored layer.
    pub fn anchor(&self) -> Option<&str> {
        (!self.0.starts_with(UNANCHORED)).then_some(self.0.as_str())
    }

    /// The blob digest an unanchored layer is known by.
    pub fn unanchored_blob(&self) -> Option<&str> {
        self.0.strip_prefix(UNANCHORED)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A file name for the layer's cache directory, FUSE file and mount
    /// point: `sha256-<hex>` (anchored) or `unanchored-sha256-<hex>`. Only
    /// lowercase hex, letters and `-`: never a path outside its directory,
    /// and safe in overlayfs options.
    pub fn file_name(&self) -> String {
        self.0.replace(':', "-")
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for LayerId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for LayerId {
    type Error = OciError;

    fn try_from(text: String) -> Result<Self, OciError> {
        Self::parse(&text)
    }
}

impl From<LayerId> for String {
    fn from(id: LayerId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::digest_of;

    #[test]
    fn anchored_and_unanchored_identities_never_meet() {
        let d = digest_of(b"blob");
        let anchored = LayerId::anchored(&d).unwrap();
        let unanchored = LayerId::unanchored(&d).unwrap();
        assert_ne!(anchored, unanchored);
        assert_ne!(anchored.file_name(), unanchored.file_name());
        assert_eq!(anchored.anchor(), Some(d.as_str()));
        assert_eq!(unanchored.anchor(), None);
        assert_eq!(LayerId::of(&d, None).unwrap(), unanchored);
        assert_eq!(LayerId::of(&digest_of(b"x"), Some(&d)).unwrap(), anchored);
        for id in [&anchored, &unanchored] {
            assert_eq!(&LayerId::parse(id.as_str()).unwrap(), id);
            let json = serde_json::to_string(id).unwrap();
            assert_eq!(&serde_json::from_str::<LayerId>(&json).unwrap(), id);
        }
        assert_eq!(
            unanchored.file_name(),
            format!("unanchored-sha256-{}", &d[7..])
        );
    }

    #[test]
    fn only_valid_digests_make_identities() {
        for bad in [
            "",
            "sha256:../../etc",
            "unanchored:",
            "unanchored:sha256:../x",
            "unanchored:unanchored:sha256:00",
            "md5:abcd",
        ] {
            assert!(LayerId::parse(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<LayerId>(&format!("{bad:?}")).is_err());
        }
        assert!(LayerId::anchored(&format!("sha256:{}", "A".repeat(64))).is_err());
        // The blob digest is checked even when the anchor names the layer.
        assert!(LayerId::of("sha256:../../x", Some(&crate::oci::digest_of(b"i"))).is_err());
    }
}
