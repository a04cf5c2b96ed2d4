//! A scan: the walk ([`super::walk`](mod@super::walk)) then the hashing ([`super::hash`]), giving one
//! [`Artifact`] per classified file or link and a [`ScanReport`] of what was seen,
//! left out and skipped.
//!
//! The two phases are public on their own ([`super::walk::walk`], [`finish`]) so that
//! what happens between them (a file that vanishes, changes type or becomes unreadable
//! after the walk found it) can be reproduced exactly; [`scan`] runs both.

use std::collections::{BTreeMap, HashMap};

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::hash::{hash_files, HashJob};
use super::progress::{ProgressBar, ScanProgress};
pub use super::tree::{Root, ScanReport, Skipped};
use super::walk::{walk, Content, Walked};
use super::{AamError, Rules};
use crate::model::time;

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
