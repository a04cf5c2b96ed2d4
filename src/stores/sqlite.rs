//! The SQLite store: one database file, written by any number of threads and processes
//! (each with its own [`SqliteStore`]); SQLite lets one writer in at a time.
//!
//! This file owns the SQLite connection settings, the schema creation and migration
//! (`schemas/sql/sqlite.sql`), the write path and the queries:
//! - WAL journal; `synchronous=FULL` by default, so that a committed batch (after which
//!   the consumer acknowledges its messages) survives a process kill and a power loss
//!   (`NORMAL`, via `?synchronous=normal`, survives a process kill only);
//! - a busy timeout (default 30 s) for the other writers' transactions, and
//!   `BEGIN IMMEDIATE` so a writer waits for the lock up front instead of failing on
//!   a read-to-write upgrade;
//! - cached prepared statements, one row per `execute` (SQLite runs in-process: there is
//!   no round trip to save).

use std::path::Path;
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior};

use super::{
    build_json_cols, from_json_col, latest_per_row, prepare, row_values, time_text, ArtifactRow,
    BuildDetail, BuildFilter, BuildRow, LogRow, Msg, Store, StoreError, Table, TableCounts,
    TaskRow, TestRow, Val, WriteStats, FAILED_OUTCOMES, SCHEMA_VERSION, TABLES,
};
use crate::model::Envelope;

/// The schema migrations, in order: (version, file, script). Version 1 creates
/// everything; version 2 adds the artifact scanner's columns.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "schemas/sql/sqlite.sql",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/schemas/sql/sqlite.sql"
        )),
    ),
    (
        2,
        "schemas/sql/sqlite-v2.sql",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/schemas/sql/sqlite-v2.sql"
        )),
    ),
];

/// SQLite's `synchronous` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Every commit is on disk before it returns: survives a power loss.
    #[default]
    Full,
    /// A commit survives a crash of the process, not of the machine.
    Normal,
}

impl Synchronous {
    fn as_str(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// Connection settings of a [`SqliteStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    pub synchronous: Synchronous,
    /// How long a writer waits for another's transaction before failing (transient).
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(30),
        }
    }
}

const INSERT_MESSAGE: &str = "INSERT INTO messages \
     (message_id, entity_id, kind, build_id, state, sent, stored_at, body) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (message_id) DO NOTHING";

/// `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE <held message> <= <new message>`.
fn upsert_sql(t: &Table) -> String {
    let cols: Vec<&str> = t.columns().into_iter().map(|(c, _)| c).collect();
    let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
    let sets: Vec<String> = cols[1..]
        .iter()
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    let table = t.name;
    format!(
        "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {} \
         WHERE ({table}.state_rank, COALESCE({table}.\"timestamp\", ''), {table}.message_id) \
         <= (excluded.state_rank, COALESCE(excluded.\"timestamp\", ''), excluded.message_id)",
        cols.join(", "),
        placeholders.join(", "),
        t.key,
        sets.join(", "),
    )
}

