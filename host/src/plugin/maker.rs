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
//! CPU per call; a watch wakes one at most once each [`RESCUE_AFTER`].

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

/// How long work handed to the quiet thread may wait for it before a
/// thread of ordinary priority does it: that thread gets CPU only when
/// nothing else wants it, and a machine busy with other work may give it
/// none, while the work holds an instance slot, and a used instance the
/// code of its plugin's version.
pub(super) const RESCUE_AFTER: Duration = Duration::from_millis(5);

type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One piece of work, taken once: by the quiet thread or the rescuer.
type Once = Arc<Mutex<Option<Work>>>;

fn take(work: &Once) -> Option<Work> {
    work.lock().unwrap_or_else(|p| p.into_inner()).take()
}

fn taken(work: &Once) -> bool {
    work.lock().unwrap_or_else(|p| p.into_inner()).is_none()
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
        watch.add(work, rescuer);
    }
}

/// Work handed to the quiet thread and not known to be started, oldest
/// first, and whether a task watches it.
#[derive(Default)]
pub(super) struct Watch(Mutex<Watched>);

#[derive(Default)]
struct Watched {
    pending: VecDeque<(Instant, Once)>,
    watched: bool,
}

impl Watch {
    fn watched(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `work`, handed over now; a task on `rescuer` watches from
    /// now on if none does.
    fn add(self: &Arc<Self>, work: Once, rescuer: &Handle) {
        let mut watched = self.watched();
        watched.pending.push_back((Instant::now(), work));
        if !watched.watched {
            watched.watched = true;
            drop(watched);
            drop(rescuer.spawn(Arc::clone(self).watch(rescuer.clone())));
        }
    }

    /// Until nothing is left to watch: waits until the oldest work is due,
    /// and has `rescuer` do what is due and not started.
    async fn watch(self: Arc<Self>, rescuer: Handle) {
        loop {
            let due = {
                let mut watched = self.watched();
                while watched.pending.front().is_some_and(|(_, w)| taken(w)) {
                    watched.pending.pop_front();
                }
                match watched.pending.front() {
                    Some((at, _)) => *at + RESCUE_AFTER,
                    None => {
                        // Under the lock: work added from now on starts a
                        // new watch.
                        watched.watched = false;
                        return;
                    }
                }
            };
            tokio::time::sleep_until(due.into()).await;
            let late: Vec<Work> = {
                let mut watched = self.watched();
                let now = Instant::now();
                let mut late = Vec::new();
                while let Some((at, _)) = watched.pending.front() {
                    if *at + RESCUE_AFTER > now {
                        break;
                    }
                    if let Some((_, work)) = watched.pending.pop_front()
                        && let Some(work) = take(&work)
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
        tokio::time::sleep(RESCUE_AFTER * 4).await;
        assert_eq!(DONE.load(Ordering::SeqCst), 3);
        assert!(!watch.watched().watched);
        assert!(watch.watched().pending.is_empty());

        // Work the quiet thread starts at once is its own, and the watch
        // lets it go without doing it again.
        static QUIET: AtomicUsize = AtomicUsize::new(0);
        for _ in 0..100 {
            maker.run(async {
                QUIET.fetch_add(1, Ordering::SeqCst);
            });
        }
        tokio::time::sleep(RESCUE_AFTER * 4).await;
        assert_eq!(QUIET.load(Ordering::SeqCst), 100);
        assert!(!watch.watched().watched);
        assert!(watch.watched().pending.is_empty());
        quiet.shutdown_background();
    }
}
