//! Planted secrets: a Bazel stream and a BitBake event log with secrets in every place
//! an option, a metadata entry or a variable can carry one (command-line options both
//! as `--opt=value` and as `--opt value`), translated and published through RabbitMQ
//! into the DSI: none of them may appear in any message or any stored row.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use buildbus::config::{Config, FieldValues};
use buildbus::decode::bep::proto::build_event_stream::BuildEvent;
use buildbus::model::{Envelope, DEFAULT_EXCHANGE_PREFIX};
use buildbus::systems::Context;
use prost::Message;
use serde_json::{json, Value};

use crate::harness::*;
use crate::pipeline::{expected_counts, run_dsi_until};

/// Every planted secret contains this, and nothing else in the fixtures does. (No key
/// pattern word in it: a marker must not be redacted for what it is called.)
const MARK: &str = "PLNTQZ";

/// A planted secret: `PLNTQZ<where>X`.
fn s(place: &str) -> String {
    format!("{MARK}{place}X")
}

/// Split and joined secret options, as argv words.
fn argv_secrets(p: &str) -> Vec<String> {
    vec![
        "--client_env".into(),
        format!("GITHUB_TOKEN={}", s(&format!("{p}1"))),
        "--remote_header".into(),
        format!("x-api-key={}", s(&format!("{p}2"))),
        "--bes_header".into(),
        format!("Authorization=Basic {}", s(&format!("{p}3"))),
        "-client_env".into(),
        format!("HOME={}", s(&format!("{p}4"))),
        "--client_env=".to_string() + &format!("PWD={}", s(&format!("{p}5"))),
        "--google_credentials".into(),
        s(&format!("{p}6")),
        "--remote_header=x-api-key=".to_string() + &s(&format!("{p}7")),
        "--action_env".into(),
        format!("NPM_TOKEN={}", s(&format!("{p}8"))),
        // An empty word between an option and its value.
        "--client_env".into(),
        String::new(),
        format!("PATH={}", s(&format!("{p}9"))),
    ]
}

/// The same, as one line of free text.
fn text_secrets(p: &str) -> String {
    format!(
        "--client_env GITHUB_TOKEN={} --remote_header x-api-key={} \
         --bes_header Authorization=Basic {} --client_env=HOME={} -client_env PWD={}",
        s(&format!("{p}1")),
        s(&format!("{p}2")),
        s(&format!("{p}3")),
        s(&format!("{p}4")),
        s(&format!("{p}5")),
    )
}

/// `build_ok.json` with secrets planted in the unstructured argv, the original and
/// canonical structured command lines, `OptionsParsed`, the options description, the
/// build metadata, the workspace status and a progress line. Without
/// `structured`, the structured command lines are left out (the command line then
/// comes from the unstructured argv alone).
fn planted_events(structured: bool) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture("bazel/build_ok.json")).unwrap();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut ev: Value = serde_json::from_str(line).unwrap();
        let kind = ev["id"]
            .as_object()
            .and_then(|o| o.keys().next())
            .cloned()
            .unwrap_or_default();
        match kind.as_str() {
            "started" => {
                if !structured {
                    if let Some(c) = ev["children"].as_array_mut() {
                        c.retain(|c| c.get("structuredCommandLine").is_none());
                    }
                }
                let d = &mut ev["started"]["optionsDescription"];
                *d = json!(format!(
                    "{} {}",
                    d.as_str().unwrap_or(""),
                    text_secrets("D")
                ));
            }
            "unstructuredCommandLine" => {
                let args = ev["unstructuredCommandLine"]["args"]
                    .as_array_mut()
                    .unwrap();
                let at = 1.min(args.len());
                for (i, a) in argv_secrets("U").into_iter().enumerate() {
                    args.insert(at + i, json!(a));
                }
                // After the targets too (`bazel run //x -- args`).
                args.push(json!("--"));
                args.extend(argv_secrets("V").into_iter().map(Value::from));
            }
            "structuredCommandLine" if !structured => continue,
            "structuredCommandLine" => {
                let label = ev["id"]["structuredCommandLine"]["commandLineLabel"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let sections = ev["structuredCommandLine"]
                    .get_mut("sections")
                    .and_then(Value::as_array_mut);
                if let Some(sections) = sections {
                    let p = if label == "original" { "S" } else { "C" };
                    // Split options as chunks (a residual), joined ones as options.
                    sections.push(json!({
                        "sectionLabel": "residual",
                        "chunkList": {"chunk": argv_secrets(&format!("{p}a"))},
                    }));
                    sections.push(json!({
                        "sectionLabel": "command options",
                        "optionList": {"option": [
                            {"combinedForm": format!("--client_env=TOKEN={}", s(&format!("{p}b"))),
                             "optionName": "client_env",
                             "optionValue": format!("TOKEN={}", s(&format!("{p}b"))),},
                            {"combinedForm": format!("--remote_header x-api-key={}", s(&format!("{p}c"))),
                             "optionName": "remote_header",
                             "optionValue": format!("x-api-key={}", s(&format!("{p}c"))),},
                            {"combinedForm": format!("--bes_header=Authorization=Basic {}", s(&format!("{p}d"))),
                             "optionName": "bes_header",
                             "optionValue": format!("Authorization=Basic {}", s(&format!("{p}d"))),},
                        ]},
                    }));
                }
            }
            "optionsParsed" => {
                let o = ev["optionsParsed"].as_object_mut().unwrap();
                for (key, p) in [
                    ("startupOptions", "Oa"),
                    ("explicitStartupOptions", "Ob"),
                    ("cmdLine", "Oc"),
                    ("explicitCmdLine", "Od"),
                ] {
                    let list = o.entry(key).or_insert_with(|| json!([]));
                    if let Some(list) = list.as_array_mut() {
                        list.extend(argv_secrets(p).into_iter().map(Value::from));
                    }
                }
            }
            "buildMetadata" => {
                let m = ev["buildMetadata"]["metadata"].as_object_mut().unwrap();
                m.insert("CI_ARGS".into(), json!(text_secrets("Ma")));
                m.insert(
                    "CI_COMMAND".into(),
                    json!(format!("bazel build {}", text_secrets("Mb"))),
                );
                m.insert("DEPLOY_TOKEN".into(), json!(s("Mc")));
                m.insert("TAGS".into(), json!(format!("ci,{}", text_secrets("Md"))));
            }
            "workspaceStatus" => {
                let items = ev["workspaceStatus"]["item"].as_array_mut().unwrap();
                items.push(json!({"key": "STABLE_CI_ARGS", "value": text_secrets("Wa")}));
                items.push(json!({"key": "STABLE_API_TOKEN", "value": s("Wb")}));
                for i in items.iter_mut() {
                    if i["key"] == "BUILD_USER" {
                        i["value"] = json!(format!("bzl {}", text_secrets("Wc")));
                    }
                }
            }
            "progress" => {
                if let Some(p) = ev.get_mut("progress").and_then(Value::as_object_mut) {
                    let e = p.entry("stderr").or_insert_with(|| json!(""));
                    *e = json!(format!(
                        "{}INFO: running with {}\n",
                        e.as_str().unwrap_or(""),
                        text_secrets("P")
                    ));
                }
            }
            _ => {}
        }
        out.push(ev);
    }
    out
}

