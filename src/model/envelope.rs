//! The envelope and the five payload kinds (`build`, `task`, `test`, `artifact`, `log`).
//!
//! Field names here are the wire contract (schema `buildbus/<kind>/v1`): they may grow,
//! never shrink. Optional values are written as `null` rather than left out, so every
//! consumer sees the same shape whichever source produced a message.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{ids, routing};

/// The version of the message model (`v1` in exchange names and schema ids).
pub const MODEL_VERSION: &str = "v1";
/// The default exchange prefix; a kind's exchange is `<prefix>/<kind>`.
pub const DEFAULT_EXCHANGE_PREFIX: &str = "exchange/buildbus/v1";

/// The five kinds of message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Build,
    Task,
    Test,
    Artifact,
    Log,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Build,
        Kind::Task,
        Kind::Test,
        Kind::Artifact,
        Kind::Log,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Build => "build",
            Kind::Task => "task",
            Kind::Test => "test",
            Kind::Artifact => "artifact",
            Kind::Log => "log",
        }
    }

    /// `buildbus/<kind>/v1`.
    pub fn schema(self) -> &'static str {
        match self {
            Kind::Build => "buildbus/build/v1",
            Kind::Task => "buildbus/task/v1",
            Kind::Test => "buildbus/test/v1",
            Kind::Artifact => "buildbus/artifact/v1",
            Kind::Log => "buildbus/log/v1",
        }
    }

    /// The exchange of this kind under `prefix` (borrowed for the default prefix).
    pub fn exchange(self, prefix: &str) -> Cow<'static, str> {
        let prefix = prefix.trim_end_matches('/');
        if prefix == DEFAULT_EXCHANGE_PREFIX {
            return Cow::Borrowed(match self {
                Kind::Build => "exchange/buildbus/v1/build",
                Kind::Task => "exchange/buildbus/v1/task",
                Kind::Test => "exchange/buildbus/v1/test",
                Kind::Artifact => "exchange/buildbus/v1/artifact",
                Kind::Log => "exchange/buildbus/v1/log",
            });
        }
        Cow::Owned([prefix, "/", self.as_str()].concat())
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a message came from: the build system and the input it was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SourceMeta {
    /// `bazel` or `bitbake`.
    pub system: String,
    /// The input format (`bep-json`, `bep-binary`, `bes`, `bitbake-eventlog`, `bitbake-xmlrpc`).
    pub format: String,
    /// A file path, or the address of a live source.
    pub origin: String,
    /// The build tool's version, when the stream says it.
    pub tool_version: Option<String>,
}

/// `_meta`: routing and identity of one message.
///
/// `exchange`, `state`, `schema` and `serializer` are almost always one of a few fixed
/// words, so they are borrowed from static strings where they can be (`Cow`); a message
/// read from JSON owns them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub exchange: Cow<'static, str>,
    pub routing_key: String,
    pub message_id: String,
    /// The entity this message describes a state of (same for `started` and `finished`).
    pub entity_id: String,
    pub kind: Kind,
    /// The state this message describes (`started`/`finished` for builds, the final
    /// outcome or status for the others); part of `message_id`.
    pub state: Cow<'static, str>,
    pub schema: Cow<'static, str>,
    /// When the message was produced (RFC 3339); the only field that differs between
    /// two translations of one stream.
    pub sent: Arc<str>,
    pub serializer: Cow<'static, str>,
    /// Shared by every message read from one input (read it as a `SourceMeta`).
    #[serde(with = "shared_source")]
    pub source: Arc<SourceMeta>,
}

/// `Meta::source` on the wire: the `SourceMeta` itself.
mod shared_source {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::SourceMeta;

