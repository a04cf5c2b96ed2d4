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

/// Collects messages into per-build summaries, in the order builds first appear.
#[derive(Debug, Default)]
pub struct Summaries {
    order: Vec<String>,
    builds: BTreeMap<String, BuildSummary>,
}

impl Summaries {
    pub fn add(&mut self, env: &Envelope) {
        let c = env.payload.common();
        let s = self
            .builds
            .entry(c.build_id.to_string())
            .or_insert_with(|| {
                self.order.push(c.build_id.to_string());
                BuildSummary {
                    build_id: c.build_id.to_string(),
                    system: c.system.to_string(),
                    ..Default::default()
                }
            });
        *s.messages.entry(env.kind().to_string()).or_default() += 1;
        match &env.payload {
            Payload::Build(b) if b.result.is_some() => s.finished = Some(b.clone()),
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
    }

    pub fn builds(&self) -> impl Iterator<Item = &BuildSummary> {
        self.order.iter().filter_map(|id| self.builds.get(id))
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
