//! Build systems: what raw events *mean*, one folder per build system.
//!
//! Each folder ([`bazel`], [`bitbake`]) holds a build system's translator (a live model
//! of a build that turns decoded events into normalized [`Envelope`]s) and what it
//! needs for that: its event codec, its field-derivation defaults, where its artifacts
//! live. The byte-level decoders they use are in [`crate::decode`].
//!
//! The build systems are registered in one list, [`SYSTEMS`]: each is a [`BuildSystem`]
//! (its name, the input formats it reads and how to tell them, its derivation rules,
//! and a [`StreamTranslator`] for a stream of one of its formats). Readers of files
//! ([`crate::sources::file`]) go through that list and know no system by name.
//!
//! Shared by every build system:
//! - [`Translator`] and [`Context`] (the configuration a translator needs, resolved once);
//! - [`fields`]: resolving the Pulse fields from configured rules;
//! - [`redact`]: keeping secrets out of messages;
//! - [`console`]: warnings and errors in console text.

pub mod bazel;
pub mod bitbake;
pub mod console;
pub mod fields;
pub mod redact;

use std::collections::HashMap;

use std::sync::Arc;

use crate::config::{Config, ConfigError, DeriveRules, FieldValues};
use crate::decode::framing::Framing;
use crate::decode::Reason;
use crate::model::{Envelope, SourceMeta};

/// Every build system buildbus knows, in the order formats are detected. A new build
/// system is one folder under `systems/` and one line here.
pub static SYSTEMS: &[&dyn BuildSystem] = &[&bitbake::BITBAKE, &bazel::BAZEL];

/// The build system called `name`.
pub fn system(name: &str) -> Option<&'static dyn BuildSystem> {
    SYSTEMS.iter().copied().find(|s| s.name() == name)
}

/// An input format: its name (`--format`, `_meta.source.format`), its build system and
/// how its events are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Format {
    pub name: &'static str,
    pub system: &'static str,
    pub framing: Framing,
}

impl Format {
    pub fn name(self) -> &'static str {
        self.name
    }

    pub fn system(self) -> &'static str {
        self.system
    }

    pub fn framing(self) -> Framing {
        self.framing
    }

    /// Every format of every registered system.
    pub fn all() -> impl Iterator<Item = Format> {
        SYSTEMS.iter().flat_map(|s| s.formats().iter().copied())
    }

    /// Parses a `--format` value; `auto` gives `None`.
    pub fn parse(s: &str) -> Result<Option<Format>, String> {
        if s == "auto" {
            return Ok(None);
        }
        Format::all()
            .find(|f| f.name == s)
            .map(Some)
            .ok_or_else(|| {
                let names: Vec<&str> = Format::all().map(|f| f.name).collect();
                format!("unknown format {s:?} (auto, {})", names.join(", "))
            })
    }

    /// Tells the format from the file name, else from the first bytes, asking every
    /// registered system in turn.
    pub fn detect(path: &std::path::Path, head: &[u8]) -> Result<Format, Reason> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let first_line = head.split(|&b| b == b'\n').next().unwrap_or(head);
        if let Some(f) = SYSTEMS.iter().find_map(|s| s.by_name(ext, first_line)) {
            return Ok(f);
        }
        if head.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(Reason::Empty);
        }
        SYSTEMS
            .iter()
            .find_map(|s| s.by_content(head, first_line))
            .ok_or_else(|| {
                Reason::Format(
                    "neither JSON lines nor varint-delimited protobuf; pass --format".into(),
                )
            })
    }
}

/// Counters of one translated stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Builds seen.
    pub builds: u64,
    /// Events of kinds this buildbus does not know (skipped, not an error).
    pub unknown: u64,
}

