//! buildbus-testkit: private, throw-away instances of the external services
//! buildbus talks to, for buildbus's tests, the demo script and the benchmarks:
//! a RabbitMQ node ([`RabbitNode`]) and a PostgreSQL cluster ([`PgCluster`]).
//! A development crate (`publish = false`), never part of the product: it does
//! not depend on `buildbus`, and `buildbus` has it as a dev-dependency only.
//!
//! This crate owns starting, watching and stopping those processes. Each
//! instance lives in its own folder under a caller-given base folder, listens
//! on free ports of 127.0.0.1 only, and never touches a system-wide broker or
//! cluster. It uses only `std` (blocking `std::process::Command`), so it can
//! be used from sync tests, async tests and benchmarks alike.
//!
//! Cleanup happens in three layers:
//! * `stop()` stops gracefully (the data stays, `start_again()` resumes it);
//! * `Drop` kills whatever still runs and removes the instance's folder;
//! * a tiny watchdog shell per instance, reading a pipe only this process
//!   holds, does the same when this process ends without running `Drop`
//!   (a value kept in a `static`, `std::process::exit`, a crash, SIGKILL).
//!   So a node shared by a whole test binary through a `static` is still
//!   stopped when the test binary exits.
//!
//! The programs come from Debian packages; `scripts/ensure-deps.sh`
//! installs them, and every "not found" error says so.
//!
//! The crate's binary, `buildbus-testkit`, gives the same to shell scripts:
//! `buildbus-testkit rabbitmq --dir DIR` starts a node, prints its AMQP URL
//! and runs it until its stdin ends or it gets SIGINT/SIGTERM
//! (`scripts/demo.sh` uses it).

pub mod postgres;
pub mod rabbitmq;

pub use postgres::PgCluster;
pub use rabbitmq::{RabbitNode, TlsListener};

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// What went wrong while starting, driving or stopping a private service.
///
/// Every message says what failed and, where there is one, the command line
/// and the tail of its output or of the service's log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InfraError {
    /// A program is not installed.
    #[error(
        "{program} not found (looked for {looked_in}); run scripts/ensure-deps.sh to install it"
    )]
    MissingBinary {
        /// The program's name.
        program: String,
        /// Where it was looked for.
        looked_in: String,
    },
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A command ran but failed (non-zero exit or killed by a signal).
    #[error("`{command}` failed ({status})\n{output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// The tail of its stderr and stdout.
        output: String,
    },
    /// A command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed\n{output}")]
    CommandTimedOut {
        /// The command line.
        command: String,
        /// The time limit.
        timeout: Duration,
        /// The tail of what it printed before.
        output: String,
    },
    /// A service did not start (exited early, or was not ready in time).
    #[error("{service} failed to start: {reason}\n{logs}")]
    StartFailed {
        /// "RabbitMQ" or "PostgreSQL".
        service: &'static str,
        /// Why: exit status, time-out, failing check.
        reason: String,
        /// The tails of the service's log files.
        logs: String,
    },
    /// The environment cannot host the service (users, paths, permissions).
    #[error("{0}")]
    Setup(String),
}

/// Shorthand for this crate's results.
pub type Result<T, E = InfraError> = std::result::Result<T, E>;

/// How many log lines an error message quotes.
const TAIL_LINES: usize = 40;

/// `<pid>-<n>`: unique among the instances of all processes on this machine.
fn unique_suffix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// An unguessable token made of `[0-9A-F]` (for the Erlang cookie).
fn random_token() -> String {
    (0..3u32).fold(String::new(), |mut out, i| {
        let _ = write!(out, "{:016X}", random_u64(i));
        out
    })
}

/// Whether this process runs as root (euid 0).
fn is_root() -> bool {
    match std::fs::metadata("/proc/self") {
        Ok(m) => m.uid() == 0,
        Err(_) => Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false),
    }
}

