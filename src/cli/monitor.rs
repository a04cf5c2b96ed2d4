//! `buildbus monitor`: a filtered subscription from the command line. One readable line
//! per message, JSON lines, or a command run per message (so a team can subscribe in
//! any language). Built on [`crate::consumers::client`]; Ctrl-C stops it cleanly.

use std::io::{ErrorKind, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;

use super::{Cli, FieldArgs};
use crate::consumers::client::{Message, MonitorBuilder, Stopper, DEFAULT_MAX_LENGTH};
use crate::model::{Envelope, Kind, Payload};

const EXAMPLES: &str = "\
Examples:
  # Every message of tree acme, one line each, until Ctrl-C
  buildbus monitor --url amqp://guest:guest@127.0.0.1:5672/%2f --tree acme
  # Builds and tests of two platforms, as JSON lines (one envelope per line)
  buildbus monitor --tree acme --platform k8,linux64 --kind build,test --json
  # Tags: (nightly AND asan) OR release
  buildbus monitor --tags nightly,asan --tags release
  # A durable subscription that keeps messages while it is not running, with a
  # script run per message (envelope on stdin, BUILDBUS_* variables set)
  buildbus monitor --label notify --tree acme --kind build --exec ./on-build.sh
  # The queue and the bindings it would declare, without connecting
  buildbus monitor --label notify --tree acme --kind build --dry-run

Filters are pushed into the broker as bindings on the routing keys, and checked again
here: every message shown satisfies every filter. --tree, --platform, --buildtype,
--product, --test and --kind take several values (repeat or use commas): any of them.

--exec runs `sh -c CMD` per message with the envelope's JSON on stdin and these
variables (unset when the message has no value): BUILDBUS_KIND, BUILDBUS_STATE,
BUILDBUS_MESSAGE_ID, BUILDBUS_ENTITY_ID, BUILDBUS_EXCHANGE, BUILDBUS_ROUTING_KEY,
BUILDBUS_BUILD_ID, BUILDBUS_SYSTEM, BUILDBUS_TREE, BUILDBUS_PLATFORM,
BUILDBUS_BUILDTYPE, BUILDBUS_PRODUCT, BUILDBUS_REVISION, BUILDBUS_BRANCH, BUILDBUS_TAGS
(comma list), BUILDBUS_RESULT (builds), BUILDBUS_REDELIVERED (0 or 1),
BUILDBUS_ATTEMPT. A non-zero exit status (or a command running past --exec-timeout)
is a failed callback: retried --retries times, then the message is dead-lettered
(queue/buildbus/dead-letter, with an x-buildbus-error header). A buildbus command run
from --exec reads BUILDBUS_TREE etc. as its own field overrides: unset them there if
that is not wanted.

With --label the queue is durable (queue/<user>/<label>, at most --max-length
messages, the oldest dead-lettered beyond); without, it goes away with the monitor.
A broker that goes away is reconnected to with backoff (for ever, or until
--connect-timeout SECS without a connection). Exit status: 0 when stopped (Ctrl-C,
SIGTERM, --exit-after), 1 when the broker refused the subscription (wrong password,
missing vhost, refused permission: at once) or --connect-timeout passed, 2 on usage
errors.";

/// Subscribe with filters: print each message, or run a command per message.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct MonitorArgs {
    /// Broker URL (default: [bus] url of the config).
    #[arg(long, env = "BUILDBUS_URL", value_name = "URL")]
    pub url: Option<String>,
    /// A durable subscription: queue queue/<user>/<label>, kept while not running.
    #[arg(long, value_name = "LABEL")]
    pub label: Option<String>,
    /// Only these trees.
    #[arg(long = "tree", value_delimiter = ',', value_name = "TREE")]
    pub trees: Vec<String>,
    /// Only these platforms.
    #[arg(long = "platform", value_delimiter = ',', value_name = "PLATFORM")]
    pub platforms: Vec<String>,
    /// Only these build types.
    #[arg(long = "buildtype", value_delimiter = ',', value_name = "TYPE")]
    pub buildtypes: Vec<String>,
    /// Only these products.
    #[arg(long = "product", value_delimiter = ',', value_name = "PRODUCT")]
    pub products: Vec<String>,
    /// Only these tests (narrows test messages; other kinds have no test).
    #[arg(long = "test", value_delimiter = ',', value_name = "TEST")]
    pub tests: Vec<String>,
    /// Only messages carrying all of these tags (comma list); repeat for alternatives.
    #[arg(long = "tags", value_name = "TAG,TAG...")]
    pub tags: Vec<String>,
    /// Only these kinds: build, task, test, artifact, log.
    #[arg(long = "kind", value_delimiter = ',', value_parser = parse_kind, value_name = "KIND")]
    pub kinds: Vec<Kind>,
    /// One JSON envelope per line instead of a readable line.
    #[arg(long, conflicts_with = "exec")]
    pub json: bool,
    /// Run `sh -c CMD` per message (envelope on stdin, BUILDBUS_* variables).
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Longest run of one --exec command, in seconds (then it is killed: a failure).
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    pub exec_timeout: u64,
    /// Messages handled at once (1 keeps the queue's order).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Unacked deliveries the broker may push ahead.
    #[arg(long, default_value_t = 100)]
    pub prefetch: u16,
    /// Runs of a failed callback after the first, before dead-lettering.
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Wait before the first retry (doubling), in milliseconds.
    #[arg(long, default_value_t = 200, value_name = "MS")]
    pub retry_delay_ms: u64,
    /// Length limit of the durable queue (--label).
    #[arg(long, default_value_t = DEFAULT_MAX_LENGTH, value_name = "N")]
    pub max_length: u64,
    /// Stop after N messages were handled.
    #[arg(long, value_name = "N")]
    pub exit_after: Option<u64>,
    /// Print the queue and its bindings, then exit without connecting.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::parse(s).ok_or_else(|| format!("{s:?}: one of build, task, test, artifact, log"))
}

