//! The Bazel Build Event Service backend against a real RabbitMQ: recorded captures
//! replayed through a tonic client, out-of-order and repeated streams, acks that wait
//! for the broker, a backend killed mid-stream, auth and TLS, silent streams, and a
//! real Bazel (Debian's bazel-bootstrap) building the fixture workspace.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use buildbus::bus::publish::PublisherConfig;
use buildbus::bus::topology::DSI_QUEUE;
use buildbus::model::{Envelope, Payload, DEFAULT_EXCHANGE_PREFIX};
use buildbus::pipeline::bes;
use buildbus::sources::bes::capture::{self, Call};
use buildbus::sources::bes::proto::v1::publish_build_event_client::PublishBuildEventClient;
use buildbus::sources::bes::proto::v1::PublishBuildToolEventStreamRequest;
use buildbus::sources::bes::{Auth, BesConfig};
use buildbus::systems::Context;
use buildbus_testkit::rabbitmq::RabbitNode;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::harness::*;

fn ctx() -> Arc<Context> {
    Arc::new(Context::builtin())
}

fn backend_cfg(url: &str, spool: &Path) -> BesConfig {
    let mut c = BesConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        Some(PublisherConfig::new(url, DEFAULT_EXCHANGE_PREFIX)),
    );
    c.spool = Some(spool.to_path_buf());
    c
}

