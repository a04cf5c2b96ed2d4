//! The Bazel translator: a live model of one Bazel invocation, fed BEP events in stream
//! order, giving normalized messages.
//!
//! What becomes what:
//! - `started` .. `lastMessage`: a `build` message `started` (once the context below is
//!   known) and one `finished` at `lastMessage` (not at `buildFinished`: metrics and late
//!   `aborted` events come after it and still count);
//! - `targetCompleted`: a `task` with `task: "build"` (outcome `succeeded`/`failed`, or
//!   `not_executed` when aborted); `actionCompleted`: a `task` named by the action's
//!   mnemonic; the target's output files (through its named sets): `artifact`s;
//! - `testResult`: a `test` with `scope: attempt` (and its outputs as `artifact`s);
//!   `testSummary`: a `test` with `scope: summary`;
//! - `ERROR:`/`WARNING:` records in `progress` stderr: `log`s;
//! - `buildMetrics`: `counts.metrics` of the finished build.
//!
//! **Context and determinism.** The Pulse fields come from events that arrive after
//! `started` (build metadata, workspace status, the target configuration), and Bazel's
//! JSON and binary writers do not post events in the same order. So messages are held
//! until the context is known: every context event `started` announced has arrived and
//! the first event naming a configuration has come (or the build finished). Then the
//! fields are resolved once, frozen for the build, and everything held is released in
//! order. Every message id is a function of event ids only, never of arrival order, so
//! the `.json` and `.bin` of one invocation give the same set of messages.
//!
//! Timestamps: an event's own time where BEP has one (start, finish, test attempts,
//! action times), else the transport's time for the event (BES), else the build's start.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::mem;
use std::sync::Arc;

use crate::decode::bep::proto::build_event_stream::{
    self as bep, build_event::Payload as P, build_event_id::Id, BuildEvent,
};
use crate::model::{
    ids, time, ArtifactPayload, BuildPayload, BuildResult, BuildState, Builder, Common, Counts,
    Envelope, Kind, LogPayload, Payload, SourceMeta, SstateResult, TaskOutcome, TaskPayload,
    TestPayload,
};
use crate::systems::console;
use crate::systems::fields::{repo_name, PulseFields, RuleSource};
use crate::systems::{Context, Emit, Translator};

const SYSTEM: &str = "bazel";

/// Context event kinds whose arrival (when `started` announced them) the Pulse fields wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ctx {
    Metadata,
    Status,
    Options,
    Structured,
    Unstructured,
    Pattern,
}

fn ctx_of(id: &Id) -> Option<Ctx> {
    Some(match id {
        Id::BuildMetadata(_) => Ctx::Metadata,
        Id::WorkspaceStatus(_) => Ctx::Status,
        Id::OptionsParsed(_) => Ctx::Options,
        Id::StructuredCommandLine(_) => Ctx::Structured,
        Id::UnstructuredCommandLine(_) => Ctx::Unstructured,
        Id::Pattern(_) | Id::PatternSkipped(_) => Ctx::Pattern,
        _ => return None,
    })
}

/// A message waiting for the build's Pulse fields.
struct Draft {
    payload: Payload,
    entity: Entity,
}

/// The entity a draft describes: its id once the build id is known (almost always:
/// only events before `started` come without), else the parts that name it.
enum Entity {
    Id(String),
    Parts(Vec<String>),
}

#[derive(Default)]
struct NamedSet {
    files: Vec<bep::File>,
    sets: Vec<String>,
}

/// Everything known about the invocation so far.
#[derive(Default)]
struct Build {
    id: Option<String>,
    started_ms: Option<i64>,
    command_name: Option<String>,
    tool_version: Option<String>,
    workspace_dir: Option<String>,
    announced: HashSet<Ctx>,
    seen: HashSet<Ctx>,
    metadata: BTreeMap<String, String>,
    status: BTreeMap<String, String>,
    configs: HashMap<String, bep::Configuration>,
    platform_config: Option<String>,
    original_cmd: Option<Vec<String>>,
    /// `original_cmd` (or the unstructured one) joined and redacted, once known.
    command: Option<String>,
    unstructured_cmd: Option<Vec<String>>,
    /// The canonical command line's options (name, value) in order; a later one wins.
    canonical_options: Vec<(String, String)>,
    patterns: Vec<String>,
    pattern_failure: Option<String>,
    target_kinds: HashMap<String, String>,
    named_sets: HashMap<String, NamedSet>,
    attempts: HashMap<(String, String), (i64, BTreeSet<i64>)>,
    fields: Option<PulseFields>,
    pending: Vec<Draft>,
    finished: Option<bep::BuildFinished>,
    finished_aborted: Option<String>,
    metrics: BTreeMap<String, i64>,
    counts: Counts,
    host: Option<String>,
    /// The first line of the first error the build printed (a failed build's reason
    /// when Bazel gives no failure detail).
    first_error: Option<String>,
    done: bool,
}

impl RuleSource for Build {
    fn lookup(&self, rule: &str) -> Option<String> {
        let (ns, key) = rule.split_once(':').unwrap_or((rule, ""));
        let config = || {
            self.platform_config
                .as_ref()
                .and_then(|c| self.configs.get(c))
        };
        match ns {
            "metadata" => self.metadata.get(key).cloned(),
            "status" => self.status.get(key).cloned(),
            "config" => config().map(|c| match key {
                "platformName" | "platform_name" => c.platform_name.clone(),
                "cpu" => c.cpu.clone(),
                "mnemonic" => c.mnemonic.clone(),
                _ => String::new(),
            }),
            "make" => config().and_then(|c| c.make_variable.get(key).cloned()),
            "option" => self
                .canonical_options
                .iter()
                .rev()
                .find(|(name, _)| name == key)
                .map(|(_, value)| value.clone()),
            "repo" => self.lookup(key).and_then(|url| repo_name(&url)),
            "workspace" => self
                .workspace_dir
                .as_deref()
                .and_then(|d| d.trim_end_matches('/').rsplit('/').next())
                .map(str::to_string),
            "literal" => Some(key.to_string()),
            _ => None,
        }
    }
}

