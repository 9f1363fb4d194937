//! How much a guest may hand the host in one transfer: its arguments to a call of an import, and its result.
//!
//! wasmtime copies what a guest passes to the host (a string, a list) out
//! of its linear memory before the host function sees it, up to the
//! store's "hostcall fuel" per transfer, and the same allowance bounds the
//! lifting of an export's result. A result may be as large as the
//! plugin's `result_bytes` allows (16 MiB of JSON by default, lifted
//! into several times that); no import needs a tenth of it: the largest
//! is `rpc.call`'s arguments, at most
//! [`DEFAULT_MAX_REQUEST_BYTES`](crate::protocol::DEFAULT_MAX_REQUEST_BYTES), and WASI streams take 4 KiB a
//! write. With one allowance for both, a guest could have the host copy
//! tens of megabytes per call of `log` (a message the log budget then
//! drops) or any other import taking a string, each call in flight
//! holding that much more of the host's memory than its own linear
//! memory, for a few units of fuel.
//!
//! So the store's allowance is [`IMPORT_BYTES`] (8 MiB) while the guest
//! runs, and the result's only once the outermost call into the guest has
//! returned, which is when wasmtime lifts the result. A call hook follows the
//! transitions: the guest may be called again while it runs (its
//! `cabi_realloc`, when the host hands it a string), so the result's
//! allowance waits for the depth to come back to zero.

use wasmtime::{CallHook, Store, StoreContextMut};

use super::sandbox::CallState;

/// The most a guest hands the host in one call of an import: twice
/// `rpc.call`'s largest arguments, so that arguments somewhat over that
/// reach the host, which refuses them with an error the guest can handle.
pub(crate) const IMPORT_BYTES: usize = 2 * crate::protocol::DEFAULT_MAX_REQUEST_BYTES;

/// Where a store is in its calls into the guest.
#[derive(Debug, Default)]
pub(crate) struct Transfers {
    /// Calls into the guest under way (0: the host runs).
    depth: u32,
    /// The allowance for lifting a result.
    result_bytes: usize,
}

/// Arms `store` with [`IMPORT_BYTES`] for the arguments of the guest's
/// calls to the host and `result_bytes` for lifting a result.
pub(crate) fn bound(store: &mut Store<CallState>, result_bytes: usize) {
    store.data_mut().transfers = Transfers {
        depth: 0,
        result_bytes,
    };
    store.set_hostcall_fuel(result_bytes);
    store.call_hook(follow);
}

/// Makes `store` ready for its next call, as [`bound`] left it: no call
/// into the guest counted as under way, the result's allowance set. A
/// call whose future was dropped inside the guest (its deadline cut by
/// the host's timer) never returned through the hook, and would leave
/// its depth counted; no store is called again after such a call today,
/// and this keeps it so whatever reuses one.
pub(crate) fn rearm(store: &mut Store<CallState>) {
    let transfers = &mut store.data_mut().transfers;
    transfers.depth = 0;
    let result_bytes = transfers.result_bytes;
    store.set_hostcall_fuel(result_bytes);
}

fn follow(mut store: StoreContextMut<'_, CallState>, hook: CallHook) -> wasmtime::Result<()> {
    let transfers = &mut store.data_mut().transfers;
    match hook {
        CallHook::CallingWasm => {
            transfers.depth += 1;
            if transfers.depth == 1 {
                store.set_hostcall_fuel(IMPORT_BYTES);
            }
        }
        CallHook::ReturningFromWasm => {
            transfers.depth = transfers.depth.saturating_sub(1);
            if transfers.depth == 0 {
                let result_bytes = transfers.result_bytes;
                store.set_hostcall_fuel(result_bytes);
            }
        }
        CallHook::CallingHost | CallHook::ReturningFromHost => {}
    }
    Ok(())
}
