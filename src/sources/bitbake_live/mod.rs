//! The UI side of BitBake's live XML-RPC interface (`bitbake --server-only --bind
//! HOST:PORT`): buildbus behaves as a BitBake UI, receives every event as it is fired,
//! and hands it on in order.
//!
//! # The protocol (BitBake 2.x, as recorded in `tests/fixtures/bitbake/`)
//!
//! Two XML-RPC servers talk to each other over HTTP/1.x, no TLS:
//!
//! - **UI → server** (`http://HOST:PORT/`): `registerEventHandler(host, port)` →
//!   `[handle, "OK"]` or `[null, "Cooker is busy: …"]` (BitBake's own UIs retry five
//!   times a second apart); `runCommand(["setFeatures", [0, 1, 2]])` (Toaster's set:
//!   `HOB_EXTRA_CACHES`, `BASEDATASTORE_TRACKING`, `SEND_SANITYEVENTS`); `addClient()` →
//!   a token, sent from then on as the HTTP header `Bitbake-token` (an observer sends
//!   `observer` instead and never calls `addClient`, which would take the server's one
//!   UI slot); `runCommand(["updateConfig", options, env, argv])` with `profile: []`
//!   (a server started with `--server-only` has the *string* `"[]"` there, which is
//!   truthy and runs every task under cProfile); `runCommand(["setEventMask", handle,
//!   loglevel, {}, ["*"]])`; `runCommand(["buildTargets", targets, task])` →
//!   `[true, null]`. Every `runCommand` answers `[result, error]`. At the end:
//!   `unregisterEventHandler(handle)` and `removeClient()`.
//! - **Server → UI** (our port): one synchronous `event.sendpickle(<base64>)` per event
//!   (`pickle.dumps(event)`, protocol 4) and, rarely, `event.quit()`. Any exception on
//!   the server's side of that call, a fault included, makes BitBake drop the handler
//!   for good, and its HTTP timeout is 60 s. So an `event.sendpickle` is always answered
//!   `<nil/>` (as BitBake's own UI does), even when the pickle does not decode (that
//!   error travels with the [`LiveEvent`]); only a body that is not an XML-RPC call with
//!   one base64 param gets a fault.
//!
//! Events come from the server process and from its parser processes, each with its
//! own connection, so several calls can be in flight at once: the sequence number is
//! the order in which their bodies were complete. (The recorded session shows it: the
//! UI saw 23 of 686 parse events in another order than the event log written by the
//! same server, by at most 3 places.) The event port closes every connection after its
//! answer, as BitBake's own UI does: a kept-alive connection would be inherited by the
//! processes the server forks.
//!
//! # Queueing and backpressure
//!
//! The HTTP handler only parses the call, numbers the event and queues it; decoding,
//! the caller's callback and anything downstream run on the session task. The queue
//! holds [`LiveOptions::queue_capacity`] events; when it is full the handler waits for
//! room (delaying its answer, which holds BitBake's sending thread: its send is
//! synchronous) for at most [`LiveOptions::backpressure_max_wait`] (20 s, well inside
//! BitBake's 60 s timeout), then queues the event anyway and counts it in
//! [`LiveReport::overflowed`]. Events are never dropped and never reordered.
//!
//! # The end
//!
//! A session ends after the event `bb.command.CommandCompleted`, `CommandFailed` or
//! `CommandExit` (unless an observer sets [`LiveOptions::keep_observing`], as Toaster
//! does to see build after build), on `event.quit`, or on interrupts (see
//! [`Interrupter`]: a build is asked to stop with `stateShutdown`, then
//! `stateForceShutdown`, then the UI leaves, as knotty does on Ctrl-C; an observer
//! leaves at once). Then it unregisters, removes its client (not an observer), stops
//! listening, delivers whatever was still queued, and returns a [`LiveReport`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::decode::pickle::{self, PickleError};
use crate::decode::xmlrpc::{self, MethodResponse, Value};

/// Classes whose event ends a command, and so a session.
pub const END_CLASSES: [&str; 3] = [
    "bb.command.CommandCompleted",
    "bb.command.CommandFailed",
    "bb.command.CommandExit",
];

/// The class whose event is followed by the build's variables in an event log.
pub const BUILD_STARTED: &str = "bb.event.BuildStarted";

/// Toaster's feature set: `HOB_EXTRA_CACHES`, `BASEDATASTORE_TRACKING`,
/// `SEND_SANITYEVENTS`.
pub const TOASTER_FEATURES: [i64; 3] = [0, 1, 2];

/// Fault codes (the XML-RPC interoperability set).
pub const FAULT_PARSE: i64 = -32700;
pub const FAULT_NO_METHOD: i64 = -32601;
pub const FAULT_PARAMS: i64 = -32602;

// ------------------------------------------------------------------------------------
// Options, events, report, errors
// ------------------------------------------------------------------------------------

/// How to connect, what to ask for, and the limits.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// The BitBake server, `host:port`.
    pub server: String,
    /// Where to serve `event.sendpickle` (default `127.0.0.1:0`: any free port).
    pub listen: SocketAddr,
    /// The host name or address given to the server in `registerEventHandler`. By
    /// default the listening address, or, when that is unspecified (`0.0.0.0`), the
    /// local address that faces the server (as BitBake's `connectXMLRPC` finds it).
    pub advertise: Option<String>,
    /// What to build; `None` observes (token `observer`: no `addClient`, no
    /// `updateConfig`, no `buildTargets`, no `removeClient`).
    pub targets: Option<Vec<String>>,
    /// The task for `buildTargets` (BitBake's default is `build`).
    pub task: String,
    /// `setFeatures`; empty sends none. [`LiveOptions::build`] asks for Toaster's set;
    /// [`LiveOptions::observe`] for none, since a changed feature set resets the
    /// cooker under the UI that owns it (and fails while it is busy).
    pub features: Vec<i64>,
    /// The options of `updateConfig` ([`default_update_config`]).
    pub config: Vec<(String, Value)>,
    /// The environment for `updateConfig`; `None` sends this process's environment, as
    /// knotty does (the server reparses when an approved variable differs, and keeps
    /// the whole of it as `BB_ORIGENV` for fetchers).
    pub env: Option<Vec<(String, String)>>,
    /// The command line for `updateConfig`; `None` sends `["bitbake", targets…]`.
    pub argv: Option<Vec<String>>,
    /// The log level of `setEventMask` (20 = NOTE).
    pub log_level: i64,
    /// The event classes of `setEventMask` (`["*"]`: all).
    pub event_mask: Vec<String>,
    /// After a `BuildStarted`, fetch the build's variables
    /// (`runCommand(["getAllKeysWithFlags", ["doc", "func"]])`, what `bitbake -w` logs
    /// as the `allvariables` line and what Toaster reads) into
    /// [`LiveEvent::variables`].
    pub fetch_variables: bool,
    /// An observer stays after the end of a command, until `event.quit` or an
    /// interrupt (Toaster's observer mode). Ignored when building.
    pub keep_observing: bool,
    /// Tries of `registerEventHandler` while the server answers "busy".
    pub register_attempts: u32,
    pub register_retry_delay: Duration,
    /// Time for one call to the server (BitBake's own transport uses 60 s).
    pub call_timeout: Duration,
    /// With no event for this long, ask the server whether it is still there
    /// (`getEventHandle`); a server that refuses the connection ends the session with
    /// [`LiveError::ServerGone`].
    pub idle_probe: Option<Duration>,
    /// Events queued before `event.sendpickle` answers are held back.
    pub queue_capacity: usize,
    /// The longest an answer is held back when the queue is full.
    pub backpressure_max_wait: Duration,
    /// Limits on XML-RPC bodies, both ways.
    pub xml_limits: xmlrpc::Limits,
    /// The pickle decoder (limits, allowlist).
    pub decoder: pickle::Decoder,
    /// Connections served at once on the event port.
    pub max_connections: usize,
}

