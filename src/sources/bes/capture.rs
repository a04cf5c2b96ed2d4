//! Recorded BES sessions, and a client that plays them against a backend.
//!
//! A capture is what a recording BES server saw from a real Bazel, one JSON object per
//! line (`tests/fixtures/bazel/bes_capture*.jsonl`): `rpc`, and a `request` as proto3
//! JSON with the `bazel_event` `Any` expanded (`"@type":
//! "type.googleapis.com/build_event_stream.BuildEvent"` beside the event's fields);
//! stream lines carry `stream` (the n-th stream). Responses and stream events
//! (`open`, `abort …`, `half-close`) are what the recording server did, not input.
//!
//! [`read_capture`] turns a capture into the calls Bazel made, in order; [`replay`]
//! makes those calls against a backend, each stream's requests sent without waiting
//! for acks (as Bazel does), then checks the acks: one per request, in order.

use std::path::Path;

use prost::Message;
use serde_json::Value;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::proto::v1::publish_build_event_client::PublishBuildEventClient;
use super::proto::v1::{
    build_event, PublishBuildToolEventStreamRequest, PublishLifecycleEventRequest,
};
use super::proto::BAZEL_EVENT_TYPE;
use crate::decode::bep::proto::build_event_stream::BuildEvent as BepEvent;

/// One call Bazel made.
#[derive(Debug, Clone)]
pub enum Call {
    Lifecycle(Box<PublishLifecycleEventRequest>),
    /// One `PublishBuildToolEventStream` RPC: its requests in the order sent.
    Stream(Vec<PublishBuildToolEventStreamRequest>),
}

/// Errors reading a capture or replaying it.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Bad {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{0}")]
    Rpc(String),
}

/// Replaces an expanded `Any` holding a Bazel event by its proto3 JSON form
/// (`typeUrl` + base64 `value`).
fn pack_bazel_event(v: &mut Value) -> Result<(), String> {
    let Some(obj) = v.as_object_mut() else {
        return Err("bazelEvent is not an object".into());
    };
    let type_url = obj
        .remove("@type")
        .and_then(|t| t.as_str().map(str::to_string))
        .unwrap_or_default();
    if type_url != BAZEL_EVENT_TYPE {
        return Err(format!("bazelEvent of unexpected type {type_url:?}"));
    }
    let ev: BepEvent = serde_json::from_value(Value::Object(std::mem::take(obj)))
        .map_err(|e| format!("bazelEvent: {e}"))?;
    use base64::Engine as _;
    let value = base64::engine::general_purpose::STANDARD.encode(ev.encode_to_vec());
    *v = serde_json::json!({ "typeUrl": type_url, "value": value });
    Ok(())
}

/// Reads a capture file into the calls it records, in order.
pub fn read_capture(path: &Path) -> Result<Vec<Call>, CaptureError> {
    let text = std::fs::read_to_string(path).map_err(|source| CaptureError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_capture(&text, &path.display().to_string())
}

/// [`read_capture`] on text; `origin` names it in errors.
pub fn parse_capture(text: &str, origin: &str) -> Result<Vec<Call>, CaptureError> {
    let bad = |line: usize, reason: String| CaptureError::Bad {
        path: origin.to_string(),
        line,
        reason,
    };
    let mut calls = Vec::new();
    // The call index of each open stream number.
    let mut streams: Vec<(u64, usize)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let mut v: Value = serde_json::from_str(line).map_err(|e| bad(n, e.to_string()))?;
        let rpc = v
            .get("rpc")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let Some(mut req) = v.get_mut("request").map(Value::take) else {
            continue;
        };
        match rpc.as_str() {
            "PublishLifecycleEvent" => {
                let r: PublishLifecycleEventRequest =
                    serde_json::from_value(req).map_err(|e| bad(n, e.to_string()))?;
                calls.push(Call::Lifecycle(Box::new(r)));
            }
            "PublishBuildToolEventStream" => {
                if let Some(any) = req.pointer_mut("/orderedBuildEvent/event/bazelEvent") {
                    pack_bazel_event(any).map_err(|e| bad(n, e))?;
                }
                let r: PublishBuildToolEventStreamRequest =
                    serde_json::from_value(req).map_err(|e| bad(n, e.to_string()))?;
                let stream = v.get("stream").and_then(Value::as_u64).unwrap_or(0);
                let at = match streams.iter().find(|(s, _)| *s == stream) {
                    Some((_, at)) => *at,
                    None => {
                        calls.push(Call::Stream(Vec::new()));
                        streams.push((stream, calls.len() - 1));
                        calls.len() - 1
                    }
                };
                if let Call::Stream(reqs) = &mut calls[at] {
                    reqs.push(r);
                }
            }
            other => return Err(bad(n, format!("unknown rpc {other:?}"))),
        }
    }
    Ok(calls)
}

/// The Bazel events (`bazel_event` payloads) of a capture's streams, decoded, in
/// sequence-number order, each number once: what a backend should translate.
pub fn bazel_events(calls: &[Call]) -> Vec<BepEvent> {
    let mut by_seq = std::collections::BTreeMap::new();
    for c in calls {
        if let Call::Stream(reqs) = c {
            for r in reqs {
                let Some(o) = &r.ordered_build_event else {
                    continue;
                };
                if let Some(build_event::Event::BazelEvent(any)) =
                    o.event.as_ref().and_then(|e| e.event.as_ref())
                {
                    if let Ok(ev) = BepEvent::decode(&any.value[..]) {
                        by_seq.entry(o.sequence_number).or_insert(ev);
                    }
                }
            }
        }
    }
    by_seq.into_values().collect()
}

