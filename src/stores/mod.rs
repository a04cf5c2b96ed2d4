//! The storage layer of the DSI: the [`Store`] trait, its row and error types, the
//! rules every back end shares, and [`open`], which picks a back end from a URL.
//!
//! This module owns what must be the same in every store:
//! - validation of a batch before any SQL runs ([`StoreError::Invalid`] names the
//!   message that does not fit, so a consumer can dead-letter it and retry the rest);
//! - deduplication inside a batch and the choice of the one message per entity that a
//!   batch upserts;
//! - the convergence order of an entity's messages: [`state_rank`], then the event
//!   `timestamp`, then the `message_id`. A row is replaced only by a message ordered at
//!   or after the one it holds, so whatever order messages arrive in, every row ends as
//!   the greatest of its messages.
//!
//! The back ends ([`sqlite`], [`postgres`]) own their connections, transactions, schemas
//! (`schemas/sql/`) and write SQL. Reading back is shared: `rows.rs` holds the SELECTs of
//! [`Store::query_builds`] and [`Store::query_build`] and the mapping of a result row to
//! each row type, and a back end only runs the SQL it is given.

pub mod postgres;
mod rows;
pub mod sqlite;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{Counts, Envelope, Kind, Payload, SstateResult};

pub use self::postgres::PostgresStore;
pub use self::sqlite::{SqliteOptions, SqliteStore, Synchronous};

/// The schema version this buildbus creates and understands.
pub const SCHEMA_VERSION: i64 = 2;

/// A permanent record of build messages.
///
/// Calls are synchronous and may block (disk, network, lock waits): call them from a
/// plain thread, never from an async runtime's worker thread.
pub trait Store: Send {
    /// Writes `batch` in one transaction (all or nothing). A message whose `message_id`
    /// is already stored (or repeated earlier in the batch) is skipped entirely.
    fn write_batch(&mut self, batch: &[Envelope]) -> Result<WriteStats, StoreError>;
    /// The builds matching `f`, latest `started_at` first.
    fn query_builds(&mut self, f: &BuildFilter) -> Result<Vec<BuildRow>, StoreError>;
    /// What is stored about one build, or `None` when nothing is.
    fn query_build(&mut self, build_id: &str) -> Result<Option<BuildDetail>, StoreError>;
    /// Rows per table.
    fn counts(&mut self) -> Result<TableCounts, StoreError>;
}

/// What one [`Store::write_batch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteStats {
    /// Messages stored for the first time.
    pub new_messages: u64,
    /// Messages skipped: already stored, or repeated within the batch.
    pub duplicates: u64,
}

/// Rows per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCounts {
    pub messages: u64,
    pub builds: u64,
    pub tasks: u64,
    pub tests: u64,
    pub artifacts: u64,
    pub logs: u64,
}

/// Which builds [`Store::query_builds`] returns; `None` fields do not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildFilter {
    pub tree: Option<String>,
    pub platform: Option<String>,
    pub buildtype: Option<String>,
    /// `success`, `failure`, `interrupted` or `aborted`.
    pub result: Option<String>,
    /// Builds started at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// At most this many builds (the latest).
    pub limit: Option<u32>,
}

/// One row of `builds`. Timestamps are RFC 3339 in UTC with milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRow {
    pub build_id: String,
    pub system: String,
    /// `started` or `finished`: the state of the message the row holds.
    pub state: String,
    pub result: Option<String>,
    pub tree: Option<String>,
    pub platform: Option<String>,
    pub buildtype: Option<String>,
    pub product: Option<String>,
    pub revision: Option<String>,
    pub branch: Option<String>,
    pub tags: Vec<String>,
    pub targets: Vec<String>,
    pub command: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub builder_host: Option<String>,
    pub builder_user: Option<String>,
    pub counts: Counts,
    pub tool_version: Option<String>,
    pub failure: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub timestamp: Option<String>,
    pub entity_id: String,
    pub message_id: String,
}

/// One row of `tasks` (without the build's Pulse fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRow {
    pub entity_id: String,
    pub build_id: String,
    pub target: String,
    pub task: String,
    pub outcome: String,
    pub sstate_result: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub elapsed_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub logfile: Option<String>,
    pub target_kind: Option<String>,
    pub failure: Option<String>,
    pub timestamp: Option<String>,
    pub message_id: String,
}

