//! The broker-side half of a subscription: the bindings computed from the filters.
//!
//! This module owns turning [`Filters`] plus what the callbacks want into topic
//! bindings on the kind exchanges, so that unwanted messages never leave the broker.
//!
//! Routing keys have fixed positions (`schemas/README.md`):
//!
//! ```text
//! <tree>.<platform>.<buildtype>.<product>.<system>.<kind words...>
//! build: ... .<state>.<result>        test: ... .<status>.<test>
//! ```
//!
//! # The algorithm
//!
//! For each kind the monitor wants, one exchange (`<prefix>/<kind>`):
//!
//! 1. Every position gets the set of words it may hold, or `*`: position 0 the trees,
//!    1 the platforms, 2 the buildtypes, 3 the products (each value escaped with
//!    [`routing::escape_word`]); for builds, position 5 is `finished` when only
//!    finished builds are wanted (`on_build` without `on_match`); for tests, position
//!    6 the test names. Tags, the test scope and everything else cannot be expressed
//!    on the key and stay `*`.
//! 2. A value whose escaped word is longer than [`SAFE_WORD_BYTES`] makes its whole
//!    position `*`: the shortening of over-long keys (255 bytes) may cut such a word
//!    to `prefix~hash`, and a binding on the full word would then miss the message.
//!    Words of at most 24 bytes are never cut, whatever the rest of the key.
//! 3. The bindings are the cross product of the positions. While it has more than
//!    `max_per_exchange` members (64 by default), the position with the most values
//!    (the rightmost of equals, so the tree is kept longest) is widened to `*`.
//! 4. Each binding is the words up to the last non-`*` one, then `.#` (`#` alone
//!    when every position is `*`), so it keeps matching when later versions append
//!    words to the keys.
//!
//! Whatever was widened is still checked on the client, as everything is
//! ([`Filters::matches`](super::filter::Filters::matches)).
//!
//! A kind that the monitor wants *unfiltered* (`on_message` takes every message, so
//! every exchange) is bound with `#` alone.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::filter::Filters;
use crate::model::{routing, Kind};

/// The most bindings one exchange gets by default; more values are widened to `*`.
pub const DEFAULT_MAX_BINDINGS: usize = 64;

/// The longest escaped value that is bound exactly; longer ones bind `*`.
///
/// Shortening (`routing::join_words`) only ever cuts a word longer than 24 bytes (a
/// cut word is at least 7 bytes of prefix plus `~` and 16 hex digits), so a word of
/// at most 24 bytes reaches the key as it is.
pub const SAFE_WORD_BYTES: usize = 24;

/// One binding of the monitor's queue.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Binding {
    pub exchange: String,
    pub routing_key: String,
}

/// What the callbacks want of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Every message of the kind, whatever the filters (`on_message`).
    Everything,
    /// The messages that satisfy the filters; `finished_only` for builds wanted by
    /// `on_build` alone.
    Filtered { finished_only: bool },
}

/// The words one filter set allows at a position, or `None` for `*`.
fn words(set: &BTreeSet<String>) -> Option<Vec<String>> {
    if set.is_empty() {
        return None;
    }
    let w: Vec<String> = set.iter().map(|v| routing::escape_word(Some(v))).collect();
    if w.iter().any(|w| w.len() > SAFE_WORD_BYTES) {
        return None;
    }
    Some(w)
}

/// The allowed words per position of `kind`'s key, up to the last constrained one.
fn positions(kind: Kind, f: &Filters, finished_only: bool) -> Vec<Option<Vec<String>>> {
    let mut p = vec![
        words(&f.trees),
        words(&f.platforms),
        words(&f.buildtypes),
        words(&f.products),
        None, // system
    ];
    match kind {
        Kind::Build => p.push(finished_only.then(|| vec!["finished".to_string()])),
        Kind::Test => {
            p.push(None); // status
            p.push(words(&f.tests));
        }
        Kind::Task | Kind::Artifact | Kind::Log => {}
    }
    p
}

fn count(p: &[Option<Vec<String>>]) -> usize {
    p.iter()
        .map(|w| w.as_ref().map_or(1, Vec::len))
        .fold(1usize, usize::saturating_mul)
}

/// The binding keys of one kind, widened to at most `max` keys.
pub fn keys(kind: Kind, f: &Filters, finished_only: bool, max: usize) -> Vec<String> {
    let mut p = positions(kind, f, finished_only);
    while count(&p) > max.max(1) {
        // Widen the position with the most values (rightmost of equals).
        let widest = p
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.as_ref().map(|w| (w.len(), i)))
            .max();
        match widest {
            Some((_, i)) => p[i] = None,
            None => break,
        }
    }
    while p.last().is_some_and(Option::is_none) {
        p.pop();
    }
    if p.is_empty() {
        return vec!["#".to_string()];
    }
    let mut prefixes: Vec<Vec<&str>> = vec![Vec::new()];
    for pos in &p {
        prefixes = match pos {
            None => prefixes
                .into_iter()
                .map(|mut k| {
                    k.push("*");
                    k
                })
                .collect(),
            Some(ws) => prefixes
                .iter()
                .flat_map(|k| {
                    ws.iter().map(move |w| {
                        let mut k = k.clone();
                        k.push(w.as_str());
                        k
                    })
                })
                .collect(),
        };
    }
    let mut out: Vec<String> = prefixes
        .into_iter()
        .map(|k| format!("{}.#", k.join(".")))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Every binding of a monitor: per wanted kind, its exchange under `prefix` and keys.
