//! The AAM on generated trees: a Yocto-like build directory and a Bazel-like workspace
//! (images, packages, logs, symbolic links including a loop and one out of the tree, a
//! FIFO, a socket, an unreadable file), with exact expected classifications, captured
//! fields and hashes (computed here, from the bytes written); files that change between
//! the walk and the hashing; rules files; the CLI; and the EVT path end to end on the
//! real broker: a finished build's artifacts stored by the DSI under that build.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use buildbus::aam::{self, Artifact, Rules, Scan, ScanOptions};
use buildbus::bus::topology::DSI_QUEUE;
use buildbus::model::{Envelope, Payload};
use buildbus::stores::ArtifactRow;
use sha2::{Digest, Sha256};

use crate::harness::*;

// ---------------------------------------------------------------------------------------
// Generated trees

/// Deterministic bytes (a small xorshift stream), so each file has its own content.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn write(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

fn link(path: &Path, target: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, path).unwrap();
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(st.success());
}

/// What one artifact must be: (kind, fields, size and sha256 of its content, link target).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Want {
    kind: String,
    fields: BTreeMap<String, String>,
    target: Option<String>,
    size: Option<u64>,
    sha256: Option<String>,
    symlink_target: Option<String>,
}

fn spec(kind: &str, fields: &[(&str, &str)], data: Option<&[u8]>) -> Want {
    Want {
        kind: kind.into(),
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        target: None,
        size: data.map(|d| d.len() as u64),
        sha256: data.map(sha),
        symlink_target: None,
    }
}

fn got(a: &Artifact) -> Want {
    Want {
        kind: a.kind.clone(),
        fields: a.fields.clone(),
        target: a.target.clone(),
        size: a.size,
        sha256: a.sha256.clone(),
        symlink_target: a.symlink_target.clone(),
    }
}

/// Whether this process can read a file whose mode is 000 (root can).
fn reads_mode_000(dir: &Path) -> bool {
    let p = dir.join("probe-000");
    fs::write(&p, b"x").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o000)).unwrap();
    let ok = fs::File::open(&p).is_ok();
    fs::remove_file(&p).unwrap();
    ok
}

const MACHINE: &str = "demo-qemux86-64";

struct YoctoTree {
    /// The build directory (TOPDIR).
    build: PathBuf,
    /// Logical path → what it must be.
    want: BTreeMap<String, Want>,
    /// Absolute paths that must be skipped, with a word their reason must contain.
    skipped: BTreeMap<PathBuf, &'static str>,
    /// The mtime set on the root file system image.
    image_mtime: SystemTime,
}

impl YoctoTree {
    /// The image's mtime as an artifact message gives it.
    fn image_mtime_rfc3339(&self) -> Option<String> {
        let ms = self
            .image_mtime
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        buildbus::model::time::from_millis(ms)
    }
}

