//! Small shared helpers: fixture paths, translating to a list, running the binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use buildbus::model::{Envelope, Payload};
use buildbus::sources::file::{translate_file, StreamReport};
use buildbus::systems::Context;

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Translates one file with the built-in configuration.
pub fn translate(path: &Path) -> (Vec<Envelope>, StreamReport) {
    translate_with(path, &Context::builtin())
}

pub fn translate_with(path: &Path, ctx: &Context) -> (Vec<Envelope>, StreamReport) {
    let mut out = Vec::new();
    let report = translate_file(path, None, &Arc::new(ctx.clone()), &mut |e| out.push(e));
    (out, report)
}

/// Translates a fixture and insists it was read cleanly.
pub fn clean(rel: &str) -> Vec<Envelope> {
    let (msgs, report) = translate(&fixture(rel));
    assert!(report.clean(), "{rel}: {:?}", report.errors);
    msgs
}

/// Runs the `buildbus` binary with `args`, no stdin, and a clean BUILDBUS_* environment.
pub fn buildbus(args: &[&str]) -> Output {
    buildbus_env(args, &[])
}

pub fn buildbus_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_buildbus"));
    for (k, _) in std::env::vars() {
        if k.starts_with("BUILDBUS_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).envs(env.iter().copied());
    cmd.output().expect("run buildbus")
}

pub fn stdout_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("stdout line is JSON"))
        .collect()
}

pub fn builds(msgs: &[Envelope]) -> Vec<&buildbus::model::BuildPayload> {
    msgs.iter()
        .filter_map(|m| match &m.payload {
            Payload::Build(b) => Some(b),
            _ => None,
        })
        .collect()
}

pub fn finished(msgs: &[Envelope]) -> &buildbus::model::BuildPayload {
    let f: Vec<_> = builds(msgs)
        .into_iter()
        .filter(|b| b.result.is_some())
        .collect();
    assert_eq!(f.len(), 1, "exactly one finished build message");
    f[0]
}

pub fn tasks(msgs: &[Envelope]) -> Vec<&buildbus::model::TaskPayload> {
    msgs.iter()
        .filter_map(|m| match &m.payload {
            Payload::Task(t) => Some(t),
            _ => None,
        })
        .collect()
}

pub fn tests_of<'a>(msgs: &'a [Envelope], scope: &str) -> Vec<&'a buildbus::model::TestPayload> {
    msgs.iter()
        .filter_map(|m| match &m.payload {
            Payload::Test(t) if t.scope == scope => Some(t),
            _ => None,
        })
        .collect()
}

pub fn logs(msgs: &[Envelope]) -> Vec<&buildbus::model::LogPayload> {
    msgs.iter()
        .filter_map(|m| match &m.payload {
            Payload::Log(l) => Some(l),
            _ => None,
        })
        .collect()
}

/// The comparable identity of a message: everything but `_meta.sent` and `_meta.source`.
pub fn identity(m: &Envelope) -> String {
    let mut v = serde_json::to_value(m).expect("serialize");
    v["_meta"]["sent"] = serde_json::Value::Null;
    v["_meta"]["source"] = serde_json::Value::Null;
    v.to_string()
}

/// A temporary directory that is removed at the end of the test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

// ---------------------------------------------------------------------------
// Real components: one private RabbitMQ node for the whole test binary (each test gets
// its own vhost), and private nodes for tests that stop their broker.

use std::sync::{Mutex, OnceLock};

use buildbus_testkit::rabbitmq::RabbitNode;

/// The base folder of this test run's servers (removed by their watchdogs).
pub fn infra_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("buildbus-it-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("infra dir");
        d
    })
    .clone()
}

/// The shared broker.
pub fn rabbit() -> &'static Mutex<RabbitNode> {
    static NODE: OnceLock<Mutex<RabbitNode>> = OnceLock::new();
    NODE.get_or_init(|| {
        Mutex::new(
            RabbitNode::start(&infra_dir()).expect("start RabbitMQ (run scripts/ensure-deps.sh)"),
        )
    })
}

/// A fresh vhost on `node`, with guest allowed; returns its AMQP URL.
pub fn vhost_on(node: &RabbitNode, name: &str) -> String {
    node.rabbitmqctl(&["add_vhost", name]).expect("add_vhost");
    node.rabbitmqctl(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])
        .expect("set_permissions");
    let base = node.amqp_url();
    format!("{}/{}", base.trim_end_matches("/%2f"), name)
}

/// A fresh vhost on the shared broker.
pub fn vhost(name: &str) -> (String, String) {
    let node = rabbit().lock().unwrap_or_else(|e| e.into_inner());
    let v = format!("{name}-{}", std::process::id());
    (vhost_on(&node, &v), v)
}

/// A current-thread tokio runtime for one test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Takes every message now in `queue` (acking them); returns their bodies.
pub async fn drain(url: &str, queue: &str) -> Vec<(Vec<u8>, lapin::BasicProperties)> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic_get")
    {
        m.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        out.push((m.delivery.data.clone(), m.delivery.properties.clone()));
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

use buildbus_testkit::postgres::PgCluster;

/// The shared PostgreSQL cluster.
pub fn pg() -> &'static PgCluster {
    static PG: OnceLock<PgCluster> = OnceLock::new();
    PG.get_or_init(|| {
        PgCluster::start(&infra_dir()).expect("start PostgreSQL 15 (run scripts/ensure-deps.sh)")
    })
}

/// A fresh database on the shared cluster; returns its URL.
pub fn pg_database(name: &str) -> String {
    let c = pg();
    let db = format!("{name}_{}", std::process::id()).replace('-', "_");
    c.psql(&format!("CREATE DATABASE {db}"))
        .expect("create database");
    format!("postgres://{}@127.0.0.1:{}/{db}", c.user(), c.port())
}

/// The store URLs a DSI test runs against: a fresh SQLite file and a fresh PG database.
pub fn store_urls(name: &str, dir: &Path) -> Vec<String> {
    vec![
        format!("sqlite:{}", dir.join(format!("{name}.db")).display()),
        pg_database(name),
    ]
}

/// Counts rows of a store, from a plain thread (store drivers block).
pub fn store_counts(url: &str) -> buildbus::stores::TableCounts {
    let url = url.to_string();
    std::thread::spawn(move || {
        buildbus::stores::open(&url)
            .expect("open store")
            .counts()
            .expect("counts")
    })
    .join()
    .expect("counts thread")
}

/// Copies a JSON BEP fixture with its invocation id replaced, so it is another build.
pub fn renamed_copy(rel: &str, dir: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(fixture(rel)).expect("fixture");
    let msgs = clean(rel);
    let old = &msgs[0].payload.common().build_id;
    let new = format!("{:08x}-0000-4000-8000-{:012x}", n, n);
    let p = dir.join(format!("{n}-{}", rel.replace('/', "_")));
    std::fs::write(&p, text.replace(&**old, &new)).expect("write copy");
    p
}

/// Waits (at most `secs`) until `cond` holds; true if it did.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    cond()
}
