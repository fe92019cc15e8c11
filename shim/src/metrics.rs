//! Stats: the container's cgroup metrics, typed for the host's cgroup
//! version (containerd refuses a v1 `Metrics` on a v2 host and vice versa).

use containerd_shim::{
    cgroup::{collect_metrics, collect_metrics_v2, get_cgroup},
    util::convert_to_any,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;

use crate::error::{Error, Result};

/// The metrics of the cgroup of the container whose init is `pid`.
pub async fn collect(pid: u32) -> Result<Any> {
    tokio::task::spawn_blocking(move || {
        let cgroup = get_cgroup(pid)?;
        let any = if cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode() {
            convert_to_any(Box::new(collect_metrics_v2(&cgroup)?))?
        } else {
            convert_to_any(Box::new(collect_metrics(&cgroup)?))?
        };
        Ok(any)
    })
    .await
    .map_err(|e| Error::io("collect metrics", std::io::Error::other(e)))?
}