/// Statistics of one translation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    /// Events of kinds this version of buildbus does not know (newer Bazel): skipped.
    pub unknown: u64,
    pub builds: u64,
}

/// Translates the BEP events of one stream (one or more invocations, one after another).
pub struct BazelTranslator {
    ctx: Arc<Context>,
    /// Shared by every message of the stream.
    source: Arc<SourceMeta>,
    build: Build,
    stats: Stats,
    /// The transport's time for the current event (BES gives one), in ms.
    event_time_ms: Option<i64>,
    /// Facts from outside the stream (BES lifecycle events), added to every build
    /// message's metadata.
    extra_metadata: BTreeMap<String, String>,
}

fn ms_of(ts: &Option<pbjson_types::Timestamp>) -> Option<i64> {
    ts.as_ref().and_then(|t| {
        t.seconds
            .checked_mul(1000)?
            .checked_add(i64::from(t.nanos) / 1_000_000)
    })
}

fn dur_ms(d: &Option<pbjson_types::Duration>) -> Option<i64> {
    d.as_ref().and_then(|d| {
        d.seconds
            .checked_mul(1000)?
            .checked_add(i64::from(d.nanos) / 1_000_000)
    })
}

fn nonzero(v: i64) -> Option<i64> {
    (v != 0).then_some(v)
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn config_id(c: &Option<bep::build_event_id::ConfigurationId>) -> &str {
    c.as_ref().map_or("", |c| c.id.as_str())
}

fn file_uri(f: &bep::File) -> Option<String> {
    match &f.file {
        Some(bep::file::File::Uri(u)) => Some(u.clone()),
        _ => None,
    }
}

/// Calls `f` with the files of the named sets `roots`, through their nested sets, each
/// set once, depth first in order.
fn named_set_files<'a>(
    sets: &'a HashMap<String, NamedSet>,
    roots: &'a [bep::build_event_id::NamedSetOfFilesId],
    mut f: impl FnMut(&'a bep::File),
) {
    // The usual case: one set without nested sets, nothing to remember.
    if let [root] = roots {
        match sets.get(&root.id) {
            None => return,
            Some(set) if set.sets.is_empty() => return set.files.iter().for_each(f),
            Some(_) => {}
        }
    }
    let mut seen: HashSet<&str> = HashSet::new();
    let mut stack: Vec<&str> = roots.iter().rev().map(|r| r.id.as_str()).collect();
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        if let Some(set) = sets.get(id) {
            set.files.iter().for_each(&mut f);
            stack.extend(set.sets.iter().map(String::as_str).rev());
        }
    }
}

/// A file's path: its prefix and name, else the local path of a `file://` URI, else its name.
fn file_path(f: &bep::File) -> String {
    if !f.path_prefix.is_empty() {
        let len = f.path_prefix.iter().map(|p| p.len() + 1).sum::<usize>() + f.name.len();
        let mut p = String::with_capacity(len);
        for part in &f.path_prefix {
            p.push_str(part);
            p.push('/');
        }
        p.push_str(&f.name);
        return p;
    }
    if let Some(path) = file_uri(f)
        .as_deref()
        .and_then(|u| u.strip_prefix("file://"))
    {
        return path.to_string();
    }
    f.name.clone()
}

fn sha256_of(f: &bep::File) -> Option<String> {
    let d = f.digest.to_ascii_lowercase();
    (d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())).then_some(d)
}

fn test_status(code: i32) -> String {
    bep::TestStatus::try_from(code)
        .map(|s| s.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("status_{code}"))
}

impl BazelTranslator {
    pub fn new(ctx: Arc<Context>, source: SourceMeta) -> BazelTranslator {
        BazelTranslator {
            ctx,
            source: Arc::new(source),
            build: Build::default(),
            stats: Stats::default(),
            event_time_ms: None,
            extra_metadata: BTreeMap::new(),
        }
    }

