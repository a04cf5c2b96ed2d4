//! Hashing: SHA-256 of regular files, streamed through a fixed buffer (never a whole
//! file in memory), on all cores.
//!
//! Files are handed out largest first to a scoped pool of threads (one buffer each),
//! so one big image does not end up last on one core while the others idle (their
//! sizes come from a first, parallel `lstat` pass: the walk itself does not `stat` plain
//! files). Right before a file is opened, it is checked (`lstat`) to still be the
//! regular file the walk found (same inode): a file replaced by a FIFO, a socket, a
//! directory or a link after the walk is never opened. The open itself uses `O_NOFOLLOW | O_NONBLOCK`, so
//! even a swap in the instant between the check and the open cannot make it follow a
//! link or block on a FIFO, and the opened file is checked once more (`fstat`).

use std::cmp::Reverse;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use sha2::{Digest, Sha256};

use super::progress::ScanProgress;
use super::tree::{mtime_ms, type_name};

/// The read buffer of each hashing thread.
pub const BUF_SIZE: usize = 512 * 1024;

/// A regular file to hash, as the walk found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashJob {
    pub path: PathBuf,
    /// Its inode (from the directory entry: the walk does not `stat` plain files).
    pub ino: u64,
    /// Its device, when the walk had it (files reached through a link).
    pub dev: Option<u64>,
}

/// The digest of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    /// Lower-case hex.
    pub sha256: String,
    /// Bytes read.
    pub size: u64,
    /// Modification time of the opened file (ms since the epoch).
    pub mtime_ms: Option<i64>,
}

/// Why a file was not hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("vanished during the scan")]
    Vanished,
    #[error("became {0} during the scan (never opened)")]
    NotRegular(&'static str),
    #[error("was replaced by another file during the scan")]
    Replaced,
    #[error("cannot be opened ({0})")]
    Open(std::io::Error),
    #[error("cannot be read ({0})")]
    Read(std::io::Error),
    #[error("hashing thread failed")]
    Thread,
}

fn open_error(e: std::io::Error) -> HashError {
    match e.kind() {
        ErrorKind::NotFound => HashError::Vanished,
        // O_NOFOLLOW on a path that became a link.
        _ if e.raw_os_error() == Some(libc::ELOOP) => HashError::Replaced,
        _ => HashError::Open(e),
    }
}

/// Checks (without opening it) that `job` is still the regular file the walk found;
/// its metadata.
fn identify(job: &HashJob) -> Result<fs::Metadata, HashError> {
    let md = fs::symlink_metadata(&job.path).map_err(open_error)?;
    let ft = md.file_type();
    if !ft.is_file() {
        return Err(HashError::NotRegular(type_name(&ft)));
    }
    if md.ino() != job.ino || job.dev.is_some_and(|d| d != md.dev()) {
        return Err(HashError::Replaced);
    }
    Ok(md)
}

/// Hashes one file through `buf`, adding the bytes read to `progress`.
pub fn hash_file(
    job: &HashJob,
    buf: &mut [u8],
    progress: &ScanProgress,
) -> Result<FileDigest, HashError> {
    let before = identify(job)?;
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&job.path)
        .map_err(open_error)?;
    let md = f.metadata().map_err(HashError::Read)?;
    if !md.file_type().is_file() {
        return Err(HashError::NotRegular(type_name(&md.file_type())));
    }
    if (md.dev(), md.ino()) != (before.dev(), before.ino()) {
        return Err(HashError::Replaced);
    }
    let mut h = Sha256::new();
    let mut n = 0u64;
    loop {
        match f.read(buf) {
            Ok(0) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
                progress.bytes_done.fetch_add(k as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(HashError::Read(e)),
        }
    }
    Ok(FileDigest {
        sha256: hex::encode(h.finalize()),
        size: n,
        mtime_ms: mtime_ms(&md),
    })
}

