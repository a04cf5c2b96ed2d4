//! The JSON Schemas in `schemas/` against what the translators really write.
//!
//! Every fixture named by [`FIXTURES`] is translated with the built-in configuration;
//! every message is validated against the schema of its kind and against
//! `envelope.schema.json`. The schemas are loaded from disk into one registry under
//! their `$id`s, so every `$ref` (to `common.schema.json` and between the schemas)
//! resolves offline. A second test breaks real messages on purpose and checks that
//! the schemas reject them, so a schema that accepts anything cannot pass.
//!
//! To cover another source (BitBake, ...), add its fixture globs to [`FIXTURES`] (and
//! file-name globs to skip to [`EXCLUDED`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use buildbus::model::Kind;
use buildbus::sources::file::translate_file;
use buildbus::systems::Context;
use jsonschema::{Draft, Registry, Validator};
use serde_json::{json, Value};

/// Fixture files to translate, relative to the crate root. `*` and `?` work in the
/// last path component only (the directory part is literal).
const FIXTURES: &[&str] = &[
    "tests/fixtures/bazel/*.json",
    "tests/fixtures/bazel/*.bin",
    "tests/fixtures/bazel/bazel-2.1.0/*.json",
    "tests/fixtures/bazel/bazel-2.1.0/*.bin",
    "tests/fixtures/bitbake/*.eventlog",
];

/// File names (globs) that [`FIXTURES`] matches but that are not inputs of
/// `translate_file` (BES captures are read by the BES server, not as files).
const EXCLUDED: &[&str] = &["bes_capture*.json*"];

const SCHEMA_DIR: &str = "schemas";
const SCHEMA_BASE: &str = "https://buildbus.dev/schemas";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------ fixtures

/// Matches `name` against a glob of `*` (any run) and `?` (one character).
fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some(('?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// The files one fixture glob names, sorted; panics if it names none (a typo in
/// [`FIXTURES`] must not silently shrink the test).
fn expand(glob: &str) -> Vec<PathBuf> {
    let (dir, pattern) = glob.rsplit_once('/').unwrap_or((".", glob));
    let dir = root().join(dir);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixture glob {glob}: cannot read {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            glob_match(pattern, name) && !EXCLUDED.iter().any(|x| glob_match(x, name))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "fixture glob {glob} matches no file");
    files
}

fn fixture_files() -> Vec<PathBuf> {
    let files: BTreeSet<PathBuf> = FIXTURES.iter().flat_map(|g| expand(g)).collect();
    files.into_iter().collect()
}

/// One translated message, as JSON, with where it came from.
struct Message {
    file: String,
    index: usize,
    kind: Kind,
    json: Value,
}

/// Every message of every fixture (translated once per test binary).
fn messages() -> &'static [Message] {
    static MESSAGES: OnceLock<Vec<Message>> = OnceLock::new();
    MESSAGES.get_or_init(|| {
        let ctx = Arc::new(Context::builtin());
        let mut all = Vec::new();
        for path in fixture_files() {
            let file = path
                .strip_prefix(root())
                .unwrap_or(&path)
                .display()
                .to_string();
            let mut index = 0;
            translate_file(&path, None, &ctx, &mut |env| {
                let bytes = env.to_json();
                // The hand-written JSON is serde's, byte for byte.
                let serde_bytes = serde_json::to_vec(&env).unwrap();
                assert!(
                    bytes == serde_bytes,
                    "{file} message {index}: to_json differs from serde_json:\n{}\n{}",
                    String::from_utf8_lossy(&bytes),
                    String::from_utf8_lossy(&serde_bytes)
                );
                let json: Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{file} message {index}: not JSON: {e}"));
                all.push(Message {
                    file: file.clone(),
                    index,
                    kind: env.kind(),
                    json,
                });
                index += 1;
            });
        }
        all
    })
}

// ------------------------------------------------------------------- schemas

/// The compiled schemas: one per kind and the envelope.
struct Schemas {
    by_kind: BTreeMap<Kind, Validator>,
    envelope: Validator,
}

fn schema_id(name: &str) -> String {
    format!("{SCHEMA_BASE}/{name}/v1")
}

fn load_schema(name: &str) -> Value {
    let path = root().join(SCHEMA_DIR).join(format!("{name}.schema.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let schema: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema",
        "{}: $schema",
        path.display()
    );
    assert_eq!(
        schema["$id"],
        schema_id(name).as_str(),
        "{}: $id",
        path.display()
    );
    schema
}

fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let names: Vec<&str> = Kind::ALL
            .iter()
            .map(|k| k.as_str())
            .chain(["common", "envelope"])
            .collect();
        let docs: BTreeMap<&str, Value> = names.iter().map(|&n| (n, load_schema(n))).collect();
        // Every schema is a resource of every other: `$ref`s by `$id` resolve offline.
        let registry = Registry::new()
            .draft(Draft::Draft202012)
            .extend(docs.iter().map(|(n, d)| (schema_id(n), d.clone())))
            .and_then(|b| b.prepare())
            .unwrap_or_else(|e| panic!("schema registry: {e}"));
        let build = |name: &str| {
            jsonschema::options()
                .with_draft(Draft::Draft202012)
                .should_validate_formats(true)
                .offline()
                .with_registry(&registry)
                .build(&docs[name])
                .unwrap_or_else(|e| panic!("schemas/{name}.schema.json does not compile: {e}"))
        };
        Schemas {
            by_kind: Kind::ALL.iter().map(|&k| (k, build(k.as_str()))).collect(),
            envelope: build("envelope"),
        }
    })
}

