//! Reading stored rows back, the same for every back end: the SELECTs behind
//! [`Store::query_builds`](super::Store::query_builds) and
//! [`Store::query_build`](super::Store::query_build), and the mapping of a result row to
//! [`BuildRow`], [`TaskRow`], [`TestRow`], [`ArtifactRow`] and [`LogRow`].
//!
//! A back end takes part through two small traits:
//! - [`Query`]: run this SQL with these parameters and hand over each row, in order;
//!   a database failure (also while reading a column) is a [`StoreError::Db`] that names
//!   the action the query was for;
//! - [`DbRow`]: read column `i` of a row as text, an integer, a boolean or a timestamp
//!   (given back as RFC 3339 text, however the database stores it).
//!
//! What the back ends spell differently in these SELECTs is a [`Dialect`]: parameter
//! placeholders (`?1` / `$1`), reading jsonb as text, and the byte-wise collation and
//! NULL order that PostgreSQL must be told and SQLite does by default. Where a SELECT
//! does not tell them, the orders of the two back ends may differ: PostgreSQL sorts the
//! builds list's `build_id` tie-break by the database's collation, and NULL `run`,
//! `shard`, `attempt` (tests) and `timestamp` (logs) after the values, SQLite before.
//! A JSON column that does not parse is a [`StoreError::Corrupt`] naming the row and
//! column.

use std::collections::BTreeMap;

use super::{
    ArtifactRow, BuildDetail, BuildFilter, BuildRow, LogRow, StoreError, TaskRow, TestRow, Val,
};

/// Outcomes that [`BuildDetail::failed_tasks`] lists.
const FAILED_OUTCOMES: [&str; 2] = ["failed", "not_executed"];

/// How one back end spells the parts of the shared SELECTs that differ.
pub(crate) struct Dialect {
    /// Before a parameter's number: `?` or `$`.
    placeholder: char,
    /// After a JSON column, to read it as text (`::text` for jsonb).
    json_text: &'static str,
    /// After a text column of an ORDER BY, to sort it byte-wise whatever the database's
    /// collation.
    collate: &'static str,
    /// After the `DESC` of builds' `started_at`, to list builds without a start last.
    nulls_last: &'static str,
}

impl Dialect {
    /// SQLite: JSON is stored as text, text sorts byte-wise, NULL sorts before every
    /// value (so last when descending).
    pub const SQLITE: Dialect = Dialect {
        placeholder: '?',
        json_text: "",
        collate: "",
        nulls_last: "",
    };

    /// PostgreSQL: JSON is jsonb, text sorts by the database's collation, NULL sorts
    /// after every value.
    pub const POSTGRES: Dialect = Dialect {
        placeholder: '$',
        json_text: "::text",
        collate: " COLLATE \"C\"",
        nulls_last: " NULLS LAST",
    };

    /// The placeholder of parameter `n` (from 1).
    fn param(&self, n: usize) -> String {
        format!("{}{n}", self.placeholder)
    }
}

/// One result row of a back end. Every accessor fails with a [`StoreError::Db`] when
/// the column is missing or holds another type (NULL where a value is required).
pub(crate) trait DbRow {
    fn text(&self, i: usize) -> Result<String, StoreError>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError>;
    fn int(&self, i: usize) -> Result<i64, StoreError>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError>;
    fn opt_bool(&self, i: usize) -> Result<Option<bool>, StoreError>;
    /// A timestamp as RFC 3339 text in UTC with milliseconds (see [`super::time_text`]).
    fn opt_time(&self, i: usize) -> Result<Option<String>, StoreError>;
}