/// A Yocto-like build directory under `top`: `build/conf`, `build/tmp/work` (not an
/// artifact place), `build/tmp/deploy/{images,rpm,ipk,deb,sdk,licenses}`.
fn yocto_tree(top: &Path) -> YoctoTree {
    let build = top.join("build");
    let deploy = build.join("tmp/deploy");
    let img = deploy.join("images").join(MACHINE);
    let mut want = BTreeMap::new();
    let mut skipped = BTreeMap::new();
    let m = ("machine", MACHINE);
    write(
        &build.join("conf/local.conf"),
        b"MACHINE = \"demo-qemux86-64\"\n",
    );
    write(
        &build.join("tmp/work/core2-64-poky-linux/busybox/1.36.1-r0/temp/log.do_compile"),
        b"compiled\n",
    );
    write(&build.join("tmp/deploy/../stamps/x"), b"not deployed\n");

    // An image larger than the hashing buffer (several reads), with a known mtime.
    let rootfs = content(1, 3 * 512 * 1024 + 321);
    let rootfs_name = format!("demo-image-{MACHINE}.rootfs.ext4");
    write(&img.join(&rootfs_name), &rootfs);
    let image_mtime = SystemTime::UNIX_EPOCH + Duration::from_millis(1_763_700_000_123);
    fs::File::options()
        .write(true)
        .open(img.join(&rootfs_name))
        .unwrap()
        .set_modified(image_mtime)
        .unwrap();
    want.insert(
        format!("deploy/images/{MACHINE}/{rootfs_name}"),
        want_f(
            "image",
            &[
                m,
                ("image", &format!("demo-image-{MACHINE}.rootfs")),
                ("format", "ext4"),
            ],
            &rootfs,
        ),
    );
    // The usual unversioned link to it, inside the tree: the image's own content.
    link(
        &img.join(format!("demo-image-{MACHINE}.ext4")),
        &rootfs_name,
    );
    let mut w = want_f(
        "image",
        &[
            m,
            ("image", &format!("demo-image-{MACHINE}")),
            ("format", "ext4"),
        ],
        &rootfs,
    );
    w.symlink_target = Some(rootfs_name.clone());
    want.insert(
        format!("deploy/images/{MACHINE}/demo-image-{MACHINE}.ext4"),
        w,
    );

    let wic = content(2, 4096);
    let wic_name = format!("demo-image-{MACHINE}.rootfs.wic.bz2");
    write(&img.join(&wic_name), &wic);
    want.insert(
        format!("deploy/images/{MACHINE}/{wic_name}"),
        want_f(
            "image",
            &[
                m,
                ("image", &format!("demo-image-{MACHINE}.rootfs")),
                ("format", "wic.bz2"),
            ],
            &wic,
        ),
    );
    let manifest = b"busybox core2_64 1.36.1\nbase-files qemux86_64 3.0.14\n".to_vec();
    let manifest_name = format!("demo-image-{MACHINE}.rootfs.manifest");
    write(&img.join(&manifest_name), &manifest);
    want.insert(
        format!("deploy/images/{MACHINE}/{manifest_name}"),
        want_f(
            "manifest",
            &[
                m,
                ("image", &format!("demo-image-{MACHINE}.rootfs")),
                ("format", "manifest"),
            ],
            &manifest,
        ),
    );
    let kernel = content(3, 70_000);
    let kernel_name = format!("bzImage--6.6.21+git0+abc-r0-{MACHINE}-20261121110932.bin");
    write(&img.join(&kernel_name), &kernel);
    want.insert(
        format!("deploy/images/{MACHINE}/{kernel_name}"),
        want_f("kernel", &[m, ("name", &kernel_name)], &kernel),
    );
    link(&img.join("bzImage"), &kernel_name);
    let mut w = want_f("kernel", &[m, ("name", "bzImage")], &kernel);
    w.symlink_target = Some(kernel_name.clone());
    want.insert(format!("deploy/images/{MACHINE}/bzImage"), w);
    let modules = content(4, 5000);
    let modules_name = format!("modules--6.6.21-r0-{MACHINE}.tgz");
    write(&img.join(&modules_name), &modules);
    want.insert(
        format!("deploy/images/{MACHINE}/{modules_name}"),
        want_f("kernel_modules", &[m, ("name", &modules_name)], &modules),
    );
    let qemuboot = b"[config_bsp]\nqb_mem = -m 256\n".to_vec();
    write(
        &img.join(format!("demo-image-{MACHINE}.qemuboot.conf")),
        &qemuboot,
    );
    want.insert(
        format!("deploy/images/{MACHINE}/demo-image-{MACHINE}.qemuboot.conf"),
        want_f(
            "image_config",
            &[
                m,
                ("image", &format!("demo-image-{MACHINE}")),
                ("format", "qemuboot.conf"),
            ],
            &qemuboot,
        ),
    );
    // A link out of the tree: recorded with its target, never followed (no hash).
    let outside = top.join("outside-secret.bin");
    write(&outside, b"must not be read\n");
    link(&img.join("host-file.bin"), outside.to_str().unwrap());
    let mut w = spec("image_other", &[m, ("name", "host-file.bin")], None);
    w.symlink_target = Some(outside.display().to_string());
    want.insert(format!("deploy/images/{MACHINE}/host-file.bin"), w);
    // A dangling link: recorded as such.
    link(&img.join("old.wic"), "demo-image-gone.wic");
    let mut w = spec("image", &[m, ("image", "old"), ("format", "wic")], None);
    w.symlink_target = Some("demo-image-gone.wic".into());
    want.insert(format!("deploy/images/{MACHINE}/old.wic"), w);
    // A link to a directory of the tree: recorded, not entered twice.
    fs::create_dir_all(deploy.join("sdk")).unwrap();
    link(&img.join("sdk-link"), "../../sdk");
    let mut w = spec("image_other", &[m, ("name", "sdk-link")], None);
    w.symlink_target = Some("../../sdk".into());
    want.insert(format!("deploy/images/{MACHINE}/sdk-link"), w);
    // A loop, a FIFO, a socket: skipped with warnings, the FIFO never opened.
    link(&img.join("loop-a.img"), "loop-b.img");
    link(&img.join("loop-b.img"), "loop-a.img");
    skipped.insert(img.join("loop-a.img"), "loop");
    skipped.insert(img.join("loop-b.img"), "loop");
    mkfifo(&img.join("console.fifo.img"));
    skipped.insert(img.join("console.fifo.img"), "FIFO");
    let sock = img.join("qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(listener);
    skipped.insert(sock, "socket");
    // An unreadable file: skipped, unless we are root (who reads it anyway).
    let secret = content(5, 1000);
    let secret_path = img.join(format!("demo-image-{MACHINE}.rootfs.cpio.gz"));
    write(&secret_path, &secret);
    fs::set_permissions(&secret_path, fs::Permissions::from_mode(0o000)).unwrap();
    if reads_mode_000(top) {
        want.insert(
            format!("deploy/images/{MACHINE}/demo-image-{MACHINE}.rootfs.cpio.gz"),
            want_f(
                "image",
                &[
                    m,
                    ("image", &format!("demo-image-{MACHINE}.rootfs")),
                    ("format", "cpio.gz"),
                ],
                &secret,
            ),
        );
    } else {
        skipped.insert(secret_path, "Permission denied");
    }

    // Packages.
    for (dir, name, kind, fields) in [
        (
            "rpm/core2_64",
            "busybox-1.36.1-r0.core2_64.rpm",
            "package_rpm",
            vec![
                ("arch", "core2_64"),
                ("package", "busybox"),
                ("version", "1.36.1"),
                ("release", "r0"),
                ("pkgarch", "core2_64"),
            ],
        ),
        (
            "rpm/noarch",
            "packagegroup-core-boot-1.0-r17.noarch.rpm",
            "package_rpm",
            vec![
                ("arch", "noarch"),
                ("package", "packagegroup-core-boot"),
                ("version", "1.0"),
                ("release", "r17"),
                ("pkgarch", "noarch"),
            ],
        ),
        (
            "ipk/core2-64",
            "busybox_1.36.1-r0_core2-64.ipk",
            "package_ipk",
            vec![
                ("arch", "core2-64"),
                ("package", "busybox"),
                ("version", "1.36.1-r0"),
                ("pkgarch", "core2-64"),
            ],
        ),
        (
            "deb/core2-64",
            "libc6-dev_2.38+git0-r0_amd64.deb",
            "package_deb",
            vec![
                ("arch", "core2-64"),
                ("package", "libc6-dev"),
                ("version", "2.38+git0-r0"),
                ("pkgarch", "amd64"),
            ],
        ),
        (
            "ipk/core2-64",
            "Packages.gz",
            "package_index",
            vec![
                ("format", "ipk"),
                ("arch", "core2-64"),
                ("name", "Packages.gz"),
            ],
        ),
        (
            "sdk",
            "demodistro-glibc-x86_64-demo-image-core2-64-toolchain-1.0.sh",
            "sdk_installer",
            vec![(
                "name",
                "demodistro-glibc-x86_64-demo-image-core2-64-toolchain-1.0.sh",
            )],
        ),
        (
            "sdk",
            "demodistro-glibc-x86_64-demo-image-core2-64-toolchain-1.0.host.manifest",
            "sdk",
            vec![(
                "name",
                "demodistro-glibc-x86_64-demo-image-core2-64-toolchain-1.0.host.manifest",
            )],
        ),
        (
            "licenses/busybox",
            "generic_GPL-2.0-only",
            "license",
            vec![("recipe", "busybox"), ("name", "generic_GPL-2.0-only")],
        ),
        (
            "licenses/demo-image-demo-qemux86-64-20261121110932",
            "license.manifest",
            "license_manifest",
            vec![
                ("image", "demo-image-demo-qemux86-64-20261121110932"),
                ("name", "license.manifest"),
            ],
        ),
    ] {
        let data = content(name.bytes().map(u64::from).sum(), 777);
        write(&deploy.join(dir).join(name), &data);
        want.insert(format!("deploy/{dir}/{name}"), want_f(kind, &fields, &data));
    }
    YoctoTree {
        build,
        want,
        skipped,
        image_mtime,
    }
}

fn want_f(kind: &str, fields: &[(&str, &str)], data: &[u8]) -> Want {
    spec(kind, fields, Some(data))
}

/// Runs `f` on another thread; fails the test if it takes over a minute (a FIFO opened
/// for reading would block forever).
fn no_hang<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the scan finished (a FIFO opened for reading would hang it)")
}

