//! The `calc` example plugin: arithmetic, a `result`, an exported interface.

callme_guest::generate!();

use callme_guest::debug;
use exports::stats::Guest as Stats;

struct Calc;

impl Guest for Calc {
    fn add(a: i64, b: i64) -> i64 {
        debug!("add {a} {b}");
        a.wrapping_add(b)
    }

    fn fib(n: u32) -> u64 {
        match n {
            0 => 0,
            1 => 1,
            n => Self::fib(n - 1).wrapping_add(Self::fib(n - 2)),
        }
    }

    fn divide(a: f64, b: f64) -> Result<f64, String> {
        debug!("divide {a} {b}");
        if b == 0.0 {
            return Err("division by zero".to_string());
        }
        Ok(a / b)
    }

    fn slow_version(ms: u32) -> String {
        std::thread::sleep(std::time::Duration::from_millis(u64::from(ms)));
        Self::version()
    }

    fn version() -> String {
        option_env!("CALC_VERSION").unwrap_or("1").to_string()
    }
}

impl Stats for Calc {
    fn mean(xs: Vec<f64>) -> Option<f64> {
        if xs.is_empty() {
            return None;
        }
        Some(xs.iter().sum::<f64>() / xs.len() as f64)
    }
}

export!(Calc);
