//! The fuzz corpus: seed inputs from the real recordings of `tests/fixtures/`, and the
//! check of each decoder (what it must make of any input).
//!
//! Shared by the fuzz module of the integration tests and by `tests/fuzz_memory.rs`.

#![allow(dead_code)]

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use buildbus::decode::bep::codec::{self, Needs};
use buildbus::decode::framing::{Framer, Framing, Next};
use buildbus::decode::{pickle, xmlrpc};
use buildbus::model::SourceMeta;
use buildbus::sources::bes::capture::{parse_capture, Call};
use buildbus::sources::bes::proto::v1::build_event::Event as BesEvent;
use buildbus::sources::bes::proto::v1::PublishBuildToolEventStreamRequest;
use buildbus::sources::bes::proto::BAZEL_EVENT_TYPE;
use buildbus::sources::file::{translate_reader, Format, StreamReport};
use buildbus::systems::bazel::{BazelTranslator, BEP_BINARY, BEP_JSON};
use buildbus::systems::bitbake::{codec as bbcodec, BitbakeTranslator, EVENTLOG};
use buildbus::systems::{Context, Translator};
use prost::Message as _;

/// What a check makes of one input: `Err` when the outcome breaks a property (an
/// error without a position, ...). Panics and overruns are caught by the caller.
pub type Check = fn(&[u8]) -> Result<(), String>;

pub fn ctx() -> Arc<Context> {
    static CTX: OnceLock<Arc<Context>> = OnceLock::new();
    Arc::clone(CTX.get_or_init(|| Arc::new(Context::builtin())))
}

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

// ------------------------------------------------------------------------------------
// Seeds: the real recordings
// ------------------------------------------------------------------------------------

pub const EVENTLOGS: &[&str] = &[
    "bitbake/success.eventlog",
    "bitbake/failure.eventlog",
    "bitbake/rebuild.eventlog",
    "bitbake/nothing-provides.eventlog",
    "bitbake/live-xmlrpc.eventlog",
];

pub const BEP_FILES: &[&str] = &[
    "bazel/build_ok",
    "bazel/build_fail",
    "bazel/test_mixed",
    "bazel/interrupted",
    "bazel/pattern_fail",
    "bazel/bazel-2.1.0/build_ok",
    "bazel/bazel-2.1.0/test_mixed",
];

pub const BES_CAPTURES: &[&str] = &[
    "bazel/bes_capture.jsonl",
    "bazel/bes_capture_retry.jsonl",
    "bazel/bes_capture_test.jsonl",
];

pub fn read(rel: &str) -> Vec<u8> {
    std::fs::read(fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every line (without its end) of `files`.
pub fn lines_of(files: impl IntoIterator<Item = String>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in files {
        for line in read(&f).split(|&b| b == b'\n') {
            if !line.is_empty() {
                out.push(line.to_vec());
            }
        }
    }
    out
}

pub fn eventlog_lines() -> Vec<Vec<u8>> {
    lines_of(EVENTLOGS.iter().map(|s| s.to_string()))
}

/// The pickles of the event logs (the `vars` of their lines).
pub fn pickles() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for line in eventlog_lines() {
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        if let Some(b64) = v.get("vars").and_then(|v| v.as_str()) {
            let compact: String = b64.split_whitespace().collect();
            out.push(base64_decode(&compact));
        }
    }
    out
}

pub fn base64_decode(s: &str) -> Vec<u8> {
    xmlrpc::decode_base64(s).unwrap()
}

pub fn bep_json_lines() -> Vec<Vec<u8>> {
    lines_of(BEP_FILES.iter().map(|f| format!("{f}.json")))
}

/// The frames (without their length prefix) of the binary BEP files.
pub fn bep_frames() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in BEP_FILES {
        let data = read(&format!("{f}.bin"));
        let mut framer = Framer::new(Cursor::new(data), Framing::Varint, f, 64 << 20);
        while let Next::Frame(fr) = framer.next_frame() {
            out.push(fr.bytes);
        }
    }
    out
}

