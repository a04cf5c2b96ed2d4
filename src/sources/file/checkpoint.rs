//! Checkpoints of file sources: per destination, the byte offset up to which every
//! message has been confirmed by the broker, so a restarted `publish` resumes where it
//! stopped, and publishing to a new destination sends everything.
//!
//! A checkpoint belongs to a (destination, file) pair. The destination
//! ([`Destination`]) is the broker's host and port, the vhost and the exchange prefix
//! (never the user or password); the file is its canonical path plus its device and
//! inode. A checkpoint file is a small JSON document,
//! `{"version": 2, "entries": [{destination, path, dev, ino, offset, head}, ...]}`, one
//! entry per (destination, path), the most recently saved first (at most
//! [`MAX_ENTRIES`]), written atomically (temporary file, fsync, rename). `head` is a hash
//! of the file's first bytes up to the offset (at most 4 KiB): when the file was
//! replaced (another inode) or rewritten (another head, or shorter than the offset), the
//! entry no longer matches and the file is published from the start.
//!
//! The format before destinations (`{path, offset, head}`, no `version`) cannot say
//! which broker it was for, so it is not migrated: it is ignored with a log line (the
//! file is published again from its start, which is harmless: ids are deterministic) and
//! replaced by the new format at the next save. An unreadable checkpoint file is a
//! warning and a start from 0, never an error.
//!
//! Resuming re-reads the file from its start (translation needs the build's context)
//! and skips the messages that were emitted at or before the offset: the same stream
//! gives the same messages at the same offsets, and any duplicate is harmless since ids
//! are deterministic. Two publishes saving the same checkpoint file at the same moment
//! may lose one of their updates (the later rename wins): that one then resends from an
//! older offset, never skips.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::bus::Destination;

/// The format version written today.
const VERSION: u32 = 2;
/// At most this many (destination, file) entries are kept in one checkpoint file.
pub const MAX_ENTRIES: usize = 32;

/// One (destination, file) checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    destination: Destination,
    /// The canonical path of the file.
    path: String,
    /// The file's device and inode when the entry was saved.
    dev: u64,
    ino: u64,
    offset: u64,
    head: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CheckpointFile {
    version: u32,
    entries: Vec<Entry>,
}

const HEAD_BYTES: u64 = 4096;

fn head_hash(source: &Path, upto: u64) -> std::io::Result<String> {
    let mut f = fs::File::open(source)?;
    let mut buf = Vec::new();
    (&mut f).take(upto.min(HEAD_BYTES)).read_to_end(&mut buf)?;
    Ok(hex::encode(Sha256::digest(&buf)))
}

/// The file's identity: canonical path, device and inode.
struct Identity {
    path: String,
    dev: u64,
    ino: u64,
    len: u64,
}

fn identity(source: &Path) -> std::io::Result<Identity> {
    let canon = fs::canonicalize(source)?;
    let m = fs::metadata(&canon)?;
    Ok(Identity {
        path: canon.to_string_lossy().into_owned(),
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
    })
}

/// What a checkpoint file holds.
enum Found {
    /// No checkpoint file.
    Missing,
    /// The entries of a version-2 file.
    Entries(Vec<Entry>),
    /// The format before destinations.
    Old,
    /// Anything else (not JSON, another version, a read error): warned about, and
    /// replaced at the next save.
    Unreadable,
}

fn read(file: &Path) -> Found {
    let bytes = match fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Found::Missing,
        Err(_) => return Found::Unreadable,
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Found::Unreadable;
    };
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(VERSION) => match serde_json::from_value::<CheckpointFile>(value)
        {
            Ok(f) => Found::Entries(f.entries),
            Err(_) => Found::Unreadable,
        },
        None if value.get("offset").is_some() && value.get("head").is_some() => Found::Old,
        _ => Found::Unreadable,
    }
}

/// The default checkpoint file of `source` inside `dir`.
pub fn default_file(dir: &Path, source: &Path) -> PathBuf {
    let canon = fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
    let name = canon
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hash = hex::encode(&Sha256::digest(canon.to_string_lossy().as_bytes())[..8]);
    dir.join(format!("{name}.{hash}.checkpoint.json"))
}

