//! The client library and `buildbus monitor` on a real broker: filters (alone,
//! combined, tags), the bindings actually declared, durable subscriptions, failing
//! callbacks, stop and join, a broker restart, and `monitor --exec`.
//!
//! The messages are real translations of the Bazel fixtures, each build given its own
//! tree, platform, buildtype, product and tags (the `--tree` ... overrides), so there are
//! values to filter on. Every expectation is computed from those translations with a
//! predicate written here, independently of the library's own filter code.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use buildbus::bus::message::{header, Outgoing};
use buildbus::bus::publish::{Publisher, PublisherConfig};
use buildbus::bus::topology::DEAD_LETTER_QUEUE;
use buildbus::config::{Config, FieldValues};
use buildbus::consumers::client::{ClientError, Monitor, MonitorBuilder};
use buildbus::model::{BuildState, Envelope, Kind, Payload, DEFAULT_EXCHANGE_PREFIX};
use buildbus::systems::Context;
use buildbus_testkit::rabbitmq::RabbitNode;

use crate::harness::*;

/// One build published: fixture, tree, platform, buildtype, product, tags.
type Build = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
);

/// The builds published.
const BUILDS: [Build; 5] = [
    (
        "bazel/build_ok.json",
        "alpha",
        "linux",
        "opt",
        "fw",
        &["nightly", "asan"],
    ),
    (
        "bazel/build_fail.json",
        "beta",
        "mac",
        "dbg",
        "fw",
        &["nightly"],
    ),
    (
        "bazel/test_mixed.json",
        "alpha",
        "mac",
        "dbg",
        "app",
        &["release"],
    ),
    (
        "bazel/interrupted.json",
        "gamma.core",
        "linux",
        "opt",
        "app",
        &["asan", "release"],
    ),
    (
        "bazel/pattern_fail.json",
        "beta",
        "linux",
        "dbg",
        "app",
        &[],
    ),
];

fn translate_as(i: usize) -> Vec<Envelope> {
    let (rel, tree, platform, buildtype, product, tags) = BUILDS[i];
    let fields = FieldValues {
        tree: Some(tree.into()),
        platform: Some(platform.into()),
        buildtype: Some(buildtype.into()),
        product: Some(product.into()),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    let ctx = Context::new(&Config::builtin(), &fields).unwrap();
    let (msgs, report) = translate_with(&fixture(rel), &ctx);
    assert!(report.clean(), "{rel}: {:?}", report.errors);
    msgs
}

/// Every message of every build, in publish order.
fn data() -> &'static [Envelope] {
    static DATA: OnceLock<Vec<Envelope>> = OnceLock::new();
    DATA.get_or_init(|| (0..BUILDS.len()).flat_map(translate_as).collect())
}

fn build_msgs(i: usize) -> Vec<Envelope> {
    let id = translate_as(i)[0].payload.common().build_id.clone();
    data()
        .iter()
        .filter(|m| m.payload.common().build_id == id)
        .cloned()
        .collect()
}

async fn publish_async(url: &str, msgs: &[Envelope]) {
    let mut cfg = PublisherConfig::new(url, DEFAULT_EXCHANGE_PREFIX);
    cfg.declare_dsi_queue = false;
    let mut p = Publisher::<u64>::connect(cfg).await.expect("connect");
    for (i, m) in msgs.iter().enumerate() {
        p.publish(Outgoing::from_envelope(m), i as u64)
            .await
            .expect("publish");
    }
    p.close().await.expect("close");
}

fn publish(url: &str, msgs: &[Envelope]) {
    rt().block_on(publish_async(url, msgs));
}

/// AMQP topic matching (written again here, to check the broker's work).
fn topic_match(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&w, rest)) => match k.split_first() {
                Some((&kw, krest)) => (w == "*" || w == kw) && go(rest, krest),
                None => false,
            },
        }
    }
    go(
        &pattern.split('.').collect::<Vec<_>>(),
        &key.split('.').collect::<Vec<_>>(),
    )
}

/// Messages a monitor's queue gets from the broker, by its bindings.
fn routed(m: &Monitor, msgs: &[Envelope]) -> usize {
    msgs.iter()
        .filter(|e| {
            m.bindings().iter().any(|b| {
                b.exchange == e.meta.exchange && topic_match(&b.routing_key, &e.meta.routing_key)
            })
        })
        .count()
}

/// The filters of one case, and the predicate they mean.
#[derive(Debug, Clone, Default)]
struct F {
    trees: Vec<String>,
    platforms: Vec<&'static str>,
    buildtypes: Vec<&'static str>,
    products: Vec<&'static str>,
    tests: Vec<&'static str>,
    tags: Vec<Vec<&'static str>>,
    kinds: Vec<Kind>,
}

