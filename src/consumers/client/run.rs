//! The monitor at work: connecting, declaring, consuming, running callbacks on the
//! worker pool, acking, retrying, dead-lettering and reconnecting.
//!
//! This module owns the monitor's own thread. It runs a small tokio runtime whose one
//! worker thread does the AMQP I/O; callbacks never run there but on tokio's blocking
//! pool, at most `workers` at once (a semaphore). The consumer takes a delivery only
//! when a worker is free, so with one worker the callbacks see the queue's order.
//!
//! For each delivery: parse it, pick the callbacks that apply
//! ([`Callbacks::slots`]), run them (panics caught); all returned → ack. A failed
//! callback is retried (only the failed ones, after `retry_delay`, doubling) up to
//! `retries` times, then the message is republished to the dead-letter exchange with
//! an `x-buildbus-error` header (confirmed), then acked. A body that is not an
//! envelope, with no `on_message` to take it, is dead-lettered at once.
//!
//! Any broker trouble ends the session: the monitor reconnects with backoff, declares
//! and binds again and goes on (a labelled queue kept everything meanwhile; callbacks
//! of the old session finish, but their acks are lost, so those messages come again,
//! flagged `redelivered`). Refusals that retrying cannot fix (access refused, a queue
//! that exists with other arguments) end the monitor with an error instead.
//!
//! Stopping is graceful: the consumer is cancelled, callbacks already running finish
//! and are acked, and deliveries not yet started are left to the broker (a labelled
//! queue gets them back).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Acker, Channel, Connection, ConnectionProperties};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::bindings::Binding;
use super::callback::{Callbacks, Failure, Message, Slot};
use super::filter::Filters;
use super::queue::{self, QueueLimits};
use super::{ClientError, Stats};
use crate::bus::connect::{connect_once_with, gave_up, Backoff, ATTEMPT_LIMIT};
use crate::bus::topology::Topology;
use crate::bus::{redact_url, refusal, BrokerTls, BusError, Stage};

/// Everything a running monitor needs to know, fixed at `start()`.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub url: String,
    pub tls: BrokerTls,
    pub prefix: String,
    /// For logs and the consumer tag: the label, or `monitor`.
    pub name: String,
    /// The labelled queue, `None` for an exclusive one.
    pub queue: Option<String>,
    pub bindings: Vec<Binding>,
    pub limits: QueueLimits,
    pub filters: Filters,
    pub workers: usize,
    pub prefetch: u16,
    pub retries: u32,
    pub retry_delay: Duration,
    /// Give up after transient faults lasting this long with no connection.
    pub connect_timeout: Option<Duration>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub received: AtomicU64,
    pub handled: AtomicU64,
    pub filtered: AtomicU64,
    pub invalid: AtomicU64,
    pub callbacks: AtomicU64,
    pub errors: AtomicU64,
    pub panics: AtomicU64,
    pub retries: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub reconnects: AtomicU64,
    pub unbound: AtomicU64,
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            received: g(&self.received),
            handled: g(&self.handled),
            filtered: g(&self.filtered),
            invalid: g(&self.invalid),
            callbacks: g(&self.callbacks),
            errors: g(&self.errors),
            panics: g(&self.panics),
            retries: g(&self.retries),
            dead_lettered: g(&self.dead_lettered),
            reconnects: g(&self.reconnects),
            bindings_removed: g(&self.unbound),
        }
    }
}

/// What the handle can see of the monitor's life.
#[derive(Debug, Default)]
pub(crate) struct Life {
    /// Consuming (set once the first session consumes).
    pub ready: bool,
    /// The queue consumed now.
    pub queue: Option<String>,
    /// How the monitor ended, once it has.
    pub ended: Option<Result<(), ClientError>>,
}

/// Shared by the handle, the monitor thread and every job.
pub(crate) struct Shared {
    pub plan: Plan,
    pub callbacks: Callbacks,
    pub counters: Counters,
    pub stop: watch::Sender<bool>,
    pub life: Mutex<Life>,
    pub changed: Condvar,
}

impl Shared {
    pub fn new(plan: Plan, callbacks: Callbacks) -> Shared {
        Shared {
            plan,
            callbacks,
            counters: Counters::default(),
            stop: watch::channel(false).0,
            life: Mutex::new(Life::default()),
            changed: Condvar::new(),
        }
    }

    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    pub fn request_stop(&self) {
        self.stop.send_replace(true);
    }

