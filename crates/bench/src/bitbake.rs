//! `buildbus-bench bitbake`: BitBake event-log translation throughput beside a bare
//! baseline (JSON parse of each line and base64 decode of its pickle) on the same
//! lines, in the same run, and peak memory.
//!
//! The stream repeats the real fixture logs until it has at least N events; every copy
//! is a whole BitBake command, so the translator's state is per build and memory stays
//! bounded by one build.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use base64::Engine as _;
use clap::Args;

use super::Cli;
use buildbus::sources::file::translate_file;
use buildbus::systems::Context;

/// Options of `bench bitbake`.
#[derive(Debug, Args)]
pub struct BitbakeBench {
    /// Events in the generated log (at least; whole logs are repeated).
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Timed runs of each measurement; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Where the fixtures are.
    #[arg(long, default_value = "tests/fixtures/bitbake", value_name = "DIR")]
    pub fixtures: PathBuf,
}

fn vm_hwm_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The bare baseline: every line parsed as JSON, every event's pickle base64-decoded.
fn baseline(path: &std::path::Path) -> anyhow::Result<(u64, f64)> {
    let t = Instant::now();
    let mut r = BufReader::with_capacity(256 * 1024, File::open(path)?);
    let mut line = Vec::new();
    let mut events = 0;
    let b64 = base64::engine::general_purpose::STANDARD;
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let v: serde_json::Value = serde_json::from_slice(&line)?;
        if let Some(vars) = v.get("vars").and_then(|x| x.as_str()) {
            let compact: Vec<u8> = vars.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
            let raw = b64.decode(&compact)?;
            std::hint::black_box(raw);
            events += 1;
        }
    }
    Ok((events, t.elapsed().as_secs_f64()))
}

pub fn run(_cli: &Cli, a: &BitbakeBench) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("buildbus-bench-bb-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let big = dir.join("big.eventlog");
    let mut parts = Vec::new();
    for name in ["success", "rebuild", "failure", "live-xmlrpc"] {
        let p = a.fixtures.join(format!("{name}.eventlog"));
        let data = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let events = data
            .split(|&b| b == b'\n')
            .filter(|l| l.starts_with(b"{\"class\""))
            .count() as u64;
        parts.push((data, events));
    }
    let mut events = 0;
    let mut w = BufWriter::new(File::create(&big)?);
    'fill: loop {
        for (data, n) in &parts {
            w.write_all(data)?;
            events += n;
            if events >= a.events {
                break 'fill;
            }
        }
    }
    w.flush()?;
    drop(w);
    let bytes = std::fs::metadata(&big)?.len();
    let ctx = Arc::new(Context::builtin());
    // Warm the page cache (streaming: the bench's own memory stays small).
    std::io::copy(&mut File::open(&big)?, &mut std::io::sink())?;
    let (mut base_s, mut ours_s, mut messages) = (f64::MAX, f64::MAX, 0u64);
    let mut base_events = 0;
    for _ in 0..a.runs.max(1) {
        let (n, s) = baseline(&big)?;
        base_events = n;
        base_s = base_s.min(s);
        let t = Instant::now();
        let mut m = 0u64;
        let r = translate_file(
            &big,
            Some(buildbus::systems::bitbake::EVENTLOG),
            &ctx,
            &mut |env| {
                std::hint::black_box(env.to_json());
                m += 1;
            },
        );
        anyhow::ensure!(r.clean(), "translation errors: {:?}", r.errors.first());
        ours_s = ours_s.min(t.elapsed().as_secs_f64());
        messages = m;
    }
    let mb = bytes as f64 / 1e6;
    println!(
        "# buildbus bench bitbake: {base_events} events, {mb:.1} MB, best of {}",
        a.runs
    );
    println!();
    println!("| run | seconds | events/s | MB/s | messages | ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| baseline (JSON parse + base64 decode) | {base_s:.3} | {:.0} | {:.1} | - | - |",
        base_events as f64 / base_s,
        mb / base_s
    );
    println!(
        "| buildbus translate (+ serialize) | {ours_s:.3} | {:.0} | {:.1} | {messages} | {:.2}x |",
        base_events as f64 / ours_s,
        mb / ours_s,
        ours_s / base_s
    );
    println!();
    println!(
        "peak RSS of this process: {:.1} MiB",
        vm_hwm_kb().unwrap_or(0) as f64 / 1024.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}
