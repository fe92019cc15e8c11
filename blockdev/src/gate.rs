//! The priority between on-demand and background fetches of one node.
//!
//! On-demand fetches (a reader is waiting) mark themselves active for as
//! long as they run; background fetches wait until none is active before
//! each request. A reader never waits for a background fetch: if it needs a
//! chunk a background fetch has claimed, it fetches the chunk itself at once
//! (see `ChunkFetcher`), so the two never queue behind each other.
//!
//! Pure bookkeeping below the fetcher: the fetcher marks its on-demand
//! fetches and streams here, trace replays mark themselves, and the
//! prefetcher waits here for both.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

#[derive(Debug)]
pub struct PriorityGate {
    /// One startup stream at a time, in the order the layers attached: an
    /// image's layers attach in quick succession, and streams sharing a
    /// slow link would each deliver what the container reads first later.
    startup: Semaphore,
    demand_active: AtomicUsize,
    /// Prefetch jobs running (for the "demand while prefetching" counter).
    jobs_active: AtomicUsize,
    /// Trace replays running: full prefetches wait for them too, so the
    /// chunks a container is known to need first come first.
    replays_active: AtomicUsize,
    idle: Notify,
}

impl Default for PriorityGate {
    fn default() -> Self {
        PriorityGate {
            startup: Semaphore::new(1),
            demand_active: AtomicUsize::new(0),
            jobs_active: AtomicUsize::new(0),
            replays_active: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }
}

impl PriorityGate {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Waits, at most `limit`, until the startup streams that began
    /// earlier on this node have ended; the turn lasts as long as the
    /// guard. `None` after `limit`: the stream goes ahead anyway, so one
    /// that a slow source drags out holds the others back only so long.
    pub async fn startup_turn(&self, limit: Duration) -> Option<SemaphorePermit<'_>> {
        tokio::time::timeout(limit, self.startup.acquire())
            .await
            .ok()?
            .ok()
    }

    /// Marks an on-demand fetch as running until the guard is dropped.
    pub fn demand(self: &Arc<Self>) -> DemandGuard {
        self.demand_active.fetch_add(1, Ordering::AcqRel);
        DemandGuard { gate: self.clone() }
    }

    pub fn demand_active(&self) -> usize {
        self.demand_active.load(Ordering::Acquire)
    }

    /// Whether a background prefetch job is running on this node.
    pub fn prefetching(&self) -> bool {
        self.jobs_active.load(Ordering::Acquire) > 0
    }

    /// Marks a prefetch job as running until the guard is dropped.
    pub fn job(self: &Arc<Self>) -> JobGuard {
        self.jobs_active.fetch_add(1, Ordering::AcqRel);
        JobGuard { gate: self.clone() }
    }

    /// Marks a trace replay as running until the guard is dropped.
    pub fn replay(self: &Arc<Self>) -> ReplayGuard {
        self.replays_active.fetch_add(1, Ordering::AcqRel);
        ReplayGuard { gate: self.clone() }
    }

    pub fn replays_active(&self) -> usize {
        self.replays_active.load(Ordering::Acquire)
    }

    /// Waits, at most `limit`, until neither an on-demand fetch nor a trace
    /// replay runs: a full prefetch's turn. Returns whether it had to wait
    /// at all (a yield) and whether the gate is idle now.
    pub async fn wait_idle_for_full(&self, limit: Duration) -> (bool, bool) {
        let idle = || self.demand_active() == 0 && self.replays_active() == 0;
        let mut waited = false;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the check, so a guard dropped in between
            // still wakes us.
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if idle() {
                return (waited, true);
            }
            waited = true;
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return (waited, idle());
            }
        }
    }
}

pub struct DemandGuard {
    gate: Arc<PriorityGate>,
}

impl Drop for DemandGuard {
    fn drop(&mut self) {
        if self.gate.demand_active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.gate.idle.notify_waiters();
        }
    }
}

pub struct ReplayGuard {
    gate: Arc<PriorityGate>,
}

impl Drop for ReplayGuard {
    fn drop(&mut self) {
        if self.gate.replays_active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.gate.idle.notify_waiters();
        }
    }
}

pub struct JobGuard {
    gate: Arc<PriorityGate>,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.gate.jobs_active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn background_waits_until_demand_is_done() {
        let gate = PriorityGate::new();
        assert_eq!(
            gate.wait_idle_for_full(Duration::from_secs(1)).await,
            (false, true)
        );
        let a = gate.demand();
        let b = gate.demand();
        let g = gate.clone();
        let waiter =
            tokio::spawn(async move { g.wait_idle_for_full(Duration::from_secs(3600)).await });
        tokio::task::yield_now().await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one demand fetch still runs");
        drop(b);
        assert_eq!(waiter.await.unwrap(), (true, true));
    }

    #[tokio::test(start_paused = true)]
    async fn startup_streams_take_turns_and_wait_only_so_long() {
        let gate = PriorityGate::new();
        let first = gate.startup_turn(Duration::from_secs(5)).await;
        assert!(first.is_some());
        let g = gate.clone();
        let second =
            tokio::spawn(async move { g.startup_turn(Duration::from_secs(5)).await.is_some() });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the first stream still runs");
        drop(first);
        assert!(second.await.unwrap(), "its turn once the first ended");
        // A stream that never ends holds the next one back for the limit.
        let _stuck = gate.startup_turn(Duration::from_secs(5)).await;
        assert!(gate.startup_turn(Duration::from_secs(5)).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded() {
        let gate = PriorityGate::new();
        let _busy = gate.demand();
        assert_eq!(
            gate.wait_idle_for_full(Duration::from_secs(5)).await,
            (true, false)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn full_prefetch_waits_for_replays() {
        let gate = PriorityGate::new();
        let r = gate.replay();
        let g = gate.clone();
        let full =
            tokio::spawn(async move { g.wait_idle_for_full(Duration::from_secs(3600)).await });
        tokio::task::yield_now().await;
        assert!(!full.is_finished(), "a replay runs");
        drop(r);
        assert_eq!(full.await.unwrap(), (true, true));
    }

    #[test]
    fn jobs_are_counted() {
        let gate = PriorityGate::new();
        assert!(!gate.prefetching());
        let j = gate.job();
        assert!(gate.prefetching());
        drop(j);
        assert!(!gate.prefetching());
    }
}
