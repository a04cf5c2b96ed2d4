//! Classification rules: `config/artifacts.toml` (compiled in as the default) or a
//! user's `--rules FILE` (which replaces it). This module owns parsing and checking a
//! rules file, and answering, for one logical path, "excluded?" and "which kind, with
//! which captured fields?" (first matching rule wins).
//!
//! Matching is done with one [`RegexSet`] over all rules (one pass over the path tells
//! which rules match; the first one is then run alone for its captures), so a tree of a
//! hundred thousand files costs one automaton walk per path, not one per rule.

use std::collections::BTreeMap;
use std::path::Path;

use regex::{Regex, RegexSet};
use serde::Deserialize;

use super::AamError;

/// The built-in rules (the example file in `config/`).
pub const DEFAULT_RULES_TOML: &str = include_str!("../../config/artifacts.toml");

/// Where the built-in rules say they come from in errors and reports.
pub const BUILTIN_ORIGIN: &str = "<built-in config/artifacts.toml>";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    root_links: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    kind: String,
    pattern: String,
    #[serde(default)]
    target: Option<String>,
}

#[derive(Debug, Clone)]
struct Rule {
    kind: String,
    regex: Regex,
    target: Option<String>,
}

/// What a rule says about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    pub kind: String,
    /// The rule's named groups that took part in the match.
    pub fields: BTreeMap<String, String>,
    /// The rule's `target` template, expanded with the captures.
    pub target: Option<String>,
}

/// A compiled, checked set of rules.
#[derive(Debug, Clone)]
pub struct Rules {
    origin: String,
    root_links: Vec<String>,
    exclude: RegexSet,
    set: RegexSet,
    rules: Vec<Rule>,
}

impl Rules {
    /// The compiled-in default rules.
    pub fn builtin() -> Rules {
        // The compiled-in file is tested to parse (`builtin_rules_parse`); should it
        // ever not, no rules at all is better than a panic.
        Rules::parse(DEFAULT_RULES_TOML, BUILTIN_ORIGIN).unwrap_or_else(|_| Rules::empty())
    }

    /// No rules: nothing is an artifact.
    pub fn empty() -> Rules {
        Rules {
            origin: "<no rules>".into(),
            root_links: Vec::new(),
            exclude: RegexSet::empty(),
            set: RegexSet::empty(),
            rules: Vec::new(),
        }
    }

    /// Reads and checks a rules file.
    pub fn load(path: &Path) -> Result<Rules, AamError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| AamError::Rules {
            origin: origin.clone(),
            reason: format!("cannot read: {e}"),
        })?;
        Rules::parse(&text, &origin)
    }

    /// Parses and checks rules from TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Rules, AamError> {
        let err = |reason: String| AamError::Rules {
            origin: origin.to_string(),
            reason,
        };
        let file: RulesFile = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let (line, col) = line_col(text, s.start);
                    format!("line {line}, column {col}: ")
                })
                .unwrap_or_default();
            err(format!("{at}{}", e.message().trim_end()))
        })?;
        for (i, l) in file.root_links.iter().enumerate() {
            if l.is_empty() || l.contains('/') || l == "." || l == ".." {
                return Err(err(format!(
                    "root_links[{i}] {l:?}: must be one plain name (a top-level entry)"
                )));
            }
        }
        let exclude = RegexSet::new(&file.exclude).map_err(|e| {
            let which = file
                .exclude
                .iter()
                .position(|p| Regex::new(p).is_err())
                .map(|i| format!("exclude[{i}] {:?}", file.exclude[i]))
                .unwrap_or_else(|| "exclude".into());
            err(format!("{which}: {e}"))
        })?;
        let mut rules = Vec::with_capacity(file.rules.len());
        for (i, r) in file.rules.into_iter().enumerate() {
            let at = format!("rule {} (kind {:?})", i + 1, r.kind);
            if r.kind.trim().is_empty() {
                return Err(err(format!("rule {}: kind is empty", i + 1)));
            }
            let regex = Regex::new(&r.pattern)
                .map_err(|e| err(format!("{at}: pattern {:?}: {e}", r.pattern)))?;
            if let Some(t) = &r.target {
                let names: Vec<&str> = regex.capture_names().flatten().collect();
                for name in template_names(t) {
                    if !names.contains(&name.as_str()) {
                        return Err(err(format!(
                            "{at}: target {t:?} names ${{{name}}}, which the pattern does not capture"
                        )));
                    }
                }
            }
            rules.push(Rule {
                kind: r.kind,
                regex,
                target: r.target,
            });
        }
        let set = RegexSet::new(rules.iter().map(|r| r.regex.as_str()))
            .map_err(|e| err(format!("the rules together: {e}")))?;
        Ok(Rules {
            origin: origin.to_string(),
            root_links: file.root_links,
            exclude,
            set,
            rules,
        })
    }

    /// Where these rules came from (a path, or the built-in file).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Top-level links of a scanned directory that are trees of their own.
    pub fn root_links(&self) -> &[String] {
        &self.root_links
    }

    /// How many classification rules there are.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a logical path is excluded (a directory's path ends with `/`).
    pub fn excluded(&self, path: &str) -> bool {
        self.exclude.is_match(path)
    }

    /// Whether a directory (logical path without the trailing `/`) is excluded.
    pub fn excluded_dir(&self, path: &str) -> bool {
        if self.exclude.is_empty() {
            return false;
        }
        let mut p = String::with_capacity(path.len() + 1);
        p.push_str(path);
        p.push('/');
        self.exclude.is_match(&p)
    }

    /// The first rule matching `path`, with its captures; `None` if no rule does.
    pub fn classify(&self, path: &str) -> Option<Class> {
        let first = self.set.matches(path).into_iter().next()?;
        let rule = &self.rules[first];
        let caps = rule.regex.captures(path)?;
        let fields = rule
            .regex
            .capture_names()
            .flatten()
            .filter_map(|n| {
                caps.name(n)
                    .map(|m| (n.to_string(), m.as_str().to_string()))
            })
            .collect();
        let target = rule.target.as_ref().map(|t| {
            let mut out = String::new();
            caps.expand(t, &mut out);
            out
        });
        Some(Class {
            kind: rule.kind.clone(),
            fields,
            target,
        })
    }
}

