//! The BitBake translator: a live model of one BitBake command (a `bitbake TARGET`
//! run), fed events in order, giving Toaster-grade normalized messages.
//!
//! What becomes what (as Toaster's `buildinfohelper` sees it):
//! - `BuildInit`/`BuildStarted` .. `BuildCompleted` + `CommandCompleted`/`CommandFailed`:
//!   one `build` (`started`, then `finished` when the command ends). Result: `failure` on
//!   any failed task, error log, `NoProvider` or `CommandFailed`; `interrupted` when
//!   BitBake was stopped; else `success`. Targets from `BuildStarted._pkgs`; parse
//!   statistics (`ParseCompleted`, `CacheLoadCompleted`) in `counts.metrics`.
//! - one `task` per (recipe, task): `noexec` → `empty`; skipped `covered` → `covered`,
//!   `existing` → `prebuilt`; a successful `_setscene` → `cached` with `sstate_result:
//!   restored`; a failed setscene → `sstate_result: failed`; `TaskSucceeded`/`TaskFailed`
//!   → `succeeded`/`failed` with exit code and log file; a task of the dependency tree
//!   that never ran → `not_executed`. Start, end and elapsed time from the events.
//! - `log` for LogRecords at warning level and above (BitBake's own levels such as
//!   `Level 21` are mapped by number), `%`-formatted like Python, with the task and
//!   recipe the record came from (by the task's pid); `DiskFull`, `NoProvider` and
//!   `CommandFailed` become error logs and `MultipleProviders` a warning, with details.
//!
//! **Identity.** BitBake gives builds no id. The build id is a hash of the command's
//! events that the translator reads (their pickles; parse-progress events are left out,
//! their order varies) up to the first event after `BuildInit` that carries a time,
//! so it is the same for the event log and the live stream of one run, and differs
//! between runs. **Context**: the Pulse fields come from the build's variables (the
//! event log's `allvariables` line, or variables fetched live) and the `LayerInfo`
//! metadata event; messages are held until both the id and the variables are known.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::codec::{relevant, BbEvent};
use super::pyformat;
use crate::decode::pickle::{Object, Value};
use crate::model::{
    time, BuildPayload, BuildResult, BuildState, Builder, Common, Counts, Envelope, LogLevel,
    LogPayload, Payload, SourceMeta, SstateResult, TaskOutcome, TaskPayload,
};
use crate::systems::fields::{PulseFields, RuleSource};
use crate::systems::{Context, Emit, Translator};

const SYSTEM: &str = "bitbake";

/// Variables copied into a build's `metadata` (and so fetched by a live session).
pub const METADATA_VARS: [&str; 8] = [
    "MACHINE",
    "DISTRO",
    "DISTRO_VERSION",
    "BB_VERSION",
    "TUNE_PKGARCH",
    "SDKMACHINE",
    "DEBUG_BUILD",
    "BUILDNAME",
];

/// Variables the artifact scanner (`aam`) needs to find the build's deploy directory;
/// also copied into a build's `metadata`, so the `finished` message carries them.
pub const DEPLOY_VARS: [&str; 4] = ["DEPLOY_DIR", "DEPLOY_DIR_IMAGE", "TMPDIR", "TOPDIR"];

struct Draft {
    payload: Payload,
    entity: Vec<String>,
}

#[derive(Debug, Clone, Default)]
struct Layer {
    name: String,
    branch: Option<String>,
    commit: Option<String>,
    priority: i64,
}

#[derive(Debug, Clone, Default)]
struct TaskState {
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
    logfile: Option<String>,
    noexec: bool,
    setscene_failed: bool,
    failed: bool,
    emitted: bool,
}