impl F {
    fn pass(&self, e: &Envelope) -> bool {
        let c = e.payload.common();
        let any = |set: &[&str], v: &Option<std::sync::Arc<str>>| {
            set.is_empty() || v.as_deref().is_some_and(|v| set.contains(&v))
        };
        let trees: Vec<&str> = self.trees.iter().map(String::as_str).collect();
        (self.kinds.is_empty() || self.kinds.contains(&e.kind()))
            && any(&trees, &c.tree)
            && any(&self.platforms, &c.platform)
            && any(&self.buildtypes, &c.buildtype)
            && any(&self.products, &c.product)
            && match &e.payload {
                Payload::Test(t) => self.tests.is_empty() || self.tests.contains(&t.test.as_str()),
                _ => true,
            }
            && (self.tags.is_empty()
                || self
                    .tags
                    .iter()
                    .any(|all| all.iter().all(|t| c.tags.iter().any(|h| h == t))))
    }

    fn apply(&self, mut b: MonitorBuilder) -> MonitorBuilder {
        b = b
            .trees(self.trees.iter().cloned())
            .platforms(self.platforms.iter().copied())
            .buildtypes(self.buildtypes.iter().copied())
            .products(self.products.iter().copied())
            .tests(self.tests.iter().copied())
            .kinds(self.kinds.iter().copied());
        for set in &self.tags {
            b = b.build_tags(set.iter().copied());
        }
        b
    }
}

fn is_finished_build(e: &Envelope) -> bool {
    matches!(&e.payload, Payload::Build(b) if b.state == BuildState::Finished)
}

fn is_test_summary(e: &Envelope) -> bool {
    matches!(&e.payload, Payload::Test(t) if t.scope == "summary")
}

/// What callbacks saw: message ids per callback name.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<BTreeMap<&'static str, Vec<String>>>>);

impl Seen {
    fn add(&self, cb: &'static str, e: &Envelope) {
        self.0
            .lock()
            .unwrap()
            .entry(cb)
            .or_default()
            .push(e.meta.message_id.clone());
    }

    fn ids(&self, cb: &str) -> Vec<String> {
        let mut v = self.0.lock().unwrap().get(cb).cloned().unwrap_or_default();
        v.sort();
        v
    }
}

fn ids<'a>(msgs: impl IntoIterator<Item = &'a Envelope>) -> Vec<String> {
    let mut v: Vec<String> = msgs
        .into_iter()
        .map(|m| m.meta.message_id.clone())
        .collect();
    v.sort();
    v
}

/// A monitor recording what `on_match`, `on_build` and `on_test` get.
fn recording(url: &str, f: &F, seen: &Seen) -> MonitorBuilder {
    let (a, b, c) = (seen.clone(), seen.clone(), seen.clone());
    let kind = |k| f.kinds.is_empty() || f.kinds.contains(&k);
    let mut m = f
        .apply(MonitorBuilder::new(url))
        .workers(2)
        .on_match(move |_, e| a.add("match", e));
    if kind(Kind::Build) {
        m = m.on_build(move |m, _| b.add("build", m.envelope.as_ref().unwrap()));
    }
    if kind(Kind::Test) {
        m = m.on_test(move |m, _| c.add("test", m.envelope.as_ref().unwrap()));
    }
    m
}

/// Waits until every monitor has settled all it should get from the broker.
fn settle(monitors: &[(&str, &Monitor, usize)]) {
    let done = || {
        monitors.iter().all(|(_, m, want)| {
            let s = m.stats();
            s.received as usize >= *want && (s.handled + s.filtered) as usize >= *want
        })
    };
    let ok = wait_until(60, done);
    // Anything extra would come in the same burst.
    std::thread::sleep(Duration::from_millis(300));
    for (name, m, want) in monitors {
        assert!(ok, "{name}: {:?}, wanted {want}", m.stats());
        assert_eq!(
            m.stats().received as usize,
            *want,
            "{name}: {:?}",
            m.stats()
        );
    }
}

