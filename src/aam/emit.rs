//! Artifact records → envelopes of a build, and the hook the EVT calls when a build
//! finishes.
//!
//! An artifact message carries the build's `build_id`, system and Pulse fields (copied
//! from the build's `finished` message), the build's finish time as its `timestamp`,
//! and is identified by its logical path within the build (entity parts
//! `["aam", path]`), so scanning the same tree again for the same build gives the same
//! message ids and the DSI stores each artifact once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::locate::locate;
use super::scan::{scan, Artifact, ScanOptions, ScanReport};
use super::{AamError, Rules};
use crate::model::{
    ArtifactPayload, BuildState, Common, Envelope, Payload, SourceMeta, DEFAULT_EXCHANGE_PREFIX,
};

/// The input format scanned artifacts say they come from (`_meta.source.format`).
pub const SOURCE_FORMAT: &str = "aam";

/// The first entity part of a scanned artifact (Bazel's own artifacts use labels).
const ENTITY_TAG: &str = "aam";

/// Envelopes for `artifacts` of the build `common` describes.
pub fn envelopes(
    artifacts: &[Artifact],
    common: &Common,
    source: Arc<SourceMeta>,
    exchange_prefix: &str,
) -> Vec<Envelope> {
    artifacts
        .iter()
        .map(|a| {
            let payload = Payload::Artifact(ArtifactPayload {
                common: common.clone(),
                path: a.path.clone(),
                uri: Some(a.uri.clone()),
                kind: a.kind.clone(),
                size: a.size,
                sha256: a.sha256.clone(),
                target: a.target.clone(),
                fields: a.fields.clone(),
                mtime: a.mtime.clone(),
                symlink_target: a.symlink_target.clone(),
            });
            Envelope::with_shared_source(
                payload,
                &[ENTITY_TAG, &a.path],
                source.clone(),
                exchange_prefix,
            )
        })
        .collect()
}

/// The artifacts of one finished build.
#[derive(Debug, Clone)]
pub struct BuildArtifacts {
    /// One `artifact` envelope per file, sorted by path.
    pub envelopes: Vec<Envelope>,
    /// What the scan saw, left out and skipped.
    pub report: ScanReport,
    /// Which trees were scanned and how they were found.
    pub located: String,
}

/// Scans `dir` for the build whose `finished` message is `finished`, and gives its
/// artifact envelopes.
///
/// - `finished` must be a `build` message in state `finished` (from the Bazel or
///   BitBake translator, or the BES backend); its build id, system, Pulse fields and
///   tags are copied into every artifact, its timestamp is theirs, its exchange prefix
///   theirs.
/// - Where to look: for BitBake, the deploy directory the build's variables name
///   (`metadata.DEPLOY_DIR`, `DEPLOY_DIR_IMAGE`, `TMPDIR`, `TOPDIR`), found in or under
///   `dir`; for Bazel, `dir` is the workspace and its `bazel-bin`/`bazel-testlogs`
///   links are followed as trees of their own (see [`super::locate`](mod@super::locate)).
/// - Files that cannot be read are skipped (in `report.skipped`, and logged); only a
///   missing `dir` or a message that is not a finished build is an error.
///
/// Blocking (walks and hashes on `opts.threads` threads): call it from a plain thread
/// or `spawn_blocking`, not from an async task.
pub fn artifacts_for_build(
    dir: &Path,
    rules: &Rules,
    finished: &Envelope,
    opts: &ScanOptions,
) -> Result<BuildArtifacts, AamError> {
    let not = |reason: &str| AamError::NotAFinishedBuild {
        message_id: finished.meta.message_id.clone(),
        reason: reason.to_string(),
    };
    let Payload::Build(b) = &finished.payload else {
        return Err(not("not a build message"));
    };
    if b.state != BuildState::Finished {
        return Err(not("the build has not finished"));
    }
    let system = &*b.common.system;
    let vars: BTreeMap<String, String> = b
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let located = locate(dir, system, Some(&vars), rules)?;
    tracing::info!("aam: build {}: scanning {}", b.common.build_id, located.how);
    let scanned = scan(&located.roots, rules, opts)?;
    let prefix = finished
        .meta
        .exchange
        .strip_suffix("/build")
        .unwrap_or(DEFAULT_EXCHANGE_PREFIX);
    let source = Arc::new(SourceMeta {
        system: system.to_string(),
        format: SOURCE_FORMAT.into(),
        origin: dir.display().to_string(),
        tool_version: None,
    });
    let mut common = b.common.clone();
    common.timestamp = b.finished_at.as_deref().map(Arc::from).or(common.timestamp);
    Ok(BuildArtifacts {
        envelopes: envelopes(&scanned.artifacts, &common, source, prefix),
        report: scanned.report,
        located: located.how,
    })
}

/// Totals of a [`BuildScanner`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScannerStats {
    /// Finished builds scanned.
    pub builds: u64,
    pub artifacts: u64,
    /// Files skipped with a warning.
    pub skipped: u64,
    /// Builds whose scan failed as a whole (the directory is missing, ...), with why.
    pub errors: Vec<String>,
}

/// The EVT's hook: given every message a translator emits, it scans the build directory
/// when a build's `finished` message goes by and gives that build's artifacts, to be
/// sent right after it.
#[derive(Debug)]
pub struct BuildScanner {
    dir: PathBuf,
    rules: Arc<Rules>,
    opts: ScanOptions,
    stats: Mutex<ScannerStats>,
}

impl BuildScanner {
    pub fn new(dir: &Path, rules: Arc<Rules>, opts: ScanOptions) -> BuildScanner {
        BuildScanner {
            dir: dir.to_path_buf(),
            rules,
            opts,
            stats: Mutex::new(ScannerStats::default()),
        }
    }

    /// The artifacts to send after `env`: none unless it is a finished build. A scan
    /// that fails as a whole is logged and counted, never fatal to the stream.
    pub fn after(&self, env: &Envelope) -> Vec<Envelope> {
        match &env.payload {
            Payload::Build(b) if b.state == BuildState::Finished => {}
            _ => return Vec::new(),
        }
        let r = artifacts_for_build(&self.dir, &self.rules, env, &self.opts);
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.builds += 1;
        match r {
            Ok(a) => {
                stats.artifacts += a.envelopes.len() as u64;
                stats.skipped += a.report.skipped.len() as u64;
                a.envelopes
            }
            Err(e) => {
                tracing::error!("aam: build {}: {e}", env.payload.common().build_id);
                stats.errors.push(e.to_string());
                Vec::new()
            }
        }
    }

    pub fn stats(&self) -> ScannerStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
