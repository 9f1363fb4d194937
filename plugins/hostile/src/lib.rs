//! The `hostile` test plugin: functions that loop, leak, overflow the stack,
//! panic, return too much, flood the log, or reach for files, environment
//! and network, so the host can prove that its sandbox and limits contain
//! them.

use std::hint::black_box;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

callme_guest::generate_v0_2!();

const MIB: usize = 1 << 20;

static COUNTER: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Requests `fire` sent, kept for as long as the instance lives.
    static FIRED: std::cell::RefCell<Vec<wasip2::http::types::FutureIncomingResponse>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

struct Hostile;

impl Guest for Hostile {
    fn spin() {
        let mut i = 0u64;
        loop {
            i = black_box(i.wrapping_add(1));
        }
    }

    fn bomb() -> u64 {
        let mut leaked = 0u64;
        loop {
            let block = vec![1u8; MIB];
            black_box(&block);
            Vec::leak(block);
            leaked = black_box(leaked + 1);
        }
    }

    fn recurse(n: u64) -> u64 {
        dive(n)
    }

    fn big_frame(kib: u32) -> u64 {
        match kib {
            0..=64 => frame::<{ 64 << 10 }>(),
            65..=512 => frame::<{ 512 << 10 }>(),
            _ => frame::<{ 4096 << 10 }>(),
        }
    }

    fn boom(message: String) {
        panic!("{message}");
    }

    fn huge(mb: u32) -> String {
        "x".repeat(mb as usize * MIB)
    }

    fn read_file(path: String) -> Result<String, String> {
        std::fs::read_to_string(path).map_err(|e| e.to_string())
    }

    fn read_env(name: String) -> Result<String, String> {
        std::env::var(name).map_err(|e| e.to_string())
    }

    fn connect(addr: String) -> Result<String, String> {
        std::net::TcpStream::connect(addr)
            .map(|_| "connected".to_string())
            .map_err(|e| e.to_string())
    }

    fn sleep(ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    fn counter() -> u64 {
        COUNTER.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn print(text: String) {
        // Errors are ignored: a host without stdio must not turn this into a trap.
        let mut out = std::io::stdout();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        let mut err = std::io::stderr();
        let _ = err.write_all(text.as_bytes());
        let _ = err.flush();
    }

    fn spam(lines: u32) {
        let mut text = String::new();
        for i in 0..lines {
            let line = format!("spam line {i:08}");
            callme_guest::info!("{line}");
            text.push_str(&line);
            text.push('\n');
        }
        Self::print(text);
    }

    fn shout(mib: u32, times: u32) {
        let message = "!".repeat(mib as usize * MIB);
        // The host hands the guest a list first, calling its allocator
        // from within the import: a call into the guest inside a call.
        black_box(wasip2::random::random::get_random_bytes(16));
        for _ in 0..times {
            callme_guest::log(callme_guest::Level::Error, black_box(&message));
        }
    }

    fn fire(authority: String, n: u32) -> Result<u32, String> {
        use wasip2::http::outgoing_handler;
        use wasip2::http::types::{Fields, OutgoingRequest, Scheme};
        for i in 0..n {
            let request = OutgoingRequest::new(Fields::new());
            request
                .set_scheme(Some(&Scheme::Http))
                .and_then(|()| request.set_authority(Some(&authority)))
                .and_then(|()| request.set_path_with_query(Some("/")))
                .map_err(|()| format!("invalid authority {authority}"))?;
            let pending = outgoing_handler::handle(request, None)
                .map_err(|e| format!("request {i}: {e:?}"))?;
            FIRED.with(|fired| fired.borrow_mut().push(pending));
        }
        // Time for the host to connect and send them.
        std::thread::sleep(Duration::from_millis(300));
        Ok(n)
    }

    fn pathless(n: u32) -> u32 {
        use wasip2::http::outgoing_handler;
        use wasip2::http::types::{Fields, OutgoingRequest};
        let mut refused = 0;
        for _ in 0..n {
            let request = OutgoingRequest::new(Fields::new());
            if request.set_authority(Some("pathless.callme.test")).is_ok()
                && outgoing_handler::handle(request, None).is_err()
            {
                refused += 1;
            }
        }
        refused
    }

    fn flood_call(server: String, kib: u32, item: String) -> Result<String, String> {
        let mut args = String::with_capacity(kib as usize * 1024 + item.len() + 2);
        args.push('[');
        while args.len() < kib as usize * 1024 {
            args.push_str(&item);
            args.push(',');
        }
        args.push_str(&item);
        args.push(']');
        callme_guest::v0_2::rpc::call(&server, "add", &args)
            .map_err(|e| format!("{}: {}", e.type_, e.message))
    }

    fn random(mib: u32) -> u64 {
        wasip2::random::random::get_random_bytes(u64::from(mib) * MIB as u64).len() as u64
    }

    fn uptime() -> u64 {
        wasip2::clocks::monotonic_clock::now()
    }

    fn hoard(mib: u32) -> Result<u64, String> {
        use wasip2::http::types::{Fields, OutgoingRequest};
        let goal = u64::from(mib) * MIB as u64;
        let chunk = vec![7u8; MIB];
        let mut written = 0u64;
        // Kept, never sent: each holds what was written into its body.
        let mut kept = Vec::new();
        while written < goal {
            let request = OutgoingRequest::new(Fields::new());
            let body = request
                .body()
                .map_err(|()| format!("no body after {written} bytes"))?;
            let stream = body
                .write()
                .map_err(|()| format!("no body stream after {written} bytes"))?;
            loop {
                let permit = stream
                    .check_write()
                    .map_err(|e| format!("{e:?} after {written} bytes"))?;
                if permit == 0 || written >= goal {
                    break;
                }
                let n = (permit as usize).min(chunk.len());
                stream
                    .write(&chunk[..n])
                    .map_err(|e| format!("{e:?} after {written} bytes"))?;
                written += n as u64;
            }
            // Children first when dropped: the stream, its body, the request.
            kept.push((stream, body, request));
        }
        black_box(&kept);
        drop(kept);
        Ok(written)
    }

    fn hoard_parts(part: String, bytes: u32, count: u32) -> Result<u64, String> {
        use wasip2::http::types::{Fields, Method, OutgoingRequest};
        let value = "a".repeat(bytes as usize);
        let path = format!("/{}", &value[value.len().min(1)..]);
        let mut taken = 0u64;
        // Kept, never sent: each holds what the host took.
        let mut kept = Vec::new();
        for _ in 0..count {
            let request = OutgoingRequest::new(Fields::new());
            let set = match part.as_str() {
                "method" => request.set_method(&Method::Other(value.clone())),
                "authority" => request.set_authority(Some(&value)),
                "path" => request.set_path_with_query(Some(&path)),
                other => return Err(format!("no part {other:?}")),
            };
            if set.is_ok() {
                taken += u64::from(bytes);
            }
            kept.push(request);
        }
        black_box(&kept);
        Ok(taken)
    }
}

/// A checksum of an `N`-byte array that lives on the stack: `black_box`
/// keeps it from being optimised away or moved to the heap.
#[inline(never)]
fn frame<const N: usize>() -> u64 {
    let mut block = [1u8; N];
    black_box(&mut block);
    block.iter().map(|b| u64::from(*b)).sum()
}

/// One level deeper, forever; the addition after the call keeps it from
/// being a tail call and `black_box` keeps it from becoming a loop.
#[allow(unconditional_recursion, reason = "overflowing the stack is the point")]
fn dive(depth: u64) -> u64 {
    black_box(dive(black_box(depth.wrapping_add(1)))).wrapping_add(depth)
}

export!(Hostile);
