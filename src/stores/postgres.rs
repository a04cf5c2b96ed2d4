//! The PostgreSQL store: one database shared by any number of `dsi` processes on any
//! number of machines, through the synchronous `postgres` crate (no TLS).
//!
//! This file owns the PostgreSQL connection, the schema creation and migration
//! (`schemas/sql/postgres.sql`, under an advisory lock so that processes starting
//! together do not race), the write path, and running the shared queries of `rows.rs`
//! (PostgreSQL's rows read through its `DbRow`, timestamptz as RFC 3339 text):
//! - a batch is six statements whatever its size: one multi-row
//!   `INSERT ... SELECT FROM unnest($1::text[], ...) ON CONFLICT DO NOTHING RETURNING`
//!   into `messages` (which tells the new messages), then one multi-row upsert per kind;
//! - rows are written in one global order (messages by id, then each table by key), so
//!   concurrent batches touching the same rows wait for each other instead of
//!   deadlocking; a deadlock or serialization failure that happens anyway, or a lost
//!   connection, makes the whole transaction run again (up to [`MAX_ATTEMPTS`] times,
//!   reconnecting if needed): writes are idempotent, so this is safe even when a lost
//!   connection hid whether the commit happened.
//!
//! The `postgres` crate runs a small tokio runtime of its own: call this store from a
//! plain thread, never from inside a tokio runtime.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use postgres::error::SqlState;
use postgres::types::{FromSql, ToSql};
use postgres::{Client, Config, NoTls, Row, Statement};

use super::rows::{self, DbRow, Dialect, Query};
use super::{
    latest_per_row, prepare, row_values, time_text, BuildDetail, BuildFilter, BuildRow, ColType,
    Msg, Store, StoreError, Table, TableCounts, Val, WriteStats, SCHEMA_VERSION, TABLES,
};
use crate::model::Envelope;

/// The schema migrations, in order: (version, file, script). Version 1 creates
/// everything; version 2 adds the artifact scanner's columns.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "schemas/sql/postgres.sql",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/schemas/sql/postgres.sql"
        )),
    ),
    (
        2,
        "schemas/sql/postgres-v2.sql",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/schemas/sql/postgres-v2.sql"
        )),
    ),
];

/// The advisory lock that serializes schema creation ("buildbus" in ASCII).
const SCHEMA_LOCK: i64 = 0x6275_696c_6462_7573;

/// How many times a batch is tried when it meets a deadlock, a serialization failure
/// or a lost connection.
pub const MAX_ATTEMPTS: u32 = 5;

const INSERT_MESSAGES: &str = "INSERT INTO messages \
     (message_id, entity_id, kind, build_id, state, sent, stored_at, body) \
     SELECT u.m, u.e, u.k, u.b, u.s, u.t, now(), u.body::jsonb \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::timestamptz[], $7::text[]) AS u(m, e, k, b, s, t, body) \
     ORDER BY u.m \
     ON CONFLICT (message_id) DO NOTHING \
     RETURNING message_id";

/// A multi-row upsert from one array per column, keeping the greater message.
fn upsert_sql(t: &Table) -> String {
    let cols = t.columns();
    let names: Vec<&str> = cols.iter().map(|(c, _)| *c).collect();
    let aliases: Vec<String> = (1..=cols.len()).map(|i| format!("c{i}")).collect();
    let select: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| match ty {
            ColType::Json => format!("u.c{}::jsonb", i + 1),
            _ => format!("u.c{}", i + 1),
        })
        .collect();
    let params: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| {
            let ty = match ty {
                ColType::Text | ColType::Json => "text[]",
                ColType::Int => "int8[]",
                ColType::Time => "timestamptz[]",
                ColType::Bool => "bool[]",
            };
            format!("${}::{ty}", i + 1)
        })
        .collect();
    let sets: Vec<String> = names[1..]
        .iter()
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    let table = t.name;
    let order = |r: &str| {
        format!(
            "({r}.state_rank, COALESCE({r}.\"timestamp\", '-infinity'::timestamptz), \
             {r}.message_id COLLATE \"C\")"
        )
    };
    format!(
        "INSERT INTO {table} ({}) SELECT {} FROM unnest({}) AS u({}) ORDER BY u.c1 \
         ON CONFLICT ({}) DO UPDATE SET {} WHERE {} <= {}",
        names.join(", "),
        select.join(", "),
        params.join(", "),
        aliases.join(", "),
        t.key,
        sets.join(", "),
        order(table),
        order("EXCLUDED"),
    )
}