#[test]
fn each_filter_alone_and_combined_delivers_exactly_what_it_allows() {
    let (url, _) = vhost("client-filters");
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases: Vec<(&str, F)> = vec![
        (
            "tree",
            F {
                trees: s(&["alpha"]),
                ..Default::default()
            },
        ),
        (
            "platform",
            F {
                platforms: vec!["mac"],
                ..Default::default()
            },
        ),
        (
            "buildtype",
            F {
                buildtypes: vec!["opt"],
                ..Default::default()
            },
        ),
        (
            "product",
            F {
                products: vec!["app"],
                ..Default::default()
            },
        ),
        (
            "test",
            F {
                tests: vec!["//tests:fail_test"],
                ..Default::default()
            },
        ),
        (
            "combined",
            F {
                trees: s(&["alpha", "gamma.core"]),
                platforms: vec!["linux"],
                buildtypes: vec!["opt"],
                ..Default::default()
            },
        ),
        (
            "kinds",
            F {
                kinds: vec![Kind::Build, Kind::Log],
                ..Default::default()
            },
        ),
        (
            "tags-and",
            F {
                tags: vec![vec!["nightly", "asan"]],
                ..Default::default()
            },
        ),
        (
            "tags-or-of-ands",
            F {
                tags: vec![vec!["nightly", "asan"], vec!["release"]],
                ..Default::default()
            },
        ),
        (
            // 70 x 2 = 140 bindings per exchange: widened to the cap, filtered here.
            "over-the-cap",
            F {
                trees: (0..68)
                    .map(|i| format!("t{i}"))
                    .chain(s(&["alpha", "beta"]))
                    .collect(),
                platforms: vec!["mac", "linux"],
                ..Default::default()
            },
        ),
    ];
    let mut monitors = Vec::new();
    for (name, f) in &cases {
        let seen = Seen::default();
        let m = recording(&url, f, &seen).start().expect("start");
        monitors.push((*name, f.clone(), seen, m));
    }
    // on_build alone: the broker only sends finished builds.
    let only_builds = Seen::default();
    let ob = only_builds.clone();
    let builds_f = F {
        trees: s(&["beta"]),
        ..Default::default()
    };
    let builds_m = builds_f
        .apply(MonitorBuilder::new(&url))
        .on_build(move |m, _| ob.add("build", m.envelope.as_ref().unwrap()))
        .start()
        .unwrap();
    // on_message is unfiltered, the typed callbacks beside it are not.
    let raw = Seen::default();
    let (r1, r2) = (raw.clone(), raw.clone());
    let raw_count = Arc::new(AtomicU64::new(0));
    let rc = raw_count.clone();
    let raw_m = MonitorBuilder::new(&url)
        .trees(["alpha"])
        .on_message(move |m| {
            rc.fetch_add(1, Ordering::Relaxed);
            r1.add("message", m.envelope.as_ref().unwrap());
        })
        .on_build(move |m, _| r2.add("build", m.envelope.as_ref().unwrap()))
        .start()
        .unwrap();
    for (name, _, _, m) in &monitors {
        assert!(m.wait_ready(Duration::from_secs(30)), "{name}");
    }
    assert!(builds_m.wait_ready(Duration::from_secs(30)));
    assert!(raw_m.wait_ready(Duration::from_secs(30)));

    publish(&url, data());

    let all = data();
    let mut waits: Vec<(&str, &Monitor, usize)> = monitors
        .iter()
        .map(|(n, _, _, m)| (*n, m, routed(m, all)))
        .collect();
    waits.push(("on_build only", &builds_m, routed(&builds_m, all)));
    waits.push(("on_message", &raw_m, routed(&raw_m, all)));
    settle(&waits);

    for (name, f, seen, m) in &monitors {
        let want: Vec<&Envelope> = all.iter().filter(|e| f.pass(e)).collect();
        assert!(
            !want.is_empty(),
            "{name}: a case that selects nothing proves little"
        );
        assert!(
            want.len() < all.len(),
            "{name}: a case that selects everything proves little"
        );
        assert_eq!(
            seen.ids("match"),
            ids(want.iter().copied()),
            "{name}: on_match"
        );
        assert_eq!(
            seen.ids("build"),
            ids(want.iter().copied().filter(|e| is_finished_build(e))),
            "{name}: on_build"
        );
        assert_eq!(
            seen.ids("test"),
            ids(want.iter().copied().filter(|e| is_test_summary(e))),
            "{name}: on_test"
        );
        let st = m.stats();
        assert_eq!(st.handled as usize, want.len(), "{name}: {st:?}");
        assert_eq!((st.errors, st.panics, st.dead_lettered), (0, 0, 0));
        // The broker did the narrowing wherever the keys can say it.
        let bound_all = m.bindings().iter().any(|b| b.routing_key == "#");
        match *name {
            "test" | "over-the-cap" | "tags-and" | "tags-or-of-ands" | "kinds" => {}
            _ => assert!(!bound_all, "{name}: {:?}", m.bindings()),
        }
        if !matches!(*name, "over-the-cap" | "tags-and" | "tags-or-of-ands") {
            assert_eq!(st.filtered, 0, "{name}: the bindings were exact: {st:?}");
        }
    }
    // The cap: at most 64 bindings per exchange, the rest checked here.
    let cap = &monitors.iter().find(|c| c.0 == "over-the-cap").unwrap().3;
    let mut per_ex: BTreeMap<&str, usize> = BTreeMap::new();
    for b in cap.bindings() {
        *per_ex.entry(&b.exchange).or_default() += 1;
    }
    assert!(per_ex.values().all(|&n| n <= 64), "{per_ex:?}");
    assert!(cap.stats().filtered > 0);

    let beta_finished: Vec<&Envelope> = all
        .iter()
        .filter(|e| builds_f.pass(e) && is_finished_build(e))
        .collect();
    assert_eq!(beta_finished.len(), 2);
    assert_eq!(only_builds.ids("build"), ids(beta_finished.iter().copied()));
    assert_eq!(
        builds_m.stats().received,
        2,
        "only finished builds left the broker"
    );

    assert_eq!(raw_count.load(Ordering::Relaxed) as usize, all.len());
    assert_eq!(raw.ids("message"), ids(all));
    let alpha = F {
        trees: s(&["alpha"]),
        ..Default::default()
    };
    assert_eq!(
        raw.ids("build"),
        ids(all.iter().filter(|e| alpha.pass(e) && is_finished_build(e)))
    );
    assert!(raw_m.bindings().iter().all(|b| b.routing_key == "#"));
    assert_eq!(raw_m.bindings().len(), 5);

    for (_, _, _, m) in monitors {
        m.stop().unwrap();
    }
}

