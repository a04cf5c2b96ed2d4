//! The confirmed publisher.
//!
//! A message counts as published only when the broker has acked it. The publisher keeps
//! every message from `basic.publish` until its confirm, in publish order, in a bounded
//! in-flight window: when the window is full, [`Publisher::publish`] waits for the
//! oldest confirm, so whoever feeds it (a file reader, a gRPC stream) is paused and
//! memory stays bounded. When the connection drops, or the broker nacks, the publisher
//! reconnects with backoff, declares the topology again and resends every unconfirmed
//! message in order. A resend may duplicate a message the broker had stored before the
//! drop; ids are deterministic and storage is idempotent, so that is harmless. A refusal
//! that retrying cannot fix (wrong password, missing vhost, refused permission) ends it
//! with an error instead, and so do transient faults past `connect_deadline`.
//!
//! Each message carries an opaque `token` (a file offset, a sequence number); the
//! publisher hands tokens back in publish order as their messages are confirmed, which
//! is what checkpoints and BES acks are built on.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::FutureExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};

use super::connect::{connect, Backoff};
use super::message::Outgoing;
use super::tls::BrokerTls;
use super::topology::Topology;
use super::{redact_url, refusal, BusError, Stage};

/// Publisher settings.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub url: String,
    /// TLS of an `amqps` URL (trusted CAs, client certificate).
    pub tls: BrokerTls,
    pub topology: Topology,
    /// Unconfirmed messages allowed at once.
    pub window: usize,
    /// Give up connecting after transient faults for this long (`None`: keep trying).
    /// Permanent refusals (see [`BusError::is_permanent`]) end it at once anyway.
    pub connect_deadline: Option<Duration>,
    /// Declare the DSI queue as well as the exchanges (so nothing published before a
    /// DSI worker ever ran is dropped for lack of a queue).
    pub declare_dsi_queue: bool,
}

impl PublisherConfig {
    pub fn new(url: &str, prefix: &str) -> PublisherConfig {
        PublisherConfig {
            url: url.to_string(),
            tls: BrokerTls::default(),
            topology: Topology::new(prefix),
            window: 512,
            connect_deadline: None,
            declare_dsi_queue: true,
        }
    }
}

/// Counters of one publisher's life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishStats {
    /// Messages the broker confirmed.
    pub confirmed: u64,
    /// Messages sent again after a drop or a nack.
    pub resent: u64,
    pub reconnects: u64,
    pub nacks: u64,
}

struct InFlight<T> {
    msg: Outgoing,
    token: T,
    confirm: Option<PublisherConfirm>,
}

/// See the module documentation.
pub struct Publisher<T> {
    cfg: PublisherConfig,
    conn: Option<Connection>,
    channel: Option<Channel>,
    inflight: VecDeque<InFlight<T>>,
    stats: PublishStats,
}

impl<T: Clone> Publisher<T> {
    /// Connects (retrying with backoff up to the configured deadline), declares the
    /// topology and turns on confirms.
    pub async fn connect(cfg: PublisherConfig) -> Result<Publisher<T>, BusError> {
        let mut p = Publisher {
            cfg,
            conn: None,
            channel: None,
            inflight: VecDeque::new(),
            stats: PublishStats::default(),
        };
        p.open().await?;
        Ok(p)
    }

    /// Where this publisher's messages go (the key of file checkpoints).
    pub fn destination(&self) -> super::Destination {
        super::Destination::of(&self.cfg.url, &self.cfg.topology.prefix)
    }

    pub fn stats(&self) -> &PublishStats {
        &self.stats
    }

    /// Messages sent but not yet confirmed.
    pub fn unconfirmed(&self) -> usize {
        self.inflight.len()
    }

    /// Connects, declares and turns on confirms; a permanent refusal names the broker.
    async fn open(&mut self) -> Result<(), BusError> {
        let url = self.cfg.url.clone();
        self.open_inner().await.map_err(|e| e.at(&url))
    }