/// One column of a multi-row statement.
enum Array<'a> {
    Text(Vec<Option<&'a str>>),
    Json(Vec<String>),
    Int(Vec<Option<i64>>),
    Time(Vec<Option<DateTime<Utc>>>),
    Bool(Vec<Option<bool>>),
}

impl<'a> Array<'a> {
    fn new(ty: ColType, n: usize) -> Array<'a> {
        match ty {
            ColType::Text => Array::Text(Vec::with_capacity(n)),
            ColType::Json => Array::Json(Vec::with_capacity(n)),
            ColType::Int => Array::Int(Vec::with_capacity(n)),
            ColType::Time => Array::Time(Vec::with_capacity(n)),
            ColType::Bool => Array::Bool(Vec::with_capacity(n)),
        }
    }

    /// Appends `v`; `false` if its type is not the column's (a bug in the column lists).
    fn push(&mut self, v: Val<'a>) -> bool {
        match (self, v) {
            (Array::Text(a), Val::Text(v)) => a.push(v),
            (Array::Json(a), Val::Json(v)) => a.push(v),
            (Array::Int(a), Val::Int(v)) => a.push(v),
            (Array::Time(a), Val::Time(v)) => a.push(v),
            (Array::Bool(a), Val::Bool(v)) => a.push(v),
            _ => return false,
        }
        true
    }

    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Array::Text(a) => a,
            Array::Json(a) => a,
            Array::Int(a) => a,
            Array::Time(a) => a,
            Array::Bool(a) => a,
        }
    }
}

/// A connection and its prepared statements.
struct Conn {
    client: Client,
    insert_messages: Statement,
    /// By kind, in [`crate::model::Kind::ALL`] order.
    upserts: Vec<Statement>,
}

/// A store in a PostgreSQL database.
pub struct PostgresStore {
    conn: Conn,
    config: Config,
    name: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("name", &self.name)
            .finish()
    }
}

/// Why one attempt at a batch failed.
enum Failure {
    /// A step failed: what was being done, and the error.
    Db(String, postgres::Error),
    /// An internal inconsistency (never retried).
    Bug(String),
}

fn step<T>(action: &str, r: Result<T, postgres::Error>) -> Result<T, Failure> {
    r.map_err(|e| Failure::Db(action.to_string(), e))
}

impl PostgresStore {
    /// Connects to `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?options]`, as
    /// libpq takes it; no TLS) and creates or migrates the schema.
    pub fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        let name = redact(url);
        let mut config: Config = url.parse().map_err(|e| StoreError::BadUrl {
            url: name.clone(),
            reason: format!("{e}"),
        })?;
        if config.get_application_name().is_none() {
            config.application_name("buildbus-dsi");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let conn = Self::open_conn(&config, &name)?;
        Ok(PostgresStore { conn, config, name })
    }

    /// `postgres://USER@HOST:PORT/DB` (no password), as errors name this store.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn open_conn(config: &Config, name: &str) -> Result<Conn, StoreError> {
        let mut client = config
            .connect(NoTls)
            .map_err(|e| db_error(name, "connecting", &e))?;
        migrate(&mut client, name)?;
        let insert_messages = client
            .prepare(INSERT_MESSAGES)
            .map_err(|e| db_error(name, "preparing insert into messages", &e))?;
        let mut upserts = Vec::with_capacity(TABLES.len());
        for t in &TABLES {
            upserts.push(
                client.prepare(&upsert_sql(t)).map_err(|e| {
                    db_error(name, &format!("preparing upsert into {}", t.name), &e)
                })?,
            );
        }
        Ok(Conn {
            client,
            insert_messages,
            upserts,
        })
    }

    fn err<'s>(&'s self, action: &'s str) -> impl Fn(postgres::Error) -> StoreError + 's {
        move |e| db_error(&self.name, action, &e)
    }
}