    pub fn life(&self) -> std::sync::MutexGuard<'_, Life> {
        self.life.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Life)) {
        f(&mut self.life());
        self.changed.notify_all();
    }

    /// Waits (at most `timeout`) until `cond` holds; gives whether it does.
    pub fn wait_for(&self, timeout: Option<Duration>, cond: impl Fn(&Life) -> bool) -> bool {
        let mut life = self.life();
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while !cond(&life) {
            match deadline {
                None => life = self.changed.wait(life).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    life = self
                        .changed
                        .wait_timeout(life, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        true
    }
}

/// The monitor thread's body: a runtime, the session loop, then the result.
pub(crate) fn thread_main(sh: Arc<Shared>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("buildbus-monitor-io")
        .enable_all()
        .build();
    let result = match rt {
        Ok(rt) => {
            let r = rt.block_on(run(sh.clone()));
            rt.shutdown_timeout(Duration::from_secs(1));
            r
        }
        Err(e) => Err(ClientError::Other(format!("cannot start a runtime: {e}"))),
    };
    if let Err(e) = &result {
        tracing::error!("{}", e);
    }
    sh.update(|l| {
        l.ready = false;
        l.queue = None;
        l.ended = Some(result);
    });
}

/// How a session ended.
enum End {
    Stopped,
    /// The broker went away or refused something retrying may fix.
    Lost(String),
    /// Something retrying cannot fix.
    Fatal(String),
}

/// Permanent (see [`BusError::is_permanent`]: access refused, a queue declared with
/// other arguments...) or worth a reconnect, with the broker named.
fn classify(what: &str, e: &lapin::Error, url: &str) -> End {
    match refusal(e, Stage::Channel) {
        Some(reason) => End::Fatal(format!("broker {}: {what}: {reason}", redact_url(url))),
        None => End::Lost(format!("{what}: {e}")),
    }
}

fn classify_bus(e: BusError, url: &str) -> End {
    let e = e.at(url);
    if e.is_permanent() {
        End::Fatal(e.to_string())
    } else {
        End::Lost(e.to_string())
    }
}

async fn run(sh: Arc<Shared>) -> Result<(), ClientError> {
    let sem = Arc::new(Semaphore::new(sh.plan.workers.max(1)));
    let mut jobs: JoinSet<()> = JoinSet::new();
    let mut stop_rx = sh.stop.subscribe();
    let mut backoff = Backoff::default();
    let mut down_since = tokio::time::Instant::now();
    let mut attempts = 0u32;
    let result = loop {
        if *stop_rx.borrow_and_update() {
            break Ok(());
        }
        let received = sh.counters.received.load(Ordering::Relaxed);
        let limit = match sh.plan.connect_timeout {
            Some(t) => t
                .saturating_sub(down_since.elapsed())
                .clamp(Duration::from_millis(100), ATTEMPT_LIMIT),
            None => ATTEMPT_LIMIT,
        };
        let mut connected = false;
        let end = session(&sh, &sem, &mut jobs, &mut stop_rx, limit, &mut connected).await;
        if connected {
            down_since = tokio::time::Instant::now();
            attempts = 0;
        }
        match end {
            End::Stopped => break Ok(()),
            End::Fatal(e) => break Err(ClientError::Broker(e)),
            End::Lost(e) => {
                attempts += 1;
                if let Some(t) = sh.plan.connect_timeout {
                    if !connected && down_since.elapsed() >= t {
                        let e = gave_up(
                            &sh.plan.url,
                            attempts,
                            down_since.elapsed(),
                            &BusError::Other(e),
                        );
                        break Err(ClientError::Broker(e.to_string()));
                    }
                }
                sh.update(|l| {
                    l.ready = false;
                    l.queue = None;
                });
                add(&sh.counters.reconnects);
                if sh.counters.received.load(Ordering::Relaxed) > received {
                    backoff.reset();
                }
                let d = backoff.next_delay();
                tracing::warn!(
                    "monitor {}: {e}; reconnecting in {} ms",
                    sh.plan.name,
                    d.as_millis()
                );
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = stop_rx.changed() => {}
                }
            }
        }
    };
    // Callbacks still running (from a lost session, or after a fatal error) finish.
    while jobs.join_next().await.is_some() {}
    result
}

/// One connection's life; `connected` tells the caller it got that far.
async fn session(
    sh: &Arc<Shared>,
    sem: &Arc<Semaphore>,
    jobs: &mut JoinSet<()>,
    stop_rx: &mut watch::Receiver<bool>,
    limit: Duration,
    connected: &mut bool,
) -> End {
    let props = ConnectionProperties::default().with_connection_name(LongString::from(format!(
        "buildbus monitor {}",
        sh.plan.name
    )));
    let conn = match connect_once_with(&sh.plan.url, &sh.plan.tls, props, limit).await {
        Ok(c) => c,
        Err(e) if e.is_permanent() => return End::Fatal(format!("cannot connect: {e}")),
        Err(e) => return End::Lost(format!("cannot connect: {e}")),
    };
    *connected = true;
    let end = consume(sh, &conn, sem, jobs, stop_rx).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
    end
}

async fn consume(
    sh: &Arc<Shared>,
    conn: &Connection,
    sem: &Arc<Semaphore>,
    jobs: &mut JoinSet<()>,
    stop_rx: &mut watch::Receiver<bool>,
) -> End {
    let plan = &sh.plan;
    macro_rules! tryl {
        ($e:expr, $what:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return classify(&$what, &e, &plan.url),
            }
        };
    }
    let ch = tryl!(conn.create_channel().await, "open a channel");
    let topo = Topology::new(&plan.prefix);
    if let Err(e) = topo.declare_exchanges(&ch).await {
        return classify_bus(e, &plan.url);
    }
    let dlx = topo.dead_letter_exchange();
    let queue = match &plan.queue {
        Some(q) => {
            tryl!(
                queue::declare_durable(&ch, q, &plan.limits, &dlx).await,
                format!(
                    "declare queue {q} (if it exists with other arguments, delete it or \
                     keep its max_length)"
                )
            );
            let r = tryl!(
                queue::reconcile(conn, q, &plan.bindings).await,
                format!("bind queue {q}")
            );
            if !r.removed.is_empty() {
                tracing::info!(
                    "monitor {}: removed {} bindings the filters no longer want",
                    plan.name,
                    r.removed.len()
                );
                sh.counters
                    .unbound
                    .fetch_add(r.removed.len() as u64, Ordering::Relaxed);
            }
            q.clone()
        }
        None => {
            let q = tryl!(queue::declare_exclusive(&ch).await, "declare a queue");
            tryl!(
                queue::bind_all(&ch, &q, &plan.bindings).await,
                format!("bind queue {q}")
            );
            q
        }
    };
    let dl = tryl!(conn.create_channel().await, "open a channel");
    tryl!(
        dl.confirm_select(ConfirmSelectOptions::default()).await,
        "enable confirms"
    );
    tryl!(
        ch.basic_qos(plan.prefetch.max(1), BasicQosOptions::default())
            .await,
        "set prefetch"
    );
    let tag = format!("buildbus-monitor-{}-{}", plan.name, std::process::id());
    let mut consumer = tryl!(
        ch.basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await,
        format!("consume {queue}")
    );
    tracing::info!(
        "monitor {}: consuming {queue} ({} bindings)",
        plan.name,
        plan.bindings.len()
    );
    sh.update(|l| {
        l.ready = true;
        l.queue = Some(queue.clone());
    });
    let queue = Arc::new(queue);
    let mut permit: Option<OwnedSemaphorePermit> = None;
    // A stop asked for since `run` last looked is an unseen change: the first branch
    // below takes it at once.
    loop {
        tokio::select! {
            biased;
            _ = stop_rx.changed() => {
                let _ = ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                drop(permit);
                // In-flight callbacks finish and are acked on this channel.
                while jobs.join_next().await.is_some() {}
                // Channels first: lapin fails a connection close while a channel in
                // confirm mode is open.
                let _ = dl.close(200, "stopping".into()).await;
                let _ = ch.close(200, "stopping".into()).await;
                return End::Stopped;
            }
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
            p = sem.clone().acquire_owned(), if permit.is_none() => permit = p.ok(),
            d = consumer.next(), if permit.is_some() => match d {
                Some(Ok(d)) => {
                    add(&sh.counters.received);
                    let job = Job {
                        sh: sh.clone(),
                        dl: dl.clone(),
                        queue: queue.clone(),
                    };
                    jobs.spawn(job.run(d, permit.take()));
                }
                Some(Err(e)) => return classify("consume", &e, &plan.url),
                None => return End::Lost("the broker cancelled the consumer".into()),
            },
        }
    }
}

