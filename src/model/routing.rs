//! Routing keys: fixed-position, Pulse-style topic keys, and the escaping that keeps
//! every value one word.
//!
//! Every key starts with `<tree>.<platform>.<buildtype>.<product>.<system>` and goes on
//! with words that depend on the kind (see `schemas/README.md`):
//!
//! | kind     | key                                                        |
//! |----------|------------------------------------------------------------|
//! | build    | `<common>.<state>.<result>`                                |
//! | task     | `<common>.<outcome>.<target>.<task>`                       |
//! | test     | `<common>.<status>.<test>`                                 |
//! | artifact | `<common>.<kind>`                                          |
//! | log      | `<common>.<level>`                                         |
//!
//! Escaping is reversible percent-encoding of the bytes that mean something to AMQP
//! topic matching or to us: `.` `*` `#` `%` `~`, white space and control characters; an
//! absent value is the word `_`, a value that *is* `_` is escaped as `%5F`, and the empty
//! value is the lone `%` (never produced otherwise), so none of them meet. A key longer than 255 bytes is shortened
//! deterministically: its longest words are cut and get a `~` plus a 16-hex-digit hash of
//! the whole word, so positions never move and a shortened word is recognizable (`~`
//! never appears in an escaped word).

use super::ids::short_hash;

/// The AMQP limit on routing keys (a short string).
pub const MAX_KEY_BYTES: usize = 255;
/// The word that stands for an absent value.
pub const ABSENT: &str = "_";
/// The longest a shortened word is allowed to stay before it gets cut further.
const MIN_CUT_WORD: usize = 24;

fn needs_escape(c: char) -> bool {
    matches!(c, '.' | '*' | '#' | '%' | '~') || c.is_whitespace() || c.is_control()
}

/// Whether any char of `v` needs an escape; ASCII text is judged byte by byte (in
/// ASCII, white space and control characters are the bytes up to the space, and DEL).
fn any_needs_escape(v: &str) -> bool {
    if v.is_ascii() {
        v.bytes()
            .any(|b| b <= b' ' || b == 0x7f || matches!(b, b'.' | b'*' | b'#' | b'%' | b'~'))
    } else {
        v.contains(needs_escape)
    }
}

/// Escapes one value into one routing-key word; `None` becomes `_`.
pub fn escape_word(value: Option<&str>) -> String {
    let mut word = String::new();
    push_escaped(&mut word, value);
    word
}

/// Appends the escaped word of `value` to `out`.
fn push_escaped(out: &mut String, value: Option<&str>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let Some(v) = value else {
        out.push_str(ABSENT);
        return;
    };
    if v.is_empty() {
        out.push('%');
        return;
    }
    if v == ABSENT {
        out.push_str("%5F");
        return;
    }
    // Most values (labels, platform names, states) need no escape at all.
    if !any_needs_escape(v) {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        if needs_escape(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        } else {
            out.push(c);
        }
    }
}

/// Reverses [`escape_word`]: `_` gives `None`. A shortened word (one holding `~`) or a
/// malformed escape gives `Err` with the word.
pub fn unescape_word(word: &str) -> Result<Option<String>, String> {
    if word == ABSENT {
        return Ok(None);
    }
    if word == "%" {
        return Ok(Some(String::new()));
    }
    if word.contains('~') {
        return Err(format!(
            "routing-key word {word:?} was shortened and cannot be reversed"
        ));
    }
    let bytes = word.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = word
                .get(i + 1..i + 3)
                .ok_or_else(|| format!("truncated escape in {word:?}"))?;
            let b = u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape in {word:?}"))?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Some)
        .map_err(|_| format!("escape in {word:?} is not UTF-8"))
}

