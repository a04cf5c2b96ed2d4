//! Bazel BEP files: real outcomes of every recorded invocation, in both Bazel versions
//! and both formats.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use buildbus::config::{Config, FieldValues};
use buildbus::model::{BuildResult, Kind, TaskOutcome};
use buildbus::systems::Context;

use crate::harness::*;

const VERSIONS: [&str; 2] = ["bazel", "bazel/bazel-2.1.0"];
const NAMES: [&str; 5] = [
    "build_ok",
    "build_fail",
    "test_mixed",
    "pattern_fail",
    "interrupted",
];

fn both(name: &str) -> Vec<(String, Vec<buildbus::model::Envelope>)> {
    let mut v = Vec::new();
    for dir in VERSIONS {
        for ext in ["json", "bin"] {
            let rel = format!("{dir}/{name}.{ext}");
            v.push((rel.clone(), clean(&rel)));
        }
    }
    v
}

fn target_outcomes(msgs: &[buildbus::model::Envelope]) -> BTreeMap<String, TaskOutcome> {
    tasks(msgs)
        .into_iter()
        .filter(|t| t.task == "build")
        .map(|t| (t.target.clone(), t.outcome))
        .collect()
}

#[test]
fn build_ok() {
    for (rel, msgs) in both("build_ok") {
        let f = finished(&msgs);
        assert_eq!(f.result, Some(BuildResult::Success), "{rel}");
        assert_eq!(f.exit_code, Some(0), "{rel}");
        assert_eq!(f.targets, vec!["//app/..."], "{rel}");
        let outcomes = target_outcomes(&msgs);
        let want: BTreeMap<String, TaskOutcome> = ["//app:config", "//app:hello", "//app:report"]
            .into_iter()
            .map(|t| (t.to_string(), TaskOutcome::Succeeded))
            .collect();
        assert_eq!(outcomes, want, "{rel}");
        // --build_event_publish_all_actions: 7 actions, all succeeded.
        let actions: Vec<_> = tasks(&msgs)
            .into_iter()
            .filter(|t| t.task != "build")
            .collect();
        assert_eq!(actions.len(), 7, "{rel}");
        assert!(
            actions.iter().all(|a| a.outcome == TaskOutcome::Succeeded),
            "{rel}"
        );
        assert_eq!(f.counts.tasks.get("succeeded"), Some(&10), "{rel}");
        assert_eq!((f.counts.errors, f.counts.warnings), (0, 0), "{rel}");
        assert_eq!(f.counts.metrics.get("actions_executed"), Some(&7), "{rel}");
        // Pulse fields from metadata, workspace status and configuration.
        let c = &f.common;
        assert_eq!(c.tree.as_deref(), Some("bep-fixture"), "{rel}");
        assert_eq!(c.platform.as_deref(), Some("k8"), "{rel}");
        assert_eq!(c.buildtype.as_deref(), Some("fastbuild"), "{rel}");
        assert_eq!(
            c.revision.as_deref(),
            Some("0123456789abcdef0123456789abcdef01234567"),
            "{rel}"
        );
        assert_eq!(c.branch.as_deref(), Some("main"), "{rel}");
        assert_eq!(f.builder.user.as_deref(), Some("bzl"), "{rel}");
        // Three targets, one output each (app/report has two), through named sets.
        let artifacts: BTreeSet<String> = msgs
            .iter()
            .filter_map(|m| match &m.payload {
                buildbus::model::Payload::Artifact(a) => Some(a.path.clone()),
                _ => None,
            })
            .collect();
        assert!(
            artifacts.contains("bazel-out/k8-fastbuild/bin/app/config.txt"),
            "{rel}: {artifacts:?}"
        );
        assert!(
            artifacts.contains("bazel-out/k8-fastbuild/bin/app/hello"),
            "{rel}: {artifacts:?}"
        );
        // Every message of the build shares the build id and routing prefix.
        let id = &f.common.build_id;
        assert!(
            msgs.iter().all(|m| &m.payload.common().build_id == id),
            "{rel}"
        );
        assert!(
            msgs.iter().all(|m| m
                .meta
                .routing_key
                .starts_with("bep-fixture.k8.fastbuild.bzlws.bazel.")),
            "{rel}: {}",
            msgs[0].meta.routing_key
        );
    }
}

