//! The monitor's filters and their client-side check.
//!
//! This module owns what a subscription *means*: [`Filters`] holds the Pulse dimensions
//! (trees, platforms, buildtypes, products), the test names, the build tags (an OR of
//! all-of sets) and the kinds; [`Filters::matches`] decides whether one envelope
//! satisfies all of them. The broker-side half (bindings on the routing keys) lives in
//! [`bindings`](super::bindings); whatever the bindings let through is checked here
//! again, so a callback only ever sees what the filters allow, whatever the bindings
//! could express.
//!
//! Semantics, dimension by dimension (an empty set means "any"):
//! - `trees`, `platforms`, `buildtypes`, `products`: the payload's value is one of the
//!   set (an absent value matches no set);
//! - `tests`: a test message's `test` is one of the set; messages of other kinds have
//!   no test and are not narrowed by it (as in Pulse, where the test list only narrowed
//!   the test callback);
//! - `build_tags`: the payload's tags contain *every* tag of *at least one* of the
//!   sets (`[[a, b], [c]]` is `(a AND b) OR c`); Pulse compared the wrong lengths here;
//! - `kinds`: the message is of one of these kinds.

use std::collections::BTreeSet;

use crate::model::{Envelope, Kind, Payload};

/// What a monitor subscribes to; see the module documentation for the meaning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    pub trees: BTreeSet<String>,
    pub platforms: BTreeSet<String>,
    pub buildtypes: BTreeSet<String>,
    pub products: BTreeSet<String>,
    pub tests: BTreeSet<String>,
    /// An OR of all-of sets; empty: any tags.
    pub build_tags: Vec<BTreeSet<String>>,
    /// Empty: every kind.
    pub kinds: BTreeSet<Kind>,
}

fn one_of(set: &BTreeSet<String>, value: Option<&str>) -> bool {
    set.is_empty() || value.is_some_and(|v| set.contains(v))
}

impl Filters {
    /// True when nothing is filtered.
    pub fn is_empty(&self) -> bool {
        *self == Filters::default()
    }

    /// Whether `kind` is subscribed to.
    pub fn kind_wanted(&self, kind: Kind) -> bool {
        self.kinds.is_empty() || self.kinds.contains(&kind)
    }

    /// Whether `tags` satisfy the tag filter: every tag of at least one set.
    pub fn tags_match(&self, tags: &[String]) -> bool {
        self.build_tags.is_empty()
            || self
                .build_tags
                .iter()
                .any(|all| all.iter().all(|t| tags.iter().any(|have| have == t)))
    }

    /// Whether `env` satisfies every filter.
    pub fn matches(&self, env: &Envelope) -> bool {
        let c = env.payload.common();
        self.kind_wanted(env.kind())
            && one_of(&self.trees, c.tree.as_deref())
            && one_of(&self.platforms, c.platform.as_deref())
            && one_of(&self.buildtypes, c.buildtype.as_deref())
            && one_of(&self.products, c.product.as_deref())
            && match &env.payload {
                Payload::Test(t) => one_of(&self.tests, Some(&t.test)),
                _ => true,
            }
            && self.tags_match(&c.tags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn tags_are_an_or_of_all_of_sets() {
        let f = Filters {
            build_tags: vec![set(&["nightly", "asan"]), set(&["release"])],
            ..Default::default()
        };
        let t = |v: &[&str]| f.tags_match(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(t(&["asan", "nightly"]));
        assert!(t(&["nightly", "asan", "x"]));
        assert!(t(&["release"]));
        assert!(!t(&["nightly"]));
        assert!(!t(&["asan"]));
        assert!(!t(&[]));
        // Pulse's fault: a message with as many tags as a set, but other ones.
        assert!(!t(&["nightly", "x"]));
        assert!(Filters::default().tags_match(&[]));
    }

    #[test]
    fn absent_values_match_no_set() {
        assert!(one_of(&set(&[]), None));
        assert!(!one_of(&set(&["a"]), None));
        assert!(one_of(&set(&["a", "b"]), Some("b")));
        assert!(!one_of(&set(&["a"]), Some("")));
    }
}
