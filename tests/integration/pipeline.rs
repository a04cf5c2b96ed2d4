//! The whole pipeline on real components: files → EVT → RabbitMQ → DSI workers →
//! SQLite and PostgreSQL; nothing lost, nothing stored twice, whatever happens.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use buildbus::consumers::dsi::worker::{run_pool, DsiConfig, DsiStats};
use buildbus::model::{Envelope, DEFAULT_EXCHANGE_PREFIX};
use buildbus_testkit::rabbitmq::RabbitNode;

use crate::harness::*;

const FILES: [&str; 10] = [
    "bazel/build_ok.json",
    "bazel/build_fail.json",
    "bazel/test_mixed.json",
    "bazel/pattern_fail.json",
    "bazel/interrupted.json",
    "bazel/bazel-2.1.0/build_ok.bin",
    "bazel/bazel-2.1.0/build_fail.bin",
    "bazel/bazel-2.1.0/test_mixed.bin",
    "bazel/bazel-2.1.0/pattern_fail.bin",
    "bazel/bazel-2.1.0/interrupted.bin",
];

fn translated(paths: &[std::path::PathBuf]) -> Vec<Envelope> {
    paths
        .iter()
        .flat_map(|p| {
            let (m, r) = translate(p);
            assert!(r.clean());
            m
        })
        .collect()
}

/// Expected rows per table: distinct messages, builds and entities per kind.
pub fn expected_counts(msgs: &[Envelope]) -> buildbus::stores::TableCounts {
    let distinct = |kind: &str| {
        msgs.iter()
            .filter(|m| m.meta.kind.as_str() == kind)
            .map(|m| m.meta.entity_id.clone())
            .collect::<BTreeSet<_>>()
            .len() as u64
    };
    buildbus::stores::TableCounts {
        messages: msgs
            .iter()
            .map(|m| m.meta.message_id.clone())
            .collect::<BTreeSet<_>>()
            .len() as u64,
        builds: distinct("build"),
        tasks: distinct("task"),
        tests: distinct("test"),
        artifacts: distinct("artifact"),
        logs: distinct("log"),
    }
}

