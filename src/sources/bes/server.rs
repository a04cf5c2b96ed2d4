//! The gRPC side of the BES backend: `google.devtools.build.v1.PublishBuildEvent`.
//!
//! - `PublishBuildToolEventStream`: each stream's requests are handed to the task of
//!   their invocation ([`super::task`]), which sends the acks back on the
//!   stream's response. The RPC ends (OK) once the client half-closed and every
//!   request it sent is acknowledged.
//! - `PublishLifecycleEvent`: build enqueued, invocation attempt started/finished and
//!   build finished become facts in the build messages' metadata (`bes.*`), and an
//!   attempt that finished while its stream is still open ends that build as
//!   incomplete.
//!
//! Every call first passes the auth check (an optional bearer token or header value,
//! as Bazel sends with `--remote_header`/`--bes_header`); refused calls get
//! `UNAUTHENTICATED`. TLS is on when a certificate and key are given.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataMap;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use super::proto::v1::build_event::Event as BesEvent;
use super::proto::v1::publish_build_event_server::{PublishBuildEvent, PublishBuildEventServer};
use super::proto::v1::{
    build_status, PublishBuildToolEventStreamRequest, PublishBuildToolEventStreamResponse,
    PublishLifecycleEventRequest,
};
use super::spool::Spool;
use super::task::{Backing, Cmd, Invocations, TaskStart, DEFAULT_LINGER};
use crate::aam::BuildScanner;
use crate::bus::publish::PublisherConfig;
use crate::model::time;

/// How callers must authenticate.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    #[default]
    None,
    /// `authorization: Bearer <token>`.
    Bearer(String),
    /// A header with a fixed value (for example `x-api-key: <key>`).
    Header { name: String, value: String },
}

impl Auth {
    fn check(&self, md: &MetadataMap) -> Result<(), Status> {
        let ok = match self {
            Auth::None => true,
            Auth::Bearer(token) => md
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), token.as_bytes())),
            Auth::Header { name, value } => md
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| constant_time_eq(v.trim().as_bytes(), value.as_bytes())),
        };
        if ok {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "missing or wrong credentials for this BES backend",
            ))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Backend settings.
#[derive(Clone)]
pub struct BesConfig {
    pub listen: SocketAddr,
    /// `None`: print messages as JSON lines instead of publishing them.
    pub publisher: Option<PublisherConfig>,
    /// Where open invocations' events are kept for restarts (`None`: no spool).
    pub spool: Option<PathBuf>,
    /// Spool files not written for this long are removed when the backend starts.
    pub spool_max_age: Duration,
    /// An invocation whose stream stays silent this long is ended as incomplete.
    pub idle_timeout: Duration,
    pub auth: Auth,
    /// PEM certificate chain and key.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// Scans the build directory when a build finishes (the AAM hook).
    pub artifacts: Option<Arc<BuildScanner>>,
}

impl BesConfig {
    pub fn new(listen: SocketAddr, publisher: Option<PublisherConfig>) -> BesConfig {
        BesConfig {
            listen,
            publisher,
            spool: None,
            spool_max_age: Duration::from_secs(86_400),
            idle_timeout: Duration::from_secs(600),
            auth: Auth::None,
            tls: None,
            artifacts: None,
        }
    }
}

/// What the service's calls share: how to start invocations' tasks, the tasks, and
/// the lifecycle facts.
pub struct Shared {
    backing: Arc<Backing>,
    spawner: Arc<dyn Invocations>,
    invocations: Mutex<HashMap<String, mpsc::Sender<Cmd>>>,
    /// Lifecycle facts by invocation id, and by BES build id until an invocation
    /// of that build is known.
    facts: Mutex<HashMap<String, Vec<(String, String)>>>,
    build_facts: Mutex<HashMap<String, Vec<(String, String)>>>,
    streams: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Lifecycle facts known for an invocation.
    pub fn facts_of(&self, invocation: &str) -> Vec<(String, String)> {
        lock(&self.facts)
            .get(invocation)
            .cloned()
            .unwrap_or_default()
    }

    /// An invocation task ended: forget it (unless a newer task took its place).
    pub fn forget(&self, invocation: &str, tx: &mpsc::Sender<Cmd>) {
        let mut map = lock(&self.invocations);
        if map.get(invocation).is_some_and(|t| t.same_channel(tx)) {
            map.remove(invocation);
            // Its build's facts go too (Bazel may never send BuildFinished).
            let facts = lock(&self.facts).remove(invocation).unwrap_or_default();
            for (k, build_id) in facts {
                if k == "bes.build_id" {
                    lock(&self.build_facts).remove(&build_id);
                }
            }
        }
    }

