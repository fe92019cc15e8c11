//! The memory a server may hold for responses at once. A handler reserves
//! what its response may hold and hands the reservation to the response body
//! ([`super::streamed`]), so it is released when the last byte was written
//! or the connection was dropped, not when the handler returned: a slow
//! reader keeps its share until it has read it (or the response deadline,
//! `super::server`, drops it).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const UNIT: u64 = 64 << 10;
/// Response bytes one server holds at once unless configured otherwise.
pub const DEFAULT_BUDGET: u64 = 512 << 20;

pub struct ByteBudget {
    units: Arc<Semaphore>,
    total: u64,
}

/// Room reserved in a [`ByteBudget`]; given back on drop.
pub type Reservation = OwnedSemaphorePermit;

impl ByteBudget {
    pub fn new(bytes: u64) -> Self {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS as u64) as usize;
        ByteBudget {
            units: Arc::new(Semaphore::new(units)),
            total: units as u64 * UNIT,
        }
    }

    /// Waits at most `wait` for room for `bytes`; `None`: still no room (the
    /// caller answers 503 and the asker moves on), or more than the whole
    /// budget.
    pub async fn reserve(&self, bytes: u64, wait: Duration) -> Option<Reservation> {
        if bytes > self.total {
            return None;
        }
        let want = u32::try_from(bytes.div_ceil(UNIT).max(1)).ok()?;
        tokio::time::timeout(wait, self.units.clone().acquire_many_owned(want))
            .await
            .ok()?
            .ok()
    }

    /// Bytes not reserved right now.
    pub fn available(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn room_comes_back_when_the_reservation_goes() {
        let b = ByteBudget::new(1 << 20);
        let r = b.reserve(768 << 10, Duration::ZERO).await.unwrap();
        assert!(b.reserve(512 << 10, Duration::ZERO).await.is_none());
        drop(r);
        assert!(b.reserve(512 << 10, Duration::ZERO).await.is_some());
        assert!(b.reserve(2 << 20, Duration::from_secs(5)).await.is_none());
        assert_eq!(b.available(), 1 << 20);
    }
}
