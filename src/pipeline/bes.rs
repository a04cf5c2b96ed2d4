//! The BES source through the pipeline: one Bazel invocation's task orders its
//! events, translates them, publishes them and acknowledges them.
//!
//! Every invocation is a task of its own (an actor) that outlives the gRPC streams
//! carrying its events ([`crate::sources::bes::task`]): Bazel may drop a stream and
//! open another that starts at its first unacknowledged sequence number. The task owns
//! the invocation's translator, its [`Pipeline`] (confirmed publisher, AAM hook,
//! durable sequence numbers) and its spool, and is fed by whichever stream is attached.
//!
//! **Order and repeats.** Events are translated in sequence-number order, each number
//! once. A number already translated is a repeat (a retried stream): it is not
//! translated again, only acknowledged again. A number ahead of the next expected one
//! waits in a bounded buffer until the gap is filled.
//!
//! **Acks mean durable.** The ack for sequence number N is sent only when every
//! message derived from events 1..=N has been confirmed by the broker: after
//! translating an event, the task marks N in the pipeline unless the translator still
//! holds messages back (the build's context is not complete), and N becomes
//! acknowledgeable once the pipeline says it is durable. While the broker is down nothing is confirmed, so acks wait and
//! Bazel keeps its events; the publisher resends its unconfirmed messages when the
//! broker is back. Acks go out in order, one per request the stream sent.
//!
//! **Restarts.** Raw events go to the spool before translation and the spool is
//! synced before an ack moves past them; a new task for an invocation whose stream
//! starts at N > 1 replays the spooled events below N first (see [`super::spool`]).
//!
//! **Silence.** A task that hears nothing for the configured idle timeout before the
//! stream finished ends the build as incomplete ([`BazelTranslator::abandon`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use super::{Output, Pipeline};
use crate::bus::BusError;
use crate::decode::bep::codec::Needs;
use crate::model::{Envelope, SourceMeta};
use crate::sources::bes::proto::v1::build_event::Event as BesEvent;
use crate::sources::bes::proto::v1::{
    OrderedBuildEvent, PublishBuildToolEventStreamResponse, StreamId,
};
use crate::sources::bes::proto::BAZEL_EVENT_TYPE;
use crate::sources::bes::spool::{Record, SpoolFile};
use crate::sources::bes::task::{AckSender, Backing, Cmd, Invocations, TaskStart};
use crate::sources::bes::{self, Backend, BesConfig, BesError};
use crate::systems::bazel::BazelTranslator;
use crate::systems::Context;
use crate::systems::Translator;

/// Events held back while waiting for a missing sequence number, at most.
pub const MAX_EARLY: usize = 10_000;

/// Starts a BES backend whose invocations run through the pipeline: translated with
/// `ctx`, published to `cfg.publisher` (stdout when `None`), with the artifacts of
/// `cfg.artifacts` at each build's end.
pub async fn start(cfg: BesConfig, ctx: Arc<Context>) -> Result<Backend, BesError> {
    let spawner = Arc::new(BesPipeline {
        ctx,
        publisher: cfg.publisher.clone(),
        artifacts: cfg.artifacts.clone(),
    });
    bes::start(cfg, spawner).await
}

/// Starts invocations' tasks for the BES server.
struct BesPipeline {
    ctx: Arc<Context>,
    publisher: Option<crate::bus::publish::PublisherConfig>,
    artifacts: Option<Arc<crate::aam::BuildScanner>>,
}

impl Invocations for BesPipeline {
    fn spawn(&self, backing: &Arc<Backing>, task: TaskStart) -> mpsc::Sender<Cmd> {
        let (tx, rx) = mpsc::channel(1024);
        let task_tx = tx.clone();
        let backing = Arc::clone(backing);
        let ctx = Arc::clone(&self.ctx);
        let publisher = self.publisher.clone();
        let artifacts = self.artifacts.clone();
        tokio::spawn(async move {
            let TaskStart {
                id,
                first_seq,
                facts,
                on_end,
            } = task;
            let out = match Output::connect(publisher.as_ref()).await {
                Ok(out) => Some(out),
                Err(e) => {
                    tracing::error!("invocation {id}: cannot start: {e}");
                    None
                }
            };
            if let Some(out) = out {
                let pipe = Pipeline::new(format!("invocation {id}"), out).with_artifacts(artifacts);
                let inv = Invocation::start(id, first_seq, backing, ctx, facts, pipe);
                inv.run(rx).await;
            }
            on_end(&task_tx);
        });
        tx
    }
}

