//! `buildbus dsi`: run a pool of storage workers until Ctrl-C (or SIGTERM).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::{Cli, FieldArgs};
use crate::consumers::dsi::worker::{run_pool, DsiConfig, DsiStats};

const EXAMPLES: &str = "\
Examples:
  # The embedded default: SQLite in ./buildbus.db, two workers
  buildbus dsi --workers 2
  # PostgreSQL: run this on as many machines as you like against one database
  buildbus dsi --store postgres://buildbus@db.example:5432/buildbus --workers 4 --batch 500
  # Then look at what was stored
  buildbus query builds --store sqlite:buildbus.db

Workers share one durable quorum queue (queue/buildbus/dsi, bound to every exchange).
Each batch is written in one transaction and acked only after the commit; duplicates
are skipped by message id, so a redelivery never stores anything twice. Poison
messages go to queue/buildbus/dead-letter with an x-buildbus-error header.

Broker trouble: workers reconnect with backoff (for ever, or until --connect-timeout
SECS without a connection); a wrong password, a missing vhost or a refused permission
stop every worker at once (exit status 2).";

/// Run the storage workers (DSI): consume the bus, keep the permanent record.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct DsiArgs {
    /// Broker URL (default: [bus] url of the config).
    #[arg(long, env = "BUILDBUS_URL", value_name = "URL")]
    pub url: Option<String>,
    /// Store: sqlite:PATH or postgres://USER@HOST:PORT/DB.
    #[arg(
        long,
        env = "BUILDBUS_STORE",
        default_value = "sqlite:buildbus.db",
        value_name = "URL"
    )]
    pub store: String,
    /// Worker count (each has its own broker and store connection).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Unacked deliveries per worker.
    #[arg(long, default_value_t = 1000)]
    pub prefetch: u16,
    /// Messages per transaction, at most.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    #[arg(long = "batch-ms", default_value_t = 50)]
    pub batch_ms: u64,
    /// Stop after this many seconds without a message (for scripts; default: run until
    /// Ctrl-C).
    #[arg(long, value_name = "SECONDS")]
    pub idle_exit: Option<u64>,
}

pub fn run(cli: &Cli, a: &DsiArgs) -> anyhow::Result<ExitCode> {
    let (cfg, _) = super::context(cli.config.as_deref(), &FieldArgs::default())?;
    let dcfg = DsiConfig {
        url: a.url.clone().unwrap_or(cfg.bus.url.clone()),
        tls: cli.broker_tls(&cfg)?,
        exchange_prefix: cfg.bus.exchange_prefix.clone(),
        store_url: a.store.clone(),
        workers: a.workers,
        prefetch: a.prefetch,
        batch: a.batch,
        batch_wait: Duration::from_millis(a.batch_ms),
        connect_timeout: cli.connect_timeout(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(DsiStats::default());
    super::runtime()?.block_on(async {
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                }
                tracing::warn!("stopping: finishing the batches in hand");
                stop.store(true, Ordering::Relaxed);
            });
        }
        if let Some(idle) = a.idle_exit {
            let (stop, stats) = (stop.clone(), stats.clone());
            tokio::spawn(async move {
                let mut last = (u64::MAX, tokio::time::Instant::now());
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let n = stats.stored.load(Ordering::Relaxed)
                        + stats.duplicates.load(Ordering::Relaxed)
                        + stats.dead_lettered.load(Ordering::Relaxed);
                    if n != last.0 {
                        last = (n, tokio::time::Instant::now());
                    } else if last.1.elapsed() >= Duration::from_secs(idle) {
                        stop.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
        eprintln!(
            "dsi: {} workers on {} storing into {}",
            dcfg.workers,
            crate::bus::redact_url(&dcfg.url),
            dcfg.store_url
        );
        run_pool(dcfg, stop, stats.clone()).await?;
        eprintln!(
            "dsi: stored {} messages, skipped {} duplicates, dead-lettered {}",
            stats.stored.load(Ordering::Relaxed),
            stats.duplicates.load(Ordering::Relaxed),
            stats.dead_lettered.load(Ordering::Relaxed)
        );
        Ok(ExitCode::SUCCESS)
    })
}
