//! `buildbus-bench aam`: the AAM's hashing and walking speed beside the usual tools, in
//! the same run, on the same generated files.
//!
//! - Hashing: a tree of large files (warm in the page cache), hashed by `sha256sum` (one
//!   process: one core), by `sha256sum` split over one process per core, and by the AAM's
//!   scan with one thread and with one thread per core. The per-core ratio is the AAM
//!   with one thread against one `sha256sum`.
//! - Walking: a tree of many small files, listed by `find DIR -type f`, walked and
//!   classified by the AAM (no hashing), and fully scanned (walk, classify, stat, hash).
//!
//! The baselines are subprocesses (the product itself never shells out). Peak memory of
//! this process shows the hashing streams (it does not grow with file sizes).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{ensure, Context as _};
use clap::Args;

use super::Cli;
use buildbus::aam::{self, Rules, ScanOptions};

const EXAMPLES: &str = "\
Examples:
  # 8 files, 1 GiB, beside sha256sum; 100,000 small files beside find
  cargo run --release -p buildbus-bench -- aam
  # Bigger files, keep the generated trees
  cargo run --release -p buildbus-bench -- aam --mib 4096 --large-files 4 --dir /var/tmp/aam-bench

Figures go in BENCHMARKS.md; tests never assert speed.";

/// Options of `bench aam`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct AamBench {
    /// Total size of the large files, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// How many large files.
    #[arg(long, default_value_t = 8)]
    pub large_files: u64,
    /// How many small files in the walking tree.
    #[arg(long, default_value_t = 100_000)]
    pub small_files: u64,
    /// Timed runs of each measurement; the best is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Where to generate the trees (default: a fresh folder in the temp directory,
    /// removed at the end).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Best wall time of `runs` runs of `f`.
fn best(runs: u32, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut b = f64::MAX;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        b = b.min(t.elapsed().as_secs_f64());
    }
    Ok(b)
}

/// Runs `cmd` with its output discarded; fails unless it exits 0.
fn run_quiet(cmd: &mut Proc) -> anyhow::Result<()> {
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(st.success(), "{cmd:?}: {st}");
    Ok(())
}

/// Writes `n` files totalling `bytes` of varied content under `dir`.
fn large_tree(dir: &Path, n: u64, bytes: u64) -> anyhow::Result<Vec<PathBuf>> {
    let img = dir.join("deploy/images/bench-machine");
    fs::create_dir_all(&img)?;
    let per = bytes / n.max(1);
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut paths = Vec::new();
    for i in 0..n {
        let p = img.join(format!("bench-image-{i}.rootfs.ext4"));
        let mut w = BufWriter::new(File::create(&p)?);
        let mut left = per;
        while left > 0 {
            for b in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = (x >> 32) as u8;
            }
            let k = left.min(block.len() as u64) as usize;
            w.write_all(&block[..k])?;
            left -= k as u64;
        }
        w.flush()?;
        paths.push(p);
    }
    Ok(paths)
}

/// Writes `n` small files (license texts of `n/100` recipes) under `dir`.
fn small_tree(dir: &Path, n: u64) -> anyhow::Result<()> {
    let lic = dir.join("deploy/licenses");
    for i in 0..n {
        let d = lic.join(format!("recipe-{:04}", i / 100));
        if i % 100 == 0 {
            fs::create_dir_all(&d)?;
        }
        fs::write(
            d.join(format!("generic_LICENSE-{i}")),
            format!("license text {i}\n"),
        )?;
    }
    Ok(())
}