    pub fn serialize<S: Serializer>(source: &Arc<SourceMeta>, s: S) -> Result<S::Ok, S::Error> {
        source.as_ref().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<SourceMeta>, D::Error> {
        SourceMeta::deserialize(d).map(Arc::new)
    }
}

/// The fields every payload carries (Pulse's filter dimensions and the build's identity).
///
/// Everything but `timestamp` is the same for every message of a build, so those values
/// are shared (`Arc`): a message's copy is a reference count, not a new string. Read them
/// as `&str` (`&*c.build_id`, `c.tree.as_deref()`); make them from a `String` or `&str`
/// with `.into()`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Common {
    pub build_id: Arc<str>,
    pub system: Arc<str>,
    pub tree: Option<Arc<str>>,
    pub platform: Option<Arc<str>>,
    pub buildtype: Option<Arc<str>>,
    pub product: Option<Arc<str>>,
    pub revision: Option<Arc<str>>,
    pub branch: Option<Arc<str>>,
    pub tags: Arc<[String]>,
    /// When the described event happened (RFC 3339).
    pub timestamp: Option<Arc<str>>,
}

/// Host and user that ran the build, where known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Builder {
    pub host: Option<String>,
    pub user: Option<String>,
}

/// Tallies carried by a finished build message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Counts {
    /// Task messages by outcome.
    pub tasks: BTreeMap<String, u64>,
    /// Test summaries by status (attempts are not counted here).
    pub tests: BTreeMap<String, u64>,
    pub errors: u64,
    pub warnings: u64,
    /// Build-system metrics (Bazel's `BuildMetrics`, BitBake's parse statistics).
    pub metrics: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    Started,
    Finished,
}

impl BuildState {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Started => "started",
            BuildState::Finished => "finished",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildResult {
    Success,
    Failure,
    Interrupted,
    Aborted,
}

impl BuildResult {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildResult::Success => "success",
            BuildResult::Failure => "failure",
            BuildResult::Interrupted => "interrupted",
            BuildResult::Aborted => "aborted",
        }
    }
}

/// `build`: one build (one Bazel invocation, one BitBake `BuildStarted`..`BuildCompleted`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildPayload {
    #[serde(flatten)]
    pub common: Common,
    pub state: BuildState,
    pub result: Option<BuildResult>,
    /// What was asked for (Bazel patterns, BitBake targets).
    pub targets: Vec<String>,
    /// The command line, secrets redacted.
    pub command: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub builder: Builder,
    pub counts: Counts,
    /// The build tool's version, when known.
    pub tool_version: Option<String>,
    /// Why the build failed, in the tool's words, when it says.
    pub failure: Option<String>,
    /// Extra key/value facts the source gives (Bazel build metadata, BitBake machine,
    /// distro, ...), secrets redacted.
    pub metadata: BTreeMap<String, String>,
}

/// Toaster's task outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskOutcome {
    Succeeded,
    Failed,
    Cached,
    Prebuilt,
    Covered,
    Empty,
    NotExecuted,
}

impl TaskOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskOutcome::Succeeded => "succeeded",
            TaskOutcome::Failed => "failed",
            TaskOutcome::Cached => "cached",
            TaskOutcome::Prebuilt => "prebuilt",
            TaskOutcome::Covered => "covered",
            TaskOutcome::Empty => "empty",
            TaskOutcome::NotExecuted => "not_executed",
        }
    }
}

/// Toaster's shared-state results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SstateResult {
    Na,
    Miss,
    Failed,
    Restored,
}

/// `task`: one unit of work (a BitBake recipe task, a Bazel target or action).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskPayload {
    #[serde(flatten)]
    pub common: Common,
    /// Recipe or Bazel label.
    pub target: String,
    /// `do_compile`, `build` for a Bazel target, or an action mnemonic.
    pub task: String,
    pub outcome: TaskOutcome,
    pub sstate_result: SstateResult,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub elapsed_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub logfile: Option<String>,
    /// The rule kind (`genrule rule`) or recipe file, where known.
    pub target_kind: Option<String>,
    /// Why it failed or was not executed, in the tool's words.
    pub failure: Option<String>,
}

