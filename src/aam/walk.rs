//! The walk: every entry of the trees to scan, once, in name order; what each one is.
//!
//! - Directories are entered unless an exclude rule names them (then they are not even
//!   read). Symbolic links to directories are never entered.
//! - A regular file a rule classifies becomes a [`Found`] to hash (with the inode its
//!   directory entry gives, so the hashing can tell if it was replaced meanwhile; plain
//!   files are not `stat`ed here, the hashing threads do that in parallel).
//! - A symbolic link a rule classifies is recorded with its target as written. If it
//!   resolves to a regular file *inside its own tree*, that file's content is hashed for
//!   it; a link resolving outside the tree is never followed (target only); a dangling
//!   link is recorded as such; a link loop is skipped with a warning.
//! - FIFOs, sockets and devices are skipped with a warning, never opened (not even to
//!   find out that nothing comes: opening a FIFO for reading blocks until a writer
//!   appears).
//!
//! Only `readdir`, and `lstat`/`readlink`/`realpath` for links, happen here; no file is
//! opened.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use walkdir::{DirEntryExt, WalkDir};

use super::hash::HashJob;
use super::progress::ScanProgress;
use super::rules::Class;
use super::tree::{mtime_ms, type_name, Root, ScanReport};
use super::{AamError, Rules};

/// What the walk found for one classified entry.
#[derive(Debug, Clone)]
pub struct Found {
    /// The logical path.
    pub path: String,
    /// Where the entry is (the link itself, for a link).
    pub abs: PathBuf,
    pub class: Class,
    /// For a symbolic link: its target, as written.
    pub link: Option<String>,
    pub content: Content,
}

/// What there is to hash for a [`Found`].
#[derive(Debug, Clone)]
pub enum Content {
    /// A regular file (the entry itself, or the file a link resolves to in its tree).
    File(HashJob),
    /// Nothing (a link to a directory, out of its tree, or dangling); the link's mtime.
    None { mtime_ms: Option<i64> },
}

/// The result of the walk: what to hash, and the report so far.
#[derive(Debug, Clone, Default)]
pub struct Walked {
    pub found: Vec<Found>,
    pub report: ScanReport,
}

/// The '/'-separated path of `path` below `root`, or `None` when a name is not UTF-8.
fn relative(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let mut out = String::new();
    for c in rel.components() {
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(c.as_os_str().to_str()?);
    }
    Some(out)
}

fn is_loop(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

/// Walks every root; a root that cannot be opened is an error, anything inside it only
/// a warning.
pub fn walk(
    roots: &[Root],
    rules: &Rules,
    progress: Option<&ScanProgress>,
) -> Result<Walked, AamError> {
    let mut w = Walked::default();
    for root in roots {
        // Canonical, so that "inside the tree" is a plain prefix test.
        let root = Root::new(&root.dir, &root.prefix)?;
        walk_root(&root, rules, progress, &mut w);
        w.report.roots.push(root);
    }
    Ok(w)
}

fn walk_root(root: &Root, rules: &Rules, progress: Option<&ScanProgress>, w: &mut Walked) {
    let report = &mut w.report;
    let mut it = WalkDir::new(&root.dir)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter();
    while let Some(next) = it.next() {
        let entry = match next {
            Ok(e) => e,
            Err(e) => {
                let path = e.path().unwrap_or(&root.dir).to_path_buf();
                let reason = match e.io_error() {
                    Some(io) => format!("cannot be read ({io}): skipped"),
                    None => format!("{e}: skipped"),
                };
                report.skip(&path, reason);
                continue;
            }
        };
        if entry.depth() == 0 {
            continue;
        }
        if let Some(p) = progress {
            p.walked.fetch_add(1, Ordering::Relaxed);
        }
        let path = entry.path();
        let ft = entry.file_type();
        let Some(rel) = relative(&root.dir, path) else {
            report.skip(path, "its name is not UTF-8: skipped".into());
            if ft.is_dir() {
                it.skip_current_dir();
            }
            continue;
        };
        let logical = root.logical(&rel);
        if ft.is_dir() {
            if rules.excluded_dir(&logical) {
                report.excluded += 1;
                it.skip_current_dir();
            }
            continue;
        }
        // The tree's own links to other trees are scanned as roots of their own.
        if root.prefix.is_empty()
            && entry.depth() == 1
            && ft.is_symlink()
            && rules.root_links().contains(&rel)
        {
            continue;
        }
        report.entries += 1;
        if rules.excluded(&logical) {
            report.excluded += 1;
            continue;
        }
        if !ft.is_file() && !ft.is_symlink() {
            report.skip(path, format!("{}: skipped, never opened", type_name(&ft)));
            continue;
        }
        let Some(class) = rules.classify(&logical) else {
            report.unclassified += 1;
            continue;
        };
        if ft.is_file() {
            // No `stat` here: the hashing checks and measures the file (in parallel).
            w.found.push(Found {
                path: logical,
                abs: path.to_path_buf(),
                class,
                link: None,
                content: Content::File(HashJob {
                    path: path.to_path_buf(),
                    ino: entry.ino(),
                    dev: None,
                }),
            });
            continue;
        }
        // A symbolic link.
        let md = match fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                report.skip(path, "vanished during the scan: skipped".into());
                continue;
            }
            Err(e) => {
                report.skip(path, format!("cannot be read ({e}): skipped"));
                continue;
            }
        };
        let target = match fs::read_link(path) {
            Ok(t) => t.to_string_lossy().into_owned(),
            Err(e) => {
                report.skip(path, format!("cannot read the link ({e}): skipped"));
                continue;
            }
        };
        let content = match fs::canonicalize(path) {
            Err(e) if is_loop(&e) => {
                report.skip(path, format!("a symbolic link loop (-> {target}): skipped"));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Content::None {
                mtime_ms: mtime_ms(&md),
            },
            Err(e) => {
                report.skip(path, format!("cannot resolve the link ({e}): skipped"));
                continue;
            }
            Ok(resolved) if resolved.starts_with(&root.dir) => match fs::metadata(&resolved) {
                Ok(t) if t.is_file() => Content::File(HashJob {
                    path: resolved,
                    ino: t.ino(),
                    dev: Some(t.dev()),
                }),
                Ok(t) if t.is_dir() => Content::None {
                    mtime_ms: mtime_ms(&md),
                },
                Ok(t) => {
                    report.skip(
                        path,
                        format!(
                            "a link to {}: skipped, never opened",
                            type_name(&t.file_type())
                        ),
                    );
                    continue;
                }
                Err(e) => {
                    report.skip(path, format!("cannot resolve the link ({e}): skipped"));
                    continue;
                }
            },
            // Out of its tree: recorded with its target, never followed.
            Ok(_) => Content::None {
                mtime_ms: mtime_ms(&md),
            },
        };
        w.found.push(Found {
            path: logical,
            abs: path.to_path_buf(),
            class,
            link: Some(target),
            content,
        });
    }
}