fn migrate(client: &mut Client, name: &str) -> Result<(), StoreError> {
    let fail = |action: &str, e: postgres::Error| db_error(name, action, &e);
    let mut tx = client
        .transaction()
        .map_err(|e| fail("BEGIN (schema)", e))?;
    tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({SCHEMA_LOCK})"))
        .map_err(|e| fail("taking the schema lock", e))?;
    let exists: bool = tx
        .query_one("SELECT to_regclass('buildbus_schema') IS NOT NULL", &[])
        .and_then(|r| r.try_get(0))
        .map_err(|e| fail("reading the schema version", e))?;
    let version: i64 = if exists {
        tx.query_one(
            "SELECT COALESCE(max(version), 0)::int8 FROM buildbus_schema",
            &[],
        )
        .and_then(|r| r.try_get(0))
        .map_err(|e| fail("reading the schema version", e))?
    } else {
        0
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            store: name.to_string(),
            found: version,
        });
    }
    for (v, file, script) in MIGRATIONS {
        if *v > version {
            tx.batch_execute(script)
                .map_err(|e| fail(&format!("creating schema version {v} ({file})"), e))?;
        }
    }
    tx.commit().map_err(|e| fail("COMMIT (schema)", e))
}

/// One attempt at writing a validated batch; the number of new messages.
fn try_write(conn: &mut Conn, msgs: &[Msg<'_>]) -> Result<usize, Failure> {
    let mut tx = step("BEGIN", conn.client.transaction())?;
    let mut sorted: Vec<&Msg<'_>> = msgs.iter().collect();
    sorted.sort_unstable_by_key(|m| m.message_id());
    let n = sorted.len();
    let (mut ids, mut entities, mut kinds, mut builds, mut states, mut sent, mut bodies) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for m in &sorted {
        let meta = &m.env.meta;
        ids.push(meta.message_id.as_str());
        entities.push(meta.entity_id.as_str());
        kinds.push(meta.kind.as_str());
        builds.push(&*m.env.payload.common().build_id);
        states.push(&*meta.state);
        sent.push(m.sent);
        bodies.push(m.body.as_str());
    }
    let inserted = step(
        "insert into messages",
        tx.query(
            &conn.insert_messages,
            &[&ids, &entities, &kinds, &builds, &states, &sent, &bodies],
        ),
    )?;
    let mut new_ids: HashSet<&str> = HashSet::with_capacity(inserted.len());
    for row in &inserted {
        new_ids.insert(step("reading new message ids", row.try_get(0))?);
    }
    let new: Vec<&Msg<'_>> = msgs
        .iter()
        .filter(|m| new_ids.contains(m.message_id()))
        .collect();
    for (i, rows) in latest_per_row(&new).iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let table = &TABLES[i];
        let mut arrays: Vec<Array<'_>> = table
            .columns()
            .iter()
            .map(|(_, ty)| Array::new(*ty, rows.len()))
            .collect();
        for m in rows {
            for (a, v) in arrays.iter_mut().zip(row_values(m)) {
                if !a.push(v) {
                    // The column lists in store/mod.rs disagree: a bug, not bad data.
                    return Err(Failure::Bug(format!(
                        "column types of {} disagree with its values",
                        table.name
                    )));
                }
            }
        }
        let params: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(Array::param).collect();
        step(
            &format!("upsert into {}", table.name),
            tx.execute(&conn.upserts[i], &params),
        )?;
    }
    step("COMMIT", tx.commit())?;
    Ok(new.len())
}