/// `n` distinct TCP ports that are free on 127.0.0.1 right now, chosen at
/// random *outside* the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 32768-60999 by default).
///
/// Outside, because a port from that range can be taken while its service
/// is down (say during `restart()`) as the source port of any outgoing
/// connection, and a client retrying `connect()` to such a port can even
/// connect to itself (TCP self-connect) and then hold it: the service
/// could not come back on its port.
///
/// All are bound at once (so they differ) and released on return. Another
/// process may still take one before the service binds it; the callers
/// retry their first start with fresh ports when a port turns out taken.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    // Ports of services commonly found on such machines (RabbitMQ, epmd,
    // PostgreSQL and friends), never handed out even when free.
    const AVOID: &[u16] = &[15672, 15692, 25672, 35672, 5432, 5433, 5672, 4369, 27017];
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|f| f.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    // The wider of the two gaps around the ephemeral range (above 10000).
    let below = (10_000u32, lo.saturating_sub(1));
    let above = (hi.saturating_add(1), 65_535u32);
    let width = |r: (u32, u32)| r.1.saturating_sub(r.0);
    let (start, end) = if width(below) >= width(above) {
        below
    } else {
        above
    };
    let mut listeners: Vec<TcpListener> = Vec::new();
    let mut ports: Vec<u16> = Vec::new();
    if width((start, end)) >= 1000 {
        for i in 0..2000u32 {
            if ports.len() == n {
                break;
            }
            let candidate = start + (random_u64(i) % u64::from(end - start + 1)) as u32;
            let Ok(port) = u16::try_from(candidate) else {
                continue;
            };
            if AVOID.contains(&port) || ports.contains(&port) {
                continue;
            }
            if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                listeners.push(l);
                ports.push(port);
            }
        }
    }
    // Odd port ranges: let the kernel choose (inside the ephemeral range).
    while ports.len() < n {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| io_err("binding 127.0.0.1:0 to find a free port", e))?;
        let port = l
            .local_addr()
            .map_err(|e| io_err("reading a bound port", e))?
            .port();
        listeners.push(l);
        ports.push(port);
    }
    Ok(ports)
}

/// A random number (`salt` varies it within one call site).
fn random_u64(salt: u32) -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u32(salt);
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
/// (A connection from a socket to itself, possible when nothing listens
/// and the kernel picks `port` as the source port, does not count.)
fn tcp_accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
        Ok(s) => s.local_addr().ok() != s.peer_addr().ok(),
        Err(_) => false,
    }
}

fn io_err(context: impl Into<String>, source: io::Error) -> InfraError {
    InfraError::Io {
        context: context.into(),
        source,
    }
}

/// The first of `candidates` that is an executable file, else the program
/// found on `PATH` under `name`.
fn find_program(name: &str, candidates: &[&str]) -> Result<PathBuf> {
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    for c in candidates {
        let p = Path::new(c);
        if is_exec(p) {
            return Ok(p.to_path_buf());
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if is_exec(&p) {
                return Ok(p);
            }
        }
    }
    let mut looked_in = candidates.join(", ");
    if !looked_in.is_empty() {
        looked_in.push_str(", ");
    }
    looked_in.push_str("$PATH");
    Err(InfraError::MissingBinary {
        program: name.to_string(),
        looked_in,
    })
}

/// Quote `s` for a POSIX shell, if needed.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The command line of `cmd`, for messages.
fn describe(cmd: &Command) -> String {
    let mut out = shell_quote(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        out.push(' ');
        out.push_str(&shell_quote(&a.to_string_lossy()));
    }
    out
}

/// The last `lines` lines of `text`.
fn tail_str(text: &str, lines: usize) -> String {
    let text = text.trim_end();
    let mut start = text.len();
    for _ in 0..lines {
        match text[..start].rfind('\n') {
            Some(i) => start = i,
            None => {
                start = 0;
                break;
            }
        }
    }
    text[start..].trim_start_matches('\n').to_string()
}

/// The last `lines` lines of the file at `path` (reads at most its last
/// 64 KiB), or a note saying why there is nothing.
fn tail_file(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(s) if s.trim().is_empty() => "(empty)".to_string(),
        Ok(s) => tail_str(&s, lines),
        Err(e) => format!("(cannot read: {e})"),
    }
}

