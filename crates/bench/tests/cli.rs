//! The `buildbus-bench` command line: every bench is listed, with examples (what
//! `buildbus bench --help` was checked for before the benches left the product).

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_buildbus-bench"))
        .args(args)
        .env_remove("BUILDBUS_CONFIG")
        .output()
        .expect("run buildbus-bench")
}

#[test]
fn help_lists_every_bench_with_examples() {
    let o = bench(&["--help"]);
    assert!(o.status.success());
    let top = String::from_utf8(o.stdout).unwrap();
    assert!(
        top.contains("Usage") && top.contains("Examples:"),
        "--help has examples: {top}"
    );
    for sub in ["translate", "pipeline", "bitbake", "monitor", "bes", "aam"] {
        assert!(top.contains(sub), "{sub} listed in --help: {top}");
        let o = bench(&[sub, "--help"]);
        assert!(o.status.success(), "{sub} --help");
        let s = String::from_utf8(o.stdout).unwrap();
        assert!(s.contains("Usage"), "{sub} --help: {s}");
    }
    for sub in ["monitor", "aam"] {
        let s = String::from_utf8(bench(&[sub, "--help"]).stdout).unwrap();
        assert!(s.contains("Examples:"), "{sub} --help has examples: {s}");
    }
}

#[test]
fn translate_measures_memory_in_child_processes_of_its_own_binary() {
    let dir = tempfile::tempdir().unwrap();
    let o = bench(&[
        "-q",
        "translate",
        "--events",
        "500",
        "--runs",
        "1",
        "--json",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let children = v["memory"]["children"].as_array().unwrap();
    assert_eq!(children.len(), 4);
    for c in children {
        assert!(c["result"]["events"].as_u64().unwrap() > 0, "{c}");
        assert!(c["result"]["messages"].as_u64().unwrap() > 0, "{c}");
    }
}
