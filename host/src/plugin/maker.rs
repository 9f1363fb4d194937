//! Where spare instances are made and used ones dropped: the quiet thread, watched so that work it does not start in time is done elsewhere.
//!
//! On a quiet host that work goes to a thread at the lowest CPU priority
//! (see `server/runtimes.rs`), which a machine busy with other work may
//! give no CPU at all, while the work holds an instance slot (and a used
//! instance the code of its plugin's version). So work the quiet thread
//! has not started within [`RESCUE_AFTER`] is done on a thread of ordinary
//! priority, the *rescuer*.
//!
//! One [`Watch`] per plugin keeps the work handed over and not yet
//! started, oldest first, and one timer task on the rescuer looks at it
//! when the oldest is due: normally the quiet thread has started it by
//! then, and the task ends with nothing to do. A task per piece of work
//! (one to make the spare a call took, one to drop the instance it used)
//! woke a thread twice a call for that, about a tenth of a quiet host's
//! CPU per call; while the quiet thread keeps up, a watch wakes one at
//! most once each [`RESCUE_AFTER`].

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

/// How long work handed to the quiet thread may wait for it before a
/// thread of ordinary priority does it: that thread gets CPU only when
/// nothing else wants it, and a machine busy with other work may give it
/// none, while the work holds an instance slot, and a used instance the
/// code of its plugin's version.
const RESCUE_AFTER: Duration = Duration::from_millis(5);

type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One piece of work, taken once: by the quiet thread or the rescuer.
type Slot = Mutex<Option<Work>>;

/// A [`Slot`] as the quiet thread's task owns it; the watch holds it
/// weakly, so work dropped unrun (its runtime shut down) frees what it
/// holds, and a plugin's watch never keeps the plugin alive through the
/// work it watches.
type Once = Arc<Slot>;