/// The tails of `files`, each under a header naming it.
fn tails(files: &[&Path]) -> String {
    let mut out = String::new();
    for f in files {
        let _ = writeln!(
            out,
            "--- last lines of {} ---\n{}",
            f.display(),
            tail_file(f, TAIL_LINES)
        );
    }
    out
}

/// Stderr then stdout of a finished command, both tailed, for messages.
fn output_tail(stdout: &[u8], stderr: &[u8]) -> String {
    let mut out = String::new();
    for (name, bytes) in [("stderr", stderr), ("stdout", stdout)] {
        let text = String::from_utf8_lossy(bytes);
        if !text.trim().is_empty() {
            let _ = writeln!(
                out,
                "--- {name} (tail) ---\n{}",
                tail_str(&text, TAIL_LINES)
            );
        }
    }
    if out.is_empty() {
        out.push_str("(no output)");
    }
    out
}

/// Spawn `cmd`, mapping "not found" to [`InfraError::MissingBinary`].
fn spawn(cmd: &mut Command) -> Result<Child> {
    cmd.spawn().map_err(|e| {
        let program = Path::new(cmd.get_program());
        // NotFound may also mean a missing working directory.
        let program_missing = program.components().count() == 1 || !program.exists();
        if e.kind() == io::ErrorKind::NotFound && program_missing {
            InfraError::MissingBinary {
                program: cmd.get_program().to_string_lossy().into_owned(),
                looked_in: "the given path".to_string(),
            }
        } else {
            io_err(format!("starting `{}`", describe(cmd)), e)
        }
    })
}

/// Run `cmd` to completion in its own process group, with captured output
/// and no stdin; kill the whole group if it runs longer than `timeout`.
fn run(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let command = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = spawn(&mut cmd)?;
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    for (is_err, pipe) in [
        (
            false,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            true,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ] {
        if let Some(mut pipe) = pipe {
            let tx = tx.clone();
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                let _ = tx.send((is_err, buf));
            });
        }
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                kill_group(child.id());
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                kill_group(child.id());
                let _ = child.wait();
                return Err(io_err(format!("waiting for `{command}`"), e));
            }
        }
    };
    // Collect the output; a left-over grandchild may keep a pipe open, so
    // do not wait for it for long.
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let grace = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 {
        let left = grace.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, b)) => stderr = b,
            Ok((false, b)) => stdout = b,
            Err(_) => break,
        }
    }
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(InfraError::CommandTimedOut {
            command,
            timeout,
            output: output_tail(&stdout, &stderr),
        }),
    }
}

/// [`run`], failing unless the command exits 0; returns its stdout.
fn run_ok(cmd: Command, timeout: Duration) -> Result<String> {
    let command = describe(&cmd);
    let out = run(cmd, timeout)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(InfraError::CommandFailed {
            command,
            status: describe_status(out.status),
            output: output_tail(&out.stdout, &out.stderr),
        })
    }
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// SIGKILL every process of process group `pgid` (ignoring errors: the
/// group may be gone already).
fn kill_group(pgid: u32) {
    signal_group(pgid, "9");
}

/// Send signal `sig` (a number) to process group `pgid`.
fn signal_group(pgid: u32, sig: &str) {
    if pgid <= 1 {
        return;
    }
    let _ = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("kill -{sig} -\"$1\" 2>/dev/null"))
        .arg("sh")
        .arg(pgid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Wait up to `timeout` for `child` to exit; `None` if it still runs.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
}

/// Kill `child`'s process group (it must lead one) and reap it.
///
/// Also waits (at most 10 s) until no other member of the group is alive:
/// the leader may be reaped while a member (the Erlang VM under the start
/// script) is still exiting and holding its ports.
fn kill_and_reap(child: &mut Child) {
    let pgid = child.id();
    kill_group(pgid);
    let _ = child.kill();
    let _ = wait_timeout(child, Duration::from_secs(10));
    wait_group_gone(pgid, Duration::from_secs(10));
}

