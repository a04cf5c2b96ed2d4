//! The pipeline: source → translate → publish.
//!
//! This is the one place where a source of raw events, a build system's translator
//! and the confirmed publisher meet. Each way events arrive has its driver here, which
//! pairs the source with the build system's translator and hands every message to one
//! [`Pipeline`]:
//!
//! - [`file`]: a file (followed or not), translated on a reader thread, with its
//!   checkpoint (positions are byte offsets);
//! - [`bitbake_live`]: a live BitBake session (positions are event numbers; BitBake
//!   waits while the pipeline's window is full);
//! - [`bes`]: one Bazel invocation on the BES backend, in sequence-number order, acked
//!   once durable (positions are sequence numbers).
//!
//! A [`Pipeline`] owns what the three share, written once:
//!
//! - **the output**: the confirmed publisher (its in-flight window is the
//!   backpressure: [`Pipeline::send`] waits while it is full) or JSON lines on stdout;
//! - **the AAM hook**: when a build's `finished` message goes out, the build's
//!   artifacts ([`BuildScanner`]) follow it at once, at the same position, so a resumed
//!   source neither loses nor repeats them;
//! - **durable positions**: the driver *marks* a source position once every message
//!   derived from the events up to it was handed over; the position becomes
//!   [`durable`](Pipeline::durable) when the broker confirmed all of those messages.
//!   That is what a file's checkpoint and a BES ack may move to.

pub mod bes;
pub mod bitbake_live;
pub mod file;

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use crate::aam::BuildScanner;
use crate::bus::message::Outgoing;
use crate::bus::publish::{PublishStats, Publisher, PublisherConfig};
use crate::bus::BusError;
use crate::model::{BuildState, Envelope, Payload};

/// Where a pipeline's messages go.
pub enum Output<'o> {
    /// A publisher the caller keeps (one publisher for many files).
    Broker(&'o mut Publisher<u64>),
    /// A publisher of this pipeline's own (closed with it).
    Own(Box<Publisher<u64>>),
    /// JSON lines on stdout: written is confirmed.
    Print,
    /// Closed: nothing more goes out.
    Closed,
}

impl Output<'static> {
    /// A publisher of its own for `cfg`, or stdout when `cfg` is `None`.
    pub async fn connect(cfg: Option<&PublisherConfig>) -> Result<Output<'static>, BusError> {
        Ok(match cfg {
            Some(cfg) => Output::Own(Box::new(Publisher::connect(cfg.clone()).await?)),
            None => Output::Print,
        })
    }
}

/// See the module documentation. `P` is the source's position type.
pub struct Pipeline<'o, P> {
    out: Output<'o>,
    artifacts: Option<Arc<BuildScanner>>,
    /// Names the pipeline in logs.
    label: String,
    /// Messages handed over, and confirmed, so far (a message's publisher token is
    /// its number).
    emitted: u64,
    confirmed: u64,
    /// (position, messages emitted when it was marked), oldest first.
    marks: VecDeque<(P, u64)>,
    durable: Option<P>,
}

