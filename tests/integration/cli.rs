//! The `translate` command line: output, exit status, and bad input with positions.

use std::io::Write;

use crate::harness::*;

#[test]
fn translate_writes_envelopes_and_exits_zero_for_a_failed_build() {
    let f = fixture("bazel/build_fail.json");
    let o = buildbus(&["translate", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = stdout_lines(&o);
    assert_eq!(lines.len(), clean("bazel/build_fail.json").len());
    let last = lines.last().unwrap();
    assert_eq!(last["_meta"]["kind"], "build");
    assert_eq!(last["payload"]["result"], "failure");
}

#[test]
fn summary_is_readable() {
    let o = buildbus(&[
        "translate",
        "--summary",
        fixture("bazel/test_mixed.bin").to_str().unwrap(),
        fixture("bazel/interrupted.json").to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains("result:   failure (exit 3)"), "{s}");
    assert!(s.contains("tests:    failed 1, flaky 1, passed 2"), "{s}");
    assert!(s.contains("test flaky: //tests:flaky_test"), "{s}");
    assert!(s.contains("result:   interrupted (exit 8)"), "{s}");
    assert!(s.contains("not_executed: //slow:sleepy_too"), "{s}");
}

/// `--summary` prints each build's summary when that build finishes: fed through a FIFO
/// one build at a time, the first build's summary is out before the second is written.
#[test]
fn summary_streams_each_build_as_it_finishes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    let dir = tempdir();
    let fifo = dir.path().join("events.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_buildbus"))
        .args(["translate", "--summary", "--format", "bep-json"])
        .arg(&fifo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run buildbus");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Opening the write end waits for buildbus to open the read end.
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    w.write_all(&std::fs::read(fixture("bazel/build_ok.json")).unwrap())
        .unwrap();
    w.flush().unwrap();
    // The first build's summary, through to its last line, with the FIFO still open
    // and the second build not written yet.
    let mut first = Vec::new();
    while !first.iter().any(|l: &String| l.starts_with("  artifacts:")) {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => first.push(line),
            Err(e) => panic!("no summary while the build's stream is open ({e}): {first:?}"),
        }
    }
    let first = first.join("\n");
    assert!(
        first.starts_with("bazel build 2aa7865a-f166-4812-8d1f-771bf95e49c4"),
        "{first}"
    );
    assert!(first.contains("result:   success (exit 0)"), "{first}");
    assert!(!first.contains("exit 3"), "{first}");
    // Now the second build; its summary follows once it is written.
    w.write_all(&std::fs::read(fixture("bazel/test_mixed.json")).unwrap())
        .unwrap();
    drop(w);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    let rest = rest.join("\n");
    assert!(status.success());
    assert!(rest.contains("result:   failure (exit 3)"), "{rest}");
    assert!(!rest.contains("2aa7865a"), "the first build once: {rest}");
}

#[test]
fn env_and_flags_override_fields() {
    let f = fixture("bazel/build_ok.json");
    let o = buildbus_env(
        &["translate", "--platform", "linux64", f.to_str().unwrap()],
        &[("BUILDBUS_TREE", "envtree"), ("BUILDBUS_TAGS", "a,b")],
    );
    assert!(o.status.success());
    for l in stdout_lines(&o) {
        assert_eq!(l["payload"]["tree"], "envtree");
        assert_eq!(l["payload"]["platform"], "linux64");
        assert_eq!(l["payload"]["tags"], serde_json::json!(["a", "b"]));
    }
}

#[test]
fn help_has_examples() {
    let o = buildbus(&["--help"]);
    assert!(o.status.success());
    let top = String::from_utf8(o.stdout).unwrap();
    for sub in ["translate", "publish", "setup", "dsi", "query", "demo"] {
        assert!(top.contains(sub), "{sub} listed in --help: {top}");
        let o = buildbus(&[sub, "--help"]);
        assert!(o.status.success(), "{sub} --help");
        let s = String::from_utf8(o.stdout).unwrap();
        assert!(
            s.contains("Usage") && s.contains("Examples:"),
            "{sub} --help has examples: {s}"
        );
    }
    let s = String::from_utf8(buildbus(&["translate", "--help"]).stdout).unwrap();
    assert!(s.contains("Exit status"), "{s}");
    // The benchmarks are their own binary (crates/bench, whose tests check its --help).
    assert!(!top.contains("bench"), "no bench command in --help: {top}");
    assert!(!buildbus(&["bench", "--help"]).status.success());
}

/// Writes `bytes` to a file in a temp dir and translates it.
fn translate_bytes(
    name: &str,
    bytes: &[u8],
    extra: &[&str],
) -> (std::process::Output, Vec<serde_json::Value>, String) {
    let dir = tempdir();
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    let mut args = vec!["translate"];
    args.extend_from_slice(extra);
    args.push(p.to_str().unwrap());
    let o = buildbus(&args);
    let lines = stdout_lines(&o);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    (o, lines, err)
}

fn kinds(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["_meta"]["kind"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn truncated_binary_keeps_what_came_before() {
    let data = std::fs::read(fixture("bazel/build_ok.bin")).unwrap();
    // Cut inside the last frames: everything up to the cut is still translated.
    let cut = data.len() - 100;
    let (o, lines, err) = translate_bytes("cut.bin", &data[..cut], &[]);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cut.bin")
            && err.contains("event #")
            && err.contains("(byte ")
            && err.contains("truncated"),
        "{err}"
    );
    // The build finished (buildFinished came before the cut) but lastMessage is lost:
    // the finished message still comes at the end of input, with all targets.
    let k = kinds(&lines);
    assert_eq!(k.iter().filter(|k| *k == "task").count(), 10, "{err}");
    assert_eq!(lines.last().unwrap()["payload"]["result"], "success");
    // Cut inside a length prefix: a different message, same behaviour.
    let mut odd = data[..data.len()].to_vec();
    odd.push(0x96);
    let (o, lines, err) = translate_bytes("prefix.bin", &odd, &[]);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("length prefix"), "{err}");
    assert_eq!(lines.len(), clean("bazel/build_ok.bin").len());
}

#[test]
fn garbage_line_is_skipped_with_its_line_number() {
    let text = std::fs::read_to_string(fixture("bazel/test_mixed.json")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(5, "{this is not json");
    lines.insert(9, "");
    let data = lines.join("\n") + "\n";
    let (o, out, err) = translate_bytes("garbage.json", data.as_bytes(), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("garbage.json: line 6 (byte ") && err.contains("invalid JSON"),
        "{err}"
    );
    // Everything else, before and after, is translated: the same messages as clean input.
    assert_eq!(out.len(), clean("bazel/test_mixed.json").len(), "{err}");
}

#[test]
fn invalid_utf8_and_oversized_lines() {
    let text = std::fs::read(fixture("bazel/build_ok.json")).unwrap();
    let mut data = b"{\"id\":{\"progress\":{}},\"progress\":{\"stderr\":\"\xff\xfe\"}}\n".to_vec();
    data.extend_from_slice(&text);
    let (o, out, err) = translate_bytes("utf8.json", &data, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("utf8.json: line 1 (byte 0): not valid UTF-8"),
        "{err}"
    );
    assert_eq!(out.len(), clean("bazel/build_ok.json").len());

    // A 10 KB limit: the few large events are skipped with their line, the rest kept.
    let dir = tempdir();
    let cfg = dir.path().join("small.toml");
    std::fs::write(&cfg, "[limits]\nmax_event_bytes = 10000\n").unwrap();
    let (o, out, err) = translate_bytes("big.json", &text, &["--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("exceeds the limit of 10000 bytes"), "{err}");
    assert!(err.contains("big.json: line "), "{err}");
    assert!(!out.is_empty());
}

/// Oversized events name the file, the byte offset where the event starts, the limit
/// and what happened; the events after a skipped one are still translated.
#[test]
fn oversized_events_say_where_and_what() {
    let dir = tempdir();
    let cfg = dir.path().join("16k.toml");
    std::fs::write(&cfg, "[limits]\nmax_event_bytes = 16384\n").unwrap();
    let cfg = ["--config", cfg.to_str().unwrap()];
    let text = std::fs::read(fixture("bazel/build_ok.json")).unwrap();
    let want = clean("bazel/build_ok.json").len();
    let big = [b"{".as_slice(), &[b'a'; 20_000]].concat();

    // A long line that ends after the limit, then the good lines.
    let data = [big.as_slice(), b"\n", &text].concat();
    let (o, out, err) = translate_bytes("long.json", &data, &cfg);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "long.json: line 1 (byte 0): a line of 20001 bytes exceeds the limit of 16 KiB"
        ),
        "{err}"
    );
    assert_eq!(out.len(), want, "{err}");

    // No line end at all after the good lines.
    let data = [text.as_slice(), &big].concat();
    let lines = text.iter().filter(|&&b| b == b'\n').count();
    let (o, out, err) = translate_bytes("nolf.json", &data, &cfg);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let msg = format!(
        "nolf.json: line {} (byte {}): no line end within the limit of 16 KiB \
         (limits.max_event_bytes): the input ends 20001 bytes after the line's start",
        lines + 1,
        text.len()
    );
    assert!(err.contains(&msg), "{err}");
    assert_eq!(out.len(), want, "{err}");

    // Binary: a length prefix declaring more than the limit (20000 = 0xa0 0x9c 0x01).
    let bin = std::fs::read(fixture("bazel/build_ok.bin")).unwrap();
    let data = [[0xa0, 0x9c, 0x01].as_slice(), &big[..20_000], &bin].concat();
    let (o, out, err) = translate_bytes("big.bin", &data, &cfg);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "big.bin: event #1 (byte 0): frame declares 20000 bytes, over the limit of 16 KiB"
        ),
        "{err}"
    );
    assert_eq!(out.len(), clean("bazel/build_ok.bin").len(), "{err}");
}