    /// What the binary decoder must keep of an event for translators with context
    /// `ctx` (see [`crate::decode::bep::sparse::Needs`]).
    pub fn decode_needs(ctx: &Context) -> crate::decode::bep::codec::Needs {
        crate::decode::bep::codec::Needs::of(ctx.rules(SYSTEM).all())
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Feeds an event that came with a transport timestamp (BES `event_time`).
    pub fn event_at(&mut self, ev: Box<BuildEvent>, time_ms: Option<i64>, out: &mut Emit<'_>) {
        self.event_time_ms = time_ms;
        self.event(ev, out);
        self.event_time_ms = None;
    }

    fn fallback_ms(&self) -> Option<i64> {
        self.event_time_ms.or(self.build.started_ms)
    }

    /// The common part of a new draft: the final one once the fields are frozen (the
    /// usual case), else a placeholder with only the timestamp (an empty `build_id`),
    /// filled in by [`BazelTranslator::send`].
    fn common_placeholder(&self, ts_ms: Option<i64>) -> Common {
        let timestamp = ts_ms.or(self.fallback_ms()).and_then(time::shared);
        match &self.build.fields {
            Some(fields) => fields.common(timestamp),
            None => Common {
                timestamp,
                ..Common::default()
            },
        }
    }

    /// The entity named by `parts` within the current build (see [`Entity`]).
    fn entity(&self, kind: Kind, parts: &[&str]) -> Entity {
        match &self.build.id {
            Some(id) => Entity::Id(ids::entity_id(SYSTEM, id, kind.as_str(), parts)),
            None => Entity::Parts(parts.iter().map(|p| p.to_string()).collect()),
        }
    }

    fn draft(&mut self, payload: Payload, entity: Entity, out: &mut Emit<'_>) {
        /// Counts one more `key` (the key is copied only the first time it is seen).
        fn count(map: &mut BTreeMap<String, u64>, key: &str) {
            match map.get_mut(key) {
                Some(n) => *n += 1,
                None => {
                    map.insert(key.to_string(), 1);
                }
            }
        }
        let b = &mut self.build;
        match &payload {
            Payload::Task(t) => count(&mut b.counts.tasks, t.outcome.as_str()),
            Payload::Test(t) if t.scope == "summary" => count(&mut b.counts.tests, &t.status),
            Payload::Log(l) => match l.level {
                crate::model::LogLevel::Warning => b.counts.warnings += 1,
                _ => b.counts.errors += 1,
            },
            _ => {}
        }
        let d = Draft { payload, entity };
        if b.fields.is_some() && b.pending.is_empty() {
            // The usual case once the context is known: straight out, not through
            // `pending`.
            self.send(d, out);
        } else {
            b.pending.push(d);
            if b.fields.is_some() {
                self.release(out);
            }
        }
    }

    /// Sends every held message (the fields must be frozen).
    fn release(&mut self, out: &mut Emit<'_>) {
        if self.build.fields.is_none() || self.build.id.is_none() {
            return;
        }
        for d in mem::take(&mut self.build.pending) {
            self.send(d, out);
        }
    }

    /// Sends one draft with the frozen fields (nothing if they are not frozen).
    fn send(&self, mut d: Draft, out: &mut Emit<'_>) {
        let (Some(fields), Some(id)) = (self.build.fields.as_ref(), self.build.id.as_ref()) else {
            return;
        };
        let c = d.payload.common_mut();
        if c.build_id.is_empty() {
            *c = fields.common(c.timestamp.take());
        }
        // The build id is the one the entity id was made with: a new build id is only
        // taken after everything of the previous build was released.
        let entity_id = match d.entity {
            Entity::Id(e) => e,
            Entity::Parts(parts) => {
                let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
                ids::entity_id(SYSTEM, id, d.payload.kind().as_str(), &parts)
            }
        };
        out(Envelope::with_entity_id(
            d.payload,
            entity_id,
            Arc::clone(&self.source),
            &self.ctx.exchange_prefix,
        ));
    }

    fn context_complete(&self) -> bool {
        self.build
            .announced
            .iter()
            .all(|c| self.build.seen.contains(c))
    }

    /// Freezes the Pulse fields (if not yet) and emits `build started` plus all held
    /// messages. `force` freezes even with context missing (the build is ending).
    fn freeze(&mut self, force: bool, out: &mut Emit<'_>) {
        if self.build.fields.is_some() || self.build.id.is_none() {
            return;
        }
        if !force && !self.context_complete() {
            return;
        }
        if self.build.platform_config.is_none() {
            // Any target configuration known (lowest id, for determinism).
            self.build.platform_config = self
                .build
                .configs
                .iter()
                .filter(|(_, c)| !c.is_tool && !c.platform_name.is_empty())
                .map(|(id, _)| id)
                .min()
                .cloned();
        }
        let id = self.build.id.as_deref().unwrap_or_default();
        self.build.fields = Some(self.ctx.pulse_fields(SYSTEM, &self.build, id));
        // The started message goes first.
        let started = Payload::Build(self.build_payload(BuildState::Started));
        let entity = self.entity(Kind::Build, &[]);
        self.build.pending.insert(
            0,
            Draft {
                payload: started,
                entity,
            },
        );
        self.release(out);
    }

    /// The build's command line, redacted; worked out once per build (redaction runs
    /// a dozen patterns per argument).
    fn command_line(&mut self) -> Option<String> {
        if self.build.command.is_none() {
            let args = self
                .build
                .original_cmd
                .as_ref()
                .or(self.build.unstructured_cmd.as_ref())?;
            let mut line = String::with_capacity(args.iter().map(|a| a.len() + 1).sum());
            // As a whole: `--client_env NAME=value` is two words.
            self.ctx.redactor.push_args(args, &mut line);
            self.build.command = Some(line);
        }
        self.build.command.clone()
    }

    /// The build message in `state`. The finished one is the build's last message: it
    /// takes the tallies rather than copying them.
    fn build_payload(&mut self, state: BuildState) -> BuildPayload {
        let command = self.command_line();
        let mut tallies = None;
        if state == BuildState::Finished {
            let b = &mut self.build;
            tallies = Some(Counts {
                metrics: mem::take(&mut b.metrics),
                ..mem::take(&mut b.counts)
            });
        }
        let b = &self.build;
        let fin = b.finished.as_ref();
        let finished_ms = fin.and_then(|f| nonzero(f.finish_time_millis).or(ms_of(&f.finish_time)));
        let exit = fin.and_then(|f| f.exit_code.as_ref());
        let result = (state == BuildState::Finished).then(|| {
            if b.finished_aborted.is_some() && fin.is_none() {
                return BuildResult::Aborted;
            }
            match exit.map(|e| e.name.as_str()) {
                Some("SUCCESS") => BuildResult::Success,
                Some("INTERRUPTED") => BuildResult::Interrupted,
                None if fin.is_some_and(|f| f.overall_success) => BuildResult::Success,
                None if fin.is_none() => BuildResult::Aborted,
                _ => BuildResult::Failure,
            }
        });
        let redactor = &self.ctx.redactor;
        let mut metadata: BTreeMap<String, String> = b
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), redactor.keyed(k, v).into_owned()))
            .collect();
        if let Some(c) = &b.command_name {
            metadata.insert("bazel.command".into(), c.clone());
        }
        for (k, v) in &self.extra_metadata {
            metadata.insert(k.clone(), redactor.keyed(k, v).into_owned());
        }
        let (ts, counts) = match state {
            BuildState::Started => (b.started_ms, Counts::default()),
            BuildState::Finished => (finished_ms.or(b.started_ms), tallies.unwrap_or_default()),
        };
        let finished = state == BuildState::Finished;
        BuildPayload {
            common: self.common_placeholder(ts),
            state,
            result,
            targets: b.patterns.clone(),
            command,
            started_at: b.started_ms.and_then(time::from_millis),
            finished_at: if finished {
                finished_ms.and_then(time::from_millis)
            } else {
                None
            },
            duration_ms: if finished {
                finished_ms.zip(b.started_ms).map(|(f, s)| f - s)
            } else {
                None
            },
            exit_code: if finished {
                exit.map(|e| i64::from(e.code)).or(fin.map(|_| 0))
            } else {
                None
            },
            builder: Builder {
                host: b
                    .status
                    .get("BUILD_HOST")
                    .or(b.host.as_ref())
                    .map(|h| redactor.value(h).into_owned()),
                user: b
                    .status
                    .get("BUILD_USER")
                    .map(|u| redactor.value(u).into_owned()),
            },
            counts,
            tool_version: b.tool_version.clone(),
            failure: if finished {
                fin.and_then(|f| f.failure_detail.as_ref())
                    .map(|d| d.message.clone())
                    .filter(|m| !m.is_empty())
                    .or(b.pattern_failure.clone())
                    .or(b.finished_aborted.clone())
                    .or(b.first_error.clone())
            } else {
                None
            },
            metadata,
        }
    }

    /// Ends the current invocation: emits anything held and, if Bazel said the build
    /// finished, the finished message.
    fn end_build(&mut self, out: &mut Emit<'_>) {
        if self.build.done || self.build.id.is_none() {
            return;
        }
        self.freeze(true, out);
        if self.build.finished.is_some() || self.build.finished_aborted.is_some() {
            let p = Payload::Build(self.build_payload(BuildState::Finished));
            let entity = self.entity(Kind::Build, &[]);
            self.draft(p, entity, out);
        }
        self.build.done = true;
    }

    /// An artifact message for file `f`, whose path is `path`.
    fn artifact_payload(
        &self,
        f: &bep::File,
        path: String,
        kind: String,
        target: Option<&str>,
        ts: Option<i64>,
    ) -> Payload {
        Payload::Artifact(ArtifactPayload {
            common: self.common_placeholder(ts),
            path,
            uri: file_uri(f),
            kind,
            size: u64::try_from(f.length).ok().filter(|&l| l > 0),
            sha256: sha256_of(f),
            target: target.map(str::to_string),
            fields: BTreeMap::new(),
            mtime: None,
            symlink_target: None,
        })
    }

    fn on_target_completed(
        &mut self,
        id: &bep::build_event_id::TargetCompletedId,
        payload: Option<&P>,
        out: &mut Emit<'_>,
    ) {
        let cfg = config_id(&id.configuration);
        self.note_config(cfg, out);
        let task = if id.aspect.is_empty() {
            "build"
        } else {
            id.aspect.as_str()
        };
        let (outcome, failure) = match payload {
            Some(P::Completed(c)) => (
                if c.success {
                    TaskOutcome::Succeeded
                } else {
                    TaskOutcome::Failed
                },
                c.failure_detail.as_ref().and_then(|d| nonempty(&d.message)),
            ),
            Some(P::Aborted(a)) => (TaskOutcome::NotExecuted, nonempty(&a.description)),
            _ => (TaskOutcome::Failed, None),
        };
        let entity = self.entity(Kind::Task, &[&id.label, cfg, task]);
        let p = TaskPayload {
            common: self.common_placeholder(None),
            target: id.label.clone(),
            task: task.to_string(),
            outcome,
            sstate_result: SstateResult::Na,
            started_at: None,
            finished_at: None,
            elapsed_ms: None,
            exit_code: None,
            logfile: None,
            target_kind: self.build.target_kinds.get(&id.label).cloned(),
            failure,
        };
        self.draft(Payload::Task(p), entity, out);
        if let Some(P::Completed(c)) = payload {
            self.on_outputs(id, cfg, c, out);
        }
    }

    /// The artifact messages of a completed target's output files: by output group
    /// (sorted), through the groups' named sets, each path once.
    fn on_outputs(
        &mut self,
        id: &bep::build_event_id::TargetCompletedId,
        cfg: &str,
        c: &bep::TargetComplete,
        out: &mut Emit<'_>,
    ) {
        let mut groups: Vec<&bep::OutputGroup> = c.output_group.iter().collect();
        groups.sort_by(|a, b| {
            a.name.cmp(&b.name).then_with(|| {
                a.file_sets
                    .iter()
                    .map(|s| &s.id)
                    .cmp(b.file_sets.iter().map(|s| &s.id))
            })
        });
        let mut files: Vec<(&str, &bep::File)> = Vec::new();
        if groups.is_empty() {
            files.extend(c.important_output.iter().map(|f| ("default", f)));
        }
        // The named sets are borrowed while the messages are drafted.
        let sets = mem::take(&mut self.build.named_sets);
        for g in groups {
            named_set_files(&sets, &g.file_sets, |f| files.push((&g.name, f)));
        }
        let mut paths: Vec<String> = files.iter().map(|(_, f)| file_path(f)).collect();
        let mut seen: HashSet<&str> = HashSet::new();
        let first: Vec<bool> = (0..paths.len())
            .map(|i| {
                let p = paths[i].as_str();
                // Few files: a look back is cheaper than hashing.
                if paths.len() <= 8 {
                    !paths[..i].iter().any(|q| q == p)
                } else {
                    seen.insert(p)
                }
            })
            .collect();
        drop(seen);
        for (i, (group, f)) in files.into_iter().enumerate() {
            if !first[i] {
                continue;
            }
            let path = mem::take(&mut paths[i]);
            let kind = if group == "default" {
                "output".to_string()
            } else {
                format!("output:{group}")
            };
            let entity = self.entity(Kind::Artifact, &[&id.label, cfg, &path]);
            let p = self.artifact_payload(f, path, kind, Some(&id.label), None);
            self.draft(p, entity, out);
        }
        self.build.named_sets = sets;
    }

    fn on_action(
        &mut self,
        id: &bep::build_event_id::ActionCompletedId,
        a: &bep::ActionExecuted,
        out: &mut Emit<'_>,
    ) {
        let cfg = config_id(&id.configuration);
        let label = nonempty(&id.label).or_else(|| nonempty(&a.label));
        let target = label.clone().unwrap_or_else(|| id.primary_output.clone());
        let start = ms_of(&a.start_time);
        let end = ms_of(&a.end_time);
        let mnemonic = nonempty(&a.r#type).unwrap_or_else(|| "action".to_string());
        let p = TaskPayload {
            common: self.common_placeholder(end.or(start)),
            target: target.clone(),
            task: mnemonic.clone(),
            outcome: if a.success {
                TaskOutcome::Succeeded
            } else {
                TaskOutcome::Failed
            },
            sstate_result: SstateResult::Na,
            started_at: start.and_then(time::from_millis),
            finished_at: end.and_then(time::from_millis),
            elapsed_ms: start.zip(end).map(|(s, e)| e - s),
            exit_code: (!a.success || a.exit_code != 0).then_some(i64::from(a.exit_code)),
            logfile: a.stderr.as_ref().and_then(file_uri),
            target_kind: label
                .as_ref()
                .and_then(|l| self.build.target_kinds.get(l).cloned()),
            failure: a.failure_detail.as_ref().and_then(|d| nonempty(&d.message)),
        };
        let entity = self.entity(Kind::Task, &[&target, cfg, &mnemonic, &id.primary_output]);
        self.draft(Payload::Task(p), entity, out);
    }

    fn on_test_result(
        &mut self,
        id: &bep::build_event_id::TestResultId,
        payload: Option<&P>,
        out: &mut Emit<'_>,
    ) {
        let cfg = config_id(&id.configuration);
        self.note_config(cfg, out);
        let (run, shard, attempt) = (
            i64::from(id.run),
            i64::from(id.shard),
            i64::from(id.attempt),
        );
        let e = self
            .build
            .attempts
            .entry((id.label.clone(), cfg.to_string()))
            .or_default();
        e.0 = e.0.max(attempt);
        e.1.insert(shard);
        let numbers = [run.to_string(), shard.to_string(), attempt.to_string()];
        let base = [
            &id.label,
            cfg,
            "attempt",
            &numbers[0],
            &numbers[1],
            &numbers[2],
        ];
        let p = match payload {
            Some(P::TestResult(r)) => r,
            Some(P::Aborted(a)) => {
                let p = self.test_payload(&id.label, "attempt", "incomplete".into(), None);
                let _ = a;
                let p = TestPayload {
                    attempt: Some(attempt),
                    shard: Some(shard),
                    run: Some(run),
                    ..p
                };
                let entity = self.entity(Kind::Test, &base);
                self.draft(Payload::Test(p), entity, out);
                return;
            }
            _ => return,
        };
        let start = nonzero(p.test_attempt_start_millis_epoch).or(ms_of(&p.test_attempt_start));
        let info = p.execution_info.as_ref();
        let log = p.test_action_output.iter().find(|f| f.name == "test.log");
        let mut t = self.test_payload(&id.label, "attempt", test_status(p.status), start);
        t.attempt = Some(attempt);
        t.shard = Some(shard);
        t.run = Some(run);
        t.duration_ms =
            nonzero(p.test_attempt_duration_millis).or(dur_ms(&p.test_attempt_duration));
        t.cached = Some(p.cached_locally || info.is_some_and(|i| i.cached_remotely));
        t.logurl = log.and_then(file_uri);
        t.strategy = info.and_then(|i| nonempty(&i.strategy));
        if self.build.host.is_none() {
            self.build.host = info.and_then(|i| nonempty(&i.hostname));
        }
        let entity = self.entity(Kind::Test, &base);
        self.draft(Payload::Test(t), entity, out);
        for f in &p.test_action_output {
            let kind = match f.name.as_str() {
                "test.log" => "test_log",
                "test.xml" => "test_xml",
                _ => "test_output",
            };
            let [label, cfg, scope, run, shard, attempt] = base;
            let entity = self.entity(
                Kind::Artifact,
                &[label, cfg, scope, run, shard, attempt, &f.name],
            );
            let a =
                self.artifact_payload(f, file_path(f), kind.to_string(), Some(&id.label), start);
            self.draft(a, entity, out);
        }
    }

    fn test_payload(
        &self,
        label: &str,
        scope: &str,
        status: String,
        ts: Option<i64>,
    ) -> TestPayload {
        TestPayload {
            common: self.common_placeholder(ts),
            test: label.to_string(),
            scope: scope.to_string(),
            status,
            attempt: None,
            shard: None,
            run: None,
            total_attempts: None,
            total_shards: None,
            duration_ms: None,
            cached: None,
            logurl: None,
            strategy: None,
        }
    }

    fn on_test_summary(
        &mut self,
        id: &bep::build_event_id::TestSummaryId,
        payload: Option<&P>,
        out: &mut Emit<'_>,
    ) {
        let cfg = config_id(&id.configuration);
        self.note_config(cfg, out);
        let entity = self.entity(Kind::Test, &[&id.label, cfg, "summary"]);
        let s = match payload {
            Some(P::TestSummary(s)) => s,
            Some(P::Aborted(_)) => {
                let t = self.test_payload(&id.label, "summary", "incomplete".into(), None);
                self.draft(Payload::Test(t), entity, out);
                return;
            }
            _ => return,
        };
        let seen = self
            .build
            .attempts
            .get(&(id.label.clone(), cfg.to_string()));
        let start = nonzero(s.first_start_time_millis).or(ms_of(&s.first_start_time));
        let mut t = self.test_payload(&id.label, "summary", test_status(s.overall_status), start);
        t.total_attempts = nonzero(i64::from(s.attempt_count)).or(seen.map(|a| a.0));
        t.total_shards =
            nonzero(i64::from(s.shard_count)).or(seen.map(|a| a.1.len() as i64).filter(|&n| n > 0));
        t.run = nonzero(i64::from(s.run_count));
        t.duration_ms = nonzero(s.total_run_duration_millis).or(dur_ms(&s.total_run_duration));
        t.cached = Some(s.total_num_cached > 0);
        t.logurl = s.failed.iter().chain(&s.passed).find_map(file_uri);
        self.draft(Payload::Test(t), entity, out);
    }

    /// The first event naming a target configuration picks the build's platform and
    /// may complete the context.
    fn note_config(&mut self, cfg: &str, out: &mut Emit<'_>) {
        if self.build.platform_config.is_none() && self.build.configs.contains_key(cfg) {
            self.build.platform_config = Some(cfg.to_string());
        }
        if self.build.platform_config.is_some() {
            self.freeze(false, out);
        }
    }

    fn on_progress(&mut self, opaque: i32, p: &bep::Progress, out: &mut Emit<'_>) {
        for (i, rec) in console::records(&p.stderr).into_iter().enumerate() {
            let message = self.ctx.redactor.value(&rec.message).into_owned();
            if rec.level != crate::model::LogLevel::Warning && self.build.first_error.is_none() {
                self.build.first_error = message.lines().next().map(str::to_string);
            }
            let target = console::first_label(&message);
            let l = LogPayload {
                common: self.common_placeholder(None),
                level: rec.level,
                message,
                target,
                task: None,
            };
            let entity = self.entity(
                Kind::Log,
                &["progress", &opaque.to_string(), &i.to_string()],
            );
            self.draft(Payload::Log(l), entity, out);
        }
    }

    fn on_started(
        &mut self,
        children: &[bep::BuildEventId],
        s: &bep::BuildStarted,
        out: &mut Emit<'_>,
    ) {
        if self.build.id.as_deref().is_some_and(|id| id != s.uuid) {
            // A second invocation in one stream: close the first.
            self.end_build(out);
        }
        if self.build.id.is_some() && self.build.done {
            self.build = Build::default();
        }
        let b = &mut self.build;
        b.id = Some(if s.uuid.is_empty() {
            "bazel-unknown-invocation".into()
        } else {
            s.uuid.clone()
        });
        b.started_ms = nonzero(s.start_time_millis).or(ms_of(&s.start_time));
        b.command_name = nonempty(&s.command);
        b.tool_version = nonempty(&s.build_tool_version);
        b.workspace_dir = nonempty(&s.workspace_directory);
        for child in children {
            if let Some(c) = child.id.as_ref().and_then(ctx_of) {
                b.announced.insert(c);
            }
        }
        if self.source.tool_version != self.build.tool_version {
            // Messages already sent keep the source they were sent with.
            Arc::make_mut(&mut self.source).tool_version = self.build.tool_version.clone();
        }
        self.stats.builds += 1;
        // Messages that came before `started` got no timestamp: give them the start.
        let started = self.build.started_ms.and_then(time::shared);
        for d in &mut self.build.pending {
            let c = d.payload.common_mut();
            if c.timestamp.is_none() {
                c.timestamp = started.clone();
            }
        }
    }

    fn on_structured(&mut self, label: &str, sections: Vec<bep::CommandLineSection>) {
        use bep::command_line_section::SectionType;
        match label {
            // The command as typed: every chunk and option, in order.
            "original" => {
                let mut args = Vec::new();
                for s in sections {
                    match s.section_type {
                        Some(SectionType::ChunkList(c)) => args.extend(c.chunk),
                        Some(SectionType::OptionList(o)) => {
                            args.extend(o.option.into_iter().map(|opt| opt.combined_form))
                        }
                        None => {}
                    }
                }
                self.build.original_cmd = Some(args);
            }
            // Effective option values, for `option:NAME` rules.
            "canonical" => {
                let mut options = Vec::new();
                for s in sections {
                    if let Some(SectionType::OptionList(o)) = s.section_type {
                        options.extend(
                            o.option
                                .into_iter()
                                .map(|opt| (opt.option_name, opt.option_value)),
                        );
                    }
                }
                self.build.canonical_options = options;
            }
            _ => {}
        }
    }
}

