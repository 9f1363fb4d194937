//! Why a call stopped without returning: a limit it hit, or a trap of the guest's own.
//!
//! Told apart by type, not by the text of a message (but for one error
//! whose type wasmtime keeps private, see `is_too_much_data`): wasmtime reports
//! spent fuel and guest faults (a panic reaching `unreachable`, a stack
//! overflow, an access out of bounds) as a [`Trap`], a full instance pool
//! as a [`PoolConcurrencyLimitError`], and the sandbox raises
//! [`DeadlinePassed`] itself. A refused memory growth is no error at all
//! (the guest sees `memory.grow` fail), so the memory limiter's record of
//! it is passed in beside the error. [`classify`] turns all of this into
//! the [`PluginError`] a caller matches on.

use std::time::Duration;

use wasmtime::{PoolConcurrencyLimitError, Trap};

use crate::{PluginError, TimeoutCause};

/// Lines of the guest's stderr a trap message ends with: enough for a
/// panic message or an interpreter's traceback.
const STDERR_LINES: usize = 20;

/// Most characters of wasmtime's own text a `Trap` carries: a failed host
/// call's text ends in a backtrace of the guest's function names, which
/// the guest chooses (a name may be 100 KB), and it is sent to the caller
/// whatever the plugin's result cap.
const TRAP_MESSAGE_CHARS: usize = 4096;

/// The call ran past its deadline: raised by the epoch callback while
/// guest code runs (wasmtime unwinds the guest with it), or by the host's
/// timer when the guest is blocked in a host call, where no guest code
/// runs to be interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ran past the deadline of {limit:?}")]
pub(super) struct DeadlinePassed {
    /// The deadline.
    pub(super) limit: Duration,
    /// Whether the host's timer caught it, not the epoch callback.
    pub(super) blocked_in_host: bool,
}

/// A memory growth the limiter refused: the first, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoryRefused {
    pub(crate) current: usize,
    pub(crate) desired: usize,
}

/// Why a call stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// The call spent its fuel.
    Fuel,
    /// The call ran past its deadline.
    Deadline(DeadlinePassed),
    /// The guest asked for more linear memory than its cap; whatever
    /// stopped it after that (an abort on the failed allocation, mostly)
    /// follows from it.
    Memory(MemoryRefused),
    /// The instance pool had no room. The runtime hands out no more
    /// instance slots than the pool has, so this is the host's fault.
    NoInstance,
    /// The guest trapped: a Rust panic (`unreachable`), a stack
    /// overflow, an access out of bounds, a division by zero.
    Trap(Trap),
    /// The guest handed the host more data at once than its plugin's
    /// limit ([`super::value::lift_bytes`]): its result, or the
    /// arguments of one of its calls to the host.
    TooMuchData,
    /// An error with no trap code: a host import that failed, or a guest
    /// that failed in a way wasmtime reports as an error of its own.
    Other,
}

impl Stop {
    /// Why the call that failed with `error` stopped, given the growth
    /// the memory limiter refused during it, if any.
    pub(super) fn of(error: &wasmtime::Error, memory_refused: Option<MemoryRefused>) -> Stop {
        // The host's timer ends a call blocked in a host call, which no
        // refused growth explains; everything else a refused growth does.
        if let Some(deadline) = error.downcast_ref::<DeadlinePassed>()
            && deadline.blocked_in_host
        {
            return Stop::Deadline(*deadline);
        }
        if let Some(refused) = memory_refused {
            return Stop::Memory(refused);
        }
        if let Some(deadline) = error.downcast_ref::<DeadlinePassed>() {
            return Stop::Deadline(*deadline);
        }
        if error.is::<PoolConcurrencyLimitError>() {
            return Stop::NoInstance;
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => Stop::Fuel,
            Some(trap) => Stop::Trap(*trap),
            None if is_too_much_data(error) => Stop::TooMuchData,
            None => Stop::Other,
        }
    }
}

