//! The wire protocol: names of exchanges and queues, request and response bodies.
//!
//! Everything a program in another language needs to speak to callme is
//! here and in `docs/protocol.md`: a request is a JSON object published to
//! the server's exchange, a response is a JSON object published to the
//! exchange named in the request's `reply_to`. This module is pure data and
//! codec: no broker, no plugin runtime.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::json;

/// The content type of every request and response body.
pub const CONTENT_TYPE: &str = "application/json";

/// The reserved function every server answers with a [`Description`].
pub const DESCRIBE: &str = "_describe";

/// The request header holding when the caller sent it, in milliseconds
/// since the Unix epoch (the name RabbitMQ's message timestamp
/// interceptor uses): a host measures how long requests wait in its queue
/// from it. The AMQP `timestamp` property has whole seconds only.
pub const TIMESTAMP_IN_MS: &str = "timestamp_in_ms";

/// The request header holding how many hops the request is from the
/// client that started its chain of calls: absent (0) from a client, one
/// more on each call a plugin makes while serving a request. A plugin's
/// call one hop past its limit is refused, so servers calling each other
/// in a cycle stop.
pub const CALL_DEPTH: &str = "x-callme-depth";

/// The request header naming the caller's reply queue
/// (`client_USER_queue_UUID`). A busy server that may publish to the
/// default exchange sends the reply there, with that queue's name as the
/// routing key, pipelined on one channel: the default exchange always
/// exists and the queue exists exactly as long as its caller, so a reply
/// to a caller that left is dropped by the broker rather than a publish to
/// a missing exchange, which closes the channel it came on. A server that
/// may not, or does not know the header, replies by `reply_to`. See
/// `docs/protocol.md`, "Pipelined replies".
pub const REPLY_QUEUE: &str = "x-callme-reply-queue";

/// Whether `queue`, named in [`REPLY_QUEUE`], can be taken for a request
/// whose `reply_to` is `reply_to`: only a proxy's reply queue
/// (`client_USER_queue_ID`, `ID` 32 to 36 hex digits and dashes) paired
/// with the reply exchange the request names (`client_USER_ex_ID`, the
/// same user and ID). A server publishes where a caller says only within
/// that pair, so a caller can neither make it write into a server's
/// request queue nor send a reply to another caller's queue by any route
/// `reply_to` did not already name.
pub fn is_reply_queue_of(queue: &str, reply_to: &str) -> bool {
    let (Some((user, id)), Some(paired)) = (
        client_name_parts(queue, "_queue_"),
        client_name_parts(reply_to, "_ex_"),
    ) else {
        return false;
    };
    queue.len() <= 255
        && !user.is_empty()
        && (32..=36).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && paired == (user, id)
}

/// The user and ID of `client_USER{infix}ID`. The ID is hex digits and
/// dashes, so the last `infix` is the one that ends the user's name.
fn client_name_parts<'a>(name: &'a str, infix: &str) -> Option<(&'a str, &'a str)> {
    name.strip_prefix("client_")?.rsplit_once(infix)
}

/// The type of a server queue (RabbitMQ's "Queues" and "Quorum Queues"
/// guides): `x-queue-type` when the queue is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// On one broker node; lost with that node.
    #[default]
    Classic,
    /// Replicated over a cluster's nodes (Raft): survives a node going away.
    Quorum,
}

/// What `_describe` answers: a server id's functions, its version, and how
/// it serves them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    /// The server id.
    pub server: String,
    /// The plugin's content hash (SHA-256, lowercase hex), or `native`.
    pub version: String,
    /// Calls in flight at most for this id (plugins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Whether instances are kept between calls (plugins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reuse_instances: Option<bool>,
    /// Fresh spare instances made ahead of calls (plugins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarm: Option<usize>,
    /// Every function, sorted by name.
    pub functions: Vec<DescribedFunction>,
    /// The capabilities a plugin imports (`config`, `http`, `rpc`), sorted;
    /// absent when it imports none. Whether its sidecar grants them is
    /// not said.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
}

