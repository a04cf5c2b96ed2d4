//! Console text: finding the warnings and errors a build tool printed.
//!
//! Bazel sends its terminal output inside `progress` events; this module cuts that text
//! into records. A record starts at a line with a level prefix (`ERROR:`, `WARNING:`,
//! `FATAL:`) and takes the continuation lines that follow until the next prefixed line
//! (`INFO:`, `Loading:`, `[12 / 30] ...`, ...). ANSI colour codes and carriage-return
//! redraws are removed first.

use std::sync::LazyLock;

use regex::Regex;

use crate::model::LogLevel;

static ANSI: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\x1b\[[0-9;?]*[ -/]*[@-~]").expect("static regex"));
static PREFIXED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:[A-Z][A-Za-z ]{0,30}:(?:\s|$)|\[[0-9,]+ / [0-9,]+\]|//|@)")
        .expect("static regex")
});
static LABEL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?:^|[\s'"(])(@{0,2}[A-Za-z0-9_.~+-]*//[A-Za-z0-9_/.+~-]*:[^\s'"(),;]+)"#)
        .expect("static regex")
});

/// One warning or error found in console text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub level: LogLevel,
    pub message: String,
}

/// The line prefixes of records, and their levels.
const LEVELS: [(&str, LogLevel); 3] = [
    ("ERROR:", LogLevel::Error),
    ("WARNING:", LogLevel::Warning),
    ("FATAL:", LogLevel::Critical),
];

/// Removes ANSI escapes and keeps only what a terminal would show after `\r` redraws.
pub fn clean(text: &str) -> String {
    let text = ANSI.replace_all(text, "");
    text.split('\n')
        .map(|line| line.rsplit('\r').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn level_of(line: &str) -> Option<(LogLevel, &str)> {
    for &(prefix, level) in &LEVELS {
        if let Some(rest) = line.strip_prefix(prefix) {
            return Some((level, rest.trim_start()));
        }
    }
    None
}

/// The warning and error records in `text`, in order.
pub fn records(text: &str) -> Vec<Record> {
    // Most console output has no record: without escapes, cleaning only drops what comes
    // before a `\r`, so a level word that is not in the raw text cannot be in the clean.
    if !text.contains('\x1b') && !LEVELS.iter().any(|(prefix, _)| text.contains(prefix)) {
        return Vec::new();
    }
    let text = clean(text);
    let mut out: Vec<Record> = Vec::new();
    let mut open = false;
    for line in text.split('\n') {
        if let Some((level, rest)) = level_of(line) {
            out.push(Record {
                level,
                message: rest.to_string(),
            });
            open = true;
        } else if open && !PREFIXED.is_match(line) {
            if let Some(r) = out.last_mut() {
                r.message.push('\n');
                r.message.push_str(line);
            }
        } else {
            open = false;
        }
    }
    for r in &mut out {
        let trimmed = r.message.trim_end().len();
        r.message.truncate(trimmed);
    }
    out
}

/// The first Bazel label mentioned in a message (`//pkg:name`, `@repo//pkg:name`).
pub fn first_label(message: &str) -> Option<String> {
    LABEL
        .captures(message)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().trim_end_matches(['.', ':']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shortcut for text without records keeps everything a record can hide in.
    #[test]
    fn records_behind_escapes_and_redraws_are_found() {
        assert!(records("Loading: 3 packages\nINFO: Build completed\n").is_empty());
        let split = records("\x1b[31mERR\x1b[0mOR: split by an escape\n");
        assert_eq!(split.len(), 1);
        assert_eq!(split[0].message, "split by an escape");
        let redrawn = records("[1 / 2] building\rWARNING: after a redraw\n");
        assert_eq!(redrawn.len(), 1);
        assert_eq!(redrawn[0].level, LogLevel::Warning);
    }

    #[test]
    fn records_take_continuation_lines() {
        let text = "Loading: \nERROR: /w/broken/BUILD:1:8: Executing genrule //broken:fails failed: (Exit 1)\n\nUse --sandbox_debug\nthis fails\nINFO: Elapsed time: 1s\n\x1b[33mWARNING: \x1b[0mTarget pattern parsing failed.\n - /x\n";
        let r = records(text);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].level, LogLevel::Error);
        assert_eq!(
            r[0].message,
            "/w/broken/BUILD:1:8: Executing genrule //broken:fails failed: (Exit 1)\n\nUse --sandbox_debug\nthis fails"
        );
        assert_eq!(r[1].level, LogLevel::Warning);
        assert_eq!(r[1].message, "Target pattern parsing failed.\n - /x");
        assert_eq!(
            first_label(&r[0].message).as_deref(),
            Some("//broken:fails")
        );
        assert_eq!(
            first_label("Skipping '//nonexistent:target': no such"),
            Some("//nonexistent:target".into())
        );
    }
}
