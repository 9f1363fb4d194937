//! The `{{name}}` callme plugin.
//!
//! Every function the world in `wit/world.wit` exports is callable by name
//! once the component is served: `greet` here.

wit_bindgen::generate!({
    path: "wit",
    world: "{{name}}",
    // Also the bindings of the callme contract's `host` import.
    generate_all,
});

use callme::plugin::host::{Level, log};

struct Component;

impl Guest for Component {
    fn greet(name: String) -> String {
        log(Level::Info, &format!("greeting {name}"));
        greeting(&name)
    }
}

/// The logic of `greet`, apart from the host's log so that `cargo test`
/// runs it natively.
fn greeting(name: &str) -> String {
    format!("hello, {name}")
}

export!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_names_the_caller() {
        assert_eq!(greeting("ann"), "hello, ann");
    }
}
