//! The generated Bazel Build Event Protocol (BEP) types: one typed path for
//! both of Bazel's local BEP outputs.
//!
//! `proto/build_event_stream.proto` is our own subset of upstream's
//! `build_event_stream.proto` (plus the few `command_line`/`failure_details`
//! messages it needs, folded into the same package). `build.rs` generates
//! prost structs for it and pbjson serde impls, so the same
//! [`build_event_stream::BuildEvent`] decodes
//!
//! - `--build_event_binary_file`: varint-length-delimited binary messages,
//!   via [`prost::Message::decode_length_delimited`], and
//! - `--build_event_json_file`: one proto3-JSON object per line, via
//!   `serde_json::from_str`.
//!
//! Fields and enum names this subset does not declare are skipped in both
//! formats, so streams from newer Bazel versions still decode. Timestamps and
//! durations are `pbjson_types` well-known types (RFC 3339 / `"1.5s"` in
//! JSON).

/// Generated from `proto/build_event_stream.proto` (package
/// `build_event_stream`) by prost-build and pbjson-build.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    rustdoc::all,
    unreachable_pub
)]
pub mod build_event_stream {
    include!(concat!(env!("OUT_DIR"), "/build_event_stream.rs"));
    include!(concat!(env!("OUT_DIR"), "/build_event_stream.serde.rs"));
}

#[cfg(test)]
mod tests {
    use super::build_event_stream::{
        aborted::AbortReason, build_event::Payload, build_event_id::Id, BuildEvent, TestStatus,
    };
    use prost::Message;
    use std::path::{Path, PathBuf};

    /// The fixture invocations that have both a `.json` and a `.bin`, with the
    /// event count from `tests/fixtures/bazel/README.md`.
    const FIXTURES: [(&str, usize); 5] = [
        ("build_ok", 45),
        ("build_fail", 65),
        ("test_mixed", 45),
        ("pattern_fail", 13),
        ("interrupted", 31),
    ];

    /// Fixture folders: Bazel 4.2.3 at the top level, 2.1.0 in a subfolder.
    const VERSIONS: [(&str, &str); 2] = [("", "4.2.3"), ("bazel-2.1.0", "2.1.0")];

    fn fixture_dir(sub: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/bazel")
            .join(sub)
    }

