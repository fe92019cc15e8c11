//! Shared harness for the end-to-end tests: real daemons on private paths.
//!
//! - [`daemon`], [`serve`]: the one lifecycle of a background process, and
//!   of a server thread inside the test process;
//! - [`containerd`]: the one private containerd (driven by ctr, or by CRI);
//! - [`snapshotter`], [`supernode`], [`registry`] (with [`token_auth`]):
//!   lazybd's daemons and the registry they read;
//! - [`fdstore`]: the fd holder and a stand-in for systemd's fd store;
//! - [`netns`], [`p2p`], [`eni`]: network namespaces, the P2P fabric on
//!   them, the CNI plugin's fixtures;
//! - [`images`], [`busybox`], [`lazy_layers`], [`lazy_node`]: images and
//!   fixtures; [`cli`], [`http`], [`snapshots_api`]: clients;
//! - [`leaks`]: descriptors, memory, FUSE connections and processes, for
//!   the soak (its process list also finds a containerd's shims).
//!
//! Every test that needs root starts with [`require_root!`]: without root it
//! says loudly that it did not run; under CI (`CI` set) it fails instead, so a
//! CI run can never pass by skipping.

use std::path::PathBuf;

pub mod busybox;
pub mod cli;
pub mod containerd;
pub mod daemon;
pub mod eni;
pub mod fdstore;
pub mod http;
pub mod images;
pub mod lazy_layers;
pub mod lazy_node;
pub mod leaks;
pub mod netns;
pub mod p2p;
pub mod registry;
pub mod serve;
pub mod snapshots_api;
pub mod snapshotter;
pub mod supernode;
pub mod token_auth;

/// Returns from the calling test when it cannot run because we are not
/// root (see [`require_root()`]), naming the test by its function.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::require_root($crate::fn_name!()) {
            return;
        }
    };
}

/// The name of the function this expands in (also inside its async body).
#[macro_export]
macro_rules! fn_name {
    () => {{
        fn here() {}
        $crate::short_fn_name(::std::any::type_name_of_val(&here))
    }};
}

/// `NAME` of `crate::NAME::here` or `crate::NAME::{{closure}}::here`.
#[doc(hidden)]
pub fn short_fn_name(path: &'static str) -> &'static str {
    let path = path.strip_suffix("::here").unwrap_or(path);
    let path = path.trim_end_matches("::{{closure}}");
    path.rsplit("::").next().unwrap_or(path)
}

/// Returns false (after a loud message) when the test cannot run because we
/// are not root; panics in CI, where root tests must run.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let msg = format!("*** {test}: NOT RUN: needs root (real mounts, daemons, namespaces) ***");
    if std::env::var_os("CI").is_some() {
        panic!("{msg} -- CI must run as root");
    }
    eprintln!("{msg}");
    false
}

/// A free TCP port on 127.0.0.1, by bind-and-release: the daemon that is
/// given it binds it right after.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Path of a workspace binary built by `cargo build --workspace --bins`.
pub fn bin_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first (hack/test.sh does)",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    #[test]
    fn fn_name_names_the_enclosing_function() {
        assert_eq!(crate::fn_name!(), "fn_name_names_the_enclosing_function");
        let in_async = async { crate::fn_name!() };
        let name = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(in_async);
        assert_eq!(name, "fn_name_names_the_enclosing_function");
    }
}