/// One row of `tests` (a summary or an attempt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestRow {
    pub entity_id: String,
    pub build_id: String,
    pub test: String,
    pub scope: String,
    pub status: String,
    pub attempt: Option<i64>,
    pub shard: Option<i64>,
    pub run: Option<i64>,
    pub total_attempts: Option<i64>,
    pub total_shards: Option<i64>,
    pub duration_ms: Option<i64>,
    pub cached: Option<bool>,
    pub logurl: Option<String>,
    pub strategy: Option<String>,
    pub timestamp: Option<String>,
    pub message_id: String,
}

/// One row of `artifacts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRow {
    pub entity_id: String,
    pub build_id: String,
    pub path: String,
    pub uri: Option<String>,
    pub kind: String,
    pub size: Option<i64>,
    pub sha256: Option<String>,
    pub target: Option<String>,
    pub fields: BTreeMap<String, String>,
    /// When the file was modified (artifacts a scan recorded).
    pub mtime: Option<String>,
    /// A scanned symbolic link's target.
    pub symlink_target: Option<String>,
    pub timestamp: Option<String>,
    pub message_id: String,
}

/// One row of `logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRow {
    pub entity_id: String,
    pub build_id: String,
    pub level: String,
    pub message: String,
    pub target: Option<String>,
    pub task: Option<String>,
    pub timestamp: Option<String>,
    pub message_id: String,
}

/// What [`Store::query_build`] knows about one build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildDetail {
    pub build_id: String,
    /// `None` while only messages of other kinds have arrived for this build.
    pub build: Option<BuildRow>,
    /// Tasks by outcome.
    pub task_counts: BTreeMap<String, u64>,
    /// Tasks whose outcome is `failed` or `not_executed`, by target and task.
    pub failed_tasks: Vec<TaskRow>,
    /// Every test row, by test (summary first, then attempts).
    pub tests: Vec<TestRow>,
    /// By path.
    pub artifacts: Vec<ArtifactRow>,
    /// Errors and warnings, by time.
    pub logs: Vec<LogRow>,
}

impl BuildDetail {
    /// The detail, or `None` when the store holds nothing at all for the build.
    pub fn unless_empty(self) -> Option<BuildDetail> {
        let empty = self.build.is_none()
            && self.task_counts.is_empty()
            && self.tests.is_empty()
            && self.artifacts.is_empty()
            && self.logs.is_empty();
        (!empty).then_some(self)
    }
}

/// What went wrong in a store. Every message names the store (`sqlite:PATH`,
/// `postgres://user@host:port/db`, never a password) and what it was doing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The URL names no store this buildbus can open.
    #[error("unsupported store URL {url:?}: {reason} (expected sqlite:PATH, a file path, or postgres://USER@HOST:PORT/DB)")]
    BadUrl { url: String, reason: String },
    /// A message of the batch does not fit the store; nothing of the batch was written.
    #[error("{store}: message {message_id} rejected, nothing of its batch was written: {reason}")]
    Invalid {
        store: String,
        message_id: String,
        reason: String,
    },
    /// The database failed; for a write, nothing of the batch was written (unless the
    /// connection was lost during the commit, when it may have been: writing the batch
    /// again is always safe).
    #[error("{store}: {action} failed{}: {reason}", if *.transient { " (transient)" } else { "" })]
    Db {
        store: String,
        /// What was being done: the statement or step (`upsert tasks`, `commit`, ...).
        action: String,
        reason: String,
        /// Whether trying again later may succeed (lock time-out, lost connection,
        /// serialization failures that outlived the retries).
        transient: bool,
    },
    /// The database holds a schema newer than this buildbus knows.
    #[error("{store}: schema version {found} is newer than this buildbus understands ({SCHEMA_VERSION}); upgrade buildbus")]
    SchemaTooNew { store: String, found: i64 },
    /// A stored value cannot be read back (edited by hand, or a newer writer).
    #[error("{store}: {table} row {key}: unreadable column {column}: {reason}")]
    Corrupt {
        store: String,
        table: &'static str,
        key: String,
        column: &'static str,
        reason: String,
    },
}

