//! The live XML-RPC event sink against a server that replays the recorded session
//! (`tests/fixtures/bitbake/live-*`): the UI's calls, the token, every event in order
//! and byte for byte, observing, and the failures (busy cooker, garbage calls,
//! connection refused, interrupts, a server that goes away).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bitbake_replay::{
    RecordedCall, ReplayData, ReplayEvent, ReplayOptions, ReplayServer, ReplayStart,
};
use base64::Engine as _;
use buildbus::decode::pickle;
use buildbus::decode::xmlrpc::{self, MethodResponse, Value};
use buildbus::sources::bitbake_live::{
    interrupt_channel, run_live, run_live_with, LiveEnd, LiveError, LiveEvent, LiveOptions,
    LiveReport, FAULT_PARAMS, FAULT_PARSE,
};

use crate::harness::fixture;

const TOKEN: &str = "60d237d0e2c07ed87a3c4babd2cd3626";

fn data() -> Arc<ReplayData> {
    Arc::new(ReplayData::load_dir(&fixture("bitbake")).expect("recording loads"))
}

/// The classes of `live-calls.jsonl`, in order.
fn call_classes() -> Vec<String> {
    std::fs::read_to_string(fixture("bitbake/live-calls.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let j: serde_json::Value = serde_json::from_str(l).unwrap();
            j["class"].as_str().unwrap().to_string()
        })
        .collect()
}

/// The event log's lines: (class, pickle) of each event, and the allvariables.
fn eventlog() -> (Vec<(String, Vec<u8>)>, serde_json::Value) {
    let mut events = Vec::new();
    let mut vars = serde_json::Value::Null;
    for l in std::fs::read_to_string(fixture("bitbake/live-xmlrpc.eventlog"))
        .unwrap()
        .lines()
    {
        let j: serde_json::Value = serde_json::from_str(l).unwrap();
        if let Some(v) = j.get("allvariables") {
            vars = v.clone();
            continue;
        }
        let b64: String = j["vars"]
            .as_str()
            .unwrap()
            .chars()
            .filter(|c| *c != '\n')
            .collect();
        let pickle = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        events.push((j["class"].as_str().unwrap().to_string(), pickle));
    }
    (events, vars)
}

async fn run(opts: LiveOptions) -> (Result<LiveReport, LiveError>, Vec<LiveEvent>) {
    let mut events = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(120), run_live(opts, |e| events.push(e)))
        .await
        .expect("the session ends");
    (r, events)
}

fn build_opts(server: &ReplayServer) -> LiveOptions {
    let mut o = LiveOptions::build(server.addr().to_string(), vec!["demo-image".into()]);
    o.env = Some(vec![("PATH".into(), "/usr/bin:/bin".into())]);
    o
}

fn labels(calls: &[RecordedCall]) -> Vec<String> {
    calls.iter().map(RecordedCall::label).collect()
}

fn command_args(c: &RecordedCall) -> &[Value] {
    c.params[0].as_array().unwrap()
}