/// `test`: one test summary or one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestPayload {
    #[serde(flatten)]
    pub common: Common,
    pub test: String,
    /// `summary` or `attempt`.
    pub scope: String,
    /// Lower-case status (`passed`, `failed`, `flaky`, `timeout`, ...).
    pub status: String,
    pub attempt: Option<i64>,
    pub shard: Option<i64>,
    pub run: Option<i64>,
    pub total_attempts: Option<i64>,
    pub total_shards: Option<i64>,
    pub duration_ms: Option<i64>,
    pub cached: Option<bool>,
    pub logurl: Option<String>,
    /// Where it ran (`local`, `linux-sandbox`, `remote`), where known.
    pub strategy: Option<String>,
}

/// `artifact`: one file a build produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactPayload {
    #[serde(flatten)]
    pub common: Common,
    pub path: String,
    pub uri: Option<String>,
    pub kind: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub target: Option<String>,
    /// Fields a classification rule captured (machine, package, version, ...).
    pub fields: BTreeMap<String, String>,
    /// Modification time (RFC 3339) of the file, when it was scanned (AAM).
    #[serde(default)]
    pub mtime: Option<String>,
    /// For a symbolic link found by a scan: its target, as written in the link.
    #[serde(default)]
    pub symlink_target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Warning,
    Error,
    Critical,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
            LogLevel::Critical => "critical",
        }
    }
}

/// `log`: one warning or error the build reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogPayload {
    #[serde(flatten)]
    pub common: Common,
    pub level: LogLevel,
    /// Fully formatted text.
    pub message: String,
    pub target: Option<String>,
    pub task: Option<String>,
}

/// The payload of one message, typed by kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Payload {
    Build(BuildPayload),
    Task(TaskPayload),
    Test(TestPayload),
    Artifact(ArtifactPayload),
    Log(LogPayload),
}

impl Payload {
    pub fn kind(&self) -> Kind {
        match self {
            Payload::Build(_) => Kind::Build,
            Payload::Task(_) => Kind::Task,
            Payload::Test(_) => Kind::Test,
            Payload::Artifact(_) => Kind::Artifact,
            Payload::Log(_) => Kind::Log,
        }
    }

    pub fn common(&self) -> &Common {
        match self {
            Payload::Build(p) => &p.common,
            Payload::Task(p) => &p.common,
            Payload::Test(p) => &p.common,
            Payload::Artifact(p) => &p.common,
            Payload::Log(p) => &p.common,
        }
    }

    pub fn common_mut(&mut self) -> &mut Common {
        match self {
            Payload::Build(p) => &mut p.common,
            Payload::Task(p) => &mut p.common,
            Payload::Test(p) => &mut p.common,
            Payload::Artifact(p) => &mut p.common,
            Payload::Log(p) => &mut p.common,
        }
    }

    /// The state word of this payload (part of the message id and of CloudEvents' type).
    pub fn state(&self) -> Cow<'static, str> {
        match self {
            Payload::Build(p) => Cow::Borrowed(p.state.as_str()),
            Payload::Task(p) => Cow::Borrowed(p.outcome.as_str()),
            Payload::Test(p) => Cow::Owned(p.status.clone()),
            Payload::Artifact(_) => Cow::Borrowed("produced"),
            Payload::Log(p) => Cow::Borrowed(p.level.as_str()),
        }
    }

    /// The kind-specific words that follow the five common ones (at most three), and
    /// how many there are.
    fn key_tail(&self) -> ([Option<&str>; 3], usize) {
        match self {
            Payload::Build(p) => (
                [
                    Some(p.state.as_str()),
                    p.result.map(BuildResult::as_str),
                    None,
                ],
                2,
            ),
            Payload::Task(p) => (
                [
                    Some(p.outcome.as_str()),
                    Some(p.target.as_str()),
                    Some(p.task.as_str()),
                ],
                3,
            ),
            Payload::Test(p) => ([Some(p.status.as_str()), Some(p.test.as_str()), None], 2),
            Payload::Artifact(p) => ([Some(p.kind.as_str()), None, None], 1),
            Payload::Log(p) => ([Some(p.level.as_str()), None, None], 1),
        }
    }

    /// The routing key of this payload (see [`routing`]).
    pub fn routing_key(&self) -> String {
        let c = self.common();
        let (tail, n) = self.key_tail();
        let [t0, t1, t2] = tail;
        let words = [
            c.tree.as_deref(),
            c.platform.as_deref(),
            c.buildtype.as_deref(),
            c.product.as_deref(),
            Some(&*c.system),
            t0,
            t1,
            t2,
        ];
        routing::key(&words[..5 + n])
    }
}

