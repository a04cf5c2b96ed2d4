//! Publishing to a real RabbitMQ: confirms, headers, checkpoints, outages.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use buildbus::bus::message::header;
use buildbus::bus::publish::{Publisher, PublisherConfig};
use buildbus::bus::topology::DSI_QUEUE;
use buildbus::model::DEFAULT_EXCHANGE_PREFIX;
use buildbus::pipeline::file::{publish_file, FileOptions};
use buildbus::systems::Context;
use buildbus_testkit::rabbitmq::RabbitNode;

use crate::harness::*;

const FILES: [&str; 5] = [
    "bazel/build_ok.json",
    "bazel/build_fail.bin",
    "bazel/test_mixed.json",
    "bazel/pattern_fail.bin",
    "bazel/interrupted.json",
];

fn expected_ids(files: &[&str]) -> BTreeSet<String> {
    files
        .iter()
        .flat_map(|f| clean(f))
        .map(|m| m.meta.message_id)
        .collect()
}

async fn publish_all(url: &str, files: &[&str], cp_dir: Option<&std::path::Path>) -> (u64, u64) {
    let cfg = PublisherConfig::new(url, DEFAULT_EXCHANGE_PREFIX);
    let mut p = Publisher::<u64>::connect(cfg).await.expect("connect");
    let ctx = Arc::new(Context::builtin());
    let (mut published, mut skipped) = (0, 0);
    for f in files {
        let path = fixture(f);
        let opts = FileOptions {
            checkpoint: cp_dir.map(|d| buildbus::sources::file::checkpoint::default_file(d, &path)),
            ..Default::default()
        };
        let r = publish_file(&mut p, &path, ctx.clone(), &opts, 64)
            .await
            .expect("publish");
        assert!(r.stream.clean(), "{f}: {:?}", r.stream.errors);
        published += r.published;
        skipped += r.skipped;
    }
    p.close().await.expect("close");
    (published, skipped)
}

#[test]
fn published_messages_carry_ids_headers_and_cloudevents() {
    let (url, _) = vhost("bus-headers");
    rt().block_on(async {
        let (published, _) = publish_all(&url, &FILES, None).await;
        let want = expected_ids(&FILES);
        assert_eq!(published as usize, want.len());
        let got = drain(&url, DSI_QUEUE).await;
        assert_eq!(got.len(), want.len());
        let ids: BTreeSet<String> = got
            .iter()
            .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
            .collect();
        assert_eq!(ids, want);
        for (body, p) in &got {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(p.delivery_mode(), &Some(2));
            assert_eq!(
                p.content_type().as_ref().unwrap().as_str(),
                "application/json"
            );
            assert_eq!(
                p.kind().as_ref().unwrap().as_str(),
                v["_meta"]["kind"].as_str().unwrap()
            );
            assert_eq!(header(p, "system").as_deref(), Some("bazel"));
            assert_eq!(header(p, "cloudEvents_specversion").as_deref(), Some("1.0"));
            assert_eq!(
                header(p, "cloudEvents_id").as_deref(),
                v["_meta"]["message_id"].as_str()
            );
            let ty = header(p, "cloudEvents_type").unwrap();
            assert!(
                ty.starts_with(&format!(
                    "dev.buildbus.{}.",
                    v["_meta"]["kind"].as_str().unwrap()
                )),
                "{ty}"
            );
            assert!(ty.ends_with(".v1"), "{ty}");
            if v["payload"]["tree"].is_string() {
                assert_eq!(header(p, "tree").as_deref(), v["payload"]["tree"].as_str());
            }
        }
    });
}

#[test]
fn checkpoints_make_a_second_publish_a_no_op() {
    let (url, _) = vhost("bus-checkpoint");
    let dir = tempdir();
    rt().block_on(async {
        let files = ["bazel/test_mixed.json", "bazel/build_ok.bin"];
        let (first, skipped) = publish_all(&url, &files, Some(dir.path())).await;
        assert_eq!(skipped, 0);
        assert_eq!(first as usize, expected_ids(&files).len());
        let (second, skipped) = publish_all(&url, &files, Some(dir.path())).await;
        assert_eq!(second, 0, "everything was confirmed before");
        assert_eq!(skipped, first);
        assert_eq!(drain(&url, DSI_QUEUE).await.len() as u64, first);
    });
}

