//! `buildbus bes`: be Bazel's Build Event Service backend; and `buildbus bes-replay`:
//! play a recorded BES session against a backend.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use super::{Cli, FieldArgs};
use crate::bus::connect;
use crate::bus::publish::PublisherConfig;
use crate::pipeline;
use crate::sources::bes::{capture, Auth, BesConfig};
use crate::sources::file::checkpoint;

const BES_EXAMPLES: &str = "\
Examples:
  # Serve on the default port and publish to the configured broker
  buildbus bes --listen 127.0.0.1:8985
  bazel build //... --bes_backend=grpc://127.0.0.1:8985
  # Non-loopback: TLS and a token Bazel sends with --bes_header
  buildbus bes --listen 0.0.0.0:8985 --tls-cert cert.pem --tls-key key.pem \\
      --auth-token \"$TOKEN\"
  bazel build //... --bes_backend=grpcs://ci-bus:8985 \\
      --bes_header=Authorization=\"Bearer $TOKEN\" --tls_certificate=ca.pem
  # A trusted network without auth: say so
  buildbus bes --listen 0.0.0.0:8985 --insecure
  # Print the messages instead of publishing them
  buildbus bes --print
  # Also scan the workspace's bazel-bin/bazel-testlogs when each build finishes
  buildbus bes --build-dir ~/src/myrepo

Each event is acknowledged to Bazel only once every message derived from it (and from
all events before it) is confirmed by the broker; while the broker is away acks wait
and Bazel keeps its events. Events of open builds are kept in the spool directory, so
a restarted backend takes Bazel's retried stream where it left off.

On a non-loopback address the backend requires --auth-token or --auth-header (anyone
who can reach the port could otherwise put builds on the bus); it refuses to start
without one unless given --insecure, and then logs a warning. Credentials without TLS
on such an address are logged as a warning too.";

/// Serve the Bazel Build Event Service: live builds onto the bus.
#[derive(Debug, Args)]
#[command(after_help = BES_EXAMPLES)]
pub struct BesArgs {
    /// Address to listen on (Bazel: --bes_backend=grpc://ADDR).
    #[arg(long, default_value = "127.0.0.1:8985", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Broker URL (default: [bus] url of the config).
    #[arg(long, env = "BUILDBUS_URL", value_name = "URL")]
    pub url: Option<String>,
    /// Unconfirmed messages allowed in flight per invocation.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Print the messages as JSON lines instead of publishing them.
    #[arg(long)]
    pub print: bool,
    /// Where the events of open invocations are kept for restarts
    /// (default: the state directory's bes-spool).
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// Keep no spool (a restarted backend then translates retried streams without
    /// the events before them).
    #[arg(long, conflicts_with = "spool")]
    pub no_spool: bool,
    /// Remove, at start, spool files not written for this long (seconds): invocations
    /// whose client will not retry any more.
    #[arg(long, default_value_t = 86_400, value_name = "SECS")]
    pub spool_max_age: u64,
    /// End a build as incomplete when its stream is silent this long (seconds).
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub idle_timeout: u64,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Require `authorization: Bearer TOKEN` on every call.
    #[arg(
        long,
        env = "BUILDBUS_BES_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub auth_token: Option<String>,
    /// Require a header with this value on every call, as NAME=VALUE
    /// (e.g. x-api-key=SECRET; Bazel: --bes_header=x-api-key=SECRET).
    #[arg(
        long,
        env = "BUILDBUS_BES_HEADER",
        value_name = "NAME=VALUE",
        conflicts_with = "auth_token",
        hide_env_values = true
    )]
    pub auth_header: Option<String>,
    /// Serve on a non-loopback address without --auth-token/--auth-header: anyone who
    /// can reach the port can send builds onto the bus (a warning is logged). Without
    /// it, such an address with no auth is refused.
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub artifacts: super::aam::BuildDirArgs,
    #[command(flatten)]
    pub fields: FieldArgs,
}

fn auth_of(a: &BesArgs) -> anyhow::Result<Auth> {
    if let Some(t) = &a.auth_token {
        return Ok(Auth::Bearer(t.clone()));
    }
    if let Some(h) = &a.auth_header {
        let (name, value) = h
            .split_once('=')
            .context("--auth-header must be NAME=VALUE")?;
        return Ok(Auth::Header {
            name: name.trim().to_ascii_lowercase(),
            value: value.to_string(),
        });
    }
    Ok(Auth::None)
}

/// A non-loopback address with no auth is refused unless the user says `--insecure`.
fn check_exposure(a: &BesArgs, auth: &Auth) -> anyhow::Result<()> {
    if !matches!(auth, Auth::None) || a.listen.ip().is_loopback() {
        return Ok(());
    }
    if !a.insecure {
        anyhow::bail!(
            "refusing to listen on {} without authentication: it is not a loopback \
             address, so anyone who can reach it could send builds onto the bus; set \
             --auth-token (or --auth-header), best with --tls-cert/--tls-key, or pass \
             --insecure to serve anyway",
            a.listen
        );
    }
    tracing::warn!(
        "--insecure: listening on {} without authentication; anyone who can reach it can \
         send builds onto the bus",
        a.listen
    );
    Ok(())
}

