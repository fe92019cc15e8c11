//! What a long-running test looks at to tell whether something leaks: a
//! process's descriptors (by kind) and memory, FUSE connections that no
//! mount holds, processes by what their command line names, and whether a
//! process seen earlier still runs. Everything is read from /proc and /sys.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A process's open descriptors, by what they point at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fds {
    /// Sockets: connection pools open and close them on their own clock.
    pub sockets: usize,
    /// Everything else (files, the FUSE device, loop devices, pipes,
    /// eventfds, ...), by target; socket and pipe numbers are dropped so
    /// that two samples compare.
    pub others: BTreeMap<String, usize>,
}

impl Fds {
    /// The descriptors of `pid` now.
    pub fn of(pid: u32) -> Fds {
        let mut fds = Fds::default();
        let dir = format!("/proc/{pid}/fd");
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e} (process gone?)"));
        for entry in entries.flatten() {
            // A descriptor closed between readdir and readlink is not counted.
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            if target.starts_with("socket:") {
                fds.sockets += 1;
                continue;
            }
            let kind = match target.split_once(":[") {
                Some((kind, _)) => format!("{kind}:[..]"),
                None => target,
            };
            *fds.others.entry(kind).or_default() += 1;
        }
        fds
    }

    pub fn total(&self) -> usize {
        self.sockets + self.other_count()
    }

    pub fn other_count(&self) -> usize {
        self.others.values().sum()
    }

    /// The non-socket targets held more often now than in `before`, with how
    /// many more.
    pub fn grown_since(&self, before: &Fds) -> BTreeMap<String, usize> {
        self.others
            .iter()
            .filter_map(|(target, &n)| {
                let was = before.others.get(target).copied().unwrap_or(0);
                (n > was).then(|| (target.clone(), n - was))
            })
            .collect()
    }
}

/// A `/proc/PID/status` memory figure (`VmRSS`, `VmHWM`, ...) in KiB.
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"))
}

/// FUSE connections (`/sys/fs/fuse/connections/N`) that no mount in this
/// mount namespace is served by: a connection outlives its mount only while
/// something holds its `/dev/fuse` descriptor.
pub fn unmounted_fuse_connections() -> BTreeSet<u64> {
    let mut connections: BTreeSet<u64> = std::fs::read_dir("/sys/fs/fuse/connections")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    for line in mountinfo.lines() {
        // "ID PARENT MAJ:MIN ROOT POINT OPTS [TAGS...] - FSTYPE SOURCE OPTS"
        let Some((head, tail)) = line.split_once(" - ") else {
            continue;
        };
        if !tail.starts_with("fuse") {
            continue;
        }
        // A FUSE mount's device is 0:N, N its connection's number.
        let minor = head
            .split(' ')
            .nth(2)
            .and_then(|dev| dev.strip_prefix("0:"))
            .and_then(|n| n.parse().ok());
        if let Some(n) = minor {
            connections.remove(&n);
        }
    }
    connections
}

/// Processes whose command line names a path under one of `dirs`, with
/// that command line (NULs as spaces).
pub fn processes_naming(dirs: &[&Path]) -> BTreeMap<u32, String> {
    let needles: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    command_lines()
        .map(|(pid, cmdline)| (pid, cmdline.replace('\0', " ")))
        .filter(|(_, cmdline)| needles.iter().any(|n| cmdline.contains(n.as_str())))
        .map(|(pid, cmdline)| (pid, cmdline.trim_end().to_owned()))
        .collect()
}

/// Every process now, with its command line as /proc has it (arguments
/// NUL-terminated). Processes gone while listed are left out; a /proc that
/// cannot be listed fails the test (nothing found would pass it).
pub fn command_lines() -> impl Iterator<Item = (u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap_or_else(|e| panic!("listing /proc: {e}"))
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).into_owned()))
        })
}

/// A process as seen once: its pid and start time (so a reused pid is not
/// taken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub pid: u32,
    start: u64,
}

impl Seen {
    /// `pid` now, if it runs.
    pub fn now(pid: u32) -> Option<Seen> {
        Some(Seen {
            pid,
            start: start_time(pid)?,
        })
    }

    /// Whether that same process still exists (zombies included).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command (field 2) may hold spaces; fields after it follow ") ".
    let rest = stat.rsplit_once(") ")?.1;
    rest.split(' ').nth(19)?.parse().ok()
}
