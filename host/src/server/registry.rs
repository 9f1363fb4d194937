//! The served ids: what answers each, its consumer, and its share of the calls in flight.
//!
//! An id maps to its [`Service`], the handle of its consumer, and its
//! [`Share`]: a semaphore with one permit per call it may run at once.
//! A plugin is swapped inside its service, so the consume loop of an id
//! keeps its service across versions; stopping an id, or serving it anew,
//! makes a new entry, which the old loop tells apart by identity. This is
//! bookkeeping only, generic over the consumer handle, so it is tested
//! without a broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Semaphore;

use super::service::Service;
use crate::Error;
use crate::plugin::Plugin;

/// The calls in flight an id may have: also its consumer's prefetch,
/// which AMQP reads as "unlimited" when 0, so 0 is never allowed; the
/// prefetch count is 16 bits.
pub(super) fn check_concurrency(concurrency: usize) -> Result<(), Error> {
    if concurrency == 0 || concurrency > u16::MAX as usize {
        return Err(Error::Config(format!(
            "concurrency must be between 1 and 65535, not {concurrency}"
        )));
    }
    Ok(())
}

/// An id's share of the calls in flight.
pub(super) struct Share {
    slots: Arc<Semaphore>,
    concurrency: usize,
}

impl Share {
    pub(super) fn new(concurrency: usize) -> Result<Share, Error> {
        check_concurrency(concurrency)?;
        Ok(Share {
            slots: Arc::new(Semaphore::new(concurrency)),
            concurrency,
        })
    }

    /// One permit per call running.
    pub(super) fn slots(&self) -> Arc<Semaphore> {
        self.slots.clone()
    }

    pub(super) fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Allows `concurrency` calls at once; whether that changed anything.
    /// Fewer permits are taken back as running calls finish.
    fn resize(&mut self, concurrency: usize) -> Result<bool, Error> {
        check_concurrency(concurrency)?;
        let before = std::mem::replace(&mut self.concurrency, concurrency);
        if concurrency > before {
            self.slots.add_permits(concurrency - before);
        } else if concurrency < before {
            let slots = self.slots.clone();
            let fewer = (before - concurrency) as u32;
            tokio::spawn(async move {
                if let Ok(permits) = slots.acquire_many(fewer).await {
                    permits.forget();
                }
            });
        }
        Ok(before != concurrency)
    }
}

/// One served id.
pub(super) struct Entry<H> {
    pub(super) service: Arc<Service>,
    pub(super) share: Share,
    /// Its consumer, as the transport knows it.
    pub(super) consumer: H,
}

/// What [`Registry::swap_plugin`] did.
pub(super) enum Swap<H> {
    /// The id is not served: the plugin is given back, to be started.
    NotServed(Plugin),
    /// The plugin is swapped in; with the consumer's handle when the
    /// concurrency changed and the prefetch has to follow.
    Swapped { resized: Option<H> },
}

/// Every served id.
pub(super) struct Registry<H> {
    ids: Mutex<HashMap<String, Entry<H>>>,
}

