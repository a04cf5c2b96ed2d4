//! Where a BitBake build leaves its artifacts: its deploy directory.
//!
//! From the build's own variables when known (`DEPLOY_DIR`, else
//! `DEPLOY_DIR_IMAGE/../..`, else `TMPDIR/deploy`): as recorded if it lies inside the
//! given directory, else re-based onto it (the given directory may be the build's
//! `TOPDIR`, its `TMPDIR` or its deploy directory, possibly moved or mounted elsewhere
//! since). Without variables: `tmp/deploy` or `deploy` under the given directory, or the
//! directory itself if it is named `deploy`. Its files' paths start with `deploy/`,
//! wherever it was found, so a build's artifacts have the same paths (and ids) whichever
//! of these directories was given.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::systems::ArtifactTrees;

/// The deploy directory of a build in `dir`, with the build's variables when known.
pub fn trees(dir: &Path, vars: &BTreeMap<String, String>) -> Option<ArtifactTrees> {
    if let Some((deploy, how)) = deploy_from_vars(dir, vars) {
        return Some(ArtifactTrees {
            trees: vec![(deploy, "deploy".to_string())],
            how,
        });
    }
    let deploy = conventional_deploy(dir)?;
    Some(ArtifactTrees {
        how: format!(
            "{} (the usual place under the build directory)",
            deploy.display()
        ),
        trees: vec![(deploy, "deploy".to_string())],
    })
}

/// Whether `dir` looks like a BitBake build directory.
pub fn is_build_dir(dir: &Path) -> bool {
    let has = |name: &str| dir.join(name).symlink_metadata().is_ok();
    conventional_deploy(dir).is_some() || has("conf/local.conf") || has("conf/bblayers.conf")
}

/// `tmp/deploy`, `deploy`, or `dir` itself when it is named `deploy`.
pub fn conventional_deploy(dir: &Path) -> Option<PathBuf> {
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