/// What the file translator makes of a capture's Bazel events: the messages a backend
/// should publish for it (build metadata aside, which the BES adds `bes.*` facts to).
pub fn translate(
    calls: &[Call],
    ctx: std::sync::Arc<crate::systems::Context>,
) -> Vec<crate::model::Envelope> {
    use crate::systems::Translator;
    let mut tr =
        crate::systems::bazel::BazelTranslator::new(ctx, crate::model::SourceMeta::default());
    let mut out = Vec::new();
    for ev in bazel_events(calls) {
        tr.event(Box::new(ev), &mut |e| out.push(e));
    }
    tr.finish(&mut |e| out.push(e));
    out
}

/// How a replay went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub lifecycle_calls: usize,
    pub streams: usize,
    pub requests: usize,
    /// Acks received, over all streams.
    pub acks: usize,
}

/// Extra request headers (auth).
pub type Headers = Vec<(String, String)>;

/// Connects a client to `addr` (`http://HOST:PORT`).
pub async fn connect(addr: &str) -> Result<PublishBuildEventClient<Channel>, CaptureError> {
    PublishBuildEventClient::connect(addr.to_string())
        .await
        .map_err(|e| CaptureError::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}

fn with_headers<T>(msg: T, headers: &Headers) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            k.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
            v.parse(),
        ) {
            req.metadata_mut().insert(k, v);
        }
    }
    req
}

/// Sends one stream's requests (all at once, as Bazel does), half-closes, and
/// returns the acked sequence numbers in the order they came.
pub async fn send_stream(
    client: &mut PublishBuildEventClient<Channel>,
    reqs: Vec<PublishBuildToolEventStreamRequest>,
    headers: &Headers,
) -> Result<Vec<i64>, CaptureError> {
    let outbound = tokio_stream::iter(reqs);
    let resp = client
        .publish_build_tool_event_stream(with_headers(outbound, headers))
        .await
        .map_err(|s| {
            CaptureError::Rpc(format!("stream refused: {:?}: {}", s.code(), s.message()))
        })?;
    let mut acks = Vec::new();
    let mut inbound = resp.into_inner();
    while let Some(a) = inbound.next().await {
        match a {
            Ok(a) => acks.push(a.sequence_number),
            Err(s) => {
                return Err(CaptureError::Rpc(format!(
                    "stream failed after {} acks: {:?}: {}",
                    acks.len(),
                    s.code(),
                    s.message()
                )))
            }
        }
    }
    Ok(acks)
}

/// Plays `calls` against the backend at `addr`, in order. Each stream must be acked
/// once per request, in increasing sequence-number order.
pub async fn replay(
    addr: &str,
    calls: Vec<Call>,
    headers: &Headers,
) -> Result<ReplayReport, CaptureError> {
    let mut client = connect(addr).await?;
    let mut report = ReplayReport::default();
    for c in calls {
        match c {
            Call::Lifecycle(r) => {
                client
                    .publish_lifecycle_event(with_headers(*r, headers))
                    .await
                    .map_err(|s| {
                        CaptureError::Rpc(format!(
                            "lifecycle call failed: {:?}: {}",
                            s.code(),
                            s.message()
                        ))
                    })?;
                report.lifecycle_calls += 1;
            }
            Call::Stream(reqs) => {
                let mut want: Vec<i64> = reqs
                    .iter()
                    .filter_map(|r| r.ordered_build_event.as_ref().map(|o| o.sequence_number))
                    .collect();
                want.sort_unstable();
                want.dedup();
                report.requests += reqs.len();
                let acks = send_stream(&mut client, reqs, headers).await?;
                if acks != want {
                    return Err(CaptureError::Rpc(format!(
                        "stream {}: acks {:?} do not match the requests' sequence numbers {:?}",
                        report.streams + 1,
                        acks,
                        want
                    )));
                }
                report.acks += acks.len();
                report.streams += 1;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_capture_lines_are_named_by_origin_and_line() {
        let good =
            r#"{"rpc": "PublishLifecycleEvent", "request": {"serviceLevel": "INTERACTIVE"}}"#;
        let text = format!("{good}\n\nnot json\n");
        let e = parse_capture(&text, "cap.jsonl").unwrap_err().to_string();
        assert!(e.starts_with("cap.jsonl line 3: "), "{e}");
        let wrong_any = r#"{"rpc": "PublishBuildToolEventStream", "stream": 1, "request": {"orderedBuildEvent": {"event": {"bazelEvent": {"@type": "type.googleapis.com/x.Y"}}}}}"#;
        let e = parse_capture(wrong_any, "c").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("x.Y"), "{e}");
        let e = parse_capture(r#"{"rpc": "Nope", "request": {}}"#, "c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown rpc"), "{e}");
        assert_eq!(parse_capture(good, "c").unwrap().len(), 1);
    }
}