fn bindings_of(node: &RabbitNode, vh: &str, queue: &str) -> BTreeSet<(String, String)> {
    let out = node
        .rabbitmqctl(&[
            "list_bindings",
            "-p",
            vh,
            "source_name",
            "destination_name",
            "routing_key",
        ])
        .unwrap();
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 3 && f[1] == queue && !f[0].is_empty())
                .then(|| (f[0].to_string(), f[2].to_string()))
        })
        .collect()
}

#[test]
fn declared_bindings_are_narrow_and_reconciled_on_restart() {
    let (url, vh) = vhost("client-bindings");
    let ex = |k: &str| format!("exchange/buildbus/v1/{k}");
    let first = || {
        MonitorBuilder::new(&url)
            .label("bind-check")
            .trees(["alpha", "gamma.core"])
            .platforms(["mac"])
            .tests(["//tests:fail_test", "//tests:pass_test"])
            .on_build(|_, _| {})
            .on_test(|_, _| {})
    };
    let m = first().start().unwrap();
    assert!(m.wait_ready(Duration::from_secs(30)));
    let queue = "queue/guest/bind-check";
    assert_eq!(m.queue().as_deref(), Some(queue));
    let mut want = BTreeSet::new();
    for t in ["alpha", "gamma%2Ecore"] {
        want.insert((ex("build"), format!("{t}.mac.*.*.*.finished.#")));
        for test in ["//tests:fail_test", "//tests:pass_test"] {
            want.insert((ex("test"), format!("{t}.mac.*.*.*.*.{test}.#")));
        }
    }
    {
        let node = rabbit().lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(bindings_of(&node, &vh, queue), want);
        let q = node
            .rabbitmqctl(&["list_queues", "-p", &vh, "name", "durable", "arguments"])
            .unwrap();
        let line = q
            .lines()
            .find(|l| l.starts_with(&format!("{queue}\t")))
            .unwrap_or_else(|| panic!("{q}"));
        for arg in [
            "x-max-length",
            "100000",
            "drop-head",
            "x-dead-letter-exchange",
            "exchange/buildbus/v1/dead-letter",
            "quorum",
        ] {
            assert!(line.contains(arg), "{arg} in {line}");
        }
        assert!(line.contains("\ttrue\t"), "durable: {line}");
    }
    // Publishing now: only what the bindings want reaches the queue.
    publish(&url, data());
    let want_n = routed(&m, data());
    assert!(wait_until(30, || m.stats().received as usize >= want_n));
    m.stop().unwrap();

    // Other filters, same label: the old bindings go.
    let m = MonitorBuilder::new(&url)
        .label("bind-check")
        .trees(["beta"])
        .on_build(|_, _| {})
        .start()
        .unwrap();
    assert!(m.wait_ready(Duration::from_secs(30)));
    {
        let node = rabbit().lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(
            bindings_of(&node, &vh, queue),
            BTreeSet::from([(ex("build"), "beta.*.*.*.*.finished.#".to_string())])
        );
        assert_eq!(
            node.queue_message_count(&vh, "queue/guest/bind-check/bindings")
                .unwrap(),
            1,
            "one record of the bindings in force"
        );
    }
    assert_eq!(m.stats().bindings_removed, want.len() as u64);
    m.stop().unwrap();
    // And back: the first filters' bindings return, beta's go.
    let m = first().start().unwrap();
    assert!(m.wait_ready(Duration::from_secs(30)));
    let node = rabbit().lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(bindings_of(&node, &vh, queue), want);
    drop(node);
    assert_eq!(m.stats().bindings_removed, 1);
}

