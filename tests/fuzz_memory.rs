//! Memory under fuzzing: no input makes a decoder allocate far beyond its size.
//!
//! A binary of its own, because it counts every allocation of the process (a counting
//! `#[global_allocator]`) and so must run one check at a time, with nothing else
//! allocating beside it: it has a single test. The inputs and the checks are the fuzz
//! tests' own (`tests/integration/fuzz/`), the same seed rules apply
//! (`BUILDBUS_FUZZ_SEED`), and each decoder gets [`COUNT`] inputs.

#[path = "integration/fuzz/corpus.rs"]
mod corpus;
#[path = "integration/fuzz/gen.rs"]
mod gen;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use corpus::Check;

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Inputs per decoder.
const COUNT: usize = 10_000;

/// The most one input may make its decoder hold at once: a fixed allowance (a
/// translator, a 64 KiB read buffer, the configuration's compiled patterns) plus a
/// multiple of the input's size. A decoder that believes a length field instead of the
/// bytes it has would ask for gigabytes.
fn limit(len: usize) -> usize {
    (4 << 20) + 64 * len
}

/// Peak bytes allocated while `check` ran on `input`, above what was live before.
fn peak_of(check: Check, input: &[u8]) -> usize {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let _ = check(input);
    PEAK.load(Ordering::Relaxed).saturating_sub(base)
}

#[test]
fn no_input_makes_a_decoder_allocate_far_beyond_its_size() {
    let seed = gen::seed();
    let decoders: [(&str, Vec<Vec<u8>>, &gen::Dialect, Check); 6] = [
        (
            "pickle",
            corpus::pickles(),
            &gen::PICKLE,
            corpus::check_pickle,
        ),
        (
            "eventlog",
            corpus::eventlog_lines(),
            &gen::JSON,
            corpus::check_eventlog_line,
        ),
        (
            "bep-json",
            corpus::bep_json_lines(),
            &gen::JSON,
            corpus::check_bep_json,
        ),
        (
            "bep-binary",
            corpus::bep_frames(),
            &gen::PROTOBUF,
            corpus::check_bep_frame,
        ),
        (
            "xmlrpc",
            corpus::xmlrpc_bodies(),
            &gen::XML,
            corpus::check_xmlrpc,
        ),
        (
            "bes",
            corpus::bes_requests(),
            &gen::PROTOBUF,
            corpus::check_bes,
        ),
    ];
    // The shared context is built once, outside any measurement.
    let _ = corpus::check_eventlog_line(b"{}");
    let checks: Vec<(&str, Check)> = decoders.iter().map(|d| (d.0, d.3)).collect();
    saved_inputs(&checks);
    for (name, seeds, dialect, check) in decoders {
        let mut worst = (0usize, 0usize, 0usize);
        for (i, input) in gen::inputs(seed, &seeds, dialect, gen::count(COUNT)) {
            let peak = peak_of(check, &input);
            assert!(
                peak <= limit(input.len()),
                "{name}: input #{i} of seed {seed:#x} ({} bytes) made the decoder hold \
                 {peak} bytes at once, over {}\nreproduce with BUILDBUS_FUZZ_SEED={seed:#x}",
                input.len(),
                limit(input.len())
            );
            if peak > worst.0 {
                worst = (peak, input.len(), i);
            }
        }
        eprintln!(
            "{name}: peak {} bytes (input #{}, {} bytes)",
            worst.0, worst.2, worst.1
        );
    }
}

/// Every input that once found a bug (`tests/fixtures/fuzz/<decoder>/`) stays within
/// the limit too (some of them found a blow-up that only memory shows).
fn saved_inputs(checks: &[(&str, Check)]) {
    for entry in std::fs::read_dir(corpus::fixture("fuzz"))
        .into_iter()
        .flatten()
    {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let check = checks
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
            .or_else(|| (name == "stream").then_some(corpus::check_whole_stream as Check))
            .unwrap_or_else(|| panic!("{}: no decoder of that name", dir.display()));
        for f in std::fs::read_dir(&dir).unwrap() {
            let path = f.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            let peak = peak_of(check, &input);
            assert!(
                peak <= limit(input.len()),
                "{}: the decoder held {peak} bytes at once, over {}",
                path.display(),
                limit(input.len())
            );
        }
    }
}