pub fn run(cli: &Cli, a: &BesArgs) -> anyhow::Result<ExitCode> {
    let auth = auth_of(a)?;
    check_exposure(a, &auth)?;
    let (cfg, ctx) = super::context(cli.config.as_deref(), &a.fields)?;
    let tls = cli.broker_tls(&cfg)?;
    let publisher = (!a.print).then(|| {
        let url = a.url.clone().unwrap_or(cfg.bus.url.clone());
        let mut p = PublisherConfig::new(&url, &cfg.bus.exchange_prefix);
        p.window = a.window;
        p.connect_deadline = cli.connect_timeout();
        p.tls = tls;
        p
    });
    let mut bcfg = BesConfig::new(a.listen, publisher);
    bcfg.idle_timeout = Duration::from_secs(a.idle_timeout.max(1));
    bcfg.spool_max_age = Duration::from_secs(a.spool_max_age);
    bcfg.spool = if a.no_spool {
        None
    } else {
        Some(
            a.spool
                .clone()
                .unwrap_or_else(|| checkpoint::default_dir().with_file_name("bes-spool")),
        )
    };
    bcfg.auth = auth;
    if let (Some(c), Some(k)) = (&a.tls_cert, &a.tls_key) {
        let cert = std::fs::read(c).with_context(|| format!("reading {}", c.display()))?;
        let key = std::fs::read(k).with_context(|| format!("reading {}", k.display()))?;
        bcfg.tls = Some((cert, key));
    }
    bcfg.artifacts = a.artifacts.scanner(cli.quiet)?;
    if !matches!(bcfg.auth, Auth::None) && bcfg.tls.is_none() && !a.listen.ip().is_loopback() {
        tracing::warn!("credentials are checked without TLS on a non-loopback address");
    }
    super::runtime()?.block_on(async {
        // A refusal that retrying cannot fix (wrong password, missing vhost) stops the
        // backend before it listens; a broker that is only down is waited for by each
        // invocation (their events are spooled meanwhile).
        if let Some(p) = &bcfg.publisher {
            match connect::connect_once(&p.url, &p.tls).await {
                Ok(c) => {
                    let _ = c.close(200, "bye".into()).await;
                }
                Err(e) if e.is_permanent() => return Err(e.into()),
                Err(e) => tracing::warn!("{e}; invocations will retry"),
            }
        }
        let mut backend = pipeline::bes::start(bcfg, Arc::new(ctx)).await?;
        eprintln!("buildbus bes: listening on {}", backend.addr);
        let interrupted = tokio::select! {
            r = tokio::signal::ctrl_c() => {
                r?;
                true
            }
            r = backend.wait() => {
                r?;
                false
            }
        };
        if interrupted {
            eprintln!(
                "buildbus bes: stopping (open invocations: {}; their spooled events wait for the next start)",
                backend.open_invocations()
            );
            backend.stop().await?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

const REPLAY_EXAMPLES: &str = "\
Examples:
  # Play Bazel's recorded session against a local backend
  buildbus bes-replay --to http://127.0.0.1:8985 tests/fixtures/bazel/bes_capture.jsonl
  # With the backend's token
  buildbus bes-replay --to http://ci-bus:8985 --header authorization='Bearer T' cap.jsonl

Each stream's requests are sent at once, as Bazel does; the command fails unless every
request is acknowledged, in order.";

/// Replay a recorded BES session (JSON lines capture) against a BES backend.
#[derive(Debug, Args)]
#[command(after_help = REPLAY_EXAMPLES)]
pub struct BesReplayArgs {
    /// The backend, as http://HOST:PORT.
    #[arg(long, default_value = "http://127.0.0.1:8985", value_name = "URL")]
    pub to: String,
    /// A request header, NAME=VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Capture files, replayed one after another.
    #[arg(required = true, value_name = "CAPTURE")]
    pub captures: Vec<PathBuf>,
}

pub fn replay(_cli: &Cli, a: &BesReplayArgs) -> anyhow::Result<ExitCode> {
    let headers = a
        .headers
        .iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.to_string()))
                .with_context(|| format!("--header {h:?} must be NAME=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    super::runtime()?.block_on(async {
        for path in &a.captures {
            let calls = capture::read_capture(path)?;
            let r = capture::replay(&a.to, calls, &headers).await?;
            eprintln!(
                "{}: {} lifecycle calls, {} streams, {} requests, {} acks",
                path.display(),
                r.lifecycle_calls,
                r.streams,
                r.requests,
                r.acks
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}