/// One function in a [`Description`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribedFunction {
    /// The name a caller uses: `add`, or `stats.mean` for a function of an
    /// exported interface.
    pub name: String,
    /// The WIT signature, e.g. `func(a: s64, b: s64) -> s64`.
    pub signature: String,
}

/// Requests larger than this are refused with `BadRequest` before they are
/// parsed: a plugin call takes its arguments in memory, and a few MiB is far
/// beyond any sane argument list while small enough that a burst of them
/// cannot exhaust the host.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// The exchange a server with id `server_id` consumes requests from.
pub fn server_exchange(server_id: &str) -> String {
    format!("server_{server_id}_ex")
}

/// The queue bound to [`server_exchange`].
pub fn server_queue(server_id: &str) -> String {
    format!("server_{server_id}_queue")
}

/// The exchange a proxy receives replies on.
pub fn client_exchange(user: &str, uid: &str) -> String {
    format!("client_{user}_ex_{uid}")
}

/// The queue bound to [`client_exchange`].
pub fn client_queue(user: &str, uid: &str) -> String {
    format!("client_{user}_queue_{uid}")
}

/// Whether `id` can name a server: the broker limits names to 255 bytes and
/// the permission regexes of the seed's recipes assume no `.*` surprises, so
/// ids are restricted to letters, digits, `-`, `_` and `.`.
pub fn is_valid_server_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `id` as a message may show it: escaped, and cut to the longest a
/// server id may be (an id comes from a caller or a guest, as long as
/// its memory, and escaping can make each byte six).
pub fn shown_id(id: &str) -> String {
    const SHOWN: usize = 200;
    match id.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}…", id[..cut].escape_debug()),
        None => id.escape_debug().to_string(),
    }
}

/// The arguments of a call: positional, by name, or both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Args {
    /// Positional arguments, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<Value>,
    /// Arguments by parameter name.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub kwargs: Map<String, Value>,
}

impl Args {
    /// Positional arguments only.
    pub fn positional(args: Vec<Value>) -> Self {
        Args {
            args,
            kwargs: Map::new(),
        }
    }

    /// Arguments by name only.
    pub fn keywords(kwargs: Map<String, Value>) -> Self {
        Args {
            args: Vec::new(),
            kwargs,
        }
    }
}

/// A request body: `{"func": "add", "args": [1, 2], "kwargs": {}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Request {
    /// The function to call, dotted for functions of exported interfaces.
    pub func: String,
    /// The arguments.
    #[serde(flatten)]
    pub args: Args,
}

/// A request is read field by field, each at most once, and its arguments
/// with every object's keys unique (see `json.rs`): a flattened
/// field would have the whole body buffered first, about doubling what a
/// large request takes in memory while it is parsed.
impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Request;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a request object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Request, A::Error> {
                use serde::de::Error;
                let (mut func, mut args, mut kwargs) = (None, None, None);
                while let Some(key) = map.next_key::<String>()? {
                    let twice = match key.as_str() {
                        "func" => func.replace(map.next_value::<String>()?).is_some(),
                        "args" => args
                            .replace(map.next_value_seed(json::UniqueArray)?)
                            .is_some(),
                        "kwargs" => kwargs
                            .replace(map.next_value_seed(json::UniqueObject)?)
                            .is_some(),
                        _ => {
                            return Err(A::Error::custom(format_args!(
                                "unknown field `{}`, expected `func`, `args` or `kwargs`",
                                shown_id(&key)
                            )));
                        }
                    };
                    if twice {
                        return Err(A::Error::custom(format_args!("`{key}` is given twice")));
                    }
                }
                Ok(Request {
                    func: func.ok_or_else(|| A::Error::missing_field("func"))?,
                    args: Args {
                        args: args.unwrap_or_default(),
                        kwargs: kwargs.unwrap_or_default(),
                    },
                })
            }
        }
        d.deserialize_map(Fields)
    }
}

