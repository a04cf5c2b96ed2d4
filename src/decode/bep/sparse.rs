//! Sparse decoding of binary BEP: leaving out, at the wire level, what the translator
//! never reads.
//!
//! A Bazel build spends about half of its decoding time on parts of events buildbus
//! does not use: the structured command lines' option records (five fields and two tag
//! lists each, ~90 options per build, of which the translator keeps one or two strings),
//! and whole payloads such as `OptionsParsed`, `Fetch` or `WorkspaceConfig` whose ids
//! are all the translator looks at. [`decode`] walks an event's top-level fields first;
//! an event with none of those is left to prost as it is (most events), and one with
//! them is decoded without the unread payload, or with a command line that holds only
//! the fields the translator reads for its label:
//!
//! - `original`: the chunks and each option's `combined_form`;
//! - `canonical`: `option_name` and `option_value` of the options an `option:NAME`
//!   derive rule names ([`Needs`], from the configuration; [`Needs::ALL`] keeps all);
//! - any other label (`tool`): no sections.
//!
//! A completed target (`TargetComplete`) loses its tags, test timeouts, directory
//! outputs and, when it has output groups, the older flat list of the same files.
//!
//! The result is the same typed [`BuildEvent`] the JSON path produces, so one translator
//! serves both formats; `UNREAD_PAYLOADS`, `CommandLineNeeds` and
//! `target_complete_reads` must follow what `translate.rs` reads (the fixture test
//! `sparse_and_full_decoding_translate_alike` compares the two decodings' messages).
//! Anything unusual (a second payload field, a payload that is not length-delimited,
//! a repeated command line, deprecated groups, a wire error) goes to prost's full
//! decode, which also gives the error message for malformed input. Parts that are
//! skipped are not validated (an invalid UTF-8 string inside an unread option is not an
//! error).
//!
//! [`BuildEvent`]: bep::BuildEvent

use prost::Message;

use crate::decode::framing::varint;

use super::proto::build_event_stream as bep;
use bep::build_event::Payload as P;
use bep::build_event_id::Id;
use bep::command_line_section::SectionType;

/// `BuildEvent` payload fields (numbers of the `payload` oneof) the translator never
/// reads: `expanded` (6), `options_parsed` (13), `fetch` (21), `build_tool_logs` (23),
/// `workspace_info` (25), `convenience_symlinks_identified` (27), `target_summary`
/// (28), `exec_request` (29), `test_progress` (30). Their ids still arrive.
const UNREAD_PAYLOADS: [u32; 9] = [6, 13, 21, 23, 25, 27, 28, 29, 30];

/// `BuildEvent.structured_command_line`.
const STRUCTURED_COMMAND_LINE: u32 = 22;

/// `BuildEvent.completed` (a `TargetComplete`).
const COMPLETED: u32 = 8;

/// The `TargetComplete` fields the translator reads: `success` (1), `output_group` (2),
/// `failure_detail` (9), and `important_output` (4), the older flat list of the same
/// files, only when there are no output groups. Never read: `tag`, `target_kind`,
/// `test_size`, the test timeouts and `directory_output`.
fn target_complete_reads(number: u32, has_groups: bool) -> bool {
    matches!(number, 1 | 2 | 9) || (number == 4 && !has_groups)
}

/// Whether a `BuildEvent` field number belongs to the `payload` oneof.
fn is_payload(number: u32) -> bool {
    matches!(number, 3..=10 | 12..=18 | 21..=30)
}

/// Protobuf wire types.
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// One field of a message as it is on the wire.
struct Field<'a> {
    number: u32,
    wire: u8,
    /// The field's content (for `LEN`, without the length).
    value: &'a [u8],
    /// The whole field: key, length and content.
    raw: &'a [u8],
}

/// The fields of one message, in wire order; `None` at the first malformed byte or a
/// (deprecated) group.
fn next_field<'a>(buf: &mut &'a [u8]) -> Option<Option<Field<'a>>> {
    let all = *buf;
    if all.is_empty() {
        return Some(None);
    }
    let (key, n) = varint(all)?;
    let number = u32::try_from(key >> 3).ok().filter(|&n| n > 0)?;
    let wire = (key & 7) as u8;
    let rest = &all[n..];
    let (start, len) = match wire {
        VARINT => (0, varint(rest)?.1),
        I64 => (0, 8),
        I32 => (0, 4),
        LEN => {
            let (len, m) = varint(rest)?;
            (m, usize::try_from(len).ok()?)
        }
        _ => return None,
    };
    let end = start.checked_add(len).filter(|&e| e <= rest.len())?;
    *buf = &rest[end..];
    Some(Some(Field {
        number,
        wire,
        value: &rest[start..end],
        raw: &all[..n + end],
    }))
}