impl LiveOptions {
    /// Build `targets` on `server` (`host:port`).
    pub fn build(server: impl Into<String>, targets: Vec<String>) -> LiveOptions {
        LiveOptions {
            server: server.into(),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            advertise: None,
            targets: Some(targets),
            task: "build".into(),
            features: TOASTER_FEATURES.to_vec(),
            config: default_update_config(),
            env: None,
            argv: None,
            log_level: 20,
            event_mask: vec!["*".into()],
            fetch_variables: true,
            keep_observing: false,
            register_attempts: 5,
            register_retry_delay: Duration::from_secs(1),
            call_timeout: Duration::from_secs(60),
            idle_probe: Some(Duration::from_secs(60)),
            queue_capacity: 65_536,
            backpressure_max_wait: Duration::from_secs(20),
            xml_limits: xmlrpc::Limits::default(),
            decoder: pickle::Decoder::default(),
            max_connections: 64,
        }
    }

    /// Observe what `server` does for another UI.
    pub fn observe(server: impl Into<String>) -> LiveOptions {
        LiveOptions {
            targets: None,
            features: Vec::new(),
            ..LiveOptions::build(server, Vec::new())
        }
    }

    pub fn is_observer(&self) -> bool {
        self.targets.is_none()
    }
}

/// The `updateConfig` options knotty sends with no command-line options, and
/// `profile: []` (the server-only default is the truthy string `"[]"`).
pub fn default_update_config() -> Vec<(String, Value)> {
    let list = || Value::Array(Vec::new());
    vec![
        ("halt".into(), Value::Bool(true)),
        ("force".into(), Value::Bool(false)),
        ("invalidate_stamp".into(), Value::Nil),
        ("dry_run".into(), Value::Bool(false)),
        ("dump_signatures".into(), list()),
        ("extra_assume_provided".into(), list()),
        ("profile".into(), list()),
        ("prefile".into(), list()),
        ("postfile".into(), list()),
        ("server_timeout".into(), Value::Nil),
        ("nosetscene".into(), Value::Bool(false)),
        ("setsceneonly".into(), Value::Bool(false)),
        ("skipsetscene".into(), Value::Bool(false)),
        ("runall".into(), list()),
        ("runonly".into(), Value::Nil),
        ("writeeventlog".into(), Value::Nil),
        ("build_verbose_shell".into(), Value::Bool(false)),
        ("build_verbose_stdout".into(), Value::Bool(false)),
        ("default_loglevel".into(), Value::Int(20)),
        ("debug_domains".into(), Value::Struct(Vec::new())),
    ]
}

/// One event as the server sent it.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    /// 1, 2, 3, … in the order the calls were received.
    pub seq: u64,
    /// When its call was received.
    pub received: SystemTime,
    /// The pickle, as sent (the `vars` of an event-log line, base64-decoded).
    pub pickle: Bytes,
    /// The decoded pickle, or why it did not decode (the session goes on).
    pub value: Result<pickle::Value, PickleError>,
    /// On a `BuildStarted` with [`LiveOptions::fetch_variables`]: the build's variables
    /// as the `allvariables` line of an event log has them (`{VAR: {"v", "history",
    /// "doc", "func"}}`), fetched right after the event arrived.
    pub variables: Option<serde_json::Value>,
}

impl LiveEvent {
    /// `module.Class` of the event, when it decoded to an object.
    pub fn class(&self) -> Option<&str> {
        self.value
            .as_ref()
            .ok()
            .and_then(|v| v.as_object())
            .map(|o| &*o.class)
    }

    /// The pickle as the `vars` of an event-log line: standard base64 with a line
    /// break after every 76 characters and at the end (`base64.encodebytes`).
    pub fn vars_base64(&self) -> String {
        xmlrpc::encode_base64_lines(&self.pickle)
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEnd {
    CommandCompleted,
    CommandFailed {
        error: String,
        exitcode: Option<i64>,
    },
    CommandExit {
        exitcode: Option<i64>,
    },
    /// The server called `event.quit`.
    Quit,
    /// Interrupted (see [`Interrupter`]).
    Interrupted,
}

/// What a session did.
#[derive(Debug, Clone)]
pub struct LiveReport {
    pub server: String,
    /// Where events were served.
    pub listen: SocketAddr,
    /// Host and port given in `registerEventHandler`.
    pub advertised: (String, u16),
    /// The event handler's handle.
    pub handle: Option<i64>,
    /// The `Bitbake-token` sent (`observer` for an observer).
    pub token: Option<String>,
    /// Events delivered.
    pub events: u64,
    /// Of which did not decode.
    pub decode_errors: u64,
    /// Calls to the event port answered with a fault (unreadable, wrong method or
    /// params).
    pub rejected_calls: u64,
    /// Events queued past [`LiveOptions::queue_capacity`] after the longest wait.
    pub overflowed: u64,
    /// Variables fetched after `BuildStarted`, and the fetches that failed.
    pub variables_fetched: u64,
    pub variables_errors: Vec<String>,
    pub end: LiveEnd,
    /// `unregisterEventHandler` / `removeClient` / interrupt commands that failed (the
    /// session still ended).
    pub cleanup_errors: Vec<String>,
}

/// A session that could not run or went wrong. Errors from the server name it and
/// the call.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("bitbake-live: invalid options: {0}")]
    Options(String),
    #[error("bitbake-live: cannot listen for events on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("bitbake server {server}: {call}: cannot connect: {source}")]
    Connect {
        server: String,
        call: String,
        source: io::Error,
    },
    #[error("bitbake server {server}: {call}: no answer within {after:?}")]
    Timeout {
        server: String,
        call: String,
        after: Duration,
    },
    #[error("bitbake server {server}: {call}: {detail}")]
    Http {
        server: String,
        call: String,
        detail: String,
    },
    #[error("bitbake server {server}: {call}: unreadable answer: {reason}")]
    BadResponse {
        server: String,
        call: String,
        reason: String,
    },
    #[error("bitbake server {server}: {call}: fault {code}: {message}")]
    Fault {
        server: String,
        call: String,
        code: i64,
        message: String,
    },
    #[error("bitbake server {server}: {call} refused: {message}")]
    Refused {
        server: String,
        call: String,
        message: String,
    },
    #[error("bitbake server {server} went away during the session: {detail}")]
    ServerGone { server: String, detail: String },
}

impl LiveError {
    /// The call that failed (`registerEventHandler`, `runCommand(buildTargets)`, …).
    pub fn call(&self) -> Option<&str> {
        match self {
            LiveError::Connect { call, .. }
            | LiveError::Timeout { call, .. }
            | LiveError::Http { call, .. }
            | LiveError::BadResponse { call, .. }
            | LiveError::Fault { call, .. }
            | LiveError::Refused { call, .. } => Some(call),
            _ => None,
        }
    }
}

// ------------------------------------------------------------------------------------
// Interrupts
// ------------------------------------------------------------------------------------

/// Sends interrupts (Ctrl-C presses) to a running session.
#[derive(Debug, Clone)]
pub struct Interrupter(mpsc::UnboundedSender<()>);

/// The receiving end, given to [`run_live_with`].
#[derive(Debug)]
pub struct Interrupts(mpsc::UnboundedReceiver<()>);

/// A connected [`Interrupter`] and [`Interrupts`].
pub fn interrupt_channel() -> (Interrupter, Interrupts) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Interrupter(tx), Interrupts(rx))
}