/// Parses JSON text as a request's arguments are read: an object that
/// gives one key twice is refused, anywhere in it (see [`Request::decode`]).
///
/// # Errors
///
/// The text is not one JSON value, or names a key twice in an object.
pub fn parse_json(text: &str) -> Result<Value, serde_json::Error> {
    use serde::de::DeserializeSeed as _;
    let mut de = serde_json::Deserializer::from_str(text);
    let value = json::Unique.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Bytes of the request size limit each JSON object of a request needs:
/// 131,072 objects in a request of the default 4 MiB, about 90 MB parsed.
const BYTES_PER_OBJECT: usize = 32;

/// Bytes of the request size limit each JSON array needs: an array of one
/// number (`[0],`, 4 bytes) takes about 170 bytes parsed, so a request of
/// them alone is held to about 90 MB too.
const BYTES_PER_ARRAY: usize = 8;

/// Objects a request may always hold, however small its size limit.
const MIN_OBJECTS: usize = 1024;

/// The JSON objects and arrays of `text`: its `{` and `[` outside strings.
fn count_containers(text: &str) -> (usize, usize) {
    let (mut in_string, mut escaped) = (false, false);
    let (mut objects, mut arrays) = (0, 0);
    for b in text.bytes() {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'{') => objects += 1,
            (false, _, b'[') => arrays += 1,
            (false, _, _) => {}
        }
    }
    (objects, arrays)
}

/// Why `text` holds more JSON objects and arrays than a body of at most
/// `max_bytes` may, if it does.
///
/// A JSON object takes about 700 bytes once parsed, from as few as 2 of
/// text, and an array about 170 from 4: a body of tiny objects would take
/// about 90 times its size (350 MB for 4 MiB), of tiny arrays about 40
/// times, before anything in it is checked.
pub(crate) fn too_many_containers(text: &str, max_bytes: usize) -> Option<String> {
    let (objects, arrays) = count_containers(text);
    let allowed = (max_bytes / BYTES_PER_OBJECT).max(MIN_OBJECTS) * BYTES_PER_OBJECT;
    let used = objects
        .saturating_mul(BYTES_PER_OBJECT)
        .saturating_add(arrays.saturating_mul(BYTES_PER_ARRAY));
    (used > allowed).then(|| {
        format!(
            "holds {objects} JSON objects and {arrays} arrays, more than its size limit \
             allows: each object counts {BYTES_PER_OBJECT} bytes and each array \
             {BYTES_PER_ARRAY} against {allowed} (the limit, {max_bytes} bytes, or \
             {MIN_OBJECTS} objects at least)"
        )
    })
}

/// Most characters of a parse error a `BadRequest` quotes: serde's text
/// quotes a value it did not expect whole (a 4 MiB string given for
/// `args`), which the reply would carry back several times its size.
const PARSE_ERROR_CHARS: usize = 300;

/// A parse error's `text` cut to [`PARSE_ERROR_CHARS`] characters, saying
/// so and where in the body the error is.
fn cut(mut text: String, line: usize, column: usize) -> String {
    if let Some((at, _)) = text.char_indices().nth(PARSE_ERROR_CHARS) {
        let left = text[at..].chars().count();
        text.truncate(at);
        text.push_str(&format!(
            "… ({left} characters more) at line {line} column {column}"
        ));
    }
    text
}

impl Request {
    /// Decodes a request body.
    ///
    /// # Errors
    ///
    /// A [`RemoteError`] of kind [`ErrorKind::BadRequest`] saying what is
    /// wrong: too large, not UTF-8, not JSON, or not a request object.
    pub fn decode(body: &[u8], max_bytes: usize) -> Result<Request, RemoteError> {
        if body.len() > max_bytes {
            return Err(RemoteError::new(
                ErrorKind::BadRequest,
                format!(
                    "request body is {} bytes, the limit is {max_bytes}",
                    body.len()
                ),
            ));
        }
        let text = std::str::from_utf8(body).map_err(|e| {
            RemoteError::new(
                ErrorKind::BadRequest,
                format!("request body is not UTF-8: {e}"),
            )
        })?;
        if let Some(refusal) = too_many_containers(text, max_bytes) {
            return Err(RemoteError::new(
                ErrorKind::BadRequest,
                format!("request body {refusal}"),
            ));
        }
        serde_json::from_str(text).map_err(|e| {
            RemoteError::new(
                ErrorKind::BadRequest,
                format!(
                    "request body is not a valid request: {}",
                    cut(e.to_string(), e.line(), e.column())
                ),
            )
        })
    }

