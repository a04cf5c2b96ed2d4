//! `buildbus aam`: scan a build directory, classify and hash what it holds, and print
//! or publish the artifacts; plus the `--build-dir`/`--rules` options that `publish`
//! and `bitbake-live` share to run the AAM when a build finishes.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use super::{Cli, FieldArgs};
use crate::aam::{self, BuildScanner, Rules, ScanOptions};
use crate::bus::message::Outgoing;
use crate::bus::publish::{Publisher, PublisherConfig};
use crate::model::{ids, time, SourceMeta};
use crate::systems::fields::PulseFields;

const EXAMPLES: &str = "\
Examples:
  # What a Yocto build left: a table of kind, size, sha256 and path
  buildbus aam ~/poky/build
  # A Bazel workspace (bazel-bin and bazel-testlogs are followed), as JSON envelopes
  buildbus aam --json --build-id 6f1c0e5e-1b2a-4c3d-9e8f-0a1b2c3d4e5f ~/src/app
  # Publish them to the bus as the artifacts of a build, with its Pulse fields
  buildbus aam --publish --url amqp://guest:guest@127.0.0.1:5672/%2f \\
      --build-id bitbake-0123 --tree poky --platform qemux86-64 ~/poky/build
  # Own classification rules (replace config/artifacts.toml)
  buildbus aam --rules my-artifacts.toml ~/poky/build/tmp/deploy

A Yocto build directory may be given as its TOPDIR, TMPDIR or deploy directory: the
deploy directory is scanned, and paths start with deploy/. Files are hashed on all
cores (--threads); a progress bar shows on a terminal. Symbolic links are recorded with
their targets and never followed out of their tree; FIFOs and sockets are never opened;
what cannot be read is skipped with a warning. To scan each build as it finishes, give
--build-dir to `publish` or `bitbake-live` instead.

Exit status: 0 when every classified file was recorded, 1 when some were skipped with
a warning, 2 on errors (no such directory, bad rules, broker unreachable).";

/// Scan a build directory for artifacts: classify, hash, print or publish.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct AamArgs {
    /// The directory: a Yocto build directory (TOPDIR, TMPDIR or deploy) or a Bazel
    /// workspace.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Classification rules (default: the built-in config/artifacts.toml).
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,

    /// The build the artifacts belong to (default: aam-<hash of the directory's path>).
    #[arg(long, value_name = "ID")]
    pub build_id: Option<String>,

    /// The build system (default: told from the directory).
    #[arg(long, value_parser = ["bazel", "bitbake"])]
    pub system: Option<String>,

    /// Publish the artifact messages to RabbitMQ (with confirms).
    #[arg(long, conflicts_with = "json")]
    pub publish: bool,

    /// Print the artifact messages as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Broker URL for --publish (default: [bus] url of the config).
    #[arg(long, env = "BUILDBUS_URL", value_name = "URL")]
    pub url: Option<String>,

    /// Hashing threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,

    #[command(flatten)]
    pub fields: FieldArgs,
}

/// `--build-dir` and `--rules`, as `publish` and `bitbake-live` take them.
#[derive(Debug, Clone, Args, Default)]
pub struct BuildDirArgs {
    /// When a build finishes, scan this directory for its artifacts (AAM) and publish
    /// them with the build's id and Pulse fields. BitBake: the build directory, its
    /// TMPDIR or deploy directory (found from the build's own variables); Bazel: the
    /// workspace.
    #[arg(long, value_name = "DIR")]
    pub build_dir: Option<PathBuf>,

    /// Artifact classification rules for --build-dir (default: the built-in
    /// config/artifacts.toml).
    #[arg(long = "rules", value_name = "FILE", requires = "build_dir")]
    pub artifact_rules: Option<PathBuf>,
}

impl BuildDirArgs {
    /// The scanner these options ask for, if any.
    pub fn scanner(&self, quiet: bool) -> anyhow::Result<Option<Arc<BuildScanner>>> {
        let Some(dir) = &self.build_dir else {
            return Ok(None);
        };
        anyhow::ensure!(
            dir.is_dir(),
            "--build-dir {}: not a directory",
            dir.display()
        );
        let rules = load_rules(self.artifact_rules.as_deref())?;
        let opts = ScanOptions {
            progress_bar: !quiet,
            ..ScanOptions::default()
        };
        Ok(Some(Arc::new(BuildScanner::new(
            dir,
            Arc::new(rules),
            opts,
        ))))
    }
}

/// The rules of `--rules FILE`, or the built-in ones.
pub(crate) fn load_rules(path: Option<&Path>) -> anyhow::Result<Rules> {
    Ok(match path {
        Some(p) => Rules::load(p)?,
        None => Rules::builtin(),
    })
}

