//! Fuzz and property tests: every decoder is fed generated and mutated inputs (at least
//! 10,000 per decoder and run), and must not panic, must finish each input within
//! [`BOUND`], and must answer bad input with a positioned error. Memory is checked by
//! the `fuzz_memory` test binary (a counting allocator needs a binary of its own).
//!
//! Inputs come from [`gen`]: the real recordings of `tests/fixtures/` mutated (bit
//! flips, truncations, splices, huge varints and length fields, repeated chunks, deep
//! nesting) and inputs built from scratch. The run's seed is fixed;
//! `BUILDBUS_FUZZ_SEED` changes it, and a failure names the seed, the input's number,
//! and where the input was saved. Inputs that found a bug are kept under
//! `tests/fixtures/fuzz/<decoder>/` and replayed by
//! [`saved_inputs_still_pass`].
//!
//! The older property tests below (proptest) check that a damaged stream never loses
//! what came before the damage.

pub mod corpus;
pub mod gen;

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use buildbus::sources::file::{translate_reader, Format};
use corpus::*;
use gen::Dialect;
use proptest::prelude::*;

use crate::harness::fixture;

fn run(
    bytes: &[u8],
    format: Option<Format>,
    name: &str,
) -> (usize, buildbus::sources::file::StreamReport) {
    // One context for every run (building one compiles the configuration's patterns).
    let ctx = ctx();
    let mut n = 0;
    let r = translate_reader(
        Cursor::new(bytes.to_vec()),
        Path::new(name),
        format,
        &ctx,
        &mut |_| n += 1,
    );
    (n, r)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        for (format, name) in [(Some(buildbus::systems::bazel::BEP_JSON), "x.json"), (Some(buildbus::systems::bazel::BEP_BINARY), "x.bin"), (None, "x")] {
            let (_, report) = run(&bytes, format, name);
            prop_assert!(report.events as usize <= bytes.len() + 1);
        }
    }

    #[test]
    fn mangled_fixtures_never_panic(cut in 0usize..18240, flips in proptest::collection::vec((0usize..18240, any::<u8>()), 0..8)) {
        for rel in ["bazel/build_ok.bin", "bazel/build_ok.json"] {
            let mut data = std::fs::read(fixture(rel)).unwrap();
            for (at, b) in &flips {
                let i = at % data.len();
                data[i] ^= b;
            }
            data.truncate(cut.min(data.len()));
            let (_, report) = run(&data, None, rel);
            // Whatever was decoded is counted; errors carry positions inside the data.
            for e in &report.errors {
                prop_assert!(e.pos.offset <= data.len() as u64, "{e}");
            }
        }
    }
}

#[test]
fn a_prefix_of_a_stream_gives_a_prefix_of_its_messages() {
    let data = std::fs::read(fixture("bazel/test_mixed.json")).unwrap();
    let (all, _) = run(&data, Some(buildbus::systems::bazel::BEP_JSON), "t.json");
    let mut last = 0;
    for cut in (0..data.len()).step_by(997) {
        let (n, _) = run(
            &data[..cut],
            Some(buildbus::systems::bazel::BEP_JSON),
            "t.json",
        );
        assert!(n <= all);
        // Messages are only held, never lost: longer prefixes never give fewer.
        assert!(n + 40 >= last, "cut {cut}: {n} after {last}");
        last = last.max(n);
    }
}

// ------------------------------------------------------------------------------------
// The fuzz driver
// ------------------------------------------------------------------------------------

/// The most one input may take (a debug build on a loaded 2-core machine decodes the
/// largest seed in milliseconds: this catches hangs and blow-ups, not slowness).
const BOUND: Duration = Duration::from_secs(2);

/// Inputs per decoder and run (CI); `BUILDBUS_FUZZ_COUNT` asks for more.
const COUNT: usize = 10_000;

