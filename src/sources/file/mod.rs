//! Driving one input through the pipeline's first two stages: frame, decode, translate.
//!
//! [`translate_file`] opens a file, picks its format ([`Format::detect`] when asked for
//! `auto`), and feeds every event to the build system's translator. Bad events are
//! reported in the [`StreamReport`] with their position and skipped; everything before
//! and after them is still translated. Only an unreadable input stops early.

pub mod checkpoint;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::decode::error::{InputError, Reason};
use crate::decode::framing::{Framer, Framing, Next};
use crate::model::{Envelope, SourceMeta};
pub use crate::systems::Format;
use crate::systems::{system, Context, Emit, StreamTranslator};

/// What happened while reading one input.
#[derive(Debug, Clone, Default)]
pub struct StreamReport {
    pub origin: String,
    pub format: Option<Format>,
    /// Events decoded.
    pub events: u64,
    /// Events of kinds this buildbus does not know (skipped, not an error).
    pub unknown: u64,
    /// Builds seen.
    pub builds: u64,
    pub messages: u64,
    /// Bad events (skipped) and the error that stopped the input, if any.
    pub errors: Vec<InputError>,
    /// The input could not be read to its end.
    pub incomplete: bool,
    /// Offset just past the last complete event.
    pub end_offset: u64,
}

impl StreamReport {
    /// Whether the whole input was read without errors.
    pub fn clean(&self) -> bool {
        self.errors.is_empty() && !self.incomplete
    }
}

/// What a reader reports, in order.
///
/// A report is handed straight to a callback, never stored, so the message is not
/// boxed (that was an allocation and two copies per message).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Progress {
    /// A message, with the byte offset just past the event whose processing emitted it.
    Message(Envelope, u64),
    /// Every message emitted while processing the events up to this offset has been
    /// reported (the reader reached the end of the data for now, or of the input).
    Through(u64),
}

/// Where a reader reports to.
pub type Sink<'a> = dyn FnMut(Progress) + 'a;

/// How a stream is followed while it grows (`publish --follow`).
#[derive(Debug, Clone)]
pub struct Follow {
    /// How long to wait for more data before looking again.
    pub poll: Duration,
    /// Set from outside (Ctrl-C) to stop following.
    pub stop: Arc<AtomicBool>,
}

/// Feeds framed events to a translator until the data ends; returns the partial frame
/// left at the end (if any), for the caller to judge (a follower waits for more).
pub fn pump<R: BufRead>(
    framer: &mut Framer<R>,
    tr: &mut dyn StreamTranslator,
    report: &mut StreamReport,
    out: &mut Sink<'_>,
) -> Option<crate::decode::framing::Frame> {
    loop {
        match framer.next_frame() {
            Next::Frame(f) => {
                report.end_offset = f.end;
                let end = f.end;
                let mut messages = 0;
                let mut count = |env| {
                    messages += 1;
                    out(Progress::Message(env, end))
                };
                match tr.frame(&f.bytes, &mut count) {
                    Ok(()) => {
                        report.events += 1;
                        report.messages += messages;
                    }
                    Err(reason) => report
                        .errors
                        .push(InputError::new(framer.position(f.start, f.index), reason)),
                }
                framer.recycle(f.bytes);
            }
            Next::Skipped(e) => report.errors.push(e),
            Next::End { partial } => return partial,
            Next::Failed(e) => {
                report.errors.push(e);
                report.incomplete = true;
                return None;
            }
        }
    }
}

/// Runs a whole input through `tr`: to its end, or (following) until the translator
/// says the stream is complete or `stop` is set.
#[allow(clippy::too_many_arguments)]
fn run<R: BufRead>(
    reader: R,
    format: Format,
    origin: &str,
    ctx: &Context,
    tr: &mut dyn StreamTranslator,
    report: &mut StreamReport,
    follow: Option<&Follow>,
    out: &mut Sink<'_>,
) {
    let mut framer = Framer::new(reader, format.framing(), origin, ctx.max_event_bytes);
    let partial = loop {
        let partial = pump(&mut framer, tr, report, out);
        let Some(f) = follow else { break partial };
        if report.incomplete || tr.complete() || f.stop.load(Ordering::Relaxed) {
            break partial;
        }
        out(Progress::Through(report.end_offset));
        if let Ok(meta) = std::fs::metadata(origin) {
            if meta.len() < framer.offset() {
                report.incomplete = true;
                report.errors.push(InputError::new(
                    framer.position(framer.offset(), 0),
                    Reason::Io(format!(
                        "the file shrank to {} bytes while followed",
                        meta.len()
                    )),
                ));
                break None;
            }
        }
        std::thread::sleep(f.poll);
    };
    // A follower stopped from outside before the stream was complete keeps what the
    // translator holds and the partial event: both are taken up when it resumes (the
    // messages then with the build's whole context, not now with part of it).
    let stopped = follow.is_some_and(|f| f.stop.load(Ordering::Relaxed)) && !tr.complete();
    if let Some(p) = partial.filter(|_| !stopped) {
        let pos = framer.position(p.start, p.index);
        // A last JSON line without its newline is fine if it is complete.
        let end = p.end;
        let mut messages = 0;
        let mut count = |env| {
            messages += 1;
            out(Progress::Message(env, end))
        };
        let last = (format.framing() == Framing::JsonLines && !p.bytes.is_empty())
            .then(|| tr.frame(&p.bytes, &mut count));
        match last {
            Some(Ok(())) => {
                report.events += 1;
                report.messages += messages;
                report.end_offset = p.end;
            }
            Some(Err(reason)) => {
                report.incomplete = true;
                report.errors.push(InputError::new(
                    pos,
                    Reason::Truncated(format!("last line is incomplete ({reason})")),
                ));
            }
            None => {
                report.incomplete = true;
                report
                    .errors
                    .push(InputError::new(pos, framer.partial_reason()));
            }
        }
    }
    let end = report.end_offset;
    if !stopped {
        let mut count = |env| {
            report.messages += 1;
            out(Progress::Message(env, end))
        };
        tr.finish(&mut count);
    }
    out(Progress::Through(end));
}