/// A `LEN` field's content as a string (prost's rule: proto3 strings are UTF-8).
fn string(f: &Field<'_>) -> Option<String> {
    (f.wire == LEN)
        .then(|| std::str::from_utf8(f.value).ok().map(str::to_string))
        .flatten()
}

/// What the translator reads that depends on the configuration: the options of the
/// canonical command line that `option:NAME` rules name (a build has dozens, and a rule
/// names one or two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    /// `None`: every option.
    options: Option<Vec<String>>,
}

impl Needs {
    /// Every option (what any configuration could read).
    pub const ALL: Needs = Needs { options: None };

    /// What the derivation rules `rules` (every rule of every field, as written in
    /// the configuration) can ask for: `option:NAME`, also inside `repo:`.
    pub fn of<'r>(rules: impl IntoIterator<Item = &'r str>) -> Needs {
        let mut options: Vec<String> = Vec::new();
        for rule in rules {
            let mut rule = rule;
            while let Some(inner) = rule.strip_prefix("repo:") {
                rule = inner;
            }
            if let Some(name) = rule.strip_prefix("option:") {
                if !options.iter().any(|o| o == name) {
                    options.push(name.to_string());
                }
            }
        }
        Needs {
            options: Some(options),
        }
    }

    /// Whether the canonical option named `name` (its bytes on the wire) is read.
    fn option(&self, name: &[u8]) -> bool {
        self.options
            .as_ref()
            .is_none_or(|o| o.iter().any(|n| n.as_bytes() == name))
    }
}

/// Decodes `bytes` sparsely if it has parts the translator never reads (given `needs`);
/// `None` means "decode it in full" (nothing to leave out, or anything unusual).
pub fn decode(
    bytes: &[u8],
    needs: &Needs,
) -> Option<Result<Box<bep::BuildEvent>, prost::DecodeError>> {
    // The one payload field; anything else (id, children, last_message) is kept. Most
    // events have a payload that is read: they go to prost as soon as it is seen.
    let mut payload = None;
    let mut rest = bytes;
    while let Some(f) = next_field(&mut rest)? {
        if !is_payload(f.number) {
            continue;
        }
        if payload.is_some()
            || f.wire != LEN
            || !(UNREAD_PAYLOADS.contains(&f.number)
                || f.number == STRUCTURED_COMMAND_LINE
                || f.number == COMPLETED)
        {
            return None;
        }
        payload = Some(f);
    }
    let payload = payload?;
    let unread = UNREAD_PAYLOADS.contains(&payload.number);
    // Everything but the payload goes through prost.
    let mut ev = Box::<bep::BuildEvent>::default();
    if let Err(e) = merge_fields(&mut *ev, bytes, |n| n != payload.number)? {
        return Some(Err(e));
    }
    if unread {
        return Some(Ok(ev));
    }
    if payload.number == COMPLETED {
        let mut has_groups = false;
        let mut rest = payload.value;
        while let Some(f) = next_field(&mut rest)? {
            has_groups |= f.number == 2;
        }
        let mut done = bep::TargetComplete::default();
        if let Err(e) = merge_fields(&mut done, payload.value, |n| {
            target_complete_reads(n, has_groups)
        })? {
            return Some(Err(e));
        }
        ev.payload = Some(P::Completed(done));
        return Some(Ok(ev));
    }
    let label = match ev.id.as_ref().and_then(|i| i.id.as_ref()) {
        Some(Id::StructuredCommandLine(s)) => s.command_line_label.as_str(),
        _ => "",
    };
    let cl = command_line(payload.value, CommandLineNeeds::of(label), needs)?;
    ev.payload = Some(P::StructuredCommandLine(cl));
    Some(Ok(ev))
}