    fn decode_json(path: &Path) -> Vec<BuildEvent> {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str::<BuildEvent>(line).unwrap_or_else(|e| {
                    panic!("{}:{}: JSON decode failed: {e}", path.display(), i + 1)
                })
            })
            .collect()
    }

    fn decode_bin(path: &Path) -> Vec<BuildEvent> {
        let bytes = std::fs::read(path).unwrap();
        let mut buf = bytes.as_slice();
        let mut events = Vec::new();
        while !buf.is_empty() {
            let event = BuildEvent::decode_length_delimited(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "{}: binary decode of event #{} failed: {e}",
                    path.display(),
                    events.len() + 1
                )
            });
            events.push(event);
        }
        events
    }

    /// Debug renderings, sorted: equal lists mean equal multisets (map fields
    /// are BTreeMaps, so the rendering is deterministic).
    fn sorted_debug(events: &[BuildEvent]) -> Vec<String> {
        let mut v: Vec<String> = events.iter().map(|e| format!("{e:?}")).collect();
        v.sort();
        v
    }

    fn assert_same_multiset(what: &str, json: &[BuildEvent], bin: &[BuildEvent]) {
        let j = sorted_debug(json);
        let b = sorted_debug(bin);
        if j != b {
            let only_json: Vec<&String> = j.iter().filter(|s| !b.contains(s)).collect();
            let only_bin: Vec<&String> = b.iter().filter(|s| !j.contains(s)).collect();
            panic!(
                "{what}: JSON and binary events differ\n--- only in JSON ({}):\n{}\n--- only in binary ({}):\n{}",
                only_json.len(),
                only_json.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join("\n"),
                only_bin.len(),
                only_bin.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join("\n"),
            );
        }
        // Equal Debug output should mean equal values; check the bytes too.
        let mut je: Vec<Vec<u8>> = json.iter().map(Message::encode_to_vec).collect();
        let mut be: Vec<Vec<u8>> = bin.iter().map(Message::encode_to_vec).collect();
        je.sort();
        be.sort();
        assert_eq!(je, be, "{what}: re-encoded bytes differ");
    }

    fn expected_exit(version: &str, name: &str) -> (&'static str, i32) {
        match (name, version) {
            ("build_ok", _) => ("SUCCESS", 0),
            ("build_fail", _) => ("BUILD_FAILURE", 1),
            ("test_mixed", _) => ("TESTS_FAILED", 3),
            ("pattern_fail", "2.1.0") => ("PARSING_FAILURE", 1),
            ("pattern_fail", _) => ("BUILD_FAILURE", 1),
            ("interrupted", _) => ("INTERRUPTED", 8),
            _ => unreachable!("unknown fixture {name}"),
        }
    }

    fn check_invocation(version: &str, name: &str, events: &[BuildEvent], what: &str) {
        // Every id kind and payload in the fixtures is covered by the subset.
        for (i, e) in events.iter().enumerate() {
            let id =
                e.id.as_ref()
                    .unwrap_or_else(|| panic!("{what}: event #{i} has no id"));
            assert!(
                id.id.is_some(),
                "{what}: event #{i} has an unknown id kind: {e:?}"
            );
            assert!(
                e.payload.is_some(),
                "{what}: event #{i} has an unknown payload: {e:?}"
            );
            for child in &e.children {
                assert!(
                    child.id.is_some(),
                    "{what}: event #{i} announces an unknown id kind"
                );
            }
        }

        let last: Vec<usize> = (0..events.len())
            .filter(|&i| events[i].last_message)
            .collect();
        assert_eq!(last.len(), 1, "{what}: exactly one event has last_message");

        let started = events
            .iter()
            .find_map(|e| match &e.payload {
                Some(Payload::Started(s)) => Some(s),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{what}: no started event"));
        assert!(!started.uuid.is_empty(), "{what}: started.uuid is empty");
        assert!(
            started.start_time_millis > 0,
            "{what}: no start_time_millis"
        );
        assert_eq!(started.workspace_directory, "/tmp/bzlws", "{what}");
        // 4.2.3 from Debian reports no version at all.
        let expected_tool_version = if version == "2.1.0" { "2.1.0" } else { "" };
        assert_eq!(started.build_tool_version, expected_tool_version, "{what}");

        let finished = events
            .iter()
            .find_map(|e| match &e.payload {
                Some(Payload::Finished(f)) => Some(f),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{what}: no finished event"));
        let exit = finished.exit_code.as_ref().expect("finished.exit_code");
        let (exit_name, exit_code) = expected_exit(version, name);
        assert_eq!(
            (exit.name.as_str(), exit.code),
            (exit_name, exit_code),
            "{what}"
        );
        assert_eq!(finished.overall_success, exit_code == 0, "{what}");
        assert!(
            finished.finish_time_millis >= started.start_time_millis,
            "{what}"
        );

        let aborted: Vec<(&Id, AbortReason)> = events
            .iter()
            .filter_map(
                |e| match (&e.payload, e.id.as_ref().and_then(|id| id.id.as_ref())) {
                    (Some(Payload::Aborted(a)), Some(id)) => Some((id, a.reason())),
                    _ => None,
                },
            )
            .collect();

        match name {
            "test_mixed" => {
                let summaries: Vec<(&str, TestStatus)> = events
                    .iter()
                    .filter_map(|e| {
                        match (&e.payload, e.id.as_ref().and_then(|id| id.id.as_ref())) {
                            (Some(Payload::TestSummary(s)), Some(Id::TestSummary(id))) => {
                                Some((id.label.as_str(), s.overall_status()))
                            }
                            _ => None,
                        }
                    })
                    .collect();
                assert_eq!(summaries.len(), 4, "{what}: test summaries");
                assert!(
                    summaries.contains(&("//tests:flaky_test", TestStatus::Flaky)),
                    "{what}: {summaries:?}"
                );
                assert!(summaries.contains(&("//tests:fail_test", TestStatus::Failed)));
                assert!(summaries.contains(&("//tests:pass_test", TestStatus::Passed)));
                let results = events
                    .iter()
                    .filter(|e| matches!(e.payload, Some(Payload::TestResult(_))))
                    .count();
                assert_eq!(results, 7, "{what}: test results");
            }
            "pattern_fail" => {
                assert!(
                    aborted
                        .iter()
                        .any(|(id, reason)| matches!(id, Id::Pattern(p)
                        if p.pattern == ["//nonexistent:target"])
                            && *reason == AbortReason::LoadingFailure),
                    "{what}: {aborted:?}"
                );
            }
            "interrupted" => {
                assert!(
                    aborted
                        .iter()
                        .any(|(id, reason)| matches!(id, Id::TargetCompleted(_))
                            && *reason == AbortReason::Incomplete),
                    "{what}: {aborted:?}"
                );
            }
            "build_fail" => {
                let failed_action = events
                    .iter()
                    .find_map(|e| match &e.payload {
                        Some(Payload::Action(a)) if !a.success => Some(a),
                        _ => None,
                    })
                    .unwrap_or_else(|| panic!("{what}: no failed action"));
                assert_eq!(failed_action.label, "//broken:fails", "{what}");
                // 2.1.0 sends neither an exit code nor a failure detail here.
                if version == "2.1.0" {
                    assert_eq!(failed_action.exit_code, 0, "{what}");
                    assert!(failed_action.failure_detail.is_none(), "{what}");
                } else {
                    assert_eq!(failed_action.exit_code, 1, "{what}");
                    let detail = failed_action
                        .failure_detail
                        .as_ref()
                        .expect("failure_detail");
                    assert!(detail.message.contains("bash failed"), "{what}: {detail:?}");
                }
            }
            _ => {}
        }
    }

    #[test]
    fn json_and_binary_fixtures_decode_to_the_same_events() {
        for (sub, version) in VERSIONS {
            let dir = fixture_dir(sub);
            for (name, count) in FIXTURES {
                let what = format!("{version} {name}");
                let json_path = dir.join(format!("{name}.json"));
                let bin_path = dir.join(format!("{name}.bin"));
                let json = decode_json(&json_path);
                let bin = decode_bin(&bin_path);
                assert_eq!(json.len(), count, "{what}: JSON event count");
                assert_eq!(bin.len(), count, "{what}: binary event count");
                assert_same_multiset(&what, &json, &bin);
                check_invocation(version, name, &json, &format!("{what} (json)"));
                check_invocation(version, name, &bin, &format!("{what} (bin)"));
                // In the JSON file the lastMessage event is the last line.
                assert!(
                    json.last().unwrap().last_message,
                    "{what}: JSON ends with lastMessage"
                );
            }
        }
    }

    #[test]
    fn every_fixture_pair_is_tested() {
        // Guard against a new fixture pair that the list above forgets.
        for (sub, _) in VERSIONS {
            let dir = fixture_dir(sub);
            let mut pairs: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|entry| {
                    let path = entry.unwrap().path();
                    let stem = path.file_stem()?.to_str()?.to_owned();
                    let is_json = path.extension()? == "json";
                    (is_json && dir.join(format!("{stem}.bin")).exists()).then_some(stem)
                })
                .collect();
            pairs.sort();
            let mut expected: Vec<String> = FIXTURES.iter().map(|(n, _)| n.to_string()).collect();
            expected.sort();
            assert_eq!(pairs, expected, "fixture pairs in {}", dir.display());
        }
    }

    #[test]
    fn well_known_types_decode_from_json_and_binary() {
        // Newer Bazel versions send Timestamp/Duration fields; the fixtures
        // (4.2.3, 2.1.0) only have the *_millis ones.
        let line = r#"{"id":{"testResult":{"label":"//t:t","run":1,"shard":1,"attempt":1}},
            "testResult":{"status":"PASSED","testAttemptStart":"2026-11-21T10:00:00.500Z",
            "testAttemptDuration":"1.250s","testAttemptDurationMillis":"1250"}}"#;
        let event: BuildEvent = serde_json::from_str(line).unwrap();
        let Some(Payload::TestResult(result)) = &event.payload else {
            panic!("not a test result: {event:?}");
        };
        let start = result.test_attempt_start.as_ref().unwrap();
        assert_eq!((start.seconds, start.nanos), (1_795_255_200, 500_000_000));
        let duration = result.test_attempt_duration.as_ref().unwrap();
        assert_eq!((duration.seconds, duration.nanos), (1, 250_000_000));
        assert_eq!(result.test_attempt_duration_millis, 1250);

        let bytes = event.encode_length_delimited_to_vec();
        let back = BuildEvent::decode_length_delimited(bytes.as_slice()).unwrap();
        assert_eq!(back, event);
        let json_again: BuildEvent =
            serde_json::from_str(&serde_json::to_string(&event).unwrap()).unwrap();
        assert_eq!(json_again, event);
    }

    #[test]
    fn unknown_json_fields_and_enum_names_are_skipped() {
        let line = r#"{"id":{"testSummary":{"label":"//t:t"},"futureIdField":1},
            "newTopLevelKey":{"x":[1,2]},
            "testSummary":{"overallStatus":"SOME_FUTURE_STATUS","totalRunCount":2,
            "brandNewField":"x"}}"#;
        let event: BuildEvent = serde_json::from_str(line).unwrap();
        let Some(Payload::TestSummary(summary)) = &event.payload else {
            panic!("not a test summary: {event:?}");
        };
        assert_eq!(summary.total_run_count, 2);
        assert_eq!(summary.overall_status(), TestStatus::NoStatus);
    }
}
