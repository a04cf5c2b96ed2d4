//! Input errors: what went wrong reading a stream, and exactly where.
//!
//! Every error names the origin (file path or live address), the position (line and
//! byte offset for JSON lines, byte offset and event number for binary streams) and the
//! reason. Most errors cost one event only: the stream goes on after them.

use std::fmt;

/// Where in an input something happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub origin: String,
    /// 1-based line, for line-oriented inputs.
    pub line: Option<u64>,
    /// Byte offset of the start of the event (or of the problem).
    pub offset: u64,
    /// 1-based event number, for framed binary inputs.
    pub event: Option<u64>,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.origin)?;
        if let Some(l) = self.line {
            write!(f, " line {l}")?;
        }
        if let Some(e) = self.event {
            write!(f, " event #{e}")?;
        }
        write!(f, " (byte {})", self.offset)
    }
}

/// Why an input could not be read (or not all of it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("I/O error: {0}")]
    Io(String),
    #[error("empty input: no events")]
    Empty,
    #[error("truncated: {0}")]
    Truncated(String),
    /// An event over `limits.max_event_bytes` (`limit`), skipped without being held in
    /// memory; `what` says what the framer saw of it.
    #[error("{}", oversized(.what, *.limit))]
    Oversized { what: Oversize, limit: u64 },
    #[error("not valid UTF-8 (at byte {0} of the line)")]
    InvalidUtf8(usize),
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("invalid protobuf: {0}")]
    Protobuf(String),
    #[error("invalid event: {0}")]
    Event(String),
    #[error("cannot tell the format: {0}")]
    Format(String),
}

/// What an event over the size limit looked like to the framer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversize {
    /// A line of `size` bytes (without its line end).
    Line { size: u64 },
    /// No line end within the limit: the input ended `read` bytes after the line's start.
    NoLineEnd { read: u64 },
    /// A length prefix declaring `size` bytes; `read` is set when the input ended `read`
    /// bytes into the frame.
    Frame { size: u64, read: Option<u64> },
}

/// A byte count as people say it: `64 MiB`, `8 KiB`, `10000 bytes`.
pub fn human_bytes(n: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match n {
        n if n >= GIB && n % GIB == 0 => format!("{} GiB", n / GIB),
        n if n >= MIB && n % MIB == 0 => format!("{} MiB", n / MIB),
        n if n >= KIB && n % KIB == 0 => format!("{} KiB", n / KIB),
        n => format!("{n} bytes"),
    }
}

fn oversized(what: &Oversize, limit: u64) -> String {
    let limit = human_bytes(limit);
    match *what {
        Oversize::Line { size } => format!(
            "a line of {size} bytes exceeds the limit of {limit} (limits.max_event_bytes); skipped"
        ),
        Oversize::NoLineEnd { read } => format!(
            "no line end within the limit of {limit} (limits.max_event_bytes): \
             the input ends {read} bytes after the line's start"
        ),
        Oversize::Frame { size, read: None } => format!(
            "frame declares {size} bytes, over the limit of {limit} (limits.max_event_bytes); skipped"
        ),
        Oversize::Frame {
            size,
            read: Some(read),
        } => format!(
            "frame declares {size} bytes, over the limit of {limit} (limits.max_event_bytes); \
             the input ends {read} bytes into it"
        ),
    }
}

/// An input error at a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pos}: {reason}")]
pub struct InputError {
    pub pos: Position,
    pub reason: Reason,
}

impl InputError {
    pub fn new(pos: Position, reason: Reason) -> InputError {
        InputError { pos, reason }
    }

    /// An error about the whole input (not a position inside it).
    pub fn whole(origin: &str, reason: Reason) -> InputError {
        InputError {
            pos: Position {
                origin: origin.to_string(),
                line: None,
                offset: 0,
                event: None,
            },
            reason,
        }
    }
}
