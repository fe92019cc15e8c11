//! The mounts containerd performs for a snapshot, as its overlayfs
//! snapshotter returns them: a bind mount when there is a single directory,
//! otherwise overlayfs with the parents as lower dirs (top first).

use std::path::{Path, PathBuf};

use containerd_snapshots::api::types::Mount;

/// An active snapshot: writable.
pub fn active(fs: &Path, work: &Path, lowers: &[PathBuf]) -> Mount {
    if lowers.is_empty() {
        return bind(fs, false);
    }
    Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options: vec![
            "index=off".into(),
            format!("workdir={}", work.display()),
            format!("upperdir={}", fs.display()),
            lowerdir(lowers),
        ],
    }
}

/// A view: read-only. `own` is the view's (empty) directory, used when it
/// has no parent.
pub fn view(own: &Path, lowers: &[PathBuf]) -> Mount {
    match lowers {
        [] => bind(own, true),
        [one] => bind(one, true),
        _ => Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![lowerdir(lowers)],
        },
    }
}

fn bind(source: &Path, read_only: bool) -> Mount {
    Mount {
        r#type: "bind".into(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![if read_only { "ro" } else { "rw" }.into(), "rbind".into()],
    }
}

fn lowerdir(lowers: &[PathBuf]) -> String {
    let dirs: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    format!("lowerdir={}", dirs.join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let m = active(Path::new("/s/2/fs"), Path::new("/s/2/work"), &[]);
        assert_eq!(
            (m.r#type.as_str(), m.options.as_slice()),
            ("bind", &["rw".to_string(), "rbind".into()][..])
        );
        let m = active(
            Path::new("/s/3/fs"),
            Path::new("/s/3/work"),
            &["/s/2/fs".into(), "/s/1/fs".into()],
        );
        assert_eq!(m.r#type, "overlay");
        assert!(m.options.contains(&"lowerdir=/s/2/fs:/s/1/fs".to_string()));
        assert!(m.options.contains(&"upperdir=/s/3/fs".to_string()));
        let m = view(Path::new("/s/4/fs"), &["/s/1/fs".into()]);
        assert_eq!((m.r#type.as_str(), m.source.as_str()), ("bind", "/s/1/fs"));
        assert_eq!(m.options[0], "ro");
    }
}