impl Translator for BazelTranslator {
    type Event = Box<BuildEvent>;

    fn event(&mut self, mut ev: Box<BuildEvent>, out: &mut Emit<'_>) {
        self.stats.events += 1;
        let Some(id) = ev.id.take().and_then(|i| i.id) else {
            self.stats.unknown += 1;
            return;
        };
        if let Some(c) = ctx_of(&id) {
            self.build.seen.insert(c);
        }
        // The event is ours: move its parts into the build state rather than copy them
        // (and leave the event where it is: it is large).
        match (&id, &mut ev.payload) {
            (Id::Started(_), Some(P::Started(s))) => self.on_started(&ev.children, s, out),
            (Id::BuildMetadata(_), Some(P::BuildMetadata(m))) => {
                self.build.metadata = mem::take(&mut m.metadata);
            }
            (Id::WorkspaceStatus(_), Some(P::WorkspaceStatus(s))) => {
                self.build.status = s.item.drain(..).map(|i| (i.key, i.value)).collect();
            }
            (Id::StructuredCommandLine(sid), Some(P::StructuredCommandLine(cl))) => {
                self.on_structured(&sid.command_line_label, mem::take(&mut cl.sections));
            }
            (Id::UnstructuredCommandLine(_), Some(P::UnstructuredCommandLine(u))) => {
                self.build.unstructured_cmd = Some(mem::take(&mut u.args));
            }
            (Id::Pattern(p), payload) => {
                for pat in &p.pattern {
                    if !self.build.patterns.contains(pat) {
                        self.build.patterns.push(pat.clone());
                    }
                }
                if let Some(P::Aborted(a)) = payload {
                    self.build.pattern_failure = nonempty(&a.description);
                }
            }
            (Id::Workspace(_), Some(P::WorkspaceInfo(_))) => {}
            (Id::Configuration(c), Some(P::Configuration(conf))) => {
                self.build.configs.insert(c.id.clone(), mem::take(conf));
            }
            (Id::TargetConfigured(t), Some(P::Configured(c))) if !c.target_kind.is_empty() => {
                self.build
                    .target_kinds
                    .insert(t.label.clone(), mem::take(&mut c.target_kind));
            }
            (Id::NamedSet(n), Some(P::NamedSetOfFiles(s))) => {
                let set = NamedSet {
                    files: mem::take(&mut s.files),
                    sets: s.file_sets.drain(..).map(|x| x.id).collect(),
                };
                self.build.named_sets.insert(n.id.clone(), set);
            }
            (Id::TargetCompleted(t), payload) => self.on_target_completed(t, payload.as_ref(), out),
            (Id::ActionCompleted(a), Some(P::Action(x))) => self.on_action(a, x, out),
            (Id::TestResult(t), payload) => self.on_test_result(t, payload.as_ref(), out),
            (Id::TestSummary(t), payload) => self.on_test_summary(t, payload.as_ref(), out),
            (Id::Progress(p), Some(P::Progress(x))) => self.on_progress(p.opaque_count, x, out),
            (Id::BuildFinished(_), Some(P::Finished(f))) => {
                self.build.finished = Some(mem::take(f));
                self.freeze(true, out);
            }
            (Id::BuildFinished(_), Some(P::Aborted(a))) => {
                self.build.finished_aborted = Some(mem::take(&mut a.description));
            }
            (Id::BuildMetrics(_), Some(P::BuildMetrics(m))) => self.on_metrics(m),
            _ => {}
        }
        if ev.last_message {
            self.end_build(out);
        }
    }

