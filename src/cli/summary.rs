//! Human summaries of builds, built from the messages alone (what `translate --summary`
//! prints, and what any consumer of the bus could compute).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::model::{BuildPayload, Envelope, Payload, TaskOutcome};

/// What one build looked like, from its messages.
#[derive(Debug, Clone, Default)]
pub struct BuildSummary {
    pub build_id: String,
    pub system: String,
    pub started: Option<BuildPayload>,
    pub finished: Option<BuildPayload>,
    /// Failed or not executed tasks: (target, task, outcome, failure).
    pub failed_tasks: Vec<(String, String, String, Option<String>)>,
    /// Test summaries that did not pass: (test, status).
    pub failed_tests: Vec<(String, String)>,
    pub messages: BTreeMap<String, u64>,
    pub artifacts: u64,
}

/// Collects messages into per-build summaries and gives each one back as soon as its
/// build finished (a build's `finished` message is its last), so what is held is only
/// the builds still going: memory stays flat however many builds a stream has.
#[derive(Debug, Default)]
pub struct Summaries {
    /// Builds not finished yet, in the order they first appeared.
    open: Vec<BuildSummary>,
}

impl Summaries {
    /// Adds one message; when it is its build's `finished` message, the build's summary
    /// is complete: it is returned and no longer held.
    pub fn add(&mut self, env: &Envelope) -> Option<BuildSummary> {
        let c = env.payload.common();
        // Messages come build by build: the one sought is almost always the last.
        let at = match self.open.iter().rposition(|s| *s.build_id == *c.build_id) {
            Some(at) => at,
            None => {
                self.open.push(BuildSummary {
                    build_id: c.build_id.to_string(),
                    system: c.system.to_string(),
                    ..Default::default()
                });
                self.open.len() - 1
            }
        };
        let s = &mut self.open[at];
        *s.messages.entry(env.kind().to_string()).or_default() += 1;
        match &env.payload {
            Payload::Build(b) if b.result.is_some() => {
                s.finished = Some(b.clone());
                return Some(self.open.remove(at));
            }
            Payload::Build(b) => s.started = Some(b.clone()),
            Payload::Task(t)
                if matches!(t.outcome, TaskOutcome::Failed | TaskOutcome::NotExecuted) =>
            {
                s.failed_tasks.push((
                    t.target.clone(),
                    t.task.clone(),
                    t.outcome.as_str().to_string(),
                    t.failure.clone(),
                ))
            }
            Payload::Test(t) if t.scope == "summary" && t.status != "passed" => {
                s.failed_tests.push((t.test.clone(), t.status.clone()))
            }
            Payload::Artifact(_) => s.artifacts += 1,
            _ => {}
        }
        None
    }

    /// How many builds are held (started, not finished).
    pub fn held(&self) -> usize {
        self.open.len()
    }

    /// The builds that never finished (a stream cut off), in the order they first
    /// appeared; none is held afterwards.
    pub fn drain(&mut self) -> impl Iterator<Item = BuildSummary> + '_ {
        self.open.drain(..)
    }
}

