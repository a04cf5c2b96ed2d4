//! Redaction: secrets never leave the EVT.
//!
//! Every value a front end copies from the stream into a message that could carry a
//! secret (command-line options, Bazel build metadata, BitBake variables) goes through a
//! [`Redactor`] first. Three rules, all from `[redaction]` in the configuration:
//! - the whole value of an option named in `options` (`--client_env=HOME=/x` becomes
//!   `--client_env=HOME=<redacted>`: the variable name stays, its value goes);
//! - the value of a `NAME=VALUE` pair, a metadata key or an option whose name matches a
//!   `key_patterns` regex;
//! - any part of any value matching a `value_patterns` regex (its `keep` and `tail`
//!   groups, where it has them, are kept around the redaction).

use std::borrow::Cow;

use regex::{Regex, RegexSet};

use crate::config::RedactionConfig;

/// What a secret is replaced with.
pub const REDACTED: &str = "<redacted>";

#[derive(Debug, Clone)]
pub struct Redactor {
    options: Vec<String>,
    keys: RegexSet,
    values: Vec<Regex>,
    /// All value patterns at once: most values match none, and one pass says so.
    any_value: RegexSet,
    /// Key and value patterns at once, for a whole argument: when none matches anywhere
    /// in `--name=value`, no rule can change it. `None` when a pattern has an anchor
    /// (`^`, `$`, `\A`, `\z`): it could match a part on its own but not inside the whole.
    /// (Word boundaries are fine: the parts are separated by `--` and `=`.)
    anywhere: Option<RegexSet>,
}

/// Compiles patterns into one set; a bad one is returned as `(pattern, reason)`.
fn set(patterns: &[String]) -> Result<RegexSet, (String, String)> {
    RegexSet::new(patterns).map_err(|e| {
        let bad = patterns
            .iter()
            .find(|p| Regex::new(p).is_err())
            .cloned()
            .unwrap_or_default();
        (bad, e.to_string())
    })
}

impl Redactor {
    /// Compiles the patterns; a bad one is returned as `(pattern, reason)`.
    pub fn new(cfg: &RedactionConfig) -> Result<Redactor, (String, String)> {
        let compile = |p: &String| Regex::new(p).map_err(|e| (p.clone(), e.to_string()));
        Ok(Redactor {
            options: cfg
                .options
                .iter()
                .map(|o| o.trim_start_matches('-').to_string())
                .collect(),
            keys: set(&cfg.key_patterns)?,
            values: cfg
                .value_patterns
                .iter()
                .map(compile)
                .collect::<Result<_, _>>()?,
            any_value: set(&cfg.value_patterns)?,
            anywhere: {
                let all: Vec<String> = cfg
                    .key_patterns
                    .iter()
                    .chain(&cfg.value_patterns)
                    .cloned()
                    .collect();
                let anchored = all.iter().any(|p| {
                    regex_syntax::parse(p)
                        .map_or(true, |h| h.properties().look_set().contains_anchor())
                });
                if anchored {
                    None
                } else {
                    Some(set(&all)?)
                }
            },
        })
    }

    /// Whether a key (variable, metadata key, option name) names a secret.
    pub fn is_secret_key(&self, key: &str) -> bool {
        self.keys.is_match(key)
    }