    /// Encodes a request body.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a struct of strings and JSON values cannot fail.
        serde_json::to_vec(self).expect("request serialises")
    }
}

/// The kind of a remote error, as it travels in `error.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server has no function of that name.
    NoSuchFunction,
    /// Wrong arity, unknown keyword, wrong type or out-of-range value.
    InvalidArguments,
    /// The call ran out of fuel or past its deadline.
    Timeout,
    /// The call hit its memory cap or its result was too large.
    MemoryLimit,
    /// The guest trapped (a panic, an abort, a stack overflow).
    Trap,
    /// The function returned `result::err`; `data` holds the payload.
    GuestError,
    /// The request could not be decoded.
    BadRequest,
    /// The server failed for a reason of its own.
    Internal,
    /// A kind this version does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NoSuchFunction => "NoSuchFunction",
            ErrorKind::InvalidArguments => "InvalidArguments",
            ErrorKind::Timeout => "Timeout",
            ErrorKind::MemoryLimit => "MemoryLimit",
            ErrorKind::Trap => "Trap",
            ErrorKind::GuestError => "GuestError",
            ErrorKind::BadRequest => "BadRequest",
            ErrorKind::Internal => "Internal",
            ErrorKind::Unknown => "Unknown",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it travels in a response: `{"type", "message", "data"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RemoteError {
    /// What went wrong, for a program.
    #[serde(rename = "type")]
    pub kind: ErrorKind,
    /// What went wrong, for a person.
    pub message: String,
    /// Details: the guest's `result::err` payload, or null.
    #[serde(default)]
    pub data: Value,
}

impl RemoteError {
    /// An error without data.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RemoteError {
            kind,
            message: message.into(),
            data: Value::Null,
        }
    }

    /// Attaches data.
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = data;
        self
    }
}

/// A response body: `{"result": ...}` or `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    /// The function returned.
    Result(Value),
    /// The call failed.
    Error(RemoteError),
}

impl Response {
    /// Encodes a response body.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising JSON values and strings cannot fail.
        serde_json::to_vec(self).expect("response serialises")
    }

    /// Decodes a response body, whatever its size.
    ///
    /// # Errors
    ///
    /// The serde error when the body is not a response.
    #[deprecated(
        note = "use `Response::decode_within`: a reply from any server is held to a limit, \
                as the proxies hold theirs"
    )]
    pub fn decode(body: &[u8]) -> Result<Response, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// Decodes a response body of at most `max_bytes`, held to the JSON
    /// objects and arrays a request of that size may hold (see
    /// [`Request::decode`]): what a server can make its caller take in
    /// memory.
    ///
    /// # Errors
    ///
    /// What is wrong with the body, for a person.
    pub fn decode_within(body: &[u8], max_bytes: usize) -> Result<Response, String> {
        if body.len() > max_bytes {
            return Err(format!(
                "the reply is {} bytes, the limit is {max_bytes}",
                body.len()
            ));
        }
        let text = std::str::from_utf8(body).map_err(|e| format!("the reply is not UTF-8: {e}"))?;
        if let Some(refusal) = too_many_containers(text, max_bytes) {
            return Err(format!("the reply {refusal}"));
        }
        serde_json::from_str(text).map_err(|e| cut(e.to_string(), e.line(), e.column()))
    }

    /// The response as a `Result`.
    pub fn into_result(self) -> Result<Value, RemoteError> {
        match self {
            Response::Result(v) => Ok(v),
            Response::Error(e) => Err(e),
        }
    }
}