struct Attached {
    no: u64,
    acks: AckSender,
    stream_id: Option<StreamId>,
    /// The next sequence number this stream is owed an ack for.
    next_ack: Option<i64>,
    /// Whether any ack went out on this stream yet.
    acked_any: bool,
    /// The highest sequence number this stream sent.
    sent_max: i64,
    half_closed: bool,
}

/// Counters of one invocation, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvocationStats {
    pub events: u64,
    pub repeats: u64,
    pub reordered: u64,
    pub bad_events: u64,
    pub messages: u64,
    pub acks: u64,
    pub replayed: u64,
}

struct Invocation {
    id: String,
    backing: Arc<Backing>,
    translator: BazelTranslator,
    /// What the decoder keeps of an event for this translator.
    needs: Needs,
    /// Publishes (or prints) the messages; its positions are sequence numbers.
    pipe: Pipeline<'static, i64>,
    /// The next sequence number to translate.
    next_seq: i64,
    early: BTreeMap<i64, OrderedBuildEvent>,
    /// Every sequence number up to this one is confirmed (messages) ...
    durable: i64,
    /// ... and up to this one also synced in the spool: acks go up to here.
    synced: i64,
    /// Spool syncs are grouped: at most one per [`SYNC_EVERY`].
    last_sync: Instant,
    sync_due: Option<Instant>,
    /// The sequence number of `componentStreamFinished`, once translated.
    finished_seq: Option<i64>,
    stream: Option<Attached>,
    spool: Option<SpoolFile>,
    stats: InvocationStats,
    last_heard: Instant,
}

impl Invocation {
    fn start(
        id: String,
        first_seq: i64,
        backing: Arc<Backing>,
        ctx: Arc<Context>,
        facts: Vec<(String, String)>,
        pipe: Pipeline<'static, i64>,
    ) -> Invocation {
        let source = SourceMeta {
            system: "bazel".into(),
            format: "bes".into(),
            origin: format!("{}/{id}", backing.origin),
            tool_version: None,
        };
        let needs = BazelTranslator::decode_needs(&ctx);
        let mut translator = BazelTranslator::new(ctx, source);
        for (k, v) in facts {
            translator.set_metadata(&k, &v);
        }
        let mut inv = Invocation {
            id,
            backing,
            needs,
            translator,
            pipe,
            next_seq: 1,
            early: BTreeMap::new(),
            durable: 0,
            synced: 0,
            last_sync: Instant::now(),
            sync_due: None,
            finished_seq: None,
            stream: None,
            spool: None,
            stats: InvocationStats::default(),
            last_heard: Instant::now(),
        };
        inv.recover(first_seq);
        inv
    }

