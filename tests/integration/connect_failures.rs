//! Connection failures against a real broker: refusals that retrying cannot fix (wrong
//! password, missing vhost, no permission) end `publish`, `monitor` and `dsi` at once
//! with a message naming the broker (password hidden); connection refused is retried
//! until `--connect-timeout`, or for ever without it.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const FIXTURE: &str = "bazel/build_ok.json";

/// What a bounded run of `buildbus` did.
struct Run {
    /// `None`: still running at the limit (then killed).
    status: Option<ExitStatus>,
    stderr: String,
    secs: f64,
}

fn spawn(args: &[&str]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_buildbus"));
    for (k, _) in std::env::vars() {
        if k.starts_with("BUILDBUS_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run buildbus")
}

/// Runs `buildbus args`, killing it after `limit` seconds.
fn run_bounded(args: &[&str], limit: u64) -> Run {
    let start = Instant::now();
    let mut child = spawn(args);
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut finished = false;
    while start.elapsed() < Duration::from_secs(limit) {
        if child.try_wait().expect("try_wait").is_some() {
            finished = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = start.elapsed().as_secs_f64();
    if !finished {
        let _ = child.kill();
    }
    let waited = child.wait().expect("wait");
    let status = finished.then_some(waited);
    Run {
        status,
        stderr: reader.join().unwrap_or_default(),
        secs,
    }
}

/// The three connecting commands, each against `url`.
fn commands(url: &str, dir: &std::path::Path) -> Vec<(&'static str, Vec<String>)> {
    let fixture = fixture(FIXTURE).display().to_string();
    let store = format!("sqlite:{}", dir.join("dsi.db").display());
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        (
            "publish",
            s(&["publish", "--url", url, "--no-checkpoint", &fixture]),
        ),
        ("monitor", s(&["monitor", "--url", url])),
        ("dsi", s(&["dsi", "--url", url, "--store", &store])),
    ]
}

/// Every command fails at once (well within 10 s), non-zero, naming the broker
/// (`host_port`) and, case-insensitively, each of `says`; never showing `secret`.
fn assert_refused(url: &str, host_port: &str, secret: &str, says: &[&str]) {
    let dir = tempdir();
    for (name, args) in commands(url, dir.path()) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = run_bounded(&args, 20);
        let status = r.status.unwrap_or_else(|| {
            panic!(
                "{name}: still running after {:.1} s (retrying a permanent refusal?): {}",
                r.secs, r.stderr
            )
        });
        assert!(!status.success(), "{name}: exit {status}: {}", r.stderr);
        assert!(r.secs < 10.0, "{name}: took {:.1} s: {}", r.secs, r.stderr);
        assert!(
            r.stderr.contains(host_port),
            "{name}: the broker is not named: {}",
            r.stderr
        );
        assert!(
            !r.stderr.contains(secret),
            "{name}: the password shows: {}",
            r.stderr
        );
        let lower = r.stderr.to_lowercase();
        for s in says {
            assert!(lower.contains(s), "{name}: no {s:?} in: {}", r.stderr);
        }
    }
}

fn host_port(url: &str) -> String {
    let after = url.rsplit_once('@').map(|(_, h)| h).unwrap_or(url);
    after.split('/').next().unwrap_or(after).to_string()
}

#[test]
fn a_wrong_password_ends_publish_monitor_and_dsi_at_once() {
    let (url, _) = vhost("authfail");
    let bad = url.replacen("guest:guest@", "guest:WRONGPW@", 1);
    assert_ne!(bad, url);
    assert_refused(&bad, &host_port(&url), "WRONGPW", &["access refused"]);
}

#[test]
fn a_missing_vhost_ends_them_at_once() {
    let (url, _) = vhost("novhost");
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&url);
    let bad = format!("{base}/nosuchvhost");
    assert_refused(
        &bad,
        &host_port(&url),
        "guest:guest",
        &["vhost", "nosuchvhost"],
    );
}

#[test]
fn a_user_without_permission_is_refused_at_once() {
    let (url, vh) = vhost("noperm");
    let user = format!("noperm-{}", std::process::id());
    let deny = format!("denied-{}", std::process::id());
    {
        let node = rabbit().lock().unwrap_or_else(|e| e.into_inner());
        // `user` may not use the vhost at all; `deny` may, but may declare nothing.
        for u in [&user, &deny] {
            let _ = node.rabbitmqctl(&["delete_user", u]);
            node.rabbitmqctl(&["add_user", u, "PW-s3cret"])
                .expect("add_user");
        }
        node.rabbitmqctl(&["set_permissions", "-p", &vh, &deny, "", "", ""])
            .expect("set_permissions");
    }
    let hp = host_port(&url);
    let no_vhost = url.replacen("guest:guest@", &format!("{user}:PW-s3cret@"), 1);
    assert_refused(&no_vhost, &hp, "PW-s3cret", &["not allowed", &vh]);
    let no_declare = url.replacen("guest:guest@", &format!("{deny}:PW-s3cret@"), 1);
    assert_refused(&no_declare, &hp, "PW-s3cret", &["access refused"]);
}

/// A local port nobody listens on, outside the ephemeral range (so a retrying client
/// cannot connect to itself there).
fn dead_port() -> u16 {
    let first = 20_000 + (std::process::id() % 5_000) as u16;
    (first..30_000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port")
}

#[test]
fn connection_refused_is_retried_until_the_connect_timeout() {
    let port = dead_port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let dir = tempdir();
    for (name, args) in commands(&url, dir.path()) {
        let mut all = vec!["--connect-timeout", "2"];
        all.extend(args.iter().map(String::as_str));
        let r = run_bounded(&all, 20);
        let status = r
            .status
            .unwrap_or_else(|| panic!("{name}: did not give up: {}", r.stderr));
        assert!(!status.success(), "{name}: exit {status}: {}", r.stderr);
        assert!(
            (1.5..10.0).contains(&r.secs),
            "{name}: gave up after {:.1} s: {}",
            r.secs,
            r.stderr
        );
        let lower = r.stderr.to_lowercase();
        assert!(lower.contains("gave up"), "{name}: {}", r.stderr);
        assert!(lower.contains("attempts"), "{name}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!("127.0.0.1:{port}")),
            "{name}: {}",
            r.stderr
        );
        assert!(
            r.stderr.matches("retrying").count() + r.stderr.matches("reconnecting").count() >= 2,
            "{name}: a warning per attempt expected: {}",
            r.stderr
        );
    }
}

#[test]
fn connection_refused_is_retried_for_ever_without_a_timeout() {
    let port = dead_port();
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let fixture = fixture(FIXTURE).display().to_string();
    let mut child = spawn(&["publish", "--url", &url, "--no-checkpoint", &fixture]);
    std::thread::sleep(Duration::from_secs(3));
    let still = child.try_wait().expect("try_wait").is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(still, "publish gave up without --connect-timeout");
}
