//! Stats: the container's cgroup metrics, typed for the host's cgroup
//! version (containerd refuses a v1 `Metrics` on a v2 host and vice versa).
//!
//! cgroup v1 is read here rather than with the crate's `collect_metrics`:
//! that one fills only memory usage and parses v2's `cpu.stat` keys, so on a
//! v1 host `ctr task metrics` would show a zero memory limit and no CPU time
//! where the Go shim shows both. v2 uses the crate's, which is complete.

use std::{collections::HashMap, path::PathBuf};

use containerd_shim::{
    cgroup::{collect_metrics_v2, get_cgroup},
    util::convert_to_any,
};
use containerd_shim_protos::{
    cgroups::metrics::{
        CPUStat, CPUUsage, MemoryEntry, MemoryOomControl, MemoryStat, Metrics, PidsStat, Throttle,
    },
    protobuf::well_known_types::any::Any,
};

use crate::error::{io_context, Error, Result};

/// The metrics of the cgroup of the container whose init is `pid`.
pub async fn collect(pid: u32) -> Result<Any> {
    tokio::task::spawn_blocking(move || {
        if cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode() {
            Ok(convert_to_any(Box::new(collect_metrics_v2(&get_cgroup(
                pid,
            )?)?))?)
        } else {
            Ok(convert_to_any(Box::new(collect_v1(pid)?))?)
        }
    })
    .await
    .map_err(|e| Error::io("collect metrics", std::io::Error::other(e)))?
}

/// The v1 hierarchies `pid` belongs to: controller list -> its directory.
fn v1_dirs(pid: u32) -> Result<HashMap<String, PathBuf>> {
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).map_err(io_context(format!("read {path}")))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, dir) = (fields.next()?, fields.next()?, fields.next()?);
            (!controllers.is_empty()).then(|| {
                let dir = PathBuf::from("/sys/fs/cgroup")
                    .join(controllers.trim_start_matches("name="))
                    .join(dir.trim_start_matches('/'));
                (controllers.to_string(), dir)
            })
        })
        .collect())
}

/// A controller's directory, whichever hierarchy it is co-mounted in.
fn controller_dir<'a>(dirs: &'a HashMap<String, PathBuf>, name: &str) -> Option<&'a PathBuf> {
    dirs.iter()
        .find(|(controllers, _)| controllers.split(',').any(|c| c == name))
        .map(|(_, dir)| dir)
}

/// One cgroup file, read as the kernel writes it; a missing file (a
/// controller the kernel lacks, e.g. kmem) reads as absent, not as an error.
struct CgroupFiles<'a>(Option<&'a PathBuf>);

impl CgroupFiles<'_> {
    fn read(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.0?.join(file)).ok()
    }

    fn number(&self, file: &str) -> u64 {
        self.read(file)
            .and_then(|text| parse_number(&text))
            .unwrap_or(0)
    }

    fn flat_keyed(&self, file: &str) -> HashMap<String, u64> {
        self.read(file).map(|t| flat_keyed(&t)).unwrap_or_default()
    }

    /// `<prefix>.usage_in_bytes`, `.limit_in_bytes`, ... as one entry.
    fn memory_entry(&self, prefix: &str) -> MemoryEntry {
        let file = |name: &str| match prefix {
            "" => name.to_string(),
            prefix => format!("{prefix}.{name}"),
        };
        MemoryEntry {
            usage: self.number(&file("usage_in_bytes")),
            limit: self.number(&file("limit_in_bytes")),
            max: self.number(&file("max_usage_in_bytes")),
            failcnt: self.number(&file("failcnt")),
            ..Default::default()
        }
    }
}

