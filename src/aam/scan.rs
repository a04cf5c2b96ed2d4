//! A scan: the walk ([`super::walk`](mod@super::walk)) then the hashing ([`super::hash`]), giving one
//! [`Artifact`] per classified file or link and a [`ScanReport`] of what was seen,
//! left out and skipped.
//!
//! The two phases are public on their own ([`super::walk::walk`], [`finish`]) so that
//! what happens between them (a file that vanishes, changes type or becomes unreadable
//! after the walk found it) can be reproduced exactly; [`scan`] runs both.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::hash::{hash_files, HashJob};
use super::progress::{ProgressBar, ScanProgress};
use super::walk::{walk, Content, Walked};
use super::{AamError, Rules};
use crate::model::time;

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

/// How to scan.
#[derive(Debug, Clone, Default)]
pub struct ScanOptions {
    /// Hashing threads; 0: one per core.
    pub threads: usize,
    /// Draw a progress bar on stderr (when it is a terminal and the scan is long).
    pub progress_bar: bool,
    /// Counters to update (e.g. for a caller's own display); fresh ones if `None`.
    pub progress: Option<Arc<ScanProgress>>,
}

impl ScanOptions {
    /// The number of hashing threads these options ask for.
    pub fn thread_count(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// One classified file or symbolic link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// The logical path ('/'-separated; see `config/artifacts.toml`).
    pub path: String,
    /// Where it is on this machine (`file://` and the absolute path, percent-encoded).
    pub uri: String,
    /// The rule's kind.
    pub kind: String,
    /// The rule's captures.
    pub fields: BTreeMap<String, String>,
    /// The rule's target, expanded.
    pub target: Option<String>,
    /// Bytes hashed (for a link: of the file it resolves to inside its tree).
    pub size: Option<u64>,
    /// Modification time (RFC 3339, milliseconds) of what `size` describes, else of the link.
    pub mtime: Option<String>,
    pub sha256: Option<String>,
    /// For a symbolic link: its target, as written in the link.
    pub symlink_target: Option<String>,
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

/// The result of a scan: artifacts sorted by path, and the report.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub artifacts: Vec<Artifact>,
    pub report: ScanReport,
}

/// Walks `roots` with `rules`, then hashes what the walk found.
pub fn scan(roots: &[Root], rules: &Rules, opts: &ScanOptions) -> Result<Scan, AamError> {
    let progress = opts.progress.clone().unwrap_or_default();
    let bar = if opts.progress_bar {
        ProgressBar::start(progress.clone())
    } else {
        None
    };
    let walked = walk(roots, rules, Some(&progress));
    let scan = walked.map(|w| finish_with(w, opts, &progress));
    if let Some(b) = bar {
        b.finish();
    }
    scan
}

/// The second phase: hashes the files a walk found and makes the artifacts.
pub fn finish(walked: Walked, opts: &ScanOptions) -> Scan {
    let progress = opts.progress.clone().unwrap_or_default();
    finish_with(walked, opts, &progress)
}

fn finish_with(walked: Walked, opts: &ScanOptions, progress: &ScanProgress) -> Scan {
    let Walked { found, mut report } = walked;
    // Each file once, however many links lead to it (the roots are canonical and the
    // walk follows no link, so one file has one path here).
    let mut jobs: Vec<HashJob> = Vec::new();
    let mut by_path: HashMap<&Path, usize> = HashMap::new();
    let job_of: Vec<Option<usize>> = found
        .iter()
        .map(|f| match &f.content {
            Content::File(job) => Some(*by_path.entry(&job.path).or_insert_with(|| {
                jobs.push(job.clone());
                jobs.len() - 1
            })),
            Content::None { .. } => None,
        })
        .collect();
    drop(by_path);
    progress
        .files_total
        .store(jobs.len() as u64, Ordering::Relaxed);
    let results = hash_files(&jobs, opts.thread_count(), progress);
    report.bytes_hashed = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|d| d.size)
        .sum();
    let mut artifacts = Vec::with_capacity(found.len());
    for (f, job) in found.into_iter().zip(job_of) {
        let (size, mtime, sha256) = match (job, &f.content) {
            (Some(i), _) => match &results[i] {
                Ok(d) => (
                    Some(d.size),
                    d.mtime_ms.and_then(time::from_millis),
                    Some(d.sha256.clone()),
                ),
                Err(e) => {
                    report.skip(&f.abs, format!("{e}: skipped"));
                    continue;
                }
            },
            (None, Content::None { mtime_ms }) => {
                (None, mtime_ms.and_then(time::from_millis), None)
            }
            (None, Content::File(_)) => (None, None, None),
        };
        artifacts.push(Artifact {
            uri: file_uri(&f.abs),
            path: f.path,
            kind: f.class.kind,
            fields: f.class.fields,
            target: f.class.target,
            size,
            mtime,
            sha256,
            symlink_target: f.link,
        });
    }
    artifacts.sort_by(|a, b| a.path.cmp(&b.path));
    report.artifacts = artifacts.len() as u64;
    Scan { artifacts, report }
}

/// `file://` and the absolute path, with what is not a URI path character encoded.
pub fn file_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = path.as_os_str().as_bytes();
    let mut uri = String::with_capacity(7 + bytes.len());
    uri.push_str("file://");
    for &b in bytes {
        let keep = b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b);
        if keep {
            uri.push(char::from(b));
        } else {
            uri.push('%');
            uri.push(char::from(HEX[usize::from(b >> 4)]));
            uri.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    uri
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_encode_what_a_path_may_hold() {
        assert_eq!(
            file_uri(Path::new("/a b/c%d#e?f/ü")),
            "file:///a%20b/c%25d%23e%3Ff/%C3%BC"
        );
    }
}