/// Turns the error a call or an instantiation failed with into a
/// [`PluginError`]; `stderr` is what the guest wrote there, whose last
/// lines go with a trap.
pub(super) fn classify(
    error: wasmtime::Error,
    memory_refused: Option<MemoryRefused>,
    stderr: &str,
) -> PluginError {
    let with_stderr = |mut message: String| {
        // wasmtime's text of a host call's failure carries a backtrace of
        // the guest's own function names, as long as the guest makes them.
        if let Some((at, _)) = message.char_indices().nth(TRAP_MESSAGE_CHARS) {
            let left = message.len() - at;
            message.truncate(at);
            message.push_str(&format!("… ({left} bytes more)"));
        }
        let guest_said = last_lines(stderr, STDERR_LINES);
        if !guest_said.is_empty() {
            message.push_str("; guest stderr: ");
            message.push_str(&guest_said);
        }
        PluginError::Trap { message }
    };
    match Stop::of(&error, memory_refused) {
        Stop::Fuel => PluginError::Timeout {
            cause: TimeoutCause::Fuel,
            message: "the call ran out of fuel".into(),
        },
        Stop::Deadline(DeadlinePassed {
            limit,
            blocked_in_host,
        }) => PluginError::Timeout {
            cause: TimeoutCause::Deadline,
            message: if blocked_in_host {
                format!("the call ran past its deadline of {limit:?} (blocked in a host call)")
            } else {
                "the call ran past its deadline".into()
            },
        },
        Stop::Memory(MemoryRefused { current, desired }) => PluginError::MemoryLimit {
            message: format!(
                "linear memory would grow from {current} to {desired} bytes, over the cap"
            ),
        },
        Stop::NoInstance => PluginError::internal(format!("no sandbox available: {error:#}")),
        Stop::TooMuchData => PluginError::MemoryLimit {
            message: format!(
                "the guest handed the host more data at once than it takes: a result over \
                 its result cap, or arguments to a call to the host over {} bytes",
                super::hostcall::IMPORT_BYTES
            ),
        },
        Stop::Trap(trap) => with_stderr(trap.to_string()),
        Stop::Other => with_stderr(format!("{error:#}")),
    }
}

/// Whether `error` is wasmtime's refusal of a transfer from the guest
/// over the store's limit (`Store::set_hostcall_fuel`). Its type is
/// private to wasmtime, so it is told by its message, the one exception
/// here; `runtime::a_result_too_large_to_lift_is_a_memory_limit` fails if
/// a wasmtime upgrade rewords it.
fn is_too_much_data(error: &wasmtime::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .to_string()
            .contains("fuel allocated for hostcalls has been exhausted")
    })
}

/// Most bytes of the guest's stderr a trap's message carries (to the
/// caller, and to the log): the end of it, where a panic message is.
const STDERR_BYTES: usize = 4 << 10;

