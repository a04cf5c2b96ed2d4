-- buildbus DSI schema, version 1, for SQLite (>= 3.24 for upserts).
--
-- Loaded by src/dsi/store/sqlite.rs (include_str!) and run inside one transaction when
-- `buildbus_schema` has no row for version 1; every statement is also idempotent
-- (IF NOT EXISTS), so running it twice changes nothing.
--
-- Conventions:
-- * timestamps are TEXT, RFC 3339 in UTC with milliseconds (2026-11-21T10:56:18.674Z):
--   text order is time order;
-- * lists and maps (tags, targets, counts, metadata, fields) are JSON text;
-- * booleans are INTEGER 0/1;
-- * every entity table carries `state`, `state_rank` and `message_id` of the message
--   whose content the row holds. A row is replaced only by a message ordered at or after
--   it by (state_rank, timestamp, message_id), so any arrival order converges to the same
--   rows. Ranks are computed in Rust (dsi::store::state_rank), nowhere else.

CREATE TABLE IF NOT EXISTS buildbus_schema (
    version    INTEGER PRIMARY KEY,
    applied_at TEXT NOT NULL
);

-- Every distinct message once: the dedupe key of at-least-once delivery.
CREATE TABLE IF NOT EXISTS messages (
    message_id TEXT PRIMARY KEY,
    entity_id  TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('build', 'task', 'test', 'artifact', 'log')),
    build_id   TEXT NOT NULL,
    state      TEXT NOT NULL,
    sent       TEXT,
    stored_at  TEXT NOT NULL,
    body       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_build_id ON messages (build_id);

CREATE TABLE IF NOT EXISTS builds (
    build_id      TEXT PRIMARY KEY,
    entity_id     TEXT NOT NULL,
    system        TEXT NOT NULL,
    tree          TEXT,
    platform      TEXT,
    buildtype     TEXT,
    product       TEXT,
    revision      TEXT,
    branch        TEXT,
    tags          TEXT NOT NULL,
    "timestamp"   TEXT,
    state         TEXT NOT NULL CHECK (state IN ('started', 'finished')),
    state_rank    INTEGER NOT NULL,
    result        TEXT CHECK (result IN ('success', 'failure', 'interrupted', 'aborted')),
    targets       TEXT NOT NULL,
    command       TEXT,
    started_at    TEXT,
    finished_at   TEXT,
    duration_ms   INTEGER,
    exit_code     INTEGER,
    builder_host  TEXT,
    builder_user  TEXT,
    counts        TEXT NOT NULL,
    tool_version  TEXT,
    failure       TEXT,
    metadata      TEXT NOT NULL,
    message_id    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS builds_started_at ON builds (started_at);
CREATE INDEX IF NOT EXISTS builds_tree ON builds (tree, started_at);
CREATE INDEX IF NOT EXISTS builds_platform ON builds (platform, started_at);
CREATE INDEX IF NOT EXISTS builds_buildtype ON builds (buildtype, started_at);
CREATE INDEX IF NOT EXISTS builds_result ON builds (result, started_at);

CREATE TABLE IF NOT EXISTS tasks (
    entity_id     TEXT PRIMARY KEY,
    build_id      TEXT NOT NULL,
    system        TEXT NOT NULL,
    tree          TEXT,
    platform      TEXT,
    buildtype     TEXT,
    product       TEXT,
    revision      TEXT,
    branch        TEXT,
    tags          TEXT NOT NULL,
    "timestamp"   TEXT,
    state         TEXT NOT NULL,
    state_rank    INTEGER NOT NULL,
    target        TEXT NOT NULL,
    task          TEXT NOT NULL,
    outcome       TEXT NOT NULL,
    sstate_result TEXT NOT NULL,
    started_at    TEXT,
    finished_at   TEXT,
    elapsed_ms    INTEGER,
    exit_code     INTEGER,
    logfile       TEXT,
    target_kind   TEXT,
    failure       TEXT,
    message_id    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_build_id ON tasks (build_id, outcome);

CREATE TABLE IF NOT EXISTS tests (
    entity_id      TEXT PRIMARY KEY,
    build_id       TEXT NOT NULL,
    system         TEXT NOT NULL,
    tree           TEXT,
    platform       TEXT,
    buildtype      TEXT,
    product        TEXT,
    revision       TEXT,
    branch         TEXT,
    tags           TEXT NOT NULL,
    "timestamp"    TEXT,
    state          TEXT NOT NULL,
    state_rank     INTEGER NOT NULL,
    test           TEXT NOT NULL,
    scope          TEXT NOT NULL,
    status         TEXT NOT NULL,
    attempt        INTEGER,
    shard          INTEGER,
    run            INTEGER,
    total_attempts INTEGER,
    total_shards   INTEGER,
    duration_ms    INTEGER,
    cached         INTEGER CHECK (cached IN (0, 1)),
    logurl         TEXT,
    strategy       TEXT,
    message_id     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tests_build_id ON tests (build_id);

CREATE TABLE IF NOT EXISTS artifacts (
    entity_id   TEXT PRIMARY KEY,
    build_id    TEXT NOT NULL,
    system      TEXT NOT NULL,
    tree        TEXT,
    platform    TEXT,
    buildtype   TEXT,
    product     TEXT,
    revision    TEXT,
    branch      TEXT,
    tags        TEXT NOT NULL,
    "timestamp" TEXT,
    state       TEXT NOT NULL,
    state_rank  INTEGER NOT NULL,
    path        TEXT NOT NULL,
    uri         TEXT,
    kind        TEXT NOT NULL,
    size        INTEGER CHECK (size >= 0),
    sha256      TEXT,
    target      TEXT,
    fields      TEXT NOT NULL,
    message_id  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_build_id ON artifacts (build_id);

CREATE TABLE IF NOT EXISTS logs (
    entity_id   TEXT PRIMARY KEY,
    build_id    TEXT NOT NULL,
    system      TEXT NOT NULL,
    tree        TEXT,
    platform    TEXT,
    buildtype   TEXT,
    product     TEXT,
    revision    TEXT,
    branch      TEXT,
    tags        TEXT NOT NULL,
    "timestamp" TEXT,
    state       TEXT NOT NULL,
    state_rank  INTEGER NOT NULL,
    level       TEXT NOT NULL CHECK (level IN ('warning', 'error', 'critical')),
    message     TEXT NOT NULL,
    target      TEXT,
    task        TEXT,
    message_id  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_build_id ON logs (build_id, "timestamp");

INSERT INTO buildbus_schema (version, applied_at)
VALUES (1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
ON CONFLICT (version) DO NOTHING;