/// Every `PublishBuildToolEventStreamRequest` of the BES captures, as sent on the wire.
pub fn bes_requests() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for f in BES_CAPTURES {
        let text = String::from_utf8(read(f)).unwrap();
        for call in parse_capture(&text, f).unwrap() {
            if let Call::Stream(reqs) = call {
                out.extend(reqs.iter().map(|r| r.encode_to_vec()));
            }
        }
    }
    out
}

/// XML-RPC bodies as BitBake's server and buildbus's client write them.
pub fn xmlrpc_bodies() -> Vec<Vec<u8>> {
    use xmlrpc::Value;
    let mut out: Vec<Vec<u8>> = pickles()
        .into_iter()
        .step_by(7)
        .map(|p| xmlrpc::encode_call("event.sendpickle", &[Value::Base64(p)]).into_bytes())
        .collect();
    out.push(xmlrpc::encode_call("event.quit", &[]).into_bytes());
    out.push(xmlrpc::encode_call("system.listMethods", &[]).into_bytes());
    out.push(xmlrpc::encode_response(&Value::Nil).into_bytes());
    out.push(xmlrpc::encode_fault(1, "no such method <&>").into_bytes());
    let mixed = Value::Struct(vec![
        ("int".into(), Value::Int(-7)),
        ("double".into(), Value::Double(2.5)),
        ("bool".into(), Value::Bool(true)),
        ("text".into(), Value::str("a < b & c")),
        ("when".into(), Value::DateTime("20261121T11:02:16".into())),
        (
            "list".into(),
            Value::Array(vec![Value::Nil, Value::Base64(b"\x00\xff".to_vec())]),
        ),
    ]);
    out.push(xmlrpc::encode_response(&mixed).into_bytes());
    out.push(
        xmlrpc::encode_call("runCommand", &[Value::strings(["buildTargets", "x"])]).into_bytes(),
    );
    out
}

// ------------------------------------------------------------------------------------
// Checks: one decoder each
// ------------------------------------------------------------------------------------

/// Every error of a stream report is positioned inside the input and says where.
pub fn positioned(report: &StreamReport, len: usize, line_oriented: bool) -> Result<(), String> {
    for e in &report.errors {
        let shown = e.to_string();
        if e.pos.offset > len as u64 {
            return Err(format!("error past the input's end: {shown}"));
        }
        if !shown.contains(&format!("(byte {})", e.pos.offset)) {
            return Err(format!("error without its byte offset: {shown}"));
        }
        let at_start = e.pos.offset == 0 && e.pos.line.is_none() && e.pos.event.is_none();
        if !at_start && line_oriented && e.pos.line.is_none() {
            return Err(format!("error without its line: {shown}"));
        }
    }
    Ok(())
}

pub fn stream(bytes: &[u8], format: Option<Format>, name: &str) -> StreamReport {
    translate_reader(
        Cursor::new(bytes),
        Path::new(name),
        format,
        &ctx(),
        &mut |_| {},
    )
}

pub fn check_pickle(input: &[u8]) -> Result<(), String> {
    match pickle::loads(input) {
        Ok(v) => {
            let _ = pickle::to_json(&v);
            Ok(())
        }
        Err(e) => pickle_positioned(&e, input.len()),
    }
}

pub fn pickle_positioned(e: &pickle::PickleError, len: usize) -> Result<(), String> {
    let shown = e.to_string();
    if e.offset > len {
        return Err(format!("pickle error past the end ({len} bytes): {shown}"));
    }
    if !shown.starts_with(&format!("pickle: byte {}", e.offset)) {
        return Err(format!("pickle error without its offset: {shown}"));
    }
    Ok(())
}

/// One event-log line through the file reader: frame, decode, translate.
pub fn check_eventlog_line(input: &[u8]) -> Result<(), String> {
    let _ = bbcodec::decode_line(input);
    let report = stream(input, Some(EVENTLOG), "fuzz.eventlog");
    positioned(&report, input.len(), true)
}

