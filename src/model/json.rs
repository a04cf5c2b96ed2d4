//! The envelope's JSON, written by hand: the bytes `serde_json` writes for the derived
//! `Serialize` impls (compact, fields in declaration order, `null` for `None`), without
//! serde's per-field map machinery, and with string escaping that skips over eight
//! bytes at a time where nothing needs escaping (most text in a message).
//!
//! Every struct is taken apart field by field without `..`, so a field added to the
//! model does not compile until it is written here too; a test compares these bytes
//! with `serde_json`'s for every fixture message.

use std::collections::BTreeMap;
use std::io::Write;

use super::envelope::{
    ArtifactPayload, BuildPayload, Builder, Common, Counts, Envelope, LogPayload, Meta, Payload,
    SourceMeta, SstateResult, TaskPayload, TestPayload,
};

/// Bytes that serde_json escapes: `b'u'` means `\u00XX`, other values the letter after
/// the backslash, 0 none.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the eight bytes in `w` is a control character, `"` or `\`.
#[inline]
fn any_special(w: u64) -> bool {
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    let quote = zero_byte(w ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(w ^ (ONES * u64::from(b'\\')));
    (control | quote | backslash) != 0
}

/// A JSON string.
pub(crate) fn string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            if !any_special(u64::from_le_bytes(w)) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let esc = ESCAPE[usize::from(b)];
        if esc != 0 {
            out.extend_from_slice(&bytes[start..i]);
            if esc == b'u' {
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]);
            } else {
                out.extend_from_slice(&[b'\\', esc]);
            }
            start = i + 1;
        }
        i += 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn int<T: std::fmt::Display>(out: &mut Vec<u8>, v: T) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{v}");
}

fn opt_int<T: std::fmt::Display>(out: &mut Vec<u8>, v: Option<T>) {
    match v {
        Some(v) => int(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

fn opt_bool(out: &mut Vec<u8>, v: Option<bool>) {
    out.extend_from_slice(match v {
        Some(true) => b"true",
        Some(false) => b"false",
        None => b"null",
    });
}

fn strings(out: &mut Vec<u8>, v: &[String]) {
    out.push(b'[');
    for (i, s) in v.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, s);
    }
    out.push(b']');
}

fn map<V>(out: &mut Vec<u8>, m: &BTreeMap<String, V>, mut value: impl FnMut(&mut Vec<u8>, &V)) {
    out.push(b'{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, k);
        out.push(b':');
        value(out, v);
    }
    out.push(b'}');
}

/// Appends `key` (the literal `,"name":` or `{"name":`).
#[inline]
fn key(out: &mut Vec<u8>, key: &[u8]) {
    out.extend_from_slice(key);
}

fn sstate(s: SstateResult) -> &'static str {
    match s {
        SstateResult::Na => "na",
        SstateResult::Miss => "miss",
        SstateResult::Failed => "failed",
        SstateResult::Restored => "restored",
    }
}

/// `{"_meta":...,"payload":...}`.
pub(crate) fn envelope(out: &mut Vec<u8>, env: &Envelope) {
    let Envelope { meta, payload } = env;
    key(out, b"{\"_meta\":");
    write_meta(out, meta);
    key(out, b",\"payload\":");
    match payload {
        Payload::Build(p) => build(out, p),
        Payload::Task(p) => task(out, p),
        Payload::Test(p) => test(out, p),
        Payload::Artifact(p) => artifact(out, p),
        Payload::Log(p) => log(out, p),
    }
    out.push(b'}');
}

fn write_meta(out: &mut Vec<u8>, m: &Meta) {
    let Meta {
        exchange,
        routing_key,
        message_id,
        entity_id,
        kind,
        state,
        schema,
        sent,
        serializer,
        source,
    } = m;
    key(out, b"{\"exchange\":");
    string(out, exchange);
    key(out, b",\"routing_key\":");
    string(out, routing_key);
    key(out, b",\"message_id\":");
    string(out, message_id);
    key(out, b",\"entity_id\":");
    string(out, entity_id);
    key(out, b",\"kind\":");
    string(out, kind.as_str());
    key(out, b",\"state\":");
    string(out, state);
    key(out, b",\"schema\":");
    string(out, schema);
    key(out, b",\"sent\":");
    string(out, sent);
    key(out, b",\"serializer\":");
    string(out, serializer);
    let SourceMeta {
        system,
        format,
        origin,
        tool_version,
    } = source.as_ref();
    key(out, b",\"source\":{\"system\":");
    string(out, system);
    key(out, b",\"format\":");
    string(out, format);
    key(out, b",\"origin\":");
    string(out, origin);
    key(out, b",\"tool_version\":");
    opt_string(out, tool_version.as_deref());
    out.extend_from_slice(b"}}");
}