pub fn run(cli: &Cli, a: &AamArgs) -> anyhow::Result<ExitCode> {
    let (cfg, ctx) = super::context(cli.config.as_deref(), &a.fields)?;
    let rules = load_rules(a.rules.as_deref())?;
    let system = match &a.system {
        Some(s) => s.clone(),
        None => aam::locate::detect_system(&a.dir, &rules)
            .ok_or_else(|| aam::AamError::UnknownSystem {
                path: a.dir.display().to_string(),
            })?
            .to_string(),
    };
    let located = aam::locate(&a.dir, &system, None, &rules)?;
    tracing::info!("aam: scanning {}", located.how);
    let opts = ScanOptions {
        threads: a.threads,
        progress_bar: !cli.quiet,
        progress: None,
    };
    let scan = aam::scan(&located.roots, &rules, &opts)?;
    let canon = std::fs::canonicalize(&a.dir).unwrap_or_else(|_| a.dir.clone());
    let build_id = a
        .build_id
        .clone()
        .unwrap_or_else(|| format!("aam-{}", ids::short_hash(&canon.to_string_lossy())));
    let common = PulseFields::fixed(&ctx.fixed, &build_id, &system).common(Some(time::now()));
    let source = Arc::new(SourceMeta {
        system,
        format: aam::emit::SOURCE_FORMAT.into(),
        origin: a.dir.display().to_string(),
        tool_version: None,
    });
    let envs = aam::envelopes(&scan.artifacts, &common, source, &ctx.exchange_prefix);
    let out = std::io::stdout();
    let mut w = BufWriter::new(out.lock());
    if a.publish {
        let url = a.url.clone().unwrap_or(cfg.bus.url.clone());
        let tls = cli.broker_tls(&cfg)?;
        let confirmed = super::runtime()?.block_on(async {
            let mut pcfg = PublisherConfig::new(&url, &cfg.bus.exchange_prefix);
            pcfg.connect_deadline = cli.connect_timeout();
            pcfg.tls = tls.clone();
            let mut p = Publisher::<u64>::connect(pcfg).await?;
            for (seq, env) in envs.iter().enumerate() {
                p.publish(Outgoing::from_envelope(env), seq as u64).await?;
            }
            p.flush().await?;
            let (_, stats) = p.close().await?;
            Ok::<_, anyhow::Error>(stats.confirmed)
        })?;
        eprintln!(
            "{}: {confirmed} artifact messages published (confirmed), build {}",
            a.dir.display(),
            common.build_id
        );
    } else if a.json {
        for env in &envs {
            w.write_all(&env.to_json())?;
            w.write_all(b"\n")?;
        }
    } else {
        table(&mut w, &scan.artifacts)?;
    }
    w.flush().context("writing to stdout")?;
    // Each skipped file was logged as a warning when it was met.
    let r = &scan.report;
    eprintln!(
        "{}: {} artifacts ({:.1} MB hashed), {} entries seen, {} unclassified, {} excluded, {} skipped",
        located.how,
        r.artifacts,
        r.bytes_hashed as f64 / 1e6,
        r.entries,
        r.unclassified,
        r.excluded,
        r.skipped.len()
    );
    Ok(if r.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn table(w: &mut impl Write, artifacts: &[aam::Artifact]) -> std::io::Result<()> {
    let kw = artifacts
        .iter()
        .map(|a| a.kind.len())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(w, "{:kw$}  {:>12}  {:16}  path", "kind", "size", "sha256")?;
    for a in artifacts {
        let size = a.size.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
        let sha = a.sha256.as_deref().map_or("-", |s| &s[..16.min(s.len())]);
        write!(w, "{:kw$}  {size:>12}  {sha:16}  {}", a.kind, a.path)?;
        if let Some(t) = &a.symlink_target {
            write!(w, " -> {t}")?;
        }
        if !a.fields.is_empty() {
            let f: Vec<String> = a.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
            write!(w, "  [{}]", f.join(" "))?;
        }
        writeln!(w)?;
    }
    Ok(())
}

/// Prints what a `--build-dir` scanner did; true when a scan failed as a whole.
pub(crate) fn report_scans(scanner: Option<&BuildScanner>) -> bool {
    let Some(s) = scanner else {
        return false;
    };
    let st = s.stats();
    eprintln!(
        "artifacts: {} finished builds scanned, {} artifacts, {} files skipped",
        st.builds, st.artifacts, st.skipped
    );
    for e in &st.errors {
        eprintln!("buildbus: error: artifacts: {e}");
    }
    !st.errors.is_empty()
}
