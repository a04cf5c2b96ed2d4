//! Bazel: Build Event Protocol events, translated.
//!
//! - [`translate`]: the live model of an invocation that turns BEP events (decoded by
//!   [`crate::decode::bep`]) into messages;
//! - this file: Bazel as a registered [`BuildSystem`] (its two file formats, how to
//!   tell them, its derivation rules, where its artifacts are).

pub mod translate;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub use translate::BazelTranslator;

use super::{
    ArtifactTrees, BuildSystem, Context, Emit, Format, StreamStats, StreamTranslator, Translator,
};
use crate::decode::bep::codec::{self, Needs};
use crate::decode::framing::Framing;
use crate::decode::Reason;
use crate::model::SourceMeta;

/// `--build_event_json_file`.
pub const BEP_JSON: Format = Format {
    name: "bep-json",
    system: "bazel",
    framing: Framing::JsonLines,
};

/// `--build_event_binary_file`.
pub const BEP_BINARY: Format = Format {
    name: "bep-binary",
    system: "bazel",
    framing: Framing::Varint,
};

/// Bazel in the registry ([`super::SYSTEMS`]).
pub static BAZEL: Bazel = Bazel;

/// The Bazel build system.
#[derive(Debug)]
pub struct Bazel;

impl BuildSystem for Bazel {
    fn name(&self) -> &'static str {
        "bazel"
    }

    fn formats(&self) -> &'static [Format] {
        &[BEP_JSON, BEP_BINARY]
    }

    fn by_name(&self, ext: &str, _first_line: &[u8]) -> Option<Format> {
        match ext {
            "json" | "jsonl" | "ndjson" => Some(BEP_JSON),
            "bin" | "pb" | "binpb" => Some(BEP_BINARY),
            _ => None,
        }
    }

    fn by_content(&self, head: &[u8], _first_line: &[u8]) -> Option<Format> {
        match head.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Some(BEP_JSON),
            // A BEP binary frame starts with a varint length, then field 1 (id), wire
            // type 2.
            Some(_) if head.iter().skip_while(|&&b| b & 0x80 != 0).nth(1) == Some(&0x0a) => {
                Some(BEP_BINARY)
            }
            _ => None,
        }
    }

    fn is_build_dir(&self, dir: &Path, links: &[String]) -> bool {
        let has = |name: &str| dir.join(name).symlink_metadata().is_ok();
        links.iter().any(|l| has(l))
            || ["WORKSPACE", "WORKSPACE.bazel", "MODULE.bazel", "bazel-out"]
                .iter()
                .any(|f| has(f))
    }

    /// The workspace, plus the targets of its convenience links named in `links`
    /// (`bazel-bin`, `bazel-testlogs`), each as a tree of its own.
    fn artifact_trees(
        &self,
        dir: &Path,
        _metadata: &BTreeMap<String, String>,
        links: &[String],
    ) -> Option<ArtifactTrees> {
        let mut trees = vec![(dir.to_path_buf(), String::new())];
        for link in links {
            let p = dir.join(link);
            if p.symlink_metadata().is_ok() {
                trees.push((p, link.clone()));
            }
        }
        Some(ArtifactTrees {
            trees,
            how: dir.display().to_string(),
        })
    }

    fn open(
        &self,
        format: Format,
        ctx: &Arc<Context>,
        source: SourceMeta,
    ) -> Box<dyn StreamTranslator> {
        Box::new(BazelStream {
            needs: BazelTranslator::decode_needs(ctx),
            binary: format == BEP_BINARY,
            tr: BazelTranslator::new(Arc::clone(ctx), source),
        })
    }
}

/// A BEP file: the JSON or binary codec, then the translator.
struct BazelStream {
    tr: BazelTranslator,
    needs: Needs,
    binary: bool,
}

impl StreamTranslator for BazelStream {
    fn frame(&mut self, bytes: &[u8], out: &mut Emit<'_>) -> Result<(), Reason> {
        // A zero-length message decodes to an empty BuildEvent (no id, no payload):
        // Bazel never writes one, so it is a bad event, not an event to skip quietly.
        if self.binary && bytes.is_empty() {
            return Err(Reason::Protobuf(
                "empty frame (length 0): no BuildEvent in it".into(),
            ));
        }
        let ev = codec::decode(bytes, self.binary, &self.needs)?;
        self.tr.event(ev, out);
        Ok(())
    }

    fn finish(&mut self, out: &mut Emit<'_>) {
        self.tr.finish(out)
    }

    fn complete(&self) -> bool {
        self.tr.complete()
    }

    fn stats(&self) -> StreamStats {
        StreamStats {
            builds: self.tr.stats().builds,
            unknown: self.tr.stats().unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_binary_frame_is_a_bad_event() {
        let ctx = Arc::new(Context::builtin());
        let mut tr = BAZEL.open(BEP_BINARY, &ctx, SourceMeta::default());
        let mut messages = 0;
        let e = tr.frame(b"", &mut |_| messages += 1).unwrap_err();
        assert_eq!(
            e,
            Reason::Protobuf("empty frame (length 0): no BuildEvent in it".into())
        );
        assert_eq!(
            e.to_string(),
            "invalid protobuf: empty frame (length 0): no BuildEvent in it"
        );
        assert_eq!(messages, 0);
        // A real first frame still translates after it.
        let data = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bazel/build_ok.bin"),
        )
        .unwrap();
        let (len, n) = crate::decode::framing::varint(&data).unwrap();
        tr.frame(&data[n..n + len as usize], &mut |_| messages += 1)
            .unwrap();
    }
}