#[test]
fn the_topology_is_declared_idempotently() {
    let (url, vh) = vhost("bus-setup");
    for _ in 0..2 {
        let o = buildbus(&["setup", "--url", &url]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let node = rabbit().lock().unwrap_or_else(|e| e.into_inner());
    let ex = node
        .rabbitmqctl(&["list_exchanges", "-p", &vh, "name", "type", "durable"])
        .unwrap();
    for kind in ["build", "task", "test", "artifact", "log"] {
        assert!(
            ex.contains(&format!("exchange/buildbus/v1/{kind}\ttopic\ttrue")),
            "{ex}"
        );
    }
    assert!(
        ex.contains("exchange/buildbus/v1/dead-letter\tfanout\ttrue"),
        "{ex}"
    );
    let q = node
        .rabbitmqctl(&[
            "list_queues",
            "-p",
            &vh,
            "name",
            "type",
            "durable",
            "arguments",
        ])
        .unwrap();
    assert!(q.contains("queue/buildbus/dsi\tquorum\ttrue"), "{q}");
    assert!(q.contains("x-delivery-limit"), "{q}");
    assert!(
        q.contains("queue/buildbus/dead-letter\tquorum\ttrue"),
        "{q}"
    );
    let b = node
        .rabbitmqctl(&[
            "list_bindings",
            "-p",
            &vh,
            "source_name",
            "destination_name",
            "routing_key",
        ])
        .unwrap();
    for kind in ["build", "task", "test", "artifact", "log"] {
        assert!(
            b.contains(&format!(
                "exchange/buildbus/v1/{kind}\tqueue/buildbus/dsi\t#"
            )),
            "{b}"
        );
    }
}

/// The broker stops in the middle of a publish and comes back: every message arrives,
/// the publisher resends what was unconfirmed (duplicates allowed here, by id).
#[test]
fn broker_outage_during_publish_loses_nothing() {
    let mut node = RabbitNode::start(&infra_dir()).expect("own broker");
    let url = node.amqp_url();
    // A stream long enough to be cut: the fixtures many times, as one file per copy.
    let dir = tempdir();
    let mut paths = Vec::new();
    for i in 0..12 {
        for f in FILES {
            let p = dir.path().join(format!("{i}-{}", f.replace('/', "_")));
            std::fs::copy(fixture(f), &p).unwrap();
            paths.push(p);
        }
    }
    // Same invocations copied: ids repeat per copy, so the distinct set is the fixtures'.
    let want = expected_ids(&FILES);
    let rt = rt();
    let url2 = url.clone();
    let paths2 = paths.clone();
    // The publisher goes on over the copies until the broker is back (then one more
    // round), so the outage always falls in the middle of publishing, however slowly
    // a loaded machine stops the broker. Bounded: at most 40 rounds.
    let restarted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let restarted2 = Arc::clone(&restarted);
    let publisher = rt.spawn(async move {
        let mut cfg = PublisherConfig::new(&url2, DEFAULT_EXCHANGE_PREFIX);
        cfg.window = 16;
        let mut p = Publisher::<u64>::connect(cfg).await.expect("connect");
        let ctx = Arc::new(Context::builtin());
        let mut total = 0;
        let mut after_restart = 0;
        for _round in 0..40 {
            for path in &paths2 {
                let r = publish_file(&mut p, path, ctx.clone(), &FileOptions::default(), 16)
                    .await
                    .expect("publish survives the outage");
                total += r.published;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if restarted2.load(std::sync::atomic::Ordering::SeqCst) {
                after_restart += 1;
                if after_restart > 1 {
                    break;
                }
            }
        }
        let (_, stats) = p.close().await.expect("close");
        (total, stats)
    });
    std::thread::sleep(Duration::from_millis(400));
    node.stop().expect("stop broker");
    std::thread::sleep(Duration::from_secs(2));
    node.start_again().expect("start broker");
    restarted.store(true, std::sync::atomic::Ordering::SeqCst);
    let (total, stats) = rt.block_on(publisher).expect("publisher task");
    assert!(stats.reconnects >= 1, "the outage was noticed: {stats:?}");
    let got = rt.block_on(drain(&url, DSI_QUEUE));
    let ids: BTreeMap<String, usize> = got.iter().fold(BTreeMap::new(), |mut m, (_, p)| {
        *m.entry(p.message_id().as_ref().unwrap().to_string())
            .or_default() += 1;
        m
    });
    let distinct: BTreeSet<String> = ids.keys().cloned().collect();
    assert_eq!(distinct, want, "every message arrived");
    assert!(
        got.len() as u64 >= total,
        "none lost: {} in queue, {total} confirmed",
        got.len()
    );
}

/// `publish --follow` tails a growing file: appended events (and a line finished later)
/// are picked up, and it exits once the build's stream is complete.
#[test]
fn follow_picks_up_appended_events_and_resumes_from_its_checkpoint() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let (url, _) = vhost("bus-follow");
    let dir = tempdir();
    let src = std::fs::read(fixture("bazel/test_mixed.json")).unwrap();
    let path = dir.path().join("growing.json");
    let state = dir.path().join("state");
    // The first 80%, cut inside a line (past the events the build's context needs).
    let cut = src.len() * 8 / 10;
    std::fs::write(&path, &src[..cut]).unwrap();
    let follow = || {
        Command::new(env!("CARGO_BIN_EXE_buildbus"))
            .args(["publish", "--follow", "--url", &url, "--checkpoint-dir"])
            .arg(&state)
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut child = follow();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "still following");
    // Interrupt it: what was confirmed is checkpointed.
    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let first: u64 = err
        .split(" messages published")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(first > 0, "{err}");
    let first_err = err.clone();
    // Follow again from the checkpoint while the rest arrives in pieces.
    let mut child = follow();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    for chunk in src[cut..].chunks(3000) {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let ok = wait_until(30, || child.try_wait().unwrap().is_some());
    assert!(ok, "publish --follow exits after lastMessage");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("{first} skipped")), "the second run skipped the first run's messages: {err}\nfirst run: {first_err}\ncheckpoints: {:?}", std::fs::read_dir(&state).map(|d| d.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect::<Vec<_>>()));
    let want = expected_ids(&["bazel/test_mixed.json"]);
    let got = rt().block_on(drain(&url, DSI_QUEUE));
    let ids: Vec<String> = got
        .iter()
        .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
        .collect();
    let distinct: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(distinct, want, "every message published");
    assert_eq!(
        ids.len(),
        want.len(),
        "and none twice: the checkpoint worked"
    );
}

/// BitBake event logs publish exactly as BEP files do, and `--follow` ends with the
/// command (`CommandCompleted`).
#[test]
fn bitbake_logs_publish_and_follow() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let (url, _) = vhost("bus-bitbake");
    let files = [
        "bitbake/rebuild.eventlog",
        "bitbake/nothing-provides.eventlog",
    ];
    let (published, _) = rt().block_on(publish_all(&url, &files, None));
    let want = expected_ids(&files);
    assert_eq!(published as usize, want.len());
    let got: BTreeSet<String> = rt()
        .block_on(drain(&url, DSI_QUEUE))
        .iter()
        .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(got, want);

    let dir = tempdir();
    let src = std::fs::read(fixture("bitbake/success.eventlog")).unwrap();
    let path = dir.path().join("growing.eventlog");
    let cut = src.len() / 2;
    std::fs::write(&path, &src[..cut]).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_buildbus"))
        .args(["publish", "--follow", "--no-checkpoint", "--url", &url])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(child.try_wait().unwrap().is_none(), "still following");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&src[cut..]).unwrap();
    f.flush().unwrap();
    assert!(
        wait_until(30, || child.try_wait().unwrap().is_some()),
        "ends after CommandCompleted"
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = expected_ids(&["bitbake/success.eventlog"]);
    let got: BTreeSet<String> = rt()
        .block_on(drain(&url, DSI_QUEUE))
        .iter()
        .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(got, want);
}

