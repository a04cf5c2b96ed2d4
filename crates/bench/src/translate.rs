//! `buildbus-bench translate`: translation throughput and memory on generated inputs.
//!
//! It repeats the Bazel fixture invocations (each with a fresh uuid, so each
//! repetition is its own build) into one large `.json` and one large `.bin` stream, then
//! times, on the same warm files, a bare parse of every event (the baseline) against
//! `translate_file` with a sink that serializes every envelope, as publishing will. It also
//! reports peak memory, in this process and in fresh child processes translating a long and
//! a ten times shorter stream, to show memory does not grow with the stream's length.

use std::fs::{self, File};
use std::hint::black_box;
use std::io::{BufRead, BufReader, BufWriter, ErrorKind, IsTerminal, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context as _};
use clap::Args;
use prost::Message;
use serde_json::{json, Value};

use super::Cli;
use buildbus::decode::bep::codec;
use buildbus::decode::bep::proto::build_event_stream::{build_event::Payload, BuildEvent};
use buildbus::decode::framing::{Framer, Next};
use buildbus::sources::file::{translate_file, Format};
use buildbus::systems::Context;

/// The read buffer of `translate_file` (`src/sources/file/mod.rs`), used by the baselines too.
const READ_BUF: usize = 256 * 1024;

/// The fixture invocations repeated, in this order.
const FIXTURES: [&str; 5] = [
    "build_ok",
    "build_fail",
    "test_mixed",
    "pattern_fail",
    "interrupted",
];

/// Length of a uuid in its text form; fresh ids replace the fixtures' ones in place.
const UUID_LEN: usize = 36;

/// A baseline frame over this is treated as corrupt input rather than allocated.
const MAX_FRAME: u64 = 256 * 1024 * 1024;

#[derive(Debug, Args)]
pub struct TranslateBench {
    /// Events in the generated streams (at least; whole invocations are repeated).
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    pub events: u64,

    /// Where to write the generated files (default: a new temporary directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Keep the generated files.
    #[arg(long)]
    pub keep: bool,

    /// Print the results as JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Timed runs of each measurement; the best is reported.
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,

    /// The Bazel fixtures to repeat.
    #[arg(long, value_name = "DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/bazel"))]
    pub fixtures: PathBuf,

    /// Also time the stages: framing and decoding alone (buildbus's `Framer` and codec),
    /// then translating without serializing the messages.
    #[arg(long)]
    pub breakdown: bool,

    /// Internal: translate FILE once and print its peak memory as JSON (the child process
    /// of the memory measurement).
    #[arg(long, hide = true, value_name = "FILE")]
    pub only_translate: Option<PathBuf>,
}

/// Progress on stderr (`say!(END, fmt, args..)`, END being `""` or `"\n"`); a closed
/// stderr is ignored rather than a panic.
macro_rules! say {
    ($end:literal, $($arg:tt)*) => {{
        let mut e = std::io::stderr().lock();
        let _ = e.write_fmt(format_args!($($arg)*));
        let _ = e.write_all($end.as_bytes());
        let _ = e.flush();
    }};
}

/// Writes the results; a closed pipe (`| head`) is not an error.
fn stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// Generating the streams

/// One fixture invocation in one format, ready to be written again and again.
struct Template {
    name: String,
    /// The whole invocation: JSON lines with `\n`, or varint-delimited frames.
    bytes: Vec<u8>,
    /// Where the invocation's uuid occurs in `bytes`: in the started event, and anywhere
    /// else it is repeated (replaced there too, so a repetition is a new invocation).
    uuid_at: Vec<usize>,
    events: u64,
}

impl Template {
    fn write(&self, w: &mut impl Write, uuid: &str) -> std::io::Result<()> {
        let mut last = 0;
        for &at in &self.uuid_at {
            w.write_all(&self.bytes[last..at])?;
            w.write_all(uuid.as_bytes())?;
            last = at + UUID_LEN;
        }
        w.write_all(&self.bytes[last..])
    }

    fn with_uuid(&self, uuid: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.bytes.len());
        // Writing to a Vec cannot fail.
        let _ = self.write(&mut v, uuid);
        v
    }
}

fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    let mut at = Vec::new();
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        if &hay[i..i + needle.len()] == needle {
            at.push(i);
            i += needle.len();
        } else {
            i += 1;
        }
    }
    at
}

