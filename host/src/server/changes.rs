//! The lock each server id's changes take: starting, swapping, stopping, subscribing again and retiring one id never interleave, and never wait for another id's.
//!
//! Each of those talks to the broker under the lock (a declare and a
//! consume may take 15 s each before they are given up), so one lock for
//! the whole server let one id whose queue does not answer (a quorum
//! queue without its majority) hold up every other id: their consumers
//! after a reconnection, deploys, removals and the host's stopping.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// A lock per server id, forgotten while nobody holds or waits for it.
#[derive(Default)]
pub(super) struct Changes {
    ids: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Changes {
    /// Waits for `id`'s lock.
    pub(super) async fn lock(&self, id: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            // A guard and a waiter each hold the lock's `Arc`.
            ids.retain(|_, lock| Arc::strong_count(lock) > 1);
            ids.entry(id.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_ids_lock_holds_up_no_other_id() {
        let changes = Changes::default();
        let a = changes.lock("a").await;
        // Another id's is free.
        let b = tokio::time::timeout(Duration::from_secs(1), changes.lock("b")).await;
        assert!(b.is_ok(), "b waited for a");
        // The same id's waits.
        let again = tokio::time::timeout(Duration::from_millis(50), changes.lock("a")).await;
        assert!(again.is_err(), "a was locked twice");
        drop(a);
        let again = tokio::time::timeout(Duration::from_secs(1), changes.lock("a")).await;
        assert!(again.is_ok());
        drop((b, again));
        // Locks nobody holds are forgotten.
        let _c = changes.lock("c").await;
        assert_eq!(changes.ids.lock().unwrap().len(), 1);
    }
}
