//! The `bad-import` test plugin: its world imports `evil`, which no callme
//! host provides, so loading it must fail with a clear error.

callme_guest::generate!();

struct BadImport;

impl Guest for BadImport {
    fn run() -> u32 {
        evil()
    }
}

export!(BadImport);