/// Every event arrived in the call log's order, byte for byte a pickle of the event
/// log (each one used once), and decodes.
fn check_events(events: &[LiveEvent]) {
    let classes = call_classes();
    let (logged, _) = eventlog();
    assert_eq!(events.len(), 686);
    assert_eq!(classes.len(), 686);
    let mut used = vec![false; logged.len()];
    let mut same_place = 0;
    for (i, ev) in events.iter().enumerate() {
        assert_eq!(ev.seq, i as u64 + 1);
        assert_eq!(ev.class(), Some(classes[i].as_str()), "event {}", ev.seq);
        let k = (0..logged.len())
            .find(|&k| !used[k] && logged[k].1 == ev.pickle)
            .unwrap_or_else(|| panic!("event {} is no pickle of the event log", ev.seq));
        used[k] = true;
        assert_eq!(logged[k].0, classes[i]);
        assert!(
            k.abs_diff(i) <= 3,
            "event {} is {} places from its log line",
            ev.seq,
            k.abs_diff(i)
        );
        same_place += usize::from(k == i);
        let v = pickle::loads(&ev.pickle).expect("decodes");
        assert_eq!(ev.value.as_ref().ok(), Some(&v));
    }
    assert!(used.iter().all(|u| *u));
    // The parser processes' events are the only ones in another order.
    assert_eq!(same_place, 686 - 23);
    assert!(events.windows(2).all(|w| w[0].received <= w[1].received));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_against_the_replayed_session() {
    let data = data();
    let server = ReplayServer::start(data.clone(), ReplayOptions::default())
        .await
        .unwrap();
    let (r, events) = run(build_opts(&server)).await;
    let report = r.expect("session succeeds");

    assert_eq!(report.end, LiveEnd::CommandCompleted);
    assert_eq!(report.events, 686);
    assert_eq!(
        (
            report.decode_errors,
            report.rejected_calls,
            report.overflowed
        ),
        (0, 0, 0)
    );
    assert_eq!(report.handle, Some(1));
    assert_eq!(report.token.as_deref(), Some(TOKEN));
    assert!(
        report.cleanup_errors.is_empty(),
        "{:?}",
        report.cleanup_errors
    );
    check_events(&events);

    // The UI's calls, in order (the variables are fetched when BuildStarted arrives).
    let calls = server.calls();
    let mut l = labels(&calls);
    let vars_at = l
        .iter()
        .position(|c| c == "runCommand(getAllKeysWithFlags)")
        .expect("variables fetched");
    l.remove(vars_at);
    assert_eq!(
        l,
        [
            "registerEventHandler",
            "runCommand(setFeatures)",
            "addClient",
            "runCommand(updateConfig)",
            "runCommand(setEventMask)",
            "runCommand(buildTargets)",
            "unregisterEventHandler",
            "removeClient",
        ]
    );
    assert!(vars_at > 5 && vars_at < 7, "{:?}", labels(&calls));

    let (host, port) = &report.advertised;
    assert_eq!((host.as_str(), *port), ("127.0.0.1", report.listen.port()));
    assert_eq!(
        calls[0].params,
        [
            Value::str("127.0.0.1"),
            Value::Int(i64::from(report.listen.port()))
        ]
    );
    assert_eq!(
        command_args(&calls[1])[1],
        Value::Array(vec![Value::Int(0), Value::Int(1), Value::Int(2)])
    );
    // The token: none before addClient, the server's after it.
    for (i, c) in calls.iter().enumerate() {
        let want = (i > 2).then_some(TOKEN);
        assert_eq!(c.token.as_deref(), want, "call {i} {}", c.label());
        assert!(c
            .headers
            .iter()
            .any(|(k, v)| k == "content-type" && v == "text/xml"));
    }
    let update = command_args(&calls[3]);
    assert_eq!(update[1].get("profile"), Some(&Value::Array(vec![])));
    assert_eq!(update[1].get("halt"), Some(&Value::Bool(true)));
    assert_eq!(
        update[2],
        Value::Struct(vec![("PATH".into(), Value::str("/usr/bin:/bin"))])
    );
    assert_eq!(update[3], Value::strings(["bitbake", "demo-image"]));
    assert_eq!(
        command_args(&calls[4]),
        [
            Value::str("setEventMask"),
            Value::Int(1),
            Value::Int(20),
            Value::Struct(vec![]),
            Value::strings(["*"]),
        ]
    );
    let build = calls
        .iter()
        .find(|c| c.command() == Some("buildTargets"))
        .unwrap();
    assert_eq!(
        command_args(build),
        [
            Value::str("buildTargets"),
            Value::strings(["demo-image"]),
            Value::str("build")
        ]
    );
    let unregister = calls
        .iter()
        .find(|c| c.method == "unregisterEventHandler")
        .unwrap();
    assert_eq!(unregister.params, [Value::Int(1)]);

    // The build's variables ride on BuildStarted, as in the event log.
    let with_vars: Vec<&LiveEvent> = events.iter().filter(|e| e.variables.is_some()).collect();
    assert_eq!(with_vars.len(), 1);
    assert_eq!(with_vars[0].class(), Some("bb.event.BuildStarted"));
    assert_eq!(with_vars[0].variables.as_ref(), Some(&eventlog().1));
    assert_eq!(report.variables_fetched, 1);

    // Every call was answered at once and without a fault.
    let del = server.deliveries();
    assert_eq!(del.len(), 686);
    assert!(del
        .iter()
        .all(|d| d.status == Some(200) && d.answer == Ok(MethodResponse::Success(Value::Nil))));
    // The pickles are what the event log's vars say, base64 and all.
    for (ev, rec) in events.iter().zip(&data.events) {
        assert_eq!(ev.vars_base64(), rec.vars);
    }
    server.stop().await;
}

#[tokio::test]
async fn observes_without_taking_the_server() {
    let opts = ReplayOptions {
        start: ReplayStart::AfterRegister,
        ..ReplayOptions::default()
    };
    let server = ReplayServer::start(data(), opts).await.unwrap();
    let (r, events) = run(LiveOptions::observe(server.addr().to_string())).await;
    let report = r.unwrap();
    assert_eq!(report.end, LiveEnd::CommandCompleted);
    assert_eq!(report.token.as_deref(), Some("observer"));
    check_events(&events);
    let calls = server.calls();
    assert_eq!(
        labels(&calls),
        [
            "registerEventHandler",
            "runCommand(setEventMask)",
            "runCommand(getAllKeysWithFlags)",
            "unregisterEventHandler",
        ]
    );
    assert_eq!(calls[0].token, None);
    assert!(calls[1..]
        .iter()
        .all(|c| c.token.as_deref() == Some("observer")));
    server.stop().await;
}

#[tokio::test]
async fn an_observer_that_keeps_observing_ends_on_event_quit() {
    let opts = ReplayOptions {
        start: ReplayStart::AfterRegister,
        send_quit: true,
        ..ReplayOptions::default()
    };
    let server = ReplayServer::start(data(), opts).await.unwrap();
    let mut o = LiveOptions::observe(server.addr().to_string());
    o.keep_observing = true;
    o.fetch_variables = false;
    o.idle_probe = None;
    let (r, events) = run(o).await;
    let report = r.unwrap();
    assert_eq!(report.end, LiveEnd::Quit);
    check_events(&events);
    let del = server.deliveries();
    assert_eq!(del.len(), 687);
    assert_eq!(del[686].event, None);
    assert_eq!(del[686].answer, Ok(MethodResponse::Success(Value::Nil)));
    assert_eq!(
        labels(&server.calls()),
        [
            "registerEventHandler",
            "runCommand(setEventMask)",
            "unregisterEventHandler"
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_busy_cooker_is_a_clear_error_after_the_retries() {
    let opts = ReplayOptions {
        busy_registrations: u32::MAX,
        ..ReplayOptions::default()
    };
    let server = ReplayServer::start(data(), opts).await.unwrap();
    let mut o = build_opts(&server);
    o.register_attempts = 2;
    o.register_retry_delay = Duration::from_millis(10);
    let (r, events) = run(o).await;
    let e = r.unwrap_err();
    assert!(matches!(e, LiveError::Refused { .. }), "{e:?}");
    assert_eq!(e.call(), Some("registerEventHandler"));
    let msg = e.to_string();
    let server_addr = server.addr().to_string();
    assert!(
        msg.starts_with(&format!(
            "bitbake server {server_addr}: registerEventHandler refused: Cooker is busy: parsing (host 127.0.0.1, port "
        )),
        "{msg}"
    );
    assert!(msg.ends_with(", 2 attempt(s))"), "{msg}");
    assert!(events.is_empty());
    assert_eq!(
        labels(&server.calls()),
        ["registerEventHandler", "registerEventHandler"]
    );
    server.stop().await;

    // Busy once: the retry gets in.
    let opts = ReplayOptions {
        busy_registrations: 1,
        ..ReplayOptions::default()
    };
    let server = ReplayServer::start(data(), opts).await.unwrap();
    let mut o = build_opts(&server);
    o.register_retry_delay = Duration::from_millis(10);
    let (r, events) = run(o).await;
    assert_eq!(r.unwrap().end, LiveEnd::CommandCompleted);
    assert_eq!(events.len(), 686);
    server.stop().await;
}

#[tokio::test]
async fn garbage_calls_get_faults_and_the_session_goes_on() {
    let bad_param = xmlrpc::encode_call("event.sendpickle", &[Value::str("gASV")]);
    let not_a_pickle = xmlrpc::encode_call(
        "event.sendpickle",
        &[Value::Base64(b"not a pickle".to_vec())],
    );
    let opts = ReplayOptions {
        inject: vec![
            (5, b"\x00garbage<methodCall>".to_vec()),
            (10, bad_param.into_bytes()),
            (20, not_a_pickle.into_bytes()),
        ],
        ..ReplayOptions::default()
    };
    let server = ReplayServer::start(data(), opts).await.unwrap();
    let (r, mut events) = run(build_opts(&server)).await;
    let report = r.unwrap();
    assert_eq!(report.end, LiveEnd::CommandCompleted);
    assert_eq!(report.rejected_calls, 2);
    assert_eq!(report.decode_errors, 1);
    assert_eq!(report.events, 687);

    // The undecodable pickle is an event of its own, with its error, in its place.
    let bad = events.remove(20);
    assert_eq!(bad.seq, 21);
    assert_eq!(&bad.pickle[..], b"not a pickle");
    let err = bad.value.unwrap_err().to_string();
    assert!(err.starts_with("pickle: byte 0"), "{err}");
    for (i, e) in events.iter_mut().enumerate() {
        assert_eq!(e.seq, if i < 20 { i as u64 + 1 } else { i as u64 + 2 });
        e.seq = i as u64 + 1;
    }
    check_events(&events);

    let injected: Vec<_> = server
        .deliveries()
        .into_iter()
        .filter(|d| d.event.is_none())
        .collect();
    let code = |d: &crate::bitbake_replay::Delivery| match &d.answer {
        Ok(MethodResponse::Fault { code, .. }) => Some(*code),
        _ => None,
    };
    assert_eq!(injected.len(), 3);
    assert_eq!(code(&injected[0]), Some(FAULT_PARSE));
    assert_eq!(code(&injected[1]), Some(FAULT_PARAMS));
    assert_eq!(injected[2].answer, Ok(MethodResponse::Success(Value::Nil)));
    server.stop().await;
}

#[tokio::test]
async fn connection_refused_is_a_clear_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let (r, events) = run(LiveOptions::build(addr.clone(), vec!["demo-image".into()])).await;
    let e = r.unwrap_err();
    assert!(matches!(e, LiveError::Connect { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "bitbake server {addr}: registerEventHandler: cannot connect: "
        )),
        "{msg}"
    );
    assert!(events.is_empty());
}

#[tokio::test]
async fn interrupts_stop_the_build_then_leave() {
    let opts = ReplayOptions {
        max_events: Some(100),
        ..ReplayOptions::default()
    };
    let server = ReplayServer::start(data(), opts).await.unwrap();
    let (interrupter, interrupts) = interrupt_channel();
    let mut events = Vec::new();
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        run_live_with(build_opts(&server), Some(interrupts), |e: LiveEvent| {
            if e.seq == 100 {
                // Ctrl-C three times.
                for _ in 0..3 {
                    interrupter.interrupt();
                }
            }
            events.push(e);
        }),
    )
    .await
    .unwrap();
    let report = r.unwrap();
    assert_eq!(report.end, LiveEnd::Interrupted);
    assert_eq!(events.len(), 100);
    let l = labels(&server.calls());
    assert_eq!(
        &l[l.len() - 4..],
        [
            "runCommand(stateShutdown)",
            "runCommand(stateForceShutdown)",
            "unregisterEventHandler",
            "removeClient",
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn a_server_that_goes_away_ends_the_session() {
    let opts = ReplayOptions {
        max_events: Some(50),
        ..ReplayOptions::default()
    };
    let server = ReplayServer::start(data(), opts).await.unwrap();
    let mut o = build_opts(&server);
    o.idle_probe = Some(Duration::from_millis(300));
    let seen = Arc::new(Mutex::new(0usize));
    let session = {
        let seen = seen.clone();
        tokio::spawn(run_live(o, move |_| *seen.lock().unwrap() += 1))
    };
    server.wait_sent().await;
    let addr = server.addr().to_string();
    server.stop().await;
    let r = tokio::time::timeout(Duration::from_secs(30), session)
        .await
        .unwrap()
        .unwrap();
    let e = r.unwrap_err();
    assert!(matches!(e, LiveError::ServerGone { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with(&format!("bitbake server {addr} went away")),
        "{e}"
    );
    assert_eq!(*seen.lock().unwrap(), 50);
}

#[tokio::test]
async fn a_failed_command_ends_the_session_with_its_error() {
    // The recorded answers, with the events of a build that found nothing to build.
    let mut d = (*data()).clone();
    d.allvariables = None;
    d.events = std::fs::read_to_string(fixture("bitbake/nothing-provides.eventlog"))
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let j: serde_json::Value = serde_json::from_str(l).unwrap();
            let vars = j["vars"].as_str().unwrap().to_string();
            ReplayEvent {
                call: i,
                log_line: i + 1,
                class: j["class"].as_str().unwrap().to_string(),
                pickle: xmlrpc::decode_base64(&vars).unwrap(),
                vars,
            }
        })
        .collect();
    let server = ReplayServer::start(Arc::new(d), ReplayOptions::default())
        .await
        .unwrap();
    let (r, events) = run(build_opts(&server)).await;
    let report = r.unwrap();
    assert_eq!(
        report.end,
        LiveEnd::CommandFailed {
            error: String::new(),
            exitcode: Some(1)
        }
    );
    assert_eq!(events.len(), 21);
    assert_eq!(events[19].class(), Some("bb.event.NoProvider"));
    assert_eq!(report.variables_fetched, 0, "no BuildStarted, no variables");
    assert_eq!(
        labels(&server.calls())[5..],
        [
            "runCommand(buildTargets)",
            "unregisterEventHandler",
            "removeClient"
        ]
    );
    server.stop().await;
}
