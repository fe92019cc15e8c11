//! The node's rules for committing a lazily attached layer
//! (docs/security.md), checked at every lazy Prepare and again when a
//! restart attaches the committed layers:
//!
//! - the layer has an anchor, or the operator allows unanchored (version 1)
//!   layers (`[remote] allow_unanchored_layers`);
//! - the snapshot containerd asks for (`containerd.io/snapshot.ref`) is the
//!   chain ID of its parent and the layer's diff_id, which is its anchor.
//!   containerd reuses a snapshot by that name without asking again (in any
//!   namespace), so a layer committed under another layer's name would
//!   decide what every later image of that name reads.
//!
//! The anchor itself is checked by the blockdev core on every attach: the
//! layer's index must hash to it.

use lazybd_blockdev::oci;

use super::{LazyLayers, Remote, RemoteError};
use crate::store::RemoteLayer;

impl<L: LazyLayers> Remote<L> {
    /// Whether `layer` may be committed as snapshot `target` on a parent
    /// whose chain ID is `parent` (`None`: the bottom layer).
    pub fn admit(
        &self,
        layer: &RemoteLayer,
        target: &str,
        parent: Option<&str>,
    ) -> Result<(), RemoteError> {
        self.anchored_or_allowed(layer)?;
        // Version 1 images used the blob digest as diff_id; it never equals
        // an anchor, so an unanchored layer cannot take an anchored name.
        let expected = oci::chain_id(parent, layer.diff_id());
        if expected != target {
            return Err(RemoteError::ChainMismatch {
                image_ref: layer.image_ref.clone(),
                layer: layer.digest.clone(),
                target: target.to_owned(),
                chain: format!(
                    "the chain ID of its parent ({}) and its diff_id {} is {expected}",
                    parent.unwrap_or("none"),
                    layer.diff_id()
                ),
            });
        }
        Ok(())
    }

    /// The part of [`admit`](Self::admit) that needs no snapshot name: a
    /// layer without an anchor only with `allow_unanchored_layers`.
    pub(super) fn anchored_or_allowed(&self, layer: &RemoteLayer) -> Result<(), RemoteError> {
        if layer.anchor.is_none() && !self.allow_unanchored {
            return Err(RemoteError::Unanchored {
                image_ref: layer.image_ref.clone(),
                layer: layer.digest.clone(),
            });
        }
        Ok(())
    }
}

/// The chain ID of the committed snapshot `key`, a Prepare's parent. A
/// lazily attached layer was committed under its chain ID (checked then).
/// Any other committed snapshot was named by containerd, which hands a
/// snapshotter the key `<namespace>/<n>/<name>` for the snapshot it calls
/// `<name>`: for a layer, its chain ID (containerd checked that layer's
/// diff_id when it unpacked it).
pub fn parent_chain_id(key: &str, lazily_attached: bool) -> &str {
    if lazily_attached {
        return key;
    }
    let mut parts = key.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ns), Some(n), Some(name))
            if !ns.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) =>
        {
            name
        }
        _ => key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::fake::{self, digest, FakeLayers, IMAGE};

    fn layer(anchor: Option<String>) -> RemoteLayer {
        RemoteLayer {
            image_ref: IMAGE.into(),
            digest: digest(1),
            blob_size: 8192,
            index_offset: 4096,
            index_length: 112,
            image_size: 1 << 20,
            anchor,
            source_diff_id: None,
        }
    }

    fn remote(allow_unanchored: bool) -> (tempfile::TempDir, Remote<FakeLayers>) {
        let dir = tempfile::tempdir().unwrap();
        let r = Remote::new(FakeLayers::default(), fake::registry_config(dir.path()))
            .with_unanchored_layers(allow_unanchored);
        (dir, r)
    }

    #[test]
    fn the_target_must_be_the_chain_id_of_the_parent_and_the_anchor() {
        let (_dir, r) = remote(false);
        let (anchor, base) = (digest(0xa1), digest(0xb0));
        let l = layer(Some(anchor.clone()));
        r.admit(&l, &anchor, None).unwrap();
        let on_base = oci::chain_id(Some(&base), &anchor);
        r.admit(&l, &on_base, Some(&base)).unwrap();
        // Another layer's name: refused, naming both.
        for (target, parent) in [
            (digest(0xee), None),
            (anchor.clone(), Some(base.as_str())),
            (on_base.clone(), None),
            (oci::chain_id(Some(&base), &digest(1)), Some(base.as_str())),
        ] {
            let e = r.admit(&l, &target, parent).unwrap_err();
            assert!(e.is_refusal() && !e.is_transient(), "{e}");
            assert!(
                e.to_string().contains(&target) && e.to_string().contains("chain ID"),
                "{e}"
            );
        }
    }

    #[test]
    fn unanchored_layers_need_the_opt_in_and_keep_to_their_blob_names() {
        let l = layer(None);
        let (_dir, strict) = remote(false);
        let e = strict.admit(&l, &l.digest, None).unwrap_err();
        assert!(matches!(e, RemoteError::Unanchored { .. }), "{e:?}");
        assert!(e.is_refusal());
        assert!(e.to_string().contains("allow_unanchored_layers"), "{e}");

        let (_dir, allowing) = remote(true);
        allowing.admit(&l, &l.digest, None).unwrap();
        // Never under an anchored layer's name.
        let e = allowing.admit(&l, &digest(0xa1), None).unwrap_err();
        assert!(matches!(e, RemoteError::ChainMismatch { .. }), "{e:?}");
    }

    #[test]
    fn parents_are_named_by_their_chain_ids() {
        let chain = digest(7);
        assert_eq!(parent_chain_id(&chain, true), chain);
        let backend = format!("k8s.io/12/{chain}");
        assert_eq!(parent_chain_id(&backend, false), chain);
        // A lazily attached layer's key is its name, whatever it looks like.
        assert_eq!(parent_chain_id(&backend, true), backend);
        for other in ["plain", "ns/x/name", "/1/name", "ns//name", "ns/1"] {
            assert_eq!(parent_chain_id(other, false), other);
        }
    }
}