/// The last `n` lines of `text` that are not blank, at most
/// [`STDERR_BYTES`] of them (their end, after `…`).
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines[lines.len().saturating_sub(n)..].join("\n");
    if last.len() <= STDERR_BYTES {
        return last;
    }
    let mut from = last.len() - STDERR_BYTES;
    while !last.is_char_boundary(from) {
        from += 1;
    }
    format!("…{}", &last[from..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn running_late() -> wasmtime::Error {
        wasmtime::Error::new(DeadlinePassed {
            limit: SECOND,
            blocked_in_host: false,
        })
    }

    fn blocked_late() -> wasmtime::Error {
        wasmtime::Error::new(DeadlinePassed {
            limit: SECOND,
            blocked_in_host: true,
        })
    }

    const REFUSED: MemoryRefused = MemoryRefused {
        current: 1 << 20,
        desired: 2 << 20,
    };

    #[test]
    fn a_traps_stderr_is_its_last_lines_and_at_most_4_kib() {
        let line = "x".repeat(100 << 10);
        let stderr = format!(
            "first\n{}\npanicked at the end\n",
            vec![line.as_str(); 30].join("\n")
        );
        let said = last_lines(&stderr, STDERR_LINES);
        assert!(
            said.len() <= STDERR_BYTES + '…'.len_utf8(),
            "{} bytes",
            said.len()
        );
        assert!(said.starts_with('…') && said.ends_with("panicked at the end"));
        assert_eq!(last_lines("a\n\n b \nc\n", 2), " b \nc");
    }

    #[test]
    fn spent_fuel_is_a_fuel_timeout() {
        let e = classify(Trap::OutOfFuel.into(), None, "");
        assert_eq!(
            e,
            PluginError::Timeout {
                cause: TimeoutCause::Fuel,
                message: "the call ran out of fuel".into(),
            }
        );
    }

    #[test]
    fn a_deadline_is_a_deadline_timeout_whoever_caught_it() {
        let e = classify(running_late(), None, "");
        assert_eq!(
            e,
            PluginError::Timeout {
                cause: TimeoutCause::Deadline,
                message: "the call ran past its deadline".into(),
            }
        );
        let e = classify(blocked_late(), None, "");
        assert_eq!(
            e,
            PluginError::Timeout {
                cause: TimeoutCause::Deadline,
                message: "the call ran past its deadline of 1s (blocked in a host call)".into(),
            }
        );
    }

    #[test]
    fn the_deadline_is_found_under_context() {
        // wasmtime adds the guest's backtrace as context on the way out.
        let e = running_late().context("error while executing at wasm backtrace: ...");
        assert!(matches!(
            Stop::of(&e, None),
            Stop::Deadline(DeadlinePassed {
                blocked_in_host: false,
                ..
            })
        ));
        let fuel = wasmtime::Error::from(Trap::OutOfFuel).context("backtrace");
        assert_eq!(Stop::of(&fuel, None), Stop::Fuel);
    }

    #[test]
    fn a_refused_growth_explains_the_trap_after_it() {
        for error in [
            Trap::UnreachableCodeReached.into(),
            Trap::OutOfFuel.into(),
            running_late(),
            wasmtime::format_err!("the guest aborted"),
        ] {
            assert_eq!(Stop::of(&error, Some(REFUSED)), Stop::Memory(REFUSED));
        }
        assert_eq!(
            classify(Trap::UnreachableCodeReached.into(), Some(REFUSED), ""),
            PluginError::MemoryLimit {
                message: "linear memory would grow from 1048576 to 2097152 bytes, over the cap"
                    .into(),
            }
        );
    }

    #[test]
    fn a_call_blocked_past_its_deadline_is_a_timeout_even_after_a_refused_growth() {
        assert!(matches!(
            Stop::of(&blocked_late(), Some(REFUSED)),
            Stop::Deadline(_)
        ));
    }

    #[test]
    fn a_panic_and_a_stack_overflow_are_traps_with_the_guests_last_words() {
        let stderr = "starting\n\nthread 'main' panicked at src/lib.rs:9:5:\nno\n\n";
        let e = classify(Trap::UnreachableCodeReached.into(), None, stderr);
        assert_eq!(
            e,
            PluginError::Trap {
                message: "wasm trap: wasm `unreachable` instruction executed; guest stderr: \
                          starting\n\
                          thread 'main' panicked at src/lib.rs:9:5:\nno"
                    .into(),
            }
        );
        let e = classify(Trap::StackOverflow.into(), None, "");
        assert_eq!(
            e,
            PluginError::Trap {
                message: "wasm trap: call stack exhausted".into(),
            }
        );
    }

    #[test]
    fn an_error_without_a_trap_code_is_a_trap_with_its_whole_chain() {
        let e = wasmtime::format_err!("bad descriptor").context("calling wasi:io");
        assert_eq!(
            classify(e, None, "oops"),
            PluginError::Trap {
                message: "calling wasi:io: bad descriptor; guest stderr: oops".into(),
            }
        );
    }

    #[test]
    fn an_interrupt_the_host_did_not_ask_for_is_a_trap() {
        assert_eq!(
            Stop::of(&Trap::Interrupt.into(), None),
            Stop::Trap(Trap::Interrupt)
        );
    }

    #[test]
    fn only_the_last_lines_of_stderr_are_kept() {
        let text: String = (1..=30).map(|i| format!("line {i}\n\n")).collect();
        let kept = last_lines(&text, 20);
        assert!(kept.starts_with("line 11\nline 12"), "{kept}");
        assert!(kept.ends_with("line 30"), "{kept}");
    }
}
