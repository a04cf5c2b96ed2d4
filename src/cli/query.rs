//! `buildbus query`: reads the DSI's permanent record: a list of builds, or what is
//! known about one build, as aligned tables or JSON.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Args, Subcommand};

use super::Cli;
use crate::stores::{self as store, BuildDetail, BuildFilter, BuildRow, Store, StoreUrl};

const EXAMPLES: &str = "\
Examples:
  # The latest 20 builds stored in ./buildbus.db
  buildbus query builds
  # Failed builds of one tree and platform in the last 2 days, from PostgreSQL
  buildbus query builds --store postgres://dsi@db.example/buildbus \\
      --tree acme --platform k8 --result failure --since 2d
  # Everything since a given time, as JSON
  buildbus query builds --since 2026-11-21T00:00:00Z --limit 0 --json
  # One build: summary, failed tasks, tests, artifacts, errors and warnings
  buildbus query build 5c5b0f95-d751-4bc2-b99e-a82a798ee7d1
  buildbus query build 5c5b0f95-d751-4bc2-b99e-a82a798ee7d1 --json | jq .build.result

The store is --store, else $BUILDBUS_STORE, else sqlite:./buildbus.db.
Times are UTC.
Exit status: 0 on success (also when no build matches), 1 when `query build` finds
no such build, 2 on errors (no such store, bad arguments).";

/// Query stored builds (what the DSI workers wrote).
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct QueryArgs {
    /// The store: sqlite:PATH, a file path, or postgres://USER@HOST:PORT/DB.
    #[arg(
        long,
        global = true,
        env = "BUILDBUS_STORE",
        default_value = "sqlite:./buildbus.db",
        value_name = "URL"
    )]
    pub store: String,

    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub what: QueryCommand,
}

#[derive(Debug, Subcommand)]
pub enum QueryCommand {
    /// List builds, latest start first.
    #[command(after_help = EXAMPLES)]
    Builds(BuildsArgs),
    /// Show one build: summary, failed tasks, test statuses, artifacts, errors and warnings.
    #[command(after_help = EXAMPLES)]
    Build(BuildArgs),
}

#[derive(Debug, Args)]
pub struct BuildsArgs {
    /// Only builds of this tree.
    #[arg(long, value_name = "TREE")]
    pub tree: Option<String>,
    /// Only builds of this platform.
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// Only builds of this build type.
    #[arg(long, value_name = "TYPE")]
    pub buildtype: Option<String>,
    /// Only builds with this result.
    #[arg(long, value_name = "RESULT",
          value_parser = ["success", "failure", "interrupted", "aborted"])]
    pub result: Option<String>,
    /// Only builds started since: an RFC 3339 time, a date (YYYY-MM-DD, UTC), or an
    /// age such as 30m, 2h, 7d, 2w.
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    pub since: Option<DateTime<Utc>>,
    /// At most this many builds (0: all).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub limit: u32,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The build id.
    #[arg(value_name = "BUILD_ID")]
    pub id: String,
}

/// `2026-11-21T10:00:00Z`, `2026-11-21`, or an age (`45s`, `30m`, `2h`, `7d`, `2w`).
fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    parse_since_at(s, Utc::now())
}

fn parse_since_at(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc());
        }
    }
    let unit_at = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(unit_at);
    let secs_per = match unit {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => 0,
    };
    let n: i64 = num.parse().unwrap_or(-1);
    if secs_per == 0 || n < 0 {
        return Err(format!(
            "{s:?} is neither a time (2026-11-21T10:00:00Z, 2026-11-21) nor an age (30m, 2h, 7d, 2w)"
        ));
    }
    n.checked_mul(secs_per)
        .and_then(chrono::TimeDelta::try_seconds)
        .and_then(|d| now.checked_sub_signed(d))
        .ok_or_else(|| format!("{s:?} is too far back"))
}