/// Whether running the transaction again may succeed.
fn is_conflict(e: &postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

fn db_error(store: &str, action: &str, e: &postgres::Error) -> StoreError {
    let transient = is_conflict(e)
        || e.is_closed()
        || e.as_db_error().is_none()
        || matches!(
            e.code(),
            Some(c) if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::TOO_MANY_CONNECTIONS
                || *c == SqlState::LOCK_NOT_AVAILABLE
                || *c == SqlState::QUERY_CANCELED
        );
    let reason = match e.as_db_error() {
        Some(db) => {
            let mut r = format!(
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
            if let Some(d) = db.detail() {
                r.push_str(&format!("; detail: {d}"));
            }
            if let Some(w) = db.where_() {
                r.push_str(&format!("; where: {w}"));
            }
            r
        }
        None => {
            let mut r = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                r.push_str(&format!(": {s}"));
                src = s.source();
            }
            r
        }
    };
    StoreError::Db {
        store: store.to_string(),
        action: action.to_string(),
        reason,
        transient,
    }
}

/// The URL without its password.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

impl Store for PostgresStore {
    fn write_batch(&mut self, batch: &[Envelope]) -> Result<WriteStats, StoreError> {
        let prepared = prepare(&self.name, batch)?;
        if prepared.msgs.is_empty() {
            return Ok(WriteStats {
                new_messages: 0,
                duplicates: prepared.repeated,
            });
        }
        let mut attempt = 1;
        loop {
            let (action, e) = match try_write(&mut self.conn, &prepared.msgs) {
                Ok(new) => {
                    return Ok(WriteStats {
                        new_messages: new as u64,
                        duplicates: (batch.len() - new) as u64,
                    })
                }
                Err(Failure::Db(action, e)) => (action, e),
                Err(Failure::Bug(reason)) => {
                    return Err(StoreError::Db {
                        store: self.name.clone(),
                        action: "binding values".to_string(),
                        reason: format!("internal error: {reason}"),
                        transient: false,
                    })
                }
            };
            let lost = self.conn.client.is_closed();
            if attempt >= MAX_ATTEMPTS || !(is_conflict(&e) || lost) {
                let mut err = db_error(&self.name, &action, &e);
                if let StoreError::Db { reason, .. } = &mut err {
                    if attempt > 1 {
                        reason.push_str(&format!(" (after {attempt} attempts)"));
                    }
                }
                return Err(err);
            }
            tracing::debug!(store = %self.name, attempt, %action, error = %e, "retrying batch");
            // Back off a little, more each time, with jitter so that colliding writers
            // do not collide again.
            let jitter = u64::from(std::process::id() ^ (attempt * 7919)) % 20;
            std::thread::sleep(Duration::from_millis(
                10 * u64::from(attempt) * u64::from(attempt) + jitter,
            ));
            if lost {
                self.conn = Self::open_conn(&self.config, &self.name)?;
            }
            attempt += 1;
        }
    }

    fn query_builds(&mut self, f: &BuildFilter) -> Result<Vec<BuildRow>, StoreError> {
        rows::query_builds(self, f)
    }

    fn query_build(&mut self, build_id: &str) -> Result<Option<BuildDetail>, StoreError> {
        rows::query_build(self, build_id)
    }

    fn counts(&mut self) -> Result<TableCounts, StoreError> {
        let r = self
            .conn
            .client
            .query_one(
                "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM builds), \
                 (SELECT count(*) FROM tasks), (SELECT count(*) FROM tests), \
                 (SELECT count(*) FROM artifacts), (SELECT count(*) FROM logs)",
                &[],
            )
            .map_err(self.err("count rows"))?;
        let n = |i: usize| r.try_get::<_, i64>(i).map(|n| n as u64);
        (|| {
            Ok(TableCounts {
                messages: n(0)?,
                builds: n(1)?,
                tasks: n(2)?,
                tests: n(3)?,
                artifacts: n(4)?,
                logs: n(5)?,
            })
        })()
        .map_err(self.err("count rows"))
    }
}

impl Query for PostgresStore {
    fn store_name(&self) -> &str {
        &self.name
    }

    fn dialect(&self) -> &'static Dialect {
        &Dialect::POSTGRES
    }

    /// Fetches every row before the first is handed over.
    fn each_row(
        &mut self,
        action: &str,
        sql: &str,
        params: &[Val<'_>],
        each: &mut dyn FnMut(&dyn DbRow) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(scalar).collect();
        let rows = self
            .conn
            .client
            .query(sql, &params)
            .map_err(|e| db_error(&self.name, action, &e))?;
        for row in &rows {
            each(&PgRow {
                row,
                store: &self.name,
                action,
            })?;
        }
        Ok(())
    }
}

/// One value as a statement parameter.
fn scalar<'v>(v: &'v Val<'_>) -> &'v (dyn ToSql + Sync) {
    match v {
        Val::Text(v) => v,
        Val::Json(v) => v,
        Val::Int(v) => v,
        Val::Time(v) => v,
        Val::Bool(v) => v,
    }
}

/// A result row, with what its read errors name.
struct PgRow<'r> {
    row: &'r Row,
    store: &'r str,
    action: &'r str,
}

impl PgRow<'_> {
    fn get<'a, T: FromSql<'a>>(&'a self, i: usize) -> Result<T, StoreError> {
        self.row
            .try_get(i)
            .map_err(|e| db_error(self.store, self.action, &e))
    }
}

impl DbRow for PgRow<'_> {
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

    /// A timestamptz, as text.
    fn opt_time(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.get::<Option<DateTime<Utc>>>(i)?.map(|t| time_text(&t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u@h:5432/db?x=1"
        );
        assert_eq!(redact("postgresql://u@h/db"), "postgresql://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