fn scan_dir(dir: &Path, system: &str) -> Scan {
    let dir = dir.to_path_buf();
    let system = system.to_string();
    no_hang(move || {
        let rules = Rules::builtin();
        let located = aam::locate(&dir, &system, None, &rules).expect("locate");
        aam::scan(&located.roots, &rules, &ScanOptions::default()).expect("scan")
    })
}

fn check_exact(scan: &Scan, want: &BTreeMap<String, Want>, skipped: &BTreeMap<PathBuf, &str>) {
    let got: BTreeMap<String, Want> = scan
        .artifacts
        .iter()
        .map(|a| (a.path.clone(), got(a)))
        .collect();
    for (p, w) in want {
        assert_eq!(got.get(p), Some(w), "{p}");
    }
    let extra: Vec<&String> = got.keys().filter(|p| !want.contains_key(*p)).collect();
    assert!(extra.is_empty(), "unexpected artifacts {extra:?}");
    let skipped_got: BTreeMap<PathBuf, String> = scan
        .report
        .skipped
        .iter()
        .map(|s| (s.path.clone(), s.reason.clone()))
        .collect();
    assert_eq!(
        skipped_got.keys().collect::<Vec<_>>(),
        skipped.keys().collect::<Vec<_>>(),
        "{skipped_got:#?}"
    );
    for (p, word) in skipped {
        assert!(
            skipped_got[p].contains(word),
            "{}: {}",
            p.display(),
            skipped_got[p]
        );
    }
    assert_eq!(scan.report.artifacts, want.len() as u64);
}