/// The common fields, flattened into the payload object: opens it, leaves it open.
fn common(out: &mut Vec<u8>, c: &Common) {
    let Common {
        build_id,
        system,
        tree,
        platform,
        buildtype,
        product,
        revision,
        branch,
        tags,
        timestamp,
    } = c;
    key(out, b"{\"build_id\":");
    string(out, build_id);
    key(out, b",\"system\":");
    string(out, system);
    key(out, b",\"tree\":");
    opt_string(out, tree.as_deref());
    key(out, b",\"platform\":");
    opt_string(out, platform.as_deref());
    key(out, b",\"buildtype\":");
    opt_string(out, buildtype.as_deref());
    key(out, b",\"product\":");
    opt_string(out, product.as_deref());
    key(out, b",\"revision\":");
    opt_string(out, revision.as_deref());
    key(out, b",\"branch\":");
    opt_string(out, branch.as_deref());
    key(out, b",\"tags\":");
    strings(out, tags);
    key(out, b",\"timestamp\":");
    opt_string(out, timestamp.as_deref());
}

fn build(out: &mut Vec<u8>, p: &BuildPayload) {
    let BuildPayload {
        common: c,
        state,
        result,
        targets,
        command,
        started_at,
        finished_at,
        duration_ms,
        exit_code,
        builder,
        counts,
        tool_version,
        failure,
        metadata,
    } = p;
    common(out, c);
    key(out, b",\"state\":");
    string(out, state.as_str());
    key(out, b",\"result\":");
    opt_string(out, result.map(|r| r.as_str()));
    key(out, b",\"targets\":");
    strings(out, targets);
    key(out, b",\"command\":");
    opt_string(out, command.as_deref());
    key(out, b",\"started_at\":");
    opt_string(out, started_at.as_deref());
    key(out, b",\"finished_at\":");
    opt_string(out, finished_at.as_deref());
    key(out, b",\"duration_ms\":");
    opt_int(out, *duration_ms);
    key(out, b",\"exit_code\":");
    opt_int(out, *exit_code);
    let Builder { host, user } = builder;
    key(out, b",\"builder\":{\"host\":");
    opt_string(out, host.as_deref());
    key(out, b",\"user\":");
    opt_string(out, user.as_deref());
    let Counts {
        tasks,
        tests,
        errors,
        warnings,
        metrics,
    } = counts;
    key(out, b"},\"counts\":{\"tasks\":");
    map(out, tasks, |o, v| int(o, v));
    key(out, b",\"tests\":");
    map(out, tests, |o, v| int(o, v));
    key(out, b",\"errors\":");
    int(out, errors);
    key(out, b",\"warnings\":");
    int(out, warnings);
    key(out, b",\"metrics\":");
    map(out, metrics, |o, v| int(o, v));
    key(out, b"},\"tool_version\":");
    opt_string(out, tool_version.as_deref());
    key(out, b",\"failure\":");
    opt_string(out, failure.as_deref());
    key(out, b",\"metadata\":");
    map(out, metadata, |o, v| string(o, v));
    out.push(b'}');
}

fn task(out: &mut Vec<u8>, p: &TaskPayload) {
    let TaskPayload {
        common: c,
        target,
        task,
        outcome,
        sstate_result,
        started_at,
        finished_at,
        elapsed_ms,
        exit_code,
        logfile,
        target_kind,
        failure,
    } = p;
    common(out, c);
    key(out, b",\"target\":");
    string(out, target);
    key(out, b",\"task\":");
    string(out, task);
    key(out, b",\"outcome\":");
    string(out, outcome.as_str());
    key(out, b",\"sstate_result\":");
    string(out, sstate(*sstate_result));
    key(out, b",\"started_at\":");
    opt_string(out, started_at.as_deref());
    key(out, b",\"finished_at\":");
    opt_string(out, finished_at.as_deref());
    key(out, b",\"elapsed_ms\":");
    opt_int(out, *elapsed_ms);
    key(out, b",\"exit_code\":");
    opt_int(out, *exit_code);
    key(out, b",\"logfile\":");
    opt_string(out, logfile.as_deref());
    key(out, b",\"target_kind\":");
    opt_string(out, target_kind.as_deref());
    key(out, b",\"failure\":");
    opt_string(out, failure.as_deref());
    out.push(b'}');
}

fn test(out: &mut Vec<u8>, p: &TestPayload) {
    let TestPayload {
        common: c,
        test,
        scope,
        status,
        attempt,
        shard,
        run,
        total_attempts,
        total_shards,
        duration_ms,
        cached,
        logurl,
        strategy,
    } = p;
    common(out, c);
    key(out, b",\"test\":");
    string(out, test);
    key(out, b",\"scope\":");
    string(out, scope);
    key(out, b",\"status\":");
    string(out, status);
    key(out, b",\"attempt\":");
    opt_int(out, *attempt);
    key(out, b",\"shard\":");
    opt_int(out, *shard);
    key(out, b",\"run\":");
    opt_int(out, *run);
    key(out, b",\"total_attempts\":");
    opt_int(out, *total_attempts);
    key(out, b",\"total_shards\":");
    opt_int(out, *total_shards);
    key(out, b",\"duration_ms\":");
    opt_int(out, *duration_ms);
    key(out, b",\"cached\":");
    opt_bool(out, *cached);
    key(out, b",\"logurl\":");
    opt_string(out, logurl.as_deref());
    key(out, b",\"strategy\":");
    opt_string(out, strategy.as_deref());
    out.push(b'}');
}