/// `s` cut to `n` characters, with `…` when cut.
fn cut(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// One readable line for a message.
pub fn line(env: &Envelope) -> String {
    let c = env.payload.common();
    let what = match &env.payload {
        Payload::Build(b) => {
            let mut s = b.state.as_str().to_string();
            if let Some(r) = b.result {
                s.push(' ');
                s.push_str(r.as_str());
            }
            if let Some(code) = b.exit_code {
                s.push_str(&format!(" (exit {code}"));
                if let Some(ms) = b.duration_ms {
                    s.push_str(&format!(", {:.1} s", ms as f64 / 1000.0));
                }
                s.push(')');
            }
            if !b.targets.is_empty() {
                s.push(' ');
                s.push_str(&cut(&b.targets.join(" "), 60));
            }
            s
        }
        Payload::Task(t) => format!("{} {} {}", t.outcome.as_str(), t.target, t.task),
        Payload::Test(t) => format!("{} {} ({})", t.status, t.test, t.scope),
        Payload::Artifact(a) => format!("{} {}", a.kind, a.path),
        Payload::Log(l) => format!(
            "{} {}",
            l.level.as_str(),
            cut(l.message.lines().next().unwrap_or(""), 120)
        ),
    };
    let v = |o: &Option<Arc<str>>| o.as_deref().unwrap_or("-").to_string();
    let when = c.timestamp.as_deref().unwrap_or(&env.meta.sent);
    format!(
        "{when} {:<8} {what}  [{}/{}/{}/{}] {}",
        env.kind().as_str(),
        v(&c.tree),
        v(&c.platform),
        v(&c.buildtype),
        v(&c.product),
        c.build_id
    )
}

/// The `BUILDBUS_*` variables of `--exec` for one message (`None`: unset it).
pub fn exec_vars(msg: &Message, env: &Envelope) -> Vec<(&'static str, Option<String>)> {
    let c = env.payload.common();
    let result = match &env.payload {
        Payload::Build(b) => b.result.map(|r| r.as_str().to_string()),
        _ => None,
    };
    vec![
        ("BUILDBUS_KIND", Some(env.kind().to_string())),
        ("BUILDBUS_STATE", Some(env.meta.state.to_string())),
        ("BUILDBUS_MESSAGE_ID", Some(env.meta.message_id.clone())),
        ("BUILDBUS_ENTITY_ID", Some(env.meta.entity_id.clone())),
        ("BUILDBUS_EXCHANGE", Some(msg.exchange.clone())),
        ("BUILDBUS_ROUTING_KEY", Some(msg.routing_key.clone())),
        ("BUILDBUS_BUILD_ID", Some(c.build_id.to_string())),
        ("BUILDBUS_SYSTEM", Some(c.system.to_string())),
        ("BUILDBUS_TREE", c.tree.as_deref().map(str::to_string)),
        (
            "BUILDBUS_PLATFORM",
            c.platform.as_deref().map(str::to_string),
        ),
        (
            "BUILDBUS_BUILDTYPE",
            c.buildtype.as_deref().map(str::to_string),
        ),
        ("BUILDBUS_PRODUCT", c.product.as_deref().map(str::to_string)),
        (
            "BUILDBUS_REVISION",
            c.revision.as_deref().map(str::to_string),
        ),
        ("BUILDBUS_BRANCH", c.branch.as_deref().map(str::to_string)),
        (
            "BUILDBUS_TAGS",
            (!c.tags.is_empty()).then(|| c.tags.join(",")),
        ),
        ("BUILDBUS_RESULT", result),
        (
            "BUILDBUS_REDELIVERED",
            Some(if msg.redelivered { "1" } else { "0" }.into()),
        ),
        ("BUILDBUS_ATTEMPT", Some(msg.attempt.to_string())),
    ]
}

/// Runs `cmd` for one message; an exit status other than 0 is an error.
fn exec(cmd: &str, msg: &Message, env: &Envelope, timeout: Duration) -> Result<(), String> {
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(cmd).stdin(Stdio::piped());
    for (k, v) in exec_vars(msg, env) {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let mut child = c.spawn().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let mut body = msg.body.clone();
        body.push(b'\n');
        // A command that does not read its stdin must not block us: write aside.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&body);
        });
    }
    let start = Instant::now();
    let mut nap = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => return Err(format!("{cmd:?} exited with {s}")),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{cmd:?} ran over {} s and was killed",
                    timeout.as_secs()
                ));
            }
            Ok(None) => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    }
}