    /// Redacts the parts of a free-form value that look like secrets (borrowed when
    /// nothing matched, which is almost always).
    pub fn value<'a>(&self, value: &'a str) -> Cow<'a, str> {
        if !self.any_value.is_match(value) {
            return Cow::Borrowed(value);
        }
        let mut out = Cow::Borrowed(value);
        for r in &self.values {
            if r.is_match(&out) {
                out = Cow::Owned(
                    r.replace_all(&out, format!("${{keep}}{REDACTED}${{tail}}").as_str())
                        .into_owned(),
                );
            }
        }
        out
    }

    /// Redacts the value of `key` (a metadata entry or variable).
    pub fn keyed<'a>(&self, key: &str, value: &'a str) -> Cow<'a, str> {
        if self.is_secret_key(key) {
            Cow::Borrowed(REDACTED)
        } else {
            self.value(value)
        }
    }

    /// Redacts one command-line argument: `--name=value` goes through the option rules,
    /// anything else through the value patterns.
    pub fn arg(&self, arg: &str) -> String {
        let mut out = String::with_capacity(arg.len());
        self.push_arg(arg, &mut out);
        out
    }

    /// [`Redactor::arg`], appended to `out` (a command line is redacted argument by
    /// argument into one string).
    pub fn push_arg(&self, arg: &str, out: &mut String) {
        let option = arg.strip_prefix("--").and_then(|r| r.split_once('='));
        // The usual case: not a secret option, and no pattern matches anywhere (one
        // search instead of two or three).
        let plain = || {
            let named = option.is_some_and(|(name, _)| self.options.iter().any(|o| o == name));
            !named && self.anywhere.as_ref().is_some_and(|set| !set.is_match(arg))
        };
        if plain() {
            out.push_str(arg);
            return;
        }
        if let Some((name, value)) = option {
            out.push_str("--");
            out.push_str(name);
            out.push('=');
            self.push_option(name, value, out);
        } else {
            out.push_str(&self.value(arg));
        }
    }

    /// Redacts the value of option `name`, appended to `out`.
    pub fn push_option(&self, name: &str, value: &str, out: &mut String) {
        let secret_option = self.options.iter().any(|o| o == name) || self.is_secret_key(name);
        match value.split_once('=') {
            // NAME=VALUE options (client_env, action_env, test_env, remote_header, ...):
            // keep the name, judge by option and by name.
            Some((k, _)) if secret_option || self.is_secret_key(k) => {
                out.push_str(k);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ if secret_option => out.push_str(REDACTED),
            _ => out.push_str(&self.value(value)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn r() -> Redactor {
        Redactor::new(&Config::builtin().redaction).unwrap()
    }

    #[test]
    fn client_env_values_never_leave() {
        let r = r();
        assert_eq!(
            r.arg("--client_env=HOME=/home/bzl"),
            "--client_env=HOME=<redacted>"
        );
        assert_eq!(
            r.arg("--remote_header=Authorization=Bearer abc"),
            "--remote_header=Authorization=<redacted>"
        );
        assert_eq!(
            r.arg("--action_env=GITHUB_TOKEN=xyz"),
            "--action_env=GITHUB_TOKEN=<redacted>"
        );
        assert_eq!(r.arg("--action_env=PATH=/bin"), "--action_env=PATH=/bin");
        assert_eq!(r.arg("//app/..."), "//app/...");
    }

    /// The one-search shortcut of `push_arg` gives what the rules give one by one.
    #[test]
    fn the_whole_argument_shortcut_changes_nothing() {
        let fast = r();
        let mut slow = r();
        slow.anywhere = None;
        for arg in [
            "--client_env=HOME=/home/bzl",
            "--client_env",
            "--action_env=PATH=/bin",
            "--action_env=MY_TOKEN=abc",
            "--test_env=X=session",
            "--remote_header=x-buildbuddy-api-key=abc",
            "--bes_backend=grpcs://bob:hunter2@bes.example",
            "--auth_mode=none",
            "--config=ci",
            "--=odd",
            "--",
            "-c",
            "opt",
            "//app/...",
            "https://alice:pw@git.example/x.git",
            "Bearer abc.def",
            "ghp_0123456789abcdefghijklmn",
            "--define=KEY=AKIA0123456789ABCDEF",
            "",
        ] {
            assert_eq!(fast.arg(arg), slow.arg(arg), "{arg:?}");
        }
        assert!(fast.anywhere.is_some());
        let anchored = RedactionConfig {
            key_patterns: vec!["^secret$".into()],
            ..Default::default()
        };
        assert!(Redactor::new(&anchored).unwrap().anywhere.is_none());
    }

    #[test]
    fn values_and_keys() {
        let r = r();
        assert_eq!(
            r.value("https://bob:hunter2@git.example/x.git"),
            "https://<redacted>@git.example/x.git"
        );
        assert_eq!(
            r.value("Authorization: Bearer abc.def"),
            "Authorization: Bearer <redacted>"
        );
        assert_eq!(r.keyed("API_KEY", "1234"), REDACTED);
        assert_eq!(r.keyed("BRANCH", "main"), "main");
    }
}
