//! The `buildbus` command line: argument parsing, logging set-up and one module per
//! subcommand. `anyhow` is used here and nowhere else in the library.

mod aam;
mod bes;
mod bitbake_live;
mod demo;
mod dsi;
mod monitor;
mod publish;
mod query;
mod summary;
mod translate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::bus::{BrokerTls, TlsOptions};
use crate::config::{Config, FieldValues};
use crate::systems::Context;

const ABOUT: &str =
    "buildbus: build events from BitBake and Bazel, as normalized messages on RabbitMQ";

#[derive(Debug, Parser)]
#[command(name = "buildbus", version, about = ABOUT, long_about = None)]
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

    /// Commands that connect to the broker give up after SECS of transient failures
    /// (connection refused or reset, a broker restarting); default: retry for ever,
    /// with a warning per attempt. A wrong user name or password, a missing vhost or a
    /// refused permission end the command at once anyway.
    #[arg(
        long,
        global = true,
        env = "BUILDBUS_CONNECT_TIMEOUT",
        value_name = "SECS"
    )]
    pub connect_timeout: Option<u64>,

    /// PEM file of CA certificates to trust, besides the system's, for an amqps:// broker
    /// URL (a private CA). The server certificate is always verified. Default: [bus]
    /// ca_file of the config.
    #[arg(long, global = true, env = "BUILDBUS_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<PathBuf>,

    /// PEM file of the client certificate for an amqps:// broker that requires one (with
    /// --client-key). Default: [bus] client_cert of the config.
    #[arg(long, global = true, env = "BUILDBUS_CLIENT_CERT", value_name = "PEM")]
    pub client_cert: Option<PathBuf>,

    /// PEM file of the client certificate's private key (unencrypted). Default: [bus]
    /// client_key of the config.
    #[arg(long, global = true, env = "BUILDBUS_CLIENT_KEY", value_name = "PEM")]
    pub client_key: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Translate(translate::TranslateArgs),
    Publish(publish::PublishArgs),
    BitbakeLive(bitbake_live::BitbakeLiveArgs),
    Bes(bes::BesArgs),
    BesReplay(bes::BesReplayArgs),
    Setup(publish::SetupArgs),
    Dsi(dsi::DsiArgs),
    Monitor(monitor::MonitorArgs),
    Demo(demo::DemoArgs),
    Query(query::QueryArgs),
    Aam(aam::AamArgs),
}

/// The Pulse fields as flags (and `BUILDBUS_*` variables): they win over the config.
#[derive(Debug, Clone, Args, Default)]
pub struct FieldArgs {
    /// Tree (repository) of every message, instead of deriving it.
    #[arg(long, env = "BUILDBUS_TREE", value_name = "TREE")]
    pub tree: Option<String>,
    /// Platform of every message, instead of deriving it.
    #[arg(long, env = "BUILDBUS_PLATFORM", value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// Build type of every message, instead of deriving it.
    #[arg(long, env = "BUILDBUS_BUILDTYPE", value_name = "TYPE")]
    pub buildtype: Option<String>,
    /// Product of every message, instead of deriving it.
    #[arg(long, env = "BUILDBUS_PRODUCT", value_name = "PRODUCT")]
    pub product: Option<String>,
    /// Revision of every message, instead of deriving it.
    #[arg(long, env = "BUILDBUS_REVISION", value_name = "REV")]
    pub revision: Option<String>,
    /// Branch of every message, instead of deriving it.
    #[arg(long, env = "BUILDBUS_BRANCH", value_name = "BRANCH")]
    pub branch: Option<String>,
    /// A tag added to every message (repeatable; BUILDBUS_TAGS takes a comma list).
    #[arg(
        long = "tag",
        env = "BUILDBUS_TAGS",
        value_delimiter = ',',
        value_name = "TAG"
    )]
    pub tags: Vec<String>,
}

impl FieldArgs {
    pub fn values(&self) -> FieldValues {
        FieldValues {
            tree: self.tree.clone(),
            platform: self.platform.clone(),
            buildtype: self.buildtype.clone(),
            product: self.product.clone(),
            revision: self.revision.clone(),
            branch: self.branch.clone(),
            tags: self.tags.clone(),
        }
    }
}

/// Loads the configuration and resolves the translation context.
pub(crate) fn context(
    config: Option<&std::path::Path>,
    fields: &FieldArgs,
) -> anyhow::Result<(Config, Context)> {
    let cfg = Config::load(config)?;
    let ctx = Context::new(&cfg, &fields.values())?;
    Ok((cfg, ctx))
}

impl Cli {
    /// `--connect-timeout` as a duration.
    pub(crate) fn connect_timeout(&self) -> Option<std::time::Duration> {
        self.connect_timeout.map(std::time::Duration::from_secs)
    }

    /// The TLS set-up of broker connections: the flags over the `[bus]` table of `cfg`,
    /// the files read and checked now (a bad one is a start-up error naming it).
    pub(crate) fn broker_tls(&self, cfg: &Config) -> anyhow::Result<BrokerTls> {
        let pick = |flag: &Option<PathBuf>, conf: &Option<PathBuf>| flag.clone().or(conf.clone());
        let options = TlsOptions {
            ca_file: pick(&self.ca_file, &cfg.bus.ca_file),
            client_cert: pick(&self.client_cert, &cfg.bus.client_cert),
            client_key: pick(&self.client_key, &cfg.bus.client_key),
        };
        Ok(BrokerTls::load(&options)?)
    }
}

/// A tokio runtime for one command.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Runs the command line; the exit code says how it went.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::logging::init(cli.verbose, cli.quiet);
    let result = match &cli.command {
        Command::Translate(a) => translate::run(&cli, a),
        Command::Publish(a) => publish::publish(&cli, a),
        Command::BitbakeLive(a) => bitbake_live::run(&cli, a),
        Command::Bes(a) => bes::run(&cli, a),
        Command::BesReplay(a) => bes::replay(&cli, a),
        Command::Setup(a) => publish::setup(&cli, a),
        Command::Dsi(a) => dsi::run(&cli, a),
        Command::Monitor(a) => monitor::run(&cli, a),
        Command::Demo(a) => demo::run(&cli, a),
        Command::Query(a) => query::run(&cli, a),
        Command::Aam(a) => aam::run(&cli, a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("buildbus: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
