//! The client library: filtered subscriptions to the bus with callbacks, Pulse's
//! `pulsebuildmonitor` done right.
//!
//! A [`MonitorBuilder`] takes the AMQP URL, an optional `label`, filters (`trees`,
//! `platforms`, `buildtypes`, `products`, `tests`, `build_tags`, `kinds`) and callbacks;
//! [`start`](MonitorBuilder::start) returns at once with a [`Monitor`] handle while
//! the monitor connects, declares its queue, binds it and consumes on its own thread.
//!
//! ```no_run
//! use std::time::Duration;
//! use buildbus::consumers::client::MonitorBuilder;
//!
//! let monitor = MonitorBuilder::new("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .label("my-dashboard")
//!     .trees(["acme"])
//!     .platforms(["k8", "linux64"])
//!     .on_build(|_msg, build| {
//!         println!("{} {:?} on {:?}", build.common.build_id, build.result, build.common.platform);
//!     })
//!     .on_test(|_msg, test| {
//!         if test.status != "passed" {
//!             println!("{}: {}", test.test, test.status);
//!         }
//!     })
//!     .start()?;
//! // Pulse's join loop: wake up now and then (to notice Ctrl-C, say) until it ends.
//! while !monitor.join(Duration::from_secs(1)) {}
//! monitor.stop()?;
//! # Ok::<(), buildbus::consumers::client::ClientError>(())
//! ```
//!
//! # What the callbacks get
//!
//! | callback | gets |
//! |---|---|
//! | `on_build` | finished builds (`state` = `finished`) that pass the filters |
//! | `on_test` | test summaries (`scope` = `summary`) that pass the filters |
//! | `on_task`, `on_artifact`, `on_log` | every message of the kind that passes the filters |
//! | `on_match` | every message of any (wanted) kind that passes the filters, as an [`Envelope`] |
//! | `on_message` | **every** message on the bus, unfiltered, raw (even a body that is not an envelope) |
//!
//! Every callback but `on_message` only ever sees messages that satisfy every filter:
//! whatever the bindings let through is checked again on the client. `on_message` is
//! Pulse's raw `pulseCallback`: because it wants everything, a monitor that has it binds
//! `#` on all five exchanges, so the broker filters nothing for that monitor (the other
//! callbacks are still filtered, on the client). Leave it out to keep the filtering on
//! the broker; `on_match` is the filtered raw callback.
//!
//! A message for several callbacks runs them one after the other, on one worker:
//! `on_message`, the typed one, then `on_match`.
//!
//! # Filters on the broker
//!
//! The filters become bindings on the fixed-position routing keys (see
//! [`bindings`] for the algorithm and its limits), so messages nobody asked for never
//! reach the client. [`MonitorBuilder::bindings`] shows them without connecting:
//!
//! ```
//! use buildbus::consumers::client::MonitorBuilder;
//!
//! let b = MonitorBuilder::new("amqp://127.0.0.1")
//!     .trees(["acme"])
//!     .platforms(["k8"])
//!     .on_build(|_m, _b| {})
//!     .bindings()
//!     .unwrap();
//! assert_eq!(b.len(), 1);
//! assert_eq!(b[0].exchange, "exchange/buildbus/v1/build");
//! assert_eq!(b[0].routing_key, "acme.k8.*.*.*.finished.#");
//! ```
//!
//! # Queues, delivery and failures
//!
//! - With a `label`, the queue is durable, `queue/<user>/<label>`: it keeps messages
//!   while the monitor is down (up to `max_length`, then the oldest are dead-lettered),
//!   and the monitor picks them up when it returns. Several processes with one label
//!   share the work. Without a label, the queue is exclusive and goes away with the
//!   monitor (see [`queue`]).
//! - Callbacks run on a pool of `workers` threads (1 by default, so callbacks see the
//!   queue's order), never on the connection's I/O thread. A message is acked after
//!   its callbacks returned; a callback that panics or returns `Err` is logged with the
//!   message id, counted ([`Stats`]), retried `retries` times (after `retry_delay`,
//!   doubling), then the message is dead-lettered with an `x-buildbus-error` header.
//! - Delivery is at least once: after a reconnect, a message whose callback ran but
//!   whose ack was lost comes again (`Message::redelivered`); deduplicate on the
//!   message id if it matters.
//! - The monitor reconnects after a broker restart (backoff up to 5 s) and goes on;
//!   a labelled queue lost nothing meanwhile. A refusal that retrying cannot fix (wrong
//!   password, missing vhost, refused permission) ends it at once with
//!   [`ClientError::Broker`]; so does [`MonitorBuilder::connect_timeout`] passing
//!   without a connection.

