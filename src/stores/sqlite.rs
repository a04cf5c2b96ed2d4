//! The SQLite store: one database file, written by any number of threads and processes
//! (each with its own [`SqliteStore`]); SQLite lets one writer in at a time.
//!
//! This file owns the SQLite connection settings, the schema creation and migration
//! (`schemas/sql/sqlite.sql`), the write path, and running the shared queries of
//! `rows.rs` (SQLite's rows read through its `DbRow`):
//! - WAL journal; `synchronous=FULL` by default, so that a committed batch (after which
//!   the consumer acknowledges its messages) survives a process kill and a power loss
//!   (`NORMAL`, via `?synchronous=normal`, survives a process kill only);
//! - a busy timeout (default 30 s) for the other writers' transactions, and
//!   `BEGIN IMMEDIATE` so a writer waits for the lock up front instead of failing on
//!   a read-to-write upgrade;
//! - cached prepared statements, for writes and queries alike; one row per `execute`
//!   (SQLite runs in-process: there is no round trip to save).

use std::path::Path;
use std::time::Duration;

use rusqlite::types::{FromSql, ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, ErrorCode, Row, TransactionBehavior};

use super::rows::{self, DbRow, Dialect, Query};
use super::{
    latest_per_row, prepare, row_values, time_text, BuildDetail, BuildFilter, BuildRow, Msg, Store,
    StoreError, Table, TableCounts, Val, WriteStats, SCHEMA_VERSION, TABLES,
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
        rows::query_builds(self, f)
    }

    fn query_build(&mut self, build_id: &str) -> Result<Option<BuildDetail>, StoreError> {
        rows::query_build(self, build_id)
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

impl Query for SqliteStore {
    fn store_name(&self) -> &str {
        &self.name
    }

    fn dialect(&self) -> &'static Dialect {
        &Dialect::SQLITE
    }

    /// Through the cache of prepared statements.
    fn each_row(
        &mut self,
        action: &str,
        sql: &str,
        params: &[Val<'_>],
        each: &mut dyn FnMut(&dyn DbRow) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let fail = self.err(action);
        let mut st = self.conn.prepare_cached(sql).map_err(&fail)?;
        let values: Vec<ToSqlOutput<'_>> = params.iter().map(sql_value).collect();
        let mut rows = st
            .query(rusqlite::params_from_iter(values.iter()))
            .map_err(&fail)?;
        while let Some(row) = rows.next().map_err(&fail)? {
            each(&SqliteRow {
                row,
                store: &self.name,
                action,
            })?;
        }
        Ok(())
    }
}

/// A result row, with what its read errors name.
struct SqliteRow<'r, 's> {
    row: &'r Row<'s>,
    store: &'r str,
    action: &'r str,
}

impl SqliteRow<'_, '_> {
    fn get<T: FromSql>(&self, i: usize) -> Result<T, StoreError> {
        self.row
            .get(i)
            .map_err(|e| db_error(self.store, self.action, e))
    }
}

impl DbRow for SqliteRow<'_, '_> {
    fn text(&self, i: usize) -> Result<String, StoreError> {
        self.get(i)
    }

    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        self.get(i)
    }

    fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.get(i)
    }

    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        self.get(i)
    }

    fn opt_bool(&self, i: usize) -> Result<Option<bool>, StoreError> {
        self.get(i)
    }

    /// Stored as RFC 3339 text already.
    fn opt_time(&self, i: usize) -> Result<Option<String>, StoreError> {
        self.get(i)
    }
}