/// Every violation of `json` against `validator`, one line each: JSON pointer, the
/// validator's message and where in the schema it failed.
fn violations(validator: &Validator, json: &Value) -> Vec<String> {
    validator
        .iter_errors(json)
        .map(|e| {
            format!(
                "at {:?}: {e} (schema: {})",
                e.instance_path().as_str(),
                e.evaluation_path()
            )
        })
        .collect()
}

// --------------------------------------------------------------------- tests

#[test]
fn every_fixture_message_matches_its_schema() {
    let schemas = schemas();
    let messages = messages();
    let mut report = String::new();
    let mut failed = 0usize;
    let mut per_kind: BTreeMap<Kind, usize> = BTreeMap::new();
    for m in messages {
        *per_kind.entry(m.kind).or_default() += 1;
        // The kind schema says what is wrong; the envelope's `oneOf` only says that no
        // branch matched, so it is reported only when the kind schema passed.
        let mut errors = violations(&schemas.by_kind[&m.kind], &m.json);
        let mut against = format!("{}.schema.json", m.kind);
        if errors.is_empty() {
            errors = violations(&schemas.envelope, &m.json);
            against = "envelope.schema.json".to_string();
        }
        if errors.is_empty() {
            continue;
        }
        failed += 1;
        if failed > MAX_REPORTED {
            continue;
        }
        let _ = writeln!(
            report,
            "{} message #{} ({}) against {against}:",
            m.file, m.index, m.kind
        );
        for e in errors {
            let _ = writeln!(report, "    {}", clip(&e));
        }
        let _ = writeln!(report, "    message: {}", clip(&m.json.to_string()));
    }
    assert!(
        failed == 0,
        "{failed} of {} messages do not match the schemas (first {MAX_REPORTED} shown):\n{report}",
        messages.len()
    );
    for kind in Kind::ALL {
        assert!(
            per_kind.get(&kind).copied().unwrap_or(0) > 0,
            "no {kind} message in any fixture: the {kind} schema was never exercised \
             (validated per kind: {per_kind:?})"
        );
    }
}

/// How many failing messages a failure report shows.
const MAX_REPORTED: usize = 20;

/// Cuts long text (a whole message in a `oneOf` error) for the failure report.
fn clip(s: &str) -> String {
    const MAX: usize = 600;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}... ({} bytes)", &s[..i], s.len()),
        None => s.to_string(),
    }
}

/// A real message of `kind` from the fixtures, to break on purpose.
fn sample(kind: Kind) -> Value {
    messages()
        .iter()
        .find(|m| m.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} message in the fixtures"))
        .json
        .clone()
}

/// Sets (or with `None`, removes) the value at a JSON pointer.
fn edit(mut json: Value, pointer: &str, value: Option<Value>) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer with a key");
    let obj = json
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("no object at {parent:?}"));
    match value {
        Some(v) => {
            obj.insert(key.to_string(), v);
        }
        None => {
            assert!(obj.remove(key).is_some(), "nothing to remove at {pointer}");
        }
    }
    json
}

