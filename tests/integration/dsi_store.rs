//! The DSI store (`src/dsi/store`) on the real Bazel fixtures, against SQLite (a file in
//! a temporary folder) and PostgreSQL (one private cluster for this whole test binary,
//! one fresh database per test): exact row counts and field values, idempotence,
//! convergence whatever the order, all-or-nothing batches, concurrent writers, and the
//! `buildbus query` command line.
//!
//! Every test that reaches PostgreSQL runs on a plain test thread (the sync `postgres`
//! crate must not be called from inside a tokio runtime).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::LazyLock;

use buildbus::model::{Envelope, Kind, Payload};
use buildbus::stores::{self as store, BuildFilter, Store, StoreError, TableCounts, WriteStats};
use buildbus_testkit::PgCluster;

use crate::harness::{buildbus, buildbus_env, clean, tempdir};

/// Every Bazel fixture and what storing it must give:
/// messages, builds, tasks, tests, artifacts, logs.
const FIXTURES: [(&str, [u64; 6]); 10] = [
    ("bazel/build_ok.json", [17, 1, 10, 0, 5, 0]),
    ("bazel/build_fail.json", [34, 1, 14, 0, 17, 1]),
    ("bazel/test_mixed.json", [39, 1, 4, 11, 22, 0]),
    ("bazel/pattern_fail.json", [5, 1, 0, 0, 0, 3]),
    ("bazel/interrupted.json", [12, 1, 4, 0, 5, 1]),
    ("bazel/bazel-2.1.0/build_ok.json", [17, 1, 10, 0, 5, 0]),
    ("bazel/bazel-2.1.0/build_fail.json", [34, 1, 14, 0, 17, 1]),
    ("bazel/bazel-2.1.0/test_mixed.json", [39, 1, 4, 11, 22, 0]),
    ("bazel/bazel-2.1.0/pattern_fail.json", [5, 1, 0, 0, 0, 3]),
    ("bazel/bazel-2.1.0/interrupted.json", [12, 1, 4, 0, 5, 1]),
];

/// The entity tables and their keys, plus `messages`.
const TABLES: [(&str, &str); 6] = [
    ("messages", "message_id"),
    ("builds", "build_id"),
    ("tasks", "entity_id"),
    ("tests", "entity_id"),
    ("artifacts", "entity_id"),
    ("logs", "entity_id"),
];

fn counts_of(a: [u64; 6]) -> TableCounts {
    TableCounts {
        messages: a[0],
        builds: a[1],
        tasks: a[2],
        tests: a[3],
        artifacts: a[4],
        logs: a[5],
    }
}

fn add(a: TableCounts, b: TableCounts) -> TableCounts {
    TableCounts {
        messages: a.messages + b.messages,
        builds: a.builds + b.builds,
        tasks: a.tasks + b.tasks,
        tests: a.tests + b.tests,
        artifacts: a.artifacts + b.artifacts,
        logs: a.logs + b.logs,
    }
}

/// What a set of envelopes should give: distinct messages, distinct builds, distinct
/// entities per kind.
fn expected_counts(envs: &[Envelope]) -> TableCounts {
    use std::collections::BTreeSet;
    let mut msgs = BTreeSet::new();
    let mut per_kind: BTreeMap<Kind, BTreeSet<&str>> = BTreeMap::new();
    for e in envs {
        msgs.insert(e.meta.message_id.as_str());
        let key = match &e.payload {
            Payload::Build(b) => &*b.common.build_id,
            _ => e.meta.entity_id.as_str(),
        };
        per_kind.entry(e.kind()).or_default().insert(key);
    }
    let n = |k| per_kind.get(&k).map_or(0, |s| s.len() as u64);
    TableCounts {
        messages: msgs.len() as u64,
        builds: n(Kind::Build),
        tasks: n(Kind::Task),
        tests: n(Kind::Test),
        artifacts: n(Kind::Artifact),
        logs: n(Kind::Log),
    }
}

// ---------------------------------------------------------------------------------------
// Back ends.

