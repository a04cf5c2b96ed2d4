//! Scan progress: counters the walk and the hashing threads update, and a one-line
//! progress bar drawn on stderr while a long scan runs (only when stderr is a terminal,
//! and only after the scan has taken half a second, so small trees print nothing).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a scan has done so far. Totals are known once the walk is over.
#[derive(Debug, Default)]
pub struct ScanProgress {
    /// Entries the walk looked at.
    pub walked: AtomicU64,
    /// Files to hash, and their bytes (set when the walk ends).
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    /// Files and bytes hashed so far.
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
}

impl ScanProgress {
    fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    /// The line the bar shows (without the bar's redraw codes).
    pub fn line(&self, elapsed: Duration) -> String {
        let (ft, bt) = (Self::get(&self.files_total), Self::get(&self.bytes_total));
        let (fd, bd) = (Self::get(&self.files_done), Self::get(&self.bytes_done));
        if ft == 0 && bt == 0 {
            return format!("aam: walking, {} entries", Self::get(&self.walked));
        }
        const WIDTH: usize = 30;
        let frac = if bt > 0 {
            bd as f64 / bt as f64
        } else {
            fd as f64 / ft.max(1) as f64
        }
        .clamp(0.0, 1.0);
        let filled = (frac * WIDTH as f64).round() as usize;
        let secs = elapsed.as_secs_f64().max(1e-3);
        format!(
            "aam: [{}{}] {:3.0}%  {}/{} files  {:.1}/{:.1} MB  {:.0} MB/s",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            frac * 100.0,
            fd,
            ft,
            bd as f64 / 1e6,
            bt as f64 / 1e6,
            bd as f64 / 1e6 / secs
        )
    }
}

/// A progress bar drawn by its own thread until [`ProgressBar::finish`].
pub struct ProgressBar {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl ProgressBar {
    /// Starts drawing `progress` on stderr, if stderr is a terminal.
    pub fn start(progress: Arc<ScanProgress>) -> Option<ProgressBar> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("aam-progress".into())
            .spawn(move || {
                let start = Instant::now();
                let mut drawn = false;
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if start.elapsed() < Duration::from_millis(500) {
                        continue;
                    }
                    let line = progress.line(start.elapsed());
                    let mut err = std::io::stderr().lock();
                    let _ = write!(err, "\r\x1b[2K{line}");
                    let _ = err.flush();
                    drawn = true;
                    drop(err);
                    std::thread::sleep(Duration::from_millis(100));
                }
                if drawn {
                    let _ = write!(std::io::stderr(), "\r\x1b[2K");
                }
            })
            .ok()?;
        Some(ProgressBar {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops drawing and clears the line.
    pub fn finish(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ProgressBar {
    fn drop(&mut self) {
        self.stop_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_files_bytes_and_percent() {
        let p = ScanProgress::default();
        p.walked.store(7, Ordering::Relaxed);
        assert_eq!(p.line(Duration::from_secs(1)), "aam: walking, 7 entries");
        p.files_total.store(4, Ordering::Relaxed);
        p.bytes_total.store(4_000_000, Ordering::Relaxed);
        p.files_done.store(1, Ordering::Relaxed);
        p.bytes_done.store(1_000_000, Ordering::Relaxed);
        let l = p.line(Duration::from_secs(1));
        assert!(l.contains(" 25%") && l.contains("1/4 files"), "{l}");
        assert!(l.contains("1.0/4.0 MB") && l.contains("1 MB/s"), "{l}");
    }
}
