-- buildbus DSI schema, version 2, for SQLite: what the artifact scanner (AAM) records
-- beyond version 1. Run by src/dsi/store/sqlite.rs, in the same transaction as version
-- 1 for a new database, or alone on a database at version 1.

ALTER TABLE artifacts ADD COLUMN mtime TEXT;
ALTER TABLE artifacts ADD COLUMN symlink_target TEXT;

INSERT INTO buildbus_schema (version, applied_at)
VALUES (2, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
ON CONFLICT (version) DO NOTHING;