/// The private PostgreSQL cluster of this test binary (stopped by its watchdog when the
/// binary exits).
static PG: LazyLock<PgCluster> = LazyLock::new(|| {
    let base = std::env::temp_dir().join("buildbus-tests-dsi");
    PgCluster::start(&base).unwrap_or_else(|e| panic!("starting PostgreSQL: {e}"))
});

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// An empty store of its own for one test.
struct Db {
    backend: Backend,
    url: String,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    fn new(backend: Backend) -> Db {
        match backend {
            Backend::Sqlite => {
                let dir = tempdir();
                let url = format!("sqlite:{}", dir.path().join("dsi.db").display());
                Db {
                    backend,
                    url,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let pg = &*PG;
                let name = format!("dsi_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
                pg.psql(&format!("CREATE DATABASE {name}"))
                    .unwrap_or_else(|e| panic!("{e}"));
                Db {
                    backend,
                    url: format!("postgres://{}@127.0.0.1:{}/{name}", pg.user(), pg.port()),
                    _dir: None,
                }
            }
        }
    }

    fn open(&self) -> Box<dyn Store> {
        store::open(&self.url).unwrap_or_else(|e| panic!("opening {}: {e}", self.url))
    }

    fn sqlite_path(&self) -> PathBuf {
        PathBuf::from(self.url.strip_prefix("sqlite:").expect("a sqlite URL"))
    }

    /// Runs SQL directly (outside the store).
    fn exec(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => rusqlite::Connection::open(self.sqlite_path())
                .and_then(|c| c.execute_batch(sql))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            Backend::Postgres => postgres::Client::connect(&self.url, postgres::NoTls)
                .and_then(|mut c| c.batch_execute(sql))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
        }
    }

    /// Every row of every table, all columns but `messages.stored_at`, in key order.
    fn dump(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self.backend {
            Backend::Sqlite => {
                use rusqlite::types::ValueRef;
                let c = rusqlite::Connection::open(self.sqlite_path()).unwrap();
                for (table, key) in TABLES {
                    let mut st = c
                        .prepare(&format!("SELECT * FROM {table} ORDER BY {key}"))
                        .unwrap();
                    let names: Vec<String> = st.column_names().map(|s| s.to_string()).collect();
                    let mut rows = st.query([]).unwrap();
                    while let Some(r) = rows.next().unwrap() {
                        let mut line = table.to_string();
                        for (i, name) in names.iter().enumerate() {
                            if name == "stored_at" {
                                continue;
                            }
                            let v = match r.get_ref(i).unwrap() {
                                ValueRef::Null => "NULL".to_string(),
                                ValueRef::Integer(n) => n.to_string(),
                                ValueRef::Real(f) => f.to_string(),
                                ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                                ValueRef::Blob(b) => format!("{b:?}"),
                            };
                            line.push_str(&format!("|{name}={v}"));
                        }
                        out.push(line);
                    }
                }
            }
            Backend::Postgres => {
                let mut c = postgres::Client::connect(&self.url, postgres::NoTls).unwrap();
                for (table, key) in TABLES {
                    for r in c
                        .query(
                            &format!(
                                "SELECT (to_jsonb(t) - 'stored_at')::text FROM {table} t \
                                 ORDER BY {key} COLLATE \"C\""
                            ),
                            &[],
                        )
                        .unwrap()
                    {
                        out.push(format!("{table}|{}", r.get::<_, String>(0)));
                    }
                }
            }
        }
        out
    }
}

/// Writes `envs` in batches of `size`; the summed stats.
fn write_in_batches(st: &mut dyn Store, envs: &[Envelope], size: usize) -> WriteStats {
    let mut total = WriteStats::default();
    for batch in envs.chunks(size) {
        let s = st
            .write_batch(batch)
            .unwrap_or_else(|e| panic!("write_batch: {e}"));
        total.new_messages += s.new_messages;
        total.duplicates += s.duplicates;
    }
    total
}

/// A deterministic shuffle (xorshift64*), so a failing order can be replayed.
fn shuffled(envs: &[Envelope], seed: u64) -> Vec<Envelope> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut v = envs.to_vec();
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// The envelopes of several fixtures (three builds, all five kinds).
fn three_builds() -> Vec<Envelope> {
    let mut envs = clean("bazel/test_mixed.json");
    envs.extend(clean("bazel/build_fail.json"));
    envs.extend(clean("bazel/pattern_fail.json"));
    envs
}

fn build_id(envs: &[Envelope]) -> String {
    envs[0].payload.common().build_id.to_string()
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(super::Backend::Sqlite)
            }
            #[test]
            fn postgres() {
                super::$name(super::Backend::Postgres)
            }
        }
    )*};
}

on_both!(
    every_fixture_is_stored_exactly,
    the_same_batch_twice_is_all_duplicates,
    any_order_converges_to_the_same_rows,
    finished_is_never_overwritten_by_started,
    bad_data_fails_the_whole_batch,
    a_store_failure_mid_batch_writes_nothing,
    concurrent_writers_store_each_message_once,
    the_schema_is_created_once,
    a_version_1_store_gets_the_artifact_columns,
);

// ---------------------------------------------------------------------------------------
// Tests.

