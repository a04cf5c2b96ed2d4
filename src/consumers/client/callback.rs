//! Callbacks: the delivered [`Message`], what a callback may return, and running the
//! callbacks of one message with panics caught.
//!
//! This module owns the synchronous half of a delivery: given a message, which
//! callbacks apply (the [`Slot`]s), and running them one after the other on a worker
//! thread, each inside `catch_unwind`, so a panicking or failing callback becomes a
//! [`Failure`] with a reason instead of taking the monitor down. Retrying, acking and
//! dead-lettering are the caller's (`run.rs`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use lapin::BasicProperties;

use super::filter::Filters;
use crate::model::{
    ArtifactPayload, BuildPayload, BuildState, Envelope, Kind, LogPayload, Payload, TaskPayload,
    TestPayload,
};

/// The error a callback may give back.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a callback may return: `()` (it cannot fail) or `Result<(), E>` for any error
/// that converts into a boxed error (`std::io::Error`, `String`, `anyhow::Error`, ...).
/// An `Err` counts as a failed callback: logged, counted, retried, then dead-lettered.
pub trait CallbackResult {
    fn into_result(self) -> Result<(), BoxError>;
}

impl CallbackResult for () {
    fn into_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError>> CallbackResult for Result<(), E> {
    fn into_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

/// One delivered message, as the callbacks see it.
#[derive(Debug, Clone)]
pub struct Message {
    /// The exchange it was published to (`exchange/buildbus/v1/<kind>`).
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// The broker delivered it before (to this or another consumer) without an ack.
    pub redelivered: bool,
    /// Which run of the callbacks this is: 1, then 2... on retries.
    pub attempt: u32,
    /// The body as delivered: the envelope's JSON.
    pub body: Vec<u8>,
    /// The AMQP properties (message id, headers `tree`, `platform`, ...).
    pub properties: BasicProperties,
    /// The parsed envelope; `None` when the body is not one (see `parse_error`).
    pub envelope: Option<Envelope>,
    /// Why the body is not an envelope, when it is not.
    pub parse_error: Option<String>,
}

impl Message {
    /// Parses a delivered body.
    pub fn new(
        exchange: String,
        routing_key: String,
        redelivered: bool,
        body: Vec<u8>,
        properties: BasicProperties,
    ) -> Message {
        let (envelope, parse_error) = match Envelope::from_json(&body) {
            Ok(e) => (Some(e), None),
            Err(e) => (None, Some(format!("not a buildbus envelope: {e}"))),
        };
        Message {
            exchange,
            routing_key,
            redelivered,
            attempt: 1,
            body,
            properties,
            envelope,
            parse_error,
        }
    }

    /// The message id: the envelope's, else the AMQP property.
    pub fn message_id(&self) -> Option<&str> {
        match &self.envelope {
            Some(e) => Some(e.meta.message_id.as_str()),
            None => self.properties.message_id().as_ref().map(|s| s.as_str()),
        }
    }

    /// The kind, when the body is an envelope.
    pub fn kind(&self) -> Option<Kind> {
        self.envelope.as_ref().map(Envelope::kind)
    }

    /// A string header of the AMQP message.
    pub fn header(&self, name: &str) -> Option<String> {
        crate::bus::message::header(&self.properties, name)
    }

    /// The message id for logs: the id, or `(no id)`.
    pub(crate) fn id_for_log(&self) -> String {
        self.message_id().unwrap_or("(no id)").to_string()
    }
}

type Typed<P> = Arc<dyn Fn(&Message, &P) -> Result<(), BoxError> + Send + Sync>;
type Raw = Arc<dyn Fn(&Message) -> Result<(), BoxError> + Send + Sync>;

/// Wraps a user closure into the stored form.
pub(crate) fn typed<P, R, F>(f: F) -> Typed<P>
where
    F: Fn(&Message, &P) -> R + Send + Sync + 'static,
    R: CallbackResult,
{
    Arc::new(move |m: &Message, p: &P| f(m, p).into_result())
}

pub(crate) fn raw<R, F>(f: F) -> Raw
where
    F: Fn(&Message) -> R + Send + Sync + 'static,
    R: CallbackResult,
{
    Arc::new(move |m: &Message| f(m).into_result())
}

/// The callbacks of one monitor.
#[derive(Clone, Default)]
pub(crate) struct Callbacks {
    pub build: Option<Typed<BuildPayload>>,
    pub test: Option<Typed<TestPayload>>,
    pub task: Option<Typed<TaskPayload>>,
    pub artifact: Option<Typed<ArtifactPayload>>,
    pub log: Option<Typed<LogPayload>>,
    pub matched: Option<Typed<Envelope>>,
    pub message: Option<Raw>,
}

/// One callback that applies to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Message,
    Build,
    Test,
    Task,
    Artifact,
    Log,
    Match,
}

impl Slot {
    pub fn name(self) -> &'static str {
        match self {
            Slot::Message => "on_message",
            Slot::Build => "on_build",
            Slot::Test => "on_test",
            Slot::Task => "on_task",
            Slot::Artifact => "on_artifact",
            Slot::Log => "on_log",
            Slot::Match => "on_match",
        }
    }
}

