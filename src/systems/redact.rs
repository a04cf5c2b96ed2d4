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
    /// Option names and key patterns: free text that matches none has no option or
    /// key to read word by word.
    hint: RegexSet,
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
            hint: {
                let all: Vec<String> = cfg
                    .options
                    .iter()
                    .map(|o| regex::escape(o.trim_start_matches('-')))
                    .chain(cfg.key_patterns.iter().cloned())
                    .collect();
                set(&all)?
            },
        })
    }

    /// Whether a key (variable, metadata key, option name) names a secret.
    pub fn is_secret_key(&self, key: &str) -> bool {
        self.keys.is_match(key)
    }

    /// Whether option `name` (without dashes) is secret-bearing: named in `options` or
    /// matching a key pattern.
    fn is_secret_option(&self, name: &str) -> bool {
        self.options.iter().any(|o| o == name) || self.is_secret_key(name)
    }

    /// Redacts the parts of a free-form value that look like secrets (borrowed when
    /// nothing matched, which is almost always).
    ///
    /// Besides the value patterns, a value that mentions an option or a secret key is
    /// read word by word as a command line (quotes, brackets and commas around a word
    /// are kept but ignored, so a Python list of arguments reads as one): the value of
    /// a secret option goes whether it is joined (`--opt=value`) or the next word
    /// (`--opt value`), and, since free text does not say where a value ends, so do the
    /// words after it up to the next one that starts with `-` or closes a quote.
    pub fn value<'a>(&self, value: &'a str) -> Cow<'a, str> {
        let patterns = self.any_value.is_match(value);
        let words = self.hint.is_match(value);
        if !patterns && !words {
            return Cow::Borrowed(value);
        }
        let mut out = Cow::Borrowed(value);
        if patterns {
            for r in &self.values {
                if r.is_match(&out) {
                    out = Cow::Owned(
                        r.replace_all(&out, format!("${{keep}}{REDACTED}${{tail}}").as_str())
                            .into_owned(),
                    );
                }
            }
        }
        if words {
            let text = self.words(&out);
            if text != out {
                out = Cow::Owned(text);
            }
        }
        out
    }

    /// The word-by-word reading of free text (see [`Redactor::value`]).
    fn words(&self, text: &str) -> String {
        const AROUND: &[char] = &['\'', '"', '[', ']', '(', ')', ',', ';', '`'];
        let mut out = String::with_capacity(text.len());
        let mut pending: Option<&str> = None;
        let mut secret_run = false;
        let mut rest = text;
        while !rest.is_empty() {
            let space = rest.len() - rest.trim_start().len();
            out.push_str(&rest[..space]);
            rest = &rest[space..];
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let token = &rest[..end];
            rest = &rest[end..];
            let core = token.trim_matches(AROUND);
            if core.is_empty() {
                out.push_str(token);
                continue;
            }
            let lead = token.len() - token.trim_start_matches(AROUND).len();
            out.push_str(&token[..lead]);
            if secret_run && !core.starts_with('-') {
                out.push_str(REDACTED);
            } else if let Some(name) = pending.take().filter(|_| !core.starts_with("--")) {
                secret_run = self.option_into(name, core, &mut out, Text);
            } else {
                pending = bare_option(core);
                secret_run = self.arg_into(core, &mut out, Text);
            }
            let tail = &token[lead + core.len()..];
            out.push_str(tail);
            // A closing quote ends a value (a Python list of arguments, a quoted one).
            if tail.contains(['\'', '"']) {
                secret_run = false;
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

    /// Redacts one command-line argument: `--name=value` (or `-name=value`) goes
    /// through the option rules, `NAME=value` through the key rules, anything else
    /// through the value patterns.
    ///
    /// One word knows nothing of the word before it: a command line (where
    /// `--client_env NAME=value` is two words) goes through [`Redactor::push_args`].
    pub fn arg(&self, arg: &str) -> String {
        let mut out = String::with_capacity(arg.len());
        self.push_arg(arg, &mut out);
        out
    }

    /// [`Redactor::arg`], appended to `out`.
    pub fn push_arg(&self, arg: &str, out: &mut String) {
        self.arg_into(arg, out, Argv);
    }

    /// Redacts a whole command line (argv words in order, empty ones left out) into
    /// `out`, the words separated by one space. An option word with no `=` (`--opt`,
    /// `-opt`) takes the next word as its value unless that word starts with `--`, so
    /// `--client_env NAME=value` is redacted as `--client_env=NAME=value` is.
    pub fn push_args<S: AsRef<str>>(&self, args: impl IntoIterator<Item = S>, out: &mut String) {
        let mut first = true;
        let mut pending: Option<String> = None;
        for a in args {
            let a = a.as_ref();
            if a.is_empty() {
                continue;
            }
            if !first {
                out.push(' ');
            }
            first = false;
            if let Some(name) = pending.take().filter(|_| !a.starts_with("--")) {
                self.option_into(&name, a, out, Argv);
                continue;
            }
            pending = bare_option(a).map(str::to_string);
            self.arg_into(a, out, Argv);
        }
    }

    /// [`Redactor::push_arg`]; true when it cut a secret value (a secret option's or
    /// key's), after which free text may still hold more of it.
    fn arg_into(&self, arg: &str, out: &mut String, mode: Mode) -> bool {
        let option = split_option(arg);
        // The usual case: not a secret option, and no pattern matches anywhere (one
        // search instead of two or three).
        let plain = || {
            let named = option.is_some_and(|o| self.options.iter().any(|n| n == o.name));
            !named && self.anywhere.as_ref().is_some_and(|set| !set.is_match(arg))
        };
        if plain() {
            out.push_str(arg);
            return false;
        }
        if let Some(o) = option {
            out.push_str(o.prefix);
            out.push_str(o.name);
            out.push_str(o.sep);
            return self.option_into(o.name, o.value, out, mode);
        }
        match arg.split_once('=') {
            Some((k, _)) if !k.is_empty() && self.is_secret_key(k) => {
                out.push_str(k);
                out.push('=');
                out.push_str(REDACTED);
                true
            }
            _ => {
                self.rest(arg, out, mode);
                false
            }
        }
    }

    /// A word no option or key rule cut: in a command line it still goes through the
    /// value rules; in free text they already ran.
    fn rest(&self, word: &str, out: &mut String, mode: Mode) {
        match mode {
            Argv => out.push_str(&self.value(word)),
            Text => out.push_str(word),
        }
    }

    /// Redacts the value of option `name`, appended to `out`.
    pub fn push_option(&self, name: &str, value: &str, out: &mut String) {
        self.option_into(name, value, out, Argv);
    }

    /// [`Redactor::push_option`]; true when the value was secret.
    fn option_into(&self, name: &str, value: &str, out: &mut String, mode: Mode) -> bool {
        let secret_option = self.is_secret_option(name);
        match value.split_once('=') {
            // NAME=VALUE options (client_env, action_env, test_env, remote_header, ...):
            // keep the name, judge by option and by name.
            Some((k, _)) if secret_option || self.is_secret_key(k) => {
                out.push_str(k);
                out.push('=');
                out.push_str(REDACTED);
                true
            }
            _ if secret_option => {
                out.push_str(REDACTED);
                true
            }
            _ => {
                self.rest(value, out, mode);
                false
            }
        }
    }
}

/// Where a word comes from: a command line (each word is redacted in full) or free text
/// being read word by word (the value patterns already ran over the whole text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Argv,
    Text,
}
use Mode::{Argv, Text};

/// An option word cut into its parts: `--name=value` (or `-name=value`, or the name
/// and value in one word separated by white space).
#[derive(Debug, Clone, Copy)]
struct OptionWord<'a> {
    prefix: &'a str,
    name: &'a str,
    sep: &'a str,
    value: &'a str,
}