fn every_fixture_is_stored_exactly(b: Backend) {
    let db = Db::new(b);
    let mut st = db.open();
    assert_eq!(st.counts().unwrap(), TableCounts::default());
    let mut total = TableCounts::default();
    for (fixture, expected) in FIXTURES {
        let envs = clean(fixture);
        let expected = counts_of(expected);
        assert_eq!(
            expected_counts(&envs),
            expected,
            "{fixture}: the fixture changed"
        );
        let stats = st
            .write_batch(&envs)
            .unwrap_or_else(|e| panic!("{fixture}: {e}"));
        assert_eq!(
            stats,
            WriteStats {
                new_messages: expected.messages,
                duplicates: 0
            },
            "{fixture}"
        );
        total = add(total, expected);
        assert_eq!(st.counts().unwrap(), total, "{fixture}");
    }
    assert_eq!(
        total,
        counts_of([214, 10, 64, 22, 98, 10]),
        "all fixtures together"
    );

    // test_mixed: the build row is the finished message's, field by field.
    let envs = clean("bazel/test_mixed.json");
    let id = build_id(&envs);
    let finished = envs
        .iter()
        .find(|e| e.meta.kind == Kind::Build && e.meta.state == "finished")
        .unwrap();
    let d = st.query_build(&id).unwrap().expect("test_mixed is stored");
    let row = d.build.as_ref().expect("build row");
    assert_eq!(row.build_id, "5c5b0f95-d751-4bc2-b99e-a82a798ee7d1");
    assert_eq!(row.state, "finished");
    assert_eq!(row.result.as_deref(), Some("failure"));
    assert_eq!(row.exit_code, Some(3));
    assert_eq!(row.duration_ms, Some(1571));
    assert_eq!(row.started_at.as_deref(), Some("2026-11-21T10:56:22.869Z"));
    assert_eq!(row.finished_at.as_deref(), Some("2026-11-21T10:56:24.440Z"));
    assert_eq!(row.timestamp.as_deref(), Some("2026-11-21T10:56:24.440Z"));
    assert_eq!(row.system, "bazel");
    assert_eq!(row.tree.as_deref(), Some("bep-fixture"));
    assert_eq!(row.platform.as_deref(), Some("k8"));
    assert_eq!(row.buildtype.as_deref(), Some("fastbuild"));
    assert_eq!(row.product.as_deref(), Some("bzlws"));
    assert_eq!(
        row.revision.as_deref(),
        Some("0123456789abcdef0123456789abcdef01234567")
    );
    assert_eq!(row.branch.as_deref(), Some("main"));
    assert_eq!(row.builder_host.as_deref(), Some("vm"));
    assert_eq!(row.builder_user.as_deref(), Some("bzl"));
    assert_eq!(row.targets, vec!["//tests/...".to_string()]);
    assert!(row.tags.is_empty());
    assert!(row.command.as_deref().unwrap().starts_with("bazel "));
    assert_eq!(row.failure, None);
    assert_eq!(row.tool_version, None);
    assert_eq!(row.metadata["BRANCH"], "main");
    assert_eq!(row.metadata["bazel.command"], "test");
    assert_eq!(
        row.counts.tasks,
        BTreeMap::from([("succeeded".to_string(), 4)])
    );
    assert_eq!(
        row.counts.tests,
        BTreeMap::from([
            ("failed".to_string(), 1),
            ("flaky".to_string(), 1),
            ("passed".to_string(), 2)
        ])
    );
    assert_eq!(row.counts.metrics["actions_executed"], 19);
    assert_eq!(row.message_id, finished.meta.message_id);
    assert_eq!(row.entity_id, finished.meta.entity_id);
    let Payload::Build(fp) = &finished.payload else {
        unreachable!()
    };
    assert_eq!(row.counts, fp.counts);
    assert_eq!(row.command, fp.command);

    // Its children.
    assert_eq!(
        d.task_counts,
        BTreeMap::from([("succeeded".to_string(), 4)])
    );
    assert!(d.failed_tasks.is_empty());
    assert!(d.logs.is_empty());
    assert_eq!(d.tests.len(), 11);
    let summaries: Vec<(&str, &str)> = d
        .tests
        .iter()
        .filter(|t| t.scope == "summary")
        .map(|t| (t.test.as_str(), t.status.as_str()))
        .collect();
    assert_eq!(
        summaries,
        [
            ("//tests:fail_test", "failed"),
            ("//tests:flaky_test", "flaky"),
            ("//tests:pass_test", "passed"),
            ("//tests:sharded_test", "passed"),
        ]
    );
    let attempts: Vec<_> = d.tests.iter().filter(|t| t.scope == "attempt").collect();
    assert_eq!(attempts.len(), 7);
    for t in &d.tests {
        let env = envs
            .iter()
            .find(|e| e.meta.entity_id == t.entity_id)
            .expect("a stored test comes from a message");
        let Payload::Test(p) = &env.payload else {
            panic!("{} is not a test", t.entity_id)
        };
        assert_eq!(
            (
                &t.test,
                &t.scope,
                &t.status,
                t.attempt,
                t.shard,
                t.run,
                t.duration_ms,
                t.cached,
                &t.strategy,
                &t.logurl
            ),
            (
                &p.test,
                &p.scope,
                &p.status,
                p.attempt,
                p.shard,
                p.run,
                p.duration_ms,
                p.cached,
                &p.strategy,
                &p.logurl
            )
        );
        assert_eq!(t.message_id, env.meta.message_id);
        assert_eq!(t.build_id, id);
    }
    let flaky_fail = d
        .tests
        .iter()
        .find(|t| t.test == "//tests:flaky_test" && t.attempt == Some(1))
        .unwrap();
    assert_eq!(
        (
            flaky_fail.status.as_str(),
            flaky_fail.duration_ms,
            flaky_fail.cached
        ),
        ("failed", Some(75), Some(false))
    );
    assert_eq!(d.artifacts.len(), 22);
    let mut paths: Vec<&str> = envs
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::Artifact(a) => Some(a.path.as_str()),
            _ => None,
        })
        .collect();
    paths.sort_unstable();
    assert_eq!(
        d.artifacts
            .iter()
            .map(|a| a.path.as_str())
            .collect::<Vec<_>>(),
        paths
    );
    let a = d
        .artifacts
        .iter()
        .find(|a| a.path == "bazel-out/k8-fastbuild/bin/tests/fail_test")
        .unwrap();
    assert_eq!(a.kind, "output");
    assert_eq!(a.target.as_deref(), Some("//tests:fail_test"));
    assert!(a
        .uri
        .as_deref()
        .unwrap()
        .starts_with("file:///tmp/bzlroot-4.2.3/"));

    // build_fail: failed tasks and the error log.
    let bf = clean("bazel/build_fail.json");
    let d = st.query_build(&build_id(&bf)).unwrap().unwrap();
    let b = d.build.as_ref().unwrap();
    assert_eq!(
        (b.result.as_deref(), b.exit_code),
        (Some("failure"), Some(1))
    );
    assert!(b
        .failure
        .as_deref()
        .unwrap()
        .contains("Executing genrule //broken:fails failed"));
    assert_eq!(
        d.task_counts,
        BTreeMap::from([("failed".to_string(), 3), ("succeeded".to_string(), 11)])
    );
    let failed: Vec<(&str, &str, Option<i64>)> = d
        .failed_tasks
        .iter()
        .map(|t| (t.target.as_str(), t.task.as_str(), t.exit_code))
        .collect();
    assert_eq!(
        failed,
        [
            ("//broken:fails", "Genrule", Some(1)),
            ("//broken:fails", "build", None),
            ("//broken:needs_fails", "build", None),
        ]
    );
    assert!(
        d.failed_tasks
            .iter()
            .all(|t| t.outcome == "failed"
                && t.failure.as_deref().unwrap().starts_with("bash failed"))
    );
    assert_eq!(d.logs.len(), 1);
    assert_eq!(d.logs[0].level, "error");
    assert_eq!(d.logs[0].target.as_deref(), Some("//broken:fails"));
    assert!(d.logs[0].message.ends_with("this genrule fails on purpose"));

    // pattern_fail: only logs; no platform.
    let pf = clean("bazel/pattern_fail.json");
    let d = st.query_build(&build_id(&pf)).unwrap().unwrap();
    let levels: Vec<&str> = d.logs.iter().map(|l| l.level.as_str()).collect();
    let mut expected_levels: Vec<&str> = crate::harness::logs(&pf)
        .iter()
        .map(|l| l.level.as_str())
        .collect();
    expected_levels.sort_unstable();
    let mut sorted_levels = levels.clone();
    sorted_levels.sort_unstable();
    assert_eq!(sorted_levels, expected_levels);
    assert_eq!(sorted_levels, ["error", "error", "warning"]);
    assert!(d
        .logs
        .iter()
        .any(|l| l.message == "Target pattern parsing failed."));
    assert_eq!(d.build.as_ref().unwrap().platform, None);

    assert!(st.query_build("no-such-build").unwrap().is_none());

    // Queries over all ten builds.
    let all = st.query_builds(&BuildFilter::default()).unwrap();
    assert_eq!(all.len(), 10);
    assert!(
        all.windows(2).all(|w| w[0].started_at >= w[1].started_at),
        "latest first"
    );
    let mut q = |f: BuildFilter| -> Vec<String> {
        let mut ids: Vec<String> = st_query(&mut *st, &f);
        ids.sort();
        ids
    };
    let ids_where = |pred: &dyn Fn(&store::BuildRow) -> bool| -> Vec<String> {
        let mut ids: Vec<String> = all
            .iter()
            .filter(|b| pred(b))
            .map(|b| b.build_id.clone())
            .collect();
        ids.sort();
        ids
    };
    let failures = q(BuildFilter {
        result: Some("failure".into()),
        ..Default::default()
    });
    assert_eq!(
        failures.len(),
        6,
        "build_fail, test_mixed, pattern_fail, twice"
    );
    assert_eq!(
        failures,
        ids_where(&|b| b.result.as_deref() == Some("failure"))
    );
    let k8 = q(BuildFilter {
        platform: Some("k8".into()),
        buildtype: Some("fastbuild".into()),
        tree: Some("bep-fixture".into()),
        ..Default::default()
    });
    assert_eq!(
        k8.len(),
        8,
        "all but the pattern_fail builds, which have no platform"
    );
    assert_eq!(
        q(BuildFilter {
            result: Some("interrupted".into()),
            ..Default::default()
        })
        .len(),
        2
    );
    assert_eq!(
        q(BuildFilter {
            tree: Some("no-such-tree".into()),
            ..Default::default()
        }),
        Vec::<String>::new()
    );
    let latest = all[0].started_at.clone().unwrap();
    let since = chrono::DateTime::parse_from_rfc3339(&latest)
        .unwrap()
        .with_timezone(&chrono::Utc);
    assert_eq!(
        q(BuildFilter {
            since: Some(since),
            ..Default::default()
        }),
        vec![all[0].build_id.clone()]
    );
    let first3 = st
        .query_builds(&BuildFilter {
            limit: Some(3),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(first3, all[..3].to_vec());
}

fn st_query(st: &mut dyn Store, f: &BuildFilter) -> Vec<String> {
    st.query_builds(f)
        .unwrap()
        .into_iter()
        .map(|b| b.build_id)
        .collect()
}

fn the_same_batch_twice_is_all_duplicates(b: Backend) {
    let db = Db::new(b);
    let mut st = db.open();
    let envs = three_builds();
    let n = envs.len() as u64;
    assert_eq!(n, 39 + 34 + 5);
    assert_eq!(
        st.write_batch(&envs).unwrap(),
        WriteStats {
            new_messages: n,
            duplicates: 0
        }
    );
    let counts = st.counts().unwrap();
    assert_eq!(counts, counts_of([78, 3, 18, 11, 39, 4]));
    let dump = db.dump();
    assert_eq!(
        st.write_batch(&envs).unwrap(),
        WriteStats {
            new_messages: 0,
            duplicates: n
        }
    );
    assert_eq!(st.counts().unwrap(), counts);
    assert_eq!(db.dump(), dump);

    // Repeats within one batch, and a batch of old and new messages.
    let db2 = Db::new(b);
    let mut st2 = db2.open();
    let mixed = clean("bazel/test_mixed.json");
    let batch = vec![
        mixed[0].clone(),
        mixed[1].clone(),
        mixed[0].clone(),
        mixed[0].clone(),
    ];
    assert_eq!(
        st2.write_batch(&batch).unwrap(),
        WriteStats {
            new_messages: 2,
            duplicates: 2
        }
    );
    assert_eq!(
        st2.write_batch(&mixed).unwrap(),
        WriteStats {
            new_messages: 37,
            duplicates: 2
        }
    );
    assert_eq!(st2.counts().unwrap(), counts_of([39, 1, 4, 11, 22, 0]));
    assert_eq!(
        st2.write_batch(&[]).unwrap(),
        WriteStats::default(),
        "an empty batch"
    );
}

fn any_order_converges_to_the_same_rows(b: Backend) {
    let envs = three_builds();
    let reference = Db::new(b);
    write_in_batches(&mut *reference.open(), &envs, 500);
    let expected = reference.dump();
    assert_eq!(expected.len(), 78 + 3 + 18 + 11 + 39 + 4);

    let mut reversed = envs.clone();
    reversed.reverse();
    let mut orders: Vec<(String, Vec<Envelope>, usize)> = vec![("reversed".into(), reversed, 5)];
    for (seed, size) in [(1, 7), (2, 13), (3, 1), (4, 500)] {
        orders.push((format!("shuffled seed {seed}"), shuffled(&envs, seed), size));
    }
    // Redelivery: everything twice, shuffled together.
    let mut twice = envs.clone();
    twice.extend(envs.iter().cloned());
    orders.push(("shuffled with redeliveries".into(), shuffled(&twice, 5), 11));

    for (what, order, size) in orders {
        let db = Db::new(b);
        let stats = write_in_batches(&mut *db.open(), &order, size);
        assert_eq!(stats.new_messages, envs.len() as u64, "{what}");
        assert_eq!(
            stats.duplicates,
            (order.len() - envs.len()) as u64,
            "{what}"
        );
        let got = db.dump();
        if got != expected {
            let diff: Vec<_> = got
                .iter()
                .filter(|r| !expected.contains(r))
                .take(3)
                .collect();
            panic!("{what} (batches of {size}) differs from in-order, e.g. {diff:#?}");
        }
    }
}

fn finished_is_never_overwritten_by_started(b: Backend) {
    let envs = clean("bazel/test_mixed.json");
    let id = build_id(&envs);
    let started = envs
        .iter()
        .find(|e| e.meta.state == "started")
        .unwrap()
        .clone();
    let finished = envs
        .iter()
        .find(|e| e.meta.state == "finished")
        .unwrap()
        .clone();

    let late_start = Db::new(b);
    let mut st = late_start.open();
    st.write_batch(std::slice::from_ref(&finished)).unwrap();
    st.write_batch(std::slice::from_ref(&started)).unwrap();
    let row = st.query_build(&id).unwrap().unwrap().build.unwrap();
    assert_eq!(row.state, "finished");
    assert_eq!(row.result.as_deref(), Some("failure"));
    assert_eq!(row.exit_code, Some(3));
    assert_eq!(row.message_id, finished.meta.message_id);
    assert_eq!(
        st.counts().unwrap().messages,
        2,
        "both messages are recorded"
    );

    let in_order = Db::new(b);
    let mut st2 = in_order.open();
    st2.write_batch(std::slice::from_ref(&started)).unwrap();
    let row = st2.query_build(&id).unwrap().unwrap().build.unwrap();
    assert_eq!(
        (row.state.as_str(), row.result.as_deref()),
        ("started", None)
    );
    assert_eq!(row.finished_at, None);
    assert_eq!(row.message_id, started.meta.message_id);
    st2.write_batch(std::slice::from_ref(&finished)).unwrap();
    let row = st2.query_build(&id).unwrap().unwrap().build.unwrap();
    assert_eq!(row.state, "finished");
    assert_eq!(row.exit_code, Some(3));

    let one_batch = Db::new(b);
    one_batch
        .open()
        .write_batch(&[finished.clone(), started.clone()])
        .unwrap();

    let dump = late_start.dump();
    assert_eq!(in_order.dump(), dump);
    assert_eq!(one_batch.dump(), dump);

    // A child stored before its build: the build is known, without a build row.
    let child_first = Db::new(b);
    let mut st3 = child_first.open();
    let test = envs.iter().find(|e| e.meta.kind == Kind::Test).unwrap();
    st3.write_batch(std::slice::from_ref(test)).unwrap();
    let d = st3.query_build(&id).unwrap().expect("known from its test");
    assert!(d.build.is_none());
    assert_eq!(d.tests.len(), 1);
    assert!(st3
        .query_builds(&BuildFilter::default())
        .unwrap()
        .is_empty());
}

fn bad_data_fails_the_whole_batch(b: Backend) {
    let db = Db::new(b);
    let mut st = db.open();
    let good = clean("bazel/test_mixed.json");
    let art = good
        .iter()
        .position(|e| e.meta.kind == Kind::Artifact)
        .unwrap();
    assert!(
        art > 0 && art + 1 < good.len(),
        "the bad message is mid-batch"
    );

    type Spoil = fn(&mut Envelope);
    let spoilers: [(&str, Spoil, &str); 5] = [
        (
            "an artifact larger than any file",
            |e| {
                if let Payload::Artifact(a) = &mut e.payload {
                    a.size = Some(u64::MAX);
                }
            },
            "larger than the largest storable size",
        ),
        (
            "a NUL character",
            |e| {
                if let Payload::Artifact(a) = &mut e.payload {
                    a.path = "a\0b".into();
                }
            },
            "NUL",
        ),
        (
            "a timestamp that is not one",
            |e| e.payload.common_mut().timestamp = Some("yesterday".into()),
            "payload.timestamp \"yesterday\" is not an RFC 3339 timestamp",
        ),
        (
            "a kind that is not the payload's",
            |e| e.meta.kind = Kind::Log,
            "_meta.kind is log but the payload is of kind artifact",
        ),
        (
            "an empty build id",
            |e| e.payload.common_mut().build_id = "".into(),
            "payload.build_id is empty",
        ),
    ];
    for (what, spoil, says) in spoilers {
        let mut batch = good.clone();
        spoil(&mut batch[art]);
        let e = st.write_batch(&batch).expect_err(what);
        assert!(matches!(&e, StoreError::Invalid { .. }), "{what}: {e:?}");
        assert_eq!(
            e.rejected_message(),
            Some(good[art].meta.message_id.as_str()),
            "{what}"
        );
        assert!(!e.is_transient(), "{what}");
        let text = e.to_string();
        assert!(text.contains(says), "{what}: {text}");
        assert!(text.starts_with(&db.url), "{what} names the store: {text}");
        assert_eq!(st.counts().unwrap(), TableCounts::default(), "{what}");
    }
    // The store is still usable.
    assert_eq!(st.write_batch(&good).unwrap().new_messages, 39);
}

fn a_store_failure_mid_batch_writes_nothing(b: Backend) {
    let db = Db::new(b);
    let mut st = db.open();
    // Tests are upserted after messages, builds and tasks: by then much of the batch
    // is written, and must be rolled back.
    db.exec(match b {
        Backend::Sqlite => {
            "CREATE TRIGGER boom BEFORE INSERT ON tests WHEN NEW.test = '//tests:flaky_test' \
             BEGIN SELECT RAISE(ABORT, 'boom: simulated store failure'); END;"
        }
        Backend::Postgres => {
            "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               IF NEW.test = '//tests:flaky_test' THEN \
                 RAISE EXCEPTION 'boom: simulated store failure'; \
               END IF; RETURN NEW; END $$; \
             CREATE TRIGGER boom BEFORE INSERT ON tests FOR EACH ROW EXECUTE FUNCTION boom();"
        }
    });
    let envs = clean("bazel/test_mixed.json");
    let e = st
        .write_batch(&envs)
        .expect_err("the trigger fails the batch");
    let text = e.to_string();
    assert!(matches!(e, StoreError::Db { .. }), "{e:?}");
    assert!(text.contains("upsert into tests"), "{text}");
    assert!(text.contains("boom: simulated store failure"), "{text}");
    assert_eq!(
        st.counts().unwrap(),
        TableCounts::default(),
        "nothing half-written"
    );

    db.exec(match b {
        Backend::Sqlite => "DROP TRIGGER boom",
        Backend::Postgres => "DROP TRIGGER boom ON tests",
    });
    assert_eq!(
        st.write_batch(&envs).unwrap(),
        WriteStats {
            new_messages: 39,
            duplicates: 0
        },
        "the same store writes the batch once the failure is gone"
    );
    assert_eq!(st.counts().unwrap(), counts_of([39, 1, 4, 11, 22, 0]));
}

fn concurrent_writers_store_each_message_once(b: Backend) {
    let envs = three_builds();
    let reference = Db::new(b);
    write_in_batches(&mut *reference.open(), &envs, 500);

    let db = Db::new(b);
    db.open(); // the schema, before the race
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let url = db.url.clone();
            let order = shuffled(&envs, 100 + w);
            std::thread::spawn(move || {
                let mut st = store::open(&url).unwrap_or_else(|e| panic!("{e}"));
                write_in_batches(&mut *st, &order, 10)
            })
        })
        .collect();
    let mut total = WriteStats::default();
    for w in writers {
        let s = w.join().expect("writer thread");
        total.new_messages += s.new_messages;
        total.duplicates += s.duplicates;
    }
    assert_eq!(
        total.new_messages,
        envs.len() as u64,
        "each message stored once"
    );
    assert_eq!(total.duplicates, 3 * envs.len() as u64);
    assert_eq!(db.dump(), reference.dump());
}