pub mod bindings;
pub mod callback;
pub mod filter;
pub mod queue;
mod run;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use bindings::{Binding, DEFAULT_MAX_BINDINGS};
pub use callback::{BoxError, CallbackResult, Message};
pub use filter::Filters;
pub use queue::DEFAULT_MAX_LENGTH;

use crate::bus::BrokerTls;
use crate::model::{
    ArtifactPayload, BuildPayload, Envelope, Kind, LogPayload, TaskPayload, TestPayload,
    DEFAULT_EXCHANGE_PREFIX,
};
use bindings::Want;
use callback::Callbacks;
use queue::QueueLimits;
use run::{Plan, Shared};

/// Why a monitor could not start, or why it ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The builder's settings do not make sense.
    #[error("monitor settings: {0}")]
    Config(String),
    /// The broker refused something that retrying cannot fix.
    #[error("monitor: {0}")]
    Broker(String),
    #[error("monitor: {0}")]
    Other(String),
}

/// What a monitor has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Deliveries taken from the queue.
    pub received: u64,
    /// Messages acked after all their callbacks returned.
    pub handled: u64,
    /// Messages acked without a callback: they failed the client-side filters (the
    /// bindings were wider), or no callback takes them (a started build with only
    /// `on_build`, a test attempt with only `on_test`).
    pub filtered: u64,
    /// Bodies that are not envelopes (dead-lettered unless `on_message` took them).
    pub invalid: u64,
    /// Callback runs that returned normally.
    pub callbacks: u64,
    /// Callback runs that returned `Err`.
    pub errors: u64,
    /// Callback runs that panicked.
    pub panics: u64,
    /// Callback runs that were retries.
    pub retries: u64,
    /// Messages republished to the dead-letter exchange.
    pub dead_lettered: u64,
    /// Sessions lost and started again.
    pub reconnects: u64,
    /// Stale bindings removed from a labelled queue.
    pub bindings_removed: u64,
}

/// Builds a [`Monitor`]; see the [module documentation](self).
#[must_use = "a builder does nothing until start()"]
pub struct MonitorBuilder {
    url: String,
    tls: BrokerTls,
    label: Option<String>,
    prefix: String,
    filters: Filters,
    callbacks: Callbacks,
    workers: usize,
    prefetch: u16,
    retries: u32,
    retry_delay: Duration,
    connect_timeout: Option<Duration>,
    limits: QueueLimits,
    max_bindings: usize,
    problems: Vec<String>,
}

fn strings<I, S>(v: I) -> impl Iterator<Item = String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    v.into_iter().map(Into::into)
}

impl MonitorBuilder {
    /// A monitor of the broker at `url` (`amqp://user:password@host:port/vhost`).
    pub fn new(url: impl Into<String>) -> MonitorBuilder {
        MonitorBuilder {
            url: url.into(),
            tls: BrokerTls::default(),
            label: None,
            prefix: DEFAULT_EXCHANGE_PREFIX.to_string(),
            filters: Filters::default(),
            callbacks: Callbacks::default(),
            workers: 1,
            prefetch: 100,
            retries: 3,
            retry_delay: Duration::from_millis(200),
            connect_timeout: None,
            limits: QueueLimits {
                max_length: DEFAULT_MAX_LENGTH,
                max_length_bytes: None,
            },
            max_bindings: DEFAULT_MAX_BINDINGS,
            problems: Vec::new(),
        }
    }

