//! EVT, the Event Translation Layer: raw build events in, normalized messages out.
//!
//! One folder per build system holds its *source* side (how its events are framed and
//! decoded) and its *translate* side (a live model of the build that turns events into
//! [`Envelope`]s). Everything shared lives here:
//! - [`framing`]: cutting byte streams into events (JSON lines, varint-delimited);
//! - [`error`]: input errors with origin, position and reason;
//! - [`fields`]: resolving the Pulse fields from configured rules;
//! - [`redact`]: keeping secrets out of messages;
//! - [`console`]: warnings and errors in console text;
//! - [`stream`]: driving a file through framer, decoder and translator.
//!
//! Adding a build system means one new folder with a decoder and a [`Translator`], and
//! one arm in [`stream`].

pub mod bazel;
pub mod bitbake;
pub mod console;
pub mod error;
pub mod fields;
pub mod framing;
pub mod redact;
pub mod stream;

use std::collections::HashMap;

use crate::config::{Config, DeriveRules, FieldValues};
use crate::model::Envelope;

pub use error::{InputError, Position, Reason};
pub use stream::{
    read_file, translate_file, translate_reader, Follow, Format, Progress, Sink, StreamReport,
};

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
    pub fn new(cfg: &Config, overrides: &FieldValues) -> Context {
        let mut fixed = cfg.fields.clone();
        fixed.overlay(overrides);
        let derive = HashMap::from([
            ("bazel".to_string(), cfg.bazel.derive.clone()),
            ("bitbake".to_string(), cfg.bitbake.derive.clone()),
        ]);
        // `Config::parse` validated the patterns; an unparsable set means a config built
        // in code, and then no pattern is better than a panic.
        let redactor = redact::Redactor::new(&cfg.redaction).unwrap_or_else(|_| {
            redact::Redactor::new(&Default::default()).expect("empty redaction config")
        });
        Context {
            fixed,
            derive,
            redactor,
            exchange_prefix: cfg.bus.exchange_prefix.clone(),
            max_event_bytes: cfg.limits.max_event_bytes,
        }
    }

    /// The built-in configuration, no overrides.
    pub fn builtin() -> Context {
        Context::new(&Config::builtin(), &FieldValues::default())
    }

    /// The Pulse fields of build `build_id` of `system`, frozen from its state `src`
    /// with this context's rules and fixed values.
    pub fn pulse_fields(
        &self,
        system: &str,
        src: &dyn fields::RuleSource,
        build_id: &str,
    ) -> fields::PulseFields {
        fields::PulseFields::resolve(self.rules(system), &self.fixed, src, build_id, system)
    }

    /// The derivation rules of a build system.
    pub fn rules(&self, system: &str) -> &DeriveRules {
        static NONE: std::sync::LazyLock<DeriveRules> =
            std::sync::LazyLock::new(DeriveRules::default);
        self.derive.get(system).unwrap_or(&NONE)
    }
}