impl Interrupter {
    /// One interrupt: a build is asked to stop (`stateShutdown`), a second one forces it
    /// (`stateForceShutdown`), a third leaves at once; an observer leaves at once.
    pub fn interrupt(&self) {
        let _ = self.0.send(());
    }

    /// Forwards every Ctrl-C (SIGINT) of this process until the session is over.
    pub fn forward_ctrl_c(self) -> JoinHandle<()> {
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                if self.0.send(()).is_err() {
                    break;
                }
            }
        })
    }
}

// ------------------------------------------------------------------------------------
// HTTP plumbing (shared with the replay server)
// ------------------------------------------------------------------------------------

/// A POST the XML-RPC server received.
#[derive(Debug)]
pub struct HttpCall {
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Answers one call with an XML body (HTTP 200).
pub type Handler =
    Arc<dyn Fn(HttpCall) -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub max_body: usize,
    pub max_connections: usize,
    pub read_timeout: Duration,
}

/// A running XML-RPC HTTP server.
pub struct Served {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Served {
    /// Stops accepting and closes every connection.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Serves XML-RPC over HTTP/1.x on `listener`: POST to `/` or `/RPC2`, one call per
/// connection (`Connection: close`), as Python's `SimpleXMLRPCServer` does. Keeping
/// connections alive would be unsafe with BitBake: its transport caches the open
/// connection, and the parser processes it forks would inherit it and write their
/// events into the same socket at once. With a close after every answer, each
/// process's next call opens its own connection.
pub fn serve(listener: TcpListener, limits: ServeLimits, handler: Handler) -> Served {
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let mut conns = JoinSet::new();
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = stopped.changed() => break,
            };
            let (stream, _peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("event port: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopped.changed() => break,
            };
            while conns.try_join_next().is_some() {}
            let handler = handler.clone();
            conns.spawn(async move {
                let _permit = permit;
                let _ = stream.set_nodelay(true);
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(answer(req, limits, handler).await) }
                });
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(limits.read_timeout)
                    .keep_alive(false);
                let _ = b.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
        // Dropping the set aborts the connections still open.
        drop(conns);
    });
    Served { stop, task }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

async fn answer(
    req: Request<Incoming>,
    limits: ServeLimits,
    handler: Handler,
) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        // What Python's BaseHTTPRequestHandler answers.
        return plain(StatusCode::NOT_IMPLEMENTED, "Unsupported method");
    }
    if !matches!(req.uri().path(), "/" | "/RPC2") {
        return plain(StatusCode::NOT_FOUND, "No such page");
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return plain(StatusCode::PAYLOAD_TOO_LARGE, "Body too large");
    }
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        limits.read_timeout,
        Limited::new(body, limits.max_body).collect(),
    );
    let body = match read.await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "Body too large")
        }
        Ok(Err(_)) => return plain(StatusCode::BAD_REQUEST, "Unreadable body"),
        Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, "Body not received in time"),
    };
    let xml = handler(HttpCall {
        headers: parts.headers,
        body,
    })
    .await;
    let mut r = Response::new(Full::new(Bytes::from(xml)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/xml"));
    r
}

/// Why an HTTP exchange failed.
#[derive(Debug)]
pub enum HttpError {
    Connect(io::Error),
    Protocol(String),
    TooLarge(usize),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Connect(e) => write!(f, "cannot connect: {e}"),
            HttpError::Protocol(m) => write!(f, "HTTP: {m}"),
            HttpError::TooLarge(n) => write!(f, "answer over the limit of {n} bytes"),
        }
    }
}

