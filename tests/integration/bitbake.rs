//! BitBake event logs: Toaster-grade records from real logs, checked against the
//! decoded ground truth (`*.decoded.json`, made by Python's own `pickle.loads`).

use std::collections::{BTreeMap, BTreeSet};

use buildbus::model::{BuildResult, Envelope, LogLevel, SstateResult, TaskOutcome};
use serde_json::Value;

use crate::harness::*;

const LOGS: [&str; 5] = [
    "success",
    "rebuild",
    "failure",
    "nothing-provides",
    "live-xmlrpc",
];

/// The decoded ground truth of a log: (class, attrs) per event line.
fn truth(name: &str) -> Vec<(String, Value)> {
    let text = std::fs::read_to_string(fixture(&format!("bitbake/{name}.decoded.json"))).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["class"] != "<allvariables>")
        .map(|v| (v["class"].as_str().unwrap().to_string(), v["attrs"].clone()))
        .collect()
}

fn of<'a>(t: &'a [(String, Value)], class: &str) -> Vec<&'a Value> {
    t.iter()
        .filter(|(c, _)| c == class)
        .map(|(_, a)| a)
        .collect()
}

fn task_outcomes(msgs: &[Envelope]) -> BTreeMap<(String, String), (TaskOutcome, SstateResult)> {
    tasks(msgs)
        .into_iter()
        .map(|t| {
            (
                (t.target.clone(), t.task.clone()),
                (t.outcome, t.sstate_result),
            )
        })
        .collect()
}

fn tally(msgs: &[Envelope]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for t in tasks(msgs) {
        *m.entry(t.outcome.as_str()).or_default() += 1;
    }
    m
}

/// Expectations computed from the ground truth, independently of the translator.
struct Expected {
    total: Option<usize>,
    failed: BTreeSet<String>,
    cached: usize,
    prebuilt: usize,
    covered_skips: usize,
    restored_then_covered: usize,
    completed: usize,
    noexec: usize,
    warnings: usize,
    errors: usize,
}

fn expected(name: &str) -> Expected {
    let t = truth(name);
    let file_pn = |a: &Value| {
        let f = a["taskfile"].as_str().unwrap();
        f.rsplit('/')
            .next()
            .unwrap()
            .split('_')
            .next()
            .unwrap()
            .to_string()
    };
    let noexec: BTreeSet<String> = of(&t, "bb.runqueue.runQueueTaskStarted")
        .into_iter()
        .filter(|a| a["noexec"] == true)
        .map(|a| a["taskid"].as_str().unwrap().to_string())
        .collect();
    let skipped = |reason: &str| {
        of(&t, "bb.runqueue.runQueueTaskSkipped")
            .into_iter()
            .filter(|a| a["reason"] == reason)
            .count()
    };
    let restored: BTreeSet<&str> = of(&t, "bb.runqueue.sceneQueueTaskCompleted")
        .into_iter()
        .map(|a| a["taskid"].as_str().unwrap())
        .collect();
    let restored_then_covered = of(&t, "bb.runqueue.runQueueTaskSkipped")
        .into_iter()
        .filter(|a| a["reason"] == "covered" && restored.contains(a["taskid"].as_str().unwrap()))
        .count();
    let logs = of(&t, "logging.LogRecord");
    Expected {
        restored_then_covered,
        total: of(&t, "bb.event.BuildCompleted")
            .first()
            .map(|a| a["total"].as_u64().unwrap() as usize),
        failed: of(&t, "bb.runqueue.runQueueTaskFailed")
            .into_iter()
            .map(|a| format!("{}:{}", file_pn(a), a["taskname"].as_str().unwrap()))
            .collect(),
        cached: of(&t, "bb.runqueue.sceneQueueTaskCompleted").len(),
        prebuilt: skipped("existing"),
        covered_skips: skipped("covered"),
        completed: of(&t, "bb.runqueue.runQueueTaskCompleted").len(),
        noexec: noexec.len(),
        warnings: logs
            .iter()
            .filter(|a| (30..40).contains(&a["levelno"].as_i64().unwrap()))
            .count()
            + of(&t, "bb.event.MultipleProviders").len(),
        errors: logs
            .iter()
            .filter(|a| a["levelno"].as_i64().unwrap() >= 40)
            .count()
            + of(&t, "bb.event.NoProvider").len()
            + of(&t, "bb.command.CommandFailed").len()
            + of(&t, "bb.event.DiskFull").len(),
    }
}

