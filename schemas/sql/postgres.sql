-- buildbus DSI schema, version 1, for PostgreSQL (>= 9.5 for upserts; tested on 15).
--
-- Loaded by src/dsi/store/postgres.rs (include_str!) and run inside one transaction,
-- under an advisory lock (several dsi processes may start at once), when
-- `buildbus_schema` has no row for version 1; every statement is also idempotent
-- (IF NOT EXISTS), so running it twice changes nothing.
--
-- Conventions:
-- * timestamps are timestamptz;
-- * lists and maps (tags, targets, counts, metadata, fields) and message bodies are jsonb;
-- * every entity table carries `state`, `state_rank` and `message_id` of the message
--   whose content the row holds. A row is replaced only by a message ordered at or after
--   it by (state_rank, timestamp, message_id), so any arrival order converges to the same
--   rows. Ranks are computed in Rust (dsi::store::state_rank), nowhere else.

CREATE TABLE IF NOT EXISTS buildbus_schema (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Every distinct message once: the dedupe key of at-least-once delivery.
CREATE TABLE IF NOT EXISTS messages (
    message_id text PRIMARY KEY,
    entity_id  text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('build', 'task', 'test', 'artifact', 'log')),
    build_id   text NOT NULL,
    state      text NOT NULL,
    sent       timestamptz,
    stored_at  timestamptz NOT NULL,
    body       jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_build_id ON messages (build_id);

CREATE TABLE IF NOT EXISTS builds (
    build_id      text PRIMARY KEY,
    entity_id     text NOT NULL,
    system        text NOT NULL,
    tree          text,
    platform      text,
    buildtype     text,
    product       text,
    revision      text,
    branch        text,
    tags          jsonb NOT NULL,
    "timestamp"   timestamptz,
    state         text NOT NULL CHECK (state IN ('started', 'finished')),
    state_rank    integer NOT NULL,
    result        text CHECK (result IN ('success', 'failure', 'interrupted', 'aborted')),
    targets       jsonb NOT NULL,
    command       text,
    started_at    timestamptz,
    finished_at   timestamptz,
    duration_ms   bigint,
    exit_code     bigint,
    builder_host  text,
    builder_user  text,
    counts        jsonb NOT NULL,
    tool_version  text,
    failure       text,
    metadata      jsonb NOT NULL,
    message_id    text NOT NULL
);
CREATE INDEX IF NOT EXISTS builds_started_at ON builds (started_at DESC NULLS LAST);
CREATE INDEX IF NOT EXISTS builds_tree ON builds (tree, started_at DESC NULLS LAST);
CREATE INDEX IF NOT EXISTS builds_platform ON builds (platform, started_at DESC NULLS LAST);
CREATE INDEX IF NOT EXISTS builds_buildtype ON builds (buildtype, started_at DESC NULLS LAST);
CREATE INDEX IF NOT EXISTS builds_result ON builds (result, started_at DESC NULLS LAST);

CREATE TABLE IF NOT EXISTS tasks (
    entity_id     text PRIMARY KEY,
    build_id      text NOT NULL,
    system        text NOT NULL,
    tree          text,
    platform      text,
    buildtype     text,
    product       text,
    revision      text,
    branch        text,
    tags          jsonb NOT NULL,
    "timestamp"   timestamptz,
    state         text NOT NULL,
    state_rank    integer NOT NULL,
    target        text NOT NULL,
    task          text NOT NULL,
    outcome       text NOT NULL,
    sstate_result text NOT NULL,
    started_at    timestamptz,
    finished_at   timestamptz,
    elapsed_ms    bigint,
    exit_code     bigint,
    logfile       text,
    target_kind   text,
    failure       text,
    message_id    text NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_build_id ON tasks (build_id, outcome);

CREATE TABLE IF NOT EXISTS tests (
    entity_id      text PRIMARY KEY,
    build_id       text NOT NULL,
    system         text NOT NULL,
    tree           text,
    platform       text,
    buildtype      text,
    product        text,
    revision       text,
    branch         text,
    tags           jsonb NOT NULL,
    "timestamp"    timestamptz,
    state          text NOT NULL,
    state_rank     integer NOT NULL,
    test           text NOT NULL,
    scope          text NOT NULL,
    status         text NOT NULL,
    attempt        bigint,
    shard          bigint,
    run            bigint,
    total_attempts bigint,
    total_shards   bigint,
    duration_ms    bigint,
    cached         boolean,
    logurl         text,
    strategy       text,
    message_id     text NOT NULL
);
CREATE INDEX IF NOT EXISTS tests_build_id ON tests (build_id);

CREATE TABLE IF NOT EXISTS artifacts (
    entity_id   text PRIMARY KEY,
    build_id    text NOT NULL,
    system      text NOT NULL,
    tree        text,
    platform    text,
    buildtype   text,
    product     text,
    revision    text,
    branch      text,
    tags        jsonb NOT NULL,
    "timestamp" timestamptz,
    state       text NOT NULL,
    state_rank  integer NOT NULL,
    path        text NOT NULL,
    uri         text,
    kind        text NOT NULL,
    size        bigint CHECK (size >= 0),
    sha256      text,
    target      text,
    fields      jsonb NOT NULL,
    message_id  text NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_build_id ON artifacts (build_id);

CREATE TABLE IF NOT EXISTS logs (
    entity_id   text PRIMARY KEY,
    build_id    text NOT NULL,
    system      text NOT NULL,
    tree        text,
    platform    text,
    buildtype   text,
    product     text,
    revision    text,
    branch      text,
    tags        jsonb NOT NULL,
    "timestamp" timestamptz,
    state       text NOT NULL,
    state_rank  integer NOT NULL,
    level       text NOT NULL CHECK (level IN ('warning', 'error', 'critical')),
    message     text NOT NULL,
    target      text,
    task        text,
    message_id  text NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_build_id ON logs (build_id, "timestamp");

INSERT INTO buildbus_schema (version) VALUES (1) ON CONFLICT (version) DO NOTHING;