#[test]
fn a_labelled_monitor_gets_what_was_published_while_it_was_stopped() {
    let (url, vh) = vhost("client-durable");
    let seen = Seen::default();
    let f = F {
        trees: vec!["alpha".into()],
        ..Default::default()
    };
    let start = || recording(&url, &f, &seen).label("persist").start().unwrap();
    let m = start();
    assert!(m.wait_ready(Duration::from_secs(30)));
    m.stop().unwrap();
    assert!(!m.is_alive());
    drop(m);
    publish(&url, data());
    let want: Vec<&Envelope> = data().iter().filter(|e| f.pass(e)).collect();
    let m = start();
    assert!(wait_until(30, || m.stats().handled as usize >= want.len()));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(seen.ids("match"), ids(want.iter().copied()));
    assert_eq!(m.stats().received as usize, want.len());
    m.stop().unwrap();

    // A length limit: the oldest go to the dead-letter queue, the newest wait.
    let small = |max: u64| {
        let s = seen.clone();
        MonitorBuilder::new(&url)
            .label("small")
            .max_length(max)
            .on_match(move |_, e| s.add("small", e))
            .start()
            .unwrap()
    };
    let m = small(5);
    assert!(m.wait_ready(Duration::from_secs(30)));
    m.stop().unwrap();
    let build = build_msgs(0);
    publish(&url, &build);
    let m = small(5);
    assert!(wait_until(30, || m.stats().handled >= 5));
    std::thread::sleep(Duration::from_millis(300));
    m.stop().unwrap();
    let mut newest = ids(&build[build.len() - 5..]);
    newest.sort();
    assert_eq!(seen.ids("small"), newest);
    let dead = rt().block_on(drain(&url, DEAD_LETTER_QUEUE));
    assert_eq!(dead.len(), build.len() - 5);
    let mut dead_ids = Vec::new();
    for (_, p) in &dead {
        assert_eq!(header(p, "x-first-death-reason").as_deref(), Some("maxlen"));
        assert_eq!(
            header(p, "x-first-death-queue").as_deref(),
            Some("queue/guest/small")
        );
        dead_ids.push(p.message_id().as_ref().unwrap().to_string());
    }
    dead_ids.sort();
    assert_eq!(dead_ids, ids(&build[..build.len() - 5]), "the oldest went");
    // Other arguments for an existing queue: the monitor ends with a clear error.
    let m = small(6);
    assert!(m.join(Duration::from_secs(30)), "ends by itself");
    let err = m.result().unwrap().unwrap_err();
    assert!(matches!(err, ClientError::Broker(_)), "{err}");
    assert!(err.to_string().contains("PRECONDITION"), "{err}");
    assert!(err.to_string().contains("queue/guest/small"), "{err}");
    let node = rabbit().lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(
        node.queue_message_count(&vh, "queue/guest/small").unwrap(),
        0
    );
}

#[test]
fn failing_callbacks_are_retried_then_dead_lettered_and_delivery_goes_on() {
    let (url, _) = vhost("client-panic");
    let tasks = Seen::default();
    let t = tasks.clone();
    let ok_builds = Seen::default();
    let ob = ok_builds.clone();
    let m = MonitorBuilder::new(&url)
        .workers(2)
        .retries(2)
        .retry_delay(Duration::from_millis(10))
        .on_build(move |msg, b| -> Result<(), String> {
            match b.common.tree.as_deref() {
                Some("beta") => panic!("boom in {}", b.common.build_id),
                Some("gamma.core") => Err(format!("no luck with {}", b.common.build_id)),
                _ => {
                    ob.add("build", msg.envelope.as_ref().unwrap());
                    Ok(())
                }
            }
        })
        .on_task(move |msg, _| t.add("task", msg.envelope.as_ref().unwrap()))
        .start()
        .unwrap();
    assert!(m.wait_ready(Duration::from_secs(30)));
    publish(&url, data());
    let all = data();
    let n_tasks = all.iter().filter(|e| e.kind() == Kind::Task).count();
    let finished: Vec<&Envelope> = all.iter().filter(|e| is_finished_build(e)).collect();
    let failing = |e: &Envelope| {
        matches!(
            e.payload.common().tree.as_deref(),
            Some("beta") | Some("gamma.core")
        )
    };
    let n_bad = finished.iter().filter(|e| failing(e)).count();
    assert_eq!(n_bad, 3);
    assert!(
        wait_until(30, || {
            let s = m.stats();
            s.dead_lettered == 3 && s.handled as usize == n_tasks + finished.len() - 3
        }),
        "{:?}",
        m.stats()
    );
    let s = m.stats();
    assert_eq!(s.panics, 2 * 3, "{s:?}");
    assert_eq!(s.errors, 3, "{s:?}");
    assert_eq!(s.retries, 3 * 2, "{s:?}");
    assert_eq!(tasks.ids("task").len(), n_tasks, "tasks kept coming");
    assert_eq!(
        ok_builds.ids("build"),
        ids(finished.iter().copied().filter(|e| !failing(e)))
    );
    let dead = rt().block_on(drain(&url, DEAD_LETTER_QUEUE));
    let mut dead_ids: Vec<String> = dead
        .iter()
        .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
        .collect();
    dead_ids.sort();
    assert_eq!(
        dead_ids,
        ids(finished.iter().copied().filter(|e| failing(e)))
    );
    for (body, p) in &dead {
        let e = Envelope::from_json(body).unwrap();
        let why = header(p, "x-buildbus-error").unwrap();
        let want = match e.payload.common().tree.as_deref() {
            Some("beta") => format!("on_build panicked: boom in {}", e.payload.common().build_id),
            _ => format!(
                "on_build returned an error: no luck with {}",
                e.payload.common().build_id
            ),
        };
        assert!(why.starts_with(&want), "{why}");
        assert!(why.ends_with("(after 3 attempts)"), "{why}");
        assert_eq!(
            header(p, "x-buildbus-original-routing-key").as_deref(),
            Some(e.meta.routing_key.as_str())
        );
        assert!(header(p, "x-buildbus-consumer")
            .unwrap()
            .starts_with("amq.gen-"));
    }
    m.stop().unwrap();
}