    /// The task of an invocation, started if there is none.
    fn task(self: &Arc<Self>, invocation: &str, first_seq: i64) -> mpsc::Sender<Cmd> {
        let mut map = lock(&self.invocations);
        if let Some(tx) = map.get(invocation).filter(|t| !t.is_closed()) {
            return tx.clone();
        }
        let facts = self.facts_of(invocation);
        let me = Arc::downgrade(self);
        let id = invocation.to_string();
        let on_end = Box::new(move |tx: &mpsc::Sender<Cmd>| {
            if let Some(shared) = me.upgrade() {
                shared.forget(&id, tx);
            }
        });
        let tx = self.spawner.spawn(
            &self.backing,
            TaskStart {
                id: invocation.to_string(),
                first_seq,
                facts,
                on_end,
            },
        );
        map.insert(invocation.to_string(), tx.clone());
        tx
    }

    fn existing_task(&self, invocation: &str) -> Option<mpsc::Sender<Cmd>> {
        lock(&self.invocations).get(invocation).cloned()
    }

    async fn add_fact(&self, invocation: &str, key: &str, value: String) {
        {
            let mut facts = lock(&self.facts);
            let list = facts.entry(invocation.to_string()).or_default();
            list.retain(|(k, _)| k != key);
            list.push((key.to_string(), value.clone()));
        }
        if let Some(tx) = self.existing_task(invocation) {
            let _ = tx
                .send(Cmd::Fact {
                    key: key.to_string(),
                    value,
                })
                .await;
        }
    }
}

/// The running backend.
pub struct Backend {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Backend {
    /// Invocations with a live task.
    pub fn open_invocations(&self) -> usize {
        lock(&self.shared.invocations).len()
    }

    /// Stops accepting calls and waits for the server to end. Invocation tasks keep
    /// going until their streams end (the runtime's shutdown ends them).
    pub async fn stop(mut self) -> Result<(), tonic::transport::Error> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }

    /// Waits for the server to end on its own (an error); cancel-safe.
    pub async fn wait(&mut self) -> Result<(), tonic::transport::Error> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }
}

/// Errors starting the backend.
#[derive(Debug, thiserror::Error)]
pub enum BesError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("spool directory {path}: {source}")]
    Spool {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(tonic::transport::Error),
}

/// Starts the backend on `cfg.listen` (port 0 picks a free port; see [`Backend::addr`]);
/// `spawner` starts each invocation's task. [`crate::pipeline::bes::start`] is this with
/// the pipeline's tasks.
pub async fn start(cfg: BesConfig, spawner: Arc<dyn Invocations>) -> Result<Backend, BesError> {
    let spool = match &cfg.spool {
        Some(dir) => Some(Spool::open(dir).map_err(|source| BesError::Spool {
            path: dir.clone(),
            source,
        })?),
        None => None,
    };
    if let Some(s) = &spool {
        match s.sweep(cfg.spool_max_age) {
            Ok(removed) => {
                for p in removed {
                    tracing::warn!(
                        "{}: spool of an invocation silent for over {} s removed",
                        p.display(),
                        cfg.spool_max_age.as_secs()
                    );
                }
            }
            Err(e) => tracing::warn!("{}: cannot sweep the spool: {e}", s.dir().display()),
        }
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| BesError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| BesError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let scheme = if cfg.tls.is_some() { "grpcs" } else { "grpc" };
    let shared = Arc::new(Shared {
        backing: Arc::new(Backing {
            spool,
            idle_timeout: cfg.idle_timeout,
            linger: DEFAULT_LINGER.min(cfg.idle_timeout),
            origin: format!("{scheme}://{addr}"),
        }),
        spawner,
        invocations: Mutex::new(HashMap::new()),
        facts: Mutex::new(HashMap::new()),
        build_facts: Mutex::new(HashMap::new()),
        streams: AtomicU64::new(0),
    });
    let service = Service {
        shared: Arc::clone(&shared),
        auth: cfg.auth.clone(),
    };
    let mut builder = Server::builder();
    if let Some((cert, key)) = &cfg.tls {
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(BesError::Tls)?;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let router = builder.add_service(PublishBuildEventServer::new(service));
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
    });
    tracing::info!("BES backend listening on {scheme}://{addr}");
    Ok(Backend {
        addr,
        shared,
        shutdown: Some(tx),
        task,
    })
}

struct Service {
    shared: Arc<Shared>,
    auth: Auth,
}

type AckStream =
    Pin<Box<dyn Stream<Item = Result<PublishBuildToolEventStreamResponse, Status>> + Send>>;

fn result_name(r: i32) -> String {
    build_status::Result::try_from(r)
        .map(|r| r.as_str_name().to_string())
        .unwrap_or_else(|_| format!("RESULT_{r}"))
}

