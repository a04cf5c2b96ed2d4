//! `buildbus-testkit`: the rig's private servers for shell scripts (`scripts/demo.sh`).
//!
//! This binary owns one job per subcommand; today `rabbitmq --dir DIR`: start a private
//! node ([`RabbitNode::start`]), print its AMQP URL as the first and only line of stdout,
//! then wait until stdin reaches end of file or SIGINT/SIGTERM arrives, and stop the node
//! (its `Drop`: the node's processes are killed and its folder removed). Should this
//! process die without that, the node's watchdog does the same.
//!
//! How it waits: once the node runs, SIGINT and SIGTERM are blocked in the main thread
//! before any other thread exists (so in every thread) and taken by one thread with
//! `sigwait`; another thread reads stdin to its end. Whichever comes first tells the main
//! thread, which stops the node. They are blocked only after the start because a signal
//! mask is inherited by the programs a process starts: the node's server must still
//! answer SIGTERM. A signal during the start ends this process at once, and the node's
//! watchdog cleans up. A signal that was ignored when this program started stays
//! ignored, as is the custom (a script's shell does that for `cmd &`, so that Ctrl-C
//! reaches the script, whose trap then closes the pipe).

use std::io::{self, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::thread;

use buildbus_testkit::RabbitNode;
use clap::{Args, Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  # A node for a script: stdin is a pipe the script holds; closing it stops the node
  buildbus-testkit rabbitmq --dir .demo

See scripts/demo.sh. The programs come from Debian packages (scripts/ensure-deps.sh).";

/// Private, throw-away servers for buildbus's demo and scripts (never a system-wide one).
#[derive(Debug, Parser)]
#[command(name = "buildbus-testkit", version, long_about = None, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Rabbitmq(RabbitmqArgs),
}

/// Start a private RabbitMQ node on 127.0.0.1, print its AMQP URL (the first line of
/// stdout), and run it until stdin reaches end of file or SIGINT/SIGTERM arrives; then
/// stop it and remove its folder.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
struct RabbitmqArgs {
    /// Base folder (created if missing): the node lives in a fresh folder under it.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
}

/// Why the node is stopped.
enum Stop {
    StdinClosed,
    Signal(libc::c_int),
}

/// Whether signal `sig` is ignored (`SIG_IGN`), say because it was on entry.
fn ignored(sig: libc::c_int) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// The signals that stop the node: SIGINT and SIGTERM, unless ignored; `None` if both
/// are.
fn stop_signals() -> Option<libc::sigset_t> {
    let wanted: Vec<libc::c_int> = [libc::SIGINT, libc::SIGTERM]
        .into_iter()
        .filter(|&sig| !ignored(sig))
        .collect();
    if wanted.is_empty() {
        return None;
    }
    // SAFETY: sigemptyset initialises the set before sigaddset adds valid signal numbers
    // to it; both only write to the set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in wanted {
            libc::sigaddset(&mut set, sig);
        }
        Some(set)
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and in the threads it starts afterwards),
/// then starts the threads that report a stop: one per `sigwait` (unless both signals
/// are ignored), one per end of stdin.
fn stop_reasons() -> io::Result<mpsc::Receiver<Stop>> {
    let (tx, rx) = mpsc::channel();
    if let Some(set) = stop_signals() {
        // SAFETY: `set` is an initialised signal set; the old mask is not asked for.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let signals = tx.clone();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is an initialised signal set, blocked in every thread,
                // and `sig` a valid place for the answer.
                while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
                let _ = signals.send(Stop::Signal(sig));
            })?;
    }
    thread::Builder::new().name("stdin".into()).spawn(move || {
        // End of file or a read error: either way nobody can tell us more.
        let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
        let _ = tx.send(Stop::StdinClosed);
    })?;
    Ok(rx)
}

fn rabbitmq(a: &RabbitmqArgs) -> Result<(), String> {
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("creating {}: {e}", a.dir.display()))?;
    // The node runs in its own folder: give it an absolute base.
    let base =
        std::fs::canonicalize(&a.dir).map_err(|e| format!("resolving {}: {e}", a.dir.display()))?;
    let node = RabbitNode::start(&base).map_err(|e| format!("starting RabbitMQ: {e}"))?;
    let stop = stop_reasons().map_err(|e| format!("setting up the stop signals: {e}"))?;
    eprintln!(
        "buildbus-testkit: RabbitMQ node {} up on 127.0.0.1:{} (stops at the end of stdin, \
         or on SIGINT/SIGTERM)",
        node.node_name(),
        node.amqp_port()
    );
    let mut out = io::stdout().lock();
    writeln!(out, "{}", node.amqp_url())
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing the URL to stdout: {e}"))?;
    drop(out);
    let why = match stop.recv() {
        Ok(Stop::StdinClosed) | Err(_) => "stdin closed".to_string(),
        Ok(Stop::Signal(libc::SIGINT)) => "SIGINT".to_string(),
        Ok(Stop::Signal(libc::SIGTERM)) => "SIGTERM".to_string(),
        Ok(Stop::Signal(n)) => format!("signal {n}"),
    };
    eprintln!(
        "buildbus-testkit: {why}: stopping node {}",
        node.node_name()
    );
    drop(node);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Rabbitmq(a) => rabbitmq(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("buildbus-testkit: error: {e}");
            ExitCode::FAILURE
        }
    }
}
