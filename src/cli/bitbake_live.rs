//! `buildbus bitbake-live`: be BitBake's UI, translate its events as they come, and
//! publish them (or print them).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use super::{Cli, FieldArgs};
use crate::bus::publish::PublisherConfig;
use crate::pipeline::bitbake_live::publish_live;
use crate::pipeline::{Output, Pipeline};
use crate::sources::bitbake_live::{interrupt_channel, LiveEnd, LiveOptions};

const EXAMPLES: &str = "\
Examples:
  # Start a BitBake server, then build through it and publish the events live
  bitbake --server-only --bind 127.0.0.1:8765 -T 1200 &
  buildbus bitbake-live --server 127.0.0.1:8765 --target core-image-minimal
  # Only watch whatever the server builds (it must be idle when we attach)
  buildbus bitbake-live --server 127.0.0.1:8765 --observe
  # Print the messages instead of publishing them
  buildbus bitbake-live --server 127.0.0.1:8765 --target demo-image --print
  # And the build's artifacts when it finishes (deploy directory from its variables)
  buildbus bitbake-live --server 127.0.0.1:8765 --target demo-image --build-dir ~/poky/build

Ctrl-C once asks BitBake to stop the build cleanly, twice to stop it at once. Exit
status: 0 when the session ran to the end of BitBake's command (even if the build
failed), 1 when events could not be decoded or the command failed, 2 on errors.";

/// Act as BitBake's UI: run or observe a build and translate its events live.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct BitbakeLiveArgs {
    /// The BitBake server's XML-RPC address (bitbake --server-only --bind HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    pub server: String,
    /// Targets to build (repeatable).
    #[arg(
        long = "target",
        value_name = "TARGET",
        required_unless_present = "observe"
    )]
    pub targets: Vec<String>,
    /// The task to run on the targets.
    #[arg(long, default_value = "build")]
    pub task: String,
    /// Do not build: listen to what the server does.
    #[arg(long, conflicts_with = "targets")]
    pub observe: bool,
    /// When observing, keep going after a command ends.
    #[arg(long, requires = "observe")]
    pub keep_observing: bool,
    /// Where our UI's XML-RPC server listens (BitBake calls it with every event).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// Print the messages as JSON lines instead of publishing them.
    #[arg(long)]
    pub print: bool,
    /// Broker URL (default: [bus] url of the config).
    #[arg(long, env = "BUILDBUS_URL", value_name = "URL")]
    pub url: Option<String>,
    /// Unconfirmed messages allowed in flight.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    #[command(flatten)]
    pub fields: FieldArgs,
    #[command(flatten)]
    pub artifacts: super::aam::BuildDirArgs,
}

pub fn run(cli: &Cli, a: &BitbakeLiveArgs) -> anyhow::Result<ExitCode> {
    let (cfg, ctx) = super::context(cli.config.as_deref(), &a.fields)?;
    let ctx = Arc::new(ctx);
    let mut opts = if a.observe {
        LiveOptions::observe(a.server.clone())
    } else {
        LiveOptions::build(a.server.clone(), a.targets.clone())
    };
    opts.task = a.task.clone();
    opts.listen = a.listen;
    opts.keep_observing = a.keep_observing;
    let scanner = a.artifacts.scanner(cli.quiet)?;
    let rt = super::runtime()?;
    rt.block_on(async {
        let (interrupter, interrupts) = interrupt_channel();
        interrupter.forward_ctrl_c();
        let out = if a.print {
            Output::Print
        } else {
            let url = a.url.clone().unwrap_or(cfg.bus.url.clone());
            let mut pcfg = PublisherConfig::new(&url, &cfg.bus.exchange_prefix);
            pcfg.window = a.window;
            pcfg.connect_deadline = cli.connect_timeout();
            pcfg.tls = cli.broker_tls(&cfg)?;
            Output::connect(Some(&pcfg)).await?
        };
        let mut pipe = Pipeline::new(a.server.clone(), out).with_artifacts(scanner.clone());
        let report = publish_live(opts, ctx, Some(interrupts), &mut pipe).await??;
        if let Some(stats) = pipe.close().await? {
            eprintln!(
                "{}: {} events, {} messages published (confirmed){}",
                a.server,
                report.live.events,
                stats.confirmed,
                if stats.reconnects > 0 {
                    format!(", broker connection recovered {} times", stats.reconnects)
                } else {
                    String::new()
                }
            );
        }
        for e in &report.errors {
            eprintln!("buildbus: error: {e}");
        }
        let aam_failed = super::aam::report_scans(scanner.as_deref());
        let command_failed = matches!(report.live.end, LiveEnd::CommandFailed { .. });
        eprintln!("{}: session ended: {:?}", a.server, report.live.end);
        Ok(
            if report.errors.is_empty() && !command_failed && !aam_failed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            },
        )
    })
}
