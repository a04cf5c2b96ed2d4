//! `buildbus-testkit rabbitmq`: the URL comes first on stdout, the node accepts AMQP
//! connections, and the end of stdin or SIGTERM stops it and removes its folder.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Starts `buildbus-testkit rabbitmq --dir DIR`; gives the child, the first line of its
/// stdout and the rest of its stdout.
fn start(dir: &Path) -> (Child, String, BufReader<ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_buildbus-testkit"))
        .args(["rabbitmq", "--dir"])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run buildbus-testkit");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut url = String::new();
    out.read_line(&mut url).unwrap();
    (child, url.trim_end().to_string(), out)
}

/// The AMQP port of `amqp://guest:guest@127.0.0.1:PORT/%2f`.
fn port_of(url: &str) -> u16 {
    url.strip_prefix("amqp://guest:guest@127.0.0.1:")
        .and_then(|rest| rest.strip_suffix("/%2f"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a private node's URL: {url:?}"))
}

fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

fn node_folders(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("rabbitmq-"))
        .collect()
}

fn wait(child: &mut Child, limit: Duration) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("buildbus-testkit still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs one node until `stop` is done to its process; checks it went away cleanly.
fn run_and_stop(stop: impl FnOnce(&mut Child)) {
    let base = tempfile::tempdir().unwrap();
    let (mut child, url, mut rest) = start(base.path());
    let port = port_of(&url);
    assert!(accepts(port), "nothing on the AMQP port of {url}");
    assert_eq!(node_folders(base.path()).len(), 1);
    stop(&mut child);
    let status = wait(&mut child, Duration::from_secs(60));
    assert!(status.success(), "{status}");
    let mut more = String::new();
    rest.read_to_string(&mut more).unwrap();
    assert_eq!(more, "", "only the URL on stdout");
    assert!(!accepts(port), "the node still accepts connections");
    assert!(
        node_folders(base.path()).is_empty(),
        "node folder left behind"
    );
}

#[test]
fn end_of_stdin_stops_the_node() {
    run_and_stop(|child| drop(child.stdin.take()));
}

#[test]
fn sigterm_stops_the_node() {
    run_and_stop(|child| {
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: sends a signal to our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    });
}
