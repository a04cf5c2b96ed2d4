//! Build systems: what raw events *mean*, one folder per build system.
//!
//! Each folder ([`bazel`], [`bitbake`]) holds a build system's translator (a live model
//! of a build that turns decoded events into normalized [`Envelope`]s) and what it
//! needs for that: its event codec, its field-derivation defaults, where its artifacts
//! live. The byte-level decoders they use are in [`crate::decode`].
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

use crate::config::{Config, ConfigError, DeriveRules, FieldValues};
use crate::model::Envelope;

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
        let derive = HashMap::from([
            ("bazel".to_string(), cfg.bazel.derive.clone()),
            ("bitbake".to_string(), cfg.bitbake.derive.clone()),
        ]);
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
        fields::PulseFields::resolve(self.rules(system), &self.fixed, src, build_id, system)
    }

    /// The derivation rules of a build system.
    pub fn rules(&self, system: &str) -> &DeriveRules {
        static NONE: std::sync::LazyLock<DeriveRules> =
            std::sync::LazyLock::new(DeriveRules::default);
        self.derive.get(system).unwrap_or(&NONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
