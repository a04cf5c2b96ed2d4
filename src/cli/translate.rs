//! `buildbus translate`: files in, normalized envelopes (or summaries) out.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use super::{Cli, FieldArgs};
use crate::cli::summary::Summaries;
use crate::sources::file::{translate_file, Format};

const EXAMPLES: &str = "\
Examples:
  # Envelopes as JSON lines, one per message
  buildbus translate build_events.json
  # A binary BEP file, with a fixed tree and an extra tag
  buildbus translate --format bep-binary --tree acme --tag nightly build_events.bin
  # A readable summary per build
  buildbus translate --summary tests/fixtures/bazel/*.json

Exit status: 0 when every input was read (even if the build it describes failed),
1 when an input had errors (everything readable is still translated), 2 on usage errors.";

/// Translate build-event files into normalized messages (JSON lines on stdout).
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct TranslateArgs {
    /// Input format: auto, bep-json, bep-binary.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    pub format: FormatArg,

    /// Print a human summary per build instead of the messages.
    #[arg(long)]
    pub summary: bool,

    #[command(flatten)]
    pub fields: FieldArgs,

    /// Build-event files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
pub struct FormatArg(pub Option<Format>);

pub(crate) fn parse_format(s: &str) -> Result<FormatArg, String> {
    Format::parse(s).map(FormatArg)
}

pub fn run(cli: &Cli, a: &TranslateArgs) -> anyhow::Result<ExitCode> {
    let (_, ctx) = super::context(cli.config.as_deref(), &a.fields)?;
    let ctx = Arc::new(ctx);
    let stdout = std::io::stdout();
    let mut w = BufWriter::new(stdout.lock());
    let mut summaries = Summaries::default();
    let mut write_err: Option<std::io::Error> = None;
    let mut failed = false;
    // One buffer for every message's JSON.
    let mut json = Vec::with_capacity(4096);
    for path in &a.files {
        let report = translate_file(path, a.format.0, &ctx, &mut |env| {
            if a.summary {
                // Each build's summary as soon as it finished (and out at once: a
                // reader of a long stream sees builds as they end).
                if let Some(s) = summaries.add(&env) {
                    if write_err.is_none() {
                        let r = writeln!(w, "{}", s.render()).and_then(|()| w.flush());
                        if let Err(e) = r {
                            write_err = Some(e);
                        }
                    }
                }
            } else if write_err.is_none() {
                json.clear();
                env.write_json(&mut json);
                json.push(b'\n');
                let r = w.write_all(&json);
                if let Err(e) = r {
                    write_err = Some(e);
                }
            }
        });
        for e in report.error_lines() {
            eprintln!("buildbus: error: {e}");
        }
        if report.unknown > 0 {
            tracing::warn!(
                "{}: skipped {} events of kinds this buildbus does not know",
                report.origin,
                report.unknown
            );
        }
        tracing::info!(
            origin = %report.origin,
            events = report.events,
            messages = report.messages,
            "translated"
        );
        failed |= !report.clean();
        // The file is done: builds it left unfinished end here.
        for s in summaries.drain() {
            if write_err.is_none() {
                if let Err(e) = writeln!(w, "{}", s.render()) {
                    write_err = Some(e);
                }
            }
        }
        debug_assert_eq!(summaries.held(), 0);
    }
    if let Some(e) = write_err {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(ExitCode::SUCCESS);
        }
        return Err(e).context("writing to stdout");
    }
    w.flush().context("writing to stdout")?;
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
