//! The BES spool: the raw Bazel events of every open invocation, on disk.
//!
//! The translator needs a whole invocation's context (the `started` event, options,
//! metadata, configurations) to translate any later event. When the backend restarts
//! mid-build, Bazel opens a new stream that starts at its first *unacknowledged*
//! sequence number, so the events before it never come again. The spool keeps them:
//! a new backend replays an invocation's spooled events below the stream's first
//! number through a fresh translator (their messages were confirmed before they were
//! acked, so the replay's output is dropped) and goes on from there, producing exactly
//! the messages an uninterrupted backend would have.
//!
//! One file per invocation, `<invocation>.spool`: records of varint sequence number,
//! varint length, the event's protobuf bytes. A torn record at the end (a crash while
//! writing) is ignored. The spool is synced before acks move past what it holds, and
//! removed when the invocation is done. Files of invocations that never finished and
//! never came back (a backend killed for good, a client that gave up) are swept when a
//! backend starts, once they have not been written for a while ([`Spool::sweep`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::{Buf, Bytes};

/// One spooled event.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: i64,
    pub event: Bytes,
}

/// The spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

/// An invocation's spool file, open for appending.
#[derive(Debug)]
pub struct SpoolFile {
    path: PathBuf,
    out: BufWriter<File>,
    unsynced: bool,
}

/// A file name for an invocation id: ids are UUIDs, anything else is hex-encoded.
fn file_name(invocation: &str) -> String {
    let plain = !invocation.is_empty()
        && invocation.len() <= 128
        && invocation
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        format!("{invocation}.spool")
    } else {
        format!("x{}.spool", hex::encode(invocation.as_bytes()))
    }
}

fn encode(r: &Record, buf: &mut Vec<u8>) {
    prost::encoding::encode_varint(r.seq as u64, buf);
    prost::encoding::encode_varint(r.event.len() as u64, buf);
    buf.extend_from_slice(&r.event);
}

/// Decodes records until the data ends or a record is torn.
fn decode_all(data: Bytes) -> Vec<Record> {
    let mut buf = data;
    let mut out = Vec::new();
    while buf.has_remaining() {
        let Ok(seq) = prost::encoding::decode_varint(&mut buf) else {
            break;
        };
        let Ok(len) = prost::encoding::decode_varint(&mut buf) else {
            break;
        };
        let Ok(len) = usize::try_from(len) else {
            break;
        };
        if buf.remaining() < len {
            break;
        }
        let event = buf.split_to(len);
        out.push(Record {
            seq: seq as i64,
            event,
        });
    }
    out
}

impl Spool {
    /// Opens (creates) the spool directory.
    pub fn open(dir: &Path) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, invocation: &str) -> PathBuf {
        self.dir.join(file_name(invocation))
    }

    /// The spooled events of an invocation with sequence numbers below `below`, in
    /// order, each number once (empty when nothing is spooled).
    pub fn load(&self, invocation: &str, below: i64) -> io::Result<Vec<Record>> {
        let mut data = Vec::new();
        match File::open(self.path(invocation)) {
            Ok(mut f) => f.read_to_end(&mut data)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut records: Vec<Record> = decode_all(Bytes::from(data))
            .into_iter()
            .filter(|r| r.seq < below)
            .collect();
        records.sort_by_key(|r| r.seq);
        records.dedup_by_key(|r| r.seq);
        Ok(records)
    }

    /// Starts the invocation's spool over with `records` (written to a new file that
    /// replaces the old one) and opens it for appending.
    pub fn create(&self, invocation: &str, records: &[Record]) -> io::Result<SpoolFile> {
        let path = self.path(invocation);
        let tmp = path.with_extension("spool.tmp");
        {
            let mut buf = Vec::new();
            for r in records {
                encode(r, &mut buf);
            }
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(SpoolFile {
            path,
            out: BufWriter::new(file),
            unsynced: false,
        })
    }

    /// Removes the spool files (and torn temporary files) not written for `older_than`:
    /// invocations no client will retry any more. Returns the paths removed.
    pub fn sweep(&self, older_than: std::time::Duration) -> io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !(name.ends_with(".spool") || name.ends_with(".spool.tmp")) {
                continue;
            }
            let stale = fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > older_than);
            if stale {
                match fs::remove_file(&path) {
                    Ok(()) => removed.push(path),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("{}: cannot remove stale spool: {e}", path.display()),
                }
            }
        }
        Ok(removed)
    }

    /// Forgets an invocation.
    pub fn remove(&self, invocation: &str) {
        let path = self.path(invocation);
        if let Err(e) = fs::remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("{}: cannot remove spool: {e}", path.display());
            }
        }
    }
}

impl SpoolFile {
    pub fn append(&mut self, r: &Record) -> io::Result<()> {
        let mut buf = Vec::with_capacity(r.event.len() + 20);
        encode(r, &mut buf);
        self.out.write_all(&buf)?;
        self.unsynced = true;
        Ok(())
    }

    /// Makes everything appended durable (no-op when nothing was appended since).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.out.flush()?;
            self.out.get_ref().sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: i64, body: &str) -> Record {
        Record {
            seq,
            event: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn records_survive_and_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut f = spool.create("inv-1", &[rec(1, "a")]).unwrap();
        f.append(&rec(2, "bb")).unwrap();
        f.append(&rec(3, "ccc")).unwrap();
        f.sync().unwrap();
        // A torn record: a length that promises more than is there.
        let mut raw = OpenOptions::new().append(true).open(f.path()).unwrap();
        raw.write_all(&[4, 50, b'x']).unwrap();
        let got = spool.load("inv-1", i64::MAX).unwrap();
        assert_eq!(got, vec![rec(1, "a"), rec(2, "bb"), rec(3, "ccc")]);
        assert_eq!(spool.load("inv-1", 3).unwrap().len(), 2);
        assert!(spool.load("other", 10).unwrap().is_empty());
        // Starting over keeps only what is given.
        let again = spool.create("inv-1", &got[..1]).unwrap();
        drop(again);
        assert_eq!(spool.load("inv-1", 10).unwrap(), vec![rec(1, "a")]);
        spool.remove("inv-1");
        assert!(spool.load("inv-1", 10).unwrap().is_empty());
    }

    #[test]
    fn odd_invocation_ids_get_safe_file_names() {
        assert_eq!(file_name("257440bb-1be1"), "257440bb-1be1.spool");
        assert_eq!(
            file_name("../etc/passwd"),
            "x2e2e2f6574632f706173737764.spool"
        );
        assert_eq!(file_name(""), "x.spool");
    }

    #[test]
    fn stale_files_are_swept_and_fresh_ones_kept() {
        use std::time::{Duration, SystemTime};
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut fresh = spool.create("fresh", &[rec(1, "a")]).unwrap();
        fresh.sync().unwrap();
        spool.create("old", &[rec(1, "b")]).unwrap();
        let old = spool.path("old");
        let torn = dir.path().join("gone.spool.tmp");
        let other = dir.path().join("notes.txt");
        std::fs::write(&torn, b"x").unwrap();
        std::fs::write(&other, b"x").unwrap();
        let day_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
        for p in [&old, &torn, &other] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(day_ago)
                .unwrap();
        }
        let mut removed = spool.sweep(Duration::from_secs(86_400)).unwrap();
        removed.sort();
        let mut want = vec![old.clone(), torn.clone()];
        want.sort();
        assert_eq!(removed, want);
        assert!(!old.exists() && !torn.exists());
        assert!(other.exists(), "not a spool file");
        assert_eq!(spool.load("fresh", i64::MAX).unwrap().len(), 1);
    }
}