    fn finish(&mut self, out: &mut Emit<'_>) {
        self.end_build(out);
    }

    fn complete(&self) -> bool {
        self.build.done
    }
}

impl BazelTranslator {
    fn on_metrics(&mut self, m: &bep::BuildMetrics) {
        let mut put = |k: &str, v: i64| {
            if v != 0 {
                self.build.metrics.insert(k.to_string(), v);
            }
        };
        if let Some(a) = &m.action_summary {
            put("actions_created", a.actions_created);
            put("actions_executed", a.actions_executed);
            put("remote_cache_hits", a.remote_cache_hits);
        }
        if let Some(t) = &m.target_metrics {
            put("targets_loaded", t.targets_loaded);
            put("targets_configured", t.targets_configured);
        }
        if let Some(p) = &m.package_metrics {
            put("packages_loaded", p.packages_loaded);
        }
        if let Some(t) = &m.timing_metrics {
            put("cpu_time_ms", t.cpu_time_in_ms);
            put("wall_time_ms", t.wall_time_in_ms);
            put("analysis_phase_time_ms", t.analysis_phase_time_in_ms);
        }
        if let Some(mm) = &m.memory_metrics {
            put("used_heap_size_post_build", mm.used_heap_size_post_build);
            put("peak_post_gc_heap_size", mm.peak_post_gc_heap_size);
        }
    }
}