impl StoreError {
    /// Whether trying the same call again later may succeed: `false` for bad data,
    /// URLs and schemas (retrying would fail the same way).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Db {
                transient: true,
                ..
            }
        )
    }

    /// The message a [`StoreError::Invalid`] rejected.
    pub fn rejected_message(&self) -> Option<&str> {
        match self {
            StoreError::Invalid { message_id, .. } => Some(message_id),
            _ => None,
        }
    }
}

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite:PATH[?synchronous=full|normal&busy_timeout_ms=N]`, or a bare path.
    Sqlite {
        path: PathBuf,
        options: SqliteOptions,
    },
    /// `postgres://...` or `postgresql://...`, as libpq takes it.
    Postgres { url: String },
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, StoreError> {
        let bad = |reason: &str| StoreError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres {
                url: url.to_string(),
            });
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let (path, query) = match rest.rsplit_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(bad("no file path after sqlite:"));
            }
            let mut options = SqliteOptions::default();
            for pair in query
                .unwrap_or_default()
                .split('&')
                .filter(|p| !p.is_empty())
            {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                match (k, v.to_ascii_lowercase().as_str()) {
                    ("synchronous", "full") => options.synchronous = Synchronous::Full,
                    ("synchronous", "normal") => options.synchronous = Synchronous::Normal,
                    ("busy_timeout_ms", ms) => {
                        let ms: u64 = ms
                            .parse()
                            .map_err(|_| bad("busy_timeout_ms takes milliseconds"))?;
                        options.busy_timeout = Duration::from_millis(ms);
                    }
                    _ => {
                        return Err(bad(&format!(
                            "unknown option {pair:?} (known: synchronous=full|normal, busy_timeout_ms=N)"
                        )))
                    }
                }
            }
            return Ok(StoreUrl::Sqlite {
                path: PathBuf::from(path),
                options,
            });
        }
        if url.is_empty() {
            return Err(bad("empty"));
        }
        if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(&format!("unknown scheme {scheme:?}")));
        }
        Ok(StoreUrl::Sqlite {
            path: PathBuf::from(url),
            options: SqliteOptions::default(),
        })
    }
}

/// Opens (creating or migrating the schema) the store `url` names: `sqlite:PATH` or a
/// bare path (the file is created if missing), `postgres://...` or `postgresql://...`.
pub fn open(url: &str) -> Result<Box<dyn Store>, StoreError> {
    match StoreUrl::parse(url)? {
        StoreUrl::Sqlite { path, options } => Ok(Box::new(SqliteStore::open(&path, &options)?)),
        StoreUrl::Postgres { url } => Ok(Box::new(PostgresStore::connect(&url)?)),
    }
}

/// The rank of a state within its kind: an entity's row is replaced only by a message
/// of equal or higher rank (ties: later `timestamp`, then greater `message_id`).
///
/// Builds: `started` 1, `finished` 2. Every other kind: 1 for all states, for now
/// (BitBake task states will get their own ranks here).
pub fn state_rank(kind: Kind, state: &str) -> i32 {
    match (kind, state) {
        (Kind::Build, "started") => 1,
        (Kind::Build, "finished") => 2,
        (Kind::Build, _) => 0,
        _ => 1,
    }
}

// ---------------------------------------------------------------------------------------
// Shared by the back ends: a validated batch.

/// One validated message of a batch, with the values every back end binds.
pub(crate) struct Msg<'a> {
    pub env: &'a Envelope,
    /// The envelope as JSON.
    pub body: String,
    pub rank: i32,
    pub sent: Option<DateTime<Utc>>,
    /// `payload.timestamp`.
    pub timestamp: Option<DateTime<Utc>>,
    /// `started_at`/`finished_at` of builds and tasks.
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// An artifact's size, as the database's signed 64-bit integer.
    pub size: Option<i64>,
    /// An artifact's `mtime`.
    pub mtime: Option<DateTime<Utc>>,
}

impl<'a> Msg<'a> {
    pub fn message_id(&self) -> &'a str {
        &self.env.meta.message_id
    }

    /// The row this message writes: `build_id` for builds, `entity_id` for the others.
    pub fn row_key(&self) -> &'a str {
        match &self.env.payload {
            Payload::Build(b) => &b.common.build_id,
            _ => &self.env.meta.entity_id,
        }
    }

    /// The convergence order (see the module documentation).
    fn order(&self) -> (i32, Option<DateTime<Utc>>, &'a str) {
        (self.rank, self.timestamp, self.message_id())
    }
}