pub fn run(_cli: &Cli, a: &QueryArgs) -> anyhow::Result<ExitCode> {
    let mut st = open_existing(&a.store)?;
    let mut out = String::new();
    let code = match &a.what {
        QueryCommand::Builds(b) => {
            let filter = BuildFilter {
                tree: b.tree.clone(),
                platform: b.platform.clone(),
                buildtype: b.buildtype.clone(),
                result: b.result.clone(),
                since: b.since,
                limit: (b.limit > 0).then_some(b.limit),
            };
            let rows = st.query_builds(&filter)?;
            if a.json {
                out = serde_json::to_string_pretty(&rows)?;
                out.push('\n');
            } else if rows.is_empty() {
                eprintln!("buildbus: no build matches");
            } else {
                out = builds_table(&rows);
            }
            ExitCode::SUCCESS
        }
        QueryCommand::Build(b) => match st.query_build(&b.id)? {
            Some(d) => {
                if a.json {
                    out = serde_json::to_string_pretty(&d)?;
                    out.push('\n');
                } else {
                    out = build_detail(&d);
                }
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("buildbus: no build {} in {}", b.id, a.store);
                ExitCode::from(1)
            }
        },
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(out.as_bytes())
        .and_then(|_| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(code),
    }
}

/// Opens the store, refusing to create a new SQLite file (a typo would otherwise
/// query an empty store).
fn open_existing(url: &str) -> anyhow::Result<Box<dyn Store>> {
    if let StoreUrl::Sqlite { path, .. } = StoreUrl::parse(url)? {
        if !path.exists() {
            bail!(
                "no store at {} (give one with --store or BUILDBUS_STORE)",
                path.display()
            );
        }
    }
    Ok(store::open(url)?)
}

fn or_dash(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".to_string())
}

/// `2026-11-21T10:56:22.869Z` as `2026-11-21 10:56:22`.
fn short_time(t: &Option<String>) -> String {
    match t {
        Some(t) => t.get(..19).unwrap_or(t).replacen('T', " ", 1),
        None => "-".to_string(),
    }
}

fn duration(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "-".to_string();
    };
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000)
    }
}

/// At most `max` characters, with `…` when cut.
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// The result, or the state while there is none.
fn outcome(b: &BuildRow) -> String {
    b.result.clone().unwrap_or_else(|| b.state.clone())
}

/// A header line, then the rows: see [`aligned`].
fn table(indent: &str, headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut all = Vec::with_capacity(rows.len() + 1);
    all.push(headers.iter().map(|h| h.to_string()).collect());
    all.extend_from_slice(rows);
    aligned(indent, &all)
}

/// Columns padded to their widest cell (the last one is not padded), each line
/// prefixed with `indent`.
fn aligned(indent: &str, rows: &[Vec<String>]) -> String {
    // A cell is one line: the first, marked when there are more.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|c| match c.trim_end().split_once('\n') {
                    Some((first, _)) => format!("{} …", first.trim_end()),
                    None => c.trim_end().to_string(),
                })
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = Vec::new();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            let n = c.chars().count();
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(n),
                None => widths.push(n),
            }
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::from(indent);
        for (i, c) in r.iter().enumerate() {
            if i + 1 < r.len() {
                let _ = write!(line, "{c:<w$}  ", w = widths[i]);
            } else {
                line.push_str(c);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn builds_table(rows: &[BuildRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|b| {
            vec![
                b.build_id.clone(),
                short_time(&b.started_at),
                outcome(b),
                duration(b.duration_ms),
                or_dash(&b.tree),
                or_dash(&b.platform),
                or_dash(&b.buildtype),
                b.system.clone(),
                clip(&b.targets.join(" "), 60),
            ]
        })
        .collect();
    table(
        "",
        &[
            "BUILD",
            "STARTED (UTC)",
            "RESULT",
            "DURATION",
            "TREE",
            "PLATFORM",
            "BUILDTYPE",
            "SYSTEM",
            "TARGETS",
        ],
        &cells,
    )
}

/// `n outcome, n outcome` from a tally.
fn tally<'a>(counts: impl IntoIterator<Item = (&'a String, &'a u64)>) -> String {
    let parts: Vec<String> = counts
        .into_iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(", ")
    }
}