// ---------------------------------------------------------------------------------------
// Scans

#[test]
fn a_yocto_build_dir_is_classified_and_hashed_exactly() {
    let d = tempdir();
    let t = yocto_tree(d.path());
    let scan = scan_dir(&t.build, "bitbake");
    check_exact(&scan, &t.want, &t.skipped);
    // Only the deploy directory was scanned (tmp/work, tmp/stamps, conf are not artifacts).
    assert_eq!(
        scan.report.roots[0].dir,
        fs::canonicalize(t.build.join("tmp/deploy")).unwrap()
    );
    assert!(scan.artifacts.iter().all(|a| a.path.starts_with("deploy/")));
    let rootfs = scan
        .artifacts
        .iter()
        .find(|a| a.path.ends_with(".rootfs.ext4"))
        .unwrap();
    assert_eq!(rootfs.mtime, t.image_mtime_rfc3339(), "mtime of the image");
    assert_eq!(
        rootfs.uri,
        format!(
            "file://{}",
            fs::canonicalize(t.build.join("tmp/deploy/images"))
                .unwrap()
                .join(MACHINE)
                .join(format!("demo-image-{MACHINE}.rootfs.ext4"))
                .display()
        )
    );
    // Each file hashed once, however many links lead to it.
    let distinct: u64 = scan
        .artifacts
        .iter()
        .filter(|a| a.symlink_target.is_none())
        .filter_map(|a| a.size)
        .sum();
    assert_eq!(scan.report.bytes_hashed, distinct);
    // Scanning TMPDIR or the deploy directory itself gives the same artifacts.
    for given in [t.build.join("tmp"), t.build.join("tmp/deploy")] {
        let again = scan_dir(&given, "bitbake");
        assert_eq!(again.artifacts, scan.artifacts, "{}", given.display());
    }
}

#[test]
fn a_bazel_workspace_follows_its_convenience_links_and_nothing_else() {
    let d = tempdir();
    let ws = d.path().join("ws");
    // The output base lies outside the workspace, as Bazel's does.
    let out = d.path().join("cache/execroot/_main/bazel-out/k8-fastbuild");
    write(&ws.join("WORKSPACE"), b"");
    write(&ws.join("app/BUILD"), b"sh_binary(name = \"hello\")\n");
    write(&ws.join("app/hello.sh"), b"echo hello\n");
    link(&ws.join("bazel-bin"), out.join("bin").to_str().unwrap());
    link(
        &ws.join("bazel-testlogs"),
        out.join("testlogs").to_str().unwrap(),
    );
    link(
        &ws.join("bazel-out"),
        out.parent().unwrap().to_str().unwrap(),
    );
    let mut want = BTreeMap::new();
    let hello = content(10, 20_000);
    write(&out.join("bin/app/hello"), &hello);
    want.insert(
        "bazel-bin/app/hello".to_string(),
        want_f(
            "bazel_output",
            &[("package", "app"), ("name", "hello")],
            &hello,
        ),
    );
    let lib = content(11, 900);
    write(&out.join("bin/lib/libgreet.a"), &lib);
    want.insert(
        "bazel-bin/lib/libgreet.a".to_string(),
        want_f(
            "bazel_output",
            &[("package", "lib"), ("name", "libgreet.a")],
            &lib,
        ),
    );
    // Excluded: runfiles trees, compiler intermediates, params files.
    link(
        &out.join("bin/app/hello.runfiles/_main/app/hello"),
        "../../../hello",
    );
    write(&out.join("bin/app/hello.runfiles_manifest"), b"x\n");
    write(&out.join("bin/lib/_objs/greet/greet.o"), b"obj");
    write(&out.join("bin/lib/libgreet.a-2.params"), b"-o\n");
    // A link of the output tree to the source tree: outside the tree, not followed.
    let src = ws.join("app/hello.sh");
    link(&out.join("bin/app/hello.sh"), src.to_str().unwrap());
    let mut w = spec(
        "bazel_output",
        &[("package", "app"), ("name", "hello.sh")],
        None,
    );
    w.symlink_target = Some(src.display().to_string());
    want.insert("bazel-bin/app/hello.sh".to_string(), w);
    // Test logs: a plain test, a sharded one, attempts, undeclared outputs.
    let tl = out.join("testlogs");
    let mut test_file = |rel: &str, kind: &str, fields: &[(&str, &str)], target: &str| {
        let data = content(rel.len() as u64 * 7 + 3, 300 + rel.len());
        write(&tl.join(rel), &data);
        let mut w = want_f(kind, fields, &data);
        w.target = Some(target.to_string());
        want.insert(format!("bazel-testlogs/{rel}"), w);
    };
    let pkg = ("package", "tests");
    test_file(
        "tests/pass_test/test.xml",
        "test_xml",
        &[pkg, ("test", "pass_test")],
        "//tests:pass_test",
    );
    test_file(
        "tests/pass_test/test.log",
        "test_log",
        &[pkg, ("test", "pass_test")],
        "//tests:pass_test",
    );
    test_file(
        "tests/sharded_test/shard_2_of_2/test.xml",
        "test_xml",
        &[
            pkg,
            ("test", "sharded_test"),
            ("shard", "2"),
            ("shards", "2"),
        ],
        "//tests:sharded_test",
    );
    test_file(
        "tests/flaky_test/test_attempts/attempt_1.log",
        "test_attempt",
        &[
            pkg,
            ("test", "flaky_test"),
            ("name", "attempt_1.log"),
            ("attempt", "1"),
        ],
        "//tests:flaky_test",
    );
    test_file(
        "tests/flaky_test/test.outputs/outputs.zip",
        "test_output",
        &[pkg, ("test", "flaky_test"), ("name", "outputs.zip")],
        "//tests:flaky_test",
    );
    test_file(
        "top_test/test.xml",
        "test_xml",
        &[("test", "top_test")],
        "//:top_test",
    );
    write(&tl.join("tests/pass_test/test.cache_status"), b"\x01");
    // bazel-out is not a root link: what only it reaches is not scanned.
    write(
        &out.parent().unwrap().join("volatile-status.txt"),
        b"BUILD_TIMESTAMP 1\n",
    );

    let scan = scan_dir(&ws, "bazel");
    check_exact(&scan, &want, &BTreeMap::new());
    assert_eq!(scan.report.roots.len(), 3, "{:?}", scan.report.roots);
    assert!(scan.report.excluded >= 4, "{:?}", scan.report);
    assert!(scan.report.unclassified >= 3, "WORKSPACE and the sources");
    assert_eq!(
        aam::locate::detect_system(&ws, &Rules::builtin()),
        Some("bazel")
    );
}

