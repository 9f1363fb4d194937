//! The stack a thread needs to read whatever the broker passes on: headers nested as deep as a frame holds.
//!
//! AMQP field tables and arrays nest, and the broker passes a message's
//! headers on as its publisher wrote them. A content header fits one
//! frame (`frame_max`, 128 KiB by default in RabbitMQ 3.x and 4.x: its
//! configuration guide, `frame_max`), and an array costs 5 bytes, so a
//! header can nest some 26,000 levels deep. lapin 4.12 (amq-protocol
//! 10.6) parses such a table by recursion on its I/O thread, and the
//! value is dropped by recursion wherever the delivery ends: about 1.3 to
//! 2.5 KiB of stack a level in a release build (between 32 and 64 MiB
//! for the deepest), and between 256 and 512 MiB for the deepest in a
//! debug build (with the parser's crates optimised, as `Cargo.toml` has
//! it). On a thread's default 2 MiB stack one such message aborts
//! the whole process, and the broker then hands it to the next consumer.
//!
//! Neither library takes a depth limit, and lapin spawns its I/O thread
//! with the process's default stack, which only `RUST_MIN_STACK` sets.
//! `callme` sets it before any thread starts ([`thread_stack_to_set`]). A stack is
//! address space until it is used: a thread that never reads a deep
//! header costs no more memory than before.

/// The stack every thread without a size of its own gets when
/// `RUST_MIN_STACK` is not set ([`thread_stack_to_set`]): enough for the
/// deepest header a 128 KiB frame holds with room to spare, 256 MiB in a
/// release build and 1 GiB in a debug one. It is address space: a
/// thread's stack takes memory only as deep as it was used.
pub const MIN_THREAD_STACK: usize = if cfg!(debug_assertions) {
    1 << 30
} else {
    256 << 20
};

/// What `RUST_MIN_STACK` should be set to before the first thread starts,
/// so that lapin's I/O threads and the runtimes' workers can read and drop
/// any header the broker passes on: [`MIN_THREAD_STACK`] when the
/// variable is not set (`asked`, as the environment has it). A value the
/// operator set is kept, smaller or not: on a machine with strict
/// overcommit, say, where every stack counts against the commit limit.
/// `callme` sets it first thing; a program of its own that talks to
/// brokers whose publishers it does not trust should too (Rust reads the
/// variable when the first thread is spawned, and not after).
pub fn thread_stack_to_set(asked: Option<&str>) -> Option<usize> {
    asked.is_none().then_some(MIN_THREAD_STACK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_stack_is_raised_and_one_the_operator_set_kept() {
        assert_eq!(thread_stack_to_set(None), Some(MIN_THREAD_STACK));
        assert_eq!(thread_stack_to_set(Some("8388608")), None);
        assert_eq!(thread_stack_to_set(Some("1073741824")), None);
    }
}