#[test]
fn stop_lets_the_callback_in_hand_finish_and_join_waits() {
    let (url, _) = vhost("client-stop");
    let started = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let (s, f) = (started.clone(), finished.clone());
    let m = MonitorBuilder::new(&url)
        .label("slow")
        .on_build(move |_, _| {
            s.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1500));
            f.store(true, Ordering::SeqCst);
        })
        .start()
        .unwrap();
    assert!(m.wait_ready(Duration::from_secs(30)));
    assert!(m.is_alive());
    let t = Instant::now();
    assert!(!m.join(Duration::from_millis(200)), "still running");
    assert!(t.elapsed() >= Duration::from_millis(200));
    let ok_build = build_msgs(0);
    publish(&url, &ok_build);
    assert!(wait_until(10, || started.load(Ordering::SeqCst)));
    assert!(!finished.load(Ordering::SeqCst));
    m.stop().unwrap();
    assert!(
        finished.load(Ordering::SeqCst),
        "stop waited for the callback"
    );
    assert!(!m.is_alive());
    assert!(m.join(Duration::ZERO));
    assert_eq!(m.result(), Some(Ok(())));
    assert_eq!(
        m.stats().handled,
        1,
        "only the finished build left the broker"
    );
    drop(m);

    // It was acked: the same label gets the next message, not that one again.
    let seen = Seen::default();
    let sn = seen.clone();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let stopper_slot: Arc<OnceLock<buildbus::consumers::client::Stopper>> =
        Arc::new(OnceLock::new());
    let slot = stopper_slot.clone();
    let m = MonitorBuilder::new(&url)
        .label("slow")
        .on_build(move |_, _| {})
        .on_match(move |_, e| {
            sn.add("match", e);
            // A callback can stop its own monitor: no callback starts after this one.
            if c.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
                slot.get().unwrap().stop();
            }
        })
        .start()
        .unwrap();
    let _ = stopper_slot.set(m.stopper());
    assert!(m.wait_ready(Duration::from_secs(30)));
    let fail_build = build_msgs(1);
    publish(&url, &fail_build);
    assert!(
        m.join(Duration::from_secs(30)),
        "stopped from its own callback"
    );
    assert_eq!(count.load(Ordering::SeqCst), 3);
    assert_eq!(
        seen.ids("match"),
        ids(&fail_build[..3]),
        "in order, the old one not again"
    );
    assert_eq!(m.result(), Some(Ok(())));
    drop(m);
    // The rest waited in the queue (unacked deliveries went back).
    let rest = Seen::default();
    let r = rest.clone();
    let m = MonitorBuilder::new(&url)
        .label("slow")
        .on_build(|_, _| {})
        .on_match(move |_, e| r.add("match", e))
        .start()
        .unwrap();
    assert!(wait_until(30, || rest.ids("match").len() >= fail_build.len() - 3));
    assert_eq!(rest.ids("match"), ids(&fail_build[3..]));
    // Dropping the handle stops it.
    drop(m);
}