    /// Opens the spool; when the first stream starts past 1, replays what the spool
    /// holds below it (their messages were confirmed before those events were acked).
    fn recover(&mut self, first_seq: i64) {
        let Some(spool) = self.backing.spool.clone() else {
            return;
        };
        let records = if first_seq > 1 {
            match spool.load(&self.id, first_seq) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("invocation {}: cannot read the spool: {e}", self.id);
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let contiguous = records
            .iter()
            .enumerate()
            .all(|(i, r)| r.seq == i as i64 + 1);
        if first_seq > 1 {
            if records.len() as i64 == first_seq - 1 && contiguous {
                tracing::info!(
                    "invocation {}: resuming at sequence number {first_seq}; replaying {} spooled events",
                    self.id,
                    records.len()
                );
                for r in &records {
                    self.translate_bazel(r.seq, &r.event, &mut |_| {});
                    self.stats.replayed += 1;
                }
            } else {
                tracing::warn!(
                    "invocation {}: the stream starts at sequence number {first_seq} but the spool \
                     holds {} of the {} events before it; translating without them (messages \
                     may lack the build's context)",
                    self.id,
                    records.len(),
                    first_seq - 1
                );
            }
            self.next_seq = first_seq;
            self.durable = first_seq - 1;
            self.synced = first_seq - 1;
        }
        match spool.create(&self.id, &records) {
            Ok(f) => self.spool = Some(f),
            Err(e) => tracing::error!("invocation {}: cannot write the spool: {e}", self.id),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        enum Step {
            Cmd(Option<Cmd>),
            Confirmed(Result<(), BusError>),
            Sync,
            Tick,
        }
        loop {
            let busy = self.unconfirmed() > 0;
            let done = self.done();
            if done {
                self.close_out().await;
            }
            let wait = if done {
                self.backing.linger
            } else if self.finished_seq.is_some() {
                // Everything arrived; only the broker is awaited. Not silence.
                Duration::from_secs(24 * 3600)
            } else {
                self.backing.idle_timeout
            };
            let deadline = self.last_heard + wait;
            let step = tokio::select! {
                c = rx.recv() => Step::Cmd(c),
                r = self.pipe.confirmed(), if busy => Step::Confirmed(r),
                _ = sleep_until_some(self.sync_due) => Step::Sync,
                _ = tokio::time::sleep_until(deadline) => Step::Tick,
            };
            match step {
                Step::Cmd(None) => break,
                Step::Cmd(Some(c)) => {
                    self.last_heard = Instant::now();
                    if let Err(e) = self.handle(c).await {
                        tracing::error!("invocation {}: {e}", self.id);
                        break;
                    }
                }
                Step::Confirmed(Ok(())) => self.advance(),
                Step::Confirmed(Err(e)) => {
                    tracing::error!("invocation {}: publishing failed: {e}", self.id);
                    break;
                }
                Step::Sync => {
                    self.sync_spool();
                    self.send_acks();
                }
                Step::Tick if done => break,
                Step::Tick => {
                    if self.finished_seq.is_none() && Instant::now() >= deadline {
                        self.give_up().await;
                        break;
                    }
                }
            }
        }
        if self.done() {
            if let Some(s) = &self.backing.spool {
                s.remove(&self.id);
            }
        }
        self.close_out().await;
        tracing::debug!("invocation {}: task ends: {:?}", self.id, self.stats);
    }

    /// Closes the broker connection (everything is confirmed once done).
    async fn close_out(&mut self) {
        if !self.pipe.is_open() {
            return;
        }
        if let Err(e) = self.pipe.close().await {
            tracing::warn!("invocation {}: closing the publisher: {e}", self.id);
        }
    }

    fn unconfirmed(&self) -> u64 {
        self.pipe.unconfirmed()
    }

    /// The stream finished and everything is acknowledgeable.
    fn done(&self) -> bool {
        self.finished_seq.is_some_and(|f| self.ackable() >= f) && self.unconfirmed() == 0
    }

    async fn handle(&mut self, c: Cmd) -> Result<(), BusError> {
        match c {
            Cmd::Attach { stream, acks } => {
                if let Some(old) = self.stream.take() {
                    let _ = old.acks.send(Err(Status::aborted(
                        "a newer stream for this invocation replaced this one",
                    )));
                }
                self.stream = Some(Attached {
                    no: stream,
                    acks,
                    stream_id: None,
                    next_ack: None,
                    acked_any: false,
                    sent_max: 0,
                    half_closed: false,
                });
            }
            Cmd::Event { stream, ev } => {
                if let Some(st) = self.stream.as_mut().filter(|s| s.no == stream) {
                    let seq = ev.sequence_number;
                    if st.stream_id.is_none() {
                        st.stream_id = ev.stream_id.clone();
                    }
                    // Acks start at the lowest number the stream sent before the first
                    // ack went out (a stream may open out of order).
                    st.next_ack = match st.next_ack {
                        None => Some(seq),
                        Some(n) if !st.acked_any => Some(n.min(seq)),
                        n => n,
                    };
                    st.sent_max = st.sent_max.max(seq);
                }
                // Events of a stream that was replaced still count; only acks differ.
                self.accept(*ev).await?;
            }
            Cmd::HalfClose { stream } => {
                if let Some(st) = self.stream.as_mut().filter(|s| s.no == stream) {
                    st.half_closed = true;
                }
            }
            Cmd::Gone { stream } => {
                if self.stream.as_ref().is_some_and(|s| s.no == stream) {
                    self.stream = None;
                }
            }
            Cmd::Fact { key, value } => self.translator.set_metadata(&key, &value),
            Cmd::AttemptFinished { result } => {
                self.translator.set_metadata("bes.attempt_result", &result);
                if self.finished_seq.is_none() {
                    // Bazel gave up on the stream (or uploads asynchronously) and says
                    // the attempt is over: the build will not get more events.
                    self.end_incomplete(&format!(
                        "incomplete: Bazel reported the attempt finished ({result}) before its \
                         event stream was complete"
                    ))
                    .await?;
                }
            }
        }
        self.advance();
        Ok(())
    }

    /// Takes one request: translates it (and any buffered successors) in order.
    async fn accept(&mut self, ev: OrderedBuildEvent) -> Result<(), BusError> {
        let seq = ev.sequence_number;
        if seq < self.next_seq {
            self.stats.repeats += 1;
            return Ok(());
        }
        if seq > self.next_seq {
            if self.early.contains_key(&seq) {
                self.stats.repeats += 1;
            } else if self.early.len() >= MAX_EARLY {
                self.fail_stream(Status::resource_exhausted(format!(
                    "invocation {}: {} events wait for sequence number {}; refusing more",
                    self.id,
                    self.early.len(),
                    self.next_seq
                )));
            } else {
                self.stats.reordered += 1;
                self.early.insert(seq, ev);
            }
            return Ok(());
        }
        let mut out = Vec::new();
        self.translate_one(ev, &mut out);
        while let Some(next) = self.early.remove(&self.next_seq) {
            self.translate_one(next, &mut out);
        }
        self.publish(out).await
    }

    fn translate_one(&mut self, ev: OrderedBuildEvent, out: &mut Vec<Item>) {
        let seq = ev.sequence_number;
        self.next_seq = seq + 1;
        self.stats.events += 1;
        match ev.event.and_then(|e| e.event) {
            Some(BesEvent::BazelEvent(any)) => {
                if any.type_url != BAZEL_EVENT_TYPE {
                    self.stats.bad_events += 1;
                    tracing::warn!(
                        "invocation {} sequence number {seq}: skipped a bazel_event of type {:?} \
                         (expected {BAZEL_EVENT_TYPE})",
                        self.id,
                        any.type_url
                    );
                } else {
                    let bytes = any.value;
                    if let Some(spool) = self.spool.as_mut() {
                        let rec = Record {
                            seq,
                            event: bytes.clone(),
                        };
                        if let Err(e) = spool.append(&rec) {
                            tracing::error!("invocation {}: spool write failed: {e}", self.id);
                            self.spool = None;
                        }
                    }
                    self.translate_bazel(seq, &bytes, &mut |env| out.push(Item::Message(env)));
                }
            }
            Some(BesEvent::ComponentStreamFinished(_)) => {
                self.translator
                    .finish(&mut |env| out.push(Item::Message(env)));
                self.finished_seq = Some(seq);
            }
            // Console output and lifecycle-type events on the stream carry nothing
            // the translator reads.
            _ => {}
        }
        if !self.translator.holding() {
            out.push(Item::Mark(seq));
        }
    }

    fn translate_bazel(&mut self, seq: i64, bytes: &[u8], out: &mut dyn FnMut(Envelope)) {
        match crate::decode::bep::codec::decode_binary(bytes, &self.needs) {
            Ok(ev) => self.translator.event(ev, out),
            Err(e) => {
                self.stats.bad_events += 1;
                tracing::error!(
                    "invocation {} sequence number {seq}: undecodable build_event_stream.BuildEvent \
                     ({} bytes): {e}; skipped",
                    self.id,
                    bytes.len()
                );
            }
        }
    }

    /// Sends the messages in order, each build's artifacts right after its end, and
    /// marks the sequence numbers once their messages are handed over.
    async fn publish(&mut self, items: Vec<Item>) -> Result<(), BusError> {
        for item in items {
            match item {
                Item::Message(env) => {
                    let before = self.pipe.emitted();
                    self.pipe.emit(&env).await?;
                    self.stats.messages += self.pipe.emitted() - before;
                }
                Item::Mark(seq) => self.pipe.mark(seq),
            }
        }
        Ok(())
    }

    /// Moves the durable point as far as confirms allow and sends the acks it frees.
    fn advance(&mut self) {
        let before = self.durable;
        if let Some(d) = self.pipe.durable() {
            self.durable = self.durable.max(d);
        }
        if self.durable > before && self.spool.is_some() {
            // Group commit: sync now if the last sync is old enough, else soon.
            if self.last_sync.elapsed() >= SYNC_EVERY {
                self.sync_spool();
            } else if self.sync_due.is_none() {
                self.sync_due = Some(self.last_sync + SYNC_EVERY);
            }
        }
        self.send_acks();
    }

    /// Makes the spool durable up to `durable`, so acks may go that far.
    fn sync_spool(&mut self) {
        self.sync_due = None;
        self.last_sync = Instant::now();
        if let Some(spool) = self.spool.as_mut() {
            if let Err(e) = spool.sync() {
                // Acks still need the broker's confirms; only a restart's context is
                // at stake. Go on without the spool rather than stall the build.
                tracing::error!("invocation {}: spool sync failed: {e}; spool off", self.id);
                self.spool = None;
            }
        }
        self.synced = self.durable;
    }

    /// Acks may go up to here: confirmed, and (with a spool) synced.
    fn ackable(&self) -> i64 {
        if self.spool.is_some() {
            self.durable.min(self.synced)
        } else {
            self.durable
        }
    }

    fn send_acks(&mut self) {
        let durable = self.ackable();
        let gap = self.early.keys().next().copied();
        let next_seq = self.next_seq;
        let Some(st) = self.stream.as_mut() else {
            return;
        };
        let mut sent = 0;
        if let Some(mut n) = st.next_ack {
            while n <= durable && n <= st.sent_max {
                let ack = PublishBuildToolEventStreamResponse {
                    stream_id: st.stream_id.clone(),
                    sequence_number: n,
                };
                if st.acks.send(Ok(ack)).is_err() {
                    self.stream = None;
                    return;
                }
                sent += 1;
                n += 1;
                st.acked_any = true;
            }
            st.next_ack = Some(n);
        }
        self.stats.acks += sent;
        let all_acked = st.next_ack.is_none_or(|n| n > st.sent_max);
        if st.half_closed && all_acked {
            // Dropping the sender ends the RPC with OK.
            self.stream = None;
        } else if st.half_closed && gap.is_some() && durable + 1 >= next_seq {
            let msg = format!(
                "invocation {}: the stream ended but sequence number {} never arrived \
                 ({} later events wait for it)",
                self.id,
                next_seq,
                self.early.len()
            );
            let _ = st.acks.send(Err(Status::failed_precondition(msg)));
            self.stream = None;
        }
    }

    fn fail_stream(&mut self, status: Status) {
        tracing::warn!("invocation {}: {}", self.id, status.message());
        if let Some(st) = self.stream.take() {
            let _ = st.acks.send(Err(status));
        }
    }

    async fn end_incomplete(&mut self, reason: &str) -> Result<(), BusError> {
        let mut out = Vec::new();
        self.translator
            .abandon(reason, &mut |env| out.push(Item::Message(env)));
        if !self.translator.holding() {
            out.push(Item::Mark(self.next_seq - 1));
        }
        self.publish(out).await?;
        // Nothing more will be translated: this invocation is over once confirmed.
        self.finished_seq = Some(self.next_seq - 1);
        Ok(())
    }

    /// The idle timeout expired before the stream finished.
    async fn give_up(&mut self) {
        let reason = format!(
            "incomplete: the BES stream went silent for {} s after sequence number {}",
            self.backing.idle_timeout.as_secs(),
            self.next_seq - 1
        );
        tracing::warn!("invocation {}: {reason}", self.id);
        if let Err(e) = self.end_incomplete(&reason).await {
            tracing::error!("invocation {}: {e}", self.id);
            return;
        }
        if let Err(e) = self.pipe.flush().await {
            tracing::error!("invocation {}: {e}", self.id);
        }
        self.advance();
        self.sync_spool();
        self.send_acks();
    }
}

/// What translating events gives, in order (short-lived: not boxed).
#[allow(clippy::large_enum_variant)]
enum Item {
    Message(Envelope),
    /// Every message of the events up to this sequence number is before this.
    Mark(i64),
}

/// Spool syncs are at most this often (acks wait for the next one).
pub const SYNC_EVERY: Duration = Duration::from_millis(10);

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