/// A validated batch: each message once, in batch order.
pub(crate) struct Batch<'a> {
    pub msgs: Vec<Msg<'a>>,
    /// Messages repeated within the batch (skipped).
    pub repeated: u64,
}

/// Validates `batch` and drops the repeats of a `message_id` within it.
pub(crate) fn prepare<'a>(store: &str, batch: &'a [Envelope]) -> Result<Batch<'a>, StoreError> {
    let mut seen = HashSet::with_capacity(batch.len());
    let mut msgs = Vec::with_capacity(batch.len());
    let mut repeated = 0;
    for env in batch {
        if !seen.insert(env.meta.message_id.as_str()) {
            repeated += 1;
            continue;
        }
        let m = validate(env).map_err(|reason| StoreError::Invalid {
            store: store.to_string(),
            message_id: env.meta.message_id.clone(),
            reason,
        })?;
        msgs.push(m);
    }
    Ok(Batch { msgs, repeated })
}

fn validate(env: &Envelope) -> Result<Msg<'_>, String> {
    let meta = &env.meta;
    let kind = env.payload.kind();
    if meta.kind != kind {
        return Err(format!(
            "_meta.kind is {} but the payload is of kind {kind}",
            meta.kind
        ));
    }
    let state = env.payload.state();
    if meta.state != state {
        return Err(format!(
            "_meta.state is {:?} but the payload's state is {state:?}",
            meta.state
        ));
    }
    let c = env.payload.common();
    for (name, v) in [
        ("_meta.message_id", meta.message_id.as_str()),
        ("_meta.entity_id", meta.entity_id.as_str()),
        ("payload.build_id", &*c.build_id),
        ("payload.system", &*c.system),
    ] {
        if v.trim().is_empty() {
            return Err(format!("{name} is empty"));
        }
    }
    let body = serde_json::to_string(env).map_err(|e| format!("cannot serialize: {e}"))?;
    if has_nul(&body) {
        return Err("a string contains a NUL character (U+0000)".to_string());
    }
    let ts = |name: &str, v: Option<&str>| -> Result<Option<DateTime<Utc>>, String> {
        v.map(|s| parse_time(name, s)).transpose()
    };
    let mut m = Msg {
        env,
        body,
        rank: state_rank(kind, &state),
        sent: Some(parse_time("_meta.sent", &meta.sent)?),
        timestamp: ts("payload.timestamp", c.timestamp.as_deref())?,
        started_at: None,
        finished_at: None,
        size: None,
        mtime: None,
    };
    match &env.payload {
        Payload::Build(b) => {
            m.started_at = ts("payload.started_at", b.started_at.as_deref())?;
            m.finished_at = ts("payload.finished_at", b.finished_at.as_deref())?;
        }
        Payload::Task(t) => {
            m.started_at = ts("payload.started_at", t.started_at.as_deref())?;
            m.finished_at = ts("payload.finished_at", t.finished_at.as_deref())?;
        }
        Payload::Artifact(a) => {
            m.mtime = ts("payload.mtime", a.mtime.as_deref())?;
            m.size = a
                .size
                .map(|s| {
                    i64::try_from(s).map_err(|_| {
                        format!(
                            "payload.size {s} is larger than the largest storable size {}",
                            i64::MAX
                        )
                    })
                })
                .transpose()?;
        }
        Payload::Test(_) | Payload::Log(_) => {}
    }
    Ok(m)
}

