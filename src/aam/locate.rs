//! Which trees of a build directory hold the build's artifacts.
//!
//! - **BitBake**: the deploy directory. From the build's own variables when known
//!   (`DEPLOY_DIR`, else `DEPLOY_DIR_IMAGE/../..`, else `TMPDIR/deploy`): as recorded if
//!   it lies inside the given directory, else re-based onto it (the given directory may
//!   be the build's `TOPDIR`, its `TMPDIR` or its deploy directory, possibly moved or
//!   mounted elsewhere since). Without variables: `tmp/deploy` or `deploy` under the
//!   given directory, or the directory itself if it is named `deploy`. Its files' paths
//!   start with `deploy/`, wherever it was found, so a build's artifacts have the same
//!   paths (and ids) whichever of these directories was given.
//! - **Bazel**: the workspace, plus the targets of its convenience links named in the
//!   rules' `root_links` (`bazel-bin`, `bazel-testlogs`), each as a tree of its own.
//! - Anything else: the directory itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::scan::Root;
use super::{AamError, Rules};

/// The trees to scan for a build, and how they were found (for logs and reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub roots: Vec<Root>,
    pub how: String,
}

/// Whether `dir` looks like a Bazel workspace (`bazel`) or a BitBake build (`bitbake`).
pub fn detect_system(dir: &Path, rules: &Rules) -> Option<&'static str> {
    let has = |name: &str| dir.join(name).symlink_metadata().is_ok();
    if rules.root_links().iter().any(|l| has(l))
        || ["WORKSPACE", "WORKSPACE.bazel", "MODULE.bazel", "bazel-out"]
            .iter()
            .any(|f| has(f))
    {
        return Some("bazel");
    }
    if conventional_deploy(dir).is_some() || has("conf/local.conf") || has("conf/bblayers.conf") {
        return Some("bitbake");
    }
    None
}

/// The trees to scan in `dir` for a build of `system`, with the build's variables
/// (BitBake) when known.
pub fn locate(
    dir: &Path,
    system: &str,
    vars: Option<&BTreeMap<String, String>>,
    rules: &Rules,
) -> Result<Located, AamError> {
    let whole = || -> Result<Located, AamError> {
        Ok(Located {
            roots: vec![Root::new(dir, "")?],
            how: format!("{} (all of it)", dir.display()),
        })
    };
    match system {
        "bitbake" => {
            let from_vars = vars.and_then(|v| deploy_from_vars(dir, v));
            if let Some((deploy, how)) = from_vars {
                return Ok(Located {
                    roots: vec![Root::new(&deploy, "deploy")?],
                    how,
                });
            }
            if let Some(deploy) = conventional_deploy(dir) {
                return Ok(Located {
                    how: format!(
                        "{} (the usual place under the build directory)",
                        deploy.display()
                    ),
                    roots: vec![Root::new(&deploy, "deploy")?],
                });
            }
            whole()
        }
        "bazel" => {
            let mut roots = vec![Root::new(dir, "")?];
            let mut how = vec![format!("{}", dir.display())];
            for link in rules.root_links() {
                let p = dir.join(link);
                if p.symlink_metadata().is_err() {
                    continue;
                }
                match Root::new(&p, link) {
                    Ok(r) => {
                        how.push(format!("{link} -> {}", r.dir.display()));
                        roots.push(r);
                    }
                    Err(e) => tracing::warn!("aam: {e}: not scanned"),
                }
            }
            Ok(Located {
                roots,
                how: how.join(", "),
            })
        }
        _ => whole(),
    }
}

/// `tmp/deploy`, `deploy`, or `dir` itself when it is named `deploy`.
fn conventional_deploy(dir: &Path) -> Option<PathBuf> {
    for rel in ["tmp/deploy", "deploy"] {
        let p = dir.join(rel);
        if p.is_dir() {
            return Some(p);
        }
    }
    (dir.file_name().is_some_and(|n| n == "deploy") && dir.is_dir()).then(|| dir.to_path_buf())
}

/// Whether `dir` holds what a deploy directory holds.
fn looks_like_deploy(dir: &Path) -> bool {
    ["images", "rpm", "ipk", "deb", "sdk", "licenses"]
        .iter()
        .any(|d| dir.join(d).is_dir())
}

/// The deploy directory the variables name, found in (or under) `dir`.
fn deploy_from_vars(dir: &Path, vars: &BTreeMap<String, String>) -> Option<(PathBuf, String)> {
    let var = |k: &str| {
        vars.get(k)
            .map(String::as_str)
            .filter(|v| v.starts_with('/'))
            .map(PathBuf::from)
    };
    let (recorded, from) = if let Some(d) = var("DEPLOY_DIR") {
        (d, "DEPLOY_DIR")
    } else if let Some(d) = var("DEPLOY_DIR_IMAGE").and_then(|p| {
        let images = p.parent()?;
        (images.file_name()? == "images").then(|| images.parent().map(Path::to_path_buf))?
    }) {
        (d, "DEPLOY_DIR_IMAGE")
    } else {
        (var("TMPDIR")?.join("deploy"), "TMPDIR")
    };
    let canon_dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    // As recorded, when the given directory contains it.
    if (recorded.starts_with(dir) || recorded.starts_with(&canon_dir)) && recorded.is_dir() {
        return Some((
            recorded.clone(),
            format!("{} (the build's {from})", recorded.display()),
        ));
    }
    // Re-based: the given directory is the build's TOPDIR, TMPDIR or deploy directory.
    for base in ["TOPDIR", "TMPDIR", "DEPLOY_DIR"] {
        let Some(b) = var(base) else { continue };
        let Ok(rel) = recorded.strip_prefix(&b) else {
            continue;
        };
        let cand = dir.join(rel);
        // The given directory as the deploy directory itself only if it looks like one
        // (a TOPDIR whose deploy directory is missing must not be taken for it).
        if cand.is_dir() && (!rel.as_os_str().is_empty() || looks_like_deploy(&cand)) {
            return Some((
                cand.clone(),
                format!(
                    "{} (the build's {from} {}, with {base} {} at {})",
                    cand.display(),
                    recorded.display(),
                    b.display(),
                    dir.display()
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(top: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("TOPDIR".into(), top.to_string()),
            ("TMPDIR".into(), format!("{top}/tmp")),
            (
                "DEPLOY_DIR_IMAGE".into(),
                format!("{top}/tmp/deploy/images/m1"),
            ),
        ])
    }

    #[test]
    fn the_deploy_dir_follows_the_variables_onto_the_given_dir() {
        let d = tempfile::tempdir().unwrap();
        let build = d.path().join("moved-build");
        std::fs::create_dir_all(build.join("tmp/deploy/images/m1")).unwrap();
        // Also a decoy at the conventional place of another layout.
        std::fs::create_dir_all(build.join("deploy")).unwrap();
        let v = vars("/srv/yocto/build");
        let rules = Rules::builtin();
        let want = std::fs::canonicalize(build.join("tmp/deploy")).unwrap();
        for given in [build.clone(), build.join("tmp"), build.join("tmp/deploy")] {
            let l = locate(&given, "bitbake", Some(&v), &rules).unwrap();
            assert_eq!(l.roots.len(), 1, "{given:?}");
            assert_eq!(l.roots[0].dir, want, "{given:?}: {}", l.how);
            assert_eq!(l.roots[0].prefix, "deploy");
        }
        // Without variables, the usual place.
        let l = locate(&build, "bitbake", None, &rules).unwrap();
        assert_eq!(l.roots[0].dir, want);
        assert_eq!(detect_system(&build, &rules), Some("bitbake"));
    }
}