#[test]
fn build_fail_keeps_going() {
    for (rel, msgs) in both("build_fail") {
        let f = finished(&msgs);
        assert_eq!(f.result, Some(BuildResult::Failure), "{rel}");
        assert_eq!(f.exit_code, Some(1), "{rel}");
        let outcomes = target_outcomes(&msgs);
        assert_eq!(outcomes.len(), 13, "{rel}");
        let failed: Vec<&String> = outcomes
            .iter()
            .filter(|(_, o)| **o == TaskOutcome::Failed)
            .map(|(t, _)| t)
            .collect();
        assert_eq!(
            failed,
            vec!["//broken:fails", "//broken:needs_fails"],
            "{rel}"
        );
        // The failing genrule action, with its exit code in 4.2.3 (2.1.0 omits it).
        let action: Vec<_> = tasks(&msgs)
            .into_iter()
            .filter(|t| t.task == "Genrule")
            .collect();
        assert_eq!(action.len(), 1, "{rel}");
        assert_eq!(action[0].outcome, TaskOutcome::Failed);
        assert_eq!(action[0].target, "//broken:fails");
        assert!(
            action[0]
                .logfile
                .as_deref()
                .is_some_and(|l| l.starts_with("file:///")),
            "{rel}"
        );
        if !rel.contains("2.1.0") {
            assert_eq!(action[0].exit_code, Some(1), "{rel}");
            assert!(
                action[0]
                    .failure
                    .as_deref()
                    .is_some_and(|m| m.contains("bash failed")),
                "{rel}"
            );
        }
        // The ERROR record from progress stderr, with its continuation lines and target.
        let errors: Vec<_> = logs(&msgs)
            .into_iter()
            .filter(|l| l.level == buildbus::model::LogLevel::Error)
            .collect();
        assert_eq!(errors.len(), 1, "{rel}");
        assert!(
            errors[0].message.contains("this genrule fails on purpose"),
            "{rel}: {}",
            errors[0].message
        );
        assert_eq!(errors[0].target.as_deref(), Some("//broken:fails"), "{rel}");
        assert_eq!(f.counts.errors, 1, "{rel}");
        assert_eq!(f.counts.tasks.get("failed"), Some(&3), "{rel}");
    }
}

#[test]
fn test_mixed_statuses_and_attempts() {
    for (rel, msgs) in both("test_mixed") {
        let f = finished(&msgs);
        assert_eq!(f.result, Some(BuildResult::Failure), "{rel}");
        assert_eq!(f.exit_code, Some(3), "{rel}");
        let summaries: BTreeMap<String, (String, Option<i64>, Option<i64>)> =
            tests_of(&msgs, "summary")
                .into_iter()
                .map(|t| {
                    (
                        t.test.clone(),
                        (t.status.clone(), t.total_attempts, t.total_shards),
                    )
                })
                .collect();
        let want: BTreeMap<String, (String, Option<i64>, Option<i64>)> = [
            ("//tests:fail_test", "failed", 2, 1),
            ("//tests:flaky_test", "flaky", 2, 1),
            ("//tests:pass_test", "passed", 1, 1),
            ("//tests:sharded_test", "passed", 1, 2),
        ]
        .into_iter()
        .map(|(t, s, a, sh)| (t.to_string(), (s.to_string(), Some(a), Some(sh))))
        .collect();
        assert_eq!(summaries, want, "{rel}");
        let attempts: BTreeSet<(String, i64, i64, String)> = tests_of(&msgs, "attempt")
            .into_iter()
            .map(|t| {
                (
                    t.test.clone(),
                    t.shard.unwrap(),
                    t.attempt.unwrap(),
                    t.status.clone(),
                )
            })
            .collect();
        let want: BTreeSet<(String, i64, i64, String)> = [
            ("//tests:fail_test", 1, 1, "failed"),
            ("//tests:fail_test", 1, 2, "failed"),
            ("//tests:flaky_test", 1, 1, "failed"),
            ("//tests:flaky_test", 1, 2, "passed"),
            ("//tests:pass_test", 1, 1, "passed"),
            ("//tests:sharded_test", 1, 1, "passed"),
            ("//tests:sharded_test", 2, 1, "passed"),
        ]
        .into_iter()
        .map(|(t, sh, a, s)| (t.to_string(), sh, a, s.to_string()))
        .collect();
        assert_eq!(attempts, want, "{rel}");
        let flaky_first = tests_of(&msgs, "attempt")
            .into_iter()
            .find(|t| t.test == "//tests:flaky_test" && t.attempt == Some(1))
            .unwrap();
        assert_eq!(flaky_first.strategy.as_deref(), Some("local"), "{rel}");
        assert!(flaky_first.duration_ms.is_some_and(|d| d > 0), "{rel}");
        assert!(
            flaky_first
                .logurl
                .as_deref()
                .is_some_and(|u| u.ends_with(".log")),
            "{rel}"
        );
        let counts = &f.counts.tests;
        assert_eq!(counts.get("passed"), Some(&2), "{rel}");
        assert_eq!(counts.get("failed"), Some(&1), "{rel}");
        assert_eq!(counts.get("flaky"), Some(&1), "{rel}");
        // test.log and test.xml of every attempt are artifacts of the test.
        let test_logs = msgs
            .iter()
            .filter(|m| matches!(&m.payload, buildbus::model::Payload::Artifact(a) if a.kind == "test_log"))
            .count();
        assert_eq!(test_logs, 7, "{rel}");
        // Routing keys carry the status and the test label.
        assert!(
            msgs.iter().any(|m| m.meta.kind == Kind::Test
                && m.meta.routing_key.ends_with(".flaky.//tests:flaky_test")),
            "{rel}"
        );
    }
}