/// One delivery's journey: callbacks, retries, then ack or dead letter.
struct Job {
    sh: Arc<Shared>,
    dl: Channel,
    queue: Arc<String>,
}

/// Runs `slots` on `msg`, one after the other; gives the ones that failed.
fn run_each(sh: &Shared, msg: &Message, slots: &[Slot]) -> Vec<(Slot, Failure)> {
    let mut failed = Vec::new();
    for &slot in slots {
        match sh.callbacks.run(slot, msg) {
            Ok(()) => add(&sh.counters.callbacks),
            Err(f) => {
                match f {
                    Failure::Panic(_) => add(&sh.counters.panics),
                    Failure::Error(_) => add(&sh.counters.errors),
                }
                tracing::warn!(
                    "monitor {}: {} {f} on message {} (attempt {} of {})",
                    sh.plan.name,
                    slot.name(),
                    msg.id_for_log(),
                    msg.attempt,
                    sh.plan.retries + 1
                );
                failed.push((slot, f));
            }
        }
    }
    failed
}

/// [`run_each`] on the blocking pool; gives the message back with the failures.
async fn run_slots(
    sh: &Arc<Shared>,
    msg: Message,
    slots: Vec<Slot>,
) -> Option<(Message, Vec<(Slot, Failure)>)> {
    let sh = sh.clone();
    tokio::task::spawn_blocking(move || {
        let failed = run_each(&sh, &msg, &slots);
        (msg, failed)
    })
    .await
    .ok()
}