/// Wait until process group `pgid` has no live (non-zombie) member, or
/// `timeout` passes; SIGKILL it again every second meanwhile.
fn wait_group_gone(pgid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut next_kill = Instant::now() + Duration::from_secs(1);
    while group_alive(pgid) && Instant::now() < deadline {
        if Instant::now() >= next_kill {
            kill_group(pgid);
            next_kill += Duration::from_secs(1);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Whether any process of group `pgid` is alive. A zombie counts as dead
/// only once all its threads are gone: a multi-threaded process (the
/// Erlang VM) shows as zombie as soon as its main thread exits, while the
/// other threads still hold its files and ports.
fn group_alive(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let is_pid = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            return false;
        }
        match proc_stat(&e.path().join("stat")) {
            Some((_, pgrp)) if pgrp != pgid => false,
            Some((state, _)) if state != 'Z' && state != 'X' => true,
            // A zombie main thread: alive while another thread is.
            Some(_) => std::fs::read_dir(e.path().join("task")).is_ok_and(|tasks| {
                tasks.flatten().any(|t| {
                    proc_stat(&t.path().join("stat"))
                        .is_some_and(|(state, _)| state != 'Z' && state != 'X')
                })
            }),
            None => false,
        }
    })
}

/// State and process group from a `/proc/.../stat` file
/// ("pid (comm) state ppid pgrp ..."; comm may contain spaces or ')').
fn proc_stat(path: &Path) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// A `/bin/sh` that blocks reading a pipe whose only writer is this process
/// and runs a cleanup script when the pipe closes, i.e. when this process
/// ends, however it ends. It lives in its own process group so that a
/// Ctrl-C or a group kill aimed at the tests does not take it down first.
///
/// Dropping (or [`Watchdog::disarm`]) kills it without running the script:
/// the owner's `Drop` does the cleanup itself.
#[derive(Debug)]
struct Watchdog {
    child: Child,
    _pipe: Option<ChildStdin>,
}

impl Watchdog {
    /// `script` runs as `sh -c script sh args...` after end-of-file.
    fn spawn(script: &str, args: &[&OsStr], cwd: &Path) -> Result<Watchdog> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("read _ignored; {script}"))
            .arg("sh")
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let mut child = spawn(&mut cmd)?;
        match child.stdin.take() {
            Some(pipe) => Ok(Watchdog {
                child,
                _pipe: Some(pipe),
            }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(InfraError::Setup("watchdog has no stdin pipe".into()))
            }
        }
    }

    fn disarm(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Close the pipe, as this process's exit would, and wait (at most
    /// `timeout`) for the cleanup script to finish.
    #[cfg(test)]
    fn trigger(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self._pipe = None;
        wait_timeout(&mut self.child, timeout)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_str_keeps_last_lines() {
        assert_eq!(tail_str("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_str("a\nb\nc", 5), "a\nb\nc");
        assert_eq!(tail_str("", 3), "");
    }

    #[test]
    fn shell_quote_quotes_when_needed() {
        assert_eq!(shell_quote("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(3).unwrap();
        assert_eq!(ports.len(), 3);
        assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let bounds: Vec<u16> = range
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        assert!(
            ports.iter().all(|p| !(bounds[0]..=bounds[1]).contains(p)),
            "{ports:?} inside the ephemeral range {bounds:?}"
        );
        assert_eq!(random_token().len(), 48);
    }

    #[test]
    fn run_reports_failures_and_time_outs() {
        let mut ok = Command::new("/bin/sh");
        ok.args(["-c", "echo hi"]);
        assert_eq!(run_ok(ok, Duration::from_secs(10)).unwrap(), "hi\n");

        let mut bad = Command::new("/bin/sh");
        bad.args(["-c", "echo oops >&2; exit 3"]);
        let err = run_ok(bad, Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exit code 3") && err.contains("oops"), "{err}");

        let mut slow = Command::new("/bin/sh");
        slow.args(["-c", "sleep 30"]);
        let t = Instant::now();
        let err = run_ok(slow, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, InfraError::CommandTimedOut { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));

        let missing = Command::new("/nonexistent/buildbus-no-such-program");
        let err = run_ok(missing, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("ensure-deps.sh"), "{err}");
    }
}
