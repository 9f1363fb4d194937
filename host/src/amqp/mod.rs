//! Everything callme says to the broker, below the RPC: connections, the link, declarations, publishing, the consume loop.
//!
//! - `connect`: connection options, URIs (with TLS), and how lapin's
//!   errors map to callme's.
//! - `echo`: exchange names the broker may echo in an error, and whether
//!   that error stays readable.
//! - `link`: one connection that replaces itself when lost.
//! - `topology`: the exchanges, queues and bindings callme declares.
//! - `publisher`: publishing with confirms, one publish per channel at a time.
//! - `pipeline`: replies pipelined on one channel, by the default
//!   exchange.
//! - `resubscribe`: the consume loop that outlives connections, used by
//!   the server's request consumers and the proxy's reply consumer.
//! - `stack`: the thread stack reading any header the broker passes on takes.
//! - `unreadable`: messages the AMQP client cannot read, and taking one
//!   out of a queue.

pub(crate) mod connect;
pub(crate) mod echo;
pub(crate) mod link;
#[cfg(feature = "server")]
pub(crate) mod pipeline;
pub(crate) mod publisher;
pub(crate) mod resubscribe;
mod stack;
pub(crate) mod topology;
pub(crate) mod unreadable;

pub use connect::{ConnectOptions, DEFAULT_AMQP_URL, redact_uri};
pub(crate) use link::Link;
pub use stack::{MIN_THREAD_STACK, thread_stack_to_set};