/// Whether serialized JSON holds an escaped NUL (`\u0000`), which PostgreSQL's text and
/// jsonb cannot store (refused everywhere, so every store accepts the same messages).
fn has_nul(json: &str) -> bool {
    let b = json.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'u') && b.get(i + 2..i + 6) == Some(b"0000") {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// Parses an RFC 3339 timestamp, to UTC, truncated to milliseconds (the model's
/// precision, so that every store orders them alike).
fn parse_time(name: &str, s: &str) -> Result<DateTime<Utc>, String> {
    let t = DateTime::parse_from_rfc3339(s)
        .map_err(|e| format!("{name} {s:?} is not an RFC 3339 timestamp: {e}"))?;
    Utc.timestamp_millis_opt(t.timestamp_millis())
        .single()
        .ok_or_else(|| format!("{name} {s:?} is out of range"))
}

/// RFC 3339, UTC, milliseconds: the text form of every stored timestamp.
pub(crate) fn time_text(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Of the newly stored messages, the greatest per row (see [`Msg::order`]), grouped by
/// kind in [`Kind::ALL`] order and sorted by row key: upserting in one global order keeps
/// concurrent writers from deadlocking on each other's rows.
pub(crate) fn latest_per_row<'m, 'a>(new: &[&'m Msg<'a>]) -> [Vec<&'m Msg<'a>>; 5] {
    let mut best: [BTreeMap<&'a str, &'m Msg<'a>>; 5] = Default::default();
    for m in new {
        let slot = kind_index(m.env.payload.kind());
        best[slot]
            .entry(m.row_key())
            .and_modify(|cur| {
                if m.order() > cur.order() {
                    *cur = m;
                }
            })
            .or_insert(m);
    }
    best.map(|rows| rows.into_values().collect())
}

pub(crate) fn kind_index(k: Kind) -> usize {
    match k {
        Kind::Build => 0,
        Kind::Task => 1,
        Kind::Test => 2,
        Kind::Artifact => 3,
        Kind::Log => 4,
    }
}

/// How a column is stored (SQLite / PostgreSQL): text / text, integer / bigint,
/// RFC 3339 text / timestamptz, JSON text / jsonb, 0-1 integer / boolean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColType {
    Text,
    Int,
    Time,
    Json,
    Bool,
}

/// One entity table: its name, its key column, and its own columns after the key and
/// the [`COMMON_COLS`].
pub(crate) struct Table {
    pub name: &'static str,
    pub key: &'static str,
    own: &'static [(&'static str, ColType)],
}

impl Table {
    /// Every column a row upsert writes, in the order of [`row_values`].
    pub fn columns(&self) -> Vec<(&'static str, ColType)> {
        std::iter::once((self.key, ColType::Text))
            .chain(COMMON_COLS)
            .chain(self.own.iter().copied())
            .collect()
    }
}

/// The columns every entity table has, after its key.
const COMMON_COLS: [(&str, ColType); 12] = [
    ("system", ColType::Text),
    ("tree", ColType::Text),
    ("platform", ColType::Text),
    ("buildtype", ColType::Text),
    ("product", ColType::Text),
    ("revision", ColType::Text),
    ("branch", ColType::Text),
    ("tags", ColType::Json),
    ("\"timestamp\"", ColType::Time),
    ("state", ColType::Text),
    ("state_rank", ColType::Int),
    ("message_id", ColType::Text),
];

/// The entity tables, in [`Kind::ALL`] order (see [`kind_index`]).
pub(crate) const TABLES: [Table; 5] = [
    Table {
        name: "builds",
        key: "build_id",
        own: &[
            ("entity_id", ColType::Text),
            ("result", ColType::Text),
            ("targets", ColType::Json),
            ("command", ColType::Text),
            ("started_at", ColType::Time),
            ("finished_at", ColType::Time),
            ("duration_ms", ColType::Int),
            ("exit_code", ColType::Int),
            ("builder_host", ColType::Text),
            ("builder_user", ColType::Text),
            ("counts", ColType::Json),
            ("tool_version", ColType::Text),
            ("failure", ColType::Text),
            ("metadata", ColType::Json),
        ],
    },
    Table {
        name: "tasks",
        key: "entity_id",
        own: &[
            ("build_id", ColType::Text),
            ("target", ColType::Text),
            ("task", ColType::Text),
            ("outcome", ColType::Text),
            ("sstate_result", ColType::Text),
            ("started_at", ColType::Time),
            ("finished_at", ColType::Time),
            ("elapsed_ms", ColType::Int),
            ("exit_code", ColType::Int),
            ("logfile", ColType::Text),
            ("target_kind", ColType::Text),
            ("failure", ColType::Text),
        ],
    },
    Table {
        name: "tests",
        key: "entity_id",
        own: &[
            ("build_id", ColType::Text),
            ("test", ColType::Text),
            ("scope", ColType::Text),
            ("status", ColType::Text),
            ("attempt", ColType::Int),
            ("shard", ColType::Int),
            ("run", ColType::Int),
            ("total_attempts", ColType::Int),
            ("total_shards", ColType::Int),
            ("duration_ms", ColType::Int),
            ("cached", ColType::Bool),
            ("logurl", ColType::Text),
            ("strategy", ColType::Text),
        ],
    },
    Table {
        name: "artifacts",
        key: "entity_id",
        own: &[
            ("build_id", ColType::Text),
            ("path", ColType::Text),
            ("uri", ColType::Text),
            ("kind", ColType::Text),
            ("size", ColType::Int),
            ("sha256", ColType::Text),
            ("target", ColType::Text),
            ("fields", ColType::Json),
            ("mtime", ColType::Time),
            ("symlink_target", ColType::Text),
        ],
    },
    Table {
        name: "logs",
        key: "entity_id",
        own: &[
            ("build_id", ColType::Text),
            ("level", ColType::Text),
            ("message", ColType::Text),
            ("target", ColType::Text),
            ("task", ColType::Text),
        ],
    },
];

