//! Log output on stderr, as the `buildbus` command line sets it up: `tracing` events
//! filtered by verbosity (or `RUST_LOG`). Public so that tools built on the library (the
//! benchmarks) log the same way.

/// Installs the stderr subscriber: warnings by default, `-v` debug for buildbus, `-vv`
/// everything, `quiet` errors only; `RUST_LOG` overrides. Does nothing if a subscriber is
/// already installed.
pub fn init(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "buildbus=debug,info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
