//! The DSI worker pool: consumers of the shared durable queue that batch, store, and
//! ack only after the store committed.
//!
//! Each worker has its own connection and channel (prefetch `P`), and its own store
//! connection on a plain thread (store drivers are blocking). A worker collects up to
//! `B` deliveries or waits at most `T` ms after the first, checks each one
//! ([`validate`](super::validate)), writes the good ones in one transaction and then
//! acks them; poison goes to the dead-letter exchange with an `x-buildbus-error` header
//! naming the reason (published with a confirm, then the original is acked). When the
//! store fails, the batch is retried with backoff, then message by message, and a
//! message that keeps failing on its own is dead-lettered too, so one bad row never
//! blocks the queue. A broker drop means reconnecting; unacked deliveries come back
//! (maybe to another worker) and are deduplicated by `message_id` in the store. A
//! refusal that retrying cannot fix (wrong password, missing vhost, refused permission)
//! stops the pool with an error, and so does `connect_timeout` without a connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ConnectionProperties};
use tokio::sync::oneshot;

use super::validate::Validators;
use crate::bus::connect::{connect_once_with, gave_up, Backoff, ATTEMPT_LIMIT};
use crate::bus::topology::{Topology, DSI_QUEUE};
use crate::bus::BrokerTls;
use crate::bus::BusError;
use crate::model::Envelope;
use crate::stores::{self as store, Store, StoreError, WriteStats};

/// The pool's settings.
#[derive(Debug, Clone)]
pub struct DsiConfig {
    pub url: String,
    /// TLS of an `amqps` URL (trusted CAs, client certificate).
    pub tls: BrokerTls,
    pub exchange_prefix: String,
    pub store_url: String,
    pub workers: usize,
    pub prefetch: u16,
    pub batch: usize,
    pub batch_wait: Duration,
    /// Give up after transient broker faults (connection refused, a restart) lasting
    /// this long with no connection (`None`: keep trying). Permanent refusals (wrong
    /// password, missing vhost, refused permission) stop the pool at once anyway.
    pub connect_timeout: Option<Duration>,
}

/// Counters shared by the workers of one pool.
#[derive(Debug, Default)]
pub struct DsiStats {
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub batches: AtomicU64,
    pub reconnects: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum DsiError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("store {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error("{0}")]
    Other(String),
}

impl DsiError {
    /// True when retrying cannot fix it (see [`BusError::is_permanent`]).
    pub fn is_permanent(&self) -> bool {
        matches!(self, DsiError::Bus(b) if b.is_permanent())
    }
}

type Job = (
    Vec<Envelope>,
    oneshot::Sender<Result<WriteStats, StoreError>>,
);

/// Why a write did not happen: the store said no, or its thread is gone.
#[derive(Debug)]
enum WriteFail {
    Store(StoreError),
    Gone,
}

/// A store on its own thread; jobs go in over a channel.
struct StoreThread {
    tx: std_mpsc::Sender<Job>,
}

impl StoreThread {
    fn start(url: &str) -> Result<StoreThread, DsiError> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<(), StoreError>>();
        let url_owned = url.to_string();
        std::thread::Builder::new()
            .name("dsi-store".into())
            .spawn(move || {
                let mut st: Box<dyn Store> = match store::open(&url_owned) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for (batch, reply) in rx {
                    let _ = reply.send(st.write_batch(&batch));
                }
            })
            .map_err(|e| DsiError::Other(format!("cannot start a store thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(StoreThread { tx }),
            Ok(Err(source)) => Err(DsiError::Store {
                url: url.to_string(),
                source: Box::new(source),
            }),
            Err(_) => Err(DsiError::Other("the store thread died".into())),
        }
    }

    async fn write(&self, batch: Vec<Envelope>) -> Result<WriteStats, WriteFail> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send((batch, reply)).is_err() {
            return Err(WriteFail::Gone);
        }
        match rx.await {
            Ok(r) => r.map_err(WriteFail::Store),
            Err(_) => Err(WriteFail::Gone),
        }
    }
}

struct Worker {
    id: usize,
    cfg: DsiConfig,
    store: StoreThread,
    validators: Arc<Validators>,
    stats: Arc<DsiStats>,
    stop: Arc<AtomicBool>,
}

fn header_table(d: &Delivery, reason: &str, worker: &str) -> FieldTable {
    let mut h = d.properties.headers().clone().unwrap_or_default();
    h.insert(
        ShortString::from("x-buildbus-error"),
        AMQPValue::LongString(LongString::from(reason)),
    );
    h.insert(
        ShortString::from("x-buildbus-worker"),
        AMQPValue::LongString(LongString::from(worker)),
    );
    h.insert(
        ShortString::from("x-buildbus-original-exchange"),
        AMQPValue::LongString(LongString::from(d.exchange.as_str())),
    );
    h.insert(
        ShortString::from("x-buildbus-original-routing-key"),
        AMQPValue::LongString(LongString::from(d.routing_key.as_str())),
    );
    h
}

impl Worker {
    fn name(&self) -> String {
        format!("dsi-{}-{}", std::process::id(), self.id)
    }