/// Breakages that every kind's schema must reject (`None` removes the field).
fn common_breakages() -> Vec<(&'static str, Option<Value>)> {
    vec![
        ("/_meta/message_id", Some(json!("bb1m-NOT-HEX"))),
        (
            "/_meta/message_id",
            Some(json!("bb1e-0123456789abcdef0123456789abcdef")),
        ),
        (
            "/_meta/entity_id",
            Some(json!("bb1e-0123456789ABCDEF0123456789ABCDEF")),
        ),
        ("/_meta/entity_id", None),
        ("/_meta/routing_key", Some(json!("a".repeat(256)))),
        ("/_meta/routing_key", Some(json!("x"))),
        ("/_meta/sent", Some(json!("yesterday"))),
        ("/_meta/serializer", Some(json!("msgpack"))),
        ("/_meta/exchange", Some(json!("exchange/buildbus/v1/other"))),
        ("/_meta/schema", Some(json!("buildbus/other/v1"))),
        ("/_meta/source/system", Some(json!("make"))),
        ("/_meta/source/tool_version", None),
        ("/_meta", None),
        ("/payload/build_id", None),
        ("/payload/build_id", Some(Value::Null)),
        ("/payload/system", Some(json!("cmake"))),
        ("/payload/tree", None),
        ("/payload/platform", Some(json!(42))),
        ("/payload/tags", Some(Value::Null)),
        ("/payload/tags", Some(json!([1]))),
        ("/payload/timestamp", Some(json!("21/11/2026"))),
    ]
}

/// Breakages specific to one kind.
fn kind_breakages(kind: Kind) -> Vec<(&'static str, Option<Value>)> {
    match kind {
        Kind::Build => vec![
            ("/_meta/state", Some(json!("running"))),
            ("/payload/state", Some(json!("running"))),
            ("/payload/result", Some(json!("ok"))),
            ("/payload/result", None),
            ("/payload/targets", Some(Value::Null)),
            ("/payload/duration_ms", Some(json!(1.5))),
            ("/payload/builder/host", None),
            ("/payload/counts/errors", None),
            ("/payload/counts/warnings", Some(json!(-1))),
            ("/payload/counts/tasks", Some(json!({"bogus": 1}))),
            (
                "/payload/counts/metrics",
                Some(json!({"wall_time_ms": "1"})),
            ),
            ("/payload/metadata", Some(json!({"k": 1}))),
            ("/payload/failure", None),
        ],
        Kind::Task => vec![
            ("/_meta/state", Some(json!("bogus"))),
            ("/payload/outcome", Some(json!("bogus"))),
            ("/payload/outcome", Some(Value::Null)),
            ("/payload/sstate_result", Some(json!("hit"))),
            ("/payload/target", None),
            ("/payload/target", Some(Value::Null)),
            ("/payload/elapsed_ms", Some(json!("12"))),
            ("/payload/exit_code", None),
            ("/payload/started_at", Some(json!("soon"))),
        ],
        Kind::Test => vec![
            ("/payload/scope", Some(json!("suite"))),
            ("/payload/status", None),
            ("/payload/status", Some(Value::Null)),
            ("/payload/attempt", Some(json!("1"))),
            ("/payload/cached", Some(json!("no"))),
            ("/payload/duration_ms", None),
            ("/payload/test", Some(json!(["//a:b"]))),
        ],
        Kind::Artifact => vec![
            ("/_meta/state", Some(json!("finished"))),
            ("/payload/kind", None),
            ("/payload/kind", Some(Value::Null)),
            ("/payload/size", Some(json!(-1))),
            ("/payload/sha256", Some(json!("abc"))),
            ("/payload/path", Some(Value::Null)),
            ("/payload/fields", Some(Value::Null)),
        ],
        Kind::Log => vec![
            ("/_meta/state", Some(json!("info"))),
            ("/payload/level", Some(json!("info"))),
            ("/payload/message", Some(Value::Null)),
            ("/payload/message", None),
            ("/payload/task", None),
        ],
    }
}