/// One bound value of a row upsert (see [`ColType`]).
pub(crate) enum Val<'a> {
    Text(Option<&'a str>),
    Json(String),
    Int(Option<i64>),
    Time(Option<DateTime<Utc>>),
    Bool(Option<bool>),
}

/// The values of the row `m` upserts, in the order of [`Table::columns`] of its kind.
pub(crate) fn row_values<'m>(m: &'m Msg<'_>) -> Vec<Val<'m>> {
    use Val::{Bool, Int, Json, Text, Time};
    let env = m.env;
    let c = env.payload.common();
    let key = m.row_key();
    let mut v = Vec::with_capacity(32);
    v.extend([
        Text(Some(key)),
        Text(Some(&c.system)),
        Text(c.tree.as_deref()),
        Text(c.platform.as_deref()),
        Text(c.buildtype.as_deref()),
        Text(c.product.as_deref()),
        Text(c.revision.as_deref()),
        Text(c.branch.as_deref()),
        Json(json_text(&c.tags)),
        Time(m.timestamp),
        Text(Some(&env.meta.state)),
        Int(Some(i64::from(m.rank))),
        Text(Some(&env.meta.message_id)),
    ]);
    match &env.payload {
        Payload::Build(b) => v.extend([
            Text(Some(&env.meta.entity_id)),
            Text(b.result.map(|r| r.as_str())),
            Json(json_text(&b.targets)),
            Text(b.command.as_deref()),
            Time(m.started_at),
            Time(m.finished_at),
            Int(b.duration_ms),
            Int(b.exit_code),
            Text(b.builder.host.as_deref()),
            Text(b.builder.user.as_deref()),
            Json(json_text(&b.counts)),
            Text(b.tool_version.as_deref()),
            Text(b.failure.as_deref()),
            Json(json_text(&b.metadata)),
        ]),
        Payload::Task(t) => v.extend([
            Text(Some(&c.build_id)),
            Text(Some(&t.target)),
            Text(Some(&t.task)),
            Text(Some(t.outcome.as_str())),
            Text(Some(sstate_str(t.sstate_result))),
            Time(m.started_at),
            Time(m.finished_at),
            Int(t.elapsed_ms),
            Int(t.exit_code),
            Text(t.logfile.as_deref()),
            Text(t.target_kind.as_deref()),
            Text(t.failure.as_deref()),
        ]),
        Payload::Test(t) => v.extend([
            Text(Some(&c.build_id)),
            Text(Some(&t.test)),
            Text(Some(&t.scope)),
            Text(Some(&t.status)),
            Int(t.attempt),
            Int(t.shard),
            Int(t.run),
            Int(t.total_attempts),
            Int(t.total_shards),
            Int(t.duration_ms),
            Bool(t.cached),
            Text(t.logurl.as_deref()),
            Text(t.strategy.as_deref()),
        ]),
        Payload::Artifact(a) => v.extend([
            Text(Some(&c.build_id)),
            Text(Some(&a.path)),
            Text(a.uri.as_deref()),
            Text(Some(&a.kind)),
            Int(m.size),
            Text(a.sha256.as_deref()),
            Text(a.target.as_deref()),
            Json(json_text(&a.fields)),
            Time(m.mtime),
            Text(a.symlink_target.as_deref()),
        ]),
        Payload::Log(l) => v.extend([
            Text(Some(&c.build_id)),
            Text(Some(l.level.as_str())),
            Text(Some(&l.message)),
            Text(l.target.as_deref()),
            Text(l.task.as_deref()),
        ]),
    }
    v
}