fn split_option(arg: &str) -> Option<OptionWord<'_>> {
    let rest = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    let prefix = &arg[..arg.len() - rest.len()];
    let i = rest.find(|c: char| c == '=' || c.is_whitespace())?;
    let (name, after) = rest.split_at(i);
    if name.is_empty() {
        return None;
    }
    let sep_len = if after.starts_with('=') {
        1
    } else {
        after.len() - after.trim_start().len()
    };
    let (sep, value) = after.split_at(sep_len);
    Some(OptionWord {
        prefix,
        name,
        sep,
        value,
    })
}

/// The name of an option word that has no value of its own (`--name`, `-name`): the
/// next word may be its value.
fn bare_option(arg: &str) -> Option<&str> {
    let name = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    (!name.is_empty() && !name.contains('=') && !name.contains(char::is_whitespace)).then_some(name)
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
            "--client_env GITHUB_TOKEN=x",
            "-client_env=A=b",
            "-Dfoo=bar",
            "API_KEY=abc",
            "PATH=/bin",
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

    fn line(r: &Redactor, args: &[&str]) -> String {
        let mut out = String::new();
        r.push_args(args, &mut out);
        out
    }

    /// `--opt value` (two argv words) is redacted as `--opt=value` is.
    #[test]
    fn split_options_are_redacted_as_joined_ones() {
        let r = r();
        let split = [
            (
                &["--client_env", "GITHUB_TOKEN=ghp_x"][..],
                "--client_env GITHUB_TOKEN=<redacted>",
            ),
            (
                &["--remote_header", "x-api-key=k1"][..],
                "--remote_header x-api-key=<redacted>",
            ),
            (
                &["--bes_header", "Authorization=Basic dXNlcjpwdw=="][..],
                "--bes_header Authorization=<redacted>",
            ),
            (
                &["-client_env", "HOME=/h"][..],
                "-client_env HOME=<redacted>",
            ),
            (
                &["--google_credentials", "/c.json"][..],
                "--google_credentials <redacted>",
            ),
            (
                &["--action_env", "MY_TOKEN=abc"][..],
                "--action_env MY_TOKEN=<redacted>",
            ),
            (&["--auth_token", "abc"][..], "--auth_token <redacted>"),
            // Empty words are left out; the value is still the next word.
            (
                &["--client_env", "", "A=b"][..],
                "--client_env A=<redacted>",
            ),
            // A following `--option` is not a value.
            (
                &["--client_env", "--config=ci", "//x"][..],
                "--client_env --config=ci //x",
            ),
            // Not secret: unchanged.
            (&["--action_env", "PATH=/bin"][..], "--action_env PATH=/bin"),
            (&["-c", "opt", "//app/..."][..], "-c opt //app/..."),
        ];
        for (args, want) in split {
            assert_eq!(line(&r, args), want, "{args:?}");
        }
        let joined = [
            (
                "--client_env=GITHUB_TOKEN=ghp_x",
                "--client_env=GITHUB_TOKEN=<redacted>",
            ),
            (
                "-remote_header=x-api-key=k1",
                "-remote_header=x-api-key=<redacted>",
            ),
            (
                "--bes_header Authorization=Basic x",
                "--bes_header Authorization=<redacted>",
            ),
            ("API_KEY=abc", "API_KEY=<redacted>"),
        ];
        for (arg, want) in joined {
            assert_eq!(r.arg(arg), want, "{arg:?}");
            assert_eq!(line(&r, &[arg]), want, "{arg:?}");
        }
    }

    /// Free text (metadata, variables, a command line kept as one string) is read word by
    /// word; a split value and the words after it go, up to the next option.
    #[test]
    fn options_in_free_text_are_redacted_in_both_forms() {
        let r = r();
        for (text, want) in [
            (
                "bazel build --client_env GITHUB_TOKEN=s1 //x",
                "bazel build --client_env GITHUB_TOKEN=<redacted> <redacted>",
            ),
            (
                "--bes_header Authorization=Basic s2 --config=ci",
                "--bes_header Authorization=<redacted> <redacted> --config=ci",
            ),
            (
                "--remote_header=x-api-key=s3 -k",
                "--remote_header=x-api-key=<redacted> -k",
            ),
            (
                "['bitbake', '--client_env', 'A=s4', 'core-image']",
                "['bitbake', '--client_env', 'A=<redacted>', 'core-image']",
            ),
            (
                "['--bes_header', 'Authorization=Basic s6', 'x']",
                "['--bes_header', 'Authorization=<redacted> <redacted>', 'x']",
            ),
            ("SESSION_ID=s5", "SESSION_ID=<redacted>"),
            ("plain text, nothing here", "plain text, nothing here"),
            ("--config=ci //app/...", "--config=ci //app/..."),
        ] {
            assert_eq!(r.value(text), want, "{text:?}");
            assert!(!r.keyed("NOTE", text).contains("s1"), "{text:?}");
        }
        assert!(matches!(r.value("nothing to see"), Cow::Borrowed(_)));
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