/// A store in one SQLite file.
pub struct SqliteStore {
    conn: Connection,
    name: String,
    /// Upserts by kind, in [`crate::model::Kind::ALL`] order.
    upserts: [String; 5],
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("name", &self.name)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` and creates or migrates
    /// its schema.
    pub fn open(path: &Path, options: &SqliteOptions) -> Result<SqliteStore, StoreError> {
        let name = format!("sqlite:{}", path.display());
        let fail = |action: &str| {
            let name = name.clone();
            let action = action.to_string();
            move |e: rusqlite::Error| db_error(&name, &action, e)
        };
        let conn = Connection::open(path).map_err(fail("opening the database file"))?;
        conn.busy_timeout(options.busy_timeout)
            .map_err(fail("setting the busy timeout"))?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .map_err(fail("PRAGMA journal_mode = WAL"))?;
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {}; PRAGMA cache_size = -16384; PRAGMA temp_store = MEMORY;",
            options.synchronous.as_str()
        ))
        .map_err(fail("setting PRAGMA synchronous"))?;
        conn.set_prepared_statement_cache_capacity(64);
        let mut store = SqliteStore {
            conn,
            name,
            upserts: TABLES.each_ref().map(upsert_sql),
        };
        store.migrate()?;
        Ok(store)
    }

    /// `sqlite:PATH`, as errors name this store.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, action: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        let action = action.to_string();
        move |e| db_error(&self.name, &action, e)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let name = self.name.clone();
        let fail = |action: &str| {
            let name = name.clone();
            let action = action.to_string();
            move |e: rusqlite::Error| db_error(&name, &action, e)
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail("BEGIN IMMEDIATE (schema)"))?;
        let exists: i64 = tx
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'buildbus_schema'",
                [],
                |r| r.get(0),
            )
            .map_err(fail("reading the schema version"))?;
        let version: i64 = if exists > 0 {
            tx.query_row(
                "SELECT COALESCE(max(version), 0) FROM buildbus_schema",
                [],
                |r| r.get(0),
            )
            .map_err(fail("reading the schema version"))?
        } else {
            0
        };
        if version > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                store: name,
                found: version,
            });
        }
        for (v, file, script) in MIGRATIONS {
            if *v > version {
                tx.execute_batch(script)
                    .map_err(fail(&format!("creating schema version {v} ({file})")))?;
            }
        }
        tx.commit().map_err(fail("COMMIT (schema)"))
    }
}

fn db_error(store: &str, action: &str, e: rusqlite::Error) -> StoreError {
    let transient = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    StoreError::Db {
        store: store.to_string(),
        action: action.to_string(),
        reason: e.to_string(),
        transient,
    }
}

/// A bound value, borrowed from the message where possible.
fn sql_value<'m>(v: &Val<'m>) -> ToSqlOutput<'m> {
    match v {
        Val::Text(Some(s)) => {
            let s: &'m str = s;
            ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()))
        }
        Val::Json(s) => ToSqlOutput::Owned(Value::Text(s.clone())),
        Val::Int(Some(i)) => ToSqlOutput::Owned(Value::Integer(*i)),
        Val::Time(Some(t)) => ToSqlOutput::Owned(Value::Text(time_text(t))),
        Val::Bool(Some(b)) => ToSqlOutput::Owned(Value::Integer(i64::from(*b))),
        Val::Text(None) | Val::Int(None) | Val::Time(None) | Val::Bool(None) => {
            ToSqlOutput::Owned(Value::Null)
        }
    }
}

const BUILD_SELECT: &str = "SELECT build_id, system, state, result, tree, platform, buildtype, \
     product, revision, branch, tags, targets, command, started_at, finished_at, duration_ms, \
     exit_code, builder_host, builder_user, counts, tool_version, failure, metadata, \
     \"timestamp\", entity_id, message_id FROM builds";

fn build_row(store: &str, r: &Row<'_>) -> rusqlite::Result<Result<BuildRow, StoreError>> {
    let build_id: String = r.get(0)?;
    let cols: [String; 4] = [r.get(10)?, r.get(11)?, r.get(19)?, r.get(22)?];
    let parsed = build_json_cols(store, &build_id, cols.each_ref().map(String::as_str));
    let (tags, targets, counts, metadata) = match parsed {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(BuildRow {
        system: r.get(1)?,
        state: r.get(2)?,
        result: r.get(3)?,
        tree: r.get(4)?,
        platform: r.get(5)?,
        buildtype: r.get(6)?,
        product: r.get(7)?,
        revision: r.get(8)?,
        branch: r.get(9)?,
        tags,
        targets,
        command: r.get(12)?,
        started_at: r.get(13)?,
        finished_at: r.get(14)?,
        duration_ms: r.get(15)?,
        exit_code: r.get(16)?,
        builder_host: r.get(17)?,
        builder_user: r.get(18)?,
        counts,
        tool_version: r.get(20)?,
        failure: r.get(21)?,
        metadata,
        timestamp: r.get(23)?,
        entity_id: r.get(24)?,
        message_id: r.get(25)?,
        build_id,
    }))
}

impl Store for SqliteStore {
    fn write_batch(&mut self, batch: &[Envelope]) -> Result<WriteStats, StoreError> {
        let prepared = prepare(&self.name, batch)?;
        if prepared.msgs.is_empty() {
            return Ok(WriteStats {
                new_messages: 0,
                duplicates: prepared.repeated,
            });
        }
        let stored_at = time_text(&chrono::Utc::now());
        let name = self.name.clone();
        let fail = |action: &str| {
            let name = name.clone();
            let action = action.to_string();
            move |e: rusqlite::Error| db_error(&name, &action, e)
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail("BEGIN IMMEDIATE"))?;
        let mut new: Vec<&Msg<'_>> = Vec::with_capacity(prepared.msgs.len());
        {
            let mut insert = tx
                .prepare_cached(INSERT_MESSAGE)
                .map_err(fail("preparing insert into messages"))?;
            for m in &prepared.msgs {
                let meta = &m.env.meta;
                let inserted = insert
                    .execute(rusqlite::params![
                        meta.message_id,
                        meta.entity_id,
                        meta.kind.as_str(),
                        m.env.payload.common().build_id,
                        meta.state,
                        m.sent.as_ref().map(time_text),
                        stored_at,
                        m.body,
                    ])
                    .map_err(fail(&format!("insert into messages ({})", meta.message_id)))?;
                if inserted == 1 {
                    new.push(m);
                }
            }
        }
        for (i, rows) in latest_per_row(&new).iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let mut upsert = tx
                .prepare_cached(&self.upserts[i])
                .map_err(fail(&format!("preparing upsert into {}", TABLES[i].name)))?;
            for m in rows {
                let values: Vec<ToSqlOutput<'_>> = row_values(m).iter().map(sql_value).collect();
                upsert
                    .execute(rusqlite::params_from_iter(values.iter()))
                    .map_err(fail(&format!(
                        "upsert into {} (message {})",
                        TABLES[i].name,
                        m.message_id()
                    )))?;
            }
        }
        tx.commit().map_err(fail("COMMIT"))?;
        Ok(WriteStats {
            new_messages: new.len() as u64,
            duplicates: (batch.len() - new.len()) as u64,
        })
    }

    fn query_builds(&mut self, f: &BuildFilter) -> Result<Vec<BuildRow>, StoreError> {
        let mut sql = String::from(BUILD_SELECT);
        let mut params: Vec<Value> = Vec::new();
        let mut clauses: Vec<String> = Vec::new();
        for (col, v) in [
            ("tree", &f.tree),
            ("platform", &f.platform),
            ("buildtype", &f.buildtype),
            ("result", &f.result),
        ] {
            if let Some(v) = v {
                params.push(Value::Text(v.clone()));
                clauses.push(format!("{col} = ?{}", params.len()));
            }
        }
        if let Some(since) = &f.since {
            params.push(Value::Text(time_text(since)));
            clauses.push(format!("started_at >= ?{}", params.len()));
        }
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(" ORDER BY started_at DESC, build_id");
        if let Some(limit) = f.limit {
            params.push(Value::Integer(i64::from(limit)));
            sql.push_str(&format!(" LIMIT ?{}", params.len()));
        }
        let fail = self.err("query builds");
        let mut st = self.conn.prepare_cached(&sql).map_err(&fail)?;
        let rows = st
            .query_map(rusqlite::params_from_iter(params.iter()), |r| {
                build_row(&self.name, r)
            })
            .map_err(&fail)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(&fail)??);
        }
        Ok(out)
    }

    fn query_build(&mut self, build_id: &str) -> Result<Option<BuildDetail>, StoreError> {
        let name = self.name.as_str();
        let fail = |action: &'static str| move |e| db_error(name, action, e);
        let conn = &self.conn;
        let build = conn
            .prepare_cached(&format!("{BUILD_SELECT} WHERE build_id = ?1"))
            .and_then(|mut st| st.query_row([build_id], |r| build_row(name, r)).optional())
            .map_err(fail("query build"))?
            .transpose()?;

        let mut task_counts = std::collections::BTreeMap::new();
        {
            let mut st = conn
                .prepare_cached(
                    "SELECT outcome, count(*) FROM tasks WHERE build_id = ?1 GROUP BY outcome",
                )
                .map_err(fail("count tasks"))?;
            let rows = st
                .query_map([build_id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(fail("count tasks"))?;
            for row in rows {
                let (outcome, n) = row.map_err(fail("count tasks"))?;
                task_counts.insert(outcome, n as u64);
            }
        }

        let failed_tasks = collect(
            conn,
            &format!(
                "SELECT entity_id, build_id, target, task, outcome, sstate_result, started_at, \
                 finished_at, elapsed_ms, exit_code, logfile, target_kind, failure, \"timestamp\", \
                 message_id FROM tasks WHERE build_id = ?1 AND outcome IN ('{}') \
                 ORDER BY target, task, entity_id",
                FAILED_OUTCOMES.join("', '")
            ),
            build_id,
            |r| {
                Ok(Ok(TaskRow {
                    entity_id: r.get(0)?,
                    build_id: r.get(1)?,
                    target: r.get(2)?,
                    task: r.get(3)?,
                    outcome: r.get(4)?,
                    sstate_result: r.get(5)?,
                    started_at: r.get(6)?,
                    finished_at: r.get(7)?,
                    elapsed_ms: r.get(8)?,
                    exit_code: r.get(9)?,
                    logfile: r.get(10)?,
                    target_kind: r.get(11)?,
                    failure: r.get(12)?,
                    timestamp: r.get(13)?,
                    message_id: r.get(14)?,
                }))
            },
        )
        .map_err(fail("query failed tasks"))??;

        let tests = collect(
            conn,
            "SELECT entity_id, build_id, test, scope, status, attempt, shard, run, \
             total_attempts, total_shards, duration_ms, cached, logurl, strategy, \"timestamp\", \
             message_id FROM tests WHERE build_id = ?1 \
             ORDER BY test, scope <> 'summary', run, shard, attempt, entity_id",
            build_id,
            |r| {
                Ok(Ok(TestRow {
                    entity_id: r.get(0)?,
                    build_id: r.get(1)?,
                    test: r.get(2)?,
                    scope: r.get(3)?,
                    status: r.get(4)?,
                    attempt: r.get(5)?,
                    shard: r.get(6)?,
                    run: r.get(7)?,
                    total_attempts: r.get(8)?,
                    total_shards: r.get(9)?,
                    duration_ms: r.get(10)?,
                    cached: r.get(11)?,
                    logurl: r.get(12)?,
                    strategy: r.get(13)?,
                    timestamp: r.get(14)?,
                    message_id: r.get(15)?,
                }))
            },
        )
        .map_err(fail("query tests"))??;

        let artifacts = collect(
            conn,
            "SELECT entity_id, build_id, path, uri, kind, size, sha256, target, fields, \
             \"timestamp\", message_id, mtime, symlink_target FROM artifacts WHERE build_id = ?1 \
             ORDER BY path, entity_id",
            build_id,
            |r| {
                let entity_id: String = r.get(0)?;
                let fields: String = r.get(8)?;
                let fields = match from_json_col(name, "artifacts", &entity_id, "fields", &fields) {
                    Ok(f) => f,
                    Err(e) => return Ok(Err(e)),
                };
                Ok(Ok(ArtifactRow {
                    entity_id,
                    build_id: r.get(1)?,
                    path: r.get(2)?,
                    uri: r.get(3)?,
                    kind: r.get(4)?,
                    size: r.get(5)?,
                    sha256: r.get(6)?,
                    target: r.get(7)?,
                    fields,
                    mtime: r.get(11)?,
                    symlink_target: r.get(12)?,
                    timestamp: r.get(9)?,
                    message_id: r.get(10)?,
                }))
            },
        )
        .map_err(fail("query artifacts"))??;

        let logs = collect(
            conn,
            "SELECT entity_id, build_id, level, message, target, task, \"timestamp\", message_id \
             FROM logs WHERE build_id = ?1 ORDER BY \"timestamp\", level, message, entity_id",
            build_id,
            |r| {
                Ok(Ok(LogRow {
                    entity_id: r.get(0)?,
                    build_id: r.get(1)?,
                    level: r.get(2)?,
                    message: r.get(3)?,
                    target: r.get(4)?,
                    task: r.get(5)?,
                    timestamp: r.get(6)?,
                    message_id: r.get(7)?,
                }))
            },
        )
        .map_err(fail("query logs"))??;

        Ok(BuildDetail {
            build_id: build_id.to_string(),
            build,
            task_counts,
            failed_tasks,
            tests,
            artifacts,
            logs,
        }
        .unless_empty())
    }

    fn counts(&mut self) -> Result<TableCounts, StoreError> {
        let fail = self.err("count rows");
        self.conn
            .query_row(
                "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM builds), \
                 (SELECT count(*) FROM tasks), (SELECT count(*) FROM tests), \
                 (SELECT count(*) FROM artifacts), (SELECT count(*) FROM logs)",
                [],
                |r| {
                    let n = |i| r.get::<_, i64>(i).map(|n| n as u64);
                    Ok(TableCounts {
                        messages: n(0)?,
                        builds: n(1)?,
                        tasks: n(2)?,
                        tests: n(3)?,
                        artifacts: n(4)?,
                        logs: n(5)?,
                    })
                },
            )
            .map_err(fail)
    }
}

/// Runs `sql` with `build_id` as `?1` and maps every row.
fn collect<T>(
    conn: &Connection,
    sql: &str,
    build_id: &str,
    map: impl FnMut(&Row<'_>) -> rusqlite::Result<Result<T, StoreError>>,
) -> rusqlite::Result<Result<Vec<T>, StoreError>> {
    let mut st = conn.prepare_cached(sql)?;
    let rows = st.query_map([build_id], map)?;
    let mut out = Vec::new();
    for row in rows {
        match row? {
            Ok(v) => out.push(v),
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Ok(out))
}
