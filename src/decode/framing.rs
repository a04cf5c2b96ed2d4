//! Framing: cutting a byte stream into events, the two ways build tools write them.
//!
//! - [`Framing::JsonLines`]: one event per `\n`-terminated line (Bazel's
//!   `--build_event_json_file`, BitBake's `-w` event log). Blank lines are skipped.
//! - [`Framing::Varint`]: each event preceded by its length as a protobuf varint (Bazel's
//!   `--build_event_binary_file`).
//!
//! A [`Framer`] is stateful and never loses bytes: at the end of the data it reports a
//! partial frame (if any) and keeps it, so a follower can call it again after the file
//! grew and get the completed frame. An event over the size limit is skipped without being
//! held in memory and reported as an error; the stream goes on after it.

use std::io::{BufRead, ErrorKind};

use super::error::{InputError, Oversize, Position, Reason};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    JsonLines,
    Varint,
}

/// One framed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Byte offset of the first byte of the frame (the length prefix for varint frames).
    pub start: u64,
    /// Byte offset just past the frame: a checkpoint to resume from.
    pub end: u64,
    /// 1-based line (JSON lines) or event number (varint).
    pub index: u64,
    /// The event's bytes, without line terminator or length prefix.
    pub bytes: Vec<u8>,
}

/// What the framer found next.
#[derive(Debug)]
pub enum Next {
    Frame(Frame),
    /// A frame that had to be skipped (too large); framing goes on.
    Skipped(InputError),
    /// No more data for now. `partial` is an incomplete frame at the end, kept inside
    /// the framer; `None` means the data ended on a frame boundary.
    End {
        partial: Option<Frame>,
    },
    /// The reader failed; framing cannot go on.
    Failed(InputError),
}

pub struct Framer<R> {
    reader: R,
    framing: Framing,
    origin: String,
    limit: u64,
    /// Offset of the next unread byte of `reader`.
    offset: u64,
    /// Bytes of the current, not yet complete frame.
    buf: Vec<u8>,
    /// Offset where `buf`'s frame starts.
    frame_start: u64,
    /// Frames (or lines) started so far.
    index: u64,
    /// The oversized event being thrown away, if any.
    discarding: Option<Discard>,
    /// The decoded length of the current varint frame, once its prefix is complete.
    want: Option<u64>,
}

/// An oversized event being thrown away.
#[derive(Debug, Clone, Copy)]
enum Discard {
    /// A line: `seen` bytes of it so far, its line end not found yet.
    Line { seen: u64 },
    /// A varint frame declaring `size` bytes: `left` of them still to skip.
    Frame { left: u64, size: u64 },
}

/// `fill_buf`, retrying interrupted reads.
fn fill<R: BufRead>(reader: &mut R) -> std::io::Result<&[u8]> {
    loop {
        match reader.fill_buf() {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // Re-borrow to satisfy the borrow checker across loop iterations.
            Err(e) => return Err(e),
            Ok(_) => break,
        }
    }
    reader.fill_buf()
}

/// The most a varint frame's buffer is allocated ahead of the data that fills it.
const RESERVE_AHEAD: usize = 1 << 20;