impl Job {
    async fn run(self, d: Delivery, permit: Option<OwnedSemaphorePermit>) {
        let _permit = permit;
        if self.sh.stopping() {
            // Not started: left unacked, the broker gets it back.
            return;
        }
        let Delivery {
            exchange,
            routing_key,
            redelivered,
            properties,
            data,
            acker,
            ..
        } = d;
        // Parse, pick the callbacks and run them the first time, off the I/O thread.
        let sh = self.sh.clone();
        let first = tokio::task::spawn_blocking(move || {
            let msg = Message::new(
                exchange.as_str().to_string(),
                routing_key.as_str().to_string(),
                redelivered,
                data,
                properties,
            );
            let slots = sh.callbacks.slots(&msg, &sh.plan.filters);
            let failed = run_each(&sh, &msg, &slots);
            (msg, slots.is_empty(), failed)
        })
        .await;
        let Ok((mut msg, none, mut failed)) = first else {
            return;
        };
        if none {
            if let Some(why) = msg.parse_error.clone() {
                add(&self.sh.counters.invalid);
                self.dead_letter(&msg, &acker, &why).await;
            } else {
                add(&self.sh.counters.filtered);
                self.ack(&msg, &acker).await;
            }
            return;
        }
        let mut stop_rx = self.sh.stop.subscribe();
        while !failed.is_empty() {
            if msg.attempt > self.sh.plan.retries {
                let why = failed
                    .iter()
                    .map(|(s, f)| format!("{} {f}", s.name()))
                    .collect::<Vec<_>>()
                    .join("; ");
                let why = format!("{why} (after {} attempts)", msg.attempt);
                self.dead_letter(&msg, &acker, &why).await;
                return;
            }
            let delay = self
                .sh
                .plan
                .retry_delay
                .saturating_mul(1 << (msg.attempt - 1).min(16))
                .min(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop_rx.changed() => {}
            }
            if self.sh.stopping() {
                tracing::warn!(
                    "monitor {}: stopping; message {} is left to the broker",
                    self.sh.plan.name,
                    msg.id_for_log()
                );
                return;
            }
            add(&self.sh.counters.retries);
            msg.attempt += 1;
            let slots = failed.iter().map(|(s, _)| *s).collect();
            match run_slots(&self.sh, msg, slots).await {
                Some((m, f)) => (msg, failed) = (m, f),
                None => return,
            }
        }
        add(&self.sh.counters.handled);
        self.ack(&msg, &acker).await;
    }

    async fn ack(&self, msg: &Message, acker: &Acker) {
        if let Err(e) = acker.ack(BasicAckOptions::default()).await {
            tracing::warn!(
                "monitor {}: ack of message {} failed ({e}); it will be delivered again",
                self.sh.plan.name,
                msg.id_for_log()
            );
        }
    }

    /// Republishes `msg` to the dead-letter exchange with the reason, confirmed, then
    /// acks it; on any failure it stays unacked and comes back.
    async fn dead_letter(&self, msg: &Message, acker: &Acker, why: &str) {
        let sh = &self.sh;
        tracing::warn!(
            "monitor {}: dead-lettering message {} ({} {}): {why}",
            sh.plan.name,
            msg.id_for_log(),
            msg.exchange,
            msg.routing_key
        );
        let mut h = msg.properties.headers().clone().unwrap_or_default();
        for (k, v) in [
            ("x-buildbus-error", why),
            ("x-buildbus-consumer", self.queue.as_str()),
            ("x-buildbus-original-exchange", msg.exchange.as_str()),
            ("x-buildbus-original-routing-key", msg.routing_key.as_str()),
        ] {
            h.insert(
                ShortString::from(k),
                AMQPValue::LongString(LongString::from(v)),
            );
        }
        let props = msg.properties.clone().with_headers(h);
        let dlx = Topology::new(&sh.plan.prefix).dead_letter_exchange();
        let sent = async {
            self.dl
                .basic_publish(
                    dlx.as_str().into(),
                    msg.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &msg.body,
                    props,
                )
                .await?
                .await
        }
        .await;
        match sent {
            Ok(c) if c.is_ack() => {
                add(&sh.counters.dead_lettered);
                self.ack(msg, acker).await;
            }
            Ok(_) => tracing::warn!(
                "monitor {}: the broker refused the dead letter of {}; it stays queued",
                sh.plan.name,
                msg.id_for_log()
            ),
            Err(e) => tracing::warn!(
                "monitor {}: dead-lettering {} failed ({e}); it stays queued",
                sh.plan.name,
                msg.id_for_log()
            ),
        }
    }
}