/// A minimal HTTP/1.1 client for XML-RPC POSTs, optionally keeping its connection
/// alive (as Python's `xmlrpc.client.Transport` does), with title-case header names.
pub struct HttpClient {
    addr: String,
    host: String,
    headers: Vec<(&'static str, String)>,
    keep_alive: bool,
    max_body: usize,
    conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    /// A client of `addr` (`host:port`), sending `headers` after `Host` on every POST.
    pub fn new(
        addr: &str,
        headers: Vec<(&'static str, String)>,
        keep_alive: bool,
        max_body: usize,
    ) -> HttpClient {
        HttpClient {
            addr: addr.to_string(),
            host: addr.to_string(),
            headers,
            keep_alive,
            max_body,
            conn: None,
        }
    }

    fn request(
        &self,
        extra: &[(&'static str, String)],
        body: &Bytes,
    ) -> Result<Request<Full<Bytes>>, HttpError> {
        let mut b = Request::post("/").header("Host", &self.host);
        for (k, v) in self.headers.iter().chain(extra) {
            b = b.header(*k, v);
        }
        b.header("Content-Length", body.len())
            .body(Full::new(body.clone()))
            .map_err(|e| HttpError::Protocol(e.to_string()))
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, HttpError> {
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(HttpError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .title_case_headers(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// POSTs `body` to `/`; returns the status and the body of the answer.
    pub async fn post(
        &mut self,
        extra: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        if let Some(mut sender) = self.conn.take() {
            if sender.ready().await.is_ok() {
                match sender.try_send_request(self.request(extra, &body)?).await {
                    Ok(resp) => return self.finish(sender, resp).await,
                    // Not sent, or the kept-alive connection was closed under us: once
                    // more on a new connection, as Python's transport does.
                    Err(e) if e.message().is_some() || e.error().is_incomplete_message() => {}
                    Err(e) => return Err(HttpError::Protocol(e.into_error().to_string())),
                }
            }
        }
        let mut sender = self.connect().await?;
        sender
            .ready()
            .await
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(self.request(extra, &body)?)
            .await
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        self.finish(sender, resp).await
    }

    async fn finish(
        &mut self,
        sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        resp: Response<Incoming>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let status = resp.status();
        let body = match Limited::new(resp.into_body(), self.max_body)
            .collect()
            .await
        {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(HttpError::TooLarge(self.max_body))
            }
            Err(e) => return Err(HttpError::Protocol(e.to_string())),
        };
        if self.keep_alive && !sender.is_closed() {
            self.conn = Some(sender);
        }
        Ok((status, body))
    }
}

// ------------------------------------------------------------------------------------
// Calls to the server
// ------------------------------------------------------------------------------------

/// Makes XML-RPC calls to the BitBake server (a new connection per call: the server
/// is Python's HTTP/1.0 `SimpleXMLRPCServer`, which closes after each answer).
#[derive(Clone)]
struct Caller {
    server: Arc<str>,
    token: Arc<Mutex<Option<String>>>,
    timeout: Duration,
    limits: xmlrpc::Limits,
}

impl Caller {
    fn new(opts: &LiveOptions) -> Caller {
        Caller {
            server: opts.server.as_str().into(),
            token: Arc::new(Mutex::new(None)),
            timeout: opts.call_timeout,
            limits: opts.xml_limits,
        }
    }

    fn set_token(&self, token: &str) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token.to_string());
    }

    fn token(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn call(&self, method: &str, params: &[Value]) -> Result<Value, LiveError> {
        self.call_as(method, method, params).await
    }

    async fn call_as(
        &self,
        label: &str,
        method: &str,
        params: &[Value],
    ) -> Result<Value, LiveError> {
        let server = self.server.to_string();
        let call = label.to_string();
        let mut headers = vec![
            ("Content-Type", "text/xml".to_string()),
            (
                "User-Agent",
                format!("buildbus/{}", env!("CARGO_PKG_VERSION")),
            ),
        ];
        if let Some(t) = self.token() {
            headers.push(("Bitbake-token", t));
        }
        let mut client = HttpClient::new(&self.server, headers, false, self.limits.max_body_bytes);
        let body = Bytes::from(xmlrpc::encode_call(method, params));
        let (status, answer) =
            match tokio::time::timeout(self.timeout, client.post(&[], body)).await {
                Err(_) => {
                    return Err(LiveError::Timeout {
                        server,
                        call,
                        after: self.timeout,
                    })
                }
                Ok(Err(HttpError::Connect(source))) => {
                    return Err(LiveError::Connect {
                        server,
                        call,
                        source,
                    })
                }
                Ok(Err(e)) => {
                    return Err(LiveError::Http {
                        server,
                        call,
                        detail: e.to_string(),
                    })
                }
                Ok(Ok(r)) => r,
            };
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&answer[..answer.len().min(200)])
                .trim()
                .to_string();
            return Err(LiveError::Http {
                server,
                call,
                detail: format!("HTTP status {status}: {text}"),
            });
        }
        match xmlrpc::parse_response(&answer, &self.limits) {
            Ok(MethodResponse::Success(v)) => Ok(v),
            Ok(MethodResponse::Fault { code, message }) => Err(LiveError::Fault {
                server,
                call,
                code,
                message,
            }),
            Err(e) => Err(LiveError::BadResponse {
                server,
                call,
                reason: e.to_string(),
            }),
        }
    }

    /// `runCommand(command)`: the result of a `[result, error]` answer; an error is
    /// [`LiveError::Refused`].
    async fn run_command(&self, command: Vec<Value>) -> Result<Value, LiveError> {
        let name = command
            .first()
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let label = format!("runCommand({name})");
        let v = self
            .call_as(&label, "runCommand", &[Value::Array(command)])
            .await?;
        match v {
            Value::Array(mut pair) if pair.len() == 2 => {
                let error = pair.pop().unwrap_or(Value::Nil);
                let result = pair.pop().unwrap_or(Value::Nil);
                match error_text(&error) {
                    Some(message) => Err(LiveError::Refused {
                        server: self.server.to_string(),
                        call: label,
                        message,
                    }),
                    None => Ok(result),
                }
            }
            other => Err(LiveError::BadResponse {
                server: self.server.to_string(),
                call: label,
                reason: format!("expected [result, error], got {}", describe(&other)),
            }),
        }
    }
}

/// The error of a `[result, error]` answer, if it is one (Python truthiness).
fn error_text(e: &Value) -> Option<String> {
    match e {
        Value::Nil => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(false) => None,
        other => Some(describe(other)),
    }
}

fn describe(v: &Value) -> String {
    let j = v.to_json().to_string();
    if j.len() > 120 {
        let mut cut = 120;
        while !j.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &j[..cut])
    } else {
        j
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Nil => false,
        Value::Bool(b) => *b,
        Value::Int(i) => *i != 0,
        Value::Double(d) => *d != 0.0,
        Value::String(s) | Value::DateTime(s) => !s.is_empty(),
        Value::Base64(b) => !b.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Struct(s) => !s.is_empty(),
    }
}

// ------------------------------------------------------------------------------------
// The event port
// ------------------------------------------------------------------------------------

enum Queued {
    Event {
        seq: u64,
        data: Bytes,
        received: SystemTime,
        _permit: Option<OwnedSemaphorePermit>,
    },
    Quit,
}

struct EventPort {
    tx: mpsc::UnboundedSender<Queued>,
    seq: Mutex<u64>,
    room: Arc<Semaphore>,
    max_wait: Duration,
    limits: xmlrpc::Limits,
    rejected: AtomicU64,
    overflowed: AtomicU64,
}

impl EventPort {
    async fn enqueue(&self, data: Bytes) {
        let permit =
            match tokio::time::timeout(self.max_wait, self.room.clone().acquire_owned()).await {
                Ok(Ok(p)) => Some(p),
                _ => {
                    let n = self.overflowed.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(
                    "bitbake-live: event queue full for {:?}, queued past capacity ({n} so far)",
                    self.max_wait
                );
                    None
                }
            };
        // Numbering and queueing under one lock: the queue is in sequence order.
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        let _ = self.tx.send(Queued::Event {
            seq: *seq,
            data,
            received: SystemTime::now(),
            _permit: permit,
        });
    }

    fn quit(&self) {
        let _seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.tx.send(Queued::Quit);
    }

    fn reject(&self, code: i64, why: String) -> String {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("bitbake-live: event port: {why}");
        xmlrpc::encode_fault(code, &why)
    }

    async fn handle(&self, call: HttpCall) -> String {
        let call = match xmlrpc::parse_call(&call.body, &self.limits) {
            Ok(c) => c,
            Err(e) => return self.reject(FAULT_PARSE, e.to_string()),
        };
        match call.method.as_str() {
            "event.sendpickle" => match <[Value; 1]>::try_from(call.params) {
                Ok([Value::Base64(b)]) => {
                    self.enqueue(Bytes::from(b)).await;
                    xmlrpc::encode_response(&Value::Nil)
                }
                Ok([other]) => self.reject(
                    FAULT_PARAMS,
                    format!(
                        "event.sendpickle takes one base64 param, got a {}",
                        other.kind()
                    ),
                ),
                Err(params) => self.reject(
                    FAULT_PARAMS,
                    format!(
                        "event.sendpickle takes one base64 param, got {}",
                        params.len()
                    ),
                ),
            },
            "event.quit" => {
                self.quit();
                xmlrpc::encode_response(&Value::Nil)
            }
            "system.listMethods" => xmlrpc::encode_response(&Value::strings([
                "event.quit",
                "event.sendpickle",
                "system.listMethods",
            ])),
            other => self.reject(
                FAULT_NO_METHOD,
                format!("method \"{other}\" is not supported"),
            ),
        }
    }
}

// ------------------------------------------------------------------------------------
// The session
// ------------------------------------------------------------------------------------

/// Runs a session: registers, builds (or observes), delivers every event in order to
/// `on_event`, and unregisters at the end. `on_event` runs on the session's task: keep
/// it short (hand the event to a channel for slow work); events wait in the queue
/// meanwhile.
pub async fn run_live<F>(opts: LiveOptions, on_event: F) -> Result<LiveReport, LiveError>
where
    F: FnMut(LiveEvent) + Send,
{
    run_live_with(opts, None, on_event).await
}

/// [`run_live`] that also listens to interrupts (Ctrl-C; see [`Interrupter`]).
pub async fn run_live_with<F>(
    opts: LiveOptions,
    interrupts: Option<Interrupts>,
    mut on_event: F,
) -> Result<LiveReport, LiveError>
where
    F: FnMut(LiveEvent) + Send,
{
    validate(&opts)?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| LiveError::Bind {
            addr: opts.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| LiveError::Bind {
        addr: opts.listen,
        source,
    })?;
    let host = advertise_host(&opts, local).await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let port = Arc::new(EventPort {
        tx,
        seq: Mutex::new(0),
        room: Arc::new(Semaphore::new(opts.queue_capacity)),
        max_wait: opts.backpressure_max_wait,
        limits: opts.xml_limits,
        rejected: AtomicU64::new(0),
        overflowed: AtomicU64::new(0),
    });
    let handler: Handler = {
        let port = port.clone();
        Arc::new(move |call| {
            let port = port.clone();
            Box::pin(async move { port.handle(call).await })
        })
    };
    let served = serve(
        listener,
        ServeLimits {
            max_body: opts.xml_limits.max_body_bytes,
            max_connections: opts.max_connections,
            read_timeout: Duration::from_secs(60),
        },
        handler,
    );

    let caller = Caller::new(&opts);
    let mut session = Session {
        opts: &opts,
        caller: caller.clone(),
        on_event: &mut on_event,
        report: LiveReport {
            server: opts.server.clone(),
            listen: local,
            advertised: (host.clone(), local.port()),
            handle: None,
            token: None,
            events: 0,
            decode_errors: 0,
            rejected_calls: 0,
            overflowed: 0,
            variables_fetched: 0,
            variables_errors: Vec::new(),
            end: LiveEnd::Interrupted,
            cleanup_errors: Vec::new(),
        },
        last_event: Instant::now(),
    };
    let outcome = session
        .drive(&mut rx, interrupts, &host, local.port())
        .await;

    // Stop listening, then hand on what is still queued (in order).
    served.stop().await;
    while let Ok(q) = rx.try_recv() {
        if let Queued::Event {
            seq,
            data,
            received,
            ..
        } = q
        {
            session.deliver(seq, data, received, false).await;
        }
    }
    let mut report = session.report;
    report.rejected_calls = port.rejected.load(Ordering::Relaxed);
    report.overflowed = port.overflowed.load(Ordering::Relaxed);
    match outcome {
        Ok(end) => {
            report.end = end;
            report.token = caller.token();
            Ok(report)
        }
        Err(e) => Err(e),
    }
}

fn validate(opts: &LiveOptions) -> Result<(), LiveError> {
    let bad = |m: &str| Err(LiveError::Options(m.to_string()));
    match opts.server.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {}
        _ => return bad(&format!("server {:?} is not HOST:PORT", opts.server)),
    }
    if let Some(t) = &opts.targets {
        if t.is_empty() {
            return bad("no targets to build (observe instead?)");
        }
        if opts.task.is_empty() {
            return bad("empty task");
        }
    }
    if opts.queue_capacity == 0 || opts.queue_capacity > Semaphore::MAX_PERMITS {
        return bad("queue capacity must be at least 1 (and not absurd)");
    }
    if opts.register_attempts == 0 {
        return bad("register attempts must be at least 1");
    }
    Ok(())
}

/// The host to give in `registerEventHandler`.
async fn advertise_host(opts: &LiveOptions, local: SocketAddr) -> String {
    if let Some(h) = &opts.advertise {
        return h.clone();
    }
    let ip = local.ip();
    if !ip.is_unspecified() {
        return ip.to_string();
    }
    // The address that routes to the server (a UDP connect sends nothing).
    let facing = tokio::net::lookup_host(opts.server.as_str())
        .await
        .ok()
        .and_then(|mut a| a.next())
        .and_then(|server| {
            let bind = if server.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let s = std::net::UdpSocket::bind(bind).ok()?;
            s.connect(server).ok()?;
            s.local_addr().ok()
        });
    match facing {
        Some(a) => a.ip().to_string(),
        None if ip.is_ipv4() => Ipv4Addr::LOCALHOST.to_string(),
        None => "::1".to_string(),
    }
}

/// How far setup got (what teardown must undo).
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    handle: Option<i64>,
    client_added: bool,
    build_started: bool,
}

struct Session<'a, F> {
    opts: &'a LiveOptions,
    caller: Caller,
    on_event: &'a mut F,
    report: LiveReport,
    last_event: Instant,
}

