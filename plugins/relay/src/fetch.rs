//! An HTTP GET through `wasi:http/outgoing-handler`: the body as text, or why there is none.
//!
//! The host decides whether the request may leave (the sidecar's
//! `allowed_hosts`) and how long and big the answer may be; its refusals
//! arrive here as `wasi:http` error codes (`HttpRequestDenied`,
//! `HttpResponseBodySize`, `HttpResponseTimeout`, ...), which this
//! module passes on by name.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{ErrorCode, Fields, Method, OutgoingRequest, Scheme, http_error_code};
use wasip2::io::streams::StreamError;

/// Bytes asked for per read of the response body.
const READ_CHUNK: u64 = 64 << 10;

/// The body of `url` (`http://` or `https://`) as text (invalid UTF-8
/// replaced); a status other than 2xx is an error carrying the body.
pub(crate) fn get(url: &str) -> Result<String, String> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        return Err("only http:// and https:// URLs are supported".into());
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() {
        return Err("the URL has no host".into());
    }

    let request = OutgoingRequest::new(Fields::new());
    let invalid = |what: &str| format!("invalid {what}");
    request
        .set_method(&Method::Get)
        .map_err(|()| invalid("method"))?;
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| invalid("scheme"))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| invalid("host"))?;
    request
        .set_path_with_query(Some(&path))
        .map_err(|()| invalid("path"))?;

    let pending = outgoing_handler::handle(request, None).map_err(describe)?;
    let response = loop {
        match pending.get() {
            Some(outcome) => break outcome,
            None => pending.subscribe().block(),
        }
    };
    let response = response
        .map_err(|()| "the response was already taken".to_string())?
        .map_err(describe)?;
    let status = response.status();
    let body = response
        .consume()
        .map_err(|()| "the response body was already taken".to_string())?;
    let stream = body
        .stream()
        .map_err(|()| "the response body stream was already taken".to_string())?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(READ_CHUNK) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            // The body failed part-way: what was read is not the body.
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(match http_error_code(&e) {
                    Some(code) => describe(code),
                    None => e.to_debug_string(),
                });
            }
        }
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if (200..300).contains(&status) {
        Ok(text)
    } else {
        Err(format!("HTTP status {status}: {text}"))
    }
}

/// An error code by its `wasi:http` name, with its details.
fn describe(code: ErrorCode) -> String {
    format!("{code:?}")
}