/// Everything known about the current command.
#[derive(Default)]
struct Command {
    /// Hash of the events so far, until the build id is fixed.
    hasher: Option<Sha256>,
    build_id: Option<String>,
    /// `BuildInit` or `BuildStarted` seen: events from now on belong to a build.
    in_build: bool,
    build_started: bool,
    id_ms: Option<i64>,
    last_ms: Option<i64>,
    targets: Vec<String>,
    vars: BTreeMap<String, String>,
    vars_known: bool,
    layers: Vec<Layer>,
    fields: Option<PulseFields>,
    pending: Vec<Draft>,
    tasks: HashMap<(String, String), TaskState>,
    task_order: Vec<(String, String)>,
    file_pn: HashMap<String, String>,
    pid_task: HashMap<i64, (String, String)>,
    dep_tasks: BTreeSet<(String, String)>,
    counts: Counts,
    metrics: BTreeMap<String, i64>,
    failures: i64,
    interrupted: bool,
    no_provider: bool,
    command_failed: Option<String>,
    first_error: Option<String>,
    completed: bool,
    ended: bool,
    exit_code: Option<i64>,
    logs: u64,
}

impl RuleSource for Command {
    fn lookup(&self, rule: &str) -> Option<String> {
        let (ns, key) = rule.split_once(':').unwrap_or((rule, ""));
        match ns {
            "var" => self.vars.get(key).cloned(),
            "flag" => {
                let mut parts = key.splitn(3, ':');
                let (var, yes, no) = (parts.next()?, parts.next()?, parts.next()?);
                Some(
                    if self.vars.get(var).map(String::as_str) == Some("1") {
                        yes
                    } else {
                        no
                    }
                    .to_string(),
                )
            }
            "layer" => {
                let (name, what) = key.rsplit_once('.')?;
                let layer = if name == "@core" {
                    self.layers
                        .iter()
                        .min_by_key(|l| (l.priority, l.name.clone()))
                } else {
                    self.layers.iter().find(|l| l.name == name)
                }?;
                match what {
                    "branch" => layer.branch.clone(),
                    "commit" | "revision" => layer.commit.clone(),
                    "name" => Some(layer.name.clone()),
                    _ => None,
                }
            }
            "literal" => Some(key.to_string()),
            _ => None,
        }
    }
}

/// Statistics of one translation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    /// Events of classes this translator does not use (counted, not an error).
    pub ignored: u64,
    pub builds: u64,
}

/// Translates the events of one BitBake event stream (one or more commands).
pub struct BitbakeTranslator {
    ctx: Arc<Context>,
    /// Shared by every message of the stream.
    source: Arc<SourceMeta>,
    cmd: Command,
    /// Variables given from outside (a live session fetches them), applied to every
    /// command.
    preset_vars: Option<BTreeMap<String, String>>,
    stats: Stats,
}

fn attr<'a>(o: &'a Object, name: &str) -> Option<&'a Value> {
    o.attr(name)
}

fn s(o: &Object, name: &str) -> Option<String> {
    attr(o, name).and_then(Value::as_str).map(str::to_string)
}

fn i(o: &Object, name: &str) -> Option<i64> {
    attr(o, name).and_then(|v| v.as_i64().or_else(|| v.as_bool().map(i64::from)))
}

