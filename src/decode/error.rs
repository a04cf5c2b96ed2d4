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
    #[error("event of {size} bytes is over the limit of {limit} bytes (limits.max_event_bytes); skipped")]
    Oversized { size: u64, limit: u64 },
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
