//! Readiness: what it is made of, followed from the same events as the metrics.
//!
//! A host is ready while it is past start-up and not stopping, every
//! broker connection it holds is up, and every plugin it serves from its
//! directory has a consumer taking requests. A plugin that failed to load
//! is not served and so does not count; one that is served but lost its
//! consumer (the broker refused it again after a reconnect, say) does.

use std::collections::{BTreeMap, HashMap};
use std::sync::{LazyLock, Mutex, MutexGuard};

use super::Phase;

/// The process's readiness state.
pub(super) static HEALTH: LazyLock<Health> = LazyLock::new(|| Health {
    state: Mutex::new(State {
        phase: Phase::Starting,
        links: BTreeMap::new(),
        plugins: BTreeMap::new(),
        consumers: HashMap::new(),
    }),
});

pub(super) struct Health {
    state: Mutex<State>,
}

struct State {
    phase: Phase,
    /// Broker connections by kind (`server`, `proxy`): how many are up and
    /// how many are being re-established.
    links: BTreeMap<&'static str, Links>,
    /// The plugins served, by server id, with the version each serves.
    plugins: BTreeMap<String, String>,
    /// Consumers taking requests, by server id.
    consumers: HashMap<String, u32>,
}

#[derive(Default)]
struct Links {
    up: u32,
    down: u32,
}

impl Links {
    /// 1 while every connection of the kind is up, 0 otherwise.
    fn connected(&self) -> bool {
        self.up > 0 && self.down == 0
    }
}

/// Where one connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkState {
    Up,
    Down,
    Closed,
}

impl Health {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
    }

    /// A connection of kind `kind` went from `from` to `to`; `report` is
    /// told whether every connection of that kind is up now, under the
    /// lock, so that reports of moves made at once come in their order.
    pub(super) fn link_moved(
        &self,
        kind: &'static str,
        from: LinkState,
        to: LinkState,
        report: impl FnOnce(bool),
    ) -> bool {
        let mut state = self.lock();
        let links = state.links.entry(kind).or_default();
        for (s, delta) in [(from, -1i64), (to, 1)] {
            let count = match s {
                LinkState::Up => &mut links.up,
                LinkState::Down => &mut links.down,
                LinkState::Closed => continue,
            };
            *count = count.saturating_add_signed(delta as i32);
        }
        let connected = links.connected();
        report(connected);
        connected
    }

    /// `id` serves `version` now; the version it served before, if any.
    pub(super) fn plugin_served(&self, id: &str, version: &str) -> Option<String> {
        self.lock()
            .plugins
            .insert(id.to_string(), version.to_string())
    }

    /// `id` is no longer served; the version it served, if any.
    pub(super) fn plugin_removed(&self, id: &str) -> Option<String> {
        self.lock().plugins.remove(id)
    }

    /// A consumer of `id` started (`true`) or ended; `report` is told how
    /// many `id` has now, under the lock (as for [`Health::link_moved`]).
    pub(super) fn consumer(&self, id: &str, started: bool, report: impl FnOnce(u32)) -> u32 {
        let mut state = self.lock();
        let count = state.consumers.entry(id.to_string()).or_default();
        *count = if started {
            count.saturating_add(1)
        } else {
            count.saturating_sub(1)
        };
        let now = *count;
        if now == 0 {
            state.consumers.remove(id);
        }
        report(now);
        now
    }

    pub(super) fn readiness(&self) -> Result<(), String> {
        let state = self.lock();
        match state.phase {
            Phase::Starting => return Err("starting: connecting and loading plugins".into()),
            Phase::Stopping => return Err("stopping".into()),
            Phase::Serving => {}
        }
        if let Some((kind, _)) = state.links.iter().find(|(_, l)| l.down > 0) {
            return Err(format!(
                "the {kind} connection to the broker is down: reconnecting"
            ));
        }
        if state.links.values().all(|l| l.up == 0) {
            return Err("no connection to the broker".into());
        }
        let idle: Vec<&str> = state
            .plugins
            .keys()
            .filter(|id| !state.consumers.contains_key(id.as_str()))
            .map(String::as_str)
            .collect();
        match idle.as_slice() {
            [] => Ok(()),
            [one] => Err(format!("server id {one} is not consuming")),
            [first, rest @ ..] => Err(format!(
                "server id {first} and {} more are not consuming",
                rest.len()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Health {
        Health {
            state: Mutex::new(State {
                phase: Phase::Starting,
                links: BTreeMap::new(),
                plugins: BTreeMap::new(),
                consumers: HashMap::new(),
            }),
        }
    }

    #[test]
    fn ready_only_while_serving_connected_and_consuming() {
        let h = fresh();
        assert!(h.readiness().unwrap_err().contains("starting"));
        assert!(h.link_moved("server", LinkState::Closed, LinkState::Up, |_| ()));
        h.plugin_served("calc", "abc");
        h.set_phase(Phase::Serving);
        assert_eq!(
            h.readiness().unwrap_err(),
            "server id calc is not consuming"
        );
        assert_eq!(h.consumer("calc", true, |_| ()), 1);
        assert_eq!(h.readiness(), Ok(()));

        assert!(!h.link_moved("server", LinkState::Up, LinkState::Down, |_| ()));
        assert!(h.readiness().unwrap_err().contains("server connection"));
        assert_eq!(h.consumer("calc", false, |_| ()), 0);
        assert!(h.link_moved("server", LinkState::Down, LinkState::Up, |_| ()));
        assert!(h.readiness().unwrap_err().contains("calc"));
        h.consumer("calc", true, |_| ());
        assert_eq!(h.readiness(), Ok(()));

        // A removed plugin is not waited for.
        h.consumer("calc", false, |_| ());
        assert_eq!(h.plugin_removed("calc").as_deref(), Some("abc"));
        assert_eq!(h.readiness(), Ok(()));

        h.set_phase(Phase::Stopping);
        assert_eq!(h.readiness().unwrap_err(), "stopping");
        h.set_phase(Phase::Serving);
        h.link_moved("server", LinkState::Up, LinkState::Closed, |_| ());
        assert!(h.readiness().unwrap_err().contains("no connection"));
    }

    #[test]
    fn a_consumer_replaced_on_the_same_id_keeps_it_consuming() {
        let h = fresh();
        h.consumer("calc", true, |_| ());
        h.consumer("calc", true, |_| ());
        assert_eq!(h.consumer("calc", false, |_| ()), 1);
        assert_eq!(h.consumer("calc", false, |_| ()), 0);
        assert_eq!(h.consumer("calc", false, |_| ()), 0, "never below zero");
    }
}