#[test]
fn every_log_matches_its_ground_truth() {
    for name in LOGS {
        let msgs = clean(&format!("bitbake/{name}.eventlog"));
        let e = expected(name);
        let f = finished(&msgs);
        let counts = tally(&msgs);
        let get = |k: &str| counts.get(k).copied().unwrap_or(0);
        // Every task of the build, exactly once.
        let outcomes = task_outcomes(&msgs);
        assert_eq!(
            outcomes.len(),
            tasks(&msgs).len(),
            "{name}: one message per (recipe, task)"
        );
        if let Some(total) = e.total {
            assert_eq!(
                outcomes.len(),
                total,
                "{name}: tasks = BuildCompleted.total"
            );
        }
        assert_eq!(get("cached"), e.cached, "{name}");
        assert_eq!(get("prebuilt"), e.prebuilt, "{name}");
        // A task restored by setscene is then skipped as covered: it stays cached.
        assert_eq!(
            get("covered"),
            e.covered_skips - e.restored_then_covered,
            "{name}"
        );
        assert_eq!(get("succeeded") + get("empty"), e.completed, "{name}");
        assert_eq!(get("empty"), e.noexec, "{name}");
        let failed: BTreeSet<String> = tasks(&msgs)
            .into_iter()
            .filter(|t| t.outcome == TaskOutcome::Failed)
            .map(|t| format!("{}:{}", t.target, t.task))
            .collect();
        assert_eq!(failed, e.failed, "{name}");
        assert_eq!(f.counts.warnings as usize, e.warnings, "{name}");
        assert_eq!(f.counts.errors as usize, e.errors, "{name}");
        let want_result = if e.errors > 0 || !e.failed.is_empty() {
            BuildResult::Failure
        } else {
            BuildResult::Success
        };
        assert_eq!(f.result, Some(want_result), "{name}");
        assert_eq!(&*f.common.system, "bitbake");
    }
}

#[test]
fn success_build_fields() {
    let msgs = clean("bitbake/success.eventlog");
    let f = finished(&msgs);
    let c = &f.common;
    assert_eq!(c.platform.as_deref(), Some("demo-qemux86-64"), "MACHINE");
    assert_eq!(c.product.as_deref(), Some("demodistro"), "DISTRO");
    assert_eq!(c.buildtype.as_deref(), Some("release"), "DEBUG_BUILD unset");
    assert_eq!(c.tree.as_deref(), Some("main"), "the core layer's branch");
    assert_eq!(
        c.revision.as_deref(),
        Some("1111111111111111111111111111111111111111")
    );
    assert_eq!(f.targets, vec!["demo-image:do_build"]);
    assert_eq!(f.exit_code, Some(0));
    assert_eq!(
        f.metadata.get("MACHINE").map(String::as_str),
        Some("demo-qemux86-64")
    );
    assert_eq!(
        f.metadata.get("DISTRO").map(String::as_str),
        Some("demodistro")
    );
    assert_eq!(f.counts.metrics.get("recipes_parsed"), Some(&12));
    assert_eq!(f.counts.metrics.get("tasks_total"), Some(&58));
    assert!(f.duration_ms.is_some_and(|d| d > 0));
    // Tasks carry their times and log files.
    let compile = tasks(&msgs)
        .into_iter()
        .find(|t| t.target == "linux-demo" && t.task == "do_compile")
        .unwrap();
    assert_eq!(compile.outcome, TaskOutcome::Succeeded);
    assert!(compile.elapsed_ms.is_some_and(|e| e >= 0));
    assert!(compile
        .logfile
        .as_deref()
        .is_some_and(|l| l.contains("log.do_compile")));
    let build = tasks(&msgs)
        .into_iter()
        .find(|t| t.target == "demo-image" && t.task == "do_build")
        .unwrap();
    assert_eq!(build.outcome, TaskOutcome::Empty, "noexec");
    // Warnings: formatted, with the recipe and task they came from.
    let w: Vec<_> = logs(&msgs)
        .into_iter()
        .filter(|l| l.level == LogLevel::Warning)
        .collect();
    let qa = w
        .iter()
        .find(|l| l.message.contains("uses deprecated API"))
        .unwrap();
    assert_eq!(qa.target.as_deref(), Some("hello-app"));
    assert!(
        qa.task.as_deref().is_some_and(|t| t.starts_with("do_")),
        "{:?}",
        qa.task
    );
    let mp = w
        .iter()
        .find(|l| l.message.contains("Multiple providers"))
        .unwrap();
    assert!(
        mp.message.contains("linux-demo, linux-vendor"),
        "{}",
        mp.message
    );
}

#[test]
fn rebuild_setscene_outcomes() {
    let msgs = clean("bitbake/rebuild.eventlog");
    let o = task_outcomes(&msgs);
    let key = |pn: &str, t: &str| (pn.to_string(), t.to_string());
    assert_eq!(
        o[&key("libbar", "do_populate_sysroot")],
        (TaskOutcome::Cached, SstateResult::Restored)
    );
    assert_eq!(
        o[&key("libbar", "do_deploy")],
        (TaskOutcome::Cached, SstateResult::Restored)
    );
    // hello-app's do_deploy setscene failed; the real task ran.
    assert_eq!(
        o[&key("hello-app", "do_deploy")],
        (TaskOutcome::Succeeded, SstateResult::Failed)
    );
    assert_eq!(
        o.values()
            .filter(|(t, _)| *t == TaskOutcome::Prebuilt)
            .count(),
        1
    );
    assert_eq!(
        o.values()
            .filter(|(t, _)| *t == TaskOutcome::Covered)
            .count(),
        49
    );
}