/// The default checkpoint folder: `$BUILDBUS_STATE_DIR`, `$XDG_STATE_HOME/buildbus`,
/// or `~/.local/state/buildbus`, with `checkpoints/` inside.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("BUILDBUS_STATE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_STATE_HOME").map(|d| PathBuf::from(d).join("buildbus")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/buildbus"))
        })
        .unwrap_or_else(|| PathBuf::from(".buildbus"));
    base.join("checkpoints")
}

/// The offset to resume `source` from when publishing to `dest` (0 when `file` holds no
/// matching entry, or the file changed since).
pub fn load(file: &Path, dest: &Destination, source: &Path) -> u64 {
    let entries = match read(file) {
        Found::Missing => return 0,
        Found::Entries(e) => e,
        Found::Old => {
            tracing::warn!(
                "{}: checkpoint of an older format, without a destination: ignored, {} is published from the start to {dest}",
                file.display(),
                source.display()
            );
            return 0;
        }
        Found::Unreadable => {
            tracing::warn!(
                "{}: unreadable checkpoint, starting from the beginning",
                file.display()
            );
            return 0;
        }
    };
    let Ok(id) = identity(source) else {
        return 0;
    };
    let Some(e) = entries
        .iter()
        .find(|e| &e.destination == dest && e.path == id.path)
    else {
        return 0;
    };
    let same_file = e.dev == id.dev && e.ino == id.ino && e.offset <= id.len;
    match head_hash(source, e.offset) {
        Ok(h) if same_file && h == e.head => e.offset,
        _ => {
            tracing::warn!(
                "{}: the file changed since its checkpoint; publishing it from the start",
                source.display()
            );
            0
        }
    }
}

