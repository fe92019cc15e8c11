//! One fetch per key however many ask at once, and no fetch nobody waits
//! for: the first caller starts the work in its own task (so it finishes
//! for the others if that caller goes away), everyone waits for the same
//! outcome, and when the last waiter has gone (given up or disconnected)
//! before it is done, the work is stopped.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;

struct Flight<V> {
    id: u64,
    rx: watch::Receiver<Option<V>>,
    waiters: usize,
    task: Option<AbortHandle>,
}

struct Map<K, V> {
    flights: HashMap<K, Flight<V>>,
    next_id: u64,
}

pub struct SingleFlight<K, V> {
    inflight: Mutex<Map<K, V>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            inflight: Mutex::new(Map {
                flights: HashMap::new(),
                next_id: 0,
            }),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum FlightError {
    /// The wait exceeded the caller's limit (the work goes on while others
    /// wait).
    TimedOut(Duration),
    /// The task doing the work died without an outcome.
    Aborted,
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn lock(&self) -> std::sync::MutexGuard<'_, Map<K, V>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `work` unless a run for `key` is in flight, then waits at most
    /// `wait` for the outcome. Returns whether this call started the work.
    pub async fn run<F, Fut>(
        self: &Arc<Self>,
        key: K,
        wait: Duration,
        work: F,
    ) -> (Result<V, FlightError>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let (mut rx, id, leader) = {
            let mut map = self.lock();
            match map.flights.get_mut(&key) {
                Some(f) => {
                    f.waiters += 1;
                    (f.rx.clone(), f.id, false)
                }
                None => {
                    let id = map.next_id;
                    map.next_id += 1;
                    let (tx, rx) = watch::channel(None);
                    map.flights.insert(
                        key.clone(),
                        Flight {
                            id,
                            rx: rx.clone(),
                            waiters: 1,
                            task: None,
                        },
                    );
                    let fut = work();
                    let me = self.clone();
                    let k = key.clone();
                    let task = tokio::spawn(async move {
                        // Leaves the map even if `fut` panics or is aborted.
                        let guard = Done {
                            flights: &me,
                            key: k,
                            id,
                        };
                        let v = fut.await;
                        drop(guard);
                        let _ = tx.send(Some(v));
                    });
                    if let Some(f) = map.flights.get_mut(&key) {
                        f.task = Some(task.abort_handle());
                    }
                    (rx, id, true)
                }
            }
        };
        let waiting = Waiting {
            flights: self,
            key,
            id,
        };
        let outcome = match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(v)) => Ok(v.clone().expect("waited for Some")),
            Ok(Err(_)) => Err(FlightError::Aborted),
            Err(_) => Err(FlightError::TimedOut(wait)),
        };
        drop(waiting);
        (outcome, leader)
    }

    pub fn in_flight(&self) -> usize {
        self.lock().flights.len()
    }
}

/// Removes a finished (or dead) flight from the map.
struct Done<'a, K: Hash + Eq, V> {
    flights: &'a SingleFlight<K, V>,
    key: K,
    id: u64,
}

impl<K: Hash + Eq, V> Drop for Done<'_, K, V> {
    fn drop(&mut self) {
        let mut map = self
            .flights
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if map.flights.get(&self.key).is_some_and(|f| f.id == self.id) {
            map.flights.remove(&self.key);
        }
    }
}

/// One waiter; the last one to go stops a flight still running.
struct Waiting<'a, K: Hash + Eq, V> {
    flights: &'a SingleFlight<K, V>,
    key: K,
    id: u64,
}

impl<K: Hash + Eq, V> Drop for Waiting<'_, K, V> {
    fn drop(&mut self) {
        let mut map = self
            .flights
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(f) = map.flights.get_mut(&self.key).filter(|f| f.id == self.id) else {
            return;
        };
        f.waiters -= 1;
        if f.waiters == 0 {
            if let Some(task) = f.task.take() {
                task.abort();
            }
            map.flights.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights: Arc<SingleFlight<u32, u32>> = Arc::default();
        let runs = Arc::new(AtomicU32::new(0));
        let (go_tx, go_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (flights, runs, mut go) = (flights.clone(), runs.clone(), go_rx.clone());
            tasks.push(tokio::spawn(async move {
                flights
                    .run(7, Duration::from_secs(10), || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = go.wait_for(|g| *g).await;
                        42
                    })
                    .await
            }));
        }
        // Let every caller join before the work finishes.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        go_tx.send(true).unwrap();
        let mut leaders = 0;
        for t in tasks {
            let (v, leader) = t.await.unwrap();
            assert_eq!(v, Ok(42));
            leaders += leader as u32;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        assert_eq!(flights.in_flight(), 0);
        // A later call runs again.
        let (v, leader) = flights
            .run(7, Duration::from_secs(1), || async { 43 })
            .await;
        assert_eq!((v, leader), (Ok(43), true));
    }

    #[tokio::test]
    async fn a_panicking_run_aborts_waiters_and_frees_the_key() {
        let flights: Arc<SingleFlight<u32, u32>> = Arc::default();
        let (v, _) = flights
            .run(1, Duration::from_secs(5), || async { panic!("boom") })
            .await;
        assert_eq!(v, Err(FlightError::Aborted));
        assert_eq!(flights.in_flight(), 0);
    }

    /// Nobody waits any more: the work stops (it would otherwise run on).
    #[tokio::test]
    async fn work_stops_when_the_last_waiter_gives_up() {
        let flights: Arc<SingleFlight<u32, u32>> = Arc::default();
        let finished = Arc::new(AtomicU32::new(0));
        let f = finished.clone();
        let (v, _) = flights
            .run(1, Duration::from_millis(20), || async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                f.fetch_add(1, Ordering::SeqCst);
                1
            })
            .await;
        assert_eq!(v, Err(FlightError::TimedOut(Duration::from_millis(20))));
        assert_eq!(flights.in_flight(), 0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 0, "the work was stopped");
    }

    /// One waiter gives up, another still waits: the work goes on for it.
    #[tokio::test]
    async fn work_goes_on_while_someone_waits() {
        let flights: Arc<SingleFlight<u32, u32>> = Arc::default();
        let work = || async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            5
        };
        let patient = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run(1, Duration::from_secs(5), work).await })
        };
        tokio::task::yield_now().await;
        let (v, _) = flights.run(1, Duration::from_millis(10), work).await;
        assert!(v.is_err());
        assert_eq!(patient.await.unwrap().0, Ok(5));
    }
}
