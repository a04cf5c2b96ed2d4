//! Which trees of a build directory hold the build's artifacts.
//!
//! Each build system says where its builds leave artifacts
//! ([`BuildSystem::artifact_trees`](crate::systems::BuildSystem::artifact_trees): BitBake's
//! deploy directory, Bazel's workspace and convenience links); a system that says
//! nothing, or an unknown one, gets the directory itself.

use std::collections::BTreeMap;
use std::path::Path;

use super::scan::Root;
use super::{AamError, Rules};
use crate::systems::{system, SYSTEMS};

/// The trees to scan for a build, and how they were found (for logs and reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub roots: Vec<Root>,
    pub how: String,
}

/// The registered build system whose build directory `dir` looks like.
pub fn detect_system(dir: &Path, rules: &Rules) -> Option<&'static str> {
    SYSTEMS
        .iter()
        .find(|s| s.is_build_dir(dir, rules.root_links()))
        .map(|s| s.name())
}

/// The trees to scan in `dir` for a build of `system`, with the build's metadata
/// (BitBake's variables) when known.
pub fn locate(
    dir: &Path,
    system_name: &str,
    vars: Option<&BTreeMap<String, String>>,
    rules: &Rules,
) -> Result<Located, AamError> {
    let none = BTreeMap::new();
    let found = system(system_name)
        .and_then(|s| s.artifact_trees(dir, vars.unwrap_or(&none), rules.root_links()));
    let Some(found) = found else {
        return Ok(Located {
            roots: vec![Root::new(dir, "")?],
            how: format!("{} (all of it)", dir.display()),
        });
    };
    let mut roots = Vec::new();
    let mut how = found.how;
    for (i, (tree, name)) in found.trees.iter().enumerate() {
        match Root::new(tree, name) {
            Ok(r) if i == 0 => roots.push(r),
            // The first tree is the build's own; the others (links) are extras, said
            // with where they point.
            Ok(r) => {
                how.push_str(&format!(", {name} -> {}", r.dir.display()));
                roots.push(r);
            }
            Err(e) if i == 0 => return Err(e),
            Err(e) => tracing::warn!("aam: {e}: not scanned"),
        }
    }
    Ok(Located { roots, how })
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
