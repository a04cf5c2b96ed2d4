//! Checkpoints of file sources: the byte offset up to which every message has been
//! confirmed by the broker, so a restarted `publish` resumes where it stopped.
//!
//! A checkpoint is a small JSON file (`{path, offset, head}`) written atomically
//! (temporary file, fsync, rename). `head` is a hash of the file's first bytes up to the
//! offset (at most 4 KiB): when the file was replaced or rewritten, the checkpoint no
//! longer matches and the file is published from the start. Resuming re-reads the file
//! from its start (translation needs the build's context) and skips the messages that
//! were emitted at or before the offset: the same stream gives the same messages at the
//! same offsets, and any duplicate is harmless since ids are deterministic.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    path: String,
    offset: u64,
    head: String,
}

const HEAD_BYTES: u64 = 4096;

fn head_hash(source: &Path, upto: u64) -> std::io::Result<String> {
    let mut f = fs::File::open(source)?;
    let mut buf = Vec::new();
    (&mut f).take(upto.min(HEAD_BYTES)).read_to_end(&mut buf)?;
    Ok(hex::encode(Sha256::digest(&buf)))
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

/// The offset to resume `source` from (0 when there is no matching checkpoint).
pub fn load(file: &Path, source: &Path) -> u64 {
    let Ok(text) = fs::read_to_string(file) else {
        return 0;
    };
    let Ok(r) = serde_json::from_str::<Record>(&text) else {
        tracing::warn!(
            "{}: unreadable checkpoint, starting from the beginning",
            file.display()
        );
        return 0;
    };
    let len = fs::metadata(source).map(|m| m.len()).unwrap_or(0);
    match head_hash(source, r.offset) {
        Ok(h) if h == r.head && r.offset <= len => r.offset,
        _ => {
            tracing::warn!(
                "{}: the file changed since its checkpoint; publishing it from the start",
                source.display()
            );
            0
        }
    }
}

/// Records that everything up to `offset` of `source` is confirmed.
pub fn save(file: &Path, source: &Path, offset: u64) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir)?;
    }
    let r = Record {
        path: source.display().to_string(),
        offset,
        head: head_hash(source, offset)?,
    };
    let tmp = file.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&r).unwrap_or_default())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("events.json");
        fs::write(&src, b"{\"a\":1}\n{\"b\":2}\n").unwrap();
        let cp = default_file(dir.path(), &src);
        assert_eq!(load(&cp, &src), 0);
        save(&cp, &src, 8).unwrap();
        assert_eq!(load(&cp, &src), 8);
        // Rewritten file: the checkpoint no longer applies.
        fs::write(&src, b"{\"x\":1}\n{\"b\":2}\n").unwrap();
        assert_eq!(load(&cp, &src), 0);
    }
}