fn the_schema_is_created_once(b: Backend) {
    let db = Db::new(b);
    let envs = clean("bazel/pattern_fail.json");
    db.open().write_batch(&envs).unwrap();
    let mut again = db.open();
    assert_eq!(again.counts().unwrap(), counts_of([5, 1, 0, 0, 0, 3]));
    assert_eq!(again.write_batch(&envs).unwrap().duplicates, 5);
    drop(again);
    let versions: Vec<i64> = match b {
        Backend::Sqlite => {
            let c = rusqlite::Connection::open(db.sqlite_path()).unwrap();
            let mode: String = c
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
            let mut st = c.prepare("SELECT version FROM buildbus_schema").unwrap();
            st.query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        }
        Backend::Postgres => postgres::Client::connect(&db.url, postgres::NoTls)
            .unwrap()
            .query("SELECT version::int8 FROM buildbus_schema", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect(),
    };
    assert_eq!(versions, [1, 2]);

    // A newer schema is refused.
    db.exec(
        "INSERT INTO buildbus_schema (version, applied_at) VALUES (99, '2030-01-01T00:00:00Z')",
    );
    let e = store::open(&db.url).map(|_| ()).unwrap_err();
    assert!(
        matches!(e, StoreError::SchemaTooNew { found: 99, .. }),
        "{e}"
    );
    let e = store::open("mysql://h/db").map(|_| ()).unwrap_err();
    assert!(matches!(e, StoreError::BadUrl { .. }), "{e}");
}

#[test]
fn unreachable_stores_fail_with_their_name() {
    let e = store::open("sqlite:/nonexistent-dir/sub/dsi.db")
        .map(|_| ())
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("sqlite:/nonexistent-dir/sub/dsi.db: opening"),
        "{text}"
    );

    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = store::open(&format!("postgres://dsi:secret@127.0.0.1:{port}/x"))
        .map(|_| ())
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with(&format!("postgres://dsi@127.0.0.1:{port}/x: connecting")),
        "{text}"
    );
    assert!(!text.contains("secret"), "{text}");
    assert!(e.is_transient(), "{text}");
}