#[test]
fn pattern_fail_is_a_failed_build_with_errors() {
    for (rel, msgs) in both("pattern_fail") {
        let f = finished(&msgs);
        assert_eq!(f.result, Some(BuildResult::Failure), "{rel}");
        assert_eq!(f.exit_code, Some(1), "{rel}");
        assert_eq!(f.targets, vec!["//nonexistent:target"], "{rel}");
        assert!(
            f.failure
                .as_deref()
                .is_some_and(|m| m.contains("no such package 'nonexistent'")),
            "{rel}"
        );
        assert!(tasks(&msgs).is_empty(), "{rel}");
        assert_eq!((f.counts.errors, f.counts.warnings), (2, 1), "{rel}");
        let l = logs(&msgs);
        assert!(
            l.iter()
                .any(|l| l.target.as_deref() == Some("//nonexistent:target")),
            "{rel}"
        );
        // No configuration and an empty workspace status: those fields are absent.
        assert_eq!(f.common.platform, None, "{rel}");
        assert_eq!(f.common.revision, None, "{rel}");
        assert_eq!(f.common.branch.as_deref(), Some("main"), "{rel}");
        assert!(
            msgs[0].meta.routing_key.starts_with("bep-fixture._._."),
            "{rel}"
        );
    }
}

#[test]
fn interrupted_counts_late_aborted_events() {
    for (rel, msgs) in both("interrupted") {
        let f = finished(&msgs);
        assert_eq!(f.result, Some(BuildResult::Interrupted), "{rel}");
        assert_eq!(f.exit_code, Some(8), "{rel}");
        let outcomes = target_outcomes(&msgs);
        // The aborted target was posted after buildFinished and still counts.
        assert_eq!(
            outcomes.get("//slow:sleepy_too"),
            Some(&TaskOutcome::NotExecuted),
            "{rel}"
        );
        assert_eq!(f.counts.tasks.get("not_executed"), Some(&1), "{rel}");
        let t = tasks(&msgs)
            .into_iter()
            .find(|t| t.target == "//slow:sleepy_too")
            .unwrap();
        assert!(
            t.failure
                .as_deref()
                .is_some_and(|m| m.contains("USER_INTERRUPTED")),
            "{rel}"
        );
        // The finished message is the last one: nothing after lastMessage.
        assert!(msgs.last().unwrap().payload.kind() == Kind::Build, "{rel}");
    }
}

#[test]
fn json_and_binary_give_the_same_set_of_messages() {
    for dir in VERSIONS {
        for name in NAMES {
            let a: BTreeSet<String> = clean(&format!("{dir}/{name}.json"))
                .iter()
                .map(identity)
                .collect();
            let b: BTreeSet<String> = clean(&format!("{dir}/{name}.bin"))
                .iter()
                .map(identity)
                .collect();
            assert!(!a.is_empty());
            let only_a: Vec<_> = a.difference(&b).take(2).collect();
            let only_b: Vec<_> = b.difference(&a).take(2).collect();
            assert!(
                a == b,
                "{dir}/{name}: json-only {only_a:#?}\nbin-only {only_b:#?}"
            );
        }
    }
}