/// The `${name}` (and `$name`) references of a target template.
fn template_names(t: &str) -> Vec<String> {
    let mut names = Vec::new();
    let b = t.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'$' {
            i += 1;
            continue;
        }
        if b.get(i + 1) == Some(&b'$') {
            i += 2;
            continue;
        }
        if b.get(i + 1) == Some(&b'{') {
            if let Some(end) = t[i + 2..].find('}') {
                names.push(t[i + 2..i + 2 + end].to_string());
                i += 3 + end;
                continue;
            }
        }
        let start = i + 1;
        let mut j = start;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        if j > start && !t[start..j].bytes().all(|c| c.is_ascii_digit()) {
            names.push(t[start..j].to_string());
        }
        i = j.max(start);
    }
    names
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(c: &Class) -> Vec<(&str, &str)> {
        c.fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn builtin_rules_parse() {
        let r = Rules::parse(DEFAULT_RULES_TOML, BUILTIN_ORIGIN).expect("built-in rules");
        assert!(r.len() > 15);
        assert_eq!(r.root_links(), ["bazel-bin", "bazel-testlogs"]);
    }

    #[test]
    fn yocto_paths_classify_with_their_fields() {
        let r = Rules::builtin();
        let c = r
            .classify("deploy/images/qemux86-64/core-image-minimal-qemux86-64.rootfs.ext4")
            .unwrap();
        assert_eq!(c.kind, "image");
        assert_eq!(
            fields(&c),
            [
                ("format", "ext4"),
                ("image", "core-image-minimal-qemux86-64.rootfs"),
                ("machine", "qemux86-64")
            ]
        );
        let c = r
            .classify("deploy/rpm/core2_64/packagegroup-core-boot-1.0-r17.core2_64.rpm")
            .unwrap();
        assert_eq!(c.kind, "package_rpm");
        assert_eq!(
            fields(&c),
            [
                ("arch", "core2_64"),
                ("package", "packagegroup-core-boot"),
                ("pkgarch", "core2_64"),
                ("release", "r17"),
                ("version", "1.0")
            ]
        );
        let c = r
            .classify("deploy/ipk/core2-64/busybox_1.36.1-r0_core2-64.ipk")
            .unwrap();
        assert_eq!(c.kind, "package_ipk");
        assert_eq!(c.fields["version"], "1.36.1-r0");
        assert_eq!(
            r.classify("deploy/images/m/bzImage-m.bin").unwrap().kind,
            "kernel"
        );
        assert_eq!(r.classify("work/x/y.o"), None);
    }

    #[test]
    fn bazel_test_logs_name_their_target() {
        let r = Rules::builtin();
        let c = r
            .classify("bazel-testlogs/tests/net/dns_test/shard_2_of_3/test.xml")
            .unwrap();
        assert_eq!(c.kind, "test_xml");
        assert_eq!(c.target.as_deref(), Some("//tests/net:dns_test"));
        assert_eq!(c.fields["shard"], "2");
        let c = r.classify("bazel-testlogs/top_test/test.log").unwrap();
        assert_eq!(c.kind, "test_log");
        assert_eq!(c.target.as_deref(), Some("//:top_test"));
        assert!(!c.fields.contains_key("package"));
        assert!(r.excluded("bazel-bin/app/hello.runfiles/x"));
        assert!(r.excluded_dir("bazel-bin/app/hello.runfiles"));
        assert!(!r.excluded_dir("bazel-bin/app"));
    }

    #[test]
    fn first_match_wins_and_errors_name_the_rule() {
        let r = Rules::parse(
            "[[rule]]\nkind = \"a\"\npattern = 'x'\n[[rule]]\nkind = \"b\"\npattern = '.'\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(r.classify("x").unwrap().kind, "a");
        assert_eq!(r.classify("y").unwrap().kind, "b");
        let e = Rules::parse("[[rule]]\nkind = \"a\"\npattern = '('\n", "t.toml").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("t.toml") && s.contains("rule 1 (kind \"a\")"),
            "{s}"
        );
        let e = Rules::parse("[[rule]]\nkind = \"a\"\npatern = 'x'\n", "t.toml").unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        let e = Rules::parse(
            "[[rule]]\nkind = \"a\"\npattern = '(?P<x>.)'\ntarget = '${y}'\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("${y}"), "{e}");
    }
}