fn take(work: &Once) -> Option<Work> {
    work.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Whether `work` was started, or is gone.
fn taken(work: &Weak<Slot>) -> bool {
    work.upgrade()
        .is_none_or(|w| w.lock().unwrap_or_else(|p| p.into_inner()).is_none())
}

/// Where a spare is made or a used instance dropped: `handle`, or, when
/// `rescuer` is given and `handle` has not started the work within
/// [`RESCUE_AFTER`], `rescuer`.
pub(super) struct Maker {
    pub(super) handle: Handle,
    pub(super) rescuer: Option<(Handle, Arc<Watch>)>,
}

impl Maker {
    /// Runs `work` once, where [`Maker`] says.
    pub(super) fn run(&self, work: impl Future<Output = ()> + Send + 'static) {
        let Some((rescuer, watch)) = &self.rescuer else {
            return drop(self.handle.spawn(work));
        };
        let work: Once = Arc::new(Mutex::new(Some(Box::pin(work))));
        let mine = Arc::clone(&work);
        drop(self.handle.spawn(async move {
            if let Some(work) = take(&mine) {
                work.await;
            }
        }));
        watch.add(Arc::downgrade(&work), rescuer);
    }
}

/// Work handed to the quiet thread and not known to be started, oldest
/// first, and whether a task watches it.
#[derive(Default)]
pub(super) struct Watch(Mutex<Watched>);

#[derive(Default)]
struct Watched {
    pending: VecDeque<(Instant, Weak<Slot>)>,
    watched: bool,
}

/// A watch task's claim: if the task ends without saying it is done (its
/// runtime shut down, or the spawn refused), the next work added starts
/// a new watch, which takes over what is pending.
struct Watching {
    watch: Arc<Watch>,
    done: bool,
}

impl Drop for Watching {
    fn drop(&mut self) {
        if !self.done {
            self.watch.watched().watched = false;
        }
    }
}

impl Watch {
    fn watched(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `work`, handed over now; a task on `rescuer` watches from
    /// now on if none does.
    fn add(self: &Arc<Self>, work: Weak<Slot>, rescuer: &Handle) {
        let mut watched = self.watched();
        watched.pending.push_back((Instant::now(), work));
        if !watched.watched {
            watched.watched = true;
            drop(watched);
            let claim = Watching {
                watch: Arc::clone(self),
                done: false,
            };
            drop(rescuer.spawn(claim.watch(rescuer.clone())));
        }
    }
}

impl Watching {
    /// Until nothing is left to watch: waits until the oldest work is due,
    /// and has `rescuer` do what is due and not started.
    async fn watch(mut self, rescuer: Handle) {
        loop {
            let due = {
                let mut watched = self.watch.watched();
                while watched.pending.front().is_some_and(|(_, w)| taken(w)) {
                    watched.pending.pop_front();
                }
                match watched.pending.front() {
                    Some((at, _)) => *at + RESCUE_AFTER,
                    None => {
                        // Under the lock: work added from now on starts a
                        // new watch.
                        watched.watched = false;
                        self.done = true;
                        return;
                    }
                }
            };
            tokio::time::sleep_until(due.into()).await;
            let late: Vec<Work> = {
                let mut watched = self.watch.watched();
                let now = Instant::now();
                let mut late = Vec::new();
                while let Some((at, _)) = watched.pending.front() {
                    if *at + RESCUE_AFTER > now {
                        break;
                    }
                    if let Some((_, work)) = watched.pending.pop_front()
                        && let Some(work) = work.upgrade().as_ref().and_then(take)
                    {
                        late.push(work);
                    }
                }
                late
            };
            for work in late {
                drop(rescuer.spawn(work));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A runtime whose one thread is held by `hold` until it is released:
    /// a quiet thread that gets no CPU.
    fn held_runtime() -> (tokio::runtime::Runtime, std::sync::mpsc::Sender<()>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let (release, hold) = std::sync::mpsc::channel::<()>();
        rt.spawn(async move {
            let _ = hold.recv();
        });
        (rt, release)
    }

    /// Work the quiet thread does not start in time is done by the
    /// rescuer, once; work it does start is not done again; and the
    /// watch ends when nothing is left to watch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn late_work_is_rescued_once_and_started_work_left_alone() {
        static DONE: AtomicUsize = AtomicUsize::new(0);
        let watch = Arc::new(Watch::default());
        let (quiet, release) = held_runtime();
        let maker = Maker {
            handle: quiet.handle().clone(),
            rescuer: Some((Handle::current(), Arc::clone(&watch))),
        };
        let started = Instant::now();
        for _ in 0..3 {
            maker.run(async {
                DONE.fetch_add(1, Ordering::SeqCst);
            });
        }
        while DONE.load(Ordering::SeqCst) < 3 {
            assert!(started.elapsed() < Duration::from_secs(10), "not rescued");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(started.elapsed() >= RESCUE_AFTER);
        // The quiet thread, free now, finds them taken.
        release.send(()).unwrap();
        ended(&watch).await;
        assert_eq!(DONE.load(Ordering::SeqCst), 3);

        // Work the quiet thread starts at once is its own, and the watch
        // lets it go without doing it again.
        static QUIET: AtomicUsize = AtomicUsize::new(0);
        for _ in 0..100 {
            maker.run(async {
                QUIET.fetch_add(1, Ordering::SeqCst);
            });
        }
        ended(&watch).await;
        assert_eq!(QUIET.load(Ordering::SeqCst), 100);
        quiet.shutdown_background();
    }

    /// Waits until the watch has nothing left and no task watches.
    async fn ended(watch: &Watch) {
        let started = Instant::now();
        loop {
            {
                let watched = watch.watched();
                if !watched.watched && watched.pending.is_empty() {
                    return;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the watch goes on"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A watch whose runtime shut down under it is taken over by the
    /// next work added: nothing pending is left unrescued.
    #[test]
    fn a_watch_whose_runtime_went_is_taken_over() {
        static DONE: AtomicUsize = AtomicUsize::new(0);
        let watch = Arc::new(Watch::default());
        let (quiet, _release) = held_runtime();
        let gone = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let maker = Maker {
            handle: quiet.handle().clone(),
            rescuer: Some((gone.handle().clone(), Arc::clone(&watch))),
        };
        maker.run(async {
            DONE.fetch_add(1, Ordering::SeqCst);
        });
        // Its watch task was spawned on a runtime that never ran it.
        drop(gone);
        assert!(!watch.watched().watched);
        let rescuer = tokio::runtime::Runtime::new().unwrap();
        let maker = Maker {
            handle: quiet.handle().clone(),
            rescuer: Some((rescuer.handle().clone(), Arc::clone(&watch))),
        };
        maker.run(async {
            DONE.fetch_add(1, Ordering::SeqCst);
        });
        rescuer.block_on(async {
            let started = Instant::now();
            while DONE.load(Ordering::SeqCst) < 2 {
                assert!(started.elapsed() < Duration::from_secs(10), "not rescued");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            ended(&watch).await;
        });
        quiet.shutdown_background();
    }
}