/// Translates one file. `format: None` detects it.
pub fn translate_file(
    path: &Path,
    format: Option<Format>,
    ctx: &Arc<Context>,
    out: &mut Emit<'_>,
) -> StreamReport {
    read_file(path, format, ctx, None, &mut |p| {
        if let Progress::Message(env, _) = p {
            out(env)
        }
    })
}

/// Translates one file, giving each message with the offset just past the event that
/// completed it; `follow` keeps reading as the file grows.
pub fn read_file(
    path: &Path,
    format: Option<Format>,
    ctx: &Arc<Context>,
    follow: Option<&Follow>,
    out: &mut Sink<'_>,
) -> StreamReport {
    let origin = path.display().to_string();
    let file = loop {
        match File::open(path) {
            Ok(f) => break f,
            // A followed file may not exist yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && follow.is_some() => {
                let f = follow.unwrap_or_else(|| unreachable!());
                if f.stop.load(Ordering::Relaxed) {
                    return failed(&origin, Reason::Io(e.to_string()));
                }
                std::thread::sleep(f.poll);
            }
            Err(e) => return failed(&origin, Reason::Io(e.to_string())),
        }
    };
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    if let Some(f) = follow {
        // Wait for the first bytes, to tell the format.
        while matches!(reader.fill_buf(), Ok(b) if b.is_empty()) && !f.stop.load(Ordering::Relaxed)
        {
            std::thread::sleep(f.poll);
        }
    }
    drive(reader, path, format, ctx, follow, out)
}

fn failed(origin: &str, reason: Reason) -> StreamReport {
    StreamReport {
        origin: origin.to_string(),
        incomplete: true,
        errors: vec![InputError::whole(origin, reason)],
        ..Default::default()
    }
}

/// Translates everything `reader` gives; `name` names the input in errors and is used to
/// detect the format when `format` is `None`.
pub fn translate_reader<R: BufRead>(
    reader: R,
    name: &Path,
    format: Option<Format>,
    ctx: &Arc<Context>,
    out: &mut Emit<'_>,
) -> StreamReport {
    drive(reader, name, format, ctx, None, &mut |p| {
        if let Progress::Message(env, _) = p {
            out(env)
        }
    })
}

fn drive<R: BufRead>(
    mut reader: R,
    name: &Path,
    format: Option<Format>,
    ctx: &Arc<Context>,
    follow: Option<&Follow>,
    out: &mut Sink<'_>,
) -> StreamReport {
    let origin = name.display().to_string();
    let head = match reader.fill_buf() {
        Ok(h) => h.to_vec(),
        Err(e) => return failed(&origin, Reason::Io(e.to_string())),
    };
    if head.is_empty() {
        return failed(&origin, Reason::Empty);
    }
    let format = match format
        .map(Ok)
        .unwrap_or_else(|| Format::detect(name, &head))
    {
        Ok(f) => f,
        Err(r) => return failed(&origin, r),
    };
    let mut report = StreamReport {
        origin: origin.clone(),
        format: Some(format),
        ..Default::default()
    };
    let source = SourceMeta {
        system: format.system().to_string(),
        format: format.name().to_string(),
        origin: origin.clone(),
        tool_version: None,
    };
    let Some(sys) = system(format.system()) else {
        return failed(
            &origin,
            Reason::Format(format!(
                "no build system {:?} is registered",
                format.system()
            )),
        );
    };
    let mut tr = sys.open(format, ctx, source);
    run(
        reader,
        format,
        &origin,
        ctx,
        &mut *tr,
        &mut report,
        follow,
        out,
    );
    let stats = tr.stats();
    report.unknown = stats.unknown;
    report.builds = stats.builds;
    if report.events == 0 && report.errors.is_empty() {
        report
            .errors
            .push(InputError::whole(&origin, Reason::Empty));
        report.incomplete = true;
    }
    report
}