fn http(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A message as compared across sources: id, routing key and payload, without the
/// backend's own `bes.*` metadata.
fn comparable(m: &Envelope) -> (String, String, String) {
    let mut p = serde_json::to_value(&m.payload).unwrap();
    if let Some(md) = p.get_mut("metadata").and_then(|v| v.as_object_mut()) {
        md.retain(|k, _| !k.starts_with("bes."));
    }
    (
        m.meta.message_id.clone(),
        m.meta.routing_key.clone(),
        p.to_string(),
    )
}

fn envelopes(raw: &[(Vec<u8>, lapin::BasicProperties)]) -> Vec<Envelope> {
    raw.iter()
        .map(|(b, _)| serde_json::from_slice(b).expect("envelope"))
        .collect()
}

/// Distinct messages by id (at-least-once delivery may repeat one).
fn distinct(msgs: Vec<Envelope>) -> BTreeMap<String, Envelope> {
    msgs.into_iter()
        .map(|m| (m.meta.message_id.clone(), m))
        .collect()
}

fn same_messages(got: &BTreeMap<String, Envelope>, want: &[Envelope]) {
    let got: BTreeSet<_> = got.values().map(comparable).collect();
    let want: BTreeSet<_> = want.iter().map(comparable).collect();
    assert_eq!(got.len(), want.len(), "message count");
    for w in &want {
        assert!(got.contains(w), "missing or different: {}", w.2);
    }
}

/// What the file translator makes of a capture's Bazel events.
fn translate_events(calls: &[Call]) -> Vec<Envelope> {
    capture::translate(calls, ctx())
}

fn build_of(msgs: &BTreeMap<String, Envelope>, finished: bool) -> &buildbus::model::BuildPayload {
    msgs.values()
        .find_map(|m| match &m.payload {
            Payload::Build(b) if (b.state == buildbus::model::BuildState::Finished) == finished => {
                Some(b)
            }
            _ => None,
        })
        .expect("a build message")
}

/// The recorded 4.2.3 session, replayed: the same messages as the JSON file Bazel
/// wrote for that invocation, plus the lifecycle facts in the build's metadata.
#[test]
fn a_recorded_session_gives_the_messages_of_its_json_file() {
    let (url, _) = vhost("bes-capture");
    let spool = tempdir();
    rt().block_on(async {
        let backend = bes::start(backend_cfg(&url, spool.path()), ctx())
            .await
            .unwrap();
        let calls = capture::read_capture(&fixture("bazel/bes_capture.jsonl")).unwrap();
        let r = capture::replay(&http(backend.addr), calls, &vec![])
            .await
            .unwrap();
        assert_eq!(
            (r.lifecycle_calls, r.streams, r.requests, r.acks),
            (4, 1, 30, 30)
        );
        let got = distinct(envelopes(&drain(&url, DSI_QUEUE).await));
        same_messages(&got, &clean("bazel/bes_capture.bep.json"));
        let started = build_of(&got, false);
        assert_eq!(
            started.metadata.get("bes.build_id").map(String::as_str),
            Some("f18421dd-a764-4c7b-9232-110ec3deeb4c")
        );
        assert_eq!(
            started.metadata.get("bes.project_id").map(String::as_str),
            Some("fixture-project")
        );
        assert_eq!(
            started.metadata.get("bes.attempt").map(String::as_str),
            Some("1")
        );
        assert!(started.metadata["bes.keywords"].contains("user_keyword=fixture"));
        assert!(started.metadata.contains_key("bes.enqueued_at"));
        let fin = build_of(&got, true);
        assert_eq!(fin.result, Some(buildbus::model::BuildResult::Success));
        assert!(got.values().all(|m| m.meta.source.format == "bes"));
        backend.stop().await.unwrap();
    });
}

/// The retry capture (a stream aborted after two acks, resent from 3), the test
/// capture, the 2.1.0 capture, and the test capture again with its requests shuffled
/// and repeated: each gives exactly the translation of its events.
#[test]
fn retried_shuffled_and_repeated_streams_give_each_message_once() {
    let (url, _) = vhost("bes-shuffle");
    let spool = tempdir();
    rt().block_on(async {
        let backend = bes::start(backend_cfg(&url, spool.path()), ctx())
            .await
            .unwrap();
        for f in [
            "bazel/bes_capture_retry.jsonl",
            "bazel/bes_capture_test.jsonl",
            "bazel/bazel-2.1.0/bes_capture.jsonl",
        ] {
            let calls = capture::read_capture(&fixture(f)).unwrap();
            let want = translate_events(&calls);
            let r = capture::replay(&http(backend.addr), calls, &vec![])
                .await
                .unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(r.acks >= 30, "{f}: {r:?}");
            let got = distinct(envelopes(&drain(&url, DSI_QUEUE).await));
            same_messages(&got, &want);
        }
        // Wrong order and repeats in one stream: swap neighbours, send some twice.
        let calls = capture::read_capture(&fixture("bazel/bes_capture_test.jsonl")).unwrap();
        let want = translate_events(&calls);
        // A fresh invocation id, so the backend treats it as a new build.
        let mut reqs: Vec<PublishBuildToolEventStreamRequest> = calls
            .iter()
            .filter_map(|c| match c {
                Call::Stream(r) => Some(r.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        for r in reqs.iter_mut() {
            let sid = r
                .ordered_build_event
                .as_mut()
                .and_then(|o| o.stream_id.as_mut())
                .unwrap();
            sid.invocation_id.push_str("-shuffled");
        }
        let n = reqs.len();
        let mut shuffled = Vec::new();
        let mut i = 0;
        while i < n {
            if i + 1 < n && i % 3 == 1 {
                shuffled.push(reqs[i + 1].clone());
                shuffled.push(reqs[i].clone());
                i += 2;
            } else {
                shuffled.push(reqs[i].clone());
                if i % 5 == 0 {
                    shuffled.push(reqs[i].clone());
                }
                i += 1;
            }
        }
        let mut client = capture::connect(&http(backend.addr)).await.unwrap();
        let acks = capture::send_stream(&mut client, shuffled, &vec![])
            .await
            .unwrap();
        let seqs: Vec<i64> = (1..=n as i64).collect();
        assert_eq!(acks, seqs, "one ack per sequence number, in order");
        let got = distinct(envelopes(&drain(&url, DSI_QUEUE).await));
        // Same messages as the straight stream (the invocation id is not in them:
        // the build id comes from the BEP `started` event).
        same_messages(&got, &want);
        backend.stop().await.unwrap();
    });
}

/// Several invocations at once: two recorded sessions streamed concurrently each give
/// their own build's messages.
#[test]
fn concurrent_invocations_stay_apart() {
    let (url, _) = vhost("bes-concurrent");
    let spool = tempdir();
    rt().block_on(async {
        let backend = bes::start(backend_cfg(&url, spool.path()), ctx())
            .await
            .unwrap();
        let addr = http(backend.addr);
        let a = capture::read_capture(&fixture("bazel/bes_capture.jsonl")).unwrap();
        let b = capture::read_capture(&fixture("bazel/bes_capture_test.jsonl")).unwrap();
        let (want_a, want_b) = (translate_events(&a), translate_events(&b));
        let none = vec![];
        let (ra, rb) = tokio::join!(
            capture::replay(&addr, a, &none),
            capture::replay(&addr, b, &none)
        );
        assert_eq!(ra.unwrap().acks, 30);
        assert!(rb.unwrap().acks > 30);
        let got = distinct(envelopes(&drain(&url, DSI_QUEUE).await));
        let mut want = want_a;
        want.extend(want_b);
        same_messages(&got, &want);
        backend.stop().await.unwrap();
    });
}

/// A stream whose requests are fed by hand: returns the request sender and a channel
/// of acked sequence numbers (an `Err` string when the RPC fails; closed on OK).
async fn open_stream(
    addr: SocketAddr,
) -> (
    mpsc::Sender<PublishBuildToolEventStreamRequest>,
    mpsc::UnboundedReceiver<Result<i64, String>>,
) {
    let (tx, rx) = mpsc::channel(4096);
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let mut client = PublishBuildEventClient::connect(http(addr)).await.unwrap();
    tokio::spawn(async move {
        let resp = client
            .publish_build_tool_event_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let mut inbound = match resp {
            Ok(r) => r.into_inner(),
            Err(s) => {
                let _ = ack_tx.send(Err(s.to_string()));
                return;
            }
        };
        while let Some(a) = inbound.next().await {
            let item = a.map(|a| a.sequence_number).map_err(|s| s.to_string());
            let _ = ack_tx.send(item);
        }
    });
    (tx, ack_rx)
}

fn stream_requests(rel: &str) -> Vec<PublishBuildToolEventStreamRequest> {
    capture::read_capture(&fixture(rel))
        .unwrap()
        .into_iter()
        .filter_map(|c| match c {
            Call::Stream(r) => Some(r),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Acks received within `wait`.
async fn acks_within(
    rx: &mut mpsc::UnboundedReceiver<Result<i64, String>>,
    wait: Duration,
) -> Vec<i64> {
    let mut got = Vec::new();
    let end = tokio::time::Instant::now() + wait;
    while let Ok(Some(a)) = tokio::time::timeout_at(end, rx.recv()).await {
        got.push(a.expect("ack"));
    }
    got
}

/// The broker stops mid-build: acks stop (nothing unconfirmed is acknowledged); it
/// comes back: every event is acked, every message is there.
#[test]
fn acks_wait_while_the_broker_is_down() {
    let mut node = RabbitNode::start(&infra_dir()).expect("own broker");
    let url = node.amqp_url();
    let spool = tempdir();
    let rt = rt();
    let reqs = stream_requests("bazel/bes_capture.jsonl");
    let n = reqs.len() as i64;
    let addr = rt.block_on(async {
        let mut cfg = backend_cfg(&url, spool.path());
        if let Some(p) = cfg.publisher.as_mut() {
            p.window = 4;
        }
        let b = bes::start(cfg, ctx()).await.unwrap();
        let addr = b.addr;
        std::mem::forget(b);
        addr
    });
    let (tx, mut acks) = rt.block_on(open_stream(addr));
    // The first half while the broker is up: acks come.
    let (first, rest) = reqs.split_at(15);
    rt.block_on(async {
        for r in first {
            tx.send(r.clone()).await.unwrap();
        }
    });
    let early = rt.block_on(acks_within(&mut acks, Duration::from_secs(3)));
    assert!(!early.is_empty(), "acks while the broker is up");
    assert_eq!(early, (1..=early.len() as i64).collect::<Vec<_>>());
    node.stop().expect("stop broker");
    rt.block_on(async {
        for r in rest {
            tx.send(r.clone()).await.unwrap();
        }
    });
    drop(tx);
    let during = rt.block_on(acks_within(&mut acks, Duration::from_secs(3)));
    let acked_before = early.len() as i64 + during.len() as i64;
    assert!(
        acked_before < n,
        "not everything acked while the broker is down ({acked_before} of {n})"
    );
    node.start_again().expect("start broker");
    let after = rt.block_on(acks_within(&mut acks, Duration::from_secs(30)));
    let all: Vec<i64> = early.into_iter().chain(during).chain(after).collect();
    assert_eq!(
        all,
        (1..=n).collect::<Vec<_>>(),
        "every event acked once, in order"
    );
    // Stored by the DSI: every message, none twice.
    let want = clean("bazel/bes_capture.bep.json");
    let store = format!("sqlite:{}", spool.path().join("bes.db").display());
    let counts = crate::pipeline::expected_counts(&want);
    crate::pipeline::run_dsi_until(&url, &store, 2, counts.messages);
    assert_eq!(store_counts(&store), counts, "0 lost, 0 stored twice");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_backend(port: u16, url: &str, spool: &Path, extra: &[&str]) -> Child {
    spawn_backend_logged(port, url, spool, extra, None)
}

/// `buildbus bes` as its own process; with `log`, at info level into that file.
fn spawn_backend_logged(
    port: u16,
    url: &str,
    spool: &Path,
    extra: &[&str],
    log: Option<&Path>,
) -> Child {
    let stderr = match log {
        Some(p) => Stdio::from(std::fs::File::create(p).expect("log file")),
        None => Stdio::null(),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_buildbus"))
        .args([
            "bes",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--url",
            url,
        ])
        .arg("--spool")
        .arg(spool)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("buildbus bes");
    let up = wait_until(20, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "backend listening on {port}");
    child
}

/// The backend is killed after acking part of a stream and started again; Bazel's
/// retry (a new stream from the first unacked number) is accepted, and the spool gives
/// the new backend the build's context: the messages equal the JSON file's.
#[test]
fn a_restarted_backend_takes_the_retried_stream() {
    let (url, _) = vhost("bes-restart");
    let spool = tempdir();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let reqs = stream_requests("bazel/bes_capture.jsonl");
    let n = reqs.len() as i64;
    let rt = rt();
    let mut first = spawn_backend(port, &url, spool.path(), &[]);
    let (tx, mut acks) = rt.block_on(open_stream(addr));
    rt.block_on(async {
        for r in &reqs[..20] {
            tx.send(r.clone()).await.unwrap();
        }
    });
    let got = rt.block_on(acks_within(&mut acks, Duration::from_secs(5)));
    assert!(got.len() >= 10, "acks before the kill: {got:?}");
    first.kill().unwrap();
    first.wait().unwrap();
    drop(tx);
    let resume = got.len() as i64 + 1;
    let mut second = spawn_backend(port, &url, spool.path(), &[]);
    let (tx, mut acks) = rt.block_on(open_stream(addr));
    rt.block_on(async {
        for r in &reqs[(resume - 1) as usize..] {
            tx.send(r.clone()).await.unwrap();
        }
    });
    drop(tx);
    let after = rt.block_on(acks_within(&mut acks, Duration::from_secs(20)));
    assert_eq!(after, (resume..=n).collect::<Vec<_>>());
    let msgs = distinct(envelopes(&rt.block_on(drain(&url, DSI_QUEUE))));
    same_messages(&msgs, &clean("bazel/bes_capture.bep.json"));
    second.kill().unwrap();
    second.wait().unwrap();
}

/// A token or header is required when configured (`UNAUTHENTICATED` otherwise), and
/// the backend speaks TLS with the given certificate.
#[test]
fn auth_and_tls() {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let (url, _) = vhost("bes-auth");
    let spool = tempdir();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = ck.cert.pem();
    let key_pem = ck.signing_key.serialize_pem();
    rt().block_on(async {
        let mut cfg = backend_cfg(&url, spool.path());
        cfg.auth = Auth::Bearer("s3cret".into());
        cfg.tls = Some((cert_pem.clone().into_bytes(), key_pem.into_bytes()));
        let backend = bes::start(cfg, ctx()).await.unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&cert_pem))
            .domain_name("localhost");
        let channel = Channel::from_shared(format!("https://localhost:{}", backend.addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("TLS connection");
        let mut client = PublishBuildEventClient::new(channel);
        let calls = capture::read_capture(&fixture("bazel/bes_capture.jsonl")).unwrap();
        let Call::Lifecycle(first) = calls[0].clone() else {
            panic!("capture starts with a lifecycle call")
        };
        let refused = client
            .publish_lifecycle_event(*first.clone())
            .await
            .expect_err("no token");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let mut wrong = tonic::Request::new(*first.clone());
        wrong
            .metadata_mut()
            .insert("authorization", "Bearer nope".parse().unwrap());
        let refused = client.publish_lifecycle_event(wrong).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let reqs = stream_requests("bazel/bes_capture.jsonl");
        let refused = capture::send_stream(&mut client, reqs.clone(), &vec![])
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("Unauthenticated"), "{refused}");
        let headers = vec![("authorization".to_string(), "Bearer s3cret".to_string())];
        let acks = capture::send_stream(&mut client, reqs, &headers)
            .await
            .expect("with the token");
        assert_eq!(acks.len(), 30);
        let got = distinct(envelopes(&drain(&url, DSI_QUEUE).await));
        same_messages(&got, &clean("bazel/bes_capture.bep.json"));
        // Plain text to a TLS backend does not get through.
        assert!(
            capture::replay(&http(backend.addr), calls.clone(), &headers)
                .await
                .is_err()
        );
        backend.stop().await.unwrap();

        // A header check (`--auth-header x-api-key=...`, Bazel's --bes_header).
        let mut cfg = backend_cfg(&url, spool.path());
        cfg.auth = Auth::Header {
            name: "x-api-key".into(),
            value: "k3y".into(),
        };
        let backend = bes::start(cfg, ctx()).await.unwrap();
        let wrong = vec![("x-api-key".to_string(), "nope".to_string())];
        let err = capture::replay(&http(backend.addr), calls.clone(), &wrong)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("Unauthenticated"), "{err}");
        let right = vec![("x-api-key".to_string(), "k3y".to_string())];
        let r = capture::replay(&http(backend.addr), calls, &right)
            .await
            .expect("with the key");
        assert_eq!(r.acks, 30);
        backend.stop().await.unwrap();
    });
}

/// A stream that goes silent before it finished: after the idle timeout the build is
/// finished as incomplete (`aborted`, `buildbus.incomplete`).
#[test]
fn a_silent_stream_ends_the_build_as_incomplete() {
    let (url, _) = vhost("bes-silent");
    let spool = tempdir();
    let rt = rt();
    let reqs = stream_requests("bazel/bes_capture.jsonl");
    let backend = rt.block_on(async {
        let mut cfg = backend_cfg(&url, spool.path());
        cfg.idle_timeout = Duration::from_secs(2);
        bes::start(cfg, ctx()).await.unwrap()
    });
    let (tx, mut acks) = rt.block_on(open_stream(backend.addr));
    rt.block_on(async {
        for r in &reqs[..20] {
            tx.send(r.clone()).await.unwrap();
        }
    });
    let got = rt.block_on(acks_within(&mut acks, Duration::from_secs(6)));
    assert!(!got.is_empty());
    let msgs = distinct(envelopes(&rt.block_on(drain(&url, DSI_QUEUE))));
    let fin = build_of(&msgs, true);
    assert_eq!(fin.result, Some(buildbus::model::BuildResult::Aborted));
    assert_eq!(
        fin.metadata.get("buildbus.incomplete").map(String::as_str),
        Some("true")
    );
    assert!(
        fin.failure.as_deref().unwrap_or("").contains("went silent"),
        "{:?}",
        fin.failure
    );
    drop(tx);
    rt.block_on(backend.stop()).unwrap();
}

/// Real Bazel 4.2.3 (Debian's bazel-bootstrap, installed by scripts/ensure-deps.sh)
/// builds the fixture workspace offline with `--bes_backend` pointing at our backend
/// and `--build_event_json_file` beside it: Bazel exits as the build deserves, and
/// what was published equals the translation of the JSON file.
#[test]
fn real_bazel_streams_to_the_backend() {
    let bazel = bazel_binary();
    let (url, _) = vhost("bes-real-bazel");
    let work = tempdir();
    let ws = work.path().join("ws");
    copy_tree(&fixture("bazel/workspace"), &ws);
    let spool = work.path().join("spool");
    let port = free_port();
    let ws_arg = ws.display().to_string();
    let mut backend = spawn_backend(port, &url, &spool, &["--build-dir", &ws_arg]);
    let run = |args: &[&str], json: &Path| {
        bazel_command(bazel, work.path(), &ws)
            .args(args)
            .arg(format!("--bes_backend=grpc://127.0.0.1:{port}"))
            .arg(format!("--build_event_json_file={}", json.display()))
            .arg("--bes_timeout=120s")
            .output()
            .expect("run bazel")
    };
    let ok_json = work.path().join("ok.json");
    let ok = run(&["build", "//app/..."], &ok_json);
    let fail_json = work.path().join("fail.json");
    let fail = run(&["build", "-k", "//broken:fails"], &fail_json);
    let _ = bazel_command(bazel, work.path(), &ws)
        .arg("shutdown")
        .output();
    backend.kill().unwrap();
    backend.wait().unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        fail.status.code(),
        Some(1),
        "a failing build exits 1, not 38/45: {}",
        String::from_utf8_lossy(&fail.stderr)
    );
    let all = distinct(envelopes(&rt().block_on(drain(&url, DSI_QUEUE))));
    // Artifacts the AAM scanned (`--build-dir`) have an mtime; the rest is the EVT's.
    let (scanned, got): (BTreeMap<_, _>, BTreeMap<_, _>) = all
        .into_iter()
        .partition(|(_, m)| matches!(&m.payload, Payload::Artifact(a) if a.mtime.is_some()));
    let mut want = translate(&ok_json).0;
    let ok_build = want[0].payload.common().build_id.clone();
    want.extend(translate(&fail_json).0);
    same_messages(&got, &want);
    // The successful build's outputs, scanned in bazel-bin and hashed, under its id.
    let hello: Vec<_> = scanned
        .values()
        .filter_map(|m| match &m.payload {
            Payload::Artifact(a) if a.common.build_id == ok_build => Some(a),
            _ => None,
        })
        .filter(|a| a.path.ends_with("app/hello.sh") || a.path.ends_with("app/config.txt"))
        .collect();
    assert!(
        !hello.is_empty(),
        "scanned artifacts of {ok_build}: {scanned:?}"
    );
    for a in hello {
        let on_disk = std::fs::read(ws.join(&a.path)).or_else(|_| {
            std::fs::read(
                ws.join("bazel-bin")
                    .join(a.path.trim_start_matches("bazel-bin/")),
            )
        });
        let bytes = on_disk.unwrap_or_else(|e| panic!("{}: {e}", a.path));
        use sha2::Digest;
        let want_sha = hex::encode(sha2::Sha256::digest(&bytes));
        assert_eq!(a.sha256.as_deref(), Some(want_sha.as_str()), "{}", a.path);
        assert_eq!(a.size, Some(bytes.len() as u64));
    }
    let results: BTreeSet<String> = got
        .values()
        .filter_map(|m| match &m.payload {
            Payload::Build(b) => b.result.map(|r| r.as_str().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        results,
        BTreeSet::from(["success".to_string(), "failure".to_string()])
    );
}

/// Real Bazel, backend killed mid-build: a 6 s genrule keeps the build going while the
/// backend is killed with SIGKILL and started again on the same port. Bazel retries
/// (a new stream from its first unacked event), the build exits 0, and what was
/// published equals the translation of its JSON file.
#[test]
fn real_bazel_survives_a_backend_restart() {
    let bazel = bazel_binary();
    let (url, _) = vhost("bes-real-restart");
    let work = tempdir();
    let ws = work.path().join("ws");
    copy_tree(&fixture("bazel/workspace"), &ws);
    std::fs::create_dir_all(ws.join("wait")).unwrap();
    std::fs::write(
        ws.join("wait/BUILD"),
        "genrule(name = \"six\", outs = [\"six.txt\"], cmd = \"sleep 6 && echo ok > $@\")\n",
    )
    .unwrap();
    let spool = work.path().join("spool");
    let port = free_port();
    let mut backend = spawn_backend(port, &url, &spool, &[]);
    let json = work.path().join("wait.json");
    let build = bazel_command(bazel, work.path(), &ws)
        .args(["build", "//wait:six", "//app/..."])
        .arg(format!("--bes_backend=grpc://127.0.0.1:{port}"))
        .arg(format!("--build_event_json_file={}", json.display()))
        .arg("--bes_timeout=120s")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bazel");
    // Kill the backend once the build is under way (its spool has the invocation).
    let has_spool = || {
        std::fs::read_dir(&spool)
            .map(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.path().extension().is_some_and(|x| x == "spool"))
            })
            .unwrap_or(false)
    };
    assert!(
        wait_until(60, has_spool),
        "the build's stream reached the backend"
    );
    std::thread::sleep(Duration::from_millis(1500));
    backend.kill().unwrap();
    backend.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let log = work.path().join("second-backend.log");
    let mut again = spawn_backend_logged(port, &url, &spool, &[], Some(&log));
    let out = build.wait_with_output().expect("bazel finishes");
    let _ = bazel_command(bazel, work.path(), &ws)
        .arg("shutdown")
        .output();
    again.kill().unwrap();
    again.wait().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Bazel's retry reached the new backend mid-stream, which replayed its spool.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("resuming at sequence number") && log.contains("spooled events"),
        "{log}"
    );
    let got = distinct(envelopes(&rt().block_on(drain(&url, DSI_QUEUE))));
    same_messages(&got, &translate(&json).0);
}

fn bazel_binary() -> &'static str {
    ["/usr/bin/bazel-4", "/usr/bin/bazel"]
        .into_iter()
        .find(|b| Path::new(b).exists())
        .expect("bazel-bootstrap is installed (scripts/ensure-deps.sh)")
}

/// Bazel with a scrubbed environment and its own output root under `home`.
fn bazel_command(bazel: &str, home: &Path, ws: &Path) -> Command {
    let mut c = Command::new(bazel);
    c.env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .current_dir(ws)
        .arg(format!(
            "--output_user_root={}",
            home.join("root").display()
        ));
    c
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// Bad input on a stream: an event that is not a protobuf `BuildEvent` and one of
/// another type are skipped (and acked: Bazel would resend them forever), everything
/// else is still translated; a request without an event fails the stream with
/// `INVALID_ARGUMENT`.
#[test]
fn bad_events_are_skipped_and_the_build_goes_on() {
    use buildbus::sources::bes::proto::v1::build_event::Event as BesEvent;
    let (url, _) = vhost("bes-bad-input");
    let spool = tempdir();
    let mut reqs = stream_requests("bazel/bes_capture.jsonl");
    assert_eq!(reqs.len(), 30);
    let mut finish = reqs.pop().unwrap();
    let template = reqs[5].clone();
    let bad = |seq: i64, type_url: &str, value: &[u8]| {
        let mut r = template.clone();
        let o = r.ordered_build_event.as_mut().unwrap();
        o.sequence_number = seq;
        o.event.as_mut().unwrap().event = Some(BesEvent::BazelEvent(pbjson_types::Any {
            type_url: type_url.to_string(),
            value: value.to_vec().into(),
        }));
        r
    };
    reqs.push(bad(
        30,
        buildbus::sources::bes::proto::BAZEL_EVENT_TYPE,
        b"\xff\xff\xff garbage",
    ));
    reqs.push(bad(31, "type.googleapis.com/some.Other", b"\x08\x01"));
    finish.ordered_build_event.as_mut().unwrap().sequence_number = 32;
    reqs.push(finish);
    rt().block_on(async {
        let backend = bes::start(backend_cfg(&url, spool.path()), ctx())
            .await
            .unwrap();
        let mut client = capture::connect(&http(backend.addr)).await.unwrap();
        let acks = capture::send_stream(&mut client, reqs, &vec![])
            .await
            .unwrap();
        assert_eq!(acks, (1..=32).collect::<Vec<_>>());
        let got = distinct(envelopes(&drain(&url, DSI_QUEUE).await));
        same_messages(&got, &clean("bazel/bes_capture.bep.json"));
        // No event at all: refused, naming what is missing.
        let empty = PublishBuildToolEventStreamRequest::default();
        let err = capture::send_stream(&mut client, vec![empty], &vec![])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("InvalidArgument") && err.contains("ordered_build_event"),
            "{err}"
        );
        backend.stop().await.unwrap();
    });
}

/// `buildbus bes` with `args`, no BUILDBUS_* environment (no token from outside), stderr
/// piped.
fn bes_command(args: &[&str]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_buildbus"));
    for (k, _) in std::env::vars() {
        if k.starts_with("BUILDBUS_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("bes")
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("buildbus bes")
}

/// A non-loopback address without auth is refused at start unless `--insecure` is
/// given; with it the backend starts, after a warning.
#[test]
fn non_loopback_without_auth_needs_insecure() {
    use std::io::{BufRead, BufReader, Read};

    let args = ["--listen", "0.0.0.0:0", "--print", "--no-spool"];
    let mut child = bes_command(&args);
    let exited = wait_until(20, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        child.kill().unwrap();
        child.wait().unwrap();
        panic!("buildbus bes on 0.0.0.0 without auth did not stop by itself");
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without authentication")
            && err.contains("--auth-token")
            && err.contains("--insecure"),
        "{err}"
    );

    // With --insecure: a warning, then it listens (stopped here by the test).
    let mut child = bes_command(&[&args[..], &["--insecure"]].concat());
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let listening = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("buildbus bes: listening on 0.0.0.0:") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(listening, "no listening line: {seen:?}");
    assert!(
        seen.iter()
            .any(|l| l.contains("WARN") && l.contains("without authentication")),
        "{seen:?}"
    );
}
