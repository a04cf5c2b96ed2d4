//! Publishing a file source: read (and follow), translate, publish with confirms, and
//! keep the file's checkpoint.
//!
//! The checkpoint is kept per destination: its entry is keyed by the publisher's
//! [`Destination`](crate::bus::Destination) (broker host and port, vhost, exchange
//! prefix), so the same file published to another broker or vhost is sent in full.
//!
//! The reader runs on a blocking thread and hands messages over a bounded channel, so
//! when the publisher's in-flight window is full the reader waits: memory stays bounded
//! however large the file or long the outage. The checkpoint only moves to an offset
//! once every message emitted up to that offset is confirmed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::aam::BuildScanner;
use crate::bus::message::Outgoing;
use crate::bus::publish::Publisher;
use crate::bus::BusError;
use crate::model::Envelope;
use crate::pipeline::{is_finished_build, Output, Pipeline};
use crate::sources::file::checkpoint;
use crate::sources::file::{read_file, Follow, Format, Progress, StreamReport};
use crate::systems::Context;

/// How to publish one file.
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    pub format: Option<Format>,
    pub follow: Option<Follow>,
    /// The checkpoint file (`None`: no checkpoint). Its entry for this file is the one of
    /// the publisher's destination ([`Publisher::destination`]).
    pub checkpoint: Option<PathBuf>,
    /// The artifact scanner of the build directory: when a build's `finished` message
    /// is read, the build's artifacts are published right after it (at the same
    /// checkpoint offset, so a resumed publish neither loses nor repeats them).
    pub artifacts: Option<Arc<BuildScanner>>,
}

/// What publishing one file did.
#[derive(Debug, Clone, Default)]
pub struct FileReport {
    pub stream: StreamReport,
    /// Messages confirmed by the broker.
    pub published: u64,
    /// Messages skipped because the checkpoint says they were confirmed before.
    pub skipped: u64,
    /// The offset the checkpoint ended at.
    pub checkpoint: u64,
}

enum Item {
    Message(Box<Outgoing>),
    /// A build's `finished` message, after its [`Item::Message`]: for the AAM hook.
    Finished(Box<Envelope>),
    Through(u64),
    Done(Box<StreamReport>, u64),
}

/// Publishes `path` through `publisher` (whose tokens are message sequence numbers).
pub async fn publish_file(
    publisher: &mut Publisher<u64>,
    path: &Path,
    ctx: Arc<Context>,
    opts: &FileOptions,
    window: usize,
) -> Result<FileReport, BusError> {
    let dest = publisher.destination();
    let resume = opts
        .checkpoint
        .as_deref()
        .map(|cp| checkpoint::load(cp, &dest, path))
        .unwrap_or(0);
    if resume > 0 {
        tracing::info!("{}: resuming after byte {resume} ({dest})", path.display());
    }
    let (tx, mut rx) = mpsc::channel::<Item>(window.max(16));
    let reader = {
        let path = path.to_path_buf();
        let format = opts.format;
        let follow = opts.follow.clone();
        let scan = opts.artifacts.is_some();
        tokio::task::spawn_blocking(move || {
            let mut skipped = 0;
            let report = read_file(&path, format, &ctx, follow.as_ref(), &mut |p| {
                // The receiver only goes away when publishing failed; stop quietly.
                match p {
                    Progress::Message(_, end) if end <= resume => skipped += 1,
                    Progress::Message(env, _) => {
                        // Serialized here, on the reader's thread.
                        let out = Outgoing::from_envelope(&env);
                        let _ = tx.blocking_send(Item::Message(Box::new(out)));
                        if scan && is_finished_build(&env) {
                            let _ = tx.blocking_send(Item::Finished(Box::new(env)));
                        }
                    }
                    Progress::Through(end) => {
                        let _ = tx.blocking_send(Item::Through(end));
                    }
                }
            });
            let _ = tx.blocking_send(Item::Done(Box::new(report), skipped));
        })
    };

    let mut pipe = Pipeline::new(path.display().to_string(), Output::Broker(publisher))
        .with_artifacts(opts.artifacts.clone());
    let save = |at: u64| {
        if let Some(cp) = opts.checkpoint.as_deref() {
            if let Err(e) = checkpoint::save(cp, &dest, path, at) {
                tracing::warn!("{}: cannot write checkpoint: {e}", cp.display());
            }
        }
    };
    let mut saved_at = Instant::now();
    let (report, skipped) = loop {
        let Some(item) = rx.recv().await else {
            return Err(BusError::Other(format!(
                "{}: the reader stopped",
                path.display()
            )));
        };
        match item {
            Item::Message(out) => pipe.send(*out).await?,
            // A finished build: its artifacts right after it, at its offset.
            Item::Finished(env) => pipe.after(&env).await?,
            Item::Through(offset) => pipe.mark(offset),
            Item::Done(report, skipped) => break (report, skipped),
        }
        if saved_at.elapsed() > Duration::from_millis(500) {
            save(pipe.durable().unwrap_or(0).max(resume));
            saved_at = Instant::now();
        }
    };
    let _ = reader.await;
    pipe.flush().await?;
    let mut at = pipe.durable().unwrap_or(0).max(resume);
    if report.incomplete {
        // Keep the checkpoint where the last complete event was.
        at = at.min(report.end_offset);
    }
    save(at);
    Ok(FileReport {
        published: pipe.emitted(),
        skipped,
        checkpoint: at,
        stream: *report,
    })
}
