//! Decoding one line of a BitBake event log (`bitbake -w FILE`) into a [`BbEvent`].
//!
//! A line is either an event, `{"class": "bb.build.TaskStarted", "vars": "<base64>"}`
//! (base64 of a pickle, with a newline every 76 characters), or the build's variables,
//! `{"allvariables": {VAR: {"v": value, "history": [...], ...}}}`, written right after
//! `BuildStarted`. Only the values of the variables are kept.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;

use crate::decode::error::Reason;
use crate::decode::pickle::{self, Value};

/// One decoded BitBake event.
#[derive(Debug, Clone)]
pub enum BbEvent {
    /// A pickled event: its class, its pickle, and the decoded object (`None` for the
    /// classes the translator does not read: they are not decoded at all).
    Event {
        class: String,
        raw: Vec<u8>,
        value: Option<Value>,
    },
    /// The build's variables (`allvariables` of the event log, or fetched live).
    Variables(BTreeMap<String, String>),
}

#[derive(Deserialize)]
struct Line {
    class: Option<String>,
    vars: Option<String>,
    allvariables: Option<serde_json::Value>,
}

/// The values of an `allvariables` object (`{VAR: {"v": value, ...}}`); variables
/// without a value are left out, non-string values are kept as JSON text. Anything but
/// a mapping is an error (a bad event, not a build without variables).
pub fn variables_from_json(all: &serde_json::Value) -> Result<BTreeMap<String, String>, Reason> {
    use serde_json::Value as J;
    let kind = match all {
        J::Object(_) => "",
        J::Null => "null",
        J::Bool(_) => "a boolean",
        J::Number(_) => "a number",
        J::String(_) => "a string",
        J::Array(_) => "an array",
    };
    let Some(map) = all.as_object() else {
        return Err(Reason::Event(format!(
            "allvariables is {kind}, not a mapping of variables ({{\"VAR\": {{\"v\": value}}}})"
        )));
    };
    Ok(map
        .iter()
        .filter_map(|(k, e)| {
            let v = match e.get("v")? {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => return None,
                other => other.to_string(),
            };
            Some((k.clone(), v))
        })
        .collect())
}

/// Decodes the pickle of an event and checks its class.
pub fn decode_pickle(raw: Vec<u8>, class: Option<&str>) -> Result<BbEvent, Reason> {
    let value = pickle::loads(&raw).map_err(|e| Reason::Event(e.to_string()))?;
    let found = value
        .as_object()
        .map(|o| o.class.to_string())
        .ok_or_else(|| {
            Reason::Event(format!(
                "the pickle holds a {}, not an event object",
                value.kind()
            ))
        })?;
    if let Some(c) = class {
        if c != found {
            return Err(Reason::Event(format!(
                "line says class {c} but the pickle holds {found}"
            )));
        }
    }
    Ok(BbEvent::Event {
        class: found,
        raw,
        value: Some(value),
    })
}

/// Decodes one event-log line.
pub fn decode_line(bytes: &[u8]) -> Result<BbEvent, Reason> {
    let text = std::str::from_utf8(bytes).map_err(|e| Reason::InvalidUtf8(e.valid_up_to()))?;
    let line: Line = serde_json::from_str(text).map_err(|e| Reason::Json(e.to_string()))?;
    if let Some(vars) = line.allvariables {
        return Ok(BbEvent::Variables(variables_from_json(&vars)?));
    }
    let (Some(class), Some(vars)) = (line.class, line.vars) else {
        return Err(Reason::Event(
            "neither an event (class, vars) nor allvariables".into(),
        ));
    };
    if !(class.starts_with("bb.") || class.starts_with("logging.")) {
        return Err(Reason::Event(format!(
            "class {class} is not a BitBake event class; its pickle was not decoded"
        )));
    }
    let compact: Vec<u8> = vars.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&compact)
        .map_err(|e| Reason::Event(format!("vars is not base64: {e}")))?;
    if !relevant(&class) {
        return Ok(BbEvent::Event {
            class,
            raw,
            value: None,
        });
    }
    decode_pickle(raw, Some(&class))
}

/// Whether the translator reads events of this class (by its last name). The event-log
/// reader does not even decode the pickles of the others (parse progress, recipe
/// hooks, ...).
pub fn relevant(class: &str) -> bool {
    let short = class.rsplit('.').next().unwrap_or(class);
    matches!(
        short,
        "BuildInit"
            | "BuildStarted"
            | "BuildCompleted"
            | "CommandCompleted"
            | "CommandFailed"
            | "CommandExit"
            | "MetadataEvent"
            | "DepTreeGenerated"
            | "ParseCompleted"
            | "CacheLoadCompleted"
            | "NoProvider"
            | "MultipleProviders"
            | "DiskFull"
            | "LogRecord"
            | "HeartbeatEvent"
            | "TaskStarted"
            | "TaskSucceeded"
            | "TaskFailed"
            | "TaskFailedSilent"
            | "runQueueTaskStarted"
            | "runQueueTaskCompleted"
            | "runQueueTaskFailed"
            | "runQueueTaskSkipped"
            | "sceneQueueTaskCompleted"
            | "sceneQueueTaskFailed"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_clear_errors() {
        assert!(matches!(decode_line(b"{"), Err(Reason::Json(_))));
        assert!(matches!(decode_line(b"{\"x\":1}"), Err(Reason::Event(_))));
        let e = decode_line(b"{\"class\":\"bb.event.X\",\"vars\":\"!!!\"}").unwrap_err();
        assert!(e.to_string().contains("base64"), "{e}");
        // A REDUCE of os.system is refused, never run.
        let evil = "gASMAm9zlIwGc3lzdGVtlJOUjAJsc5SFlFKULg==";
        let line = format!("{{\"class\":\"bb.event.BuildStarted\",\"vars\":\"{evil}\"}}");
        let e = decode_line(line.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("os.system"), "{e}");
    }
}