/// Merges into `m` the fields of message `buf` that `keep` names (each run of kept
/// fields in one go: a message is the merge of its parts); `None` if `buf` is malformed.
fn merge_fields<M: Message>(
    m: &mut M,
    buf: &[u8],
    keep: impl Fn(u32) -> bool,
) -> Option<Result<(), prost::DecodeError>> {
    let mut run: Option<(usize, usize)> = None;
    let mut rest = buf;
    let mut at = 0;
    loop {
        let f = next_field(&mut rest)?;
        let kept = f.as_ref().is_some_and(|f| keep(f.number));
        match (kept, run) {
            (true, None) => run = Some((at, at)),
            (false, Some((start, end))) => {
                if let Err(e) = m.merge(&buf[start..end]) {
                    return Some(Err(e));
                }
                run = None;
            }
            _ => {}
        }
        let Some(f) = f else { break };
        at += f.raw.len();
        if let Some((_, end)) = &mut run {
            *end = at;
        }
    }
    Some(Ok(()))
}

/// Which parts of a structured command line the translator reads, by its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommandLineNeeds {
    /// `original`: chunks and `combined_form`.
    Original,
    /// `canonical`: `option_name` and `option_value`.
    Canonical,
    /// Anything else: the label only.
    Nothing,
}

impl CommandLineNeeds {
    fn of(label: &str) -> CommandLineNeeds {
        match label {
            "original" => CommandLineNeeds::Original,
            "canonical" => CommandLineNeeds::Canonical,
            _ => CommandLineNeeds::Nothing,
        }
    }
}

/// A `CommandLine` with only what `needs` asks for; `None` if malformed.
fn command_line(buf: &[u8], needs: CommandLineNeeds, config: &Needs) -> Option<bep::CommandLine> {
    let mut cl = bep::CommandLine::default();
    let mut rest = buf;
    while let Some(f) = next_field(&mut rest)? {
        match f.number {
            1 => cl.command_line_label = string(&f)?,
            2 if f.wire == LEN && needs != CommandLineNeeds::Nothing => {
                cl.sections.push(section(f.value, needs, config)?);
            }
            2 if f.wire == LEN => {}
            _ if f.number <= 2 => return None,
            _ => {}
        }
    }
    Some(cl)
}

/// One `CommandLineSection` (its label is never read).
fn section(buf: &[u8], needs: CommandLineNeeds, config: &Needs) -> Option<bep::CommandLineSection> {
    let mut s = bep::CommandLineSection::default();
    let mut rest = buf;
    while let Some(f) = next_field(&mut rest)? {
        if f.wire != LEN {
            if (1..=3).contains(&f.number) {
                return None;
            }
            continue;
        }
        match f.number {
            2 => {
                let mut chunks = match s.section_type.take() {
                    Some(SectionType::ChunkList(c)) => c,
                    _ => bep::ChunkList::default(),
                };
                if needs == CommandLineNeeds::Original {
                    chunks.merge(f.value).ok()?;
                }
                s.section_type = Some(SectionType::ChunkList(chunks));
            }
            3 => {
                let mut list = match s.section_type.take() {
                    Some(SectionType::OptionList(o)) => o,
                    _ => bep::OptionList::default(),
                };
                let mut opts = f.value;
                while let Some(o) = next_field(&mut opts)? {
                    match (o.number, o.wire) {
                        (1, LEN) => {
                            if let Some(o) = option(o.value, needs, config)? {
                                list.option.push(o);
                            }
                        }
                        (1, _) => return None,
                        _ => {}
                    }
                }
                s.section_type = Some(SectionType::OptionList(list));
            }
            _ => {}
        }
    }
    Some(s)
}