/// Where a failing input is written for reproduction (and, once fixed, to be moved to
/// `tests/fixtures/fuzz/<decoder>/`).
fn save_failure(decoder: &str, seed: u64, i: usize, input: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join("buildbus-fuzz");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{decoder}-{seed:#x}-{i}.bin"));
    let _ = std::fs::write(&path, input);
    path
}

/// Feeds `count` inputs made from `seeds` to `check` on a worker thread: a panic, an
/// input taking over [`BOUND`], or a broken property fails the test with the seed and
/// the input's number (the input is saved too). Returns how many inputs were checked.
fn fuzz(
    decoder: &'static str,
    seeds: Vec<Vec<u8>>,
    dialect: &'static Dialect,
    count: usize,
    check: Check,
) -> usize {
    assert!(!seeds.is_empty(), "{decoder}: no seed inputs");
    let count = gen::count(count).max(count.min(seeds.len()));
    let seed = gen::seed();
    let seeds = Arc::new(seeds);
    let (tx, rx) = mpsc::channel::<(usize, Result<(), String>)>();
    let worker = {
        let seeds = Arc::clone(&seeds);
        std::thread::Builder::new()
            .name(format!("fuzz-{decoder}"))
            .spawn(move || {
                for (i, input) in gen::inputs(seed, &seeds, dialect, count) {
                    let started = Instant::now();
                    let outcome = match catch_unwind(AssertUnwindSafe(|| check(&input))) {
                        Ok(r) => r,
                        Err(p) => Err(format!(
                            "panicked: {}",
                            p.downcast_ref::<String>()
                                .map(String::as_str)
                                .or_else(|| p.downcast_ref::<&str>().copied())
                                .unwrap_or("(no message)")
                        )),
                    };
                    let outcome = outcome.and_then(|()| {
                        let took = started.elapsed();
                        if took > BOUND {
                            Err(format!("took {took:?}, over {BOUND:?}"))
                        } else {
                            Ok(())
                        }
                    });
                    let failed = outcome.is_err();
                    if tx.send((i, outcome)).is_err() || failed {
                        return;
                    }
                }
            })
            .unwrap()
    };
    let mut done = 0;
    loop {
        // A hung input never answers: the wait is the bound (with room for the
        // scheduler of a loaded machine).
        match rx.recv_timeout(BOUND * 5) {
            Ok((i, Ok(()))) => {
                assert_eq!(i, done);
                done += 1;
            }
            Ok((i, Err(why))) => {
                let input = gen::nth(seed, &seeds, dialect, i);
                let saved = save_failure(decoder, seed, i, &input);
                panic!(
                    "{decoder}: input #{i} of seed {seed:#x} ({} bytes, saved as {}): {why}\n\
                     reproduce with BUILDBUS_FUZZ_SEED={seed:#x}",
                    input.len(),
                    saved.display()
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let input = gen::nth(seed, &seeds, dialect, done);
                let saved = save_failure(decoder, seed, done, &input);
                // The worker is left behind: it cannot be stopped, and the test fails.
                panic!(
                    "{decoder}: input #{done} of seed {seed:#x} ({} bytes, saved as {}) \
                     did not finish within {:?}\nreproduce with BUILDBUS_FUZZ_SEED={seed:#x}",
                    input.len(),
                    saved.display(),
                    BOUND * 5
                );
            }
        }
    }
    worker.join().unwrap();
    assert_eq!(done, count, "{decoder}: the worker stopped early");
    eprintln!("{decoder}: {done} inputs of seed {seed:#x}");
    done
}

// ------------------------------------------------------------------------------------
// The runs
// ------------------------------------------------------------------------------------

#[test]
fn fuzz_pickle() {
    assert!(fuzz("pickle", pickles(), &gen::PICKLE, COUNT, check_pickle) >= COUNT,);
}

#[test]
fn fuzz_eventlog_lines() {
    assert!(
        fuzz(
            "eventlog",
            eventlog_lines(),
            &gen::JSON,
            COUNT,
            check_eventlog_line
        ) >= COUNT,
    );
}

#[test]
fn fuzz_bep_json() {
    assert!(
        fuzz(
            "bep-json",
            bep_json_lines(),
            &gen::JSON,
            COUNT,
            check_bep_json
        ) >= COUNT,
    );
}

#[test]
fn fuzz_bep_binary_frames() {
    assert!(
        fuzz(
            "bep-binary",
            bep_frames(),
            &gen::PROTOBUF,
            COUNT,
            check_bep_frame
        ) >= COUNT,
    );
}

#[test]
fn fuzz_xmlrpc() {
    assert!(fuzz("xmlrpc", xmlrpc_bodies(), &gen::XML, COUNT, check_xmlrpc) >= COUNT,);
}

#[test]
fn fuzz_bes_requests() {
    assert!(fuzz("bes", bes_requests(), &gen::PROTOBUF, COUNT, check_bes) >= COUNT,);
}

/// Whole recorded files, mutated, through framing and format detection.
#[test]
fn fuzz_whole_streams() {
    let mut seeds: Vec<Vec<u8>> = BEP_FILES[..3]
        .iter()
        .flat_map(|f| [read(&format!("{f}.json")), read(&format!("{f}.bin"))])
        .collect();
    seeds.push(read("bitbake/nothing-provides.eventlog"));
    seeds.push(read("bitbake/failure.eventlog"));
    assert!(fuzz("stream", seeds, &gen::BYTES, 300, check_whole_stream) >= 300,);
}

/// The check of each decoder's saved inputs (`tests/fixtures/fuzz/<decoder>/`).
const SAVED: &[(&str, Check)] = &[
    ("pickle", check_pickle),
    ("eventlog", check_eventlog_line),
    ("bep-json", check_bep_json),
    ("bep-binary", check_bep_frame),
    ("xmlrpc", check_xmlrpc),
    ("bes", check_bes),
    ("stream", check_whole_stream),
];

/// Every input that once found a bug passes its decoder's check now.
#[test]
fn saved_inputs_still_pass() {
    let root = fixture("fuzz");
    let mut replayed = 0;
    for entry in std::fs::read_dir(&root).into_iter().flatten() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let Some((_, check)) = SAVED.iter().find(|(n, _)| *n == name) else {
            panic!("{}: no decoder of that name", dir.display());
        };
        for f in std::fs::read_dir(&dir).unwrap() {
            let path = f.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| check(&input)));
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(why)) => panic!("{}: {why}", path.display()),
                Err(_) => panic!("{}: panicked", path.display()),
            }
            assert!(
                started.elapsed() < BOUND,
                "{}: over {BOUND:?}",
                path.display()
            );
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} saved inputs");
}