#[test]
fn files_that_change_after_the_walk_are_skipped_never_read() {
    let d = tempdir();
    let root = d.path().join("deploy/images/m");
    let names = ["a.ext4", "b.ext4", "c.ext4", "d.ext4", "e.ext4"];
    for (i, n) in names.iter().enumerate() {
        write(&root.join(n), &content(i as u64 + 20, 1000 + i));
    }
    let rules = Rules::builtin();
    let located = aam::locate(&d.path().join("deploy"), "bitbake", None, &rules).unwrap();
    let walked = aam::walk(&located.roots, &rules, None).unwrap();
    assert_eq!(walked.found.len(), 5);
    // Between the walk and the hashing: one vanishes, one becomes a FIFO, one a
    // directory, one a link to another file (all of which fail for root too), one is
    // rewritten in place (still the same file: hashed with its new content).
    fs::remove_file(root.join("a.ext4")).unwrap();
    fs::remove_file(root.join("b.ext4")).unwrap();
    mkfifo(&root.join("b.ext4"));
    fs::remove_file(root.join("c.ext4")).unwrap();
    fs::create_dir(root.join("c.ext4")).unwrap();
    fs::remove_file(root.join("d.ext4")).unwrap();
    link(&root.join("d.ext4"), "e.ext4");
    let rewritten = content(99, 4321);
    fs::write(root.join("e.ext4"), &rewritten).unwrap();
    let scan = no_hang(move || aam::scan::finish(walked, &ScanOptions::default()));
    let reasons: BTreeMap<String, String> = scan
        .report
        .skipped
        .iter()
        .map(|s| {
            (
                s.path.file_name().unwrap().to_string_lossy().into_owned(),
                s.reason.clone(),
            )
        })
        .collect();
    assert!(reasons["a.ext4"].contains("vanished"), "{reasons:?}");
    assert!(reasons["b.ext4"].contains("a FIFO"), "{reasons:?}");
    assert!(reasons["c.ext4"].contains("a directory"), "{reasons:?}");
    assert!(reasons["d.ext4"].contains("a symbolic link"), "{reasons:?}");
    assert_eq!(reasons.len(), 4);
    assert_eq!(scan.artifacts.len(), 1);
    assert_eq!(scan.artifacts[0].path, "deploy/images/m/e.ext4");
    assert_eq!(
        scan.artifacts[0].sha256.as_deref(),
        Some(sha(&rewritten).as_str())
    );
    assert_eq!(scan.artifacts[0].size, Some(rewritten.len() as u64));
}