/// The planted stream as BEP JSON (`.json`) and binary (`.bin`) files in `dir`.
fn planted_bep(dir: &Path, structured: bool) -> [PathBuf; 2] {
    let events = planted_events(structured);
    let name = if structured {
        "planted"
    } else {
        "planted_argv"
    };
    let json_path = dir.join(format!("{name}.json"));
    let mut text = String::new();
    let mut bin = Vec::new();
    for ev in &events {
        let line = serde_json::to_string(ev).unwrap();
        let decoded: BuildEvent = serde_json::from_str(&line).unwrap();
        decoded.encode_length_delimited(&mut bin).unwrap();
        text.push_str(&line);
        text.push('\n');
    }
    assert!(text.contains(MARK));
    std::fs::write(&json_path, text).unwrap();
    let bin_path = dir.join(format!("{name}.bin"));
    std::fs::write(&bin_path, bin).unwrap();
    [json_path, bin_path]
}

/// `success.eventlog` with secrets planted in the command line (`BB_CMDLINE`, a Python
/// list of argv words) and in variables that become metadata and derived fields.
fn planted_bitbake(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixture("bitbake/success.eventlog")).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if !line.starts_with("{\"allvariables\"") {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut v: Value = serde_json::from_str(line).unwrap();
        let vars = v["allvariables"].as_object_mut().unwrap();
        let mut argv = vec!["/usr/bin/bitbake".to_string()];
        argv.extend(argv_secrets("Ba"));
        argv.push("demo-image".into());
        let list = format!(
            "[{}]",
            argv.iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        vars.insert(
            "BB_CMDLINE".into(),
            json!({"v": list, "history": [{"op": "set", "detail": argv}], "doc": null, "func": null}),
        );
        for (k, val) in [
            ("DISTRO_VERSION", format!("1.0 {}", text_secrets("Bb"))),
            ("BUILDBUS_TAGS", format!("ci {}", text_secrets("Bc"))),
            ("SDKMACHINE", format!("x86_64 {}", text_secrets("Bd"))),
            ("GIT_TOKEN", s("Be")),
        ] {
            vars.insert(
                k.into(),
                json!({"v": val, "history": [], "doc": null, "func": null}),
            );
        }
        out.push_str(&serde_json::to_string(&v).unwrap());
        out.push('\n');
    }
    assert!(out.contains(MARK));
    let path = dir.join("planted.eventlog");
    std::fs::write(&path, out).unwrap();
    path
}