/// Finishes a template: finds the uuid of the started event (`started` is its byte range)
/// everywhere in the invocation, and checks that writing a fresh one really changes the
/// started event's uuid (`uuid_of` decodes the started event's bytes).
fn template(
    name: String,
    bytes: Vec<u8>,
    events: u64,
    started: Option<(Range<usize>, String)>,
    uuid_of: &dyn Fn(&[u8]) -> anyhow::Result<String>,
) -> anyhow::Result<Template> {
    let Some((range, uuid)) = started else {
        bail!("{name}: no started event");
    };
    ensure!(
        uuid.len() == UUID_LEN,
        "{name}: started.uuid {uuid:?} is not a {UUID_LEN}-character uuid"
    );
    let uuid_at = find_all(&bytes, uuid.as_bytes());
    let inside = uuid_at
        .iter()
        .filter(|&&at| range.contains(&at) && at + UUID_LEN <= range.end)
        .count();
    ensure!(
        inside == 1,
        "{name}: the uuid occurs {inside} times in the started event (expected once)"
    );
    let t = Template {
        name,
        bytes,
        uuid_at,
        events,
    };
    let probe = fresh_uuid(0x5eed, u64::MAX);
    let patched = t.with_uuid(&probe);
    // The started event keeps its place and length: the uuid is replaced in place.
    let got = uuid_of(&patched[range])?;
    ensure!(
        got == probe,
        "{}: replacing the uuid gave started.uuid {got:?}",
        t.name
    );
    ensure!(
        find_all(&patched, uuid.as_bytes()).is_empty(),
        "{}: the old uuid survived the substitution",
        t.name
    );
    Ok(t)
}

fn started_uuid(ev: &BuildEvent) -> Option<String> {
    match &ev.payload {
        Some(Payload::Started(s)) => Some(s.uuid.clone()),
        _ => None,
    }
}

/// A JSON fixture: every line parsed once, blank lines dropped, `\n` line ends.
fn json_template(name: &str, path: &Path) -> anyhow::Result<Template> {
    let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut bytes = Vec::with_capacity(text.len());
    let mut events = 0;
    let mut started = None;
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let ev =
            codec::decode_json(line).map_err(|r| anyhow!("{}:{}: {r}", path.display(), i + 1))?;
        if let Some(uuid) = started_uuid(&ev) {
            ensure!(
                started.is_none(),
                "{}: more than one started event",
                path.display()
            );
            started = Some((bytes.len()..bytes.len() + line.len(), uuid));
        }
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
        events += 1;
    }
    let uuid_of = |b: &[u8]| -> anyhow::Result<String> {
        let ev = codec::decode_json(b).map_err(|r| anyhow!("{name}: patched started: {r}"))?;
        started_uuid(&ev).ok_or_else(|| anyhow!("{name}: patched line is not started"))
    };
    template(name.to_string(), bytes, events, started, &uuid_of)
}

/// A binary fixture: kept byte for byte (a prost re-encode would drop every field our BEP
/// subset does not declare, making the stream smaller than Bazel's), every frame decoded
/// once. Also gives the bytes a re-encode would write, for the record.
fn bin_template(name: &str, path: &Path) -> anyhow::Result<(Template, u64)> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut at = 0;
    let mut events = 0;
    let mut started = None;
    let mut reencoded = 0u64;
    while at < bytes.len() {
        let (len, n) = buildbus::decode::framing::varint(bytes.get(at..).unwrap_or_default())
            .ok_or_else(|| anyhow!("{}: bad length prefix at {at}", path.display()))?;
        let body = at + n
            ..usize::try_from(len)
                .ok()
                .and_then(|l| (at + n).checked_add(l))
                .filter(|&end| end <= bytes.len())
                .ok_or_else(|| anyhow!("{}: truncated frame at {at}", path.display()))?;
        let ev = BuildEvent::decode(&bytes[body.clone()])
            .with_context(|| format!("{}: frame at {at}", path.display()))?;
        reencoded += ev.encoded_len() as u64 + prost::length_delimiter_len(ev.encoded_len()) as u64;
        if let Some(uuid) = started_uuid(&ev) {
            ensure!(
                started.is_none(),
                "{}: more than one started event",
                path.display()
            );
            started = Some((body.clone(), uuid));
        }
        events += 1;
        at = body.end;
    }
    let uuid_of = |b: &[u8]| -> anyhow::Result<String> {
        let ev = BuildEvent::decode(b).with_context(|| format!("{name}: patched started"))?;
        started_uuid(&ev).ok_or_else(|| anyhow!("{name}: patched frame is not started"))
    };
    Ok((
        template(name.to_string(), bytes, events, started, &uuid_of)?,
        reencoded,
    ))
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A version-4-shaped uuid, unique per repetition (its last group is the repetition).
fn fresh_uuid(seed: u64, rep: u64) -> String {
    let r = splitmix(seed ^ splitmix(rep));
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        r >> 32,
        (r >> 16) & 0xffff,
        r & 0xfff,
        (r >> 40) & 0xfff,
        rep & 0xffff_ffff_ffff
    )
}