pub fn check_bep_json(input: &[u8]) -> Result<(), String> {
    let _ = codec::decode_json(input);
    let report = stream(input, Some(BEP_JSON), "fuzz.json");
    positioned(&report, input.len(), true)
}

/// One frame, sparse and in full, then as a length-prefixed stream through the reader.
pub fn check_bep_frame(input: &[u8]) -> Result<(), String> {
    let _ = codec::decode_binary(input, &Needs::ALL);
    let _ = codec::decode_binary(input, &Needs::of(["option:cpu"]));
    let mut framed = Vec::with_capacity(input.len() + 10);
    let mut n = input.len() as u64;
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            framed.push(b);
            break;
        }
        framed.push(b | 0x80);
    }
    framed.extend_from_slice(input);
    let report = stream(&framed, Some(BEP_BINARY), "fuzz.bin");
    for e in &report.errors {
        // A bad frame names its event number.
        if e.pos.offset > 0 && e.pos.event.is_none() {
            return Err(format!("binary error without its event number: {e}"));
        }
    }
    positioned(&report, framed.len(), false)
}

/// An XML-RPC body as the live sink takes it: parsed as a call (and as a response, as
/// the client does); an `event.sendpickle` call's pickle decoded and translated.
pub fn check_xmlrpc(input: &[u8]) -> Result<(), String> {
    let limits = xmlrpc::Limits::default();
    let call = xmlrpc::parse_call(input, &limits);
    for e in [
        call.as_ref().err(),
        xmlrpc::parse_response(input, &limits).err().as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        let whole = matches!(
            e.reason,
            xmlrpc::Reason::Empty | xmlrpc::Reason::TooLarge { .. }
        );
        match e.offset {
            Some(o) if o <= input.len() as u64 => {
                if !e.to_string().contains(&format!("(at byte {o})")) {
                    return Err(format!("XML-RPC error without its offset: {e}"));
                }
            }
            Some(_) => return Err(format!("XML-RPC error past the end: {e}")),
            None if whole => {}
            None => return Err(format!("XML-RPC error without a position: {e}")),
        }
    }
    if let Ok(call) = call {
        if let [xmlrpc::Value::Base64(p)] = &call.params[..] {
            if let Err(e) = pickle::loads(p) {
                pickle_positioned(&e, p.len())?;
            }
            if let Ok(ev) = bbcodec::decode_pickle(p.clone(), None) {
                let mut tr = BitbakeTranslator::new(ctx(), SourceMeta::default());
                tr.event(ev, &mut |_| {});
                tr.finish(&mut |_| {});
            }
        }
    }
    Ok(())
}

/// A BES request as the backend takes it: decoded by tonic (prost), its Bazel event
/// decoded and translated as the invocation's task does.
pub fn check_bes(input: &[u8]) -> Result<(), String> {
    let req = match PublishBuildToolEventStreamRequest::decode(input) {
        Ok(r) => r,
        // tonic answers INVALID_ARGUMENT with prost's message; no position to give.
        Err(e) if e.to_string().is_empty() => return Err("an empty decode error".into()),
        Err(_) => return Ok(()),
    };
    let Some(ev) = req.ordered_build_event else {
        return Ok(());
    };
    let mut tr = BazelTranslator::new(ctx(), SourceMeta::default());
    match ev.event.and_then(|e| e.event) {
        Some(BesEvent::BazelEvent(any)) if any.type_url == BAZEL_EVENT_TYPE => {
            if let Ok(ev) = codec::decode_binary(&any.value, &Needs::ALL) {
                tr.event(ev, &mut |_| {});
            }
        }
        Some(BesEvent::ComponentStreamFinished(_)) => tr.finish(&mut |_| {}),
        _ => {}
    }
    tr.finish(&mut |_| {});
    Ok(())
}

/// A whole file through the reader, format detected from its head.
pub fn check_whole_stream(input: &[u8]) -> Result<(), String> {
    let report = stream(input, None, "fuzz-input");
    positioned(&report, input.len(), false)
}