/// A configuration whose derive rules copy options, metadata, status and variables
/// that hold secrets into Pulse fields.
fn greedy_rules() -> Context {
    let cfg = Config::parse(
        "[bazel.derive]\n\
         tree = [\"option:remote_header\"]\n\
         product = [\"metadata:CI_ARGS\"]\n\
         branch = [\"status:STABLE_CI_ARGS\"]\n\
         revision = [\"option:client_env\"]\n\
         buildtype = [\"option:bes_header\"]\n\
         tags = [\"status:STABLE_API_TOKEN\"]\n\
         [bitbake.derive]\n\
         tree = [\"var:BB_CMDLINE\"]\n\
         product = [\"var:GIT_TOKEN\"]\n\
         branch = [\"var:DISTRO_VERSION\"]\n",
        "greedy",
    )
    .unwrap();
    Context::new(&cfg, &FieldValues::default()).unwrap()
}

/// Every marker that shows up in `msgs`, with where.
fn leaks(msgs: &[Envelope]) -> Vec<String> {
    msgs.iter()
        .flat_map(|m| {
            let text = format!("{} {m:?}", String::from_utf8_lossy(&m.to_json()));
            text.match_indices(MARK)
                .map(|(i, _)| {
                    let from = text[..i].char_indices().rev().nth(60).map_or(0, |(j, _)| j);
                    let to = (i + 16).min(text.len());
                    format!("{}: …{}", m.meta.kind.as_str(), &text[from..to])
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn planted_secrets_never_leave_the_translation() {
    let dir = tempdir();
    let mut files: Vec<PathBuf> = Vec::new();
    files.extend(planted_bep(dir.path(), true));
    files.extend(planted_bep(dir.path(), false));
    files.push(planted_bitbake(dir.path()));
    for ctx in [Context::builtin(), greedy_rules()] {
        for f in &files {
            let (msgs, report) = translate_with(f, &ctx);
            assert!(report.clean(), "{}: {:?}", f.display(), report.errors);
            assert!(msgs.len() > 5, "{}: {} messages", f.display(), msgs.len());
            let found = leaks(&msgs);
            assert!(found.is_empty(), "{}:\n{}", f.display(), found.join("\n"));
            // The redaction kept what is not secret.
            let b = finished(&msgs);
            let cmd = b.command.as_deref().unwrap_or_default();
            if f.extension().is_some_and(|e| e != "eventlog") {
                assert!(
                    cmd.contains("--client_env GITHUB_TOKEN=<redacted>"),
                    "{cmd}"
                );
                assert!(cmd.contains("//app/..."), "{cmd}");
            } else {
                assert!(cmd.contains("'GITHUB_TOKEN=<redacted>'"), "{cmd}");
                assert!(cmd.contains("demo-image"), "{cmd}");
            }
        }
    }
}

#[test]
fn planted_secrets_never_reach_the_store() {
    let (url, _) = vhost("redact-planted");
    let dir = tempdir();
    let mut files: Vec<PathBuf> = Vec::new();
    files.extend(planted_bep(dir.path(), true));
    files.extend(planted_bep(dir.path(), false));
    files.push(planted_bitbake(dir.path()));
    let msgs: Vec<Envelope> = files
        .iter()
        .flat_map(|f| {
            let (m, r) = translate(f);
            assert!(r.clean(), "{}: {:?}", f.display(), r.errors);
            m
        })
        .collect();
    let want = expected_counts(&msgs);
    // Published from this process: the `buildbus` binary in a shared target directory
    // may be another checkout's.
    rt().block_on(async {
        let cfg = buildbus::bus::publish::PublisherConfig::new(&url, DEFAULT_EXCHANGE_PREFIX);
        let mut p = buildbus::bus::publish::Publisher::<u64>::connect(cfg)
            .await
            .unwrap();
        for (i, m) in msgs.iter().enumerate() {
            p.publish(buildbus::bus::message::Outgoing::from_envelope(m), i as u64)
                .await
                .unwrap();
        }
        p.close().await.unwrap();
    });
    let db = dir.path().join("planted.db");
    let store = format!("sqlite:{}", db.display());
    let stats = run_dsi_until(&url, &store, 1, want.messages);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    // Every table, every column, as text.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(tables.iter().any(|t| t == "messages"), "{tables:?}");
    let mut cells = 0usize;
    let mut found = Vec::new();
    for t in &tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{t}\"")).unwrap();
        let n = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..n {
                use rusqlite::types::ValueRef;
                let text = match row.get_ref(i).unwrap() {
                    ValueRef::Text(b) | ValueRef::Blob(b) => {
                        String::from_utf8_lossy(b).into_owned()
                    }
                    _ => continue,
                };
                cells += 1;
                if text.contains(MARK) {
                    found.push(format!("{t}: {text}"));
                }
            }
        }
    }
    assert!(cells > 100, "{cells} text cells");
    assert!(found.is_empty(), "{}", found.join("\n"));
}
