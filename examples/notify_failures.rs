//! "Tell me when my tree breaks": failed builds and failed (or flaky) tests of one tree.
//!
//! ```sh
//! cargo run --example notify_failures -- --url amqp://guest:guest@127.0.0.1:5672/%2f \
//!     --tree acme [--notify 'mail -s "build broke" team@example.com']
//! ```
//!
//! - A durable subscription (label `notify-<tree>`): failures that happen while this is
//!   not running are still notified when it starts again.
//! - The tree filter is a binding, and `on_build` only takes finished builds, so the
//!   broker sends finished builds and test messages of this tree only; whether a build
//!   *failed* is decided here (the result is in the routing key, but the library's
//!   filters stop at the Pulse dimensions).
//! - `--notify CMD` runs `sh -c CMD` with the text on stdin. If it fails, the callback
//!   returns the error: the monitor retries it and, if it keeps failing, dead-letters
//!   the message (`queue/buildbus/dead-letter`) instead of losing it silently.
//! - Delivery is at least once: message ids already notified are remembered, so a
//!   redelivery after a reconnect does not notify twice.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use buildbus::consumers::client::{Message, MonitorBuilder};
use buildbus::model::BuildResult;

/// The last message ids notified (a bounded memory).
#[derive(Default)]
struct Notified {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Notified {
    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn remember(&mut self, id: &str) {
        if self.set.insert(id.to_string()) {
            self.order.push_back(id.to_string());
        }
        if self.order.len() > 10_000 {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// Notifies `text` once per message: a retry after a failed notification tries
/// again, a redelivery after a successful one does not.
fn once(seen: &Mutex<Notified>, m: &Message, cmd: Option<&str>, text: &str) -> Result<(), String> {
    let id = m.message_id().unwrap_or_default();
    if seen.lock().map(|s| s.contains(id)).unwrap_or(false) {
        return Ok(());
    }
    notify(cmd, text)?;
    if let Ok(mut s) = seen.lock() {
        s.remember(id);
    }
    Ok(())
}

fn notify(cmd: Option<&str>, text: &str) -> Result<(), String> {
    println!("{text}");
    let Some(cmd) = cmd else { return Ok(()) };
    let mut child = Command::new("/bin/sh")
        .args(["-c", cmd])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(format!("{text}\n").as_bytes());
    }
    match child.wait() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("{cmd:?} exited with {s}")),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut url = std::env::var("BUILDBUS_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let (mut tree, mut cmd) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--url" => url = value()?,
            "--tree" => tree = Some(value()?),
            "--notify" => cmd = Some(value()?),
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    let tree = tree.ok_or("--tree TREE is required")?;
    let cmd: Arc<Option<String>> = Arc::new(cmd);
    let seen = Arc::new(Mutex::new(Notified::default()));
    let (cmd_b, cmd_t) = (cmd.clone(), cmd.clone());
    let (seen_b, seen_t) = (seen.clone(), seen.clone());

    let monitor = MonitorBuilder::new(&url)
        .label(format!(
            "notify-{}",
            tree.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ))
        .trees([tree.clone()])
        .retries(5)
        .retry_delay(Duration::from_secs(1))
        .on_build(move |m, build| -> Result<(), String> {
            if build.result == Some(BuildResult::Success) {
                return Ok(());
            }
            let text = format!(
                "BUILD {} of {} on {}: {}{}\n  {}",
                build.result.map_or("?", |r| r.as_str()).to_uppercase(),
                build.common.tree.as_deref().unwrap_or("-"),
                build.common.platform.as_deref().unwrap_or("-"),
                build.targets.join(" "),
                build
                    .failure
                    .as_deref()
                    .map(|f| format!(" ({f})"))
                    .unwrap_or_default(),
                build.common.build_id,
            );
            once(&seen_b, m, cmd_b.as_deref(), &text)
        })
        .on_test(move |m, test| -> Result<(), String> {
            if test.status == "passed" {
                return Ok(());
            }
            let text = format!(
                "TEST {} {} on {} (build {})",
                test.test,
                test.status.to_uppercase(),
                test.common.platform.as_deref().unwrap_or("-"),
                test.common.build_id
            );
            once(&seen_t, m, cmd_t.as_deref(), &text)
        })
        .start()?;

    if !monitor.wait_ready(Duration::from_secs(30)) {
        eprintln!("not connected yet; still trying (is the broker at {url}?)");
    }
    let stopper = monitor.stopper();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for Ctrl-C");
        if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
            stopper.stop();
        }
    });
    while !monitor.join(Duration::from_secs(1)) {}
    let s = monitor.stats();
    eprintln!(
        "{} messages, {} notifications failed, {} dead-lettered",
        s.received,
        s.errors + s.panics,
        s.dead_lettered
    );
    monitor.stop()?;
    Ok(())
}
