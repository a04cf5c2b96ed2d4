//! Small shared helpers: fixture paths, translating to a list, running the binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use buildbus::evt::{translate_file, Context, StreamReport};
use buildbus::model::{Envelope, Payload};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Translates one file with the built-in configuration.
pub fn translate(path: &Path) -> (Vec<Envelope>, StreamReport) {
    translate_with(path, &Context::builtin())
}

pub fn translate_with(path: &Path, ctx: &Context) -> (Vec<Envelope>, StreamReport) {
    let mut out = Vec::new();
    let report = translate_file(path, None, &Arc::new(ctx.clone()), &mut |e| out.push(e));
    (out, report)
}

/// Translates a fixture and insists it was read cleanly.
pub fn clean(rel: &str) -> Vec<Envelope> {
    let (msgs, report) = translate(&fixture(rel));
    assert!(report.clean(), "{rel}: {:?}", report.errors);
    msgs
}

/// Runs the `buildbus` binary with `args`, no stdin, and a clean BUILDBUS_* environment.
pub fn buildbus(args: &[&str]) -> Output {
    buildbus_env(args, &[])
}

pub fn buildbus_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_buildbus"));
    for (k, _) in std::env::vars() {
        if k.starts_with("BUILDBUS_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).envs(env.iter().copied());
    cmd.output().expect("run buildbus")
}

pub fn stdout_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("stdout line is JSON"))
        .collect()
}

pub fn builds(msgs: &[Envelope]) -> Vec<&buildbus::model::BuildPayload> {
    msgs.iter()
        .filter_map(|m| match &m.payload {
            Payload::Build(b) => Some(b),
            _ => None,
        })
        .collect()
}

pub fn finished(msgs: &[Envelope]) -> &buildbus::model::BuildPayload {
    let f: Vec<_> = builds(msgs)
        .into_iter()
        .filter(|b| b.result.is_some())
        .collect();
    assert_eq!(f.len(), 1, "exactly one finished build message");
    f[0]
}

pub fn tasks(msgs: &[Envelope]) -> Vec<&buildbus::model::TaskPayload> {
    msgs.iter()
        .filter_map(|m| match &m.payload {
            Payload::Task(t) => Some(t),
            _ => None,
        })
        .collect()
}

pub fn tests_of<'a>(msgs: &'a [Envelope], scope: &str) -> Vec<&'a buildbus::model::TestPayload> {
    msgs.iter()
        .filter_map(|m| match &m.payload {
            Payload::Test(t) if t.scope == scope => Some(t),
            _ => None,
        })
        .collect()
}

pub fn logs(msgs: &[Envelope]) -> Vec<&buildbus::model::LogPayload> {
    msgs.iter()
        .filter_map(|m| match &m.payload {
            Payload::Log(l) => Some(l),
            _ => None,
        })
        .collect()
}

/// The comparable identity of a message: everything but `_meta.sent` and `_meta.source`.
pub fn identity(m: &Envelope) -> String {
    let mut v = serde_json::to_value(m).expect("serialize");
    v["_meta"]["sent"] = serde_json::Value::Null;
    v["_meta"]["source"] = serde_json::Value::Null;
    v.to_string()
}

/// A temporary directory that is removed at the end of the test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}