#[test]
fn postgres_retries_deadlocks_and_lost_connections() {
    let db = Db::new(Backend::Postgres);
    let mut st = db.open();
    // The first two attempts meet a deadlock, the third goes through.
    db.exec(
        "CREATE SEQUENCE boom_seq; \
         CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF nextval('boom_seq') <= 2 THEN \
             RAISE EXCEPTION 'simulated deadlock' USING ERRCODE = 'deadlock_detected'; \
           END IF; RETURN NEW; END $$; \
         CREATE TRIGGER boom BEFORE INSERT ON builds FOR EACH ROW EXECUTE FUNCTION boom();",
    );
    let envs = clean("bazel/test_mixed.json");
    assert_eq!(st.write_batch(&envs).unwrap().new_messages, 39);
    assert_eq!(st.counts().unwrap(), counts_of([39, 1, 4, 11, 22, 0]));
    let tries: i64 = postgres::Client::connect(&db.url, postgres::NoTls)
        .unwrap()
        .query_one("SELECT last_value FROM boom_seq", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        tries, 3,
        "two failed attempts, then the one that went through"
    );

    // Always failing: a transient error after the last attempt, nothing written.
    db.exec(
        "CREATE OR REPLACE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION 'simulated conflict' USING ERRCODE = 'serialization_failure'; \
         END $$;",
    );
    let e = st
        .write_batch(&clean("bazel/build_ok.json"))
        .expect_err("never goes through");
    let text = e.to_string();
    assert!(e.is_transient(), "{text}");
    assert!(text.contains("simulated conflict"), "{text}");
    assert!(
        text.contains(&format!(
            "(after {} attempts)",
            store::postgres::MAX_ATTEMPTS
        )),
        "{text}"
    );
    assert_eq!(st.counts().unwrap(), counts_of([39, 1, 4, 11, 22, 0]));
    db.exec("DROP TRIGGER boom ON builds");

    // The server drops the connection between two batches: the store reconnects.
    let dbname = db.url.rsplit('/').next().unwrap();
    let killed: i64 = postgres::Client::connect(&db.url, postgres::NoTls)
        .unwrap()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'buildbus-dsi'",
            &[&dbname],
        )
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    assert_eq!(
        st.write_batch(&clean("bazel/build_ok.json"))
            .unwrap()
            .new_messages,
        17
    );
    assert_eq!(st.counts().unwrap(), counts_of([56, 2, 14, 11, 27, 0]));
}

