//! What the gRPC service tells an invocation's task, and how it starts one.
//!
//! Every Bazel invocation is a task of its own (an actor) that outlives the gRPC
//! streams carrying its events: Bazel may drop a stream and open another that starts
//! at its first unacknowledged sequence number. The service ([`super::server`]) only
//! routes: it starts a task per invocation through an [`Invocations`] (the pipeline's
//! BES driver, [`crate::pipeline::bes`], implements it) and feeds it [`Cmd`]s. Ordering,
//! translation, publishing and acks are the task's.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;

use super::proto::v1::{OrderedBuildEvent, PublishBuildToolEventStreamResponse};
use super::spool::Spool;

/// Where a stream's acks (or its final error) go.
pub type AckSender = mpsc::UnboundedSender<Result<PublishBuildToolEventStreamResponse, Status>>;

/// What streams and lifecycle calls tell an invocation's task.
#[derive(Debug)]
pub enum Cmd {
    /// A stream starts carrying this invocation; acks go to `acks`.
    Attach { stream: u64, acks: AckSender },
    /// One request of a stream.
    Event {
        stream: u64,
        ev: Box<OrderedBuildEvent>,
    },
    /// The stream's client half-closed: end the RPC once everything is acked.
    HalfClose { stream: u64 },
    /// The stream broke (client gone, transport error).
    Gone { stream: u64 },
    /// A fact from the lifecycle calls (or the stream's first request) for the build
    /// messages' metadata.
    Fact { key: String, value: String },
    /// Bazel said the attempt finished (`InvocationAttemptFinished`), with its result.
    AttemptFinished { result: String },
}

/// Called with the task's command channel when an invocation's task ends.
pub type OnEnd = Box<dyn FnOnce(&mpsc::Sender<Cmd>) + Send>;

/// What a backend's tasks share, fixed once it listens.
#[derive(Clone)]
pub struct Backing {
    /// Shown in every message's `_meta.source.origin` (`grpc://ADDR/INVOCATION`).
    pub origin: String,
    /// Open invocations' raw events, for restarts.
    pub spool: Option<Spool>,
    /// A stream silent this long ends its build as incomplete.
    pub idle_timeout: Duration,
    /// How long a finished invocation's task stays to acknowledge late repeats.
    pub linger: Duration,
}

/// One invocation's task to start.
pub struct TaskStart {
    pub id: String,
    /// The first sequence number its first stream carries (> 1: a restart).
    pub first_seq: i64,
    /// Lifecycle facts heard before the task started.
    pub facts: Vec<(String, String)>,
    pub on_end: OnEnd,
}

/// Starts invocations' tasks: returns the new task's command channel.
pub trait Invocations: Send + Sync {
    fn spawn(&self, backing: &Arc<Backing>, task: TaskStart) -> mpsc::Sender<Cmd>;
}

/// How long a finished invocation's task stays to acknowledge late repeats.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(30);