/// One message: `{"_meta": ..., "payload": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Envelope {
    #[serde(rename = "_meta")]
    pub meta: Meta,
    pub payload: Payload,
}

impl Envelope {
    /// Wraps a payload: computes routing key and ids. `entity_parts` name the entity
    /// within its build (e.g. target and task); they must not include the state.
    pub fn new(
        payload: Payload,
        entity_parts: &[&str],
        source: SourceMeta,
        exchange_prefix: &str,
    ) -> Envelope {
        Envelope::with_shared_source(payload, entity_parts, Arc::new(source), exchange_prefix)
    }

    /// [`Envelope::new`] with a source shared by many messages (a translator's input).
    pub fn with_shared_source(
        payload: Payload,
        entity_parts: &[&str],
        source: Arc<SourceMeta>,
        exchange_prefix: &str,
    ) -> Envelope {
        let c = payload.common();
        let entity_id = ids::entity_id(
            &c.system,
            &c.build_id,
            payload.kind().as_str(),
            entity_parts,
        );
        Envelope::with_entity_id(payload, entity_id, source, exchange_prefix)
    }

    /// [`Envelope::with_shared_source`] with the entity id already worked out (from the
    /// payload's `system` and `build_id`, its kind and the entity's parts).
    pub fn with_entity_id(
        payload: Payload,
        entity_id: String,
        source: Arc<SourceMeta>,
        exchange_prefix: &str,
    ) -> Envelope {
        let kind = payload.kind();
        let state = payload.state();
        Envelope {
            meta: Meta {
                exchange: kind.exchange(exchange_prefix),
                routing_key: payload.routing_key(),
                message_id: ids::message_id(&entity_id, &state),
                entity_id,
                kind,
                state,
                schema: Cow::Borrowed(kind.schema()),
                sent: super::time::now(),
                serializer: Cow::Borrowed("json"),
                source,
            },
            payload,
        }
    }

    pub fn kind(&self) -> Kind {
        self.meta.kind
    }

    /// Parses an envelope from JSON, typing the payload by `_meta.kind`.
    pub fn from_json(bytes: &[u8]) -> Result<Envelope, serde_json::Error> {
        #[derive(Deserialize)]
        struct Raw {
            #[serde(rename = "_meta")]
            meta: Meta,
            payload: serde_json::Value,
        }
        let raw: Raw = serde_json::from_slice(bytes)?;
        let p = raw.payload;
        let payload = match raw.meta.kind {
            Kind::Build => Payload::Build(serde_json::from_value(p)?),
            Kind::Task => Payload::Task(serde_json::from_value(p)?),
            Kind::Test => Payload::Test(serde_json::from_value(p)?),
            Kind::Artifact => Payload::Artifact(serde_json::from_value(p)?),
            Kind::Log => Payload::Log(serde_json::from_value(p)?),
        };
        Ok(Envelope {
            meta: raw.meta,
            payload,
        })
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        let bytes = serde_json::to_vec(&v).map_err(serde::de::Error::custom)?;
        Envelope::from_json(&bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spelled-out schema and exchange names follow the model version and the
    /// default prefix.
    #[test]
    fn static_names_follow_the_version_and_prefix() {
        for k in Kind::ALL {
            assert_eq!(
                k.schema(),
                ["buildbus/", k.as_str(), "/", MODEL_VERSION].concat()
            );
            let exchange = k.exchange(DEFAULT_EXCHANGE_PREFIX);
            assert!(matches!(exchange, Cow::Borrowed(_)));
            assert_eq!(
                exchange,
                [DEFAULT_EXCHANGE_PREFIX, "/", k.as_str()].concat()
            );
            assert_eq!(k.exchange("acme/bus/"), ["acme/bus/", k.as_str()].concat());
        }
    }
}