    async fn open_inner(&mut self) -> Result<(), BusError> {
        let conn = connect(&self.cfg.url, &self.cfg.tls, self.cfg.connect_deadline).await?;
        let ch = conn
            .create_channel()
            .await
            .map_err(BusError::amqp("open channel"))?;
        if self.cfg.declare_dsi_queue {
            self.cfg.topology.declare_all(&ch).await?;
        } else {
            self.cfg.topology.declare_exchanges(&ch).await?;
        }
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BusError::amqp("enable publisher confirms"))?;
        self.conn = Some(conn);
        self.channel = Some(ch);
        Ok(())
    }

    async fn send(ch: &Channel, msg: &Outgoing) -> Result<PublisherConfirm, lapin::Error> {
        ch.basic_publish(
            msg.exchange.as_str().into(),
            msg.routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &msg.body,
            msg.properties.clone(),
        )
        .await
    }

    /// Drops the connection, reconnects with backoff and resends everything unconfirmed.
    async fn recover(&mut self, why: &str) -> Result<(), BusError> {
        tracing::warn!(
            "{why}; reconnecting, {} unconfirmed messages will be resent",
            self.inflight.len()
        );
        self.channel = None;
        if let Some(c) = self.conn.take() {
            let _ = c.close(0, "reconnecting".into()).await;
        }
        let mut backoff = Backoff::default();
        let start = tokio::time::Instant::now();
        'retry: loop {
            if let Err(e) = self.open().await {
                // Refusals end it at once; transient faults until the deadline (if any).
                if e.is_permanent()
                    || self
                        .cfg
                        .connect_deadline
                        .is_some_and(|d| start.elapsed() >= d)
                {
                    return Err(e);
                }
                let delay = backoff.next_delay();
                tracing::warn!("{e}; retrying in {} ms", delay.as_millis());
                tokio::time::sleep(delay).await;
                continue;
            }
            self.stats.reconnects += 1;
            let Some(ch) = self.channel.clone() else {
                continue;
            };
            for f in self.inflight.iter_mut() {
                match Self::send(&ch, &f.msg).await {
                    Ok(c) => {
                        f.confirm = Some(c);
                        self.stats.resent += 1;
                    }
                    Err(e) => {
                        tracing::warn!("resend failed: {e}");
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue 'retry;
                    }
                }
            }
            tracing::info!("reconnected; resent {} messages", self.inflight.len());
            return Ok(());
        }
    }

    /// An error retrying cannot fix (say the user may not write to the exchange) as
    /// a [`BusError::Refused`] naming the broker; `Ok` for the rest.
    fn refused(&self, what: &str, e: &lapin::Error) -> Result<(), BusError> {
        match refusal(e, Stage::Channel) {
            Some(reason) => Err(BusError::Refused {
                url: redact_url(&self.cfg.url),
                reason: format!("{what}: {reason}"),
            }),
            None => Ok(()),
        }
    }

    /// Collects tokens of messages whose confirms already arrived, without waiting.
    fn confirmed_now(&mut self, done: &mut Vec<T>) {
        while let Some(front) = self.inflight.front_mut() {
            let Some(c) = front.confirm.as_mut() else {
                return;
            };
            match c.now_or_never() {
                Some(Ok(Confirmation::Ack(_))) | Some(Ok(Confirmation::NotRequested)) => {
                    self.stats.confirmed += 1;
                    if let Some(f) = self.inflight.pop_front() {
                        done.push(f.token);
                    }
                }
                // A nack or an error: leave it for `confirmed`, which recovers.
                Some(_) => {
                    front.confirm = None;
                    return;
                }
                None => return,
            }
        }
    }

    /// Publishes one message. Returns the tokens of the messages confirmed meanwhile,
    /// oldest first (maybe none; the caller gets the rest from later calls or [`flush`]).
    ///
    /// [`flush`]: Publisher::flush
    pub async fn publish(&mut self, msg: Outgoing, token: T) -> Result<Vec<T>, BusError> {
        let mut done = Vec::new();
        self.confirmed_now(&mut done);
        while self.inflight.len() >= self.cfg.window.max(1) {
            done.extend(self.confirmed().await?);
        }
        loop {
            let ch = match &self.channel {
                Some(ch) => ch.clone(),
                None => {
                    self.recover("no channel").await?;
                    continue;
                }
            };
            match Self::send(&ch, &msg).await {
                Ok(c) => {
                    self.inflight.push_back(InFlight {
                        msg,
                        token,
                        confirm: Some(c),
                    });
                    return Ok(done);
                }
                Err(e) => {
                    self.refused("publish", &e)?;
                    self.recover(&format!("publish failed: {e}")).await?
                }
            }
        }
    }

    /// Waits until at least one more message is settled and returns the tokens of all
    /// messages confirmed by then, oldest first (empty when nothing is in flight).
    ///
    /// Cancel-safe between settlements: dropping the future while it waits loses
    /// nothing, so a live source can `select!` on it beside its input.
    pub async fn confirmed(&mut self) -> Result<Vec<T>, BusError> {
        let mut done = Vec::new();
        self.confirmed_now(&mut done);
        if !done.is_empty() || self.inflight.is_empty() {
            return Ok(done);
        }
        let settled = match self.inflight.front_mut().and_then(|f| f.confirm.as_mut()) {
            // Awaited in place: cancelling here leaves the confirm where it was.
            Some(c) => Some(c.await),
            None => None,
        };
        match settled {
            Some(Ok(Confirmation::Ack(_))) | Some(Ok(Confirmation::NotRequested)) => {
                self.stats.confirmed += 1;
                if let Some(f) = self.inflight.pop_front() {
                    done.push(f.token);
                }
                self.confirmed_now(&mut done);
                Ok(done)
            }
            Some(Ok(Confirmation::Nack(_))) => {
                self.stats.nacks += 1;
                self.forget_front_confirm();
                self.recover("the broker nacked a message").await?;
                Ok(done)
            }
            Some(Err(e)) => {
                self.forget_front_confirm();
                self.refused("publish", &e)?;
                self.recover(&format!("confirm failed: {e}")).await?;
                Ok(done)
            }
            None => {
                self.recover("a confirm was lost").await?;
                Ok(done)
            }
        }
    }

    /// A settled confirm is never polled again (if recovery is cancelled, the next
    /// call sees no confirm and recovers again).
    fn forget_front_confirm(&mut self) {
        if let Some(f) = self.inflight.front_mut() {
            f.confirm = None;
        }
    }

    /// Waits until every message sent is confirmed; returns their tokens in order.
    pub async fn flush(&mut self) -> Result<Vec<T>, BusError> {
        let mut done = Vec::new();
        while !self.inflight.is_empty() {
            done.extend(self.confirmed().await?);
        }
        Ok(done)
    }

    /// Flushes and closes the connection.
    pub async fn close(mut self) -> Result<(Vec<T>, PublishStats), BusError> {
        let done = self.flush().await?;
        if let Some(c) = self.conn.take() {
            let _ = c.close(200, "bye".into()).await;
        }
        Ok((done, self.stats.clone()))
    }
}