#[test]
fn a_rules_file_replaces_the_builtin_rules_and_bad_ones_are_named() {
    let d = tempdir();
    let t = yocto_tree(d.path());
    let rules = d.path().join("rules.toml");
    fs::write(
        &rules,
        "exclude = ['\\.manifest$']\n\
         [[rule]]\nkind = \"rootfs\"\npattern = '^deploy/images/(?P<m>[^/]+)/[^/]*\\.rootfs\\.(?P<fmt>ext4|wic\\.bz2)$'\n\
         [[rule]]\nkind = \"pkg\"\npattern = '^deploy/(?:rpm|ipk|deb)/'\n",
    )
    .unwrap();
    let o = buildbus(&[
        "aam",
        "--json",
        "--rules",
        rules.to_str().unwrap(),
        "--build-id",
        "b-1",
        "--tree",
        "poky",
        t.build.to_str().unwrap(),
    ]);
    // Skipped files (loop, FIFO, socket) make the exit status 1, with everything else printed.
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines = stdout_lines(&o);
    let kinds: BTreeMap<String, String> = lines
        .iter()
        .map(|l| {
            (
                l["payload"]["path"].as_str().unwrap().to_string(),
                l["payload"]["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeMap<String, String> = t
        .want
        .keys()
        .filter_map(|p| {
            let k = if p.starts_with("deploy/images/")
                && (p.ends_with(".rootfs.ext4") || p.ends_with(".rootfs.wic.bz2"))
            {
                "rootfs"
            } else if ["deploy/rpm/", "deploy/ipk/", "deploy/deb/"]
                .iter()
                .any(|d| p.starts_with(d))
            {
                "pkg"
            } else {
                return None;
            };
            Some((p.clone(), k.to_string()))
        })
        .collect();
    assert_eq!(kinds, want);
    for l in &lines {
        assert_eq!(l["payload"]["build_id"], "b-1");
        assert_eq!(l["payload"]["tree"], "poky");
        assert_eq!(l["payload"]["system"], "bitbake");
        assert_eq!(l["_meta"]["source"]["format"], "aam");
    }
    let rootfs = lines
        .iter()
        .find(|l| l["payload"]["kind"] == "rootfs" && l["payload"]["fields"]["fmt"] == "ext4")
        .unwrap();
    assert_eq!(rootfs["payload"]["fields"]["m"], MACHINE);
    // Bad rules: exit 2, the file, the line, the reason.
    fs::write(&rules, "[[rule]]\nkind = \"x\"\npattern = '(unclosed'\n").unwrap();
    let o = buildbus(&[
        "aam",
        "--rules",
        rules.to_str().unwrap(),
        t.build.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rules.toml") && err.contains("rule 1 (kind \"x\")"),
        "{err}"
    );
    fs::write(&rules, "[[rule]]\nkind = \"x\"\npatern = 'y'\n").unwrap();
    let o = buildbus(&[
        "aam",
        "--rules",
        rules.to_str().unwrap(),
        t.build.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 3") && err.contains("patern"), "{err}");
    // A directory that is neither: a clear error.
    let plain = d.path().join("plain");
    fs::create_dir(&plain).unwrap();
    let o = buildbus(&["aam", plain.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--system"));
}

#[test]
fn the_cli_prints_a_table_and_valid_messages_with_stable_ids() {
    let d = tempdir();
    let t = yocto_tree(d.path());
    let dir = t.build.to_str().unwrap();
    let o = buildbus(&["aam", dir]);
    assert_eq!(o.status.code(), Some(1));
    let table = String::from_utf8_lossy(&o.stdout);
    assert_eq!(table.lines().count(), 1 + t.want.len(), "{table}");
    let rpm_sha = &t.want["deploy/rpm/core2_64/busybox-1.36.1-r0.core2_64.rpm"]
        .sha256
        .clone()
        .unwrap();
    assert!(
        table.lines().any(|l| l.starts_with("package_rpm")
            && l.contains(&rpm_sha[..16])
            && l.contains("package=busybox")),
        "{table}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{} artifacts", t.want.len())),
        "{err}"
    );
    // JSON: every message valid, ids the same on a second scan.
    let validators = buildbus::consumers::dsi::validate::Validators::new().unwrap();
    let ids = |o: &std::process::Output| -> BTreeSet<String> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| {
                let env = validators.check(l.as_bytes()).expect("valid message");
                env.meta.message_id
            })
            .collect()
    };
    let a = ids(&buildbus(&["aam", "--json", "--build-id", "b1", dir]));
    let b = ids(&buildbus(&[
        "aam",
        "--json",
        "--build-id",
        "b1",
        "--threads",
        "1",
        dir,
    ]));
    let c = ids(&buildbus(&["aam", "--json", "--build-id", "b2", dir]));
    assert_eq!(a.len(), t.want.len());
    assert_eq!(a, b);
    assert!(a.is_disjoint(&c), "another build, other ids");
    let h = buildbus(&["aam", "--help"]);
    assert!(String::from_utf8_lossy(&h.stdout).contains("Examples:"));
}

// ---------------------------------------------------------------------------------------
// Through the EVT, the bus and the DSI

/// Runs an in-process DSI pool on `store` until it holds `want` messages; nothing may
/// be dead-lettered.
fn store_all(url: &str, store: &str, want: u64) {
    let stats = crate::pipeline::run_dsi_until(url, store, 1, want);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
}

fn stored_artifacts(store: &str, build_id: &str) -> Vec<ArtifactRow> {
    let (s, b) = (store.to_string(), build_id.to_string());
    std::thread::spawn(move || {
        buildbus::stores::open(&s)
            .unwrap()
            .query_build(&b)
            .unwrap()
            .expect("the build is stored")
            .artifacts
    })
    .join()
    .unwrap()
}

fn publish(url: &str, build_dir: &Path, file: &Path) -> String {
    let o = buildbus(&[
        "publish",
        "--no-checkpoint",
        "--url",
        url,
        "--build-dir",
        build_dir.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

fn finished_env(msgs: &[Envelope]) -> &Envelope {
    msgs.iter()
        .find(|m| matches!(&m.payload, Payload::Build(b) if b.result.is_some()))
        .expect("a finished build")
}

#[test]
fn a_finished_bitbake_builds_artifacts_are_stored_under_that_build() {
    let d = tempdir();
    let t = yocto_tree(d.path());
    let log = fixture("bitbake/success.eventlog");
    let msgs = clean("bitbake/success.eventlog");
    let fin = finished_env(&msgs);
    let build_id = fin.payload.common().build_id.clone();
    // The recorded variables name /tmp/bbproj/build; the build directory given is
    // elsewhere: the deploy directory is found by re-basing them (TOPDIR, TMPDIR or
    // the deploy directory itself may be given).
    let Payload::Build(b) = &fin.payload else {
        unreachable!()
    };
    assert_eq!(
        b.metadata.get("DEPLOY_DIR_IMAGE").map(String::as_str),
        Some("/tmp/bbproj/build/tmp/deploy/images/demo-qemux86-64")
    );
    let rules = Rules::builtin();
    let mut ids: Option<BTreeSet<String>> = None;
    for given in [
        t.build.clone(),
        t.build.join("tmp"),
        t.build.join("tmp/deploy"),
    ] {
        let a = aam::artifacts_for_build(&given, &rules, fin, &ScanOptions::default()).unwrap();
        assert_eq!(a.envelopes.len(), t.want.len(), "{}", a.located);
        assert!(a.located.contains("DEPLOY_DIR"), "{}", a.located);
        let these: BTreeSet<String> = a
            .envelopes
            .iter()
            .map(|e| e.meta.message_id.clone())
            .collect();
        if let Some(ids) = &ids {
            assert_eq!(&these, ids, "{}", given.display());
        }
        ids = Some(these);
        for e in &a.envelopes {
            let c = e.payload.common();
            assert_eq!(c.build_id, build_id);
            assert_eq!(c.platform.as_deref(), Some(MACHINE));
            assert_eq!(c.product, fin.payload.common().product);
            assert_eq!(c.timestamp.as_deref(), b.finished_at.as_deref());
        }
    }
    assert!(aam::artifacts_for_build(&t.build, &rules, &msgs[0], &ScanOptions::default()).is_err());

    let (url, _) = vhost("aam-bitbake");
    let want_messages = msgs.len() as u64 + t.want.len() as u64;
    let err = publish(&url, &t.build, &log);
    assert!(
        err.contains(&format!("{want_messages} messages published")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "1 finished builds scanned, {} artifacts",
            t.want.len()
        )),
        "{err}"
    );
    // Published twice (at-least-once): stored once.
    publish(&url, &t.build, &log);
    let stores = store_urls("aam_bitbake", d.path());
    for (i, store) in stores.iter().enumerate() {
        if i > 0 {
            publish(&url, &t.build, &log);
        }
        store_all(&url, store, want_messages);
        let counts = store_counts(store);
        assert_eq!(counts.messages, want_messages, "{store}");
        assert_eq!(counts.artifacts, t.want.len() as u64, "{store}");
        let rows = stored_artifacts(store, &build_id);
        let got: BTreeMap<String, Want> = rows
            .iter()
            .map(|r| {
                (
                    r.path.clone(),
                    Want {
                        kind: r.kind.clone(),
                        fields: r.fields.clone(),
                        target: r.target.clone(),
                        size: r.size.map(|s| s as u64),
                        sha256: r.sha256.clone(),
                        symlink_target: r.symlink_target.clone(),
                    },
                )
            })
            .collect();
        assert_eq!(got, t.want, "{store}");
        let rootfs = rows
            .iter()
            .find(|r| r.path.ends_with(".rootfs.ext4"))
            .unwrap();
        assert_eq!(rootfs.mtime, t.image_mtime_rfc3339(), "{store}");
        assert!(rows.iter().all(|r| *r.build_id == *build_id));
    }
}

#[test]
fn a_finished_bazel_builds_named_outputs_and_scanned_files_are_stored() {
    let d = tempdir();
    let ws = d.path().join("ws");
    let out = d.path().join("cache/bazel-out/k8-fastbuild");
    write(&ws.join("WORKSPACE"), b"");
    link(&ws.join("bazel-bin"), out.join("bin").to_str().unwrap());
    link(
        &ws.join("bazel-testlogs"),
        out.join("testlogs").to_str().unwrap(),
    );
    let bin = content(40, 5000);
    let xml = b"<testsuites><testsuite name=\"pass_test\"/></testsuites>\n".to_vec();
    write(&out.join("bin/tests/pass_test"), &bin);
    write(&out.join("testlogs/tests/pass_test/test.xml"), &xml);
    let bep = fixture("bazel/test_mixed.json");
    let msgs = clean("bazel/test_mixed.json");
    let build_id = msgs[0].payload.common().build_id.clone();
    let named: BTreeSet<String> = msgs
        .iter()
        .filter(|m| matches!(&m.payload, Payload::Artifact(_)))
        .map(|m| m.meta.entity_id.clone())
        .collect();
    assert!(named.len() > 10, "the BEP names outputs and test logs");
    let (url, _) = vhost("aam-bazel");
    publish(&url, &ws, &bep);
    let want = msgs.len() as u64 + 2;
    let store = format!("sqlite:{}", d.path().join("bazel.db").display());
    store_all(&url, &store, want);
    let rows = stored_artifacts(&store, &build_id);
    assert_eq!(rows.len(), named.len() + 2);
    // The outputs Bazel named, even without a scan: URI and path from the BEP.
    let stored: BTreeSet<String> = rows.iter().map(|r| r.entity_id.clone()).collect();
    assert!(named.is_subset(&stored));
    assert!(rows.iter().any(|r| r.kind == "output"
        && r.path == "bazel-out/k8-fastbuild/bin/tests/pass_test"
        && r.uri.as_deref().is_some_and(|u| u.starts_with("file:///"))));
    // And the scanned files, hashed.
    let scanned: BTreeMap<&str, &ArtifactRow> = rows
        .iter()
        .filter(|r| r.mtime.is_some())
        .map(|r| (r.path.as_str(), r))
        .collect();
    assert_eq!(scanned.len(), 2);
    let b = scanned["bazel-bin/tests/pass_test"];
    assert_eq!(b.kind, "bazel_output");
    assert_eq!(b.sha256.as_deref(), Some(sha(&bin).as_str()));
    let x = scanned["bazel-testlogs/tests/pass_test/test.xml"];
    assert_eq!(x.kind, "test_xml");
    assert_eq!(x.target.as_deref(), Some("//tests:pass_test"));
    assert_eq!(x.sha256.as_deref(), Some(sha(&xml).as_str()));
    assert_eq!(x.size, Some(xml.len() as i64));
}

#[test]
fn bitbake_live_publishes_the_artifacts_of_the_build_it_watched() {
    use crate::bitbake_replay::{ReplayData, ReplayOptions, ReplayServer};
    let d = tempdir();
    let t = yocto_tree(d.path());
    let rt = rt();
    let data = Arc::new(ReplayData::load_dir(&fixture("bitbake")).expect("recording"));
    let server = rt
        .block_on(ReplayServer::start(data, ReplayOptions::default()))
        .expect("replay server");
    let addr = server.addr().to_string();
    let o = buildbus(&[
        "bitbake-live",
        "--server",
        &addr,
        "--target",
        "demo-image",
        "--print",
        "--build-dir",
        t.build.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = stdout_lines(&o);
    let log = clean("bitbake/live-xmlrpc.eventlog");
    let build_id = log[0].payload.common().build_id.clone();
    assert_eq!(lines.len(), log.len() + t.want.len());
    // The artifacts come right after the finished build, with its id.
    let fin = lines
        .iter()
        .position(|l| l["_meta"]["kind"] == "build" && l["payload"]["state"] == "finished")
        .unwrap();
    let after: BTreeSet<&str> = lines[fin + 1..]
        .iter()
        .map(|l| {
            assert_eq!(l["_meta"]["kind"], "artifact");
            assert_eq!(l["payload"]["build_id"], &*build_id);
            l["payload"]["path"].as_str().unwrap()
        })
        .collect();
    let want: BTreeSet<&str> = t.want.keys().map(String::as_str).collect();
    assert_eq!(after, want);
    // Published: every one confirmed.
    let (url, _) = vhost("aam-live");
    let server = rt
        .block_on(ReplayServer::start(
            Arc::new(ReplayData::load_dir(&fixture("bitbake")).unwrap()),
            ReplayOptions::default(),
        ))
        .unwrap();
    let addr = server.addr().to_string();
    let o = buildbus(&[
        "bitbake-live",
        "--server",
        &addr,
        "--target",
        "demo-image",
        "--url",
        &url,
        "--build-dir",
        t.build.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = rt.block_on(drain(&url, DSI_QUEUE));
    assert_eq!(got.len(), log.len() + t.want.len());
}
