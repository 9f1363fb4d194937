//! What a client-only user of the library compiles: the proxy, without the plugin runtime or the command line.
//!
//! `callme = { default-features = false }` is the README's promise of a
//! small client. These tests ask `cargo tree` what that build pulls in, so
//! an unconditional dependency added to the library shows up here.

use std::collections::BTreeSet;
use std::process::Command;

use callme_tests::{repo, run_ok};

/// The packages the `callme` library depends on (normal dependencies,
/// transitively) with only `features` on.
fn library_dependencies(features: &[&str]) -> BTreeSet<String> {
    run_ok(
        Command::new(env!("CARGO"))
            .arg("tree")
            .arg("--manifest-path")
            .arg(repo().join("Cargo.toml"))
            .args(["-p", "callme", "-e", "normal", "--prefix", "none"])
            .args(["--no-default-features", "--features", &features.join(",")]),
    )
    .lines()
    .filter_map(|line| line.split_whitespace().next())
    .map(str::to_string)
    .collect()
}

/// Dependencies of the plugin runtime and of the `callme` binary.
const SERVER_AND_CLI: [&str; 4] = ["wasmtime", "clap", "anyhow", "tracing-subscriber"];

#[test]
fn a_client_only_build_leaves_out_the_runtime_and_the_command_line() {
    let client = library_dependencies(&[]);
    assert!(
        client.contains("lapin"),
        "the client talks AMQP: {client:?}"
    );
    for name in SERVER_AND_CLI {
        assert!(
            !client.contains(name),
            "a client-only build compiles {name}: {client:?}"
        );
    }
    // The full build has them all, so the names above are spelled as
    // cargo spells them and the check above can fail.
    let full = library_dependencies(&["server", "cli"]);
    for name in SERVER_AND_CLI {
        assert!(
            full.contains(name),
            "{name} not in the full build: {full:?}"
        );
    }
}