#[test]
fn ids_are_deterministic_and_never_shared() {
    let mut all = HashSet::new();
    let mut total = 0;
    for dir in VERSIONS {
        for name in NAMES {
            let rel = format!("{dir}/{name}.json");
            let first: Vec<String> = clean(&rel)
                .iter()
                .map(|m| m.meta.message_id.clone())
                .collect();
            let second: Vec<String> = clean(&rel)
                .iter()
                .map(|m| m.meta.message_id.clone())
                .collect();
            assert_eq!(first, second, "{rel}: same stream, same ids");
            total += first.len();
            all.extend(first);
        }
    }
    assert_eq!(
        all.len(),
        total,
        "no two messages of the fixtures share an id"
    );
    // The started and finished messages of one build: one entity, two messages.
    let msgs = clean("bazel/build_ok.json");
    let b: Vec<_> = msgs.iter().filter(|m| m.meta.kind == Kind::Build).collect();
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].meta.entity_id, b[1].meta.entity_id);
    assert_ne!(b[0].meta.message_id, b[1].meta.message_id);
    assert_eq!(b[0].meta.state, "started");
    assert_eq!(b[1].meta.state, "finished");
}

#[test]
fn secrets_never_leave() {
    for dir in VERSIONS {
        for name in NAMES {
            for ext in ["json", "bin"] {
                let rel = format!("{dir}/{name}.{ext}");
                for m in clean(&rel) {
                    let text = String::from_utf8(m.to_json()).unwrap();
                    // --client_env=OLDPWD=/tmp/gen and HOME=/home/bzl are in every stream.
                    assert!(!text.contains("/tmp/gen"), "{rel}: {text}");
                    assert!(!text.contains("/home/bzl"), "{rel}: {text}");
                }
            }
        }
    }
    let f = finished(&clean("bazel/build_ok.json")).clone();
    let cmd = f.command.unwrap();
    assert!(cmd.contains("--client_env=HOME=<redacted>"), "{cmd}");
    assert!(cmd.contains("--build_metadata=BRANCH=main"), "{cmd}");
}

#[test]
fn configured_secret_patterns_apply_to_metadata() {
    let cfg = Config::parse(
        "[redaction]\nkey_patterns = [\"(?i)repo_url\"]\nvalue_patterns = [\"(?P<keep>)acme\"]\n",
        "test",
    )
    .unwrap();
    let ctx = Context::new(&cfg, &FieldValues::default()).unwrap();
    let (msgs, _) = translate_with(&fixture("bazel/build_ok.json"), &ctx);
    let f = finished(&msgs);
    assert_eq!(
        f.metadata.get("REPO_URL").map(String::as_str),
        Some("<redacted>")
    );
    assert!(msgs.iter().all(|m| !String::from_utf8(m.to_json())
        .unwrap()
        .contains("example.invalid/acme")));
}

#[test]
fn pulse_fields_follow_config_and_overrides() {
    // Rules from a config file: tree from a literal, product from the workspace status.
    let cfg = Config::parse(
        "[bazel.derive]\ntree = [\"literal:acme\"]\nproduct = [\"status:STABLE_FIXTURE_NAME\"]\nbuildtype = [\"option:compilation_mode\", \"literal:dbg\"]\ntags = [\"metadata:BRANCH\"]\n[fields]\ntags = [\"ci\"]\n",
        "test",
    )
    .unwrap();
    let ctx = Context::new(&cfg, &FieldValues::default()).unwrap();
    let (msgs, _) = translate_with(&fixture("bazel/build_ok.json"), &ctx);
    let c = &finished(&msgs).common;
    assert_eq!(c.tree.as_deref(), Some("acme"));
    assert_eq!(c.product.as_deref(), Some("bep_fixture_ws"));
    assert_eq!(c.buildtype.as_deref(), Some("dbg"));
    assert_eq!(&*c.tags, ["ci", "main"]);
    // Overrides (flags, env) win over everything.
    let over = FieldValues {
        tree: Some("other.tree".into()),
        ..Default::default()
    };
    let ctx = Context::new(&cfg, &over).unwrap();
    let (msgs, _) = translate_with(&fixture("bazel/build_ok.json"), &ctx);
    assert!(msgs.iter().all(|m| m
        .meta
        .routing_key
        .starts_with("other%2Etree.k8.dbg.bep_fixture_ws.bazel.")));
}