/// A complete protobuf varint at the start of `data` (a frame's length prefix, or a key
/// or length inside a message): its value and length. `None` when `data` ends inside
/// the varint or the varint is longer than 10 bytes.
#[inline]
pub fn varint(data: &[u8]) -> Option<(u64, usize)> {
    // Keys and most lengths are one byte.
    match data.first() {
        Some(&b) if b < 0x80 => return Some((u64::from(b), 1)),
        None => return None,
        _ => {}
    }
    let mut v: u64 = 0;
    for (i, &byte) in data.iter().take(10).enumerate() {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

impl<R: BufRead> Framer<R> {
    pub fn new(reader: R, framing: Framing, origin: &str, limit: u64) -> Framer<R> {
        Framer::starting_at(reader, framing, origin, limit, 0, 0)
    }

    /// A framer over a reader already positioned at `offset`, after `index` frames.
    pub fn starting_at(
        reader: R,
        framing: Framing,
        origin: &str,
        limit: u64,
        offset: u64,
        index: u64,
    ) -> Framer<R> {
        Framer {
            reader,
            framing,
            origin: origin.to_string(),
            limit,
            offset,
            buf: Vec::new(),
            frame_start: offset,
            index,
            discarding: None,
            want: None,
        }
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// A position inside this input, for errors.
    pub fn position(&self, offset: u64, index: u64) -> Position {
        let (line, event) = match self.framing {
            Framing::JsonLines => (Some(index), None),
            Framing::Varint => (None, Some(index)),
        };
        Position {
            origin: self.origin.clone(),
            line,
            offset,
            event,
        }
    }

    fn io_error(&self, e: std::io::Error) -> InputError {
        InputError::new(
            Position {
                origin: self.origin.clone(),
                line: None,
                offset: self.offset,
                event: None,
            },
            Reason::Io(e.to_string()),
        )
    }

    fn consume(&mut self, n: usize) {
        self.reader.consume(n);
        self.offset += n as u64;
    }

    fn partial(&self) -> Option<Frame> {
        let started = !self.buf.is_empty() || self.want.is_some() || self.discarding.is_some();
        started.then(|| Frame {
            start: self.frame_start,
            end: self.offset,
            index: self.index + 1,
            bytes: self.buf.clone(),
        })
    }

    /// Says what is wrong with the partial frame at the end of the data: an oversized
    /// event (a line with no line end within the limit, or a frame declaring more than
    /// it) or what a frame of normal size is missing.
    pub fn partial_reason(&self) -> Reason {
        let limit = self.limit;
        match self.discarding {
            Some(Discard::Line { seen }) => Reason::Oversized {
                what: Oversize::NoLineEnd { read: seen },
                limit,
            },
            Some(Discard::Frame { left, size }) => Reason::Oversized {
                what: Oversize::Frame {
                    size,
                    read: Some(size - left),
                },
                limit,
            },
            None => Reason::Truncated(self.describe_partial()),
        }
    }

    /// Says what the partial frame (of normal size) at the end of the data is missing.
    fn describe_partial(&self) -> String {
        match (self.framing, self.want) {
            (Framing::Varint, Some(want)) => format!(
                "the input ends {} bytes into an event of {want} bytes",
                self.buf.len()
            ),
            (Framing::Varint, None) => "the input ends inside an event's length prefix".to_string(),
            (Framing::JsonLines, _) => {
                format!(
                    "the last line ({} bytes) has no end of line",
                    self.buf.len()
                )
            }
        }
    }

    /// Gives back a frame's buffer once its bytes are used, for the next frame to be
    /// read into: one allocation per stream instead of one per event. A buffer grown
    /// past `RESERVE_AHEAD` by a large event is not kept.
    pub fn recycle(&mut self, mut bytes: Vec<u8>) {
        if self.buf.is_empty() && bytes.capacity() > self.buf.capacity() {
            if bytes.capacity() > RESERVE_AHEAD {
                return;
            }
            bytes.clear();
            self.buf = bytes;
        }
    }

    /// The next frame, skipped frame, end of data or failure.
    pub fn next_frame(&mut self) -> Next {
        match self.framing {
            Framing::JsonLines => self.next_line(),
            Framing::Varint => self.next_varint(),
        }
    }

    fn oversized(&mut self, what: Oversize) -> Next {
        let pos = self.position(self.frame_start, self.index + 1);
        self.index += 1;
        self.buf.clear();
        self.want = None;
        Next::Skipped(InputError::new(
            pos,
            Reason::Oversized {
                what,
                limit: self.limit,
            },
        ))
    }

    fn next_line(&mut self) -> Next {
        loop {
            let limit = self.limit;
            let chunk = match fill(&mut self.reader) {
                Ok(c) => c,
                Err(e) => return Next::Failed(self.io_error(e)),
            };
            if chunk.is_empty() {
                return Next::End {
                    partial: self.partial(),
                };
            }
            if self.buf.is_empty() && self.discarding.is_none() {
                self.frame_start = self.offset;
            }
            let newline = chunk.iter().position(|&b| b == b'\n');
            let take = newline.map_or(chunk.len(), |i| i + 1);
            let body = newline.map_or(chunk.len(), |i| i);
            if let Some(Discard::Line { seen }) = self.discarding.as_mut() {
                *seen += take as u64;
                let size = *seen;
                self.consume(take);
                if newline.is_some() {
                    self.discarding = None;
                    return self.oversized(Oversize::Line {
                        size: size.saturating_sub(1),
                    });
                }
                continue;
            }
            if (self.buf.len() + body) as u64 > limit {
                let seen = (self.buf.len() + take) as u64;
                self.buf.clear();
                self.consume(take);
                if newline.is_some() {
                    return self.oversized(Oversize::Line {
                        size: seen.saturating_sub(1),
                    });
                }
                self.discarding = Some(Discard::Line { seen });
                continue;
            }
            self.buf.extend_from_slice(&chunk[..body]);
            self.consume(take);
            if newline.is_some() {
                self.index += 1;
                let mut bytes = std::mem::take(&mut self.buf);
                if bytes.last() == Some(&b'\r') {
                    bytes.pop();
                }
                if bytes.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                return Next::Frame(Frame {
                    start: self.frame_start,
                    end: self.offset,
                    index: self.index,
                    bytes,
                });
            }
        }
    }

    fn next_varint(&mut self) -> Next {
        loop {
            // Throwing away an oversized frame.
            if let Some(Discard::Frame { left, size }) = self.discarding {
                if left == 0 {
                    self.discarding = None;
                    return self.oversized(Oversize::Frame { size, read: None });
                }
                let avail = match fill(&mut self.reader) {
                    Ok(c) => c.len(),
                    Err(e) => return Next::Failed(self.io_error(e)),
                };
                if avail == 0 {
                    return Next::End {
                        partial: self.partial(),
                    };
                }
                let n = (avail as u64).min(left) as usize;
                self.consume(n);
                self.discarding = Some(Discard::Frame {
                    left: left - n as u64,
                    size,
                });
                continue;
            }
            // The length prefix, in one step when the buffered data holds all of it.
            if self.want.is_none() && self.buf.is_empty() {
                let whole = match fill(&mut self.reader) {
                    Ok(c) => varint(c),
                    Err(e) => return Next::Failed(self.io_error(e)),
                };
                if let Some((len, n)) = whole {
                    self.frame_start = self.offset;
                    self.consume(n);
                    if len > self.limit {
                        self.discarding = Some(Discard::Frame {
                            left: len,
                            size: len,
                        });
                        continue;
                    }
                    self.want = Some(len);
                }
            }
            // Else one byte at a time (it is at most 10 bytes).
            if self.want.is_none() {
                let first = match fill(&mut self.reader) {
                    Ok(c) => c.first().copied(),
                    Err(e) => return Next::Failed(self.io_error(e)),
                };
                let Some(b) = first else {
                    return Next::End {
                        partial: self.partial(),
                    };
                };
                if self.buf.is_empty() {
                    self.frame_start = self.offset;
                }
                self.consume(1);
                self.buf.push(b);
                if b & 0x80 != 0 {
                    if self.buf.len() >= 10 {
                        let pos = self.position(self.frame_start, self.index + 1);
                        self.buf.clear();
                        self.index += 1;
                        // The framing is lost: nothing after this can be trusted.
                        return Next::Failed(InputError::new(
                            pos,
                            Reason::Protobuf("length prefix is longer than 10 bytes".into()),
                        ));
                    }
                    continue;
                }
                let mut len: u64 = 0;
                for (i, byte) in self.buf.iter().enumerate() {
                    len |= u64::from(byte & 0x7f)
                        .checked_shl(7 * i as u32)
                        .unwrap_or(0);
                }
                self.buf.clear();
                if len > self.limit {
                    self.discarding = Some(Discard::Frame {
                        left: len,
                        size: len,
                    });
                    continue;
                }
                self.want = Some(len);
            }
            let want = self.want.unwrap_or(0) as usize;
            // The frame's length is known: one allocation of the right size (at most
            // RESERVE_AHEAD beyond the data, so a corrupt length cannot claim much memory).
            self.buf
                .reserve_exact((want - self.buf.len()).min(RESERVE_AHEAD));
            while self.buf.len() < want {
                let chunk = match fill(&mut self.reader) {
                    Ok(c) => c,
                    Err(e) => return Next::Failed(self.io_error(e)),
                };
                if chunk.is_empty() {
                    return Next::End {
                        partial: self.partial(),
                    };
                }
                let n = chunk.len().min(want - self.buf.len());
                self.buf.extend_from_slice(&chunk[..n]);
                self.consume(n);
            }
            self.want = None;
            self.index += 1;
            return Next::Frame(Frame {
                start: self.frame_start,
                end: self.offset,
                index: self.index,
                bytes: std::mem::take(&mut self.buf),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn frames(
        data: &[u8],
        framing: Framing,
        limit: u64,
    ) -> (Vec<Frame>, Vec<InputError>, Option<Frame>) {
        let mut f = Framer::new(Cursor::new(data.to_vec()), framing, "t", limit);
        let (mut ok, mut bad) = (vec![], vec![]);
        loop {
            match f.next_frame() {
                Next::Frame(fr) => {
                    // The buffer goes back, as `pump` gives it: later frames must not
                    // see its old bytes.
                    ok.push(fr.clone());
                    f.recycle(fr.bytes);
                }
                Next::Skipped(e) => bad.push(e),
                Next::End { partial } => return (ok, bad, partial),
                Next::Failed(e) => {
                    bad.push(e);
                    return (ok, bad, None);
                }
            }
        }
    }

    #[test]
    fn lines_with_blank_and_partial() {
        let (ok, bad, partial) =
            frames(b"{\"a\":1}\n\n{\"b\":2}\r\n{\"c\"", Framing::JsonLines, 100);
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].bytes, b"{\"b\":2}");
        assert_eq!(ok[1].index, 3);
        assert_eq!(ok[1].start, 9);
        assert!(bad.is_empty());
        let p = partial.unwrap();
        assert_eq!(p.bytes, b"{\"c\"");
        assert_eq!(p.index, 4);
    }

    #[test]
    fn oversized_line_is_skipped_and_counted() {
        let mut data = b"{}\n".to_vec();
        data.extend(vec![b'x'; 50]);
        data.extend(b"\n{}\n");
        let (ok, bad, partial) = frames(&data, Framing::JsonLines, 10);
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].index, 3);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].pos.line, Some(2));
        assert!(matches!(
            bad[0].reason,
            Reason::Oversized {
                what: Oversize::Line { size: 50 },
                limit: 10
            }
        ));
        assert!(partial.is_none());
    }

    #[test]
    fn varint_frames_truncation_and_oversize() {
        let mut data = vec![3, b'a', b'b', b'c', 0];
        data.extend([20]);
        data.extend(vec![b'z'; 20]);
        data.extend([2, b'x', b'y', 0x85]);
        let (ok, bad, partial) = frames(&data, Framing::Varint, 10);
        assert_eq!(
            ok.iter().map(|f| f.bytes.clone()).collect::<Vec<_>>(),
            vec![b"abc".to_vec(), vec![], b"xy".to_vec()]
        );
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].pos.event, Some(3));
        assert_eq!(ok[2].index, 4);
        let p = partial.unwrap();
        assert_eq!(p.start, data.len() as u64 - 1);
    }

    /// Every frame, skipped frame and the error of the partial frame at the end, as
    /// text (with their positions), read `cap` bytes at a time.
    fn report(data: &[u8], framing: Framing, limit: u64, cap: usize) -> Vec<String> {
        let reader = std::io::BufReader::with_capacity(cap, Cursor::new(data.to_vec()));
        let mut f = Framer::new(reader, framing, "t.json", limit);
        let mut got = Vec::new();
        loop {
            match f.next_frame() {
                Next::Frame(fr) => got.push(format!(
                    "frame {} at {}: {}",
                    fr.index,
                    fr.start,
                    String::from_utf8_lossy(&fr.bytes)
                )),
                Next::Skipped(e) => got.push(e.to_string()),
                Next::End { partial: None } => return got,
                Next::End { partial: Some(p) } => {
                    let e = InputError::new(f.position(p.start, p.index), f.partial_reason());
                    got.push(e.to_string());
                    return got;
                }
                Next::Failed(e) => {
                    got.push(format!("failed: {e}"));
                    return got;
                }
            }
        }
    }

    #[test]
    fn oversized_messages_say_what_happened_and_where() {
        // A line with no line end at all within the limit (nor after it).
        let mut data = b"{}\n".to_vec();
        data.extend(vec![b'a'; 50]);
        for cap in [1, 7, 1 << 16] {
            assert_eq!(
                report(&data, Framing::JsonLines, 10, cap),
                [
                    "frame 1 at 0: {}",
                    "t.json: line 2 (byte 3): no line end within the limit of 10 bytes \
                     (limits.max_event_bytes): the input ends 50 bytes after the line's start"
                ],
                "read size {cap}"
            );
        }
        // A line that ends after the limit: skipped, the good lines after it are kept.
        data.extend(b"\n{\"b\":2}\n[]\n");
        for cap in [1, 7, 1 << 16] {
            assert_eq!(
                report(&data, Framing::JsonLines, 10, cap),
                [
                    "frame 1 at 0: {}",
                    "t.json: line 2 (byte 3): a line of 50 bytes exceeds the limit of 10 bytes \
                     (limits.max_event_bytes); skipped",
                    "frame 3 at 54: {\"b\":2}",
                    "frame 4 at 62: []",
                ],
                "read size {cap}"
            );
        }
        // A varint frame declaring more than the limit: skipped whole, then the next one.
        let mut bin = vec![1, b'x', 20];
        bin.extend(vec![b'z'; 20]);
        bin.extend([2, b'o', b'k']);
        for cap in [1, 7, 1 << 16] {
            assert_eq!(
                report(&bin, Framing::Varint, 10, cap),
                [
                    "frame 1 at 0: x",
                    "t.json: event #2 (byte 2): frame declares 20 bytes, over the limit of \
                     10 bytes (limits.max_event_bytes); skipped",
                    "frame 3 at 23: ok",
                ],
                "read size {cap}"
            );
        }
        // ... and one the input ends inside (a 2-byte prefix: 300 bytes).
        let mut bin = vec![1, b'x', 0xac, 0x02];
        bin.extend(vec![b'z'; 5]);
        assert_eq!(
            report(&bin, Framing::Varint, 10, 1 << 16),
            [
                "frame 1 at 0: x",
                "t.json: event #2 (byte 2): frame declares 300 bytes, over the limit of \
                 10 bytes (limits.max_event_bytes); the input ends 5 bytes into it",
            ]
        );
        // The limit as configured by default reads as people say it.
        let e = Reason::Oversized {
            what: Oversize::NoLineEnd { read: 104_857_601 },
            limit: 64 << 20,
        };
        assert_eq!(
            e.to_string(),
            "no line end within the limit of 64 MiB (limits.max_event_bytes): \
             the input ends 104857601 bytes after the line's start"
        );
    }

    #[test]
    fn varint_frames_are_the_same_whatever_the_read_size() {
        // Frames with 1-, 2- and 3-byte length prefixes.
        let lens = [0usize, 1, 127, 128, 300, 20_000, 5];
        let mut data = Vec::new();
        let mut want = Vec::new();
        for (k, &len) in lens.iter().enumerate() {
            let start = data.len() as u64;
            let mut v = len as u64;
            loop {
                let b = (v & 0x7f) as u8;
                v >>= 7;
                data.push(if v == 0 { b } else { b | 0x80 });
                if v == 0 {
                    break;
                }
            }
            let body: Vec<u8> = (0..len).map(|i| (i * 7 + k) as u8).collect();
            data.extend(&body);
            want.push((start, data.len() as u64, body));
        }
        for cap in [1, 2, 3, 7, 64, 1 << 16] {
            let reader = std::io::BufReader::with_capacity(cap, Cursor::new(data.clone()));
            let mut f = Framer::new(reader, Framing::Varint, "t", 1 << 20);
            let mut got = Vec::new();
            loop {
                match f.next_frame() {
                    Next::Frame(fr) => {
                        got.push((fr.start, fr.end, fr.bytes.clone()));
                        f.recycle(fr.bytes);
                    }
                    Next::End { partial: None } => break,
                    other => panic!("read size {cap}: {other:?}"),
                }
            }
            assert_eq!(got, want, "read size {cap}");
        }
    }

    #[test]
    fn follow_resumes_a_partial_frame() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("growing.json");
        let mut w = std::fs::File::create(&path).unwrap();
        w.write_all(b"{\"a\":1}\n{\"b\"").unwrap();
        let reader = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let mut f = Framer::new(reader, Framing::JsonLines, "t", 100);
        assert!(matches!(f.next_frame(), Next::Frame(_)));
        assert!(matches!(f.next_frame(), Next::End { partial: Some(_) }));
        w.write_all(b":2}\n").unwrap();
        match f.next_frame() {
            Next::Frame(fr) => {
                assert_eq!(fr.bytes, b"{\"b\":2}");
                assert_eq!(fr.start, 8);
            }
            other => panic!("{other:?}"),
        }
    }
}