/// What was written into one generated stream.
#[derive(Debug, Clone, Copy)]
struct Written {
    events: u64,
    bytes: u64,
    builds: u64,
}

fn write_stream(
    path: &Path,
    templates: &[Template],
    target: u64,
    seed: u64,
    progress: bool,
) -> anyhow::Result<Written> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut done = Written {
        events: 0,
        bytes: 0,
        builds: 0,
    };
    let label = path.file_name().unwrap_or_default().to_string_lossy();
    let mut shown = 0;
    let live = progress && std::io::stderr().is_terminal();
    while done.events < target || done.builds == 0 {
        let t = &templates[(done.builds % templates.len() as u64) as usize];
        t.write(&mut w, &fresh_uuid(seed, done.builds))
            .with_context(|| format!("writing {}", path.display()))?;
        done.events += t.events;
        done.bytes += t.bytes.len() as u64;
        done.builds += 1;
        if live && done.events - shown >= 50_000 {
            shown = done.events;
            say!(
                "",
                "\rgenerating {label}: {} / {target} events, {:.1} MB",
                done.events,
                mb(done.bytes)
            );
        }
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    if progress {
        say!(
            "\n",
            "{}generated {label}: {} events in {} builds, {:.1} MB",
            if live { "\r" } else { "" },
            done.events,
            done.builds,
            mb(done.bytes)
        );
    }
    Ok(done)
}

// ---------------------------------------------------------------------------------------
// Measuring

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// One timed pass over a file.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pass {
    events: u64,
    bytes: u64,
    messages: Option<u64>,
    /// Bytes of serialized envelopes.
    out_bytes: Option<u64>,
    secs: f64,
    /// CPU time of this thread during the pass (filled in by [`best_of`]): less disturbed
    /// than `secs` by other processes on a busy machine.
    cpu: Option<f64>,
}

/// Reads every JSON line (same buffer size as `translate_file`) and parses it into a
/// `serde_json::Value`, nothing else.
fn baseline_json(path: &Path) -> anyhow::Result<Pass> {
    let t0 = Instant::now();
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = BufReader::with_capacity(READ_BUF, file);
    let mut line = Vec::new();
    let (mut events, mut bytes, mut index) = (0u64, 0u64, 0u64);
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        index += 1;
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if body.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let v: Value =
            serde_json::from_slice(body).with_context(|| format!("{}:{index}", path.display()))?;
        black_box(&v);
        events += 1;
    }
    Ok(Pass {
        events,
        bytes,
        messages: None,
        out_bytes: None,
        secs: t0.elapsed().as_secs_f64(),
        cpu: None,
    })
}

/// Reads one varint from a buffered reader; `None` at a clean end of data.
fn read_varint(r: &mut impl BufRead) -> anyhow::Result<Option<(u64, u64)>> {
    let mut v: u64 = 0;
    for i in 0..10u32 {
        let mut b = [0u8; 1];
        match r.read_exact(&mut b) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof && i == 0 => return Ok(None),
            Err(e) => return Err(e).context("reading a length prefix"),
        }
        v |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok(Some((v, u64::from(i) + 1)));
        }
    }
    bail!("length prefix longer than 10 bytes")
}