/// A checkpoint belongs to a destination (broker host and port, vhost, exchange prefix),
/// not to the file alone: the same file with the same checkpoint file is published in
/// full to a second broker and to another vhost, and skipped where it was confirmed,
/// whatever credentials reach that broker.
#[test]
fn checkpoints_belong_to_their_destination() {
    let a = RabbitNode::start(&infra_dir()).expect("broker A");
    let b = RabbitNode::start(&infra_dir()).expect("broker B");
    let (url_a, url_b) = (a.amqp_url(), b.amqp_url());
    let dir = tempdir();
    let files = ["bazel/test_mixed.json", "bazel/build_ok.bin"];
    let n = expected_ids(&files).len() as u64;
    assert!(n > 0);
    let rt = rt();
    // A: everything.
    assert_eq!(
        rt.block_on(publish_all(&url_a, &files, Some(dir.path()))),
        (n, 0)
    );
    assert_eq!(rt.block_on(drain(&url_a, DSI_QUEUE)).len() as u64, n);
    // B, a fresh broker, same checkpoint files: everything again.
    assert_eq!(
        rt.block_on(publish_all(&url_b, &files, Some(dir.path()))),
        (n, 0),
        "a new destination gets every message"
    );
    assert_eq!(rt.block_on(drain(&url_b, DSI_QUEUE)).len() as u64, n);
    // A again: nothing new, with the same or other credentials.
    assert_eq!(
        rt.block_on(publish_all(&url_a, &files, Some(dir.path()))),
        (0, n)
    );
    a.rabbitmqctl(&["add_user", "ckpt", "other-secret"])
        .expect("add_user");
    a.rabbitmqctl(&["set_permissions", "-p", "/", "ckpt", ".*", ".*", ".*"])
        .expect("set_permissions");
    let other_user = url_a.replace("guest:guest@", "ckpt:other-secret@");
    assert_ne!(other_user, url_a);
    assert_eq!(
        rt.block_on(publish_all(&other_user, &files, Some(dir.path()))),
        (0, n),
        "credentials are not part of the destination"
    );
    assert_eq!(rt.block_on(drain(&url_a, DSI_QUEUE)).len(), 0);
    // Another vhost of A: a destination of its own.
    let vh = vhost_on(&a, "ckpt-other");
    assert_eq!(
        rt.block_on(publish_all(&vh, &files, Some(dir.path()))),
        (n, 0)
    );
    assert_eq!(rt.block_on(drain(&vh, DSI_QUEUE)).len() as u64, n);
    // B again through the command line: every message skipped.
    let path = fixture(files[0]);
    let o = buildbus(&[
        "publish",
        "--url",
        &url_b,
        "--checkpoint-dir",
        dir.path().to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let want = expected_ids(&files[..1]).len();
    assert!(
        err.contains(&format!("0 messages published (confirmed), {want} skipped")),
        "{err}"
    );
    assert_eq!(rt.block_on(drain(&url_b, DSI_QUEUE)).len(), 0);
}
