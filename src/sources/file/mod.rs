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

use crate::decode::error::{InputError, Position, Reason};
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
    /// Bad events (skipped) and the error that stopped the input, if any; add them with
    /// [`StreamReport::error`]. Of a run of errors with the same reason, one after the
    /// other, only the first is here (the run is in `repeats`); after
    /// [`MAX_KEPT_ERRORS`] kept errors the others are only counted (`errors_not_kept`),
    /// so a stream of bad events does not fill memory or flood the terminal.
    pub errors: Vec<InputError>,
    /// The runs of repeated errors, in order.
    pub repeats: Vec<Repeats>,
    /// Errors after the kept ones, only counted.
    pub errors_not_kept: u64,
    /// The input could not be read to its end.
    pub incomplete: bool,
    /// Offset just past the last complete event.
    pub end_offset: u64,
}

/// At most this many errors (runs of repeats count as one) are kept per input.
pub const MAX_KEPT_ERRORS: usize = 100;

/// A run of errors with the same reason, one after the other, folded into its first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repeats {
    /// Index in [`StreamReport::errors`] of the run's first error.
    pub first: usize,
    /// Errors in the run after the first.
    pub more: u64,
    /// Where the last of them is.
    pub last: Position,
}

impl StreamReport {
    /// Whether the whole input was read without errors.
    pub fn clean(&self) -> bool {
        self.errors.is_empty() && !self.incomplete
    }

    /// Adds an error: kept, folded into the run of its predecessor when it has the same
    /// reason, or (past [`MAX_KEPT_ERRORS`]) only counted.
    pub fn error(&mut self, e: InputError) {
        if self.errors_not_kept == 0 {
            if let Some(prev) = self.errors.last() {
                if prev.reason == e.reason {
                    let first = self.errors.len() - 1;
                    match self.repeats.last_mut() {
                        Some(r) if r.first == first => {
                            r.more += 1;
                            r.last = e.pos;
                        }
                        _ => self.repeats.push(Repeats {
                            first,
                            more: 1,
                            last: e.pos,
                        }),
                    }
                    return;
                }
            }
            if self.errors.len() < MAX_KEPT_ERRORS {
                self.errors.push(e);
                return;
            }
        }
        self.errors_not_kept += 1;
    }

    /// Errors in all: kept, folded into runs, and only counted.
    pub fn error_count(&self) -> u64 {
        self.errors.len() as u64
            + self.repeats.iter().map(|r| r.more).sum::<u64>()
            + self.errors_not_kept
    }

    /// The errors as lines for people: one per kept error, a run of repeats on the line
    /// of its first error, and a last line counting the errors not kept.
    pub fn error_lines(&self) -> Vec<String> {
        let mut reps = self.repeats.iter().peekable();
        let mut lines: Vec<String> = self
            .errors
            .iter()
            .enumerate()
            .map(|(i, e)| match reps.next_if(|r| r.first == i) {
                Some(r) => format!(
                    "{e} [{} bad events like this one in a row, the last at {}]",
                    r.more + 1,
                    short(&r.last)
                ),
                None => e.to_string(),
            })
            .collect();
        if self.errors_not_kept > 0 {
            lines.push(format!(
                "{}: {} more errors not shown ({} in all)",
                self.origin,
                self.errors_not_kept,
                self.error_count()
            ));
        }
        lines
    }
}

/// A position without its origin: `line 7 (byte 120)`, `event #3 (byte 40)`.
fn short(pos: &Position) -> String {
    let full = pos.to_string();
    full.strip_prefix(&format!("{}: ", pos.origin))
        .unwrap_or(&full)
        .to_string()
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
                    Err(reason) => {
                        report.error(InputError::new(framer.position(f.start, f.index), reason))
                    }
                }
                framer.recycle(f.bytes);
            }
            Next::Skipped(e) => report.error(e),
            Next::End { partial } => return partial,
            Next::Failed(e) => {
                report.error(e);
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
                report.error(InputError::new(
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
                report.error(InputError::new(
                    pos,
                    Reason::Truncated(format!("last line is incomplete ({reason})")),
                ));
            }
            None => {
                report.incomplete = true;
                report.error(InputError::new(pos, framer.partial_reason()));
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
        report.error(InputError::whole(&origin, Reason::Empty));
        report.incomplete = true;
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(event: u64, reason: &str) -> InputError {
        InputError::new(
            Position {
                origin: "x.bin".into(),
                line: None,
                offset: event * 10,
                event: Some(event),
            },
            Reason::Protobuf(reason.into()),
        )
    }

    #[test]
    fn repeated_errors_are_folded_and_the_rest_counted() {
        let mut r = StreamReport {
            origin: "x.bin".into(),
            ..Default::default()
        };
        r.error(err(1, "a"));
        for e in 2..=100_001 {
            r.error(err(e, "empty"));
        }
        r.error(err(100_002, "b"));
        assert_eq!(r.errors.len(), 3);
        assert_eq!(r.error_count(), 100_002);
        assert_eq!(
            r.error_lines(),
            [
                "x.bin: event #1 (byte 10): invalid protobuf: a",
                "x.bin: event #2 (byte 20): invalid protobuf: empty [100000 bad events like \
                 this one in a row, the last at event #100001 (byte 1000010)]",
                "x.bin: event #100002 (byte 1000020): invalid protobuf: b",
            ]
        );
        assert!(!r.clean());

        // Different errors: the first MAX_KEPT_ERRORS are kept, the others counted.
        let mut r = StreamReport {
            origin: "x.bin".into(),
            ..Default::default()
        };
        for e in 0..250 {
            r.error(err(e, &e.to_string()));
        }
        assert_eq!(r.errors.len(), MAX_KEPT_ERRORS);
        assert_eq!(r.errors_not_kept, 150);
        assert_eq!(r.error_count(), 250);
        let lines = r.error_lines();
        assert_eq!(lines.len(), MAX_KEPT_ERRORS + 1);
        assert_eq!(lines[100], "x.bin: 150 more errors not shown (250 in all)");
    }
}
