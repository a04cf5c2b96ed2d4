//! Property tests: arbitrary and mangled bytes never panic, and never lose what came
//! before the damage.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use buildbus::sources::file::{translate_reader, Format};
use buildbus::systems::Context;
use proptest::prelude::*;

use crate::harness::fixture;

fn run(
    bytes: &[u8],
    format: Option<Format>,
    name: &str,
) -> (usize, buildbus::sources::file::StreamReport) {
    let ctx = Arc::new(Context::builtin());
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