/// Writes one line to stdout; a closed stdout (`| head`) stops the monitor.
fn print(text: &str, stopper: &OnceLock<Stopper>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
        if e.kind() == ErrorKind::BrokenPipe {
            if let Some(s) = stopper.get() {
                s.stop();
            }
        }
    }
}

pub fn run(cli: &Cli, a: &MonitorArgs) -> anyhow::Result<ExitCode> {
    let (cfg, _) = super::context(cli.config.as_deref(), &FieldArgs::default())?;
    let url = a.url.clone().unwrap_or(cfg.bus.url.clone());
    let mut b = MonitorBuilder::new(&url)
        .exchange_prefix(&cfg.bus.exchange_prefix)
        .trees(a.trees.iter().cloned())
        .platforms(a.platforms.iter().cloned())
        .buildtypes(a.buildtypes.iter().cloned())
        .products(a.products.iter().cloned())
        .tests(a.tests.iter().cloned())
        .kinds(a.kinds.iter().copied())
        .workers(a.workers)
        .prefetch(a.prefetch)
        .retries(a.retries)
        .retry_delay(Duration::from_millis(a.retry_delay_ms))
        .max_length(a.max_length);
    for set in &a.tags {
        b = b.build_tags(set.split(',').map(str::trim).filter(|t| !t.is_empty()));
    }
    if let Some(l) = &a.label {
        b = b.label(l);
    }
    if let Some(t) = cli.connect_timeout() {
        b = b.connect_timeout(t);
    }
    b = b.tls(cli.broker_tls(&cfg)?);
    let stopper: Arc<OnceLock<Stopper>> = Arc::new(OnceLock::new());
    let handled = Arc::new(AtomicU64::new(0));
    let (json, command, timeout, exit_after) = (
        a.json,
        a.exec.clone(),
        Duration::from_secs(a.exec_timeout),
        a.exit_after,
    );
    {
        let (stopper, handled) = (stopper.clone(), handled.clone());
        b = b.on_match(move |msg, env| -> Result<(), String> {
            match &command {
                Some(cmd) => exec(cmd, msg, env, timeout)?,
                None if json => {
                    let body = String::from_utf8_lossy(&msg.body);
                    let text = match body.contains('\n') {
                        false => body.trim().to_string(),
                        true => serde_json::from_slice::<serde_json::Value>(&msg.body)
                            .map(|v| v.to_string())
                            .unwrap_or_else(|_| body.replace('\n', " ")),
                    };
                    print(&text, &stopper);
                }
                None => print(&line(env), &stopper),
            }
            let n = handled.fetch_add(1, Ordering::Relaxed) + 1;
            if exit_after.is_some_and(|max| n >= max) {
                if let Some(s) = stopper.get() {
                    s.stop();
                }
            }
            Ok(())
        });
    }
    if a.dry_run {
        println!(
            "queue: {}",
            b.queue_name()?
                .unwrap_or_else(|| "(exclusive, named by the server)".into())
        );
        for bd in b.bindings()? {
            println!("bind {} {}", bd.exchange, bd.routing_key);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let monitor = b.start()?;
    let _ = stopper.set(monitor.stopper());
    if exit_after == Some(0) {
        monitor.stopper().stop();
    }
    eprintln!(
        "monitor: {} bindings on {}",
        monitor.bindings().len(),
        crate::bus::redact_url(&url)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime for signals")?;
    // One listener each for the whole run: a signal that arrives while no listener
    // exists is lost, so they must not be re-created per loop turn.
    use tokio::signal::unix::{signal, SignalKind};
    let (mut int, mut term) = rt.block_on(async {
        (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        )
    });
    async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
        match s.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let interrupted = rt.block_on(async {
        let mut shown: Option<String> = None;
        loop {
            let q = monitor.queue();
            if q.is_some() && q != shown {
                eprintln!("monitor: consuming {}", q.as_deref().unwrap_or(""));
                shown = q;
            }
            if !monitor.is_alive() || monitor.stopper().is_stopping() {
                return false;
            }
            tokio::select! {
                _ = next(&mut int) => return true,
                _ = next(&mut term) => return true,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    if interrupted {
        eprintln!("monitor: stopping (the callbacks in hand finish; Ctrl-C again to quit at once)");
        monitor.stopper().stop();
        rt.block_on(async {
            loop {
                tokio::select! {
                    _ = next(&mut int) => std::process::exit(130),
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {
                        if !monitor.is_alive() { return; }
                    }
                }
            }
        });
    }
    let result = monitor.stop();
    let s = monitor.stats();
    eprintln!(
        "monitor: {} messages handled, {} callbacks failed ({} panics), {} retries, {} dead-lettered, {} reconnects",
        s.handled,
        s.errors + s.panics,
        s.panics,
        s.retries,
        s.dead_lettered,
        s.reconnects
    );
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("buildbus: error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_readable() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/bazel/build_fail.json");
        let mut msgs = Vec::new();
        let ctx = std::sync::Arc::new(crate::systems::Context::builtin());
        crate::sources::file::translate_file(&path, None, &ctx, &mut |e| msgs.push(e));
        let last = line(msgs.last().unwrap());
        assert!(last.contains("build    finished failure (exit 1"), "{last}");
        assert!(last.contains("[bep-fixture/k8/fastbuild/bzlws]"), "{last}");
        assert_eq!(cut("abcdef", 3), "abc…");
        assert_eq!(cut("abc", 3), "abc");
    }
}