/// A back end's way to run the shared queries.
pub(crate) trait Query {
    /// The store's name, as errors name it.
    fn store_name(&self) -> &str;
    fn dialect(&self) -> &'static Dialect;
    /// Runs `sql` with `params` bound to its placeholders and calls `each` on every row,
    /// in order, stopping at the first error. A failure of the database is a
    /// [`StoreError::Db`] whose action is `action`.
    fn each_row(
        &mut self,
        action: &str,
        sql: &str,
        params: &[Val<'_>],
        each: &mut dyn FnMut(&dyn DbRow) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
}

/// Runs `sql` with `params` and maps every row.
fn collect<T>(
    q: &mut dyn Query,
    action: &str,
    sql: &str,
    params: &[Val<'_>],
    map: impl Fn(&dyn DbRow) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    q.each_row(action, sql, params, &mut |r| {
        out.push(map(r)?);
        Ok(())
    })?;
    Ok(out)
}

/// The builds matching `f`, latest `started_at` first (see
/// [`Store::query_builds`](super::Store::query_builds)).
pub(crate) fn query_builds(
    q: &mut dyn Query,
    f: &BuildFilter,
) -> Result<Vec<BuildRow>, StoreError> {
    let d = q.dialect();
    let mut sql = build_select(d);
    let mut params: Vec<Val<'_>> = Vec::new();
    let mut clauses: Vec<String> = Vec::new();
    for (col, v) in [
        ("tree", &f.tree),
        ("platform", &f.platform),
        ("buildtype", &f.buildtype),
        ("result", &f.result),
    ] {
        if let Some(v) = v {
            params.push(Val::Text(Some(v)));
            clauses.push(format!("{col} = {}", d.param(params.len())));
        }
    }
    if let Some(since) = f.since {
        params.push(Val::Time(Some(since)));
        clauses.push(format!("started_at >= {}", d.param(params.len())));
    }
    if !clauses.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&clauses.join(" AND "));
    }
    sql.push_str(&format!(
        " ORDER BY started_at DESC{}, build_id",
        d.nulls_last
    ));
    if let Some(limit) = f.limit {
        params.push(Val::Int(Some(i64::from(limit))));
        sql.push_str(&format!(" LIMIT {}", d.param(params.len())));
    }
    let store = q.store_name().to_string();
    collect(q, "query builds", &sql, &params, |r| build_row(&store, r))
}

/// What is stored about build `build_id` (see
/// [`Store::query_build`](super::Store::query_build)).
pub(crate) fn query_build(
    q: &mut dyn Query,
    build_id: &str,
) -> Result<Option<BuildDetail>, StoreError> {
    let d = q.dialect();
    let store = q.store_name().to_string();
    let p1 = d.param(1);
    let c = d.collate;
    let j = d.json_text;
    let by_build = [Val::Text(Some(build_id))];

    let build = collect(
        q,
        "query build",
        &format!("{} WHERE build_id = {p1}", build_select(d)),
        &by_build,
        |r| build_row(&store, r),
    )?
    .into_iter()
    .next();

    let mut task_counts = BTreeMap::new();
    q.each_row(
        "count tasks",
        &format!("SELECT outcome, count(*) FROM tasks WHERE build_id = {p1} GROUP BY outcome"),
        &by_build,
        &mut |r| {
            let outcome = r.text(0)?;
            let n = r.int(1)?;
            task_counts.insert(outcome, n as u64);
            Ok(())
        },
    )?;

    let failed_tasks = collect(
        q,
        "query failed tasks",
        &format!(
            "SELECT entity_id, build_id, target, task, outcome, sstate_result, started_at, \
             finished_at, elapsed_ms, exit_code, logfile, target_kind, failure, \"timestamp\", \
             message_id FROM tasks WHERE build_id = {p1} AND outcome IN ('{}') \
             ORDER BY target{c}, task{c}, entity_id{c}",
            FAILED_OUTCOMES.join("', '")
        ),
        &by_build,
        task_row,
    )?;

    let tests = collect(
        q,
        "query tests",
        &format!(
            "SELECT entity_id, build_id, test, scope, status, attempt, shard, run, \
             total_attempts, total_shards, duration_ms, cached, logurl, strategy, \"timestamp\", \
             message_id FROM tests WHERE build_id = {p1} \
             ORDER BY test{c}, scope <> 'summary', run, shard, attempt, entity_id{c}"
        ),
        &by_build,
        test_row,
    )?;

    let artifacts = collect(
        q,
        "query artifacts",
        &format!(
            "SELECT entity_id, build_id, path, uri, kind, size, sha256, target, fields{j}, \
             \"timestamp\", message_id, mtime, symlink_target FROM artifacts \
             WHERE build_id = {p1} ORDER BY path{c}, entity_id{c}"
        ),
        &by_build,
        |r| artifact_row(&store, r),
    )?;

    let logs = collect(
        q,
        "query logs",
        &format!(
            "SELECT entity_id, build_id, level, message, target, task, \"timestamp\", message_id \
             FROM logs WHERE build_id = {p1} \
             ORDER BY \"timestamp\", level{c}, message{c}, entity_id{c}"
        ),
        &by_build,
        log_row,
    )?;

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

/// The SELECT of every [`BuildRow`] column, in the order [`build_row`] reads them.
fn build_select(d: &Dialect) -> String {
    let j = d.json_text;
    format!(
        "SELECT build_id, system, state, result, tree, platform, buildtype, product, \
         revision, branch, tags{j}, targets{j}, command, started_at, finished_at, duration_ms, \
         exit_code, builder_host, builder_user, counts{j}, tool_version, failure, metadata{j}, \
         \"timestamp\", entity_id, message_id FROM builds"
    )
}

fn build_row(store: &str, r: &dyn DbRow) -> Result<BuildRow, StoreError> {
    let build_id = r.text(0)?;
    let [tags, targets, counts, metadata] = [r.text(10)?, r.text(11)?, r.text(19)?, r.text(22)?];
    let tags = from_json_col(store, "builds", &build_id, "tags", &tags)?;
    let targets = from_json_col(store, "builds", &build_id, "targets", &targets)?;
    let counts = from_json_col(store, "builds", &build_id, "counts", &counts)?;
    let metadata = from_json_col(store, "builds", &build_id, "metadata", &metadata)?;
    Ok(BuildRow {
        system: r.text(1)?,
        state: r.text(2)?,
        result: r.opt_text(3)?,
        tree: r.opt_text(4)?,
        platform: r.opt_text(5)?,
        buildtype: r.opt_text(6)?,
        product: r.opt_text(7)?,
        revision: r.opt_text(8)?,
        branch: r.opt_text(9)?,
        tags,
        targets,
        command: r.opt_text(12)?,
        started_at: r.opt_time(13)?,
        finished_at: r.opt_time(14)?,
        duration_ms: r.opt_int(15)?,
        exit_code: r.opt_int(16)?,
        builder_host: r.opt_text(17)?,
        builder_user: r.opt_text(18)?,
        counts,
        tool_version: r.opt_text(20)?,
        failure: r.opt_text(21)?,
        metadata,
        timestamp: r.opt_time(23)?,
        entity_id: r.text(24)?,
        message_id: r.text(25)?,
        build_id,
    })
}

fn task_row(r: &dyn DbRow) -> Result<TaskRow, StoreError> {
    Ok(TaskRow {
        entity_id: r.text(0)?,
        build_id: r.text(1)?,
        target: r.text(2)?,
        task: r.text(3)?,
        outcome: r.text(4)?,
        sstate_result: r.text(5)?,
        started_at: r.opt_time(6)?,
        finished_at: r.opt_time(7)?,
        elapsed_ms: r.opt_int(8)?,
        exit_code: r.opt_int(9)?,
        logfile: r.opt_text(10)?,
        target_kind: r.opt_text(11)?,
        failure: r.opt_text(12)?,
        timestamp: r.opt_time(13)?,
        message_id: r.text(14)?,
    })
}

fn test_row(r: &dyn DbRow) -> Result<TestRow, StoreError> {
    Ok(TestRow {
        entity_id: r.text(0)?,
        build_id: r.text(1)?,
        test: r.text(2)?,
        scope: r.text(3)?,
        status: r.text(4)?,
        attempt: r.opt_int(5)?,
        shard: r.opt_int(6)?,
        run: r.opt_int(7)?,
        total_attempts: r.opt_int(8)?,
        total_shards: r.opt_int(9)?,
        duration_ms: r.opt_int(10)?,
        cached: r.opt_bool(11)?,
        logurl: r.opt_text(12)?,
        strategy: r.opt_text(13)?,
        timestamp: r.opt_time(14)?,
        message_id: r.text(15)?,
    })
}

fn artifact_row(store: &str, r: &dyn DbRow) -> Result<ArtifactRow, StoreError> {
    let entity_id = r.text(0)?;
    let fields = from_json_col(store, "artifacts", &entity_id, "fields", &r.text(8)?)?;
    Ok(ArtifactRow {
        entity_id,
        build_id: r.text(1)?,
        path: r.text(2)?,
        uri: r.opt_text(3)?,
        kind: r.text(4)?,
        size: r.opt_int(5)?,
        sha256: r.opt_text(6)?,
        target: r.opt_text(7)?,
        fields,
        mtime: r.opt_time(11)?,
        symlink_target: r.opt_text(12)?,
        timestamp: r.opt_time(9)?,
        message_id: r.text(10)?,
    })
}

fn log_row(r: &dyn DbRow) -> Result<LogRow, StoreError> {
    Ok(LogRow {
        entity_id: r.text(0)?,
        build_id: r.text(1)?,
        level: r.text(2)?,
        message: r.text(3)?,
        target: r.opt_text(4)?,
        task: r.opt_text(5)?,
        timestamp: r.opt_time(6)?,
        message_id: r.text(7)?,
    })
}

/// Reads a JSON column back, naming the row and column when it does not parse.
fn from_json_col<T: serde::de::DeserializeOwned>(
    store: &str,
    table: &'static str,
    key: &str,
    column: &'static str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        store: store.to_string(),
        table,
        key: key.to_string(),
        column,
        reason: e.to_string(),
    })
}