fn build_detail(d: &BuildDetail) -> String {
    let mut out = String::new();
    match &d.build {
        Some(b) => {
            let mut head = format!("Build {}: {}", b.build_id, outcome(b));
            if let Some(code) = b.exit_code {
                let _ = write!(head, " (exit code {code})");
            }
            out.push_str(&head);
            out.push('\n');
            let mut kv: Vec<Vec<String>> = Vec::new();
            let mut add = |k: &str, v: String| kv.push(vec![format!("{k}:"), v]);
            let system = match &b.tool_version {
                Some(v) => format!("{} {v}", b.system),
                None => b.system.clone(),
            };
            add("system", system);
            add(
                "pulse",
                format!(
                    "tree {}  platform {}  buildtype {}  product {}",
                    or_dash(&b.tree),
                    or_dash(&b.platform),
                    or_dash(&b.buildtype),
                    or_dash(&b.product)
                ),
            );
            add(
                "revision",
                format!("{} (branch {})", or_dash(&b.revision), or_dash(&b.branch)),
            );
            add("targets", b.targets.join(" "));
            add("started", or_dash(&b.started_at));
            add(
                "finished",
                match &b.finished_at {
                    Some(f) => format!("{f} (took {})", duration(b.duration_ms)),
                    None => "-".to_string(),
                },
            );
            add(
                "builder",
                match (&b.builder_user, &b.builder_host) {
                    (Some(u), Some(h)) => format!("{u}@{h}"),
                    (u, h) => or_dash(&u.clone().or_else(|| h.clone())),
                },
            );
            if !b.tags.is_empty() {
                add("tags", b.tags.join(", "));
            }
            add("command", or_dash(&b.command));
            if let Some(f) = &b.failure {
                add("failure", f.clone());
            }
            let c = &b.counts;
            add(
                "reported",
                format!(
                    "tasks: {}; tests: {}; {} errors, {} warnings",
                    tally(&c.tasks),
                    tally(&c.tests),
                    c.errors,
                    c.warnings
                ),
            );
            out.push_str(&aligned("  ", &kv));
        }
        None => {
            let _ = writeln!(
                out,
                "Build {}: no build message stored yet (only some of its other messages)",
                d.build_id
            );
        }
    }

    let _ = writeln!(out, "\nTasks: {}", tally(&d.task_counts));
    if !d.failed_tasks.is_empty() {
        let _ = writeln!(out, "\nFailed tasks ({}):", d.failed_tasks.len());
        let rows: Vec<Vec<String>> = d
            .failed_tasks
            .iter()
            .map(|t| {
                vec![
                    t.target.clone(),
                    t.task.clone(),
                    t.outcome.clone(),
                    t.exit_code.map_or("-".to_string(), |c| c.to_string()),
                    clip(&or_dash(&t.failure), 120),
                ]
            })
            .collect();
        out.push_str(&table(
            "  ",
            &["TARGET", "TASK", "OUTCOME", "EXIT", "FAILURE"],
            &rows,
        ));
    }

    if !d.tests.is_empty() {
        let _ = writeln!(out, "\nTests ({}):", d.tests.len());
        let rows: Vec<Vec<String>> = d
            .tests
            .iter()
            .map(|t| {
                let num = |v: Option<i64>| v.map_or("-".to_string(), |n| n.to_string());
                vec![
                    t.test.clone(),
                    t.scope.clone(),
                    t.status.clone(),
                    num(t.attempt),
                    num(t.shard),
                    duration(t.duration_ms),
                    t.cached
                        .map_or("-", |c| if c { "yes" } else { "no" })
                        .to_string(),
                    or_dash(&t.strategy),
                ]
            })
            .collect();
        out.push_str(&table(
            "  ",
            &[
                "TEST", "SCOPE", "STATUS", "ATTEMPT", "SHARD", "DURATION", "CACHED", "STRATEGY",
            ],
            &rows,
        ));
    }

    if !d.artifacts.is_empty() {
        let _ = writeln!(out, "\nArtifacts ({}):", d.artifacts.len());
        let rows: Vec<Vec<String>> = d
            .artifacts
            .iter()
            .map(|a| {
                vec![
                    a.path.clone(),
                    a.kind.clone(),
                    a.size.map_or("-".to_string(), |s| s.to_string()),
                    or_dash(&a.target),
                ]
            })
            .collect();
        out.push_str(&table("  ", &["PATH", "KIND", "SIZE", "TARGET"], &rows));
    }

    if !d.logs.is_empty() {
        let _ = writeln!(out, "\nErrors and warnings ({}):", d.logs.len());
        for l in &d.logs {
            let mut lines = l.message.lines();
            let first = lines.next().unwrap_or_default();
            let place = match (&l.target, &l.task) {
                (Some(t), Some(k)) => format!("{t} {k}: "),
                (Some(t), None) => format!("{t}: "),
                (None, Some(k)) => format!("{k}: "),
                (None, None) => String::new(),
            };
            let _ = writeln!(out, "  {:<8}  {place}{first}", l.level);
            for more in lines {
                let _ = writeln!(out, "{}", format!("  {:<8}  {more}", "").trim_end());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_forms() {
        let now = DateTime::parse_from_rfc3339("2026-11-21T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |s| parse_since_at(s, now).map(|t| t.to_rfc3339());
        assert_eq!(at("2h").unwrap(), "2026-11-21T10:00:00+00:00");
        assert_eq!(at("7d").unwrap(), "2026-11-14T12:00:00+00:00");
        assert_eq!(at("30m").unwrap(), "2026-11-21T11:30:00+00:00");
        assert_eq!(at("2026-11-20").unwrap(), "2026-11-20T00:00:00+00:00");
        assert_eq!(
            at("2026-11-21T10:00:00+02:00").unwrap(),
            "2026-11-21T08:00:00+00:00"
        );
        for bad in ["", "2", "h", "-2h", "2y", "99999999999999999999d"] {
            assert!(at(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tables_align() {
        let t = table("", &["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
        assert_eq!(duration(Some(1571)), "1.6s");
        assert_eq!(duration(Some(75)), "75ms");
        assert_eq!(duration(Some(192_000)), "3m12s");
    }
}