/// One `Option`, with the strings `needs` asks for: `Some(None)` for a canonical
/// option `config` does not read, `None` if malformed.
fn option(buf: &[u8], needs: CommandLineNeeds, config: &Needs) -> Option<Option<bep::Option>> {
    let mut o = bep::Option::default();
    if needs == CommandLineNeeds::Canonical {
        // Its name first (the last one on the wire counts, as for any proto3 string).
        let mut name: &[u8] = &[];
        let mut rest = buf;
        while let Some(f) = next_field(&mut rest)? {
            if f.number == 2 && f.wire == LEN {
                name = f.value;
            }
        }
        if !config.option(name) {
            return Some(None);
        }
    }
    let mut rest = buf;
    while let Some(f) = next_field(&mut rest)? {
        match (needs, f.number) {
            (CommandLineNeeds::Original, 1) => o.combined_form = string(&f)?,
            (CommandLineNeeds::Canonical, 2) => o.option_name = string(&f)?,
            (CommandLineNeeds::Canonical, 3) => o.option_value = string(&f)?,
            _ => {}
        }
    }
    Some(Some(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(bytes: &[u8]) -> bep::BuildEvent {
        bep::BuildEvent::decode(bytes).unwrap()
    }

    /// `ev` with only the parts of its command line the translator reads given `config`,
    /// as `decode` should give it.
    fn trimmed(mut ev: bep::BuildEvent, config: &Needs) -> bep::BuildEvent {
        let label = match ev.id.as_ref().and_then(|i| i.id.as_ref()) {
            Some(Id::StructuredCommandLine(s)) => s.command_line_label.clone(),
            _ => String::new(),
        };
        match &mut ev.payload {
            Some(P::StructuredCommandLine(cl)) => {
                let needs = CommandLineNeeds::of(&label);
                if needs == CommandLineNeeds::Nothing {
                    cl.sections.clear();
                }
                for s in &mut cl.sections {
                    s.section_label.clear();
                    match &mut s.section_type {
                        Some(SectionType::ChunkList(c)) if needs != CommandLineNeeds::Original => {
                            c.chunk.clear()
                        }
                        Some(SectionType::OptionList(l)) => {
                            if needs == CommandLineNeeds::Canonical {
                                l.option.retain(|o| config.option(o.option_name.as_bytes()));
                            }
                            for o in &mut l.option {
                                let keep = std::mem::take(o);
                                match needs {
                                    CommandLineNeeds::Original => {
                                        o.combined_form = keep.combined_form
                                    }
                                    _ => {
                                        o.option_name = keep.option_name;
                                        o.option_value = keep.option_value;
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            Some(P::Completed(c)) => {
                let read = bep::TargetComplete {
                    success: c.success,
                    important_output: if c.output_group.is_empty() {
                        std::mem::take(&mut c.important_output)
                    } else {
                        Vec::new()
                    },
                    output_group: std::mem::take(&mut c.output_group),
                    failure_detail: c.failure_detail.take(),
                    ..Default::default()
                };
                *c = read;
            }
            Some(p) if UNREAD_PAYLOADS.iter().any(|&n| payload_number(p) == n) => {
                ev.payload = None;
            }
            _ => {}
        }
        ev
    }

    /// Every rule of the shipped configuration's `[bazel.derive]` table (read from
    /// the file: the configuration module is above the decoders).
    fn builtin_rules() -> Vec<String> {
        let text = include_str!("../../../config/buildbus.toml");
        let table: toml::Table = toml::from_str(text).unwrap();
        let derive = table["bazel"]["derive"].as_table().unwrap();
        let rules: Vec<String> = derive
            .values()
            .flat_map(|v| v.as_array().unwrap())
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        assert!(rules.iter().any(|r| r.contains("option:")), "{rules:?}");
        rules
    }

    fn payload_number(p: &P) -> u32 {
        let mut buf = Vec::new();
        bep::BuildEvent {
            payload: Some(p.clone()),
            ..Default::default()
        }
        .encode(&mut buf)
        .unwrap();
        let mut b = buf.as_slice();
        next_field(&mut b).unwrap().unwrap().number
    }

    /// Every frame of every binary fixture: the sparse decoding is the full decoding
    /// less exactly the unread parts, and events without those are left to prost.
    #[test]
    fn fixture_frames_decode_to_the_full_event_less_the_unread_parts() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bazel");
        let mut sparse = 0;
        let mut command_lines = 0;
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("bin") {
                continue;
            }
            files += 1;
            let data = std::fs::read(&path).unwrap();
            let mut buf = data.as_slice();
            let builtin = Needs::of(builtin_rules().iter().map(String::as_str));
            while !buf.is_empty() {
                let (len, n) = varint(buf).unwrap();
                let frame = &buf[n..n + len as usize];
                buf = &buf[n + len as usize..];
                let expected = full(frame);
                // Every option, and only those the built-in rules name.
                for config in [&Needs::ALL, &builtin] {
                    match decode(frame, config) {
                        None => {
                            let p = expected.payload.as_ref().map(payload_number);
                            assert!(
                                p.is_none_or(|p| !UNREAD_PAYLOADS.contains(&p)
                                    && p != STRUCTURED_COMMAND_LINE
                                    && p != COMPLETED),
                                "{}: an event with unread parts was not decoded sparsely",
                                path.display()
                            );
                        }
                        Some(got) => {
                            sparse += 1;
                            if matches!(expected.payload, Some(P::StructuredCommandLine(_))) {
                                command_lines += 1;
                            }
                            assert_eq!(
                                *got.unwrap(),
                                trimmed(expected.clone(), config),
                                "{}",
                                path.display()
                            );
                        }
                    }
                }
            }
        }
        assert!(files >= 5, "binary fixtures found: {files}");
        // Each invocation has three structured command lines and an OptionsParsed.
        assert!(command_lines >= 3 * files, "{command_lines} command lines");
        assert!(sparse > command_lines, "{sparse} sparse events");
    }

    /// Only the canonical options `option:` rules name are kept (also inside `repo:`),
    /// each by its last name on the wire; the original command line keeps every option.
    #[test]
    fn canonical_options_are_kept_only_when_a_rule_names_them() {
        let rules = [
            "repo:repo:option:remote_url",
            "option:compilation_mode",
            "make:COMPILATION_MODE",
            "option:compilation_mode",
        ];
        let needs = Needs::of(rules);
        assert_eq!(
            needs.options.as_deref(),
            Some(&["remote_url".to_string(), "compilation_mode".to_string()][..])
        );
        assert!(needs.option(b"remote_url") && !needs.option(b"cpu") && !needs.option(b""));
        assert!(Needs::ALL.option(b"cpu") && Needs::ALL.option(b""));
        let event = |label: &str, options: &[(&str, &str)]| {
            let option = options
                .iter()
                .map(|(name, value)| bep::Option {
                    combined_form: format!("--{name}={value}"),
                    option_name: name.to_string(),
                    option_value: value.to_string(),
                    ..Default::default()
                })
                .collect();
            bep::BuildEvent {
                id: Some(bep::BuildEventId {
                    id: Some(Id::StructuredCommandLine(
                        bep::build_event_id::StructuredCommandLineId {
                            command_line_label: label.into(),
                        },
                    )),
                }),
                payload: Some(P::StructuredCommandLine(bep::CommandLine {
                    command_line_label: label.into(),
                    sections: vec![bep::CommandLineSection {
                        section_label: "command options".into(),
                        section_type: Some(SectionType::OptionList(bep::OptionList { option })),
                    }],
                })),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let options = |frame: &[u8], needs: &Needs| {
            let ev = decode(frame, needs).unwrap().unwrap();
            let Some(P::StructuredCommandLine(cl)) = ev.payload else {
                panic!("no command line: {ev:?}");
            };
            let Some(SectionType::OptionList(l)) = &cl.sections[0].section_type else {
                panic!("no options: {cl:?}");
            };
            l.option
                .iter()
                .map(|o| format!("{}|{}|{}", o.combined_form, o.option_name, o.option_value))
                .collect::<Vec<_>>()
        };
        let given = [("cpu", "k8"), ("compilation_mode", "opt"), ("", "x")];
        let canonical = event("canonical", &given);
        assert_eq!(options(&canonical, &needs), ["|compilation_mode|opt"]);
        assert_eq!(options(&canonical, &Needs::ALL).len(), 3);
        let original = event("original", &given);
        assert_eq!(
            options(&original, &needs),
            ["--cpu=k8||", "--compilation_mode=opt||", "--=x||"]
        );
        // A name given twice: the last one counts.
        let twice = bep::Option {
            option_name: "cpu".into(),
            ..Default::default()
        };
        let mut bytes = twice.encode_to_vec();
        bytes.extend(
            bep::Option {
                option_name: "compilation_mode".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let mut renamed = bep::Option::default();
        renamed.merge(bytes.as_slice()).unwrap();
        assert_eq!(renamed.option_name, "compilation_mode");
        assert_eq!(
            option(&bytes, CommandLineNeeds::Canonical, &needs).unwrap(),
            Some(renamed)
        );
    }

    /// A completed target keeps what is read, whatever the order of its fields on the
    /// wire; its older flat output list only when it has no output groups.
    #[test]
    fn completed_targets_keep_what_is_read() {
        let file = |name: &str| bep::File {
            name: name.into(),
            ..Default::default()
        };
        let part = |c: bep::TargetComplete| c.encode_to_vec();
        let group = bep::OutputGroup {
            name: "default".into(),
            ..Default::default()
        };
        let event = |parts: &[Vec<u8>]| {
            let body: Vec<u8> = parts.concat();
            let mut ev = bep::BuildEvent {
                last_message: true,
                ..Default::default()
            }
            .encode_to_vec();
            // `completed` (8), length-delimited.
            ev.push(8 << 3 | 2);
            prost::encoding::encode_varint(body.len() as u64, &mut ev);
            ev.extend(body);
            ev
        };
        let tag = part(bep::TargetComplete {
            tag: vec!["manual".into()],
            ..Default::default()
        });
        let flat = part(bep::TargetComplete {
            important_output: vec![file("a"), file("b")],
            ..Default::default()
        });
        let success = part(bep::TargetComplete {
            success: true,
            ..Default::default()
        });
        let groups = part(bep::TargetComplete {
            output_group: vec![group.clone()],
            ..Default::default()
        });
        let completed = |frame: &[u8]| {
            let ev = decode(frame, &Needs::ALL).unwrap().unwrap();
            assert!(ev.last_message);
            match ev.payload {
                Some(P::Completed(c)) => c,
                p => panic!("{p:?}"),
            }
        };
        let c = completed(&event(&[
            tag.clone(),
            flat.clone(),
            success.clone(),
            groups,
        ]));
        assert_eq!(
            c,
            bep::TargetComplete {
                success: true,
                output_group: vec![group],
                ..Default::default()
            }
        );
        let c = completed(&event(&[flat.clone(), tag, success, flat]));
        assert!(c.success && c.tag.is_empty());
        assert_eq!(
            c.important_output,
            [file("a"), file("b"), file("a"), file("b")]
        );
    }

    #[test]
    fn malformed_or_unusual_frames_are_left_to_prost() {
        // Truncated: a LEN field longer than the frame.
        assert!(decode(&[0xb2, 0x01, 0x05, 0x0a], &Needs::ALL).is_none());
        // A group (wire type 3) at the top level.
        assert!(decode(&[0x0b, 0x0c], &Needs::ALL).is_none());
        // Two payload fields: OptionsParsed (13) then Progress (3).
        let two = [0x6a, 0x00, 0x1a, 0x00];
        assert!(decode(&two, &Needs::ALL).is_none());
        // One unread payload: decoded without it.
        let ev = decode(&[0x6a, 0x02, 0x0a, 0x00], &Needs::ALL)
            .unwrap()
            .unwrap();
        assert_eq!(ev.payload, None);
        // A command line whose option has invalid UTF-8 in a field that is read: prost
        // reports it; and the same byte in a field that is not read is skipped.
        let event = |form: &str, source: &str| {
            let cl = bep::CommandLine {
                command_line_label: "original".into(),
                sections: vec![bep::CommandLineSection {
                    section_label: "x".into(),
                    section_type: Some(SectionType::OptionList(bep::OptionList {
                        option: vec![bep::Option {
                            combined_form: form.into(),
                            source: source.into(),
                            ..Default::default()
                        }],
                    })),
                }],
            };
            let ev = bep::BuildEvent {
                id: Some(bep::BuildEventId {
                    id: Some(Id::StructuredCommandLine(
                        bep::build_event_id::StructuredCommandLineId {
                            command_line_label: "original".into(),
                        },
                    )),
                }),
                payload: Some(P::StructuredCommandLine(cl)),
                ..Default::default()
            };
            let mut buf = ev.encode_to_vec();
            let at = buf.iter().position(|&b| b == b'~').unwrap();
            buf[at] = 0xff;
            buf
        };
        let bad_read = event("--a=~", "rc");
        assert!(decode(&bad_read, &Needs::ALL).is_none());
        assert!(crate::decode::bep::codec::decode_binary(&bad_read, &Needs::ALL).is_err());
        let bad_unread = event("--a=b", "~");
        let ev = decode(&bad_unread, &Needs::ALL).unwrap().unwrap();
        let Some(P::StructuredCommandLine(cl)) = ev.payload else {
            panic!("no command line: {ev:?}");
        };
        let Some(SectionType::OptionList(l)) = &cl.sections[0].section_type else {
            panic!("no options: {cl:?}");
        };
        assert_eq!(l.option[0].combined_form, "--a=b");
        assert_eq!(l.option[0].source, "");
    }
}