impl From<Result<Value, RemoteError>> for Response {
    fn from(r: Result<Value, RemoteError>) -> Self {
        match r {
            Ok(v) => Response::Result(v),
            Err(e) => Response::Error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_of_more_objects_or_arrays_than_its_size_allows_is_refused_unparsed() {
        let max = 4 << 20;
        let tiny = vec![r#"{"a":0}"#; 200_000].join(",");
        let body = format!(r#"{{"func":"f","args":[[{tiny}]]}}"#);
        assert!(body.len() < max);
        let e = Request::decode(body.as_bytes(), max).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(
            e.message
                .contains("200001 JSON objects and 2 arrays, more than its size limit allows"),
            "{}",
            e.message
        );
        // Arrays count a quarter of an object each: 600,000 of `[0]`
        // (2.4 MB) are too many, 500,000 are not.
        for (n, ok) in [(600_000, false), (500_000, true)] {
            let tiny = vec!["[0]"; n].join(",");
            let body = format!(r#"{{"func":"f","args":[{tiny}]}}"#);
            assert_eq!(
                Request::decode(body.as_bytes(), max).is_ok(),
                ok,
                "{n} arrays"
            );
        }
        // Braces in strings (escaped quotes among them) are no objects.
        let text = vec![r#""{\"{""#; 200_000].join(",");
        let body = format!(r#"{{"func":"f","args":[[{text}]]}}"#);
        let r = Request::decode(body.as_bytes(), max).unwrap();
        assert_eq!(r.args.args[0].as_array().map(Vec::len), Some(200_000));
        // As many as the limit allows are read (with the request's own
        // object and its two arrays, a quarter of an object each), and
        // not one object more.
        let allowed = vec!["{}"; 131_070].join(",");
        let body = format!(r#"{{"func":"f","args":[[{allowed}]]}}"#);
        assert!(Request::decode(body.as_bytes(), max).is_ok());
        let body = format!(r#"{{"func":"f","args":[[{allowed},{{}}]]}}"#);
        assert!(Request::decode(body.as_bytes(), max).is_err());
    }
    use serde_json::json;

    #[test]
    fn json_text_is_read_as_requests_are() {
        assert_eq!(
            parse_json(r#" {"a": [1, {"b": 2}]} "#).unwrap(),
            json!({"a": [1, {"b": 2}]})
        );
        for bad in [r#"{"a":1,"a":2}"#, "[1] 2", "", "[1,"] {
            assert!(parse_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_are_shown_escaped_and_cut() {
        assert_eq!(shown_id("calc"), "calc");
        assert_eq!(shown_id("a\nb"), "a\\nb");
        let long = shown_id(&"é".repeat(300));
        assert_eq!(long, format!("{}…", "é".repeat(200)));
    }

    #[test]
    fn only_the_queue_paired_with_reply_to_is_taken_from_the_header() {
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let ok = |user: &str, id: &str| {
            is_reply_queue_of(&client_queue(user, id), &client_exchange(user, id))
        };
        assert!(ok("guest", uid));
        assert!(ok("ann.lee", &uid.replace('-', "")));
        assert!(ok("a_queue_b", uid));
        assert!(ok("a_ex_b", uid));
        let guest_ex = client_exchange("guest", uid);
        // Another caller's queue: another user, or the same user's other proxy.
        assert!(!is_reply_queue_of(&client_queue("olivia", uid), &guest_ex));
        assert!(!is_reply_queue_of(&client_queue("guest_x", uid), &guest_ex));
        let other = "2b4e28ba-2fa1-11d2-883f-0016d3cca427";
        assert!(!is_reply_queue_of(&client_queue("guest", other), &guest_ex));
        // Not a proxy's reply queue at all.
        assert!(!is_reply_queue_of("server_calc_queue", &guest_ex));
        assert!(!is_reply_queue_of(&guest_ex, &guest_ex));
        assert!(!is_reply_queue_of("amq.gen-abc", &guest_ex));
        assert!(!is_reply_queue_of(
            &client_queue("guest", uid),
            "server_calc_ex"
        ));
        assert!(!ok("", uid));
        assert!(!ok("guest", "not-an-id"));
        assert!(!ok("guest", &format!("{uid}x")));
        assert!(!ok(&"u".repeat(240), uid));
    }

    #[test]
    fn a_description_reads_as_documented() {
        let plugin: Description = serde_json::from_value(json!({
            "server": "calc", "version": "ab12", "concurrency": 8,
            "reuse_instances": false, "prewarm": 2,
            "functions": [{"name": "add", "signature": "func(a: s64, b: s64) -> s64"}]
        }))
        .unwrap();
        assert_eq!(plugin.concurrency, Some(8));
        assert_eq!(plugin.functions[0].name, "add");
        let native = Description {
            server: "fooserver".into(),
            version: "native".into(),
            concurrency: None,
            reuse_instances: None,
            prewarm: None,
            functions: vec![],
            capabilities: vec![],
        };
        assert_eq!(
            serde_json::to_value(&native).unwrap(),
            json!({"server": "fooserver", "version": "native", "functions": []})
        );
    }

    #[test]
    fn names_follow_the_seed() {
        assert_eq!(server_exchange("fooserver"), "server_fooserver_ex");
        assert_eq!(server_queue("fooserver"), "server_fooserver_queue");
        assert_eq!(client_exchange("olivia", "u1"), "client_olivia_ex_u1");
        assert_eq!(client_queue("olivia", "u1"), "client_olivia_queue_u1");
    }

    #[test]
    fn request_round_trip_and_optional_fields() {
        let r = Request::decode(br#"{"func":"add","args":[1,2]}"#, 1024).unwrap();
        assert_eq!(r.func, "add");
        assert_eq!(r.args.args, vec![json!(1), json!(2)]);
        let r = Request::decode(br#"{"func":"f"}"#, 1024).unwrap();
        assert!(r.args.args.is_empty() && r.args.kwargs.is_empty());
        let again = Request::decode(&r.encode(), 1024).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn bad_requests_are_typed() {
        for body in [
            &b"\xff\xfe"[..],
            b"not json",
            b"[1,2]",
            br#"{"args":[]}"#,
            br#"{"func":1}"#,
            br#"{"func":"f","args":{}}"#,
            br#"{"func":"f","extra":1}"#,
        ] {
            let e = Request::decode(body, 1024).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{body:?}");
        }
        // A key given twice, in the request or anywhere in its arguments,
        // is refused rather than read as one of the two.
        for (body, said) in [
            (&br#"{"func":"f","func":"g"}"#[..], "`func` is given twice"),
            (
                br#"{"func":"f","args":[1],"args":[2]}"#,
                "`args` is given twice",
            ),
            (
                br#"{"kwargs":{},"func":"f","kwargs":{}}"#,
                "`kwargs` is given twice",
            ),
            (
                br#"{"func":"f","kwargs":{"a":1,"a":1}}"#,
                "`a` is given twice",
            ),
            (
                br#"{"func":"f","args":[[{"r":{"x":1,"x":2}}]]}"#,
                "`x` is given twice",
            ),
        ] {
            let e = Request::decode(body, 1024).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{body:?}");
            assert!(e.message.contains(said), "{body:?}: {}", e.message);
        }
        let r = Request::decode(
            br#"{"kwargs":{"a":{"x":1}},"func":"f","args":[{"x":2}]}"#,
            1024,
        )
        .unwrap();
        assert_eq!(r.args.kwargs["a"], json!({"x": 1}));
        assert_eq!(r.args.args, vec![json!({"x": 2})]);
        let e = Request::decode(&[b' '; 2000], 1024).unwrap_err();
        assert!(e.message.contains("limit"));
        // A value quoted by the parser's error is cut short: the reply
        // never carries the request back, escaped several times over.
        let body = format!(r#"{{"func":"f","args":"{}"}}"#, "\u{80}".repeat(100_000));
        let e = Request::decode(body.as_bytes(), 1 << 20).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.len() < 1000, "{} bytes", e.message.len());
        assert!(
            e.message.contains("characters more) at line 1 column"),
            "{}",
            e.message
        );
    }

    #[test]
    fn response_shapes() {
        let ok = Response::Result(json!(3));
        assert_eq!(serde_json::to_value(&ok).unwrap(), json!({"result": 3}));
        let err = Response::Error(RemoteError::new(ErrorKind::Trap, "boom"));
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            json!({"error": {"type": "Trap", "message": "boom", "data": null}})
        );
        let unknown =
            Response::decode_within(br#"{"error":{"type":"Weird","message":"m"}}"#, 1024).unwrap();
        assert_eq!(unknown.into_result().unwrap_err().kind, ErrorKind::Unknown);
    }
}
