//! The PostgreSQL store: one database shared by any number of `dsi` processes on any
//! number of machines, through the synchronous `postgres` crate (no TLS).
//!
//! This file owns the PostgreSQL connection, the schema creation and migration
//! (`schemas/sql/postgres.sql`, under an advisory lock so that processes starting
//! together do not race), the write path and the queries:
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

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Row, Statement};

use super::{
    build_json_cols, from_json_col, latest_per_row, prepare, row_values, time_text, ArtifactRow,
    BuildDetail, BuildFilter, BuildRow, ColType, LogRow, Msg, Store, StoreError, Table,
    TableCounts, TaskRow, TestRow, Val, WriteStats, FAILED_OUTCOMES, SCHEMA_VERSION, TABLES,
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

fn time_col(r: &Row, i: usize) -> Result<Option<String>, postgres::Error> {
    Ok(r.try_get::<_, Option<DateTime<Utc>>>(i)?
        .map(|t| time_text(&t)))
}

const BUILD_SELECT: &str = "SELECT build_id, system, state, result, tree, platform, buildtype, \
     product, revision, branch, tags::text, targets::text, command, started_at, finished_at, \
     duration_ms, exit_code, builder_host, builder_user, counts::text, tool_version, failure, \
     metadata::text, \"timestamp\", entity_id, message_id FROM builds";

fn build_row(store: &str, r: &Row) -> Result<Result<BuildRow, StoreError>, postgres::Error> {
    let build_id: String = r.try_get(0)?;
    let cols: [String; 4] = [
        r.try_get(10)?,
        r.try_get(11)?,
        r.try_get(19)?,
        r.try_get(22)?,
    ];
    let parsed = build_json_cols(store, &build_id, cols.each_ref().map(String::as_str));
    let (tags, targets, counts, metadata) = match parsed {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(BuildRow {
        system: r.try_get(1)?,
        state: r.try_get(2)?,
        result: r.try_get(3)?,
        tree: r.try_get(4)?,
        platform: r.try_get(5)?,
        buildtype: r.try_get(6)?,
        product: r.try_get(7)?,
        revision: r.try_get(8)?,
        branch: r.try_get(9)?,
        tags,
        targets,
        command: r.try_get(12)?,
        started_at: time_col(r, 13)?,
        finished_at: time_col(r, 14)?,
        duration_ms: r.try_get(15)?,
        exit_code: r.try_get(16)?,
        builder_host: r.try_get(17)?,
        builder_user: r.try_get(18)?,
        counts,
        tool_version: r.try_get(20)?,
        failure: r.try_get(21)?,
        metadata,
        timestamp: time_col(r, 23)?,
        entity_id: r.try_get(24)?,
        message_id: r.try_get(25)?,
        build_id,
    }))
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
        let mut sql = String::from(BUILD_SELECT);
        let mut texts: Vec<&str> = Vec::new();
        let mut clauses: Vec<String> = Vec::new();
        let mut n = 0;
        for (col, v) in [
            ("tree", &f.tree),
            ("platform", &f.platform),
            ("buildtype", &f.buildtype),
            ("result", &f.result),
        ] {
            if let Some(v) = v {
                texts.push(v);
                n += 1;
                clauses.push(format!("{col} = ${n}"));
            }
        }
        let mut params: Vec<&(dyn ToSql + Sync)> =
            texts.iter().map(|t| t as &(dyn ToSql + Sync)).collect();
        if let Some(since) = &f.since {
            n += 1;
            clauses.push(format!("started_at >= ${n}"));
            params.push(since);
        }
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(" ORDER BY started_at DESC NULLS LAST, build_id");
        let limit = f.limit.map(i64::from);
        if let Some(limit) = &limit {
            n += 1;
            sql.push_str(&format!(" LIMIT ${n}"));
            params.push(limit);
        }
        let rows = self
            .conn
            .client
            .query(&sql, &params)
            .map_err(self.err("query builds"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(build_row(&self.name, r).map_err(self.err("query builds"))??);
        }
        Ok(out)
    }

    fn query_build(&mut self, build_id: &str) -> Result<Option<BuildDetail>, StoreError> {
        let name = self.name.clone();
        let fail = |action: &'static str| {
            let name = name.clone();
            move |e: postgres::Error| db_error(&name, action, &e)
        };
        let client = &mut self.conn.client;
        let build = match client
            .query_opt(&format!("{BUILD_SELECT} WHERE build_id = $1"), &[&build_id])
            .map_err(fail("query build"))?
        {
            Some(r) => Some(build_row(&name, &r).map_err(fail("query build"))??),
            None => None,
        };

        let mut task_counts = BTreeMap::new();
        for r in client
            .query(
                "SELECT outcome, count(*) FROM tasks WHERE build_id = $1 GROUP BY outcome",
                &[&build_id],
            )
            .map_err(fail("count tasks"))?
        {
            let outcome: String = r.try_get(0).map_err(fail("count tasks"))?;
            let n: i64 = r.try_get(1).map_err(fail("count tasks"))?;
            task_counts.insert(outcome, n as u64);
        }

        let sql = format!(
            "SELECT entity_id, build_id, target, task, outcome, sstate_result, started_at, \
             finished_at, elapsed_ms, exit_code, logfile, target_kind, failure, \"timestamp\", \
             message_id FROM tasks WHERE build_id = $1 AND outcome IN ('{}') \
             ORDER BY target COLLATE \"C\", task COLLATE \"C\", entity_id COLLATE \"C\"",
            FAILED_OUTCOMES.join("', '")
        );
        let mut failed_tasks = Vec::new();
        for r in client
            .query(&sql, &[&build_id])
            .map_err(fail("query failed tasks"))?
        {
            let row = (|| {
                Ok::<_, postgres::Error>(TaskRow {
                    entity_id: r.try_get(0)?,
                    build_id: r.try_get(1)?,
                    target: r.try_get(2)?,
                    task: r.try_get(3)?,
                    outcome: r.try_get(4)?,
                    sstate_result: r.try_get(5)?,
                    started_at: time_col(&r, 6)?,
                    finished_at: time_col(&r, 7)?,
                    elapsed_ms: r.try_get(8)?,
                    exit_code: r.try_get(9)?,
                    logfile: r.try_get(10)?,
                    target_kind: r.try_get(11)?,
                    failure: r.try_get(12)?,
                    timestamp: time_col(&r, 13)?,
                    message_id: r.try_get(14)?,
                })
            })()
            .map_err(fail("query failed tasks"))?;
            failed_tasks.push(row);
        }

        let mut tests = Vec::new();
        for r in client
            .query(
                "SELECT entity_id, build_id, test, scope, status, attempt, shard, run, \
                 total_attempts, total_shards, duration_ms, cached, logurl, strategy, \
                 \"timestamp\", message_id FROM tests WHERE build_id = $1 \
                 ORDER BY test COLLATE \"C\", scope <> 'summary', run, shard, attempt, \
                 entity_id COLLATE \"C\"",
                &[&build_id],
            )
            .map_err(fail("query tests"))?
        {
            let row = (|| {
                Ok::<_, postgres::Error>(TestRow {
                    entity_id: r.try_get(0)?,
                    build_id: r.try_get(1)?,
                    test: r.try_get(2)?,
                    scope: r.try_get(3)?,
                    status: r.try_get(4)?,
                    attempt: r.try_get(5)?,
                    shard: r.try_get(6)?,
                    run: r.try_get(7)?,
                    total_attempts: r.try_get(8)?,
                    total_shards: r.try_get(9)?,
                    duration_ms: r.try_get(10)?,
                    cached: r.try_get(11)?,
                    logurl: r.try_get(12)?,
                    strategy: r.try_get(13)?,
                    timestamp: time_col(&r, 14)?,
                    message_id: r.try_get(15)?,
                })
            })()
            .map_err(fail("query tests"))?;
            tests.push(row);
        }

        let mut artifacts = Vec::new();
        for r in client
            .query(
                "SELECT entity_id, build_id, path, uri, kind, size, sha256, target, \
                 fields::text, \"timestamp\", message_id, mtime, symlink_target \
                 FROM artifacts WHERE build_id = $1 \
                 ORDER BY path COLLATE \"C\", entity_id COLLATE \"C\"",
                &[&build_id],
            )
            .map_err(fail("query artifacts"))?
        {
            let (row, fields) = (|| {
                let fields: String = r.try_get(8)?;
                Ok::<_, postgres::Error>((
                    ArtifactRow {
                        entity_id: r.try_get(0)?,
                        build_id: r.try_get(1)?,
                        path: r.try_get(2)?,
                        uri: r.try_get(3)?,
                        kind: r.try_get(4)?,
                        size: r.try_get(5)?,
                        sha256: r.try_get(6)?,
                        target: r.try_get(7)?,
                        fields: BTreeMap::new(),
                        mtime: time_col(&r, 11)?,
                        symlink_target: r.try_get(12)?,
                        timestamp: time_col(&r, 9)?,
                        message_id: r.try_get(10)?,
                    },
                    fields,
                ))
            })()
            .map_err(fail("query artifacts"))?;
            let fields = from_json_col(&name, "artifacts", &row.entity_id, "fields", &fields)?;
            artifacts.push(ArtifactRow { fields, ..row });
        }

        let mut logs = Vec::new();
        for r in client
            .query(
                "SELECT entity_id, build_id, level, message, target, task, \"timestamp\", \
                 message_id FROM logs WHERE build_id = $1 \
                 ORDER BY \"timestamp\", level COLLATE \"C\", message COLLATE \"C\", \
                 entity_id COLLATE \"C\"",
                &[&build_id],
            )
            .map_err(fail("query logs"))?
        {
            let row = (|| {
                Ok::<_, postgres::Error>(LogRow {
                    entity_id: r.try_get(0)?,
                    build_id: r.try_get(1)?,
                    level: r.try_get(2)?,
                    message: r.try_get(3)?,
                    target: r.try_get(4)?,
                    task: r.try_get(5)?,
                    timestamp: time_col(&r, 6)?,
                    message_id: r.try_get(7)?,
                })
            })()
            .map_err(fail("query logs"))?;
            logs.push(row);
        }

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