/// The sample's routing key with one word malformed, or a word too few. (A word too
/// many is fine: later versions may append words, see `schemas_allow_new_fields`.)
fn routing_key_breakages(good: &Value) -> Vec<(&'static str, Option<Value>)> {
    let key = good["_meta"]["routing_key"].as_str().expect("routing key");
    let (first, rest) = key.split_once('.').expect("a key of several words");
    let (most, _last) = key.rsplit_once('.').expect("a key of several words");
    [
        format!("tr ee.{rest}"),
        format!("tr*ee.{rest}"),
        format!("tr#ee.{rest}"),
        format!("tr%2ee.{rest}"),
        format!("tr~ee.{rest}"),
        format!(".{rest}"),
        format!("{first}..{rest}"),
        most.to_string(),
    ]
    .into_iter()
    .map(|k| ("/_meta/routing_key", Some(json!(k))))
    .collect()
}

#[test]
fn broken_messages_are_rejected() {
    let schemas = schemas();
    let mut accepted = Vec::new();
    for kind in Kind::ALL {
        let good = sample(kind);
        let validator = &schemas.by_kind[&kind];
        assert!(
            validator.is_valid(&good),
            "the {kind} sample itself is invalid"
        );
        let mut cases = common_breakages();
        cases.extend(kind_breakages(kind));
        // A message of another kind, relabelled as this one.
        let other = if kind == Kind::Build {
            Kind::Task
        } else {
            Kind::Build
        };
        cases.push(("/_meta/kind", Some(json!(other.as_str()))));
        cases.extend(routing_key_breakages(&good));
        for (pointer, value) in cases {
            let what = match &value {
                Some(v) => format!("{pointer} = {v}"),
                None => format!("{pointer} removed"),
            };
            let bad = edit(good.clone(), pointer, value);
            for (name, v) in [("kind", validator), ("envelope", &schemas.envelope)] {
                if v.is_valid(&bad) {
                    accepted.push(format!("{kind} ({name} schema): {what}"));
                }
            }
        }
    }
    assert!(
        accepted.is_empty(),
        "the schemas accept broken messages:\n  {}",
        accepted.join("\n  ")
    );
}

#[test]
fn schemas_allow_new_fields() {
    // The contract: fields may grow, never shrink. A consumer validating with v1 must
    // keep accepting messages that carry fields (and routing-key words) added later.
    let schemas = schemas();
    for kind in Kind::ALL {
        let mut grown = sample(kind);
        grown["payload"]["added_later"] = json!({"any": ["thing"]});
        grown["_meta"]["added_later"] = json!(1);
        grown["_meta"]["source"]["added_later"] = json!(null);
        grown["added_later"] = json!(true);
        // Routing keys may grow at the end too (consumers bind with a trailing `.#`).
        let key = grown["_meta"]["routing_key"].as_str().expect("routing key");
        grown["_meta"]["routing_key"] = json!(format!("{key}.added%2Elater._"));
        for (name, v) in [
            ("kind", &schemas.by_kind[&kind]),
            ("envelope", &schemas.envelope),
        ] {
            let errors = violations(v, &grown);
            assert!(
                errors.is_empty(),
                "{kind} with an extra field ({name} schema): {errors:?}"
            );
        }
    }
}

#[test]
fn shortened_and_escaped_routing_keys_match_the_schema() {
    // Real routing keys from the fixtures are short and plain; build one that needs
    // escaping and shortening with the real code and check the schema takes it.
    use buildbus::model::routing;
    let schemas = schemas();
    let mut msg = sample(Kind::Task);
    let long = format!("//{}:{}", "deep/".repeat(60), "t.a r*g#e%t~_");
    let key = routing::key(&[
        Some("tree.with.dots"),
        None,
        Some(""),
        Some("_"),
        Some("bazel"),
        Some("failed"),
        Some(&long),
        Some("do compile\t"),
    ]);
    assert!(
        key.len() <= routing::MAX_KEY_BYTES && key.contains('~'),
        "{key}"
    );
    msg["_meta"]["routing_key"] = json!(key);
    let errors = violations(&schemas.by_kind[&Kind::Task], &msg);
    assert!(errors.is_empty(), "{key}: {errors:?}");
}