    /// Runs until `stop`: connect, consume, store; reconnect on transient broker
    /// trouble. A permanent refusal, or no connection for longer than the connect
    /// timeout, ends it with an error (and stops the other workers).
    async fn run(self) -> Result<(), DsiError> {
        let mut backoff = Backoff::default();
        let mut down_since = tokio::time::Instant::now();
        let mut attempts = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            let limit = match self.cfg.connect_timeout {
                Some(t) => t
                    .saturating_sub(down_since.elapsed())
                    .clamp(Duration::from_millis(100), ATTEMPT_LIMIT),
                None => ATTEMPT_LIMIT,
            };
            let mut connected = false;
            let result = self
                .session(limit, &mut connected)
                .await
                .map_err(|e| match e {
                    DsiError::Bus(b) => DsiError::Bus(b.at(&self.cfg.url)),
                    e => e,
                });
            if connected {
                down_since = tokio::time::Instant::now();
                attempts = 0;
            }
            let e = match result {
                Ok(()) => break,
                Err(e) if e.is_permanent() => {
                    self.stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                Err(e) => e,
            };
            attempts += 1;
            if let Some(t) = self.cfg.connect_timeout {
                if !connected && down_since.elapsed() >= t {
                    self.stop.store(true, Ordering::Relaxed);
                    let last = match e {
                        DsiError::Bus(b) => b,
                        e => BusError::Other(e.to_string()),
                    };
                    return Err(
                        gave_up(&self.cfg.url, attempts, down_since.elapsed(), &last).into(),
                    );
                }
            }
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            let d = backoff.next_delay();
            tracing::warn!(
                "worker {}: {e}; reconnecting in {} ms",
                self.id,
                d.as_millis()
            );
            tokio::time::sleep(d).await;
        }
        Ok(())
    }

