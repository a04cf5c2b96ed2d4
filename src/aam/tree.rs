//! What a scan covers and what it saw: the trees to scan ([`Root`]), the report of a
//! scan ([`ScanReport`], [`Skipped`]), and the file facts every phase reads the same
//! way (a file type's name for warnings, a modification time in milliseconds).
//!
//! It sits under the walk, the hashing and the scan, so they share these without
//! importing each other.

use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::AamError;

/// One tree to scan: a real directory (canonical) and the logical name its files'
/// paths start with (`deploy`, `bazel-bin`, or empty for the directory itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    pub dir: PathBuf,
    pub prefix: String,
}

impl Root {
    /// A root for `dir` (made canonical), its paths starting with `prefix`.
    pub fn new(dir: &Path, prefix: &str) -> Result<Root, AamError> {
        let err = |reason: String| AamError::Root {
            path: dir.display().to_string(),
            reason,
        };
        let canon = std::fs::canonicalize(dir).map_err(|e| err(format!("cannot open: {e}")))?;
        let md = std::fs::metadata(&canon).map_err(|e| err(format!("cannot open: {e}")))?;
        if !md.is_dir() {
            return Err(err("not a directory".into()));
        }
        Ok(Root {
            dir: canon,
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    /// The logical path of `rel` (relative to the root, '/'-separated).
    pub fn logical(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            [self.prefix.as_str(), "/", rel].concat()
        }
    }
}

/// Something the scan left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// What one scan saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// The trees scanned.
    pub roots: Vec<Root>,
    /// Files, links and special files looked at (not directories).
    pub entries: u64,
    /// Of these, excluded by a rule (excluded directories are not entered, and count once).
    pub excluded: u64,
    /// Of these, matched by no rule.
    pub unclassified: u64,
    /// Artifacts recorded.
    pub artifacts: u64,
    /// Bytes read and hashed (each file once, however many links point at it).
    pub bytes_hashed: u64,
    /// What was skipped with a warning (unreadable, vanished, loops, FIFOs, sockets, ...).
    pub skipped: Vec<Skipped>,
}

impl ScanReport {
    pub(crate) fn skip(&mut self, path: &Path, reason: String) {
        tracing::warn!("aam: {}: {reason}", path.display());
        self.skipped.push(Skipped {
            path: path.to_path_buf(),
            reason,
        });
    }
}

/// What a file type is, for warnings.
pub(crate) fn type_name(ft: &fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "an unknown kind of file"
    }
}

pub(crate) fn mtime_ms(md: &fs::Metadata) -> Option<i64> {
    md.mtime()
        .checked_mul(1000)?
        .checked_add(md.mtime_nsec() / 1_000_000)
}