/// Runs `f` on the items `order` names, on `threads` scoped threads (each with its
/// own buffer of `buf` bytes); the results by item index.
fn pool<R: Send>(
    n: usize,
    order: &[usize],
    threads: usize,
    buf: usize,
    f: impl Fn(usize, &mut [u8]) -> R + Sync,
) -> Vec<Option<R>> {
    let next = AtomicUsize::new(0);
    let work = || {
        let mut b = vec![0u8; buf];
        let mut out = Vec::new();
        while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
            out.push((i, f(i, &mut b)));
        }
        out
    };
    let mut results: Vec<Option<R>> = (0..n).map(|_| None).collect();
    let threads = threads.clamp(1, order.len().max(1));
    let done: Vec<Vec<(usize, R)>> = if threads == 1 {
        vec![work()]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(work)).collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    };
    for (i, r) in done.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
}

/// Hashes `jobs` on `threads` threads; one result per job, in the order of `jobs`.
///
/// First every file is checked (`lstat`, in parallel) for its size, then the files
/// are hashed largest first.
pub fn hash_files(
    jobs: &[HashJob],
    threads: usize,
    progress: &ScanProgress,
) -> Vec<Result<FileDigest, HashError>> {
    let all: Vec<usize> = (0..jobs.len()).collect();
    let sizes: Vec<Option<u64>> = pool(jobs.len(), &all, threads, 0, |i, _| {
        identify(&jobs[i]).ok().map(|md| md.len())
    })
    .into_iter()
    .map(Option::flatten)
    .collect();
    progress
        .bytes_total
        .store(sizes.iter().flatten().sum(), Ordering::Relaxed);
    let mut order = all;
    order.sort_by_key(|&i| Reverse(sizes[i].unwrap_or(0)));
    pool(jobs.len(), &order, threads, BUF_SIZE, |i, buf| {
        let r = hash_file(&jobs[i], buf, progress);
        progress.files_done.fetch_add(1, Ordering::Relaxed);
        r
    })
    .into_iter()
    .map(|r| r.unwrap_or(Err(HashError::Thread)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(path: &std::path::Path) -> HashJob {
        let md = fs::symlink_metadata(path).unwrap();
        HashJob {
            path: path.to_path_buf(),
            ino: md.ino(),
            dev: Some(md.dev()),
        }
    }

    #[test]
    fn hashes_stream_and_match_known_digests() {
        let d = tempfile::tempdir().unwrap();
        let empty = d.path().join("empty");
        let abc = d.path().join("abc");
        let big = d.path().join("big");
        fs::write(&empty, b"").unwrap();
        fs::write(&abc, b"abc").unwrap();
        // Larger than the buffer, so it takes several reads.
        fs::write(&big, vec![b'a'; BUF_SIZE * 2 + 17]).unwrap();
        let jobs = [job(&empty), job(&abc), job(&big)];
        let p = ScanProgress::default();
        let r = hash_files(&jobs, 2, &p);
        let d0 = r[0].as_ref().unwrap();
        assert_eq!(
            d0.sha256,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            r[1].as_ref().unwrap().sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let want = hex::encode(Sha256::digest(vec![b'a'; BUF_SIZE * 2 + 17]));
        assert_eq!(r[2].as_ref().unwrap().sha256, want);
        assert_eq!(r[2].as_ref().unwrap().size, (BUF_SIZE * 2 + 17) as u64);
        assert_eq!(p.files_done.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_file_replaced_after_the_walk_is_not_read() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        fs::write(&a, b"x").unwrap();
        let j = job(&a);
        fs::remove_file(&a).unwrap();
        let p = ScanProgress::default();
        let mut buf = vec![0; 16];
        assert!(matches!(
            hash_file(&j, &mut buf, &p),
            Err(HashError::Vanished)
        ));
        fs::create_dir(&a).unwrap();
        assert!(matches!(
            hash_file(&j, &mut buf, &p),
            Err(HashError::NotRegular("a directory"))
        ));
        fs::remove_dir(&a).unwrap();
        fs::write(&a, b"y").unwrap();
        // Same name, another inode (or, rarely, the same one reused: then it is a file).
        match hash_file(&j, &mut buf, &p) {
            Err(HashError::Replaced) | Ok(_) => {}
            other => panic!("{other:?}"),
        }
    }
}