fn artifact(out: &mut Vec<u8>, p: &ArtifactPayload) {
    let ArtifactPayload {
        common: c,
        path,
        uri,
        kind,
        size,
        sha256,
        target,
        fields,
        mtime,
        symlink_target,
    } = p;
    common(out, c);
    key(out, b",\"path\":");
    string(out, path);
    key(out, b",\"uri\":");
    opt_string(out, uri.as_deref());
    key(out, b",\"kind\":");
    string(out, kind);
    key(out, b",\"size\":");
    opt_int(out, *size);
    key(out, b",\"sha256\":");
    opt_string(out, sha256.as_deref());
    key(out, b",\"target\":");
    opt_string(out, target.as_deref());
    key(out, b",\"fields\":");
    map(out, fields, |o, v| string(o, v));
    key(out, b",\"mtime\":");
    opt_string(out, mtime.as_deref());
    key(out, b",\"symlink_target\":");
    opt_string(out, symlink_target.as_deref());
    out.push(b'}');
}

fn log(out: &mut Vec<u8>, p: &LogPayload) {
    let LogPayload {
        common: c,
        level,
        message,
        target,
        task,
    } = p;
    common(out, c);
    key(out, b",\"level\":");
    string(out, level.as_str());
    key(out, b",\"message\":");
    string(out, message);
    key(out, b",\"target\":");
    opt_string(out, target.as_deref());
    key(out, b",\"task\":");
    opt_string(out, task.as_deref());
    out.push(b'}');
}

impl Envelope {
    /// The JSON bytes sent on the bus.
    pub fn to_json(&self) -> Vec<u8> {
        // Room for a typical message (about 1.1 KB) from the start, rather than growing
        // from nothing.
        let mut json = Vec::with_capacity(1536);
        self.write_json(&mut json);
        json
    }

    /// Appends the JSON of [`Envelope::to_json`] to `out`: the bytes `serde_json` writes
    /// for this envelope, written by hand (see `model/json.rs`).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        envelope(out, self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serde(s: &str) -> Vec<u8> {
        serde_json::to_vec(s).unwrap()
    }

    #[test]
    fn strings_escape_as_serde_json_does() {
        let mut all = String::new();
        for c in (0u32..0x80).filter_map(char::from_u32) {
            all.push(c);
        }
        for s in [
            "",
            "plain",
            "exactly8",
            "sixteen bytes ok",
            "a\"b\\c\nd\te\u{1}f\u{1f}g\u{7f}",
            "ünïcødé and \u{2028} and 🦀 with \"quotes\" past eight bytes",
            "\\\\\\\\\\\\\\\\\\",
            &all,
        ] {
            let mut out = Vec::new();
            string(&mut out, s);
            assert_eq!(out, serde(s), "{s:?}");
        }
    }

    /// A scanned artifact (every optional field set) is written as serde_json writes it.
    #[test]
    fn a_scanned_artifact_is_written_as_serde_json_writes_it() {
        use crate::model::{Common, Payload, SourceMeta};
        let p = ArtifactPayload {
            common: Common {
                build_id: "b1".into(),
                system: "bitbake".into(),
                tags: vec!["nightly".to_string()].into(),
                ..Common::default()
            },
            path: "deploy/images/qemux86-64/core-image-minimal.wic".into(),
            uri: Some("file:///b/tmp/deploy/images/qemux86-64/core-image-minimal.wic".into()),
            kind: "image".into(),
            size: Some(123),
            sha256: Some("ab".repeat(32)),
            target: None,
            fields: [("machine".to_string(), "qemux86-64".to_string())].into(),
            mtime: Some("2026-11-21T12:00:00.000Z".into()),
            symlink_target: Some("core-image-minimal-20261121.wic".into()),
        };
        let env = Envelope::new(
            Payload::Artifact(p),
            &["deploy/images/qemux86-64/core-image-minimal.wic"],
            SourceMeta::default(),
            "exchange/buildbus/v1",
        );
        let mut out = Vec::new();
        envelope(&mut out, &env);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            serde_json::to_string(&env).unwrap()
        );
    }

    proptest! {
        #[test]
        fn any_string_escapes_as_serde_json_does(s in "(?s).{0,80}") {
            let mut out = Vec::new();
            string(&mut out, &s);
            prop_assert_eq!(out, serde(&s));
        }

        #[test]
        fn ascii_with_controls_escapes_as_serde_json_does(s in "[\\x00-\\x7f]{0,64}") {
            let mut out = Vec::new();
            string(&mut out, &s);
            prop_assert_eq!(out, serde(&s));
        }
    }
}