/// Hooks for live sources (the BES backend), which know more than the stream says and
/// must know when everything read so far has been handed out.
impl BazelTranslator {
    /// Adds a fact to the metadata of every build message not yet emitted.
    pub fn set_metadata(&mut self, key: &str, value: &str) {
        self.extra_metadata
            .insert(key.to_string(), value.to_string());
    }

    /// Whether messages derived from events already read are held back (the build's
    /// context is not complete yet). A live source must not acknowledge events while
    /// this is true: their messages exist only in memory.
    pub fn holding(&self) -> bool {
        !self.build.pending.is_empty()
    }

    /// Ends a build whose stream stopped without Bazel finishing it (a BES stream gone
    /// silent): emits what is held and a `finished` message with result `aborted`,
    /// `reason` as the failure and `buildbus.incomplete: true` in the metadata.
    /// Does nothing when the build already ended or never started.
    pub fn abandon(&mut self, reason: &str, out: &mut Emit<'_>) {
        if self.build.done || self.build.id.is_none() {
            return;
        }
        if self.build.finished.is_none() && self.build.finished_aborted.is_none() {
            self.build.finished_aborted = Some(reason.to_string());
            self.set_metadata("buildbus.incomplete", "true");
        }
        self.end_build(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bep::build_event_id::{BuildStartedId, NamedSetOfFilesId, TargetCompletedId};

    fn event(id: Id, payload: P) -> Box<BuildEvent> {
        Box::new(BuildEvent {
            id: Some(bep::BuildEventId { id: Some(id) }),
            payload: Some(payload),
            ..Default::default()
        })
    }

    fn set(id: &str, files: &[&str], sets: &[&str]) -> Box<BuildEvent> {
        event(
            Id::NamedSet(NamedSetOfFilesId { id: id.into() }),
            P::NamedSetOfFiles(bep::NamedSetOfFiles {
                files: files
                    .iter()
                    .map(|name| bep::File {
                        path_prefix: vec!["bazel-out".into(), "bin".into()],
                        name: name.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                file_sets: sets
                    .iter()
                    .map(|s| NamedSetOfFilesId { id: s.to_string() })
                    .collect(),
            }),
        )
    }

    fn completed(label: &str, groups: &[(&str, &[&str])]) -> Box<BuildEvent> {
        event(
            Id::TargetCompleted(TargetCompletedId {
                label: label.into(),
                ..Default::default()
            }),
            P::Completed(bep::TargetComplete {
                success: true,
                output_group: groups
                    .iter()
                    .map(|(name, sets)| bep::OutputGroup {
                        name: name.to_string(),
                        file_sets: sets
                            .iter()
                            .map(|s| NamedSetOfFilesId { id: s.to_string() })
                            .collect(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
        )
    }

    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    /// A target's outputs: by group (sorted by name), through nested and even cyclic
    /// named sets, each path once (under its first group), whether a target has few
    /// outputs or many.
    #[test]
    fn each_output_path_is_one_artifact_of_its_first_group() {
        let files = |range: std::ops::RangeInclusive<u32>| -> Vec<String> {
            range.map(|i| format!("f{i}")).collect()
        };
        let (a, b) = (files(1..=6), files(5..=12));
        let mut t = BazelTranslator::new(Arc::new(Context::builtin()), SourceMeta::default());
        let mut out: Vec<Envelope> = Vec::new();
        let events = [
            event(
                Id::Started(BuildStartedId {}),
                P::Started(bep::BuildStarted {
                    uuid: "0b4d6c1e-5c38-4c1f-9d7e-000000000001".into(),
                    ..Default::default()
                }),
            ),
            set("a", &refs(&a), &["b"]),
            set("b", &refs(&b), &["a"]),
            set("c", &["x", "y", "x"], &[]),
            // "zz" sorts after "default": its files were all seen under "default".
            completed("//many:t", &[("zz", &["b"]), ("default", &["a"])]),
            completed("//few:t", &[("debug", &["c"])]),
        ];
        for ev in events {
            t.event(ev, &mut |e| out.push(e));
        }
        t.finish(&mut |e| out.push(e));
        let artifacts = |label: &str| -> Vec<(String, String)> {
            out.iter()
                .filter_map(|e| match &e.payload {
                    Payload::Artifact(a) if a.target.as_deref() == Some(label) => {
                        Some((a.path.clone(), a.kind.clone()))
                    }
                    _ => None,
                })
                .collect()
        };
        let many = artifacts("//many:t");
        let expected: Vec<(String, String)> = files(1..=12)
            .into_iter()
            .map(|f| (format!("bazel-out/bin/{f}"), "output".to_string()))
            .collect();
        assert_eq!(many, expected);
        assert_eq!(
            artifacts("//few:t"),
            [
                ("bazel-out/bin/x".to_string(), "output:debug".to_string()),
                ("bazel-out/bin/y".to_string(), "output:debug".to_string()),
            ]
        );
        // Every artifact message has its own id.
        let ids: HashSet<&str> = out.iter().map(|e| e.meta.message_id.as_str()).collect();
        assert_eq!(ids.len(), out.len());
    }

    /// What matters (the sparse decoder, `decode/bep/sparse.rs`): every binary fixture translates to the same messages whether its
    /// events were decoded sparsely or in full.
    #[test]
    fn sparse_and_full_decoding_translate_alike() {
        use crate::model::{Envelope, SourceMeta};
        use crate::systems::{Context, Translator};
        use std::sync::Arc;

        let ctx = Arc::new(Context::builtin());
        let needs = crate::systems::bazel::BazelTranslator::decode_needs(&ctx);
        let translate = |frames: &[&[u8]], sparse: bool| {
            let mut t = crate::systems::bazel::BazelTranslator::new(
                Arc::clone(&ctx),
                SourceMeta::default(),
            );
            let mut out: Vec<Envelope> = Vec::new();
            for f in frames {
                let ev = if sparse {
                    crate::decode::bep::codec::decode_binary(f, &needs).unwrap()
                } else {
                    Box::new(<BuildEvent as prost::Message>::decode(*f).unwrap())
                };
                t.event(ev, &mut |e| out.push(e));
            }
            t.finish(&mut |e| out.push(e));
            for e in &mut out {
                e.meta.sent = std::sync::Arc::from("");
            }
            out
        };
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bazel");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("bin") {
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            let mut frames = Vec::new();
            let mut buf = data.as_slice();
            while !buf.is_empty() {
                let (len, n) = crate::decode::framing::varint(buf).unwrap();
                frames.push(&buf[n..n + len as usize]);
                buf = &buf[n + len as usize..];
            }
            let sparse = translate(&frames, true);
            let full = translate(&frames, false);
            assert!(!full.is_empty(), "{}", path.display());
            assert_eq!(sparse, full, "{}", path.display());
            // The command line (redacted) and option-derived fields are there.
            let started = full
                .iter()
                .find_map(|e| match &e.payload {
                    crate::model::Payload::Build(b) => Some(b),
                    _ => None,
                })
                .unwrap();
            assert!(
                started.command.as_deref().is_some_and(|c| c.contains("--")),
                "{}: {:?}",
                path.display(),
                started.command
            );
            checked += 1;
        }
        assert!(checked >= 5, "binary fixtures: {checked}");
    }
}
