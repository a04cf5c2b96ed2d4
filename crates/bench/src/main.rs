//! `buildbus-bench`: buildbus's benchmarks, outside the product's binary.
//!
//! This crate owns the measurements of BENCHMARKS.md, one module per subcommand, each
//! beside its baseline in the same run: [`translate`] (translation against a bare parse),
//! [`pipeline`] (publish, DSI, latency), [`bitbake`], [`monitor`] (the client library),
//! [`bes`] (the BES backend) and [`aam`] (artifact scanning). It uses the `buildbus`
//! library like any other program does, and starts its private RabbitMQ nodes and
//! PostgreSQL clusters with `buildbus-testkit`. The command-line options are the same as
//! the ones `buildbus bench` had.

mod aam;
mod bes;
mod bitbake;
mod monitor;
mod pipeline;
mod translate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use buildbus::config::{Config, FieldValues};
use buildbus::systems::Context;

const BENCH_EXAMPLES: &str = "\
Examples:
  # Translation throughput and memory, beside a bare parse of the same events
  cargo run --release -p buildbus-bench -- translate
  # Publish rate, DSI rows/s (1, 2, 4 workers; SQLite and PostgreSQL), latency
  cargo run --release -p buildbus-bench -- pipeline
  cargo run --release -p buildbus-bench -- pipeline --messages 20000 --workers 1,2 --no-postgres
  # Events/s through the BES backend (private RabbitMQ), beside file translation
  cargo run --release -p buildbus-bench -- bes --events 200000 --streams 1,4
  # Artifact scanning: MB/s beside sha256sum, files/s beside find
  cargo run --release -p buildbus-bench -- aam --mib 1024 --small-files 100000

Figures go in BENCHMARKS.md; tests never assert speed.";

/// Measure buildbus on generated inputs.
#[derive(Debug, Parser)]
#[command(name = "buildbus-bench", version, long_about = None, after_help = BENCH_EXAMPLES)]
pub struct Cli {
    /// Configuration file (default: the built-in config/buildbus.toml).
    #[arg(long, global = true, env = "BUILDBUS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Translation throughput and memory against a bare parse of the same events.
    Translate(translate::TranslateBench),
    /// Publish rate, DSI storage rate and end-to-end latency on private servers.
    Pipeline(pipeline::PipelineBench),
    /// BitBake event-log translation against a bare JSON + base64 parse.
    Bitbake(bitbake::BitbakeBench),
    /// Client library: callbacks/s with a no-op callback, publish → callback latency.
    Monitor(monitor::MonitorBench),
    /// BES backend: events/s streamed to it (acked = confirmed), beside file translation.
    Bes(bes::BesBench),
    /// The AAM: MB/s hashing beside sha256sum, files/s walking beside find.
    Aam(aam::AamBench),
}

/// The configuration (`--config`, else the built-in one) and the translation context it
/// gives, without field overrides.
fn context(config: Option<&Path>) -> anyhow::Result<(Config, Context)> {
    let cfg = Config::load(config)?;
    let ctx = Context::new(&cfg, &FieldValues::default())?;
    Ok((cfg, ctx))
}

/// The runtime of the benches that talk to a broker.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    buildbus::logging::init(cli.verbose, cli.quiet);
    let result = match &cli.what {
        BenchWhat::Translate(t) => translate::run(&cli, t),
        BenchWhat::Pipeline(p) => pipeline::run(&cli, p),
        BenchWhat::Bitbake(b) => bitbake::run(&cli, b),
        BenchWhat::Monitor(m) => monitor::run(&cli, m),
        BenchWhat::Bes(b) => bes::run(&cli, b),
        BenchWhat::Aam(x) => aam::run(&cli, x),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("buildbus-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