impl<H: Clone> Registry<H> {
    pub(super) fn new() -> Registry<H> {
        Registry {
            ids: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry<H>>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn insert(&self, id: &str, entry: Entry<H>) {
        self.lock().insert(id.to_string(), entry);
    }

    /// Swaps `plugin` in for `id` and gives it `concurrency`; calls
    /// running keep the version they started on.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the id is served by native functions, or the
    /// concurrency is out of range (nothing changes then).
    pub(super) fn swap_plugin(
        &self,
        id: &str,
        plugin: Plugin,
        concurrency: usize,
    ) -> Result<Swap<H>, Error> {
        check_concurrency(concurrency)?;
        let mut ids = self.lock();
        let Some(entry) = ids.get_mut(id) else {
            return Ok(Swap::NotServed(plugin));
        };
        let Service::Plugin(slot) = &*entry.service else {
            return Err(Error::Config(format!(
                "server id `{id}` is served by native functions"
            )));
        };
        slot.swap(Arc::new(plugin));
        let resized = entry
            .share
            .resize(concurrency)?
            .then(|| entry.consumer.clone());
        Ok(Swap::Swapped { resized })
    }

    pub(super) fn remove(&self, id: &str) -> Option<Entry<H>> {
        self.lock().remove(id)
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub(super) fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The plugin serving `id`, if a plugin does.
    pub(super) fn plugin(&self, id: &str) -> Option<Arc<Plugin>> {
        match &*self.lock().get(id)?.service {
            Service::Plugin(slot) => Some(slot.load_full()),
            Service::Native(_) => None,
        }
    }

    /// The concurrency of `id` while `service` still serves it (not
    /// stopped, nor replaced by another service under the same id).
    pub(super) fn still_served(&self, id: &str, service: &Arc<Service>) -> Option<usize> {
        self.lock()
            .get(id)
            .filter(|e| Arc::ptr_eq(&e.service, service))
            .map(|e| e.share.concurrency())
    }

    /// Records a new consumer for `id`, while `service` still serves it.
    pub(super) fn set_consumer(&self, id: &str, service: &Arc<Service>, consumer: H) {
        if let Some(e) = self
            .lock()
            .get_mut(id)
            .filter(|e| Arc::ptr_eq(&e.service, service))
        {
            e.consumer = consumer;
        }
    }

    /// Replaces the consumer of `id` with `consumer` if the one recorded
    /// is still `is_current`.
    pub(super) fn replace_consumer(&self, id: &str, is_current: impl Fn(&H) -> bool, consumer: H) {
        if let Some(e) = self.lock().get_mut(id).filter(|e| is_current(&e.consumer)) {
            e.consumer = consumer;
        }
    }

    /// Drops `id` if `service` still serves it.
    pub(super) fn forget(&self, id: &str, service: &Arc<Service>) {
        let mut ids = self.lock();
        if ids
            .get(id)
            .is_some_and(|e| Arc::ptr_eq(&e.service, service))
        {
            ids.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::server::service::NativeFunctions;

    fn native() -> Arc<Service> {
        Arc::new(Service::Native(NativeFunctions::new()))
    }

    fn entry(service: &Arc<Service>, concurrency: usize, consumer: u32) -> Entry<u32> {
        Entry {
            service: service.clone(),
            share: Share::new(concurrency).unwrap(),
            consumer,
        }
    }

    #[test]
    fn an_id_is_served_by_one_service_at_a_time() {
        let registry = Registry::new();
        let first = native();
        registry.insert("calc", entry(&first, 4, 1));
        assert_eq!(registry.still_served("calc", &first), Some(4));
        // Served anew: the first service's loop finds itself replaced.
        let second = native();
        registry.insert("calc", entry(&second, 2, 2));
        assert_eq!(registry.still_served("calc", &first), None);
        registry.set_consumer("calc", &first, 9);
        registry.forget("calc", &first);
        assert!(
            registry.contains("calc"),
            "a stale loop forgot the new entry"
        );
        registry.set_consumer("calc", &second, 3);
        assert_eq!(registry.remove("calc").map(|e| e.consumer), Some(3));
        assert_eq!(registry.still_served("calc", &second), None);
        assert!(registry.ids().is_empty());
    }

    #[test]
    fn concurrency_out_of_range_is_refused() {
        assert!(Share::new(0).is_err());
        assert!(Share::new(65_536).is_err());
        let mut share = Share::new(3).unwrap();
        assert!(share.resize(0).is_err());
        assert_eq!(share.concurrency(), 3, "a refused resize changes nothing");
        assert_eq!(share.slots().available_permits(), 3);
    }

    #[tokio::test]
    async fn a_share_grows_at_once_and_shrinks_as_calls_finish() {
        let mut share = Share::new(2).unwrap();
        assert_eq!(share.resize(2).ok(), Some(false));
        assert_eq!(share.resize(5).ok(), Some(true));
        assert_eq!(share.slots().available_permits(), 5);
        let running = share.slots().acquire_many_owned(5).await.unwrap();
        assert_eq!(share.resize(1).ok(), Some(true));
        drop(running);
        let slots = share.slots();
        let settled = async {
            while slots.available_permits() != 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), settled)
            .await
            .expect("the share settles at its new size");
    }
}