fn sstate_str(s: SstateResult) -> &'static str {
    match s {
        SstateResult::Na => "na",
        SstateResult::Miss => "miss",
        SstateResult::Failed => "failed",
        SstateResult::Restored => "restored",
    }
}

/// JSON text of a list or map.
pub(crate) fn json_text<T: Serialize>(v: &T) -> String {
    // Plain lists and maps with string keys always serialize.
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            StoreUrl::parse("sqlite:/tmp/x.db").unwrap(),
            StoreUrl::Sqlite {
                path: "/tmp/x.db".into(),
                options: SqliteOptions::default()
            }
        );
        assert_eq!(
            StoreUrl::parse("sqlite:///tmp/x.db?synchronous=normal").unwrap(),
            StoreUrl::Sqlite {
                path: "/tmp/x.db".into(),
                options: SqliteOptions {
                    synchronous: Synchronous::Normal,
                    ..SqliteOptions::default()
                }
            }
        );
        assert_eq!(
            StoreUrl::parse("./b.db").unwrap(),
            StoreUrl::Sqlite {
                path: "./b.db".into(),
                options: SqliteOptions::default()
            }
        );
        assert!(matches!(
            StoreUrl::parse("postgresql://u@h/db").unwrap(),
            StoreUrl::Postgres { .. }
        ));
        for bad in ["", "mysql://h/db", "sqlite:", "sqlite:x?sync=1"] {
            let e = StoreUrl::parse(bad).unwrap_err();
            assert!(matches!(e, StoreError::BadUrl { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn nul_detection() {
        assert!(has_nul(r#"{"a":"x\u0000y"}"#));
        assert!(!has_nul(r#"{"a":"x\\u0000y"}"#));
        assert!(has_nul(r#"{"a":"x\\\u0000y"}"#));
        assert!(has_nul(r#"{"a":"\u00001"}"#));
        assert!(!has_nul(r#"{"a":"\u00e9\n"}"#));
    }

    #[test]
    fn row_values_match_the_columns() {
        // Tasks, tests and artifacts: the integration tests store real fixtures.
        let common = crate::model::Common {
            build_id: "b".into(),
            system: "bazel".into(),
            ..Default::default()
        };
        let payloads = [
            Payload::Build(crate::model::BuildPayload {
                common: common.clone(),
                state: crate::model::BuildState::Started,
                result: None,
                targets: vec![],
                command: None,
                started_at: None,
                finished_at: None,
                duration_ms: None,
                exit_code: None,
                builder: Default::default(),
                counts: Default::default(),
                tool_version: None,
                failure: None,
                metadata: Default::default(),
            }),
            Payload::Log(crate::model::LogPayload {
                common,
                level: crate::model::LogLevel::Error,
                message: "m".into(),
                target: None,
                task: None,
            }),
        ];
        for p in payloads {
            let kind = p.kind();
            let env = Envelope::new(p, &["x"], Default::default(), "ex");
            let batch = [env];
            let prepared = prepare("t", &batch).unwrap();
            let values = row_values(&prepared.msgs[0]);
            let cols = TABLES[kind_index(kind)].columns();
            assert_eq!(values.len(), cols.len(), "{kind}");
            for (v, (name, t)) in values.iter().zip(&cols) {
                let vt = match v {
                    Val::Text(_) => ColType::Text,
                    Val::Json(_) => ColType::Json,
                    Val::Int(_) => ColType::Int,
                    Val::Time(_) => ColType::Time,
                    Val::Bool(_) => ColType::Bool,
                };
                assert_eq!(vt, *t, "{kind} column {name}");
            }
        }
    }

    #[test]
    fn ranks() {
        assert!(state_rank(Kind::Build, "finished") > state_rank(Kind::Build, "started"));
        assert_eq!(
            state_rank(Kind::Task, "failed"),
            state_rank(Kind::Task, "succeeded")
        );
    }
}