/// A cgroup number; `max` (no limit) reads as u64::MAX, as the Go shim reports it.
fn parse_number(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

/// The `key value` lines of a flat-keyed cgroup file; malformed lines are skipped.
fn flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn collect_v1(pid: u32) -> Result<Metrics> {
    let dirs = v1_dirs(pid)?;
    let mut metrics = Metrics::new();
    if let Some(dir) = controller_dir(&dirs, "memory") {
        let files = CgroupFiles(Some(dir));
        let stat = files.flat_keyed("memory.stat");
        metrics.memory = Some(memory_stat(&files, &stat)).into();
        let oom = files.flat_keyed("memory.oom_control");
        metrics.memory_oom_control = Some(MemoryOomControl {
            oom_kill_disable: oom.get("oom_kill_disable").copied().unwrap_or(0),
            under_oom: oom.get("under_oom").copied().unwrap_or(0),
            oom_kill: oom.get("oom_kill").copied().unwrap_or(0),
            ..Default::default()
        })
        .into();
    }
    if let Some(dir) = controller_dir(&dirs, "cpuacct") {
        let acct = CgroupFiles(Some(dir));
        let cpu = CgroupFiles(controller_dir(&dirs, "cpu"));
        metrics.cpu = Some(cpu_stat(&acct, &cpu)).into();
    }
    if let Some(dir) = controller_dir(&dirs, "pids") {
        let files = CgroupFiles(Some(dir));
        metrics.pids = Some(PidsStat {
            current: files.number("pids.current"),
            // No limit is reported as 0, as the Go shim does.
            limit: match files.number("pids.max") {
                u64::MAX => 0,
                limit => limit,
            },
            ..Default::default()
        })
        .into();
    }
    Ok(metrics)
}

fn memory_stat(files: &CgroupFiles, stat: &HashMap<String, u64>) -> MemoryStat {
    let get = |key: &str| stat.get(key).copied().unwrap_or(0);
    MemoryStat {
        cache: get("cache"),
        rss: get("rss"),
        rss_huge: get("rss_huge"),
        mapped_file: get("mapped_file"),
        dirty: get("dirty"),
        writeback: get("writeback"),
        pg_pg_in: get("pgpgin"),
        pg_pg_out: get("pgpgout"),
        pg_fault: get("pgfault"),
        pg_maj_fault: get("pgmajfault"),
        inactive_anon: get("inactive_anon"),
        active_anon: get("active_anon"),
        inactive_file: get("inactive_file"),
        active_file: get("active_file"),
        unevictable: get("unevictable"),
        hierarchical_memory_limit: get("hierarchical_memory_limit"),
        hierarchical_swap_limit: get("hierarchical_memsw_limit"),
        total_cache: get("total_cache"),
        total_rss: get("total_rss"),
        total_rss_huge: get("total_rss_huge"),
        total_mapped_file: get("total_mapped_file"),
        total_dirty: get("total_dirty"),
        total_writeback: get("total_writeback"),
        total_pg_pg_in: get("total_pgpgin"),
        total_pg_pg_out: get("total_pgpgout"),
        total_pg_fault: get("total_pgfault"),
        total_pg_maj_fault: get("total_pgmajfault"),
        total_inactive_anon: get("total_inactive_anon"),
        total_active_anon: get("total_active_anon"),
        total_inactive_file: get("total_inactive_file"),
        total_active_file: get("total_active_file"),
        total_unevictable: get("total_unevictable"),
        usage: Some(files.memory_entry("memory")).into(),
        // v1's memsw counter: memory and swap together, as the Go shim reports it.
        swap: Some(files.memory_entry("memory.memsw")).into(),
        kernel: Some(files.memory_entry("memory.kmem")).into(),
        kernel_tcp: Some(files.memory_entry("memory.kmem.tcp")).into(),
        ..Default::default()
    }
}

fn cpu_stat(acct: &CgroupFiles, cpu: &CgroupFiles) -> CPUStat {
    // cpuacct.stat is in USER_HZ ticks; the Go shim reports nanoseconds.
    const NANOS_PER_TICK: u64 = 1_000_000_000 / 100;
    let ticks = acct.flat_keyed("cpuacct.stat");
    let per_cpu = acct
        .read("cpuacct.usage_percpu")
        .map(|t| {
            t.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let throttle = cpu.flat_keyed("cpu.stat");
    CPUStat {
        usage: Some(CPUUsage {
            total: acct.number("cpuacct.usage"),
            kernel: ticks.get("system").copied().unwrap_or(0) * NANOS_PER_TICK,
            user: ticks.get("user").copied().unwrap_or(0) * NANOS_PER_TICK,
            per_cpu,
            ..Default::default()
        })
        .into(),
        throttling: Some(Throttle {
            periods: throttle.get("nr_periods").copied().unwrap_or(0),
            throttled_periods: throttle.get("nr_throttled").copied().unwrap_or(0),
            throttled_time: throttle.get("throttled_time").copied().unwrap_or(0),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_numbers_and_flat_keyed_files_parse_without_panicking() {
        assert_eq!(parse_number("67108864\n"), Some(67108864));
        assert_eq!(parse_number("max\n"), Some(u64::MAX));
        assert_eq!(parse_number("garbage"), None);
        let stat = flat_keyed("cache 4096\nrss 8192\nbroken\nodd x\n");
        assert_eq!(stat.get("cache"), Some(&4096));
        assert_eq!(stat.get("rss"), Some(&8192));
        assert_eq!(stat.len(), 2);
    }

    #[test]
    fn a_controller_is_found_in_a_co_mounted_hierarchy() {
        let dirs = HashMap::from([
            (
                "cpu,cpuacct".to_string(),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/c1"),
            ),
            (
                "memory".to_string(),
                PathBuf::from("/sys/fs/cgroup/memory/c1"),
            ),
        ]);
        assert_eq!(
            controller_dir(&dirs, "cpuacct"),
            Some(&PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/c1"))
        );
        assert!(controller_dir(&dirs, "pids").is_none());
    }

    #[test]
    fn the_metrics_of_this_process_read_on_a_v1_host() {
        if cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode() {
            eprintln!("not a cgroup v1 host: v1 collection not exercised");
            return;
        }
        let metrics = collect_v1(std::process::id()).unwrap();
        assert!(metrics.memory.usage.usage > 0, "{metrics:?}");
        assert!(metrics.cpu.usage.total > 0, "{metrics:?}");
    }
}