pub fn plan(
    wants: &BTreeMap<Kind, Want>,
    f: &Filters,
    prefix: &str,
    max_per_exchange: usize,
) -> Vec<Binding> {
    let mut out = Vec::new();
    for (&kind, want) in wants {
        let exchange = kind.exchange(prefix);
        let keys = match want {
            Want::Everything => vec!["#".to_string()],
            Want::Filtered { finished_only } => keys(kind, f, *finished_only, max_per_exchange),
        };
        out.extend(keys.into_iter().map(|routing_key| Binding {
            exchange: exchange.to_string(),
            routing_key,
        }));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// AMQP topic matching, for checking bindings against real keys.
    pub(crate) fn topic_match(pattern: &str, key: &str) -> bool {
        fn go(p: &[&str], k: &[&str]) -> bool {
            match p.split_first() {
                None => k.is_empty(),
                Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
                Some((&w, rest)) => match k.split_first() {
                    Some((&kw, krest)) => (w == "*" || w == kw) && go(rest, krest),
                    None => false,
                },
            }
        }
        let p: Vec<&str> = pattern.split('.').collect();
        let k: Vec<&str> = key.split('.').collect();
        go(&p, &k)
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn topic_matching_is_amqps() {
        assert!(topic_match("#", "a.b.c"));
        assert!(topic_match("a.#", "a"));
        assert!(topic_match("a.*.c.#", "a.b.c.d.e"));
        assert!(!topic_match("a.*.c.#", "a.c"));
        assert!(!topic_match("a.#", "b.a"));
    }

    #[test]
    fn no_filters_bind_everything() {
        let f = Filters::default();
        assert_eq!(keys(Kind::Task, &f, false, 64), vec!["#"]);
        assert_eq!(
            keys(Kind::Build, &f, true, 64),
            vec!["*.*.*.*.*.finished.#"]
        );
    }

    #[test]
    fn positions_are_fixed_and_values_escaped() {
        let f = Filters {
            trees: set(&["acme.core", "b"]),
            buildtypes: set(&["opt"]),
            tests: set(&["//t:x"]),
            ..Default::default()
        };
        assert_eq!(
            keys(Kind::Log, &f, false, 64),
            vec!["acme%2Ecore.*.opt.#", "b.*.opt.#"]
        );
        assert_eq!(
            keys(Kind::Test, &f, false, 64),
            vec!["acme%2Ecore.*.opt.*.*.*.//t:x.#", "b.*.opt.*.*.*.//t:x.#"]
        );
        assert_eq!(
            keys(Kind::Build, &f, true, 64),
            vec!["acme%2Ecore.*.opt.*.*.finished.#", "b.*.opt.*.*.finished.#"]
        );
    }

    #[test]
    fn large_products_are_widened_to_the_cap() {
        let many = |p: &str| (0..10).map(|i| format!("{p}{i}")).collect::<BTreeSet<_>>();
        let f = Filters {
            trees: many("t"),
            platforms: many("p"),
            products: set(&["x", "y"]),
            ..Default::default()
        };
        // 10 x 10 x 2 = 200 > 64: the platforms (rightmost of the widest) go first,
        // leaving 10 x 2.
        let k = keys(Kind::Task, &f, false, 64);
        assert_eq!(k.len(), 20);
        assert!(k.contains(&"t3.*.*.y.#".to_string()), "{k:?}");
        // A cap of 1 leaves only the finished word.
        assert_eq!(keys(Kind::Build, &f, true, 1), vec!["*.*.*.*.*.finished.#"]);
        assert_eq!(keys(Kind::Task, &f, false, 1), vec!["#"]);
    }

    #[test]
    fn long_words_are_bound_with_a_star() {
        let long = "//very/long/package/path:some_test_target";
        let f = Filters {
            tests: set(&["//a:b", long]),
            ..Default::default()
        };
        assert_eq!(keys(Kind::Test, &f, false, 64), vec!["#"]);
        // The bound holds: a 24-byte word survives the longest possible key.
        let w24 = "x".repeat(SAFE_WORD_BYTES);
        let big = "y".repeat(250);
        let mut vals: Vec<Option<&str>> = vec![Some(&w24)];
        vals.extend(std::iter::repeat_n(Some(big.as_str()), 7));
        let k = routing::key(&vals);
        assert!(k.len() <= routing::MAX_KEY_BYTES);
        assert_eq!(k.split('.').next(), Some(w24.as_str()));
    }

    #[test]
    fn every_key_matches_what_the_filters_allow() {
        let f = Filters {
            trees: set(&["a", "b"]),
            platforms: set(&["k8"]),
            ..Default::default()
        };
        let ks = keys(Kind::Build, &f, true, 64);
        let yes = routing::key(&[
            Some("b"),
            Some("k8"),
            None,
            Some("p"),
            Some("bazel"),
            Some("finished"),
            Some("failure"),
        ]);
        let no = routing::key(&[
            Some("b"),
            Some("k8"),
            None,
            Some("p"),
            Some("bazel"),
            Some("started"),
            None,
        ]);
        assert!(ks.iter().any(|p| topic_match(p, &yes)));
        assert!(!ks.iter().any(|p| topic_match(p, &no)));
        // Every binding ends in .# (or is #).
        assert!(ks.iter().all(|k| k.ends_with(".#") || k == "#"));
    }
}
