//! Interleaved rounds of sequential and parallel calls, and how their figures are printed and compared.
//!
//! Every target is measured in each round in turn, so a machine that slows
//! down or speeds up during a run moves all targets alike; ratios are the
//! median of the per-round ratios.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;

/// Rounds per run.
pub const ROUNDS: usize = 5;
/// Sequential calls per round, after a warm-up.
pub const SEQUENTIAL: usize = 400;
/// Calls in flight in the parallel part of a round.
pub const IN_FLIGHT: usize = 64;
/// Calls per round with `IN_FLIGHT` in flight.
pub const PARALLEL_CALLS: usize = 2_000;

/// One call of a target; the argument makes each call's input different.
pub type Call = Arc<dyn Fn(u64) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// Something to call, with whatever must stay alive while it is called.
pub struct Target {
    /// How to call it.
    pub call: Call,
    /// Kept alive while it is measured.
    pub keep: Box<dyn std::any::Any + Send>,
}

/// One round of one target.
pub struct Round {
    samples: Vec<Duration>,
    p50: Duration,
    par_rate: f64,
}

/// All rounds of one target.
#[derive(Default)]
pub struct Figures {
    rounds: Vec<Round>,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

impl Figures {
    fn samples(&self) -> Vec<Duration> {
        let mut all: Vec<Duration> = self
            .rounds
            .iter()
            .flat_map(|r| r.samples.iter().copied())
            .collect();
        all.sort();
        all
    }

    fn par_rate(&self) -> f64 {
        median(self.rounds.iter().map(|r| r.par_rate).collect())
    }
}

/// Warms every target up, then measures them in [`ROUNDS`] interleaved
/// rounds; their figures, in the same order.
pub async fn measure(targets: &[Target]) -> anyhow::Result<Vec<Figures>> {
    for t in targets {
        warm_up(&t.call).await?;
    }
    let mut figures: Vec<Figures> = targets.iter().map(|_| Figures::default()).collect();
    for _ in 0..ROUNDS {
        for (t, f) in targets.iter().zip(&mut figures) {
            f.rounds.push(round(&t.call).await?);
        }
    }
    println!(
        "{ROUNDS} interleaved rounds of {SEQUENTIAL} sequential and {PARALLEL_CALLS} parallel calls each"
    );
    Ok(figures)
}

/// Prints one target's figures.
pub fn print(label: &str, f: &Figures) {
    let samples = f.samples();
    let total: Duration = samples.iter().sum();
    println!(
        "{label:<15} sequential p50 {:>7.1} µs  p99 {:>7.1} µs  {:>6.0} calls/s  |  {IN_FLIGHT} in flight {:>6.0} calls/s",
        samples[samples.len() / 2].as_secs_f64() * 1e6,
        samples[samples.len() * 99 / 100].as_secs_f64() * 1e6,
        samples.len() as f64 / total.as_secs_f64(),
        f.par_rate()
    );
}

/// Prints the median over rounds of `of`'s figures divided by `to`'s in
/// the same round.
pub fn ratios(label: &str, of: &Figures, to: &Figures) {
    let pairs = || of.rounds.iter().zip(&to.rounds);
    let p50 = median(
        pairs()
            .map(|(a, b)| a.p50.as_secs_f64() / b.p50.as_secs_f64())
            .collect(),
    );
    let rate = median(pairs().map(|(a, b)| a.par_rate / b.par_rate).collect());
    println!("{label}: sequential p50 {p50:.2}x, throughput {rate:.2}x");
}

async fn round(call: &Call) -> anyhow::Result<Round> {
    let mut samples = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL as u64 {
        let t = Instant::now();
        call(i).await?;
        samples.push(t.elapsed());
    }
    let mut sorted = samples.clone();
    sorted.sort();

    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut next = 0u64;
    let mut done = 0;
    while done < PARALLEL_CALLS {
        while inflight.len() < IN_FLIGHT && (next as usize) < PARALLEL_CALLS {
            inflight.push(call(next));
            next += 1;
        }
        if let Some(r) = inflight.next().await {
            r?;
            done += 1;
        }
    }
    let par_rate = PARALLEL_CALLS as f64 / started.elapsed().as_secs_f64();
    Ok(Round {
        p50: sorted[sorted.len() / 2],
        samples,
        par_rate,
    })
}

async fn warm_up(call: &Call) -> anyhow::Result<()> {
    for i in 0..200 {
        call(i).await?;
    }
    Ok(())
}
