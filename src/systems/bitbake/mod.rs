//! BitBake (Yocto): event logs and live sessions, translated.
//!
//! - [`artifacts`]: where a build leaves its artifacts (the deploy directory);
//! - [`codec`]: one event-log line (an event, or the build's variables) to a typed
//!   event, through the non-executing [pickle reader](crate::decode::pickle);
//! - [`pyformat`]: Python's `%`-formatting of log records;
//! - [`translate`]: the live model of a BitBake command that turns events into messages;
//! - this file: BitBake as a registered [`BuildSystem`] (the event-log format, how to
//!   tell it, its derivation rules).

pub mod artifacts;
pub mod codec;
pub mod pyformat;
pub mod translate;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub use translate::BitbakeTranslator;

use super::{
    ArtifactTrees, BuildSystem, Context, Emit, Format, StreamStats, StreamTranslator, Translator,
};
use crate::decode::framing::Framing;
use crate::decode::Reason;
use crate::model::SourceMeta;

/// The event log of `bitbake -w FILE`: JSON lines of base64 pickles.
pub const EVENTLOG: Format = Format {
    name: "bitbake-eventlog",
    system: "bitbake",
    framing: Framing::JsonLines,
};

/// BitBake in the registry ([`super::SYSTEMS`]).
pub static BITBAKE: Bitbake = Bitbake;

/// The BitBake build system.
#[derive(Debug)]
pub struct Bitbake;

/// Whether a first line is an event log's: the variables line, or an event line.
fn is_eventlog_line(l: &[u8]) -> bool {
    let l = String::from_utf8_lossy(&l[..l.len().min(4096)]).replace(' ', "");
    l.starts_with("{\"allvariables\"") || (l.contains("\"class\":") && l.contains("\"vars\":"))
}

impl BuildSystem for Bitbake {
    fn name(&self) -> &'static str {
        "bitbake"
    }

    fn formats(&self) -> &'static [Format] {
        &[EVENTLOG]
    }

    fn by_name(&self, ext: &str, first_line: &[u8]) -> Option<Format> {
        match ext {
            "eventlog" => Some(EVENTLOG),
            "json" | "jsonl" | "ndjson" if is_eventlog_line(first_line) => Some(EVENTLOG),
            _ => None,
        }
    }

    fn by_content(&self, head: &[u8], first_line: &[u8]) -> Option<Format> {
        let first = head.iter().find(|b| !b.is_ascii_whitespace());
        (first == Some(&b'{') && is_eventlog_line(first_line)).then_some(EVENTLOG)
    }

    fn is_build_dir(&self, dir: &Path, _links: &[String]) -> bool {
        artifacts::is_build_dir(dir)
    }

    fn artifact_trees(
        &self,
        dir: &Path,
        metadata: &BTreeMap<String, String>,
        _links: &[String],
    ) -> Option<ArtifactTrees> {
        artifacts::trees(dir, metadata)
    }

    fn open(
        &self,
        _format: Format,
        ctx: &Arc<Context>,
        source: SourceMeta,
    ) -> Box<dyn StreamTranslator> {
        Box::new(BitbakeStream(BitbakeTranslator::new(
            Arc::clone(ctx),
            source,
        )))
    }
}

/// An event log: the line codec, then the translator.
struct BitbakeStream(BitbakeTranslator);

impl StreamTranslator for BitbakeStream {
    fn frame(&mut self, bytes: &[u8], out: &mut Emit<'_>) -> Result<(), Reason> {
        let ev = codec::decode_line(bytes)?;
        self.0.event(ev, out);
        Ok(())
    }

    fn finish(&mut self, out: &mut Emit<'_>) {
        self.0.finish(out)
    }

    fn complete(&self) -> bool {
        self.0.complete()
    }

    fn stats(&self) -> StreamStats {
        StreamStats {
            builds: self.0.stats().builds,
            unknown: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allvariables_that_is_not_a_mapping_is_a_bad_event() {
        let ctx = Arc::new(Context::builtin());
        let mut tr = BITBAKE.open(EVENTLOG, &ctx, SourceMeta::default());
        let mut messages = 0;
        for (line, kind) in [
            (r#"{"allvariables": 5}"#, "a number"),
            (r#"{"allvariables": "x"}"#, "a string"),
            (r#"{"allvariables": [1]}"#, "an array"),
            (r#"{"allvariables": true}"#, "a boolean"),
        ] {
            let e = tr
                .frame(line.as_bytes(), &mut |_| messages += 1)
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "invalid event: allvariables is {kind}, not a mapping of variables \
                     ({{\"VAR\": {{\"v\": value}}}})"
                ),
                "{line}"
            );
        }
        // A mapping (even an empty one) is fine.
        tr.frame(br#"{"allvariables": {}}"#, &mut |_| messages += 1)
            .unwrap();
        tr.frame(
            br#"{"allvariables": {"MACHINE": {"v": "qemux86-64"}}}"#,
            &mut |_| messages += 1,
        )
        .unwrap();
        assert_eq!(messages, 0);
    }
}