impl<F> Session<'_, F>
where
    F: FnMut(LiveEvent) + Send,
{
    async fn drive(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Queued>,
        mut interrupts: Option<Interrupts>,
        host: &str,
        port: u16,
    ) -> Result<LiveEnd, LiveError> {
        let progress = Mutex::new(Progress::default());
        let cancelled = AtomicBool::new(false);
        let setup = setup(
            self.opts,
            self.caller.clone(),
            host,
            port,
            &progress,
            &cancelled,
        );
        tokio::pin!(setup);
        let mut setup_done = false;
        let mut end: Option<LiveEnd> = None;
        let mut presses = 0u32;
        let probe = self.opts.idle_probe;
        let mut rx_open = true;

        while !(setup_done && end.is_some()) {
            let idle_at = probe.and_then(|p| self.last_event.checked_add(p));
            tokio::select! {
                biased;
                r = &mut setup, if !setup_done => {
                    setup_done = true;
                    self.report.handle = progress_of(&progress).handle;
                    if let Err(e) = r {
                        self.teardown(progress_of(&progress)).await;
                        return Err(e);
                    }
                    if cancelled.load(Ordering::Relaxed) && end.is_none() {
                        end = Some(LiveEnd::Interrupted);
                    }
                }
                q = rx.recv(), if rx_open => match q {
                    Some(Queued::Event { seq, data, received, .. }) => {
                        let fetch = self.opts.fetch_variables;
                        let ended = self.deliver(seq, data, received, fetch).await;
                        let keep = self.opts.is_observer() && self.opts.keep_observing;
                        if end.is_none() && !keep {
                            end = ended;
                        }
                    }
                    Some(Queued::Quit) => {
                        if end.is_none() {
                            end = Some(LiveEnd::Quit);
                        }
                        cancelled.store(true, Ordering::Relaxed);
                    }
                    // Not while the port holds its sender, which it does until the
                    // session is over.
                    None => {
                        rx_open = false;
                        end = end.or(Some(LiveEnd::Quit));
                    }
                },
                got = next_interrupt(&mut interrupts) => {
                    if !got {
                        interrupts = None;
                        continue;
                    }
                    presses += 1;
                    let building = progress_of(&progress).build_started;
                    if self.opts.is_observer() || !setup_done || !building || presses >= 3 {
                        cancelled.store(true, Ordering::Relaxed);
                        end = end.or(Some(LiveEnd::Interrupted));
                    } else {
                        let cmd = if presses == 1 {
                            "stateShutdown"
                        } else {
                            "stateForceShutdown"
                        };
                        tracing::warn!(
                            "bitbake-live: interrupted, asking the server to stop ({cmd})"
                        );
                        if let Err(e) = self.caller.run_command(vec![Value::str(cmd)]).await {
                            self.report.cleanup_errors.push(e.to_string());
                        }
                    }
                }
                _ = tokio::time::sleep_until(idle_at.unwrap_or_else(Instant::now)),
                    if idle_at.is_some() && setup_done =>
                {
                    match self.caller.call("getEventHandle", &[]).await {
                        Err(LiveError::Connect { source, .. }) => {
                            return Err(LiveError::ServerGone {
                                server: self.opts.server.clone(),
                                detail: format!(
                                    "no event for {:?} and the server refuses connections ({source})",
                                    probe.unwrap_or_default()
                                ),
                            });
                        }
                        Err(e) => tracing::warn!("bitbake-live: idle probe: {e}"),
                        Ok(_) => {}
                    }
                    self.last_event = Instant::now();
                }
            }
        }
        self.teardown(progress_of(&progress)).await;
        Ok(end.unwrap_or(LiveEnd::Interrupted))
    }

    /// Decodes and hands on one event; its end, if it ends a command.
    async fn deliver(
        &mut self,
        seq: u64,
        data: Bytes,
        received: SystemTime,
        fetch: bool,
    ) -> Option<LiveEnd> {
        self.last_event = Instant::now();
        let value = self.opts.decoder.loads(&data);
        let mut ev = LiveEvent {
            seq,
            received,
            pickle: data,
            value,
            variables: None,
        };
        if let Err(e) = &ev.value {
            self.report.decode_errors += 1;
            tracing::warn!("bitbake-live: event {seq}: {e}");
        }
        let class = ev.class().map(str::to_string);
        if fetch && class.as_deref() == Some(BUILD_STARTED) {
            let cmd = vec![
                Value::str("getAllKeysWithFlags"),
                Value::strings(["doc", "func"]),
            ];
            match self.caller.run_command(cmd).await {
                Ok(v) => {
                    ev.variables = Some(v.to_json());
                    self.report.variables_fetched += 1;
                }
                Err(e) => {
                    tracing::warn!("bitbake-live: build variables: {e}");
                    self.report.variables_errors.push(e.to_string());
                }
            }
            self.last_event = Instant::now();
        }
        let end = class.as_deref().and_then(|c| end_of(c, &ev));
        self.report.events += 1;
        (self.on_event)(ev);
        end
    }

    async fn teardown(&mut self, p: Progress) {
        if let Some(h) = p.handle {
            if let Err(e) = self
                .caller
                .call("unregisterEventHandler", &[Value::Int(h)])
                .await
            {
                self.report.cleanup_errors.push(e.to_string());
            }
        }
        if p.client_added {
            if let Err(e) = self.caller.call("removeClient", &[]).await {
                self.report.cleanup_errors.push(e.to_string());
            }
        }
    }
}