    /// A durable subscription: queue `queue/<user>/<label>`, kept while the monitor is
    /// down. Labels are 1 to 100 letters, digits or `-_.:@+`.
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The exchange prefix (default `exchange/buildbus/v1`).
    pub fn exchange_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().trim_end_matches('/').to_string();
        self
    }

    /// Only these trees (added to earlier calls).
    pub fn trees<I: IntoIterator<Item = S>, S: Into<String>>(mut self, v: I) -> Self {
        self.filters.trees.extend(strings(v));
        self
    }

    /// Only these platforms.
    pub fn platforms<I: IntoIterator<Item = S>, S: Into<String>>(mut self, v: I) -> Self {
        self.filters.platforms.extend(strings(v));
        self
    }

    /// Only these build types.
    pub fn buildtypes<I: IntoIterator<Item = S>, S: Into<String>>(mut self, v: I) -> Self {
        self.filters.buildtypes.extend(strings(v));
        self
    }

    /// Only these products.
    pub fn products<I: IntoIterator<Item = S>, S: Into<String>>(mut self, v: I) -> Self {
        self.filters.products.extend(strings(v));
        self
    }

    /// Only these tests (test messages; other kinds have no test and are not narrowed).
    pub fn tests<I: IntoIterator<Item = S>, S: Into<String>>(mut self, v: I) -> Self {
        self.filters.tests.extend(strings(v));
        self
    }

    /// Only messages carrying *all* of these tags. Call it again for an alternative:
    /// `.build_tags(["nightly", "asan"]).build_tags(["release"])` is
    /// `(nightly AND asan) OR release`. Tags are not in the routing keys: this filter
    /// is checked on the client only.
    ///
    /// ```
    /// use buildbus::consumers::client::MonitorBuilder;
    ///
    /// let b = MonitorBuilder::new("amqp://127.0.0.1")
    ///     .build_tags(["nightly", "asan"])
    ///     .build_tags(["release"])
    ///     .on_log(|_msg, log| println!("{}", log.message));
    /// assert!(b.filters().tags_match(&["asan".into(), "nightly".into()]));
    /// assert!(b.filters().tags_match(&["release".into()]));
    /// assert!(!b.filters().tags_match(&["nightly".into()]));
    /// // Nothing on the keys to narrow: the log exchange is bound with `#`.
    /// assert_eq!(b.bindings().unwrap()[0].routing_key, "#");
    /// ```
    pub fn build_tags<I: IntoIterator<Item = S>, S: Into<String>>(mut self, all_of: I) -> Self {
        let set: BTreeSet<String> = strings(all_of).collect();
        if set.is_empty() {
            self.problems
                .push("build_tags: an empty set would match every message; leave it out".into());
        }
        self.filters.build_tags.push(set);
        self
    }

    /// Only these kinds (for `on_match`; a typed callback of another kind is an error).
    pub fn kinds<I: IntoIterator<Item = Kind>>(mut self, kinds: I) -> Self {
        self.filters.kinds.extend(kinds);
        self
    }

    /// Finished builds that pass the filters.
    pub fn on_build<F, R>(mut self, f: F) -> Self
    where
        F: Fn(&Message, &BuildPayload) -> R + Send + Sync + 'static,
        R: CallbackResult,
    {
        self.callbacks.build = Some(callback::typed(f));
        self
    }

    /// Test summaries that pass the filters.
    pub fn on_test<F, R>(mut self, f: F) -> Self
    where
        F: Fn(&Message, &TestPayload) -> R + Send + Sync + 'static,
        R: CallbackResult,
    {
        self.callbacks.test = Some(callback::typed(f));
        self
    }

    /// Tasks that pass the filters.
    pub fn on_task<F, R>(mut self, f: F) -> Self
    where
        F: Fn(&Message, &TaskPayload) -> R + Send + Sync + 'static,
        R: CallbackResult,
    {
        self.callbacks.task = Some(callback::typed(f));
        self
    }

    /// Artifacts that pass the filters.
    pub fn on_artifact<F, R>(mut self, f: F) -> Self
    where
        F: Fn(&Message, &ArtifactPayload) -> R + Send + Sync + 'static,
        R: CallbackResult,
    {
        self.callbacks.artifact = Some(callback::typed(f));
        self
    }

    /// Log records that pass the filters.
    pub fn on_log<F, R>(mut self, f: F) -> Self
    where
        F: Fn(&Message, &LogPayload) -> R + Send + Sync + 'static,
        R: CallbackResult,
    {
        self.callbacks.log = Some(callback::typed(f));
        self
    }

    /// Every message of any wanted kind that passes the filters (started builds and
    /// test attempts included), as an envelope.
    pub fn on_match<F, R>(mut self, f: F) -> Self
    where
        F: Fn(&Message, &Envelope) -> R + Send + Sync + 'static,
        R: CallbackResult,
    {
        self.callbacks.matched = Some(callback::typed(f));
        self
    }

    /// Every message on the bus, unfiltered and raw. This binds `#` on every exchange:
    /// the broker then filters nothing for this monitor.
    ///
    /// ```
    /// use buildbus::consumers::client::MonitorBuilder;
    ///
    /// let b = MonitorBuilder::new("amqp://127.0.0.1")
    ///     .trees(["acme"]) // still narrows on_build, on the client
    ///     .on_build(|_m, build| println!("{:?}", build.result))
    ///     .on_message(|m| println!("{} {}", m.exchange, m.routing_key));
    /// let bindings = b.bindings().unwrap();
    /// assert_eq!(bindings.len(), 5);
    /// assert!(bindings.iter().all(|b| b.routing_key == "#"));
    /// ```
    pub fn on_message<F, R>(mut self, f: F) -> Self
    where
        F: Fn(&Message) -> R + Send + Sync + 'static,
        R: CallbackResult,
    {
        self.callbacks.message = Some(callback::raw(f));
        self
    }

    /// Callbacks running at once (default 1: the queue's order is kept).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Unacked deliveries the broker may push ahead (default 100).
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n;
        self
    }

    /// Runs of a failed callback after the first (default 3) before the message is
    /// dead-lettered.
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// The wait before the first retry, doubling after each (default 200 ms).
    pub fn retry_delay(mut self, d: Duration) -> Self {
        self.retry_delay = d;
        self
    }

    /// Give up (ending with [`ClientError::Broker`]) when transient faults (connection
    /// refused, a broker restart) last this long without a connection; default: keep
    /// trying. Permanent refusals end the monitor at once anyway.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = Some(d);
        self
    }

    /// The TLS set-up of an `amqps` URL (trusted CAs, client certificate); default:
    /// the system's CAs, no client certificate.
    pub fn tls(mut self, tls: BrokerTls) -> Self {
        self.tls = tls;
        self
    }

    /// The length limit of a labelled queue (default 100,000 messages); beyond it the
    /// oldest are dead-lettered. Changing it for an existing queue needs the queue
    /// deleted first (RabbitMQ refuses other arguments for an existing queue).
    pub fn max_length(mut self, n: u64) -> Self {
        self.limits.max_length = n;
        self
    }

    /// A limit in bytes as well (default none).
    pub fn max_length_bytes(mut self, n: u64) -> Self {
        self.limits.max_length_bytes = Some(n);
        self
    }

    /// The most bindings per exchange (default 64); larger filter products are
    /// widened (and checked on the client).
    pub fn max_bindings(mut self, n: usize) -> Self {
        self.max_bindings = n;
        self
    }

    /// The filters as they stand.
    pub fn filters(&self) -> &Filters {
        &self.filters
    }

    /// What each kind's exchange is asked for.
    fn wants(&self) -> Result<BTreeMap<Kind, Want>, ClientError> {
        let c = &self.callbacks;
        if !c.has_any() {
            return Err(ClientError::Config(
                "no callback: give on_build, on_test, on_task, on_artifact, on_log, on_match \
                 or on_message"
                    .into(),
            ));
        }
        for kind in Kind::ALL {
            let typed = match kind {
                Kind::Build => c.build.is_some(),
                Kind::Test => c.test.is_some(),
                Kind::Task => c.task.is_some(),
                Kind::Artifact => c.artifact.is_some(),
                Kind::Log => c.log.is_some(),
            };
            if typed && !self.filters.kind_wanted(kind) {
                return Err(ClientError::Config(format!(
                    "on_{kind} is set but kinds() leaves {kind} out"
                )));
            }
        }
        let mut wants = BTreeMap::new();
        for kind in Kind::ALL {
            if c.message.is_some() {
                wants.insert(kind, Want::Everything);
            } else if c.wants_kind(kind) && self.filters.kind_wanted(kind) {
                let finished_only = kind == Kind::Build && c.matched.is_none();
                wants.insert(kind, Want::Filtered { finished_only });
            }
        }
        Ok(wants)
    }

    fn check(&self) -> Result<(), ClientError> {
        if let Some(p) = self.problems.first() {
            return Err(ClientError::Config(p.clone()));
        }
        if let Some(l) = &self.label {
            queue::check_label(l).map_err(ClientError::Config)?;
        }
        queue::url_user(&self.url).map_err(ClientError::Config)?;
        if self.workers == 0 {
            return Err(ClientError::Config("workers must be at least 1".into()));
        }
        if self.prefetch == 0 {
            return Err(ClientError::Config("prefetch must be at least 1".into()));
        }
        if self.max_bindings == 0 {
            return Err(ClientError::Config(
                "max_bindings must be at least 1".into(),
            ));
        }
        if self.limits.max_length == 0 {
            return Err(ClientError::Config("max_length must be at least 1".into()));
        }
        Ok(())
    }

    /// The bindings the monitor will declare, computed without connecting.
    pub fn bindings(&self) -> Result<Vec<Binding>, ClientError> {
        self.check()?;
        Ok(bindings::plan(
            &self.wants()?,
            &self.filters,
            &self.prefix,
            self.max_bindings,
        ))
    }

    /// The durable queue's name (`queue/<user>/<label>`), or `None` without a label.
    pub fn queue_name(&self) -> Result<Option<String>, ClientError> {
        self.check()?;
        let user = queue::url_user(&self.url).map_err(ClientError::Config)?;
        Ok(self.label.as_ref().map(|l| queue::queue_name(&user, l)))
    }

    /// Starts the monitor on its own thread and returns at once. Settings that make no
    /// sense are an error here; the broker being away is not (the monitor keeps trying
    /// to connect: see [`Monitor::wait_ready`]).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use buildbus::consumers::client::MonitorBuilder;
    ///
    /// let monitor = MonitorBuilder::new("amqp://guest:guest@127.0.0.1:5672/%2f")
    ///     .label("failures")
    ///     .products(["firmware"])
    ///     .retries(5)
    ///     .on_build(|_m, build| -> Result<(), std::io::Error> {
    ///         // An Err (or a panic) is retried, then the message is dead-lettered.
    ///         if build.result.is_some_and(|r| r.as_str() != "success") {
    ///             std::fs::write("/tmp/last-failure", &*build.common.build_id)?;
    ///         }
    ///         Ok(())
    ///     })
    ///     .start()?;
    /// if !monitor.wait_ready(Duration::from_secs(10)) {
    ///     eprintln!("no broker yet; the monitor keeps trying");
    /// }
    /// // Stop from anywhere (a signal handler, a callback) without waiting:
    /// let stopper = monitor.stopper();
    /// std::thread::spawn(move || {
    ///     std::thread::sleep(Duration::from_secs(60));
    ///     stopper.stop();
    /// });
    /// while !monitor.join(Duration::from_secs(1)) {}
    /// println!("{:?}", monitor.stats());
    /// # Ok::<(), buildbus::consumers::client::ClientError>(())
    /// ```
    pub fn start(self) -> Result<Monitor, ClientError> {
        let bindings = self.bindings()?;
        let queue = self.queue_name()?;
        let plan = Plan {
            url: self.url,
            tls: self.tls,
            prefix: self.prefix,
            name: self.label.clone().unwrap_or_else(|| "monitor".into()),
            queue,
            bindings,
            limits: self.limits,
            filters: self.filters,
            workers: self.workers,
            prefetch: self.prefetch,
            retries: self.retries,
            retry_delay: self.retry_delay,
            connect_timeout: self.connect_timeout,
        };
        let shared = Arc::new(Shared::new(plan, self.callbacks));
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("buildbus-monitor".into())
            .spawn(move || run::thread_main(sh))
            .map_err(|e| ClientError::Other(format!("cannot start the monitor thread: {e}")))?;
        Ok(Monitor {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }
}

/// A running monitor. Dropping it stops it (gracefully, like [`Monitor::stop`]).
pub struct Monitor {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Asks a monitor to stop, from anywhere (a signal handler's thread, a callback):
/// it does not wait.
#[derive(Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    /// Asks the monitor to stop; returns at once.
    pub fn stop(&self) {
        self.0.request_stop();
    }

    pub fn is_stopping(&self) -> bool {
        self.0.stopping()
    }
}

impl Monitor {
    /// Still running (connecting, consuming, or stopping).
    pub fn is_alive(&self) -> bool {
        self.shared.life().ended.is_none()
    }

    /// Waits at most `timeout` for the monitor to end; gives whether it has. A monitor
    /// ends when it is stopped, or on an error retrying cannot fix.
    pub fn join(&self, timeout: Duration) -> bool {
        let ended = self.shared.wait_for(Some(timeout), |l| l.ended.is_some());
        if ended {
            self.reap();
        }
        ended
    }

    /// Waits at most `timeout` until the queue is declared, bound and consumed (so a
    /// message published from now on reaches the callbacks); false if it is not by
    /// then, or if the monitor ended.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        self.shared
            .wait_for(Some(timeout), |l| l.ready || l.ended.is_some());
        let l = self.shared.life();
        l.ready && l.ended.is_none()
    }

    /// Stops gracefully (no new deliveries; callbacks already running finish and are
    /// acked), waits until it has, and gives how the monitor ended. From inside a
    /// callback, use [`Monitor::stopper`] instead: this would wait for itself.
    pub fn stop(&self) -> Result<(), ClientError> {
        self.shared.request_stop();
        self.shared.wait_for(None, |l| l.ended.is_some());
        self.reap();
        self.result().unwrap_or(Ok(()))
    }

    /// A handle that asks the monitor to stop without waiting.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.clone())
    }

    /// How the monitor ended, once it has.
    pub fn result(&self) -> Option<Result<(), ClientError>> {
        self.shared.life().ended.clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// The queue being consumed now (a server-made name without a label).
    pub fn queue(&self) -> Option<String> {
        self.shared.life().queue.clone()
    }

    /// The bindings the monitor declares.
    pub fn bindings(&self) -> &[Binding] {
        &self.shared.plan.bindings
    }

    fn reap(&self) {
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shared.request_stop();
        self.reap();
    }
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("name", &self.shared.plan.name)
            .field("queue", &self.queue())
            .field("alive", &self.is_alive())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> MonitorBuilder {
        MonitorBuilder::new("amqp://alice:pw@127.0.0.1:5672/%2f")
    }

    #[test]
    fn settings_are_checked_before_starting() {
        let err = |m: MonitorBuilder| m.start().unwrap_err();
        assert!(matches!(err(b()), ClientError::Config(_)));
        assert!(matches!(
            err(b().label("a b").on_log(|_, _| {})),
            ClientError::Config(_)
        ));
        let e = err(b().kinds([Kind::Log]).on_build(|_, _| {}));
        assert!(e.to_string().contains("on_build"), "{e}");
        let e = err(b().build_tags(Vec::<String>::new()).on_log(|_, _| {}));
        assert!(e.to_string().contains("empty"), "{e}");
        assert!(matches!(
            err(b().workers(0).on_log(|_, _| {})),
            ClientError::Config(_)
        ));
        assert!(matches!(
            err(MonitorBuilder::new("http://x").on_log(|_, _| {})),
            ClientError::Config(_)
        ));
    }

    #[test]
    fn queue_names_come_from_the_url_user() {
        assert_eq!(
            b().label("dash").on_log(|_, _| {}).queue_name().unwrap(),
            Some("queue/alice/dash".into())
        );
        assert_eq!(b().on_log(|_, _| {}).queue_name().unwrap(), None);
    }

    #[test]
    fn callbacks_decide_the_exchanges() {
        let keys = |m: MonitorBuilder| -> Vec<(String, String)> {
            m.bindings()
                .unwrap()
                .into_iter()
                .map(|b| (b.exchange, b.routing_key))
                .collect()
        };
        let ex = |k: &str| format!("exchange/buildbus/v1/{k}");
        assert_eq!(
            keys(b().trees(["t"]).on_build(|_, _| {}).on_test(|_, _| {})),
            vec![
                (ex("build"), "t.*.*.*.*.finished.#".into()),
                (ex("test"), "t.#".into())
            ]
        );
        // on_match wants started builds as well, and every kind unless kinds() says.
        assert_eq!(
            keys(b().trees(["t"]).kinds([Kind::Build]).on_match(|_, _| {})),
            vec![(ex("build"), "t.#".into())]
        );
        assert_eq!(keys(b().trees(["t"]).on_match(|_, _| {})).len(), 5);
        // on_message is unfiltered: # everywhere, whatever the filters.
        let all = keys(b().trees(["t"]).on_message(|_| {}).on_build(|_, _| {}));
        assert_eq!(all.len(), 5);
        assert!(all.iter().all(|(_, k)| k == "#"));
    }
}