/// A build system's decoder and translator for one stream of one format, behind one
/// object-safe face: what a reader of framed events drives.
pub trait StreamTranslator {
    /// Decodes one framed event and translates it; a bad event is its reason (the
    /// reader adds the position) and changes nothing.
    fn frame(&mut self, bytes: &[u8], out: &mut Emit<'_>) -> Result<(), Reason>;
    /// The stream ended: emits whatever is still held.
    fn finish(&mut self, out: &mut Emit<'_>);
    /// Whether the stream said it is complete, so a follower can stop waiting.
    fn complete(&self) -> bool;
    fn stats(&self) -> StreamStats;
}

/// Where a build left its artifacts: directories to scan, each with the name its files'
/// paths start with (`deploy`, `bazel-bin`, or empty for the directory itself), and how
/// they were found (for logs and reports). The first is the build's own tree; the
/// others may be missing (they are then skipped with a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactTrees {
    pub trees: Vec<(std::path::PathBuf, String)>,
    pub how: String,
}

/// One build system, as the rest of buildbus sees it.
pub trait BuildSystem: Sync {
    /// Its name in messages (`_meta.source.system`, `payload.system`) and the config.
    fn name(&self) -> &'static str;
    /// The input formats it reads.
    fn formats(&self) -> &'static [Format];
    /// The format of a file with extension `ext` whose first line is `first_line`, if
    /// the name alone says it is one of this system's.
    fn by_name(&self, ext: &str, first_line: &[u8]) -> Option<Format>;
    /// The format of an input starting with `head`, if its bytes say it is one of this
    /// system's (asked when no system claimed the name).
    fn by_content(&self, head: &[u8], first_line: &[u8]) -> Option<Format>;
    /// Whether `dir` looks like a build directory of this system (`links`: the
    /// convenience links the artifact rules name, `root_links`).
    fn is_build_dir(&self, dir: &std::path::Path, links: &[String]) -> bool;
    /// Where a build of this system in `dir` left its artifacts, from its finished
    /// message's `metadata`; `None`: scan the whole directory.
    fn artifact_trees(
        &self,
        dir: &std::path::Path,
        metadata: &std::collections::BTreeMap<String, String>,
        links: &[String],
    ) -> Option<ArtifactTrees>;
    /// A translator for one stream of `format`.
    fn open(
        &self,
        format: Format,
        ctx: &Arc<Context>,
        source: SourceMeta,
    ) -> Box<dyn StreamTranslator>;
}

/// Where translated messages go: called once per message, in order.
pub type Emit<'a> = dyn FnMut(Envelope) + 'a;

/// A live model of a build, fed decoded events in stream order.
pub trait Translator {
    type Event;
    /// Takes one event; emits the messages it completes.
    fn event(&mut self, ev: Self::Event, out: &mut Emit<'_>);
    /// The stream ended: emits whatever is still held.
    fn finish(&mut self, out: &mut Emit<'_>);
    /// Whether the stream said it is complete (Bazel's `lastMessage`), so a follower
    /// can stop waiting for more.
    fn complete(&self) -> bool;
}

/// Everything a translator needs from the configuration, resolved once.
#[derive(Debug, Clone)]
pub struct Context {
    /// Fixed Pulse values (config `[fields]` overlaid with env and flags).
    pub fixed: FieldValues,
    derive: HashMap<String, DeriveRules>,
    pub redactor: redact::Redactor,
    pub exchange_prefix: String,
    pub max_event_bytes: u64,
}

impl Context {
    /// Builds the context from a configuration and the overrides from env and flags.
    ///
    /// Redaction fails closed: a pattern that does not compile is an error here (naming
    /// the pattern and the reason), never a context without redaction.
    pub fn new(cfg: &Config, overrides: &FieldValues) -> Result<Context, ConfigError> {
        let mut fixed = cfg.fields.clone();
        fixed.overlay(overrides);
        let names: Vec<&str> = SYSTEMS.iter().map(|s| s.name()).collect();
        cfg.check_systems(&names)?;
        let derive = SYSTEMS
            .iter()
            .map(|s| (s.name().to_string(), cfg.system(s.name()).derive.clone()))
            .collect::<HashMap<_, _>>();
        let redactor = redact::Redactor::new(&cfg.redaction).map_err(|(pattern, message)| {
            ConfigError::Pattern {
                path: "[redaction]".to_string(),
                pattern,
                message,
            }
        })?;
        Ok(Context {
            fixed,
            derive,
            redactor,
            exchange_prefix: cfg.bus.exchange_prefix.clone(),
            max_event_bytes: cfg.limits.max_event_bytes,
        })
    }

    /// The built-in configuration, no overrides.
    ///
    /// The built-in patterns are part of the program (a unit test compiles them), so
    /// this cannot fail at run time.
    pub fn builtin() -> Context {
        match Context::new(&Config::builtin(), &FieldValues::default()) {
            Ok(c) => c,
            Err(e) => panic!("the built-in configuration: {e}"),
        }
    }

    /// The Pulse fields of build `build_id` of `system`, frozen from its state `src`
    /// with this context's rules and fixed values.
    pub fn pulse_fields(
        &self,
        system: &str,
        src: &dyn fields::RuleSource,
        build_id: &str,
    ) -> fields::PulseFields {
        let src = Redacted {
            src,
            redactor: &self.redactor,
        };
        fields::PulseFields::resolve(self.rules(system), &self.fixed, &src, build_id, system)
    }

    /// The derivation rules of a build system.
    pub fn rules(&self, system: &str) -> &DeriveRules {
        static NONE: std::sync::LazyLock<DeriveRules> =
            std::sync::LazyLock::new(DeriveRules::default);
        self.derive.get(system).unwrap_or(&NONE)
    }
}

/// A build's state as derive rules see it: every value a rule takes from the stream is
/// redacted first (by the option rules for `option:NAME`, else by the key named in the
/// rule), so a rule can never copy a secret into a message.
struct Redacted<'a> {
    src: &'a dyn fields::RuleSource,
    redactor: &'a redact::Redactor,
}

impl fields::RuleSource for Redacted<'_> {
    fn lookup(&self, rule: &str) -> Option<String> {
        let value = self.src.lookup(rule)?;
        let mut parts = rule.split(':');
        let ns = parts.next().unwrap_or_default();
        let key = parts.next().unwrap_or_default();
        Some(if ns == "option" {
            let mut out = String::with_capacity(value.len());
            self.redactor.push_option(key, &value, &mut out);
            out
        } else {
            self.redactor.keyed(key, &value).into_owned()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_names_each_system_and_format_once() {
        let names: Vec<&str> = SYSTEMS.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["bitbake", "bazel"]);
        let formats: Vec<&str> = Format::all().map(|f| f.name).collect();
        assert_eq!(formats, ["bitbake-eventlog", "bep-json", "bep-binary"]);
        for s in SYSTEMS {
            assert!(s.formats().iter().all(|f| f.system == s.name()));
            assert_eq!(system(s.name()).map(|x| x.name()), Some(s.name()));
        }
        assert_eq!(Format::parse("auto"), Ok(None));
        assert_eq!(Format::parse("bep-binary"), Ok(Some(bazel::BEP_BINARY)));
        let e = Format::parse("xml").unwrap_err();
        assert!(
            e.contains("bep-json") && e.contains("bitbake-eventlog"),
            "{e}"
        );
    }

    #[test]
    fn formats_are_told_by_name_then_by_content() {
        use std::path::Path;
        let bb = br#"{"allvariables": {}}"#;
        let bep = br#"{"id":{"started":{}}}"#;
        let frame = [5u8, 0x0a, 3, 0x12, 1, 0];
        let d = |name: &str, head: &[u8]| Format::detect(Path::new(name), head);
        assert_eq!(d("x.eventlog", bep), Ok(bitbake::EVENTLOG));
        assert_eq!(d("x.json", bb), Ok(bitbake::EVENTLOG));
        assert_eq!(d("x.json", bep), Ok(bazel::BEP_JSON));
        assert_eq!(d("x.pb", bep), Ok(bazel::BEP_BINARY));
        assert_eq!(d("x", bb), Ok(bitbake::EVENTLOG));
        assert_eq!(d("x", bep), Ok(bazel::BEP_JSON));
        assert_eq!(d("x", &frame), Ok(bazel::BEP_BINARY));
        assert_eq!(d("x", b"  \n"), Err(Reason::Empty));
        assert!(matches!(d("x", b"hello"), Err(Reason::Format(_))));
    }

    #[test]
    fn a_bad_redaction_pattern_is_an_error_never_no_redaction() {
        let mut cfg = Config::builtin();
        cfg.redaction.value_patterns.push("(unclosed".into());
        let e = Context::new(&cfg, &FieldValues::default()).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("(unclosed") && text.contains("[redaction]"),
            "{text}"
        );
        // The built-in rules compile, and they do redact.
        let ctx = Context::builtin();
        assert_eq!(
            ctx.redactor.arg("--client_env=TOKEN=abc"),
            "--client_env=TOKEN=<redacted>"
        );
    }
}
