//! `buildbus publish` and `buildbus setup`: files onto the bus, with confirms and
//! checkpoints (per file and destination: the publisher's broker, vhost and exchange
//! prefix); the topology declared.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::translate::FormatArg;
use super::{Cli, FieldArgs};
use crate::bus::publish::{Publisher, PublisherConfig};
use crate::bus::{connect, topology::Topology, BusError};
use crate::pipeline::file::{publish_file, FileOptions};
use crate::sources::file::checkpoint;
use crate::sources::file::Follow;

const PUBLISH_EXAMPLES: &str = "\
Examples:
  # Publish a finished build's event file
  buildbus publish --url amqp://guest:guest@127.0.0.1:5672/%2f build_events.json
  # Follow a build while it runs (start it with --build_event_json_file=bep.json)
  buildbus publish --follow bep.json
  # Several files, fixed tree, no checkpoints
  buildbus publish --tree acme --no-checkpoint a.bin b.bin
  # A BitBake build's events, then its artifacts (scanned when the build finishes)
  buildbus publish --build-dir ~/poky/build ~/poky/build/tmp/log/build.eventlog

A message counts as published only when the broker confirmed it. If the broker goes
away, publishing waits, reconnects and resends what was not confirmed (for ever, or
until --connect-timeout SECS; a wrong password, a missing vhost or a refused permission
end it at once, exit status 2). A checkpoint per file and destination (in
--checkpoint-dir) records the offset of the last confirmed event, so running the same
command again resumes where it stopped. The destination is the broker's host, port and
vhost and the exchange prefix (not the credentials): the same file published to another
broker or vhost is sent in full.";

/// Translate build-event files and publish the messages to RabbitMQ.
#[derive(Debug, Args)]
#[command(after_help = PUBLISH_EXAMPLES)]
pub struct PublishArgs {
    /// Broker URL (default: [bus] url of the config).
    #[arg(long, env = "BUILDBUS_URL", value_name = "URL")]
    pub url: Option<String>,

    /// Input format: auto, bep-json, bep-binary.
    #[arg(long, default_value = "auto", value_parser = super::translate::parse_format)]
    pub format: FormatArg,

    /// Keep reading as the file grows, until the build's stream ends (or Ctrl-C).
    #[arg(long)]
    pub follow: bool,

    /// Unconfirmed messages allowed in flight.
    #[arg(long, default_value_t = 512)]
    pub window: usize,

    /// Where checkpoints are kept (default: $BUILDBUS_STATE_DIR/checkpoints or
    /// ~/.local/state/buildbus/checkpoints).
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,

    /// Neither read nor write checkpoints: publish every file from its start.
    #[arg(long)]
    pub no_checkpoint: bool,

    #[command(flatten)]
    pub fields: FieldArgs,

    #[command(flatten)]
    pub artifacts: super::aam::BuildDirArgs,

    /// Build-event files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

const SETUP_EXAMPLES: &str = "\
Examples:
  buildbus setup --url amqp://guest:guest@127.0.0.1:5672/%2f

Declares the five topic exchanges, the dead-letter exchange and queue, and the DSI
queue bound to every exchange. Safe to run any number of times.";

/// Declare the exchanges and queues (idempotent).
#[derive(Debug, Args)]
#[command(after_help = SETUP_EXAMPLES)]
pub struct SetupArgs {
    /// Broker URL (default: [bus] url of the config).
    #[arg(long, env = "BUILDBUS_URL", value_name = "URL")]
    pub url: Option<String>,
}

pub fn setup(cli: &Cli, a: &SetupArgs) -> anyhow::Result<ExitCode> {
    let (cfg, _) = super::context(cli.config.as_deref(), &FieldArgs::default())?;
    let url = a.url.clone().unwrap_or(cfg.bus.url.clone());
    let tls = cli.broker_tls(&cfg)?;
    super::runtime()?.block_on(async {
        let deadline = cli.connect_timeout().unwrap_or(Duration::from_secs(30));
        let conn = connect::connect(&url, &tls, Some(deadline)).await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(BusError::amqp("open channel"))
            .map_err(|e| e.at(&url))?;
        Topology::new(&cfg.bus.exchange_prefix)
            .declare_all(&ch)
            .await
            .map_err(|e| e.at(&url))?;
        let _ = conn.close(200, "bye".into()).await;
        println!("topology declared on {}", crate::bus::redact_url(&url));
        Ok(ExitCode::SUCCESS)
    })
}

pub fn publish(cli: &Cli, a: &PublishArgs) -> anyhow::Result<ExitCode> {
    let (cfg, ctx) = super::context(cli.config.as_deref(), &a.fields)?;
    let ctx = Arc::new(ctx);
    let url = a.url.clone().unwrap_or(cfg.bus.url.clone());
    let tls = cli.broker_tls(&cfg)?;
    let stop = Arc::new(AtomicBool::new(false));
    let scanner = a.artifacts.scanner(cli.quiet)?;
    let cp_dir = a
        .checkpoint_dir
        .clone()
        .unwrap_or_else(checkpoint::default_dir);
    super::runtime()?.block_on(async {
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    tracing::warn!("interrupted: finishing what is in flight");
                    stop.store(true, Ordering::Relaxed);
                }
            });
        }
        let mut pcfg = PublisherConfig::new(&url, &cfg.bus.exchange_prefix);
        pcfg.window = a.window;
        pcfg.connect_deadline = cli.connect_timeout();
        pcfg.tls = tls;
        let mut publisher = Publisher::<u64>::connect(pcfg).await?;
        let mut failed = false;
        for path in &a.files {
            let opts = FileOptions {
                format: a.format.0,
                follow: a.follow.then(|| Follow {
                    poll: Duration::from_millis(200),
                    stop: stop.clone(),
                }),
                checkpoint: (!a.no_checkpoint).then(|| checkpoint::default_file(&cp_dir, path)),
                artifacts: scanner.clone(),
            };
            let r = publish_file(&mut publisher, path, ctx.clone(), &opts, a.window).await?;
            for e in r.stream.error_lines() {
                eprintln!("buildbus: error: {e}");
            }
            failed |= !r.stream.clean();
            eprintln!(
                "{}: {} events, {} messages published (confirmed), {} skipped (confirmed before), checkpoint at byte {}",
                path.display(),
                r.stream.events,
                r.published,
                r.skipped,
                r.checkpoint
            );
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        failed |= super::aam::report_scans(scanner.as_deref());
        let (_, stats) = publisher.close().await?;
        if stats.reconnects > 0 {
            eprintln!(
                "broker connection recovered {} times; {} messages resent",
                stats.reconnects, stats.resent
            );
        }
        Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
    })
}