pub fn run(_cli: &Cli, a: &AamBench) -> anyhow::Result<ExitCode> {
    let (dir, remove) = match &a.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("buildbus-bench-aam-{}", std::process::id())),
            true,
        ),
    };
    fs::create_dir_all(&dir)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rules = Rules::builtin();

    // --- Hashing large files.
    let large = dir.join("large");
    let bytes = a.mib << 20;
    eprintln!(
        "generating {} files, {} MiB, in {}",
        a.large_files,
        a.mib,
        large.display()
    );
    let files = large_tree(&large, a.large_files, bytes)?;
    let roots = aam::locate(&large, "bitbake", None, &rules)?.roots;
    // Warm the page cache (and check the tools are there).
    run_quiet(Proc::new("sha256sum").args(&files))?;
    let sha_one = best(a.runs, || run_quiet(Proc::new("sha256sum").args(&files)))?;
    let sha_par = best(a.runs, || {
        let chunks: Vec<&[PathBuf]> = files.chunks(files.len().div_ceil(cores)).collect();
        let mut kids = Vec::new();
        for c in chunks {
            kids.push(
                Proc::new("sha256sum")
                    .args(c)
                    .stdout(Stdio::null())
                    .spawn()
                    .context("sha256sum")?,
            );
        }
        for mut k in kids {
            ensure!(k.wait()?.success(), "sha256sum failed");
        }
        Ok(())
    })?;
    let mut scanned = 0u64;
    let mut ours = |threads: usize| {
        best(a.runs, || {
            let opts = ScanOptions {
                threads,
                ..ScanOptions::default()
            };
            let s = aam::scan(&roots, &rules, &opts)?;
            ensure!(s.report.skipped.is_empty(), "{:?}", s.report.skipped);
            scanned = s.report.bytes_hashed;
            Ok(())
        })
    };
    let ours_one = ours(1)?;
    let ours_all = ours(cores)?;
    ensure!(
        scanned == bytes / a.large_files * a.large_files,
        "hashed {scanned} bytes"
    );
    let hwm = vm_hwm_mib();
    let mb = scanned as f64 / 1e6;
    let mbs = |s: f64| mb / s;

    // --- Walking small files.
    let small = dir.join("small");
    eprintln!(
        "generating {} small files in {}",
        a.small_files,
        small.display()
    );
    small_tree(&small, a.small_files)?;
    let count_find = || -> anyhow::Result<u64> {
        let o = Proc::new("find")
            .arg(&small)
            .args(["-type", "f"])
            .stderr(Stdio::inherit())
            .output()
            .context("running find")?;
        ensure!(o.status.success(), "find: {}", o.status);
        Ok(o.stdout.iter().filter(|&&b| b == b'\n').count() as u64)
    };
    let found = count_find()?; // warm the dentry and inode caches
    ensure!(found == a.small_files, "find listed {found} files");
    let find_s = best(a.runs, || count_find().map(|_| ()))?;
    let small_roots = aam::locate(&small, "bitbake", None, &rules)?.roots;
    let mut walked = 0;
    let walk_s = best(a.runs, || {
        walked = aam::walk(&small_roots, &rules, None)?.found.len();
        Ok(())
    })?;
    ensure!(walked as u64 == a.small_files, "walked {walked}");
    let scan_s = best(a.runs, || {
        let s = aam::scan(&small_roots, &rules, &ScanOptions::default())?;
        ensure!(s.artifacts.len() as u64 == a.small_files);
        Ok(())
    })?;
    let fps = |s: f64| a.small_files as f64 / s;

    println!("# buildbus bench aam: {} cores, best of {}", cores, a.runs);
    println!();
    println!(
        "Hashing {} files, {:.0} MB (page cache warm):",
        a.large_files, mb
    );
    println!();
    println!("| run | seconds | MB/s | vs sha256sum |");
    println!("|---|---:|---:|---:|");
    println!(
        "| sha256sum, one process | {sha_one:.3} | {:.0} | 1.00x |",
        mbs(sha_one)
    );
    println!(
        "| sha256sum, {cores} processes | {sha_par:.3} | {:.0} | {:.2}x |",
        mbs(sha_par),
        sha_one / sha_par
    );
    println!(
        "| buildbus aam, 1 thread | {ours_one:.3} | {:.0} | {:.2}x |",
        mbs(ours_one),
        sha_one / ours_one
    );
    println!(
        "| buildbus aam, {cores} threads | {ours_all:.3} | {:.0} | {:.2}x |",
        mbs(ours_all),
        sha_one / ours_all
    );
    println!();
    println!("peak RSS of this process after hashing: {hwm:.1} MiB");
    println!();
    println!("Walking {} small files:", a.small_files);
    println!();
    println!("| run | seconds | files/s | vs find |");
    println!("|---|---:|---:|---:|");
    println!(
        "| find -type f | {find_s:.3} | {:.0} | 1.00x |",
        fps(find_s)
    );
    println!(
        "| buildbus aam walk + classify | {walk_s:.3} | {:.0} | {:.2}x |",
        fps(walk_s),
        find_s / walk_s
    );
    println!(
        "| buildbus aam full scan (+ stat, open, hash) | {scan_s:.3} | {:.0} | {:.2}x |",
        fps(scan_s),
        find_s / scan_s
    );
    if remove {
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(ExitCode::SUCCESS)
}
