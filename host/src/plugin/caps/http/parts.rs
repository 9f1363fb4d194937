//! Bounds on what a guest may write into an `outgoing-request` it has not sent: its method, authority, and path with query.
//!
//! `wasmtime-wasi-http` (48) keeps each as the guest gave it, with no
//! bound on the method (an `other` method is any token) or on the
//! authority, and 64 KiB on the path. A request is made and written
//! before anything checks it (only sending is checked, by the hooks of
//! `http.rs`), so a plugin granted nothing could keep `MAX_HOST_HANDLES`
//! requests, each holding megabytes of the host's memory outside its
//! linear memory: gigabytes in one call. The setters are defined again
//! here, over the crate's own, refusing (the interface's `err`) a part
//! longer than any request needs: with their headers (`http.rs`), a
//! call's unsent requests hold at most about 10 MiB of the host's memory
//! for a plugin granted nothing, 100 MiB for one granted HTTP.

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::{HostOutgoingRequest as _, Method};
use wasmtime_wasi_http::p2::types::HostOutgoingRequest;

use crate::plugin::sandbox::CallState;

/// The `wasi:http/types` instance `wasmtime-wasi-http` links (48.0.8:
/// its `wit/deps/http.wit`), which guests' imports of any 0.2 version
/// resolve to. A crate that names another would leave this one defined
/// beside it, unused: `runtime::a_guest_cannot_make_the_host_hold_memory_through_long_request_parts`
/// fails then.
const TYPES: &str = "wasi:http/types@0.2.12";

/// Longest method: extension methods are short tokens (the longest
/// registered one, `VERSION-CONTROL`, has 15 bytes).
const MAX_METHOD_BYTES: usize = 64;

/// Longest authority: a host name (at most 253 bytes in DNS) or an IPv6
/// literal, and a port.
const MAX_AUTHORITY_BYTES: usize = 300;

/// Longest path with query for a plugin granted HTTP: what common servers
/// take in a request line (8 KiB).
const PATH_BYTES_GRANTED: usize = 8 << 10;

/// The same for a plugin granted nothing, whose requests are all refused.
const PATH_BYTES_NOT_GRANTED: usize = 1 << 10;

type Request = Resource<HostOutgoingRequest>;
type Setter = wasmtime::Result<(Result<(), ()>,)>;

/// Defines the bounded setters over those `add_only_http_to_linker_async`
/// added to `linker`.
pub(in crate::plugin::caps) fn add_to_linker(
    linker: &mut Linker<CallState>,
) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let defined = define(linker);
    linker.allow_shadowing(false);
    defined
}

fn define(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    let mut types = linker.instance(TYPES)?;
    types.func_wrap(
        "[method]outgoing-request.set-method",
        |mut store: StoreContextMut<'_, CallState>,
         (request, method): (Request, Method)|
         -> Setter {
            if matches!(&method, Method::Other(s) if s.len() > MAX_METHOD_BYTES) {
                return Ok((Err(()),));
            }
            Ok((store.data_mut().http().set_method(request, method)?,))
        },
    )?;
    types.func_wrap(
        "[method]outgoing-request.set-authority",
        |mut store: StoreContextMut<'_, CallState>,
         (request, authority): (Request, Option<String>)|
         -> Setter {
            if authority
                .as_ref()
                .is_some_and(|a| a.len() > MAX_AUTHORITY_BYTES)
            {
                return Ok((Err(()),));
            }
            Ok((store.data_mut().http().set_authority(request, authority)?,))
        },
    )?;
    types.func_wrap(
        "[method]outgoing-request.set-path-with-query",
        |mut store: StoreContextMut<'_, CallState>,
         (request, path): (Request, Option<String>)|
         -> Setter {
            let limit = if store.data().caps.http.hooks.grant.is_some() {
                PATH_BYTES_GRANTED
            } else {
                PATH_BYTES_NOT_GRANTED
            };
            if path.as_ref().is_some_and(|p| p.len() > limit) {
                return Ok((Err(()),));
            }
            Ok((store.data_mut().http().set_path_with_query(request, path)?,))
        },
    )?;
    Ok(())
}