/// Why a callback failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Error(String),
    Panic(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Error(e) => write!(f, "returned an error: {e}"),
            Failure::Panic(p) => write!(f, "panicked: {p}"),
        }
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".to_string()
    }
}

impl Callbacks {
    pub fn has_any(&self) -> bool {
        self.build.is_some()
            || self.test.is_some()
            || self.task.is_some()
            || self.artifact.is_some()
            || self.log.is_some()
            || self.matched.is_some()
            || self.message.is_some()
    }

    /// Whether a typed callback (or `on_match`) wants messages of `kind`.
    pub fn wants_kind(&self, kind: Kind) -> bool {
        self.matched.is_some()
            || match kind {
                Kind::Build => self.build.is_some(),
                Kind::Test => self.test.is_some(),
                Kind::Task => self.task.is_some(),
                Kind::Artifact => self.artifact.is_some(),
                Kind::Log => self.log.is_some(),
            }
    }

    /// The callbacks that apply to `m`, in the order they run: `on_message`, the typed
    /// one, `on_match`.
    pub fn slots(&self, m: &Message, filters: &Filters) -> Vec<Slot> {
        let mut out = Vec::new();
        if self.message.is_some() {
            out.push(Slot::Message);
        }
        let Some(env) = &m.envelope else {
            return out;
        };
        if !filters.matches(env) {
            return out;
        }
        let typed = match &env.payload {
            Payload::Build(b) => {
                (self.build.is_some() && b.state == BuildState::Finished).then_some(Slot::Build)
            }
            Payload::Test(t) => (self.test.is_some() && t.scope == "summary").then_some(Slot::Test),
            Payload::Task(_) => self.task.is_some().then_some(Slot::Task),
            Payload::Artifact(_) => self.artifact.is_some().then_some(Slot::Artifact),
            Payload::Log(_) => self.log.is_some().then_some(Slot::Log),
        };
        out.extend(typed);
        if self.matched.is_some() {
            out.push(Slot::Match);
        }
        out
    }

    /// Runs one callback on `m`, catching a panic.
    pub fn run(&self, slot: Slot, m: &Message) -> Result<(), Failure> {
        let call = || -> Result<(), BoxError> {
            let env = m.envelope.as_ref();
            match (slot, env.map(|e| &e.payload)) {
                (Slot::Message, _) => self.message.as_ref().map_or(Ok(()), |f| f(m)),
                (Slot::Match, Some(_)) => match (&self.matched, env) {
                    (Some(f), Some(e)) => f(m, e),
                    _ => Ok(()),
                },
                (Slot::Build, Some(Payload::Build(p))) => {
                    self.build.as_ref().map_or(Ok(()), |f| f(m, p))
                }
                (Slot::Test, Some(Payload::Test(p))) => {
                    self.test.as_ref().map_or(Ok(()), |f| f(m, p))
                }
                (Slot::Task, Some(Payload::Task(p))) => {
                    self.task.as_ref().map_or(Ok(()), |f| f(m, p))
                }
                (Slot::Artifact, Some(Payload::Artifact(p))) => {
                    self.artifact.as_ref().map_or(Ok(()), |f| f(m, p))
                }
                (Slot::Log, Some(Payload::Log(p))) => self.log.as_ref().map_or(Ok(()), |f| f(m, p)),
                _ => Ok(()),
            }
        };
        match catch_unwind(AssertUnwindSafe(call)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::Error(e.to_string())),
            Err(p) => Err(Failure::Panic(panic_text(p))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_and_results_are_callback_results() {
        assert!(().into_result().is_ok());
        assert!(Ok::<(), std::io::Error>(()).into_result().is_ok());
        let e = Err::<(), String>("nope".into()).into_result().unwrap_err();
        assert_eq!(e.to_string(), "nope");
    }

    #[test]
    fn panics_and_errors_become_failures() {
        let cbs = Callbacks {
            message: Some(raw(|m: &Message| {
                if m.routing_key == "boom" {
                    panic!("kaboom {}", 42);
                }
                Err::<(), _>(format!("bad {}", m.routing_key))
            })),
            ..Default::default()
        };
        let mut m = Message::new(
            "x".into(),
            "boom".into(),
            false,
            b"{}".to_vec(),
            BasicProperties::default(),
        );
        assert!(m.envelope.is_none() && m.parse_error.is_some());
        assert_eq!(cbs.slots(&m, &Filters::default()), vec![Slot::Message]);
        assert_eq!(
            cbs.run(Slot::Message, &m),
            Err(Failure::Panic("kaboom 42".into()))
        );
        m.routing_key = "k".into();
        assert_eq!(
            cbs.run(Slot::Message, &m),
            Err(Failure::Error("bad k".into()))
        );
    }
}