/// Records that everything up to `offset` of `source` is confirmed by `dest`. The
/// entries of other destinations (and other files) in `file` are kept.
pub fn save(file: &Path, dest: &Destination, source: &Path, offset: u64) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir)?;
    }
    let id = identity(source)?;
    let entry = Entry {
        destination: dest.clone(),
        path: id.path,
        dev: id.dev,
        ino: id.ino,
        offset,
        head: head_hash(source, offset)?,
    };
    let mut entries = match read(file) {
        Found::Entries(e) => e,
        // Missing, old or unreadable: replaced.
        _ => Vec::new(),
    };
    entries.retain(|e| !(e.destination == entry.destination && e.path == entry.path));
    entries.insert(0, entry);
    entries.truncate(MAX_ENTRIES);
    let doc = CheckpointFile {
        version: VERSION,
        entries,
    };
    let bytes = serde_json::to_vec_pretty(&doc).map_err(std::io::Error::other)?;
    // A temporary name of this process and call, so concurrent savers never share one.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = file.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, file)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "exchange/buildbus/v1";

    fn dest(url: &str) -> Destination {
        Destination::of(url, PREFIX)
    }

    fn source(dir: &Path) -> PathBuf {
        let src = dir.join("events.json");
        fs::write(&src, b"{\"a\":1}\n{\"b\":2}\n").unwrap();
        src
    }

    #[test]
    fn save_load_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let a = dest("amqp://guest:guest@127.0.0.1:5672/%2f");
        let cp = default_file(dir.path(), &src);
        assert_eq!(load(&cp, &a, &src), 0);
        save(&cp, &a, &src, 8).unwrap();
        assert_eq!(load(&cp, &a, &src), 8);
        // Rewritten file: the checkpoint no longer applies.
        fs::write(&src, b"{\"x\":1}\n{\"b\":2}\n").unwrap();
        assert_eq!(load(&cp, &a, &src), 0);
        // Truncated below the offset: from the start.
        save(&cp, &a, &src, 16).unwrap();
        fs::write(&src, b"{\"x\":1}\n").unwrap();
        assert_eq!(load(&cp, &a, &src), 0);
    }

    #[test]
    fn the_key_is_broker_vhost_prefix_and_file_never_the_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let cp = default_file(dir.path(), &src);
        save(
            &cp,
            &dest("amqp://alice:s3cret@MQ.example.com:5672/builds"),
            &src,
            8,
        )
        .unwrap();
        let text = fs::read_to_string(&cp).unwrap();
        assert!(
            !text.contains("alice") && !text.contains("s3cret"),
            "{text}"
        );
        // Other credentials, same broker, vhost and prefix: the same checkpoint.
        assert_eq!(
            load(
                &cp,
                &dest("amqp://bob:other@mq.example.com:5672/builds"),
                &src
            ),
            8
        );
        // The default port spelt out or not: the same broker.
        assert_eq!(load(&cp, &dest("amqp://mq.example.com/builds"), &src), 8);
        // Another vhost, host, port or exchange prefix: nothing confirmed there yet.
        assert_eq!(
            load(
                &cp,
                &dest("amqp://alice:s3cret@mq.example.com:5672/%2f"),
                &src
            ),
            0
        );
        assert_eq!(
            load(
                &cp,
                &dest("amqp://alice:s3cret@mq2.example.com:5672/builds"),
                &src
            ),
            0
        );
        assert_eq!(
            load(
                &cp,
                &dest("amqp://alice:s3cret@mq.example.com:5673/builds"),
                &src
            ),
            0
        );
        let other_prefix =
            Destination::of("amqp://mq.example.com:5672/builds", "exchange/staging/v1");
        assert_eq!(load(&cp, &other_prefix, &src), 0);
        // Saving for another destination keeps the first one's entry.
        save(&cp, &other_prefix, &src, 16).unwrap();
        assert_eq!(load(&cp, &other_prefix, &src), 16);
        assert_eq!(load(&cp, &dest("amqp://mq.example.com/builds"), &src), 8);
    }

    #[test]
    fn a_replaced_file_starts_again_even_with_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let a = dest("amqp://127.0.0.1:5672/%2f");
        let cp = default_file(dir.path(), &src);
        save(&cp, &a, &src, 8).unwrap();
        let new = dir.path().join("new.json");
        fs::copy(&src, &new).unwrap();
        fs::rename(&new, &src).unwrap();
        assert_eq!(load(&cp, &a, &src), 0, "another inode at the same path");
    }

    #[test]
    fn old_format_and_garbage_are_no_checkpoint_and_get_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let a = dest("amqp://127.0.0.1:5672/%2f");
        let cp = default_file(dir.path(), &src);
        let old = format!(
            "{{\"path\":{:?},\"offset\":8,\"head\":{:?}}}",
            src.display().to_string(),
            head_hash(&src, 8).unwrap()
        );
        for text in [
            old.as_str(),
            "",
            "not json",
            "[1,2]",
            "{\"version\":2,\"entries\":\"x\"}",
            "{\"version\":99,\"entries\":[]}",
            "{\"version\":2,\"entries\":[{\"offset\":-1}]}",
        ] {
            fs::write(&cp, text).unwrap();
            assert_eq!(load(&cp, &a, &src), 0, "{text}");
            save(&cp, &a, &src, 8).unwrap();
            assert_eq!(load(&cp, &a, &src), 8, "{text}");
        }
        fs::write(&cp, [0xff, 0xfe, 0x00]).unwrap();
        assert_eq!(load(&cp, &a, &src), 0);
    }

    #[test]
    fn at_most_max_entries_are_kept_the_latest_first() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let cp = default_file(dir.path(), &src);
        let d = |i: usize| dest(&format!("amqp://127.0.0.1:{}/%2f", 6000 + i));
        for i in 0..MAX_ENTRIES + 3 {
            save(&cp, &d(i), &src, 8).unwrap();
        }
        assert_eq!(load(&cp, &d(MAX_ENTRIES + 2), &src), 8);
        assert_eq!(load(&cp, &d(3), &src), 8);
        assert_eq!(load(&cp, &d(2), &src), 0, "the oldest were dropped");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
