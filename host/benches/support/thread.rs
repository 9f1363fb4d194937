//! What the calling thread has used so far, from Linux's `/proc/thread-self`: CPU time and minor page faults.

use std::time::Duration;

/// CPU time this thread has run (`schedstat`, nanoseconds on the CPU);
/// `None` where the kernel does not say.
pub fn cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Minor page faults this thread has taken (`stat`, field 10); `None`
/// where the kernel does not say.
pub fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // The command name may hold spaces; the fields after it do not.
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split_whitespace().nth(7)?.parse().ok()
}