#[tonic::async_trait]
impl PublishBuildEvent for Service {
    async fn publish_lifecycle_event(
        &self,
        request: Request<PublishLifecycleEventRequest>,
    ) -> Result<Response<pbjson_types::Empty>, Status> {
        self.auth.check(request.metadata())?;
        let req = request.into_inner();
        let Some(ordered) = req.build_event else {
            return Err(Status::invalid_argument("build_event is required"));
        };
        let sid = ordered.stream_id.unwrap_or_default();
        let Some(ev) = ordered.event else {
            return Err(Status::invalid_argument("build_event.event is required"));
        };
        let when = ev
            .event_time
            .as_ref()
            .and_then(|t| time::from_millis(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000));
        let sh = &self.shared;
        match ev.event {
            Some(BesEvent::BuildEnqueued(_)) => {
                let mut facts = vec![("bes.build_id".to_string(), sid.build_id.clone())];
                if let Some(w) = when {
                    facts.push(("bes.enqueued_at".into(), w));
                }
                if !req.project_id.is_empty() {
                    facts.push(("bes.project_id".into(), req.project_id.clone()));
                }
                lock(&sh.build_facts).insert(sid.build_id.clone(), facts);
            }
            Some(BesEvent::InvocationAttemptStarted(a)) if !sid.invocation_id.is_empty() => {
                let inherited = lock(&sh.build_facts)
                    .get(&sid.build_id)
                    .cloned()
                    .unwrap_or_else(|| vec![("bes.build_id".to_string(), sid.build_id.clone())]);
                for (k, v) in inherited {
                    sh.add_fact(&sid.invocation_id, &k, v).await;
                }
                sh.add_fact(
                    &sid.invocation_id,
                    "bes.attempt",
                    a.attempt_number.to_string(),
                )
                .await;
            }
            Some(BesEvent::InvocationAttemptFinished(f)) if !sid.invocation_id.is_empty() => {
                let result = result_name(f.invocation_status.map(|s| s.result).unwrap_or(0));
                if let Some(tx) = sh.existing_task(&sid.invocation_id) {
                    let _ = tx.send(Cmd::AttemptFinished { result }).await;
                }
            }
            Some(BesEvent::BuildFinished(_)) => {
                lock(&sh.build_facts).remove(&sid.build_id);
            }
            _ => {
                tracing::debug!("lifecycle event without effect: {sid:?}");
            }
        }
        Ok(Response::new(pbjson_types::Empty {}))
    }

    type PublishBuildToolEventStreamStream = AckStream;

    async fn publish_build_tool_event_stream(
        &self,
        request: Request<Streaming<PublishBuildToolEventStreamRequest>>,
    ) -> Result<Response<AckStream>, Status> {
        self.auth.check(request.metadata())?;
        let mut inbound = request.into_inner();
        let shared = Arc::clone(&self.shared);
        let no = shared.streams.fetch_add(1, Ordering::Relaxed) + 1;
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut task: Option<mpsc::Sender<Cmd>> = None;
            loop {
                let req = match inbound.next().await {
                    None => {
                        if let Some(t) = &task {
                            let _ = t.send(Cmd::HalfClose { stream: no }).await;
                        }
                        // A stream that sent nothing has nothing to ack.
                        return;
                    }
                    Some(Err(e)) => {
                        tracing::info!("BES stream {no} broke: {e}");
                        if let Some(t) = &task {
                            let _ = t.send(Cmd::Gone { stream: no }).await;
                        }
                        return;
                    }
                    Some(Ok(r)) => r,
                };
                let Some(ev) = req.ordered_build_event else {
                    let _ = acks_tx.send(Err(Status::invalid_argument(
                        "ordered_build_event is required",
                    )));
                    return;
                };
                let invocation = ev
                    .stream_id
                    .as_ref()
                    .map(|s| s.invocation_id.clone())
                    .unwrap_or_default();
                if invocation.is_empty() {
                    let _ = acks_tx.send(Err(Status::invalid_argument(
                        "ordered_build_event.stream_id.invocation_id is required",
                    )));
                    return;
                }
                if task.is_none() {
                    let t = shared.task(&invocation, ev.sequence_number);
                    if !req.notification_keywords.is_empty() {
                        shared
                            .add_fact(
                                &invocation,
                                "bes.keywords",
                                req.notification_keywords.join(","),
                            )
                            .await;
                    }
                    if !req.project_id.is_empty() {
                        shared
                            .add_fact(&invocation, "bes.project_id", req.project_id.clone())
                            .await;
                    }
                    if let Some(sid) = &ev.stream_id {
                        if !sid.build_id.is_empty() && shared.facts_of(&invocation).is_empty() {
                            shared
                                .add_fact(&invocation, "bes.build_id", sid.build_id.clone())
                                .await;
                        }
                    }
                    let attach = Cmd::Attach {
                        stream: no,
                        acks: acks_tx.clone(),
                    };
                    if t.send(attach).await.is_err() {
                        let _ = acks_tx.send(Err(Status::unavailable(
                            "the invocation's task ended; retry",
                        )));
                        return;
                    }
                    task = Some(t);
                }
                let Some(t) = &task else { return };
                let cmd = Cmd::Event {
                    stream: no,
                    ev: Box::new(ev),
                };
                if t.send(cmd).await.is_err() {
                    let _ = acks_tx.send(Err(Status::unavailable(
                        "the invocation's task ended; retry",
                    )));
                    return;
                }
            }
        });
        let out: AckStream = Box::pin(UnboundedReceiverStream::new(acks_rx));
        Ok(Response::new(out))
    }
}