fn progress_of(p: &Mutex<Progress>) -> Progress {
    *p.lock().unwrap_or_else(|e| e.into_inner())
}

/// The next interrupt; `false` when no more can come. Never resolves without any.
async fn next_interrupt(i: &mut Option<Interrupts>) -> bool {
    match i {
        Some(Interrupts(rx)) => rx.recv().await.is_some(),
        None => std::future::pending().await,
    }
}

fn end_of(class: &str, ev: &LiveEvent) -> Option<LiveEnd> {
    let attr = |name: &str| ev.value.as_ref().ok().and_then(|v| v.get(name));
    let exitcode = || attr("exitcode").and_then(pickle::Value::as_i64);
    match class {
        "bb.command.CommandCompleted" => Some(LiveEnd::CommandCompleted),
        "bb.command.CommandFailed" => Some(LiveEnd::CommandFailed {
            error: attr("error")
                .and_then(pickle::Value::as_str)
                .unwrap_or_default()
                .to_string(),
            exitcode: exitcode(),
        }),
        "bb.command.CommandExit" => Some(LiveEnd::CommandExit {
            exitcode: exitcode(),
        }),
        _ => None,
    }
}

/// The calls that start a session, stopping early when `cancelled`.
async fn setup(
    opts: &LiveOptions,
    caller: Caller,
    host: &str,
    port: u16,
    progress: &Mutex<Progress>,
    cancelled: &AtomicBool,
) -> Result<(), LiveError> {
    let update =
        |f: &dyn Fn(&mut Progress)| f(&mut progress.lock().unwrap_or_else(|e| e.into_inner()));
    let stop = || cancelled.load(Ordering::Relaxed);

    // registerEventHandler, retried while the cooker is busy.
    let mut attempt = 0;
    let handle = loop {
        attempt += 1;
        let v = caller
            .call(
                "registerEventHandler",
                &[Value::str(host), Value::Int(i64::from(port))],
            )
            .await?;
        let (handle, error) = match v {
            Value::Array(mut pair) if pair.len() == 2 => {
                let e = pair.pop().unwrap_or(Value::Nil);
                (pair.pop().unwrap_or(Value::Nil), e)
            }
            other => (other, Value::Nil),
        };
        match handle {
            Value::Int(h) => break h,
            Value::Nil => {}
            other => {
                return Err(LiveError::BadResponse {
                    server: opts.server.clone(),
                    call: "registerEventHandler".into(),
                    reason: format!("expected a handle, got {}", describe(&other)),
                })
            }
        }
        let message = error_text(&error).unwrap_or_else(|| "no handle given".into());
        if attempt >= opts.register_attempts || stop() {
            return Err(LiveError::Refused {
                server: opts.server.clone(),
                call: "registerEventHandler".into(),
                message: format!("{message} (host {host}, port {port}, {attempt} attempt(s))"),
            });
        }
        tracing::warn!("bitbake-live: could not register the event handler: {message}, retrying");
        tokio::time::sleep(opts.register_retry_delay).await;
    };
    update(&|p| p.handle = Some(handle));
    if stop() {
        return Ok(());
    }

    if !opts.features.is_empty() {
        let features = Value::Array(opts.features.iter().map(|f| Value::Int(*f)).collect());
        caller
            .run_command(vec![Value::str("setFeatures"), features])
            .await?;
    }

    let Some(targets) = &opts.targets else {
        caller.set_token("observer");
        set_event_mask(opts, &caller, handle).await?;
        return Ok(());
    };

    let token = caller.call("addClient", &[]).await?;
    let token = match token {
        Value::String(t) if !t.is_empty() => t,
        Value::Nil => {
            return Err(LiveError::Refused {
                server: opts.server.clone(),
                call: "addClient".into(),
                message: "the server already has a UI client (observe instead?)".into(),
            })
        }
        other => {
            return Err(LiveError::BadResponse {
                server: opts.server.clone(),
                call: "addClient".into(),
                reason: format!("expected a token, got {}", describe(&other)),
            })
        }
    };
    update(&|p| p.client_added = true);
    caller.set_token(&token);
    if stop() {
        return Ok(());
    }

    let env = match &opts.env {
        Some(env) => env.clone(),
        None => std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect(),
    };
    let argv = opts.argv.clone().unwrap_or_else(|| {
        std::iter::once("bitbake".to_string())
            .chain(targets.iter().cloned())
            .collect()
    });
    caller
        .run_command(vec![
            Value::str("updateConfig"),
            Value::Struct(opts.config.clone()),
            Value::Struct(
                env.into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect(),
            ),
            Value::strings(argv),
        ])
        .await?;
    if stop() {
        return Ok(());
    }
    set_event_mask(opts, &caller, handle).await?;
    if stop() {
        return Ok(());
    }

    let started = caller
        .run_command(vec![
            Value::str("buildTargets"),
            Value::strings(targets.iter().cloned()),
            Value::str(&opts.task),
        ])
        .await?;
    if !truthy(&started) {
        return Err(LiveError::Refused {
            server: opts.server.clone(),
            call: "runCommand(buildTargets)".into(),
            message: format!(
                "the command was not started (returned {})",
                describe(&started)
            ),
        });
    }
    update(&|p| p.build_started = true);
    Ok(())
}

