//! TLS to the broker: an `amqps://` URL always means TLS with the server certificate
//! verified. Against private RabbitMQ nodes with a TLS listener (a CA, server and client
//! certificates made here with rcgen): every connecting command works with `--ca-file`
//! (or the `[bus]` table) and the broker lists its connection as TLS; a plain port, an
//! untrusted certificate or a missing client certificate end the command at once
//! (exit status 2) with a TLS error naming the broker, password hidden.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use buildbus::bus::topology::DSI_QUEUE;
use buildbus_testkit::rabbitmq::{RabbitNode, TlsListener};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

use crate::harness::*;

const FIXTURE: &str = "bazel/build_ok.json";
const CLIENT_CN: &str = "buildbus test client";

/// A private CA with a server certificate (localhost, 127.0.0.1) and a client one.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn make_pki() -> Pki {
    let dir = tempfile::Builder::new()
        .prefix("pki-")
        .tempdir_in(infra_dir())
        .expect("pki dir");
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write pem");
        p
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "buildbus test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
        .expect("ca certificate");
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names).expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_pem, client_key) = leaf(vec![], CLIENT_CN, ExtendedKeyUsagePurpose::ClientAuth);
    Pki {
        ca: write("ca.pem", ca.pem()),
        server_cert: write("server.pem", server_pem),
        server_key: write("server.key", server_key),
        client_cert: write("client.pem", client_pem),
        client_key: write("client.key", client_key),
        _dir: dir,
    }
}

fn start_tls_node(require_client_cert: bool) -> Mutex<(Pki, RabbitNode)> {
    let pki = make_pki();
    let node = RabbitNode::start_with_tls(
        &infra_dir(),
        TlsListener {
            ca_file: pki.ca.clone(),
            cert_file: pki.server_cert.clone(),
            key_file: pki.server_key.clone(),
            require_client_cert,
        },
    )
    .expect("start RabbitMQ with a TLS listener");
    Mutex::new((pki, node))
}

/// A node with a TLS listener that asks for, but does not require, client certificates.
fn tls_node() -> &'static Mutex<(Pki, RabbitNode)> {
    static NODE: OnceLock<Mutex<(Pki, RabbitNode)>> = OnceLock::new();
    NODE.get_or_init(|| start_tls_node(false))
}

/// A node whose TLS listener refuses clients without a certificate.
fn mtls_node() -> &'static Mutex<(Pki, RabbitNode)> {
    static NODE: OnceLock<Mutex<(Pki, RabbitNode)>> = OnceLock::new();
    NODE.get_or_init(|| start_tls_node(true))
}

/// A fresh vhost on `node`: its `amqps` URL (the TLS listener) and its name.
fn tls_vhost(node: &RabbitNode, name: &str) -> (String, String) {
    let v = format!("{name}-{}", std::process::id());
    vhost_on(node, &v);
    (
        format!("amqps://guest:guest@127.0.0.1:{}/{v}", node.tls_port()),
        v,
    )
}