/// Joins already-escaped words into a key no longer than [`MAX_KEY_BYTES`].
pub fn join_words(mut words: Vec<String>) -> String {
    let total = |w: &[String]| w.iter().map(String::len).sum::<usize>() + w.len().saturating_sub(1);
    while total(&words) > MAX_KEY_BYTES {
        // Cut the longest word that is still longer than a cut word would be.
        let (idx, len) = words
            .iter()
            .enumerate()
            .map(|(i, w)| (i, w.len()))
            .max_by_key(|&(i, l)| (l, std::cmp::Reverse(i)))
            .unwrap_or((0, 0));
        let over = total(&words) - MAX_KEY_BYTES;
        // A cut word is `prefix~hash16`; keep as much prefix as the budget allows.
        let keep = len
            .saturating_sub(over + 17)
            .max(MIN_CUT_WORD.saturating_sub(17));
        if len <= keep + 17 {
            // Nothing left to gain on this word (every word is already minimal); give up
            // shortening: the caller gets the best effort, still deterministic.
            break;
        }
        let word = &words[idx];
        let mut cut = keep.min(word.len());
        // Stay on a char boundary and never split a %XX escape.
        while cut > 0 && !word.is_char_boundary(cut) {
            cut -= 1;
        }
        if let Some(p) = word[..cut].rfind('%') {
            if p + 3 > cut {
                cut = p;
            }
        }
        words[idx] = format!("{}~{}", &word[..cut], short_hash(word));
    }
    words.join(".")
}

/// Builds a key from optional raw values: escapes each, then joins and shortens.
pub fn key(values: &[Option<&str>]) -> String {
    // Escaped straight into the key; only a key over the limit goes word by word
    // through the shortening.
    let mut key = String::with_capacity(128);
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        push_escaped(&mut key, *v);
    }
    if key.len() <= MAX_KEY_BYTES {
        return key;
    }
    join_words(values.iter().map(|v| escape_word(*v)).collect())
}

/// Splits a key back into its words, unescaped (`None` for `_`).
pub fn split_key(key: &str) -> Vec<Result<Option<String>, String>> {
    key.split('.').map(unescape_word).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_reversible() {
        for v in [
            "a.b",
            "//app:config",
            "*#%~",
            "x y",
            "_",
            "",
            "\0",
            "ünï.cødé",
            "a%2Eb",
        ] {
            let w = escape_word(Some(v));
            assert!(
                !w.contains('.') && !w.contains('*') && !w.contains('#'),
                "{w}"
            );
            assert_eq!(unescape_word(&w).unwrap().as_deref(), Some(v));
        }
        assert_eq!(escape_word(None), "_");
        assert_eq!(unescape_word("_").unwrap(), None);
    }

    #[test]
    fn the_ascii_check_agrees_with_the_char_check() {
        for b in 0u8..0x80 {
            let s = char::from(b).to_string();
            assert_eq!(any_needs_escape(&s), s.contains(needs_escape), "{b:#x}");
        }
    }

    #[test]
    fn a_short_key_is_its_escaped_words_joined() {
        let values = [
            Some("bep-fixture"),
            None,
            Some(""),
            Some("_"),
            Some("a.b c"),
            Some("ü*"),
        ];
        let words: Vec<String> = values.iter().map(|v| escape_word(*v)).collect();
        assert_eq!(key(&values), words.join("."));
        assert_eq!(key(&values), "bep-fixture._.%.%5F.a%2Eb%20c.ü%2A");
    }

    #[test]
    fn long_keys_are_shortened_deterministically() {
        let long = "x".repeat(400);
        let k = key(&[Some("tree"), Some(&long), None, Some("y.z")]);
        assert!(k.len() <= MAX_KEY_BYTES, "{}", k.len());
        assert_eq!(k, key(&[Some("tree"), Some(&long), None, Some("y.z")]));
        let words: Vec<&str> = k.split('.').collect();
        assert_eq!(words.len(), 4);
        assert_eq!(words[0], "tree");
        assert!(words[1].contains('~'));
        assert_eq!(words[2], "_");
        assert_eq!(words[3], "y%2Ez");
        // Two different long values stay different.
        let other = format!("{}y", "x".repeat(399));
        assert_ne!(k, key(&[Some("tree"), Some(&other), None, Some("y.z")]));
    }

    #[test]
    fn shortening_never_splits_escapes() {
        let v = ".".repeat(200);
        let k = key(&[Some(&v), Some(&v)]);
        assert!(k.len() <= MAX_KEY_BYTES);
        for w in k.split('.') {
            let prefix = w.split('~').next().unwrap();
            assert_eq!(prefix.len() % 3, 0, "{w}");
        }
    }
}