fn publish_cli(url: &str, files: &[std::path::PathBuf]) {
    let mut args = vec![
        "publish".to_string(),
        "--no-checkpoint".into(),
        "--url".into(),
        url.into(),
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = buildbus(&args);
    assert!(
        o.status.success(),
        "publish: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs an in-process pool until the store holds `want` messages (or 60 s).
pub fn run_dsi_until(url: &str, store: &str, workers: usize, want: u64) -> Arc<DsiStats> {
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(DsiStats::default());
    let cfg = DsiConfig {
        url: url.to_string(),
        tls: Default::default(),
        exchange_prefix: DEFAULT_EXCHANGE_PREFIX.to_string(),
        store_url: store.to_string(),
        workers,
        prefetch: 200,
        batch: 100,
        batch_wait: Duration::from_millis(20),
        connect_timeout: None,
    };
    let rt = rt();
    let pool = rt.spawn(run_pool(cfg, stop.clone(), stats.clone()));
    let ok = wait_until(60, || stats.stored.load(Ordering::Relaxed) >= want);
    // A little longer: anything extra (duplicates) would show up now.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    rt.block_on(pool).expect("pool task").expect("pool");
    assert!(
        ok,
        "stored {} of {want}",
        stats.stored.load(Ordering::Relaxed)
    );
    stats
}

#[test]
fn every_fixture_stored_once_even_when_published_twice() {
    let (url, _) = vhost("pipe-all");
    let dir = tempdir();
    let paths: Vec<_> = FILES.iter().map(|f| fixture(f)).collect();
    let msgs = translated(&paths);
    let want = expected_counts(&msgs);
    // Declare the queue first (publish does too), publish twice.
    publish_cli(&url, &paths);
    publish_cli(&url, &paths);
    let stores = store_urls("pipe_all", dir.path());
    // Both stores consume the same queue in turn: publish again for the second.
    for (i, store) in stores.iter().enumerate() {
        if i > 0 {
            publish_cli(&url, &paths);
            publish_cli(&url, &paths);
        }
        let stats = run_dsi_until(&url, store, 2, want.messages);
        assert_eq!(store_counts(store), want, "{store}");
        assert_eq!(
            stats.stored.load(Ordering::Relaxed),
            want.messages,
            "{store}"
        );
        assert_eq!(
            stats.duplicates.load(Ordering::Relaxed),
            want.messages,
            "{store}: the second copy was skipped"
        );
        assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
        // The stored build rows say what the messages said.
        let s = store.clone();
        let rows = std::thread::spawn(move || {
            buildbus::stores::open(&s)
                .unwrap()
                .query_builds(&Default::default())
                .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(rows.len() as u64, want.builds);
        let failed = rows
            .iter()
            .filter(|r| r.result.as_deref() == Some("failure"))
            .count();
        assert_eq!(
            failed, 6,
            "{store}: build_fail, test_mixed, pattern_fail of both versions"
        );
        let interrupted = rows
            .iter()
            .filter(|r| r.result.as_deref() == Some("interrupted"))
            .count();
        assert_eq!(interrupted, 2, "{store}");
    }
}

#[test]
fn a_broker_outage_loses_nothing_and_stores_nothing_twice() {
    let mut node = RabbitNode::start(&infra_dir()).expect("own broker");
    let url = node.amqp_url();
    let dir = tempdir();
    let paths: Vec<_> = (0..40)
        .map(|n| renamed_copy(FILES[n % 5], dir.path(), n))
        .collect();
    let msgs = translated(&paths);
    let want = expected_counts(&msgs);
    let mut args = vec![
        "publish".to_string(),
        "--no-checkpoint".into(),
        "--window".into(),
        "8".into(),
        "--url".into(),
        url.clone(),
    ];
    args.extend(paths.iter().map(|p| p.display().to_string()));
    let publisher = Command::new(env!("CARGO_BIN_EXE_buildbus"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    node.stop().expect("stop broker");
    std::thread::sleep(Duration::from_secs(2));
    node.start_again().expect("start broker");
    let out = publisher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The queue now holds every message (some maybe twice): drain it into SQLite, then
    // publish the same again and drain it into PostgreSQL.
    for (i, store) in store_urls("outage", dir.path()).into_iter().enumerate() {
        if i > 0 {
            publish_cli(&url, &paths);
        }
        run_dsi_until(&url, &store, 2, want.messages);
        assert_eq!(store_counts(&store), want, "{store}: 0 lost, 0 duplicated");
    }
}

fn spawn_dsi(url: &str, store: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_buildbus"))
        .args([
            "dsi",
            "--url",
            url,
            "--store",
            store,
            "--workers",
            "2",
            "--batch",
            "50",
            "--prefetch",
            "100",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dsi")
}

#[test]
fn a_worker_killed_mid_batch_loses_nothing_and_stores_nothing_twice() {
    let (url, _) = vhost("pipe-kill");
    let dir = tempdir();
    let paths: Vec<_> = (0..60)
        .map(|n| renamed_copy(FILES[n % 5], dir.path(), 1000 + n))
        .collect();
    let msgs = translated(&paths);
    let want = expected_counts(&msgs);
    for store in store_urls("pipe_kill", dir.path()) {
        publish_cli(&url, &paths);
        let mut dsi = spawn_dsi(&url, &store);
        // Kill it once something is stored but not everything.
        let started = wait_until(60, || {
            let c = store_counts(&store).messages;
            c > 0 && c < want.messages
        });
        dsi.kill().expect("SIGKILL");
        let _ = dsi.wait();
        let at_kill = store_counts(&store).messages;
        assert!(
            started && at_kill < want.messages,
            "{store}: killed at {at_kill} of {}",
            want.messages
        );
        let mut dsi = spawn_dsi(&url, &store);
        let done = wait_until(60, || store_counts(&store).messages >= want.messages);
        std::thread::sleep(Duration::from_millis(500));
        let _ = dsi.kill();
        let _ = dsi.wait();
        assert!(done, "{store}");
        assert_eq!(store_counts(&store), want, "{store}: 0 lost, 0 duplicated");
    }
}

#[test]
fn poison_goes_to_the_dead_letter_queue_and_the_pool_keeps_storing() {
    let dir = tempdir();
    for store in store_urls("pipe_poison", dir.path()) {
        poison_into(&store);
    }
}

fn poison_into(store: &str) {
    let (url, _) = vhost(&format!("pipe-poison-{}", &store[..6]));
    let store = store.to_string();
    let rt = rt();
    rt.block_on(async {
        use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        buildbus::bus::topology::Topology::new(DEFAULT_EXCHANGE_PREFIX)
            .declare_all(&ch)
            .await
            .unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for body in [
            &b"{not json"[..],
            br#"{"_meta":{"kind":"task"},"payload":{"outcome":"bogus"}}"#,
        ] {
            ch.basic_publish(
                "exchange/buildbus/v1/task".into(),
                "x.y.z".into(),
                BasicPublishOptions::default(),
                body,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        let _ = conn.close(200, "bye".into()).await;
    });
    let good = [fixture("bazel/test_mixed.json")];
    publish_cli(&url, &good);
    let want = expected_counts(&translated(&good));
    let stats = run_dsi_until(&url, &store, 1, want.messages);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 2, "{store}");
    assert_eq!(store_counts(&store), want, "{store}");
    let dead = rt.block_on(drain(&url, buildbus::bus::topology::DEAD_LETTER_QUEUE));
    assert_eq!(dead.len(), 2);
    let reasons: Vec<String> = dead
        .iter()
        .map(|(_, p)| buildbus::bus::message::header(p, "x-buildbus-error").unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("not valid JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("violates schema buildbus/task/v1")),
        "{reasons:?}"
    );
}

#[test]
fn out_of_order_delivery_converges() {
    // Reversed through the bus into PostgreSQL, in order straight into SQLite: the same
    // rows (the store tests compare every order on both stores).
    let (url, _) = vhost("pipe-order");
    let dir = tempdir();
    let paths = [
        fixture("bazel/test_mixed.json"),
        fixture("bazel/interrupted.bin"),
    ];
    let msgs = translated(&paths);
    let want = expected_counts(&msgs);
    // Publish the messages in reverse order (finished before started, tasks before builds).
    rt().block_on(async {
        let cfg = buildbus::bus::publish::PublisherConfig::new(&url, DEFAULT_EXCHANGE_PREFIX);
        let mut p = buildbus::bus::publish::Publisher::<u64>::connect(cfg)
            .await
            .unwrap();
        for (i, m) in msgs.iter().rev().enumerate() {
            p.publish(buildbus::bus::message::Outgoing::from_envelope(m), i as u64)
                .await
                .unwrap();
        }
        p.close().await.unwrap();
    });
    let stores = store_urls("pipe_order", dir.path());
    let reversed = stores[1].clone();
    run_dsi_until(&url, &reversed, 1, want.messages);
    // In order, straight into another store.
    let ordered = format!("sqlite:{}", dir.path().join("ord.db").display());
    let (r2, o2, msgs2) = (reversed.clone(), ordered.clone(), msgs.clone());
    let (a, b) = std::thread::spawn(move || {
        let mut o = buildbus::stores::open(&o2).unwrap();
        o.write_batch(&msgs2).unwrap();
        let mut r = buildbus::stores::open(&r2).unwrap();
        let ids: Vec<String> = o
            .query_builds(&Default::default())
            .unwrap()
            .into_iter()
            .map(|b| b.build_id)
            .collect();
        let a: Vec<String> = ids
            .iter()
            .map(|id| serde_json::to_string(&o.query_build(id).unwrap()).unwrap())
            .collect();
        let b: Vec<String> = ids
            .iter()
            .map(|id| serde_json::to_string(&r.query_build(id).unwrap()).unwrap())
            .collect();
        (a, b)
    })
    .join()
    .unwrap();
    assert_eq!(store_counts(&reversed), want);
    assert_eq!(a.len(), 2);
    assert_eq!(a, b, "same rows whatever the order");
    assert!(a[0].contains("\"finished\"") || a[1].contains("\"finished\""));
}