#[test]
fn empty_missing_and_unknown() {
    let (o, out, err) = translate_bytes("empty.json", b"", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(out.is_empty());
    assert!(
        err.contains("empty.json") && err.contains("empty input"),
        "{err}"
    );

    let o = buildbus(&["translate", "/nonexistent/x.json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/x.json"));

    // Event kinds from a newer Bazel: skipped and counted, not an error.
    let text = std::fs::read_to_string(fixture("bazel/build_ok.json")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(
        3,
        r#"{"id":{"fancyNewThing":{"x":"1"}},"fancyNewPayload":{"y":2}}"#,
    );
    let data = lines.join("\n") + "\n";
    let (o, out, err) = translate_bytes("newer.json", data.as_bytes(), &[]);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("skipped 1 events"), "{err}");
    assert_eq!(out.len(), clean("bazel/build_ok.json").len());

    let (o, _, err) = translate_bytes("x.dat", b"\x00\x01\x02garbage", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("cannot tell the format"), "{err}");

    let o = buildbus(&["translate", "--format", "nope", "x"]);
    assert_eq!(o.status.code(), Some(2));
}

/// Inputs that used to pass quietly are bad events: an error with its position each,
/// exit 1, everything valid still translated; a long run of them is reported compactly.
#[test]
fn bad_variables_and_empty_frames_are_errors_with_positions() {
    // A BitBake `allvariables` line whose value is not a mapping, in the middle.
    let text = std::fs::read_to_string(fixture("bitbake/success.eventlog")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let at = lines.len() / 2;
    let offset: usize = lines[..at].iter().map(|l| l.len() + 1).sum();
    lines.insert(at, r#"{"allvariables": 5}"#);
    let data = lines.join("\n") + "\n";
    let (o, out, err) = translate_bytes("vars.eventlog", data.as_bytes(), &[]);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let want = format!(
        "vars.eventlog: line {} (byte {offset}): invalid event: allvariables is a number, \
         not a mapping of variables",
        at + 1
    );
    assert!(err.contains(&want), "{err}");
    assert_eq!(out.len(), clean("bitbake/success.eventlog").len(), "{err}");

    // 100,000 empty frames (varint 0) after a whole binary BEP stream.
    let bin = std::fs::read(fixture("bazel/build_ok.bin")).unwrap();
    let data = [bin.as_slice(), &[0u8; 100_000]].concat();
    let (o, out, err) = translate_bytes("empty.bin", &data, &[]);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(out.len(), clean("bazel/build_ok.bin").len(), "{err}");
    let want = format!(
        "(byte {}): invalid protobuf: empty frame (length 0): no BuildEvent in it \
         [100000 bad events like this one in a row, the last at event #",
        bin.len()
    );
    assert!(
        err.contains("empty.bin: event #") && err.contains(&want),
        "{err}"
    );
    assert!(
        err.contains(&format!("(byte {})]", bin.len() + 99_999)),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