impl<'o, P: Copy + Ord> Pipeline<'o, P> {
    pub fn new(label: impl Into<String>, out: Output<'o>) -> Pipeline<'o, P> {
        Pipeline {
            out,
            artifacts: None,
            label: label.into(),
            emitted: 0,
            confirmed: 0,
            marks: VecDeque::new(),
            durable: None,
        }
    }

    /// Scans the build directory when a build finishes, and sends its artifacts.
    pub fn with_artifacts(mut self, scanner: Option<Arc<BuildScanner>>) -> Self {
        self.artifacts = scanner;
        self
    }

    /// Sends one message: waits while the publisher's window is full.
    pub async fn send(&mut self, msg: Outgoing) -> Result<(), BusError> {
        let token = self.emitted;
        self.emitted += 1;
        match &mut self.out {
            Output::Broker(p) => {
                let done = p.publish(msg, token).await?;
                self.note(done);
            }
            Output::Own(p) => {
                let done = p.publish(msg, token).await?;
                self.note(done);
            }
            Output::Print => {
                let mut w = std::io::stdout().lock();
                let _ = w
                    .write_all(&msg.body)
                    .and_then(|_| w.write_all(b"\n"))
                    .and_then(|_| w.flush());
                self.confirmed = self.emitted;
            }
            Output::Closed => {
                tracing::warn!(
                    "{}: a message after the end was dropped: {}",
                    self.label,
                    msg.routing_key
                );
                self.confirmed = self.emitted;
            }
        }
        self.advance();
        Ok(())
    }

    /// Sends a translated message, then (a build's end) its artifacts.
    pub async fn emit(&mut self, env: &Envelope) -> Result<(), BusError> {
        self.send(Outgoing::from_envelope(env)).await?;
        self.after(env).await
    }

    /// The AAM hook: when `env` is a finished build and a scanner is set, scans the
    /// build directory (on a blocking thread: file I/O and hashing) and sends the
    /// artifacts' messages. Anything else: nothing to do.
    pub async fn after(&mut self, env: &Envelope) -> Result<(), BusError> {
        let Some(scanner) = self.artifacts.clone() else {
            return Ok(());
        };
        if !is_finished_build(env) {
            return Ok(());
        }
        let finished = env.clone();
        let found = match tokio::task::spawn_blocking(move || scanner.after(&finished)).await {
            Ok(found) => found,
            Err(e) => {
                tracing::error!("{}: the artifact scan failed: {e}", self.label);
                Vec::new()
            }
        };
        for a in &found {
            self.send(Outgoing::from_envelope(a)).await?;
        }
        Ok(())
    }

    /// Every message derived from the source's events up to `pos` has been handed
    /// over: `pos` becomes durable once they are all confirmed.
    pub fn mark(&mut self, pos: P) {
        if self
            .marks
            .back()
            .is_some_and(|&(p, n)| p == pos && n == self.emitted)
        {
            return;
        }
        self.marks.push_back((pos, self.emitted));
        self.advance();
    }

    /// The furthest marked position whose messages are all confirmed.
    pub fn durable(&self) -> Option<P> {
        self.durable
    }

    /// Messages handed over so far.
    pub fn emitted(&self) -> u64 {
        self.emitted
    }

    /// Messages handed over and not confirmed yet.
    pub fn unconfirmed(&self) -> u64 {
        self.emitted - self.confirmed
    }

    /// Waits for the broker to confirm more messages (forever when none is waiting
    /// or the output needs no confirms: use it in a `select!` guarded by
    /// [`unconfirmed`](Self::unconfirmed)).
    pub async fn confirmed(&mut self) -> Result<(), BusError> {
        let done = match &mut self.out {
            Output::Broker(p) if p.unconfirmed() > 0 => p.confirmed().await?,
            Output::Own(p) if p.unconfirmed() > 0 => p.confirmed().await?,
            _ => std::future::pending().await,
        };
        self.note(done);
        self.advance();
        Ok(())
    }

    /// Waits until every message handed over is confirmed.
    pub async fn flush(&mut self) -> Result<(), BusError> {
        let done = match &mut self.out {
            Output::Broker(p) => p.flush().await?,
            Output::Own(p) => p.flush().await?,
            Output::Print | Output::Closed => Vec::new(),
        };
        self.note(done);
        self.advance();
        Ok(())
    }

    /// Flushes, closes a publisher of its own (with its counters) and sends nothing
    /// more. A borrowed publisher stays open for its owner.
    pub async fn close(&mut self) -> Result<Option<PublishStats>, BusError> {
        self.flush().await?;
        match std::mem::replace(&mut self.out, Output::Closed) {
            Output::Own(p) => {
                let (done, stats) = p.close().await?;
                self.note(done);
                self.advance();
                Ok(Some(stats))
            }
            Output::Broker(p) => Ok(Some(p.stats().clone())),
            Output::Print | Output::Closed => Ok(None),
        }
    }

    /// Whether messages still go somewhere.
    pub fn is_open(&self) -> bool {
        !matches!(self.out, Output::Closed)
    }

    fn note(&mut self, done: Vec<u64>) {
        if let Some(t) = done.last() {
            self.confirmed = self.confirmed.max(t + 1);
        }
    }

    fn advance(&mut self) {
        while let Some(&(pos, count)) = self.marks.front() {
            if count > self.confirmed {
                break;
            }
            self.durable = Some(self.durable.map_or(pos, |d| d.max(pos)));
            self.marks.pop_front();
        }
    }
}

/// Whether `env` ends a build (the AAM scans then).
pub fn is_finished_build(env: &Envelope) -> bool {
    matches!(&env.payload, Payload::Build(b) if b.state == BuildState::Finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u32) -> Outgoing {
        Outgoing {
            exchange: "x".into(),
            routing_key: format!("k.{n}"),
            message_id: n.to_string(),
            body: b"{}".to_vec(),
            properties: Default::default(),
        }
    }

    /// Without a broker, written is confirmed: a position is durable as soon as it is
    /// marked, and marks that came before messages of later positions stay in order.
    #[tokio::test]
    async fn positions_become_durable_in_order() {
        let mut p: Pipeline<'_, u64> = Pipeline::new("test", Output::Closed);
        assert_eq!(p.durable(), None);
        p.send(msg(1)).await.unwrap();
        p.mark(10);
        p.send(msg(2)).await.unwrap();
        p.send(msg(3)).await.unwrap();
        p.mark(25);
        p.mark(25);
        assert_eq!(
            (p.durable(), p.emitted(), p.unconfirmed()),
            (Some(25), 3, 0)
        );
        assert!(!p.is_open());
        assert_eq!(p.close().await.unwrap(), None);
    }
}