/// The `ssl` and `peer_cert_subject` of the broker's connections to `vhost`.
fn connections(node: &RabbitNode, vhost: &str) -> Vec<(String, String)> {
    let out = node
        .rabbitmqctl(&[
            "list_connections",
            "--quiet",
            "--no-table-headers",
            "vhost",
            "ssl",
            "peer_cert_subject",
        ])
        .expect("list_connections");
    out.lines()
        .filter_map(|l| {
            let mut cols = l.split('\t');
            let (v, ssl) = (cols.next()?, cols.next()?);
            (v == vhost).then(|| {
                (
                    ssl.trim().to_string(),
                    cols.next().unwrap_or("").to_string(),
                )
            })
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn spawn(args: &[String], stderr: Stdio) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_buildbus"));
    for (k, _) in std::env::vars() {
        if k.starts_with("BUILDBUS_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("run buildbus")
}

/// Runs `buildbus args` for at most `limit` seconds: its exit status (`None`: still
/// running at the limit, then killed) and stderr.
fn run_bounded(args: &[String], limit: u64) -> (Option<ExitStatus>, String) {
    let start = Instant::now();
    let mut child = spawn(args, Stdio::piped());
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
    if !finished {
        let _ = child.kill();
    }
    let waited = child.wait().expect("wait");
    (
        finished.then_some(waited),
        reader.join().unwrap_or_default(),
    )
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Each connecting command against `url`, with `extra` global flags.
fn commands(url: &str, extra: &[String], dir: &Path) -> Vec<(&'static str, Vec<String>)> {
    let fixture = p(&fixture(FIXTURE));
    let store = format!("sqlite:{}", dir.join("dsi.db").display());
    let listen = format!("127.0.0.1:{}", free_port());
    let with = |v: &[&str]| {
        let mut a = s(v);
        a.extend(extra.iter().cloned());
        a
    };
    vec![
        (
            "publish",
            with(&["publish", "--url", url, "--no-checkpoint", &fixture]),
        ),
        ("setup", with(&["setup", "--url", url])),
        ("monitor", with(&["monitor", "--url", url])),
        ("dsi", with(&["dsi", "--url", url, "--store", &store])),
        (
            "bes",
            with(&["bes", "--listen", &listen, "--no-spool", "--url", url]),
        ),
    ]
}

/// Every command ends by itself, failed (exit status 2; the monitor's failures are 1),
/// naming the broker, hiding the password, and saying each of `says`
/// (case-insensitively). With `first_attempt`, without retrying at all.
fn assert_tls_refused(url: &str, extra: &[String], says: &[&str], first_attempt: bool) {
    let dir = tempdir();
    let host_port = url
        .rsplit_once('@')
        .map(|(_, h)| h.split('/').next().unwrap_or(h))
        .expect("host");
    for (name, args) in commands(url, extra, dir.path()) {
        let (status, stderr) = run_bounded(&args, 60);
        let status = status.unwrap_or_else(|| {
            panic!("{name}: still running after 60 s (retrying a TLS failure?): {stderr}")
        });
        let want = if name == "monitor" { 1 } else { 2 };
        assert_eq!(status.code(), Some(want), "{name}: exit {status}: {stderr}");
        assert!(
            stderr.contains(host_port),
            "{name}: broker not named: {stderr}"
        );
        assert!(
            !stderr.contains("guest:guest"),
            "{name}: password shows: {stderr}"
        );
        let lower = stderr.to_lowercase();
        for w in says {
            assert!(lower.contains(w), "{name}: no {w:?} in: {stderr}");
        }
        if first_attempt {
            assert!(!lower.contains("retrying"), "{name}: retried: {stderr}");
        }
    }
}

/// (a) `amqps` against a plain AMQP port: a TLS error, not a plaintext connection.
#[test]
fn amqps_to_a_plain_port_is_a_tls_error() {
    let url = {
        let node = rabbit().lock().unwrap_or_else(|e| e.into_inner());
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", node.amqp_port())
    };
    let pki = make_pki();
    assert_tls_refused(
        &url,
        &s(&["--ca-file", &p(&pki.ca)]),
        &["tls", "does not speak tls"],
        true,
    );
}

/// (c) A certificate from a CA the system does not trust, and no `--ca-file`.
#[test]
fn an_untrusted_server_certificate_is_refused() {
    let url = {
        let g = tls_node().lock().unwrap_or_else(|e| e.into_inner());
        tls_vhost(&g.1, "tls-untrusted").0
    };
    assert_tls_refused(&url, &[], &["tls", "not trusted", "--ca-file"], true);
}

/// Spawns `args`, waits until the broker lists a connection to `vhost`, checks they
/// are all TLS, and stops the command; returns the peer certificate subjects.
fn connected_over_tls(node: &RabbitNode, vhost: &str, name: &str, args: &[String]) -> Vec<String> {
    let mut child = spawn(args, Stdio::null());
    let mut rows = Vec::new();
    let up = wait_until(30, || {
        rows = connections(node, vhost);
        !rows.is_empty()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "{name}: no connection to vhost {vhost} within 30 s");
    for (ssl, _) in &rows {
        assert_eq!(ssl, "true", "{name}: a connection without TLS: {rows:?}");
    }
    rows.into_iter().map(|(_, subject)| subject).collect()
}

/// (b) publish, dsi, monitor and bes over TLS with `--ca-file` (or BUILDBUS_CA_FILE,
/// or `[bus] ca_file` of a config): the broker lists the connections as TLS and the
/// messages arrive.
#[test]
fn every_command_speaks_tls_with_the_ca_file() {
    let g = tls_node().lock().unwrap_or_else(|e| e.into_inner());
    let (pki, node) = (&g.0, &g.1);
    let (url, vhost) = tls_vhost(node, "tls-ok");
    let dir = tempdir();
    let ca = s(&["--ca-file", &p(&pki.ca)]);
    let queued = || node.queue_message_count(&vhost, DSI_QUEUE).unwrap_or(0);

    // setup: the topology is declared through the TLS listener.
    let mut args = s(&["setup", "--url", &url]);
    args.extend(ca.iter().cloned());
    let (status, stderr) = run_bounded(&args, 60);
    assert!(status.is_some_and(|s| s.success()), "setup: {stderr}");
    assert_eq!(
        node.queue_message_count(&vhost, DSI_QUEUE).ok(),
        Some(0),
        "setup over TLS did not declare the DSI queue"
    );

    // publish: the messages arrive through the TLS listener.
    let build_ok = p(&fixture(FIXTURE));
    let mut args = s(&["publish", "--url", &url, "--no-checkpoint", &build_ok]);
    args.extend(ca.iter().cloned());
    let (status, stderr) = run_bounded(&args, 60);
    assert!(status.is_some_and(|s| s.success()), "publish: {stderr}");
    let after_publish = queued();
    assert!(after_publish > 0, "publish: nothing queued");

    // The same from a config file naming the CA relative to itself.
    let cfg = dir.path().join("buildbus.toml");
    std::fs::copy(&pki.ca, dir.path().join("my-ca.pem")).expect("copy ca");
    std::fs::write(&cfg, "[bus]\nca_file = \"my-ca.pem\"\n").expect("config");
    let args = s(&[
        "--config",
        &p(&cfg),
        "publish",
        "--url",
        &url,
        "--no-checkpoint",
        &build_ok,
    ]);
    let (status, stderr) = run_bounded(&args, 60);
    assert!(
        status.is_some_and(|s| s.success()),
        "publish (config): {stderr}"
    );
    assert!(
        queued() > after_publish,
        "publish (config): nothing more queued"
    );

    // monitor and dsi stay connected: the broker lists them as TLS.
    let mut monitor = s(&["monitor", "--url", &url]);
    monitor.extend(ca.iter().cloned());
    connected_over_tls(node, &vhost, "monitor", &monitor);
    let store = format!("sqlite:{}", dir.path().join("dsi.db").display());
    let mut dsi = s(&["dsi", "--url", &url, "--store", &store]);
    dsi.extend(ca.iter().cloned());
    connected_over_tls(node, &vhost, "dsi", &dsi);

    // bes (CA from the environment): a replayed Bazel session is published over TLS.
    let before = queued();
    let port = free_port();
    let spool = dir.path().join("spool");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_buildbus"));
    cmd.args([
        "bes",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--url",
        &url,
    ])
    .arg("--spool")
    .arg(&spool)
    .env("BUILDBUS_CA_FILE", &pki.ca)
    .env_remove("BUILDBUS_URL")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut bes = cmd.spawn().expect("buildbus bes");
    let up = wait_until(30, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "bes: not listening on {port}");
    let replay = buildbus(&[
        "bes-replay",
        "--to",
        &format!("http://127.0.0.1:{port}"),
        &p(&fixture("bazel/bes_capture.jsonl")),
    ]);
    let arrived = wait_until(30, || queued() > before);
    let _ = bes.kill();
    let _ = bes.wait();
    assert!(
        replay.status.success(),
        "bes-replay: {}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(arrived, "bes: nothing published over TLS");
}

/// (d) A broker that requires client certificates accepts ours and refuses us without.
#[test]
fn client_certificates_for_brokers_that_require_them() {
    let g = mtls_node().lock().unwrap_or_else(|e| e.into_inner());
    let (pki, node) = (&g.0, &g.1);
    let (url, vhost) = tls_vhost(node, "tls-mtls");
    let ca = s(&["--ca-file", &p(&pki.ca)]);
    let mut with_cert = ca.clone();
    with_cert.extend(s(&[
        "--client-cert",
        &p(&pki.client_cert),
        "--client-key",
        &p(&pki.client_key),
    ]));

    let mut monitor = s(&["monitor", "--url", &url]);
    monitor.extend(with_cert.iter().cloned());
    let subjects = connected_over_tls(node, &vhost, "monitor", &monitor);
    assert!(
        subjects.iter().any(|s| s.contains(CLIENT_CN)),
        "the broker did not see our certificate: {subjects:?}"
    );
    let mut publish = s(&[
        "publish",
        "--url",
        &url,
        "--no-checkpoint",
        &p(&fixture(FIXTURE)),
    ]);
    publish.extend(with_cert.iter().cloned());
    let (status, stderr) = run_bounded(&publish, 60);
    assert!(status.is_some_and(|s| s.success()), "publish: {stderr}");
    assert!(node.queue_message_count(&vhost, DSI_QUEUE).unwrap_or(0) > 0);

    drop(g);
    // With TLS 1.3 the broker's refusal comes after our side of the handshake: it is
    // still read as a refusal (not a connection reset) at the first attempt.
    assert_tls_refused(&url, &ca, &["tls", "client certificate"], true);
}

/// A TLS file that cannot be read or holds no certificate is a start-up error naming it.
#[test]
fn bad_tls_files_are_startup_errors() {
    let dir = tempdir();
    let not_pem = dir.path().join("not-a-cert.pem");
    std::fs::write(&not_pem, "hello\n").expect("write");
    let missing = dir.path().join("missing-ca.pem");
    let url = "amqps://guest:guest@127.0.0.1:1/%2f";
    for (flag, file) in [("--ca-file", &missing), ("--ca-file", &not_pem)] {
        let args = s(&[
            "publish",
            "--url",
            url,
            "--no-checkpoint",
            &p(&fixture(FIXTURE)),
            flag,
            &p(file),
        ]);
        let (status, stderr) = run_bounded(&args, 30);
        let status = status.expect("ended");
        assert_eq!(status.code(), Some(2), "{stderr}");
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(stderr.contains(&*name), "{name} not named: {stderr}");
    }
    let args = s(&["monitor", "--url", url, "--client-cert", &p(&not_pem)]);
    let (status, stderr) = run_bounded(&args, 30);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert!(stderr.contains("--client-key"), "{stderr}");
}