/// Frames every varint-delimited event and decodes it with prost, nothing else.
fn baseline_bin(path: &Path) -> anyhow::Result<Pass> {
    let t0 = Instant::now();
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = BufReader::with_capacity(READ_BUF, file);
    let mut buf = Vec::new();
    let (mut events, mut bytes) = (0u64, 0u64);
    while let Some((len, n)) =
        read_varint(&mut r).with_context(|| format!("{}: event {}", path.display(), events + 1))?
    {
        ensure!(
            len <= MAX_FRAME,
            "{}: event {} claims {len} bytes",
            path.display(),
            events + 1
        );
        buf.resize(len as usize, 0);
        r.read_exact(&mut buf)
            .with_context(|| format!("{}: event {}", path.display(), events + 1))?;
        let ev = BuildEvent::decode(&buf[..])
            .with_context(|| format!("{}: event {}", path.display(), events + 1))?;
        black_box(&ev);
        events += 1;
        bytes += n + len;
    }
    Ok(Pass {
        events,
        bytes,
        messages: None,
        out_bytes: None,
        secs: t0.elapsed().as_secs_f64(),
        cpu: None,
    })
}

/// `translate_file` with a sink that serializes every envelope to JSON and drops it (or,
/// without `serialize`, just drops it).
fn translate(
    path: &Path,
    format: Option<Format>,
    ctx: &Arc<Context>,
    serialize: bool,
) -> anyhow::Result<Pass> {
    let t0 = Instant::now();
    let mut out_bytes = 0u64;
    // One buffer for every message, as `buildbus translate` writes them.
    let mut json = Vec::with_capacity(4096);
    let report = translate_file(path, format, ctx, &mut |env| {
        if serialize {
            json.clear();
            env.write_json(&mut json);
            out_bytes += json.len() as u64;
            black_box(&json);
        } else {
            black_box(env);
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    if let Some(e) = report.errors.first() {
        bail!(
            "{} error(s) translating {} (first: {e})",
            report.errors.len(),
            path.display()
        );
    }
    ensure!(
        !report.incomplete,
        "{} was not read to its end",
        path.display()
    );
    Ok(Pass {
        events: report.events,
        bytes: report.end_offset,
        messages: Some(report.messages),
        out_bytes: serialize.then_some(out_bytes),
        secs,
        cpu: None,
    })
}

/// buildbus's own framing and decoding of every event, no translation.
fn decode_only(path: &Path, format: Format, ctx: &Context) -> anyhow::Result<Pass> {
    let t0 = Instant::now();
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = BufReader::with_capacity(READ_BUF, file);
    let origin = path.display().to_string();
    let mut framer = Framer::new(reader, format.framing(), &origin, ctx.max_event_bytes);
    if format == buildbus::systems::bitbake::EVENTLOG {
        anyhow::bail!("bench translate measures Bazel streams only");
    }
    // What translation keeps of a binary event, as `translate_file` decodes it.
    let needs = buildbus::systems::bazel::BazelTranslator::decode_needs(ctx);
    let binary = format == buildbus::systems::bazel::BEP_BINARY;
    let decode = |b: &[u8]| codec::decode(b, binary, &needs);
    let (mut events, mut bytes) = (0u64, 0u64);
    loop {
        match framer.next_frame() {
            Next::Frame(f) => {
                let ev = decode(&f.bytes)
                    .map_err(|r| anyhow!("{}: {r}", framer.position(f.start, f.index)))?;
                black_box(ev);
                // As `evt::stream::pump` does.
                framer.recycle(f.bytes);
                events += 1;
                bytes = f.end;
            }
            Next::End { partial: None } => break,
            Next::End { partial: Some(p) } => {
                bail!(
                    "{}: ends inside an event",
                    framer.position(p.start, p.index)
                )
            }
            Next::Skipped(e) | Next::Failed(e) => bail!("{e}"),
        }
    }
    Ok(Pass {
        events,
        bytes,
        messages: None,
        out_bytes: None,
        secs: t0.elapsed().as_secs_f64(),
        cpu: None,
    })
}

/// Reads the whole file once, so the timed passes find it in the page cache.
fn warm(path: &Path) -> anyhow::Result<u64> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// CPU time this thread has run, in ns (`/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> Option<u64> {
    fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs each measurement `runs` times, interleaved; keeps the fastest pass of each (and
/// the least CPU time, separately) and checks that every pass saw the same events.
fn best_of(
    runs: u32,
    what: &[String],
    mut f: impl FnMut(usize) -> anyhow::Result<Pass>,
    progress: bool,
) -> anyhow::Result<Vec<Pass>> {
    let progress = progress && std::io::stderr().is_terminal();
    let mut best: Vec<Option<Pass>> = vec![None; what.len()];
    for run in 1..=runs {
        for (k, b) in best.iter_mut().enumerate() {
            if progress {
                say!("", "\r{:<50}", format!("{} (run {run}/{runs})", what[k]));
            }
            let cpu0 = thread_cpu_ns();
            let mut p = f(k)?;
            p.cpu = cpu0
                .zip(thread_cpu_ns())
                .map(|(a, b)| b.saturating_sub(a) as f64 / 1e9);
            if let Some(prev) = b {
                ensure!(
                    (prev.events, prev.bytes, prev.messages) == (p.events, p.bytes, p.messages),
                    "{}: runs disagree ({prev:?} then {p:?})",
                    what[k]
                );
            }
            // The best wall time and, on its own, the best CPU time.
            let cpu = match (b.and_then(|prev| prev.cpu), p.cpu) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            };
            if b.is_none_or(|prev| p.secs < prev.secs) {
                *b = Some(p);
            }
            if let Some(b) = b {
                b.cpu = cpu;
            }
        }
    }
    if progress {
        say!("", "\r{:<50}\r", "");
    }
    best.into_iter()
        .map(|b| b.ok_or_else(|| anyhow!("no runs")))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Memory

/// A `kB` line of `/proc/self/status` (`VmHWM` is the peak resident set).
fn proc_status_kb(key: &str) -> Option<u64> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resets `VmHWM` to the current RSS (Linux `clear_refs` 5); false if not possible.
fn reset_peak() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn mib(kb: Option<u64>) -> String {
    kb.map_or("n/a".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// The child side: translate one file, print events, messages and peak RSS as JSON.
fn only_translate(path: &Path, ctx: &Arc<Context>) -> anyhow::Result<ExitCode> {
    let before = proc_status_kb("VmHWM");
    let p = translate(path, None, ctx, true)?;
    let v = json!({
        "file": path.display().to_string(),
        "events": p.events,
        "bytes": p.bytes,
        "messages": p.messages,
        "seconds": p.secs,
        "vm_hwm_kb_before": before,
        "vm_hwm_kb": proc_status_kb("VmHWM"),
    });
    stdout(&format!("{v}\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// Translates `path` in a fresh child process; gives what it printed.
fn child_translate(cli: &Cli, path: &Path) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cmd = Proc::new(exe);
    if let Some(c) = &cli.config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(["-q", "translate", "--only-translate"])
        .arg(path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let out = cmd.output().context("running the child translation")?;
    ensure!(
        out.status.success(),
        "child translation of {} failed ({})",
        path.display(),
        out.status
    );
    serde_json::from_slice(&out.stdout).context("reading the child's result")
}

// ---------------------------------------------------------------------------------------
// The command

/// Removes what the bench created, unless asked to keep it.
struct Cleanup {
    files: Vec<PathBuf>,
    dir: Option<PathBuf>,
    keep: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
        if let Some(d) = &self.dir {
            let _ = fs::remove_dir(d);
        }
    }
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// What one timed pass measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// A bare parse: `serde_json::Value` per line, or prost per frame.
    Baseline,
    /// buildbus's `Framer` and codec, nothing after.
    Decode,
    /// `translate_file`, messages dropped unserialized.
    NoSink,
    /// `translate_file`, every message serialized to JSON.
    Translate,
}

impl Stage {
    fn name(self, format: &str) -> String {
        match self {
            Stage::Baseline => format!("baseline {format}"),
            Stage::Decode => "  frame+decode".into(),
            Stage::NoSink => "  + translate".into(),
            Stage::Translate => format!("buildbus {format}"),
        }
    }

    fn key(self) -> &'static str {
        match self {
            Stage::Baseline => "baseline",
            Stage::Decode => "decode",
            Stage::NoSink => "translate_no_sink",
            Stage::Translate => "translate",
        }
    }
}

struct Row {
    name: String,
    stage: Stage,
    format: &'static str,
    pass: Pass,
    ratio: Option<f64>,
    cpu_ratio: Option<f64>,
}

impl Row {
    fn json(&self) -> Value {
        let p = &self.pass;
        json!({
            "stage": self.stage.key(),
            "format": self.format,
            "events": p.events,
            "bytes": p.bytes,
            "seconds": p.secs,
            "events_per_sec": p.events as f64 / p.secs,
            "mb_per_sec": mb(p.bytes) / p.secs,
            "messages": p.messages,
            "message_bytes": p.out_bytes,
            "cpu_seconds": p.cpu,
            "ratio_to_baseline": self.ratio,
            "cpu_ratio_to_baseline": self.cpu_ratio,
        })
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn run(cli: &Cli, a: &TranslateBench) -> anyhow::Result<ExitCode> {
    let (_, ctx) = super::context(cli.config.as_deref())?;
    let ctx = Arc::new(ctx);
    if let Some(path) = &a.only_translate {
        return only_translate(path, &ctx);
    }
    ensure!(a.events > 0, "--events must be at least 1");
    let progress = !cli.quiet;

    // The templates, each fixture parsed once.
    let mut json_t = Vec::new();
    let mut bin_t = Vec::new();
    let (mut bin_orig, mut bin_reenc) = (0u64, 0u64);
    for name in FIXTURES {
        json_t.push(json_template(
            name,
            &a.fixtures.join(format!("{name}.json")),
        )?);
        let (t, re) = bin_template(name, &a.fixtures.join(format!("{name}.bin")))?;
        bin_orig += t.bytes.len() as u64;
        bin_reenc += re;
        bin_t.push(t);
    }
    // Occurrences of the fixture uuids outside their started events (replaced as well).
    let uuid_elsewhere: usize = json_t
        .iter()
        .chain(&bin_t)
        .map(|t| t.uuid_at.len() - 1)
        .sum();
    for (j, b) in json_t.iter().zip(&bin_t) {
        if j.events != b.events {
            tracing::warn!(
                "{}: {} JSON events but {} binary ones",
                j.name,
                j.events,
                b.events
            );
        }
    }

    // Where the streams go.
    let (dir, made_dir) = match &a.dir {
        Some(d) => {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let d = std::env::temp_dir().join(format!("buildbus-bench-{}", std::process::id()));
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            (d.clone(), Some(d))
        }
    };
    let big_json = dir.join("big.json");
    let big_bin = dir.join("big.bin");
    let small_events = (a.events / 10).max(1);
    let small_json = dir.join("small.json");
    let small_bin = dir.join("small.bin");
    let _cleanup = Cleanup {
        files: vec![
            big_json.clone(),
            big_bin.clone(),
            small_json.clone(),
            small_bin.clone(),
        ],
        dir: made_dir,
        keep: a.keep,
    };
    let seed = splitmix(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()),
    );
    let wj = write_stream(&big_json, &json_t, a.events, seed, progress)?;
    let wb = write_stream(&big_bin, &bin_t, a.events, seed, progress)?;
    let sj = write_stream(&small_json, &json_t, small_events, seed, progress)?;
    let sb = write_stream(&small_bin, &bin_t, small_events, seed, progress)?;
    if progress {
        say!("\n", "streams in {}", dir.display());
    }
    let hwm_generate = proc_status_kb("VmHWM");

    // Warm the page cache.
    for p in [&big_json, &big_bin] {
        warm(p)?;
    }

    // The timed passes, format by format.
    let mut stages = vec![Stage::Baseline];
    if a.breakdown {
        stages.extend([Stage::Decode, Stage::NoSink]);
    }
    stages.push(Stage::Translate);
    let mut rows = Vec::new();
    let mut hwm = Vec::new();
    let mut reset_ok = true;
    for (format, path, w) in [
        (buildbus::systems::bazel::BEP_JSON, &big_json, &wj),
        (buildbus::systems::bazel::BEP_BINARY, &big_bin, &wb),
    ] {
        let label = match format {
            buildbus::systems::bazel::BEP_JSON => "json",
            _ => "binary",
        };
        let names: Vec<String> = stages.iter().map(|s| s.name(label)).collect();
        reset_ok &= reset_peak();
        let passes = best_of(
            a.runs,
            &names,
            |k| match stages[k] {
                Stage::Baseline => match format {
                    buildbus::systems::bazel::BEP_JSON => baseline_json(path),
                    _ => baseline_bin(path),
                },
                Stage::Decode => decode_only(path, format, &ctx),
                Stage::NoSink => translate(path, Some(format), &ctx, false),
                Stage::Translate => translate(path, Some(format), &ctx, true),
            },
            progress,
        )?;
        hwm.push(proc_status_kb("VmHWM"));
        let (base, base_cpu) = (passes[0].secs, passes[0].cpu);
        for ((stage, name), pass) in stages.iter().zip(names).zip(passes) {
            ensure!(
                pass.events == w.events,
                "{name}: saw {} events of the {} written",
                pass.events,
                w.events
            );
            rows.push(Row {
                name,
                stage: *stage,
                format: label,
                pass,
                ratio: (*stage != Stage::Baseline).then_some(pass.secs / base),
                cpu_ratio: (*stage != Stage::Baseline)
                    .then(|| Some(pass.cpu? / base_cpu?))
                    .flatten(),
            });
        }
    }
    let hwm_json = hwm.first().copied().flatten();
    let hwm_bin = hwm.get(1).copied().flatten();
    let messages: Vec<Option<u64>> = rows
        .iter()
        .filter(|r| r.stage == Stage::Translate)
        .map(|r| r.pass.messages)
        .collect();
    if messages.windows(2).any(|w| w[0] != w[1]) {
        tracing::warn!("the JSON and binary streams gave different message counts: {messages:?}");
    }

    // Memory in fresh processes: a long stream against a ten times shorter one.
    let live = progress && std::io::stderr().is_terminal();
    if live {
        say!("", "\rpeak memory in child processes...");
    }
    let mut children = Vec::new();
    for (format, label, path) in [
        ("json", "big", &big_json),
        ("json", "small", &small_json),
        ("binary", "big", &big_bin),
        ("binary", "small", &small_bin),
    ] {
        let v = child_translate(cli, path)?;
        children.push((format, label, v));
    }
    if live {
        say!("", "\r{:<40}\r", "");
    }

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = cpu_model();

    if a.json {
        let v = json!({
            "machine": { "cores": cores, "cpu": cpu },
            "events_requested": a.events,
            "runs": a.runs,
            "files": {
                "json": { "path": big_json.display().to_string(), "events": wj.events, "bytes": wj.bytes, "builds": wj.builds },
                "binary": { "path": big_bin.display().to_string(), "events": wb.events, "bytes": wb.bytes, "builds": wb.builds },
                "small_json": { "events": sj.events, "bytes": sj.bytes },
                "small_binary": { "events": sb.events, "bytes": sb.bytes },
                "binary_fixture_bytes": bin_orig,
                "fixture_uuid_occurrences_outside_started": uuid_elsewhere,
                "binary_fixture_bytes_if_reencoded": bin_reenc,
            },
            "results": rows.iter().map(Row::json).collect::<Vec<_>>(),
            "memory": {
                "vm_hwm_kb_after_generation": hwm_generate,
                "vm_hwm_kb_after_json_runs": hwm_json,
                "vm_hwm_kb_after_binary_runs": hwm_bin,
                "peak_reset_between_phases": reset_ok,
                "children": children.iter().map(|(f, l, v)| json!({"format": f, "stream": l, "result": v})).collect::<Vec<_>>(),
            },
        });
        stdout(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
        return Ok(ExitCode::SUCCESS);
    }

    let mut o = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "buildbus bench translate: {cores} cores, {cpu}; best of {} runs",
        a.runs
    );
    let _ = writeln!(
        o,
        "streams: {} events in {} builds; big.json {:.1} MB, big.bin {:.1} MB",
        thousands(wj.events),
        thousands(wj.builds),
        mb(wj.bytes),
        mb(wb.bytes)
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<16} {:>10} {:>7} {:>7} {:>10} {:>7} {:>9} {:>7} {:>6} {:>7} {:>6}",
        "",
        "events",
        "MB",
        "best s",
        "events/s",
        "MB/s",
        "messages",
        "msg MB",
        "ratio",
        "cpu s",
        "cpu r"
    );
    for r in &rows {
        let p = &r.pass;
        let _ = writeln!(
            o,
            "{:<16} {:>10} {:>7.1} {:>7.3} {:>10} {:>7.1} {:>9} {:>7} {:>6} {:>7} {:>6}",
            r.name,
            thousands(p.events),
            mb(p.bytes),
            p.secs,
            thousands((p.events as f64 / p.secs) as u64),
            mb(p.bytes) / p.secs,
            p.messages.map_or("-".into(), thousands),
            p.out_bytes.map_or("-".into(), |b| format!("{:.1}", mb(b))),
            r.ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            p.cpu.map_or("-".into(), |x| format!("{x:.3}")),
            r.cpu_ratio.map_or("-".into(), |x| format!("{x:.2}x")),
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "ratio: best wall time / the baseline's (target: <= 2x); cpu s, cpu r: the same \
         with this thread's CPU time,\nsteadier when other processes compete for the cores \
         (load average at the end: {})",
        fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "n/a".into())
    );
    let since = if reset_ok {
        "since the phase began"
    } else {
        "of the whole process"
    };
    let _ = writeln!(o);
    let _ = writeln!(o, "peak RSS (VmHWM) of this process:");
    let _ = writeln!(o, "  after generating the streams  {}", mib(hwm_generate));
    let _ = writeln!(
        o,
        "  after the JSON runs           {} ({since})",
        mib(hwm_json)
    );
    let _ = writeln!(
        o,
        "  after the binary runs         {} ({since})",
        mib(hwm_bin)
    );
    let _ = writeln!(o, "peak RSS of a fresh process translating one stream:");
    for (f, l, v) in &children {
        let _ = writeln!(
            o,
            "  {f:<6} {l:<5} {:>10} events  {:>10} messages  {:>7.3} s  {} ({} before translating)",
            thousands(v["events"].as_u64().unwrap_or(0)),
            thousands(v["messages"].as_u64().unwrap_or(0)),
            v["seconds"].as_f64().unwrap_or(0.0),
            mib(v["vm_hwm_kb"].as_u64()),
            mib(v["vm_hwm_kb_before"].as_u64()),
        );
    }
    let _ = writeln!(
        o,
        "fixture uuids outside the started events: {uuid_elsewhere} (every occurrence gets the \
         fresh uuid)"
    );
    let _ = writeln!(
        o,
        "binary fixtures: {bin_orig} bytes as Bazel wrote them, {bin_reenc} if re-encoded with \
         buildbus's BEP subset (the streams keep Bazel's bytes)"
    );
    if a.keep {
        let _ = writeln!(o, "kept the streams in {}", dir.display());
    }
    stdout(&o)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bazel")
    }

    #[test]
    fn uuids_are_fresh_and_uuid_shaped() {
        let a = fresh_uuid(1, 0);
        let b = fresh_uuid(1, 1);
        assert_eq!(a.len(), UUID_LEN);
        assert_ne!(a, b);
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn generated_streams_translate_as_separate_builds() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Arc::new(Context::builtin());
        let mut js = Vec::new();
        let mut bs = Vec::new();
        for name in FIXTURES {
            js.push(json_template(name, &fixtures().join(format!("{name}.json"))).unwrap());
            bs.push(
                bin_template(name, &fixtures().join(format!("{name}.bin")))
                    .unwrap()
                    .0,
            );
        }
        let per_cycle: u64 = js.iter().map(|t| t.events).sum();
        let j = dir.path().join("s.json");
        let b = dir.path().join("s.bin");
        let wj = write_stream(&j, &js, per_cycle * 2, 7, false).unwrap();
        let wb = write_stream(&b, &bs, per_cycle * 2, 7, false).unwrap();
        assert_eq!(wj.builds, 10);
        assert_eq!(wb.builds, 10);
        let tj = translate(&j, Some(buildbus::systems::bazel::BEP_JSON), &ctx, true).unwrap();
        let tb = translate(&b, Some(buildbus::systems::bazel::BEP_BINARY), &ctx, true).unwrap();
        assert_eq!(
            decode_only(&j, buildbus::systems::bazel::BEP_JSON, &ctx)
                .unwrap()
                .events,
            wj.events
        );
        assert_eq!(
            decode_only(&b, buildbus::systems::bazel::BEP_BINARY, &ctx)
                .unwrap()
                .events,
            wb.events
        );
        assert_eq!(tj.events, wj.events);
        assert_eq!(tb.events, wb.events);
        assert_eq!(tj.messages, tb.messages);
        assert_eq!(baseline_json(&j).unwrap().events, wj.events);
        assert_eq!(baseline_bin(&b).unwrap().events, wb.events);
        let report = translate_file(&j, None, &ctx, &mut |_| {});
        assert_eq!(report.builds, 10);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.bin");
        fs::write(&p, [0xff, 0xff, 0xff]).unwrap();
        assert!(baseline_bin(&p).is_err());
        assert!(bin_template("x", &p).is_err());
        let p = dir.path().join("x.json");
        fs::write(&p, b"{\"id\":{}}\n{oops\n").unwrap();
        assert!(baseline_json(&p).is_err());
        assert!(json_template("x", &p).is_err());
    }
}