// ---------------------------------------------------------------------------------------
// The command line.

#[test]
fn query_cli_lists_and_shows_builds() {
    let db = Db::new(Backend::Sqlite);
    let mut st = db.open();
    for (fixture, _) in FIXTURES {
        st.write_batch(&clean(fixture)).unwrap();
    }
    drop(st);
    let url = db.url.as_str();
    let mixed = build_id(&clean("bazel/test_mixed.json"));

    let o = buildbus(&["query", "builds", "--store", url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 11, "header and ten builds:\n{text}");
    assert!(lines[0].starts_with("BUILD "), "{text}");
    assert!(lines[0].contains("RESULT"), "{text}");
    let line = lines
        .iter()
        .find(|l| l.starts_with(&mixed))
        .expect("test_mixed listed");
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        words,
        [
            mixed.as_str(),
            "2026-11-21",
            "10:56:22",
            "failure",
            "1.6s",
            "bep-fixture",
            "k8",
            "fastbuild",
            "bazel",
            "//tests/..."
        ]
    );
    // Columns are aligned: every line has RESULT at the same offset.
    let at = lines[0].find("RESULT").unwrap();
    for l in &lines[1..] {
        assert!(
            ["success", "failure", "interrupted"]
                .iter()
                .any(|r| l[at..].starts_with(r)),
            "{l}"
        );
    }

    // Filters, JSON, the store from the environment.
    let o = buildbus_env(
        &[
            "query",
            "builds",
            "--result",
            "failure",
            "--platform",
            "k8",
            "--json",
        ],
        &[("BUILDBUS_STORE", url)],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        rows.len(),
        4,
        "build_fail and test_mixed, both Bazel versions"
    );
    assert!(rows
        .iter()
        .all(|r| r["result"] == "failure" && r["platform"] == "k8"));
    let o = buildbus(&[
        "query",
        "builds",
        "--store",
        url,
        "--limit",
        "2",
        "--since",
        "2000-01-01",
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 3);
    let o = buildbus(&[
        "query",
        "builds",
        "--store",
        url,
        "--since",
        "2099-01-01T00:00:00Z",
        "--json",
    ]);
    assert!(o.status.success());
    assert_eq!(
        serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout)
            .unwrap()
            .len(),
        0
    );

    // One build, as JSON.
    let o = buildbus(&["query", "build", &mixed, "--store", url, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(d["build_id"], mixed.as_str());
    assert_eq!(d["build"]["result"], "failure");
    assert_eq!(d["build"]["exit_code"], 3);
    assert_eq!(d["build"]["duration_ms"], 1571);
    assert_eq!(d["build"]["counts"]["tests"]["flaky"], 1);
    assert_eq!(d["task_counts"]["succeeded"], 4);
    assert_eq!(d["tests"].as_array().unwrap().len(), 11);
    assert_eq!(d["artifacts"].as_array().unwrap().len(), 22);
    assert_eq!(d["logs"].as_array().unwrap().len(), 0);

    // One build, as text.
    let bf = build_id(&clean("bazel/build_fail.json"));
    let o = buildbus(&["query", "build", &bf, "--store", url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.starts_with(&format!("Build {bf}: failure (exit code 1)\n")),
        "{text}"
    );
    for want in [
        "  builder:   bzl@vm\n",
        "\nTasks: 3 failed, 11 succeeded\n",
        "\nFailed tasks (3):\n  TARGET ",
        "\n  //broken:fails        Genrule  failed   1     bash failed",
        "\nArtifacts (17):\n  PATH ",
        "\nErrors and warnings (1):\n  error     //broken:fails: /tmp/bzlws/broken/BUILD:1:8: Executing genrule",
        "\n            this genrule fails on purpose\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let o = buildbus(&["query", "build", &mixed, "--store", url]);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("\nTests (11):\n  TEST "), "{text}");
    assert!(
        text.contains("\n  //tests:flaky_test    summary  flaky "),
        "{text}"
    );

    // Not found, no such store, help.
    let o = buildbus(&["query", "build", "no-such-build", "--store", url]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no build no-such-build"));
    let missing = format!(
        "sqlite:{}",
        db.sqlite_path().with_file_name("none.db").display()
    );
    let o = buildbus(&["query", "builds", "--store", &missing]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no store at"),
        "{o:?}"
    );
    assert!(
        !db.sqlite_path().with_file_name("none.db").exists(),
        "not created"
    );
    let o = buildbus(&["query", "builds", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains("Examples:") && help.contains("--since"),
        "{help}"
    );
}

/// A store created by a buildbus of schema version 1 (before the AAM) is migrated to
/// version 2 when opened: scanned artifacts keep their mtime and link target.
fn a_version_1_store_gets_the_artifact_columns(b: Backend) {
    let db = Db::new(b);
    db.exec(match b {
        Backend::Sqlite => include_str!("../../schemas/sql/sqlite.sql"),
        Backend::Postgres => include_str!("../../schemas/sql/postgres.sql"),
    });
    let mut st = db.open();
    let artifact = buildbus::aam::Artifact {
        path: "deploy/images/m/img.ext4".into(),
        uri: "file:///b/tmp/deploy/images/m/img.ext4".into(),
        kind: "image".into(),
        fields: [("machine".to_string(), "m".to_string())].into(),
        target: None,
        size: Some(3),
        mtime: Some("2025-11-21T04:40:00.123Z".into()),
        sha256: Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into()),
        symlink_target: Some("img-1.ext4".into()),
    };
    let common = buildbus::model::Common {
        build_id: "b-v1".into(),
        system: "bitbake".into(),
        ..Default::default()
    };
    let envs = buildbus::aam::envelopes(
        &[artifact],
        &common,
        Default::default(),
        buildbus::model::DEFAULT_EXCHANGE_PREFIX,
    );
    assert_eq!(st.write_batch(&envs).unwrap().new_messages, 1);
    let d = st.query_build("b-v1").unwrap().expect("stored");
    assert_eq!(d.artifacts.len(), 1);
    let a = &d.artifacts[0];
    assert_eq!(a.mtime.as_deref(), Some("2025-11-21T04:40:00.123Z"));
    assert_eq!(a.symlink_target.as_deref(), Some("img-1.ext4"));
    assert_eq!(a.fields["machine"], "m");
    drop(st);
    // Opening it again changes nothing.
    assert_eq!(db.open().counts().unwrap().artifacts, 1);
}