async fn set_event_mask(opts: &LiveOptions, caller: &Caller, handle: i64) -> Result<(), LiveError> {
    let r = caller
        .run_command(vec![
            Value::str("setEventMask"),
            Value::Int(handle),
            Value::Int(opts.log_level),
            Value::Struct(Vec::new()),
            Value::strings(opts.event_mask.iter().cloned()),
        ])
        .await?;
    if truthy(&r) {
        Ok(())
    } else {
        Err(LiveError::Refused {
            server: opts.server.clone(),
            call: "runCommand(setEventMask)".into(),
            message: format!(
                "the server did not set the mask (returned {})",
                describe(&r)
            ),
        })
    }
}

// ------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> (Arc<EventPort>, mpsc::UnboundedReceiver<Queued>) {
        port_waiting(Duration::from_millis(50))
    }

    /// An event port with room for two events.
    fn port_waiting(max_wait: Duration) -> (Arc<EventPort>, mpsc::UnboundedReceiver<Queued>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let p = Arc::new(EventPort {
            tx,
            seq: Mutex::new(0),
            room: Arc::new(Semaphore::new(2)),
            max_wait,
            limits: xmlrpc::Limits::default(),
            rejected: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
        });
        (p, rx)
    }

    fn call(body: impl Into<Bytes>) -> HttpCall {
        HttpCall {
            headers: HeaderMap::new(),
            body: body.into(),
        }
    }

    fn seqs(rx: &mut mpsc::UnboundedReceiver<Queued>) -> Vec<Option<u64>> {
        let mut out = Vec::new();
        while let Ok(q) = rx.try_recv() {
            out.push(match q {
                Queued::Event { seq, .. } => Some(seq),
                Queued::Quit => None,
            });
        }
        out
    }

    #[tokio::test]
    async fn the_event_port_answers_nil_and_faults_only_unreadable_calls() {
        let (p, mut rx) = port();
        let ok = xmlrpc::encode_call(
            "event.sendpickle",
            &[Value::Base64(b"not a pickle".to_vec())],
        );
        let nil = xmlrpc::encode_response(&Value::Nil);
        assert_eq!(p.handle(call(ok.clone())).await, nil);
        let fault =
            |s: String| match xmlrpc::parse_response(s.as_bytes(), &xmlrpc::Limits::default())
                .unwrap()
            {
                MethodResponse::Fault { code, message } => (code, message),
                other => panic!("not a fault: {other:?}"),
            };
        assert_eq!(fault(p.handle(call("garbage")).await).0, FAULT_PARSE);
        let s = xmlrpc::encode_call("event.sendpickle", &[Value::str("gASV")]);
        assert_eq!(
            fault(p.handle(call(s)).await),
            (
                FAULT_PARAMS,
                "event.sendpickle takes one base64 param, got a string".into()
            )
        );
        let two = xmlrpc::encode_call("event.sendpickle", &[Value::Nil, Value::Nil]);
        assert_eq!(fault(p.handle(call(two)).await).0, FAULT_PARAMS);
        let other = xmlrpc::encode_call("os.system", &[Value::str("rm -rf /")]);
        assert_eq!(fault(p.handle(call(other)).await).0, FAULT_NO_METHOD);
        assert_eq!(p.rejected.load(Ordering::Relaxed), 4);
        assert_eq!(
            p.handle(call(xmlrpc::encode_call("event.quit", &[]))).await,
            nil
        );
        assert_eq!(p.handle(call(ok)).await, nil);
        assert_eq!(seqs(&mut rx), vec![Some(1), None, Some(2)]);
    }

    #[tokio::test]
    async fn a_full_queue_delays_the_answer_until_there_is_room() {
        let (p, mut rx) = port_waiting(Duration::from_secs(30));
        let ev = xmlrpc::encode_call("event.sendpickle", &[Value::Base64(vec![1])]);
        for _ in 0..2 {
            p.handle(call(ev.clone())).await;
        }
        let third = {
            let p = p.clone();
            let ev = ev.clone();
            tokio::spawn(async move { p.handle(call(ev)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !third.is_finished(),
            "the answer waits while the queue is full"
        );
        // Taking one event off the queue makes room.
        drop(rx.try_recv().unwrap());
        let answer = tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .expect("answered once there is room")
            .unwrap();
        assert_eq!(answer, xmlrpc::encode_response(&Value::Nil));
        assert_eq!(p.overflowed.load(Ordering::Relaxed), 0);
        assert_eq!(seqs(&mut rx), vec![Some(2), Some(3)]);
    }

    #[tokio::test]
    async fn a_queue_full_for_too_long_overflows_in_order() {
        let (p, mut rx) = port();
        let ev = xmlrpc::encode_call("event.sendpickle", &[Value::Base64(vec![1])]);
        for _ in 0..3 {
            p.handle(call(ev.clone())).await;
        }
        assert_eq!(p.overflowed.load(Ordering::Relaxed), 1);
        assert_eq!(seqs(&mut rx), vec![Some(1), Some(2), Some(3)]);
    }

    #[tokio::test]
    async fn serves_one_call_per_connection_and_refuses_other_requests() {
        let (p, mut rx) = port();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handler: Handler = {
            let p = p.clone();
            Arc::new(move |c| {
                let p = p.clone();
                Box::pin(async move { p.handle(c).await })
            })
        };
        let limits = ServeLimits {
            max_body: 1000,
            max_connections: 4,
            read_timeout: Duration::from_secs(5),
        };
        let served = serve(listener, limits, handler);
        let mut client = HttpClient::new(
            &addr,
            vec![("Content-Type", "text/xml".into())],
            true,
            1 << 20,
        );
        for i in 0..3u8 {
            let body = xmlrpc::encode_call("event.sendpickle", &[Value::Base64(vec![i])]);
            let (status, answer) = client.post(&[], Bytes::from(body)).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                xmlrpc::parse_response(&answer, &xmlrpc::Limits::default()).unwrap(),
                MethodResponse::Success(Value::Nil)
            );
        }
        // An HTTP/1.1 request as Python sends it: answered, then the server closes.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = xmlrpc::encode_call("event.sendpickle", &[Value::Base64(vec![9])]);
        let req = format!(
            "POST / HTTP/1.1\r\nHost: {addr}\r\nAccept-Encoding: gzip\r\nContent-Type: text/xml\r\n\
             User-Agent: Python-xmlrpc/3.11\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("the server closes the connection")
            .unwrap();
        let lower = out.to_ascii_lowercase();
        assert!(lower.starts_with("http/1.1 200 ok\r\n"), "{out}");
        assert!(lower.contains("\r\nconnection: close\r\n"), "{out}");
        assert!(lower.contains("\r\ncontent-type: text/xml\r\n"), "{out}");
        assert!(
            out.ends_with(&xmlrpc::encode_response(&Value::Nil)),
            "{out}"
        );
        let (status, _) = client
            .post(&[], Bytes::from(vec![b'x'; 2000]))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

        // A raw GET, and a POST elsewhere.
        for (req, want) in [
            ("GET / HTTP/1.0\r\n\r\n", "501"),
            ("POST /x HTTP/1.0\r\nContent-Length: 0\r\n\r\n", "404"),
        ] {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            assert!(
                out.starts_with(&format!("HTTP/1.0 {want}"))
                    || out.starts_with(&format!("HTTP/1.1 {want}")),
                "{out}"
            );
        }
        served.stop().await;
        assert!(
            TcpStream::connect(&addr).await.is_err(),
            "stopped listening"
        );
        assert_eq!(seqs(&mut rx), vec![Some(1), Some(2), Some(3), Some(4)]);
    }

    #[test]
    fn options_are_checked() {
        let e = |o: LiveOptions| validate(&o).unwrap_err().to_string();
        assert!(e(LiveOptions::build("nohost", vec!["x".into()])).contains("not HOST:PORT"));
        assert!(e(LiveOptions::build("h:99999", vec!["x".into()])).contains("not HOST:PORT"));
        assert!(e(LiveOptions::build("h:1", vec![])).contains("no targets"));
        assert!(validate(&LiveOptions::observe("[::1]:8888")).is_ok());
        let o = LiveOptions::observe("h:1");
        assert!(o.is_observer() && o.features.is_empty() && o.fetch_variables);
        let b = LiveOptions::build("h:1", vec!["t".into()]);
        assert_eq!(b.features, TOASTER_FEATURES);
        let cfg = Value::Struct(b.config.clone());
        assert_eq!(cfg.get("profile"), Some(&Value::Array(vec![])));
    }

    #[tokio::test]
    async fn advertises_a_reachable_host() {
        let mut o = LiveOptions::observe("127.0.0.1:1");
        let any: SocketAddr = "0.0.0.0:5555".parse().unwrap();
        assert_eq!(advertise_host(&o, any).await, "127.0.0.1");
        assert_eq!(
            advertise_host(&o, "127.0.0.2:1".parse().unwrap()).await,
            "127.0.0.2"
        );
        o.advertise = Some("ui.example".into());
        assert_eq!(advertise_host(&o, any).await, "ui.example");
    }

    #[test]
    fn command_errors_follow_python_truthiness() {
        assert_eq!(error_text(&Value::Nil), None);
        assert_eq!(error_text(&Value::str("")), None);
        assert_eq!(
            error_text(&Value::str("Cooker is busy: parsing")).as_deref(),
            Some("Cooker is busy: parsing")
        );
        assert!(
            truthy(&Value::Bool(true)) && !truthy(&Value::Nil) && !truthy(&Value::Array(vec![]))
        );
    }
}