fn secs_ms(v: Option<&Value>) -> Option<i64> {
    let f = v?.as_f64()?;
    f.is_finite().then(|| (f * 1000.0).round() as i64)
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_seq)
        .map(|xs| {
            xs.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A recipe name from its file name (`hello-app_1.0.bb` → `hello-app`).
fn pn_of_file(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.strip_suffix(".bb").unwrap_or(base);
    // A multiconfig or virtual prefix (`virtual:native:/...`) is in the directory part.
    base.split('_').next().unwrap_or(base).to_string()
}

fn level_of(levelno: i64) -> Option<LogLevel> {
    match levelno {
        n if n >= 50 => Some(LogLevel::Critical),
        n if n >= 40 => Some(LogLevel::Error),
        n if n >= 30 => Some(LogLevel::Warning),
        _ => None,
    }
}

impl BitbakeTranslator {
    pub fn new(ctx: Arc<Context>, source: SourceMeta) -> BitbakeTranslator {
        BitbakeTranslator {
            ctx,
            source: Arc::new(source),
            cmd: Command::default(),
            preset_vars: None,
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The variables a live session should fetch before the build: those the Pulse
    /// rules name, the metadata ones, and the deploy directories.
    pub fn wanted_variables(&self) -> Vec<String> {
        let rules = self.ctx.rules(SYSTEM);
        let mut out: BTreeSet<String> = METADATA_VARS
            .iter()
            .chain(DEPLOY_VARS.iter())
            .map(|s| s.to_string())
            .collect();
        for r in rules
            .tree
            .iter()
            .chain(&rules.platform)
            .chain(&rules.buildtype)
            .chain(&rules.product)
            .chain(&rules.revision)
            .chain(&rules.branch)
            .chain(&rules.tags)
        {
            if let Some(v) = r.strip_prefix("var:") {
                out.insert(v.to_string());
            } else if let Some(f) = r.strip_prefix("flag:") {
                out.insert(f.split(':').next().unwrap_or("").to_string());
            }
        }
        out.into_iter().filter(|v| !v.is_empty()).collect()
    }

    /// Sets the variables of the builds to come (a live session's `getVariable`s).
    pub fn set_variables(&mut self, vars: BTreeMap<String, String>) {
        self.cmd.vars.extend(vars.clone());
        self.cmd.vars_known = true;
        self.preset_vars = Some(vars);
    }

    /// A fresh command, keeping the live variables.
    fn reset(&mut self) {
        self.cmd = Command::default();
        if let Some(v) = &self.preset_vars {
            self.cmd.vars = v.clone();
            self.cmd.vars_known = true;
        }
    }

    fn now_ms(&self, own: Option<i64>) -> Option<i64> {
        own.or(self.cmd.last_ms)
    }

    fn common_at(&self, ms: Option<i64>) -> Common {
        Common {
            timestamp: self.now_ms(ms).and_then(time::shared),
            ..Common::default()
        }
    }

    fn draft(&mut self, payload: Payload, entity: Vec<String>, out: &mut Emit<'_>) {
        let c = &mut self.cmd;
        match &payload {
            Payload::Task(t) => *c.counts.tasks.entry(t.outcome.as_str().into()).or_default() += 1,
            Payload::Log(l) => match l.level {
                LogLevel::Warning => c.counts.warnings += 1,
                _ => c.counts.errors += 1,
            },
            _ => {}
        }
        c.pending.push(Draft { payload, entity });
        self.release(out);
    }

    fn release(&mut self, out: &mut Emit<'_>) {
        let (Some(fields), Some(_)) = (self.cmd.fields.as_ref(), self.cmd.build_id.as_ref()) else {
            return;
        };
        for mut d in self.cmd.pending.drain(..) {
            let ts = d.payload.common_mut().timestamp.take();
            *d.payload.common_mut() = fields.common(ts);
            let parts: Vec<&str> = d.entity.iter().map(String::as_str).collect();
            out(Envelope::with_shared_source(
                d.payload,
                &parts,
                Arc::clone(&self.source),
                &self.ctx.exchange_prefix,
            ));
        }
    }

    /// Fixes the build id from the hash of the events so far.
    fn fix_id(&mut self) {
        if self.cmd.build_id.is_some() {
            return;
        }
        let h = self.cmd.hasher.take().unwrap_or_default();
        self.cmd.build_id = Some(format!("bitbake-{}", hex::encode(&h.finalize()[..16])));
    }

    /// Resolves the Pulse fields once the id and the variables are known (or `force`),
    /// and releases the build's `started` message and everything held.
    fn freeze(&mut self, force: bool, out: &mut Emit<'_>) {
        if self.cmd.fields.is_some() || !self.cmd.in_build {
            return;
        }
        if force {
            self.fix_id();
        }
        let ready = self.cmd.build_id.is_some() && (self.cmd.vars_known && self.cmd.build_started);
        if !ready && !force {
            return;
        }
        let id = self.cmd.build_id.as_deref().unwrap_or_default();
        self.cmd.fields = Some(self.ctx.pulse_fields(SYSTEM, &self.cmd, id));
        self.stats.builds += 1;
        let version = self.cmd.vars.get("BB_VERSION");
        if self.source.tool_version.as_ref() != version {
            // Messages already sent keep the source they were sent with.
            Arc::make_mut(&mut self.source).tool_version = version.cloned();
        }
        let started = Payload::Build(self.build_payload(BuildState::Started));
        self.cmd.pending.insert(
            0,
            Draft {
                payload: started,
                entity: vec![],
            },
        );
        self.release(out);
    }

    fn build_payload(&self, state: BuildState) -> BuildPayload {
        let c = &self.cmd;
        let finished = state == BuildState::Finished;
        let result = finished.then(|| {
            if c.interrupted {
                BuildResult::Interrupted
            } else if c.failures > 0
                || c.counts.errors > 0
                || c.no_provider
                || c.command_failed.is_some()
            {
                BuildResult::Failure
            } else if c.completed || c.ended {
                BuildResult::Success
            } else {
                BuildResult::Aborted
            }
        });
        let r = &self.ctx.redactor;
        let mut metadata: BTreeMap<String, String> = METADATA_VARS
            .iter()
            .chain(DEPLOY_VARS.iter())
            .filter_map(|k| {
                c.vars
                    .get(*k)
                    .map(|v| (k.to_string(), r.keyed(k, v).into_owned()))
            })
            .collect();
        for l in &c.layers {
            let v = format!(
                "{}@{}",
                l.branch.as_deref().unwrap_or("?"),
                l.commit.as_deref().unwrap_or("?")
            );
            metadata.insert(format!("layer.{}", l.name), v);
        }
        let end = if finished { c.last_ms } else { None };
        let mut counts = if finished {
            c.counts.clone()
        } else {
            Counts::default()
        };
        counts.metrics = c.metrics.clone();
        let exit_code = finished.then(|| {
            c.exit_code.unwrap_or(match result {
                Some(BuildResult::Success) => 0,
                _ => 1,
            })
        });
        BuildPayload {
            common: self.common_at(if finished { c.last_ms } else { c.id_ms }),
            state,
            result,
            targets: c.targets.clone(),
            command: c.vars.get("BB_CMDLINE").map(|v| r.value(v).into_owned()),
            started_at: c.id_ms.and_then(time::from_millis),
            finished_at: end.and_then(time::from_millis),
            duration_ms: end.zip(c.id_ms).map(|(e, s)| e - s),
            exit_code,
            builder: Builder::default(),
            counts,
            tool_version: c.vars.get("BB_VERSION").cloned(),
            failure: if finished && result != Some(BuildResult::Success) {
                c.command_failed
                    .clone()
                    .filter(|m| !m.is_empty())
                    .or(c.first_error.clone())
            } else {
                None
            },
            metadata,
        }
    }

    fn task_key(&mut self, o: &Object) -> Option<(String, String)> {
        let taskname = s(o, "taskname")?;
        let task = taskname
            .strip_suffix("_setscene")
            .unwrap_or(&taskname)
            .to_string();
        let pn = s(o, "pn").or_else(|| {
            let file = s(o, "taskfile").or_else(|| s(o, "_fn"))?;
            Some(
                self.cmd
                    .file_pn
                    .get(&file)
                    .cloned()
                    .unwrap_or_else(|| pn_of_file(&file)),
            )
        })?;
        if let (Some(file), true) = (
            s(o, "taskfile").or_else(|| s(o, "_fn")),
            o.attr("pn").is_some(),
        ) {
            self.cmd.file_pn.entry(file).or_insert_with(|| pn.clone());
        }
        if !self.cmd.tasks.contains_key(&(pn.clone(), task.clone())) {
            self.cmd.task_order.push((pn.clone(), task.clone()));
        }
        Some((pn, task))
    }

    fn emit_task(
        &mut self,
        key: &(String, String),
        outcome: TaskOutcome,
        sstate: SstateResult,
        exit_code: Option<i64>,
        at_ms: Option<i64>,
        out: &mut Emit<'_>,
    ) {
        let st = self.cmd.tasks.entry(key.clone()).or_default();
        if st.emitted {
            return;
        }
        st.emitted = true;
        let st = st.clone();
        let p = TaskPayload {
            common: self.common_at(st.finished_ms.or(at_ms)),
            target: key.0.clone(),
            task: key.1.clone(),
            outcome,
            sstate_result: sstate,
            started_at: st.started_ms.and_then(time::from_millis),
            finished_at: st.finished_ms.and_then(time::from_millis),
            elapsed_ms: st.finished_ms.zip(st.started_ms).map(|(e, s)| e - s),
            exit_code,
            logfile: st.logfile.clone(),
            target_kind: None,
            failure: None,
        };
        self.draft(
            Payload::Task(p),
            vec!["task".into(), key.0.clone(), key.1.clone()],
            out,
        );
    }

    fn log(
        &mut self,
        level: LogLevel,
        message: String,
        target: Option<String>,
        task: Option<String>,
        ms: Option<i64>,
        out: &mut Emit<'_>,
    ) {
        let message = self.ctx.redactor.value(&message).into_owned();
        if level != LogLevel::Warning && self.cmd.first_error.is_none() {
            self.cmd.first_error = message.lines().next().map(str::to_string);
        }
        self.cmd.logs += 1;
        let seq = self.cmd.logs.to_string();
        let p = LogPayload {
            common: self.common_at(ms),
            level,
            message,
            target,
            task,
        };
        self.draft(Payload::Log(p), vec!["log".into(), seq], out);
    }

    /// The command ended: not-executed tasks, the finished build, then a fresh command.
    fn end_command(&mut self, out: &mut Emit<'_>) {
        if self.cmd.in_build {
            self.freeze(true, out);
            let missing: Vec<(String, String)> = self
                .cmd
                .dep_tasks
                .iter()
                .filter(|k| !self.cmd.tasks.get(*k).is_some_and(|t| t.emitted))
                .cloned()
                .collect();
            for k in missing {
                self.emit_task(
                    &k,
                    TaskOutcome::NotExecuted,
                    SstateResult::Na,
                    None,
                    None,
                    out,
                );
            }
            let p = Payload::Build(self.build_payload(BuildState::Finished));
            self.draft(p, vec![], out);
        }
        self.reset();
    }

    fn on_layers(&mut self, data: &Value) {
        let Some(entries) = data.as_dict() else {
            return;
        };
        let mut layers = Vec::new();
        for (_, info) in entries {
            let version = info.get("version");
            layers.push(Layer {
                name: info
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                branch: version
                    .and_then(|v| v.get("branch"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                commit: version
                    .and_then(|v| v.get("commit"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                priority: version
                    .and_then(|v| v.get("priority"))
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
            });
        }
        self.cmd.layers = layers;
    }

    fn on_deptree(&mut self, graph: &Value) {
        if let Some(pns) = graph.get("pn").and_then(Value::as_dict) {
            for (pn, info) in pns {
                if let (Some(pn), Some(file)) =
                    (pn.as_str(), info.get("filename").and_then(Value::as_str))
                {
                    self.cmd.file_pn.insert(file.to_string(), pn.to_string());
                }
            }
        }
        if let Some(t) = graph.get("tdepends").and_then(Value::as_dict) {
            for (k, _) in t {
                if let Some((pn, task)) = k.as_str().and_then(|k| k.rsplit_once('.')) {
                    self.cmd
                        .dep_tasks
                        .insert((pn.to_string(), task.to_string()));
                }
            }
        }
    }

    fn on_log_record(&mut self, o: &Object, out: &mut Emit<'_>) {
        let Some(level) = i(o, "levelno").and_then(level_of) else {
            return;
        };
        let msg = attr(o, "msg").map(pyformat::py_str).unwrap_or_default();
        let mut message = match attr(o, "args") {
            Some(args) if !matches!(args, Value::None) => {
                pyformat::format(&msg, args).unwrap_or(msg)
            }
            _ => msg,
        };
        let exc = strings(attr(o, "bb_exc_formatted"));
        if !exc.is_empty() {
            message.push('\n');
            message.push_str(exc.concat().trim_end());
        }
        let (target, task) = i(o, "taskpid")
            .filter(|&p| p != 0)
            .and_then(|p| self.cmd.pid_task.get(&p).cloned())
            .map(|(pn, t)| (Some(pn), Some(t)))
            .unwrap_or((None, None));
        let ms = secs_ms(attr(o, "created"));
        self.log(level, message, target, task, ms, out);
    }

    fn on_event(&mut self, class: &str, raw: &[u8], o: &Object, out: &mut Emit<'_>) {
        let short = class.rsplit('.').next().unwrap_or(class);
        let own_ms = secs_ms(attr(o, "time")).or_else(|| secs_ms(attr(o, "created")));
        if matches!(short, "BuildInit" | "BuildStarted")
            && self.cmd.build_started
            && short == "BuildStarted"
        {
            // A second build in one command: close the first.
            self.end_command(out);
        }
        // The build id: hash of the command's events up to the first timed event of the build.
        if self.cmd.build_id.is_none() {
            let h = self.cmd.hasher.get_or_insert_with(Sha256::new);
            h.update((raw.len() as u64).to_le_bytes());
            h.update(raw);
        }
        if matches!(short, "BuildInit" | "BuildStarted") {
            self.cmd.in_build = true;
        }
        if let Some(ms) = own_ms {
            self.cmd.last_ms = Some(self.cmd.last_ms.map_or(ms, |l| l.max(ms)));
            if self.cmd.in_build && self.cmd.build_id.is_none() {
                self.cmd.id_ms = Some(ms);
                self.fix_id();
            }
        }
        match short {
            "BuildInit" | "BuildStarted" => {
                let pkgs = strings(attr(o, "_pkgs"));
                if short == "BuildStarted" || self.cmd.targets.is_empty() {
                    self.cmd.targets = pkgs;
                }
                if short == "BuildStarted" {
                    self.cmd.build_started = true;
                }
            }
            "BuildCompleted" => {
                self.cmd.completed = true;
                self.cmd.failures = i(o, "_failures").unwrap_or(0);
                self.cmd.interrupted = i(o, "_interrupted").unwrap_or(0) != 0;
                if let Some(t) = i(o, "total") {
                    self.cmd.metrics.insert("tasks_total".into(), t);
                }
            }
            "CommandCompleted" => {
                self.cmd.ended = true;
                self.end_command(out);
                return;
            }
            "CommandFailed" => {
                let err = s(o, "error").unwrap_or_default();
                let code = i(o, "exitcode").unwrap_or(1);
                self.cmd.exit_code = Some(code);
                let text = if err.is_empty() {
                    format!("Command execution failed (exit code {code})")
                } else {
                    format!("Command execution failed: {err}")
                };
                self.cmd.command_failed = Some(text.clone());
                self.log(LogLevel::Error, text, None, None, own_ms, out);
                self.cmd.ended = true;
                self.end_command(out);
                return;
            }
            "CommandExit" => {
                self.cmd.exit_code = i(o, "exitcode");
                if self.cmd.exit_code.unwrap_or(0) != 0 && !self.cmd.completed {
                    self.cmd.interrupted = true;
                }
                self.cmd.ended = true;
                self.end_command(out);
                return;
            }
            "MetadataEvent" if s(o, "type").as_deref() == Some("LayerInfo") => {
                if let Some(d) = attr(o, "_localdata") {
                    self.on_layers(d);
                }
            }
            "DepTreeGenerated" => {
                if let Some(g) = attr(o, "_depgraph") {
                    self.on_deptree(g);
                }
            }
            "ParseCompleted" => {
                for (k, name) in [
                    ("total", "recipes_total"),
                    ("parsed", "recipes_parsed"),
                    ("cached", "recipes_cached"),
                    ("skipped", "recipes_skipped"),
                    ("masked", "recipes_masked"),
                    ("errors", "parse_errors"),
                ] {
                    if let Some(v) = i(o, k) {
                        self.cmd.metrics.insert(name.into(), v);
                    }
                }
            }
            "CacheLoadCompleted" => {
                if let Some(v) = i(o, "num_entries") {
                    self.cmd.metrics.insert("cache_entries".into(), v);
                }
            }
            "NoProvider" => {
                self.cmd.no_provider = true;
                let item = s(o, "_item").unwrap_or_default();
                let runtime = i(o, "_runtime").unwrap_or(0) != 0;
                let mut msg = format!(
                    "Nothing {}PROVIDES '{item}'",
                    if runtime { "R" } else { "" }
                );
                let dependees = strings(attr(o, "_dependees"));
                if !dependees.is_empty() {
                    msg.push_str(&format!(
                        " (but {} {}DEPENDS on or otherwise requires it)",
                        dependees.join(", "),
                        if runtime { "R" } else { "" }
                    ));
                }
                for r in strings(attr(o, "_reasons")) {
                    msg.push_str(&format!("\n{r}"));
                }
                let close = strings(attr(o, "_close_matches"));
                if !close.is_empty() {
                    msg.push_str(&format!("\nClose matches:\n  {}", close.join("\n  ")));
                }
                self.log(LogLevel::Error, msg, Some(item), None, own_ms, out);
            }
            "MultipleProviders" => {
                let item = s(o, "_item").unwrap_or_default();
                let c = strings(attr(o, "_candidates"));
                let msg = format!(
                    "Multiple providers are available for {}{item} ({}); consider defining a PREFERRED_{}PROVIDER entry",
                    if i(o, "_is_runtime").unwrap_or(0) != 0 { "runtime " } else { "" },
                    c.join(", "),
                    if i(o, "_is_runtime").unwrap_or(0) != 0 { "R" } else { "" },
                );
                self.log(LogLevel::Warning, msg, Some(item), None, own_ms, out);
            }
            "DiskFull" => {
                let msg = format!(
                    "Disk full: {} ({} free, {} inodes free) at {}",
                    s(o, "_dev").unwrap_or_default(),
                    attr(o, "_free").map(pyformat::py_str).unwrap_or_default(),
                    attr(o, "_freeinodes")
                        .map(pyformat::py_str)
                        .unwrap_or_default(),
                    s(o, "_mountpoint")
                        .or_else(|| s(o, "_path"))
                        .unwrap_or_default()
                );
                self.log(LogLevel::Error, msg, None, None, own_ms, out);
            }
            "LogRecord" => self.on_log_record(o, out),
            "TaskStarted" => {
                if let Some(key) = self.task_key(o) {
                    if let Some(pid) = i(o, "pid") {
                        self.cmd.pid_task.insert(pid, key.clone());
                    }
                    // A setscene attempt's times stand for a restored task; a failed
                    // attempt's are dropped when the real task runs (below).
                    let st = self.cmd.tasks.entry(key).or_default();
                    st.started_ms = own_ms;
                    st.logfile = s(o, "logfile");
                }
            }
            "TaskSucceeded" | "TaskFailed" | "TaskFailedSilent" => {
                if let Some(key) = self.task_key(o) {
                    let st = self.cmd.tasks.entry(key).or_default();
                    st.finished_ms = own_ms;
                    if let Some(l) = s(o, "logfile") {
                        st.logfile = Some(l);
                    }
                    if short != "TaskSucceeded" {
                        st.failed = true;
                    }
                }
            }
            "runQueueTaskStarted" => {
                if let Some(key) = self.task_key(o) {
                    let noexec = i(o, "noexec").unwrap_or(0) != 0;
                    self.cmd.tasks.entry(key).or_default().noexec = noexec;
                }
            }
            "runQueueTaskCompleted" => {
                if let Some(key) = self.task_key(o) {
                    let st = self.cmd.tasks.get(&key).cloned().unwrap_or_default();
                    let outcome = if st.noexec {
                        TaskOutcome::Empty
                    } else {
                        TaskOutcome::Succeeded
                    };
                    let sstate = if st.setscene_failed {
                        SstateResult::Failed
                    } else {
                        SstateResult::Na
                    };
                    self.emit_task(&key, outcome, sstate, None, own_ms, out);
                }
            }
            "runQueueTaskFailed" => {
                if let Some(key) = self.task_key(o) {
                    let st = self.cmd.tasks.get(&key).cloned().unwrap_or_default();
                    let sstate = if st.setscene_failed {
                        SstateResult::Failed
                    } else {
                        SstateResult::Na
                    };
                    self.emit_task(
                        &key,
                        TaskOutcome::Failed,
                        sstate,
                        i(o, "exitcode"),
                        own_ms,
                        out,
                    );
                }
            }
            "runQueueTaskSkipped" => {
                if let Some(key) = self.task_key(o) {
                    let outcome = match s(o, "reason").as_deref() {
                        Some("existing") => TaskOutcome::Prebuilt,
                        Some("noexec") => TaskOutcome::Empty,
                        _ => TaskOutcome::Covered,
                    };
                    self.emit_task(&key, outcome, SstateResult::Na, None, own_ms, out);
                }
            }
            "sceneQueueTaskCompleted" => {
                if let Some(key) = self.task_key(o) {
                    self.emit_task(
                        &key,
                        TaskOutcome::Cached,
                        SstateResult::Restored,
                        None,
                        own_ms,
                        out,
                    );
                }
            }
            "sceneQueueTaskFailed" => {
                if let Some(key) = self.task_key(o) {
                    let st = self.cmd.tasks.entry(key).or_default();
                    st.setscene_failed = true;
                    // The real task runs next: its own times, not the setscene's.
                    st.started_ms = None;
                    st.finished_ms = None;
                    st.failed = false;
                }
            }
            _ => {}
        }
        self.freeze(false, out);
    }
}

impl Translator for BitbakeTranslator {
    type Event = BbEvent;

    fn event(&mut self, ev: BbEvent, out: &mut Emit<'_>) {
        self.stats.events += 1;
        match ev {
            BbEvent::Variables(vars) => {
                self.cmd.vars.extend(vars);
                self.cmd.vars_known = true;
                self.freeze(false, out);
            }
            BbEvent::Event { class, raw, value } => {
                if !relevant(&class) {
                    // Not even part of the build's identity: BitBake's parser processes
                    // send these concurrently, so a live UI may get them in another
                    // order than the event log has them.
                    self.stats.ignored += 1;
                    return;
                }
                if let Some(o) = value.as_ref().and_then(Value::as_object) {
                    self.on_event(&class, &raw, o, out);
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Emit<'_>) {
        // A build that finished but whose command end is not in the stream still ends.
        if self.cmd.completed {
            self.end_command(out);
        } else if self.cmd.in_build {
            self.freeze(true, out);
        }
    }

    fn complete(&self) -> bool {
        // Between commands: the last command ended and nothing started since.
        !self.cmd.in_build && self.stats.builds > 0
    }
}
