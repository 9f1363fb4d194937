//! The integration tests: one binary, a real RabbitMQ, real plugins.
//!
//! Run through `scripts/test`, which starts the broker node and builds the
//! plugins and the `callme` binary first.

mod brokers;
mod capabilities;
mod cli;
mod cluster;
mod dependencies;
mod deploy;
mod languages;
mod new;
mod observe;
mod reliability;
mod replies;
mod rpc;
mod runtime;
mod scale;
mod security;
mod trace;