#[test]
fn the_monitor_resumes_after_the_broker_restarts() {
    let mut node = RabbitNode::start(&infra_dir()).expect("own broker");
    let url = node.amqp_url();
    let durable = Seen::default();
    let d = durable.clone();
    let labelled = MonitorBuilder::new(&url)
        .label("resume")
        .on_match(move |_, e| d.add("match", e))
        .start()
        .unwrap();
    let fleeting = Seen::default();
    let fl = fleeting.clone();
    let exclusive = MonitorBuilder::new(&url)
        .on_match(move |_, e| fl.add("match", e))
        .start()
        .unwrap();
    assert!(labelled.wait_ready(Duration::from_secs(30)));
    assert!(exclusive.wait_ready(Duration::from_secs(30)));
    let old_queue = exclusive.queue().unwrap();
    let first = build_msgs(0);
    publish(&url, &first);
    assert!(wait_until(30, || durable.ids("match").len() >= first.len()));
    node.stop().expect("stop broker");
    assert!(wait_until(30, || !labelled.wait_ready(Duration::ZERO)));
    node.start_again().expect("start broker");
    // Published at once, maybe before the monitors are back: the durable queue keeps it.
    let second = build_msgs(1);
    publish(&url, &second);
    let want: BTreeSet<String> = ids(first.iter().chain(&second)).into_iter().collect();
    assert!(
        wait_until(60, || durable
            .ids("match")
            .into_iter()
            .collect::<BTreeSet<_>>()
            == want),
        "{:?}",
        labelled.stats()
    );
    assert!(labelled.stats().reconnects >= 1);
    assert!(labelled.is_alive() && labelled.result().is_none());
    // The exclusive queue is a new one; it gets what is published from then on.
    assert!(wait_until(60, || exclusive
        .queue()
        .is_some_and(|q| q != old_queue)));
    let third = build_msgs(2);
    publish(&url, &third);
    assert!(wait_until(30, || fleeting
        .ids("match")
        .iter()
        .filter(|i| ids(&third).contains(i))
        .count()
        == third.len()));
    labelled.stop().unwrap();
    exclusive.stop().unwrap();
}

