-- buildbus DSI schema, version 2, for PostgreSQL: what the artifact scanner (AAM)
-- records beyond version 1. Run by src/dsi/store/postgres.rs, in the same transaction
-- as version 1 for a new database, or alone on a database at version 1. Idempotent.

ALTER TABLE artifacts ADD COLUMN IF NOT EXISTS mtime timestamptz;
ALTER TABLE artifacts ADD COLUMN IF NOT EXISTS symlink_target text;

INSERT INTO buildbus_schema (version) VALUES (2) ON CONFLICT (version) DO NOTHING;
