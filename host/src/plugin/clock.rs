//! The monotonic clock a sandbox's guest reads: it stands still while a spare instance waits for its call.
//!
//! WASI's monotonic clock counts from an origin of the host's choosing;
//! wasmtime's counts from when the store was made. A spare is made when
//! the call before took the last one, so its clock would tell the next
//! call how long ago that was: something of another caller's call. This
//! one runs while the instance is made (start-up code may read it) and
//! from when its call begins, and not in between, so it stays monotonic
//! for the guest and says nothing of the time spent waiting.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use wasmtime_wasi::HostMonotonicClock;

/// A clock shared by a store's WASI context and the host, which pauses
/// and resumes it.
#[derive(Clone)]
pub(crate) struct CallClock(Arc<Mutex<State>>);

struct State {
    /// Nanoseconds counted before the last pause.
    counted: u64,
    /// Since when it runs, if it does.
    running: Option<Instant>,
}

impl State {
    fn now(&self) -> u64 {
        let running = self.running.map_or(0, |since| {
            u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
        });
        self.counted.saturating_add(running)
    }
}

impl CallClock {
    /// A clock at 0, running.
    pub(crate) fn new() -> CallClock {
        CallClock(Arc::new(Mutex::new(State {
            counted: 0,
            running: Some(Instant::now()),
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops it where it is (a spare made, to wait for its call).
    pub(crate) fn pause(&self) {
        let mut state = self.state();
        state.counted = state.now();
        state.running = None;
    }

    /// Starts it again from where it stopped (a call begins).
    pub(crate) fn resume(&self) {
        let mut state = self.state();
        if state.running.is_none() {
            state.running = Some(Instant::now());
        }
    }
}

impl HostMonotonicClock for CallClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.state().now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_paused_clock_stands_still_and_resumes_where_it_stopped() {
        let clock = CallClock::new();
        std::thread::sleep(Duration::from_millis(5));
        clock.pause();
        let paused = clock.now();
        assert!(paused >= 5_000_000);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(clock.now(), paused);
        clock.resume();
        clock.resume();
        let resumed = clock.now();
        assert!(
            resumed >= paused && resumed < paused + 20_000_000,
            "{resumed} after {paused}"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(clock.now() >= resumed + 5_000_000);
    }
}