/// A `buildbus monitor` child with its stderr read aside.
struct CliMonitor {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl CliMonitor {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> CliMonitor {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_buildbus"));
        for (k, _) in std::env::vars() {
            if k.starts_with("BUILDBUS_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .arg("monitor")
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let s = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = s.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        CliMonitor { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait_consuming(&self) {
        assert!(
            wait_until(30, || self.stderr().contains("monitor: consuming")),
            "{}",
            self.stderr()
        );
    }

    fn interrupt(&self) {
        Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    /// Waits for the exit; gives the status, stdout and stderr.
    fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        use std::io::Read;
        // Read stdout on the side: a monitor that does not exit must fail the test,
        // not hang it.
        let mut pipe = self.child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = pipe.read_to_string(&mut out);
            out
        });
        let ok = wait_until(30, || self.child.try_wait().unwrap().is_some());
        if !ok {
            let _ = self.child.kill();
        }
        assert!(ok, "monitor exits: {}", self.stderr());
        let status = self.child.wait().unwrap();
        let out = reader.join().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        (status, out, self.stderr())
    }
}

#[test]
fn monitor_cli_prints_lines_json_and_runs_commands() {
    let (url, vh) = vhost("client-cli");
    let dir = tempdir();
    let out = dir.path().to_str().unwrap().to_string();
    let exec = CliMonitor::spawn(
        &[
            "--url",
            &url,
            "--tree",
            "alpha",
            "--kind",
            "build",
            "--exec",
            "cat > \"$OUT/$BUILDBUS_MESSAGE_ID.json\"; env | grep '^BUILDBUS_' | sort > \"$OUT/$BUILDBUS_MESSAGE_ID.tmp\" && mv \"$OUT/$BUILDBUS_MESSAGE_ID.tmp\" \"$OUT/$BUILDBUS_MESSAGE_ID.env\"",
        ],
        &[("OUT", &out), ("BUILDBUS_RESULT", "stale"), ("BUILDBUS_TREE", "stale")],
    );
    let failing = CliMonitor::spawn(
        &[
            "--url",
            &url,
            "--tree",
            "beta",
            "--kind",
            "log",
            "--exec",
            "exit 3",
            "--retries",
            "1",
            "--retry-delay-ms",
            "10",
        ],
        &[],
    );
    let json = CliMonitor::spawn(
        &[
            "--url",
            &url,
            "--tree",
            "gamma.core",
            "--json",
            "--exit-after",
            "12",
        ],
        &[],
    );
    let lines = CliMonitor::spawn(
        &[
            "--url",
            &url,
            "--product",
            "fw",
            "--kind",
            "build",
            "--exit-after",
            "4",
        ],
        &[],
    );
    for m in [&exec, &failing, &json, &lines] {
        m.wait_consuming();
    }
    publish(&url, data());
    let all = data();

    // --exec: one run per message, the envelope on stdin, the variables set.
    let alpha_builds: Vec<&Envelope> = all
        .iter()
        .filter(|e| e.kind() == Kind::Build && e.payload.common().tree.as_deref() == Some("alpha"))
        .collect();
    assert_eq!(alpha_builds.len(), 4);
    let count_env = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "env")
            })
            .count()
    };
    assert!(wait_until(30, || count_env() == 4), "{}", exec.stderr());
    for e in &alpha_builds {
        let id = &e.meta.message_id;
        let body = std::fs::read(dir.path().join(format!("{id}.json"))).unwrap();
        assert_eq!(identity(&Envelope::from_json(&body).unwrap()), identity(e));
        let env = std::fs::read_to_string(dir.path().join(format!("{id}.env"))).unwrap();
        let c = e.payload.common();
        for want in [
            "BUILDBUS_KIND=build".to_string(),
            format!("BUILDBUS_MESSAGE_ID={id}"),
            format!("BUILDBUS_ROUTING_KEY={}", e.meta.routing_key),
            format!("BUILDBUS_BUILD_ID={}", c.build_id),
            format!("BUILDBUS_STATE={}", e.meta.state),
            "BUILDBUS_TREE=alpha".into(),
            format!("BUILDBUS_PLATFORM={}", c.platform.as_deref().unwrap()),
            format!("BUILDBUS_BUILDTYPE={}", c.buildtype.as_deref().unwrap()),
            format!("BUILDBUS_PRODUCT={}", c.product.as_deref().unwrap()),
            "BUILDBUS_SYSTEM=bazel".into(),
            format!("BUILDBUS_TAGS={}", c.tags.join(",")),
            "BUILDBUS_ATTEMPT=1".into(),
        ] {
            assert!(env.lines().any(|l| l == want), "{want} in\n{env}");
        }
        match &e.payload {
            Payload::Build(b) if b.state == BuildState::Finished => assert!(env
                .lines()
                .any(|l| l == format!("BUILDBUS_RESULT={}", b.result.unwrap().as_str()))),
            _ => assert!(!env.contains("BUILDBUS_RESULT="), "unset, not stale: {env}"),
        }
    }

    // A failing command: retried, then dead-lettered; the monitor goes on.
    let beta_logs = all
        .iter()
        .filter(|e| e.kind() == Kind::Log && e.payload.common().tree.as_deref() == Some("beta"))
        .count();
    assert_eq!(beta_logs, 4);
    let node = rabbit().lock().unwrap_or_else(|e| e.into_inner());
    assert!(wait_until(30, || node
        .queue_message_count(&vh, DEAD_LETTER_QUEUE)
        .unwrap()
        == beta_logs as u64));
    drop(node);

    // --json and --exit-after: exits by itself with the envelopes on stdout.
    let (status, stdout, stderr) = json.finish();
    assert!(status.success(), "{stderr}");
    let gamma: Vec<&Envelope> = all
        .iter()
        .filter(|e| e.payload.common().tree.as_deref() == Some("gamma.core"))
        .collect();
    assert_eq!(gamma.len(), 12);
    let got: Vec<Envelope> = stdout
        .lines()
        .map(|l| Envelope::from_json(l.as_bytes()).unwrap())
        .collect();
    assert_eq!(
        got.iter().map(identity).collect::<Vec<_>>(),
        gamma.iter().map(|e| identity(e)).collect::<Vec<_>>(),
        "every message, in publish order"
    );
    assert!(stderr.contains("12 messages handled"), "{stderr}");

    // Readable lines.
    let (status, stdout, stderr) = lines.finish();
    assert!(status.success(), "{stderr}");
    let l: Vec<&str> = stdout.lines().collect();
    assert_eq!(l.len(), 4, "{stdout}");
    assert_eq!(
        l.iter()
            .filter(|l| l.contains(" build    started "))
            .count(),
        2,
        "{stdout}"
    );
    assert!(
        l.iter()
            .any(|l| l.contains(" build    finished success (exit 0")),
        "{stdout}"
    );
    assert!(
        l.iter()
            .any(|l| l.contains(" build    finished failure (exit 1")),
        "{stdout}"
    );
    assert!(l.iter().all(|l| l.contains("/fw] ")), "{stdout}");

    // Ctrl-C stops the others cleanly.
    exec.interrupt();
    failing.interrupt();
    let (status, _, stderr) = exec.finish();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("4 messages handled, 0 callbacks failed"),
        "{stderr}"
    );
    let (status, _, stderr) = failing.finish();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "0 messages handled, 8 callbacks failed (0 panics), 4 retries, 4 dead-lettered"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("exit status: 3"), "{stderr}");
}

#[test]
fn monitor_cli_dry_run_shows_queue_and_bindings() {
    let o = buildbus(&[
        "monitor",
        "--url",
        "amqp://alice:pw@127.0.0.1:1/%2f",
        "--label",
        "dash",
        "--tree",
        "a.b",
        "--kind",
        "build,log",
        "--dry-run",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "queue: queue/alice/dash\n\
         bind exchange/buildbus/v1/build a%2Eb.#\n\
         bind exchange/buildbus/v1/log a%2Eb.#\n"
    );
    let o = buildbus(&["monitor", "--label", "no/slash", "--dry-run"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("label"));
}
