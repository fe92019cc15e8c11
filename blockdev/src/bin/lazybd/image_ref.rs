//! How the CLI names an image: `oci:DIR[:TAG]`, an existing OCI layout
//! directory (`DIR` or `DIR:TAG`), or a registry reference.

use std::path::{Path, PathBuf};

pub enum ImageRef {
    Layout { dir: PathBuf, tag: Option<String> },
    Registry(String),
}

impl ImageRef {
    pub fn parse(s: &str) -> ImageRef {
        if let Some(rest) = s.strip_prefix("oci:") {
            return split_tag(rest);
        }
        let is_layout = |p: &Path| p.join("oci-layout").is_file();
        if is_layout(Path::new(s)) {
            return ImageRef::Layout {
                dir: s.into(),
                tag: None,
            };
        }
        if let Some((dir, tag)) = s.rsplit_once(':') {
            if is_layout(Path::new(dir)) {
                return ImageRef::Layout {
                    dir: dir.into(),
                    tag: Some(tag.to_owned()),
                };
            }
        }
        ImageRef::Registry(s.to_owned())
    }
}

/// `DIR:TAG` splits at the last colon when what follows looks like a tag
/// (no slash), so directories with colons still work without a tag.
fn split_tag(s: &str) -> ImageRef {
    match s.rsplit_once(':') {
        Some((dir, tag)) if !tag.is_empty() && !tag.contains('/') => ImageRef::Layout {
            dir: dir.into(),
            tag: Some(tag.to_owned()),
        },
        _ => ImageRef::Layout {
            dir: s.into(),
            tag: None,
        },
    }
}
