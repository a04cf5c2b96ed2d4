//! Pulse fields: how a build's tree, platform, buildtype, product, revision, branch and
//! tags are chosen, the same way for every build system.
//!
//! A front end knows how to answer a *rule* (`metadata:BRANCH`, `var:MACHINE`, ...) from
//! its live build state; this module walks the configured rules in order and applies
//! the fixed values from `[fields]`, `BUILDBUS_*` and flags on top. The result is frozen
//! once per build, so every message of a build carries the same fields and routing-key
//! prefix.

use std::sync::Arc;

use crate::config::{DeriveRules, FieldValues};
use crate::model::Common;

/// Answers one rule from a front end's build state.
pub trait RuleSource {
    fn lookup(&self, rule: &str) -> Option<String>;
}

/// The resolved Pulse fields of one build, frozen with its id: the [`Common`] part every
/// message of that build carries, shared (a message's copy costs reference counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulseFields {
    common: Common,
}

/// A source that answers no rule.
struct NoRules;

impl RuleSource for NoRules {
    fn lookup(&self, _rule: &str) -> Option<String> {
        None
    }
}

fn first(rules: &[String], src: &dyn RuleSource) -> Option<String> {
    rules
        .iter()
        .filter_map(|r| src.lookup(r))
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
}

impl PulseFields {
    /// Resolves every field for build `build_id` of `system`: fixed values win, then the
    /// first rule that answers.
    pub fn resolve(
        rules: &DeriveRules,
        fixed: &FieldValues,
        src: &dyn RuleSource,
        build_id: &str,
        system: &str,
    ) -> PulseFields {
        let pick =
            |f: &Option<String>, r: &[String]| f.clone().or_else(|| first(r, src)).map(Arc::from);
        let mut tags: Vec<String> = Vec::new();
        let mut add = |t: &str| {
            let t = t.trim();
            if !t.is_empty() && !tags.iter().any(|x| x == t) {
                tags.push(t.to_string());
            }
        };
        for t in &fixed.tags {
            add(t);
        }
        for r in &rules.tags {
            if let Some(v) = src.lookup(r) {
                v.split(',').for_each(&mut add);
            }
        }
        PulseFields {
            common: Common {
                build_id: build_id.into(),
                system: system.into(),
                tree: pick(&fixed.tree, &rules.tree),
                platform: pick(&fixed.platform, &rules.platform),
                buildtype: pick(&fixed.buildtype, &rules.buildtype),
                product: pick(&fixed.product, &rules.product),
                revision: pick(&fixed.revision, &rules.revision),
                branch: pick(&fixed.branch, &rules.branch),
                tags: tags.into(),
                timestamp: None,
            },
        }
    }

    /// Only the fixed values (no rules to derive the others from): for messages made
    /// outside a build stream, such as a stand-alone artifact scan.
    pub fn fixed(fixed: &FieldValues, build_id: &str, system: &str) -> PulseFields {
        PulseFields::resolve(&DeriveRules::default(), fixed, &NoRules, build_id, system)
    }

    /// The fields as resolved (`timestamp` is `None`).
    pub fn get(&self) -> &Common {
        &self.common
    }

    /// The common payload part for one message of this build.
    pub fn common(&self, timestamp: Option<Arc<str>>) -> Common {
        Common {
            timestamp,
            ..self.common.clone()
        }
    }
}

/// The repository name in a URL or path: `https://h/acme/x.git` and `git@h:acme/x` give `x`.
pub fn repo_name(url: &str) -> Option<String> {
    let trimmed = url.trim().trim_end_matches('/');
    let last = trimmed.rsplit(['/', ':']).next()?;
    let name = last.strip_suffix(".git").unwrap_or(last);
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<&'static str, &'static str>);
    impl RuleSource for Map {
        fn lookup(&self, rule: &str) -> Option<String> {
            self.0.get(rule).map(|s| s.to_string())
        }
    }

    #[test]
    fn first_rule_that_answers_wins_and_fixed_wins_over_all() {
        let src = Map(HashMap::from([("b", "B"), ("c", "C"), ("t", "x, y,x")]));
        let rules = DeriveRules {
            tree: vec!["a".into(), "b".into(), "c".into()],
            platform: vec!["c".into()],
            tags: vec!["t".into()],
            ..Default::default()
        };
        let fixed = FieldValues {
            platform: Some("fixed".into()),
            tags: vec!["always".into()],
            ..Default::default()
        };
        let f = PulseFields::resolve(&rules, &fixed, &src, "b-1", "bazel");
        let c = f.common(Some("2026-11-21T00:00:00Z".into()));
        assert_eq!(&*c.build_id, "b-1");
        assert_eq!(&*c.system, "bazel");
        assert_eq!(c.tree.as_deref(), Some("B"));
        assert_eq!(c.platform.as_deref(), Some("fixed"));
        assert_eq!(c.buildtype, None);
        assert_eq!(&*c.tags, ["always", "x", "y"]);
        assert_eq!(c.timestamp.as_deref(), Some("2026-11-21T00:00:00Z"));
        assert_eq!(f.get().timestamp, None);
    }

    #[test]
    fn repo_names() {
        assert_eq!(
            repo_name("https://example.invalid/acme/bep-fixture.git").as_deref(),
            Some("bep-fixture")
        );
        assert_eq!(repo_name("git@github.com:acme/x").as_deref(), Some("x"));
        assert_eq!(repo_name("").as_deref(), None);
    }
}
