//! A live BitBake session translated and published: the same messages as the event log
//! BitBake wrote during that session (`live-xmlrpc.eventlog`).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::bitbake_replay::{ReplayData, ReplayOptions, ReplayServer};
use buildbus::bus::topology::DSI_QUEUE;
use buildbus::pipeline::bitbake_live::translate_live;
use buildbus::sources::bitbake_live::{LiveEnd, LiveOptions};
use buildbus::systems::Context;

use crate::harness::*;

fn from_log() -> BTreeSet<String> {
    clean("bitbake/live-xmlrpc.eventlog")
        .iter()
        .map(identity)
        .collect()
}

fn replay(rt: &tokio::runtime::Runtime) -> ReplayServer {
    let data = Arc::new(ReplayData::load_dir(&fixture("bitbake")).expect("recording"));
    rt.block_on(ReplayServer::start(data, ReplayOptions::default()))
        .expect("replay server")
}

#[test]
fn a_live_session_gives_the_messages_of_its_event_log() {
    let rt = rt();
    let server = replay(&rt);
    let mut opts = LiveOptions::build(server.addr().to_string(), vec!["demo-image".into()]);
    opts.env = Some(vec![("PATH".into(), "/usr/bin:/bin".into())]);
    let mut msgs = Vec::new();
    let report = rt
        .block_on(translate_live(
            opts,
            Arc::new(Context::builtin()),
            None,
            |e| msgs.push(e),
        ))
        .expect("session");
    assert_eq!(report.live.end, LiveEnd::CommandCompleted);
    assert_eq!(report.live.events, 686);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let live: BTreeSet<String> = msgs.iter().map(identity).collect();
    let log = from_log();
    let only_live: Vec<_> = live.difference(&log).take(2).collect();
    let only_log: Vec<_> = log.difference(&live).take(2).collect();
    assert!(
        live == log,
        "live-only {only_live:#?}\nlog-only {only_log:#?}"
    );
    assert_eq!(msgs[0].meta.source.format, "bitbake-xmlrpc");
    let f = finished(&msgs);
    assert_eq!(f.common.platform.as_deref(), Some("demo-qemux86-64"));
    assert_eq!(f.common.product.as_deref(), Some("demodistro"));
}

#[test]
fn bitbake_live_prints_and_publishes() {
    let rt = rt();
    // --print: JSON lines on stdout.
    let server = replay(&rt);
    let addr = server.addr().to_string();
    let o = buildbus(&[
        "bitbake-live",
        "--server",
        &addr,
        "--target",
        "demo-image",
        "--print",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed: BTreeSet<String> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["_meta"]["sent"] = serde_json::Value::Null;
            v["_meta"]["source"] = serde_json::Value::Null;
            v.to_string()
        })
        .collect();
    assert_eq!(printed, from_log());
    // Publishing: every message confirmed onto the bus.
    let (url, _) = vhost("bb-live");
    let server = replay(&rt);
    let addr = server.addr().to_string();
    let o = buildbus(&[
        "bitbake-live",
        "--server",
        &addr,
        "--target",
        "demo-image",
        "--url",
        &url,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let want: BTreeSet<String> = clean("bitbake/live-xmlrpc.eventlog")
        .iter()
        .map(|m| m.meta.message_id.clone())
        .collect();
    assert!(
        err.contains(&format!("{} messages published", want.len())),
        "{err}"
    );
    let got: BTreeSet<String> = rt
        .block_on(drain(&url, DSI_QUEUE))
        .iter()
        .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(got, want);
}