fn tally(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "-".to_string();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl BuildSummary {
    /// A few readable lines.
    pub fn render(&self) -> String {
        let b = self.finished.as_ref().or(self.started.as_ref());
        let mut o = String::new();
        let field = |v: Option<&str>| v.unwrap_or("_").to_string();
        let _ = writeln!(o, "{} build {}", self.system, self.build_id);
        if let Some(b) = b {
            let c = &b.common;
            let _ = writeln!(
                o,
                "  tree/platform/buildtype/product: {} / {} / {} / {}",
                field(c.tree.as_deref()),
                field(c.platform.as_deref()),
                field(c.buildtype.as_deref()),
                field(c.product.as_deref())
            );
            let _ = writeln!(
                o,
                "  revision: {}  branch: {}",
                field(c.revision.as_deref()),
                field(c.branch.as_deref())
            );
            if !b.targets.is_empty() {
                let _ = writeln!(o, "  targets:  {}", b.targets.join(" "));
            }
        }
        match &self.finished {
            Some(f) => {
                let result = f.result.map(|r| r.as_str()).unwrap_or("?");
                let exit = f
                    .exit_code
                    .map(|c| format!(" (exit {c})"))
                    .unwrap_or_default();
                let dur = f
                    .duration_ms
                    .map(|d| format!(" in {:.2}s", d as f64 / 1000.0))
                    .unwrap_or_default();
                let _ = writeln!(o, "  result:   {result}{exit}{dur}");
                let _ = writeln!(o, "  tasks:    {}", tally(&f.counts.tasks));
                let _ = writeln!(o, "  tests:    {}", tally(&f.counts.tests));
                let _ = writeln!(
                    o,
                    "  logs:     {} errors, {} warnings",
                    f.counts.errors, f.counts.warnings
                );
                if let Some(why) = &f.failure {
                    let first = why.lines().next().unwrap_or("");
                    let _ = writeln!(o, "  failure:  {first}");
                }
            }
            None => {
                let _ = writeln!(
                    o,
                    "  result:   (no finished event: still running or cut off)"
                );
            }
        }
        let _ = writeln!(o, "  artifacts: {}", self.artifacts);
        for (target, task, outcome, why) in &self.failed_tasks {
            let why = why
                .as_deref()
                .and_then(|w| w.lines().next())
                .map(|w| format!(": {w}"))
                .unwrap_or_default();
            let _ = writeln!(o, "  {outcome}: {target} [{task}]{why}");
        }
        for (test, status) in &self.failed_tests {
            let _ = writeln!(o, "  test {status}: {test}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::file::translate_file;
    use crate::systems::Context;
    use std::sync::Arc;

    fn messages(rel: &str) -> Vec<Envelope> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel);
        let mut out = Vec::new();
        let report = translate_file(&path, None, &Arc::new(Context::builtin()), &mut |e| {
            out.push(e)
        });
        assert!(report.clean(), "{rel}");
        out
    }

    /// A build's summary comes out with its finished message, and nothing of it is held
    /// afterwards: however many builds go through, at most the open ones are held.
    #[test]
    fn a_finished_build_is_given_back_and_dropped() {
        let mut s = Summaries::default();
        let mut done = Vec::new();
        let mut most = 0;
        for _round in 0..10 {
            for rel in [
                "bazel/test_mixed.json",
                "bazel/interrupted.json",
                "bitbake/rebuild.eventlog",
            ] {
                let msgs = messages(rel);
                let last = msgs.len() - 1;
                for (i, m) in msgs.iter().enumerate() {
                    let out = s.add(m);
                    most = most.max(s.held());
                    // Only the last message of a stream (its build's finished) completes it.
                    assert_eq!(out.is_some(), i == last, "{rel} message {i}");
                    done.extend(out);
                }
                assert_eq!(s.held(), 0, "{rel}");
            }
        }
        assert_eq!(most, 1);
        assert_eq!(done.len(), 30);
        let text = done[0].render();
        assert!(text.contains("result:   failure (exit 3)"), "{text}");
        assert!(text.contains("test flaky: //tests:flaky_test"), "{text}");
        assert!(done[1].render().contains("result:   interrupted (exit 8)"));
    }

    /// Interleaved builds are told apart; one cut off before finishing is given by
    /// `drain`.
    #[test]
    fn open_builds_are_held_until_finished_or_drained() {
        let a = messages("bazel/build_ok.json");
        let b = messages("bazel/build_fail.json");
        let mut s = Summaries::default();
        for m in &a[..a.len() - 1] {
            assert!(s.add(m).is_none());
        }
        for m in &b[..b.len() - 1] {
            assert!(s.add(m).is_none());
        }
        assert_eq!(s.held(), 2);
        let done = s.add(&a[a.len() - 1]).expect("a finished");
        assert_eq!(done.build_id, a[0].payload.common().build_id.to_string());
        assert_eq!(s.held(), 1);
        let rest: Vec<BuildSummary> = s.drain().collect();
        assert_eq!(rest.len(), 1);
        assert!(rest[0].render().contains("(no finished event"));
        assert_eq!(s.held(), 0);
    }
}
