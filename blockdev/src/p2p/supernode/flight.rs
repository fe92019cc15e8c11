//! One fetch per key however many ask at once: the first caller starts the
//! work in its own task (so it finishes for the others even if that caller
//! goes away), everyone waits for the same outcome.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

pub struct SingleFlight<K, V> {
    inflight: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum FlightError {
    /// The wait exceeded the caller's limit (the work goes on for others).
    TimedOut(Duration),
    /// The task doing the work died without an outcome.
    Aborted,
}

impl<K, V> SingleFlight<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` unless a run for `key` is in flight, then waits at most
    /// `wait` for the outcome. Returns whether this call started the work.
    pub async fn run<F, Fut>(
        self: &std::sync::Arc<Self>,
        key: K,
        wait: Duration,
        work: F,
    ) -> (Result<V, FlightError>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        let (mut rx, leader) = {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&key) {
                Some(rx) => (rx.clone(), false),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(key.clone(), rx.clone());
                    let fut = work();
                    let me = self.clone();
                    tokio::spawn(async move {
                        // Leaves the map even if `fut` panics.
                        let guard = Leave { flights: &me, key };
                        let v = fut.await;
                        drop(guard);
                        let _ = tx.send(Some(v));
                    });
                    (rx, true)
                }
            }
        };
        let outcome = match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
            Ok(Ok(v)) => Ok(v.clone().expect("waited for Some")),
            Ok(Err(_)) => Err(FlightError::Aborted),
            Err(_) => Err(FlightError::TimedOut(wait)),
        };
        (outcome, leader)
    }

    pub fn in_flight(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

struct Leave<'a, K: Hash + Eq, V> {
    flights: &'a SingleFlight<K, V>,
    key: K,
}

impl<K: Hash + Eq, V> Drop for Leave<'_, K, V> {
    fn drop(&mut self) {
        self.flights
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
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

    #[tokio::test]
    async fn waiting_is_bounded() {
        let flights: Arc<SingleFlight<u32, u32>> = Arc::default();
        let (v, _) = flights
            .run(1, Duration::from_millis(20), || async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                1
            })
            .await;
        assert_eq!(v, Err(FlightError::TimedOut(Duration::from_millis(20))));
    }
}