    /// One connection's life; `connected` tells the caller it got that far.
    async fn session(&self, limit: Duration, connected: &mut bool) -> Result<(), DsiError> {
        let conn = connect_once_with(
            &self.cfg.url,
            &self.cfg.tls,
            ConnectionProperties::default(),
            limit,
        )
        .await?;
        *connected = true;
        let ch = conn
            .create_channel()
            .await
            .map_err(BusError::amqp("open channel"))?;
        let topo = Topology::new(&self.cfg.exchange_prefix);
        topo.declare_all(&ch).await?;
        // Dead letters are published on their own channel, with confirms.
        let dl = conn
            .create_channel()
            .await
            .map_err(BusError::amqp("open channel"))?;
        dl.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BusError::amqp("enable confirms"))?;
        ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(BusError::amqp("set prefetch"))?;
        let mut consumer = ch
            .basic_consume(
                DSI_QUEUE.into(),
                self.name().as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BusError::amqp(format!("consume {DSI_QUEUE}")))?;
        tracing::info!("worker {} consuming {DSI_QUEUE}", self.id);
        loop {
            // The first delivery of a batch: wait for it, looking at `stop` now and then.
            let first = loop {
                if self.stop.load(Ordering::Relaxed) {
                    let _ = conn.close(200, "stopping".into()).await;
                    return Ok(());
                }
                match tokio::time::timeout(Duration::from_millis(200), consumer.next()).await {
                    Err(_) => continue,
                    Ok(None) => {
                        return Err(DsiError::Other("the broker ended the consumer".into()))
                    }
                    Ok(Some(Err(e))) => return Err(BusError::amqp("consume")(e).into()),
                    Ok(Some(Ok(d))) => break d,
                }
            };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + self.cfg.batch_wait;
            while batch.len() < self.cfg.batch.max(1) {
                match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(Ok(d))) => batch.push(d),
                    Ok(Some(Err(e))) => return Err(BusError::amqp("consume")(e).into()),
                    Ok(None) => {
                        return Err(DsiError::Other("the broker ended the consumer".into()))
                    }
                    Err(_) => break,
                }
            }
            self.handle(&dl, batch).await?;
        }
    }

    /// Stores one batch and acks it; dead-letters poison.
    async fn handle(&self, dl: &Channel, batch: Vec<Delivery>) -> Result<(), DsiError> {
        let mut good: Vec<(Delivery, Envelope)> = Vec::with_capacity(batch.len());
        for d in batch {
            match self.validators.check(&d.data) {
                Ok(env) => good.push((d, env)),
                Err(reason) => self.dead_letter(dl, &d, &reason).await?,
            }
        }
        if good.is_empty() {
            return Ok(());
        }
        let mut backoff = Backoff::default();
        let mut failures = 0;
        while !good.is_empty() {
            let envs: Vec<Envelope> = good.iter().map(|(_, e)| e.clone()).collect();
            match self.store.write(envs).await {
                Ok(stats) => {
                    self.count(&stats);
                    // Deliveries on a channel are handled in order, so everything before
                    // the batch's last delivery is already settled: one multiple ack.
                    if let Some((last, _)) = good.last() {
                        last.acker
                            .ack(BasicAckOptions { multiple: true })
                            .await
                            .map_err(BusError::amqp("ack"))?;
                    }
                    return Ok(());
                }
                Err(WriteFail::Gone) => {
                    return Err(DsiError::Other("the store thread died".into()))
                }
                Err(WriteFail::Store(e)) => {
                    // One message the store cannot take: dead-letter it, store the rest.
                    if let Some(id) = e.rejected_message().map(str::to_string) {
                        if let Some(i) = good.iter().position(|(_, env)| env.meta.message_id == id)
                        {
                            let (d, _) = good.remove(i);
                            self.dead_letter(dl, &d, &format!("store refused it: {e}"))
                                .await?;
                            continue;
                        }
                    }
                    failures += 1;
                    tracing::warn!(
                        "worker {}: storing a batch of {} failed (try {failures}): {e}",
                        self.id,
                        good.len()
                    );
                    if !e.is_transient() && good.len() > 1 {
                        // Find the culprit one message at a time.
                        return self.one_by_one(dl, good).await;
                    }
                    if failures >= 8 {
                        // Give the messages back (unacked) and reconnect: maybe another
                        // worker, or this one later, can store them.
                        return Err(DsiError::Store {
                            url: self.cfg.store_url.clone(),
                            source: Box::new(e),
                        });
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        Ok(())
    }

    async fn one_by_one(
        &self,
        dl: &Channel,
        good: Vec<(Delivery, Envelope)>,
    ) -> Result<(), DsiError> {
        for (d, env) in good {
            match self.store.write(vec![env]).await {
                Ok(stats) => {
                    self.count(&stats);
                    ack(&d).await?;
                }
                Err(WriteFail::Gone) => {
                    return Err(DsiError::Other("the store thread died".into()))
                }
                Err(WriteFail::Store(e)) if e.is_transient() => {
                    return Err(DsiError::Store {
                        url: self.cfg.store_url.clone(),
                        source: Box::new(e),
                    })
                }
                Err(WriteFail::Store(e)) => {
                    self.dead_letter(dl, &d, &format!("store refused it: {e}"))
                        .await?
                }
            }
        }
        Ok(())
    }

    fn count(&self, s: &WriteStats) {
        self.stats
            .stored
            .fetch_add(s.new_messages, Ordering::Relaxed);
        self.stats
            .duplicates
            .fetch_add(s.duplicates, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
    }

    async fn dead_letter(&self, dl: &Channel, d: &Delivery, reason: &str) -> Result<(), DsiError> {
        tracing::warn!(
            "worker {}: dead-lettering a message from {} ({}): {reason}",
            self.id,
            d.exchange,
            d.routing_key
        );
        let props = d
            .properties
            .clone()
            .with_headers(header_table(d, reason, &self.name()));
        let topo = Topology::new(&self.cfg.exchange_prefix);
        let confirm = dl
            .basic_publish(
                topo.dead_letter_exchange().as_str().into(),
                d.routing_key.clone(),
                BasicPublishOptions::default(),
                &d.data,
                props,
            )
            .await
            .map_err(BusError::amqp("dead-letter"))?
            .await
            .map_err(BusError::amqp("dead-letter confirm"))?;
        if !confirm.is_ack() {
            return Err(DsiError::Other("the broker refused a dead letter".into()));
        }
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        ack(d).await
    }
}

async fn ack(d: &Delivery) -> Result<(), DsiError> {
    d.ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(|e| BusError::amqp("ack")(e).into())
}

/// Runs the pool until `stop` is set (or a worker meets a refusal that retrying cannot
/// fix, or runs out of its connect timeout: then every worker stops and that error
/// comes back).
pub async fn run_pool(
    cfg: DsiConfig,
    stop: Arc<AtomicBool>,
    stats: Arc<DsiStats>,
) -> Result<(), DsiError> {
    let validators = Arc::new(Validators::new().map_err(DsiError::Other)?);
    let mut handles = Vec::new();
    for id in 0..cfg.workers.max(1) {
        let w = Worker {
            id,
            store: StoreThread::start(&cfg.store_url)?,
            cfg: cfg.clone(),
            validators: validators.clone(),
            stats: stats.clone(),
            stop: stop.clone(),
        };
        handles.push(tokio::spawn(w.run()));
    }
    let mut first: Option<DsiError> = None;
    for h in handles {
        let r = match h.await {
            Ok(r) => r,
            Err(e) => Err(DsiError::Other(format!("a worker died: {e}"))),
        };
        if let Err(e) = r {
            stop.store(true, Ordering::Relaxed);
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}