#[test]
fn failure_and_nothing_provides() {
    let msgs = clean("bitbake/failure.eventlog");
    let f = finished(&msgs);
    assert_eq!(f.result, Some(BuildResult::Failure));
    assert_eq!(f.exit_code, Some(1));
    let failed = tasks(&msgs)
        .into_iter()
        .find(|t| t.outcome == TaskOutcome::Failed)
        .unwrap();
    assert_eq!(
        (failed.target.as_str(), failed.task.as_str()),
        ("broken-app", "do_compile")
    );
    assert_eq!(failed.exit_code, Some(1));
    assert!(failed
        .logfile
        .as_deref()
        .is_some_and(|l| l.contains("log.do_compile")));
    let not_run: BTreeSet<String> = tasks(&msgs)
        .into_iter()
        .filter(|t| t.outcome == TaskOutcome::NotExecuted)
        .map(|t| format!("{}:{}", t.target, t.task))
        .collect();
    assert!(
        not_run.contains("broken-app:do_install") && not_run.contains("broken-image:do_build"),
        "{not_run:?}"
    );
    let errors: Vec<_> = logs(&msgs)
        .into_iter()
        .filter(|l| l.level == LogLevel::Error)
        .collect();
    assert!(errors
        .iter()
        .any(|l| l.message.starts_with("Nothing PROVIDES 'does-not-exist'")));
    let e = errors
        .iter()
        .find(|l| l.message.contains("undefined reference"))
        .unwrap();
    assert_eq!(
        (e.target.as_deref(), e.task.as_deref()),
        (Some("broken-app"), Some("do_compile"))
    );

    let msgs = clean("bitbake/nothing-provides.eventlog");
    let f = finished(&msgs);
    assert_eq!(f.result, Some(BuildResult::Failure));
    assert_eq!(f.exit_code, Some(1));
    assert_eq!(f.targets, vec!["no-such-recipe:do_build"]);
    assert!(tasks(&msgs).is_empty());
    let l = logs(&msgs);
    assert_eq!(l.len(), 2);
    assert!(
        l[0].message.contains("Nothing PROVIDES 'no-such-recipe'"),
        "{}",
        l[0].message
    );
    assert!(
        l[1].message.contains("Command execution failed"),
        "{}",
        l[1].message
    );
}

#[test]
fn several_builds_in_one_log_and_stable_ids() {
    let dir = tempdir();
    let p = dir.path().join("two.eventlog");
    let mut data = std::fs::read(fixture("bitbake/success.eventlog")).unwrap();
    data.extend(std::fs::read(fixture("bitbake/failure.eventlog")).unwrap());
    std::fs::write(&p, data).unwrap();
    let (both, report) = translate(&p);
    assert!(report.clean(), "{:?}", report.errors);
    let ids: BTreeSet<String> = both
        .iter()
        .map(|m| m.payload.common().build_id.to_string())
        .collect();
    assert_eq!(ids.len(), 2, "each BuildStarted starts its own build");
    // The same builds as the single logs: same ids, same messages.
    let mut singles: Vec<String> = clean("bitbake/success.eventlog")
        .iter()
        .map(identity)
        .collect();
    singles.extend(clean("bitbake/failure.eventlog").iter().map(identity));
    let mut joined: Vec<String> = both.iter().map(identity).collect();
    singles.sort();
    joined.sort();
    // `source.origin` differs; identity() leaves it out.
    assert_eq!(joined, singles);
    // And distinct from every other log's build.
    let all: BTreeSet<String> = LOGS
        .iter()
        .map(|n| {
            finished(&clean(&format!("bitbake/{n}.eventlog")))
                .common
                .build_id
                .to_string()
        })
        .collect();
    assert_eq!(all.len(), LOGS.len());
}

#[test]
fn bad_lines_are_reported_and_skipped() {
    let text = std::fs::read_to_string(fixture("bitbake/failure.eventlog")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.insert(30, "{garbage".into());
    // A hostile pickle: REDUCE of os.system.
    lines.insert(
        31,
        r#"{"class": "os.system", "vars": "gASMAm9zlIwGc3lzdGVtlJOUjAJsc5SFlFKULg==\n"}"#.into(),
    );
    let dir = tempdir();
    let p = dir.path().join("bad.eventlog");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    let (msgs, report) = translate(&p);
    assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
    let e0 = report.errors[0].to_string();
    let e1 = report.errors[1].to_string();
    assert!(
        e0.contains("bad.eventlog: line 31") && e0.contains("invalid JSON"),
        "{e0}"
    );
    assert!(e1.contains("line 32") && e1.contains("os.system"), "{e1}");
    // Everything else is still translated: the same messages as the clean log.
    let want: BTreeSet<String> = clean("bitbake/failure.eventlog")
        .iter()
        .map(identity)
        .collect();
    let got: BTreeSet<String> = msgs.iter().map(identity).collect();
    assert_eq!(got, want);
}

#[test]
fn translate_cli_detects_eventlogs() {
    let o = buildbus(&[
        "translate",
        "--summary",
        fixture("bitbake/rebuild.eventlog").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains("bitbake build bitbake-"), "{s}");
    assert!(
        s.contains("tasks:    cached 2, covered 49, prebuilt 1, succeeded 6"),
        "{s}"
    );
}
