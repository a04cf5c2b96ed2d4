//! A fake BitBake XML-RPC server that replays a recorded live session, for tests and
//! demos of the live interface (`buildbus::sources::bitbake_live`).
//!
//! It answers a UI's calls with the recorded answers (`live-session.json`), and, once
//! the UI has started a build (`buildTargets`; or right after `registerEventHandler`
//! for an observer), calls the UI's `event.sendpickle` once per recorded event, in the
//! order the real UI received them (`live-calls.jsonl`), with the pickles of the event
//! log written during the same session (`live-xmlrpc.eventlog`). The body of each call
//! is byte for byte what the real server sent: Python's `xmlrpc.client` puts
//! `base64.encodebytes(pickle)` (76-column lines) in `<base64>`, which is exactly the
//! `vars` text of the event log; [`ReplayData::load`] checks that for every event.
//!
//! The event log and the UI saw the same 686 events, but not quite in the same order:
//! parser processes fire their events (`Recipe*`, `ParseProgress`) concurrently, and
//! 23 of them are up to 3 places apart. The call log has no pickles, only each call's
//! class and size, so each call is matched with the earliest unused event of the log
//! with that class and size; a call with no match is an error.
//!
//! Every call the server receives is recorded ([`RecordedCall`]: method, params,
//! `Bitbake-token`, headers), and so is the UI's answer to every event
//! ([`Delivery`]), so tests can check the UI's side of the protocol.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use buildbus::decode::xmlrpc::{self, MethodResponse, Value};
use buildbus::sources::bitbake_live::{serve, Handler, HttpCall, HttpClient, ServeLimits, Served};

/// The standard file names in a fixture directory.
pub const SESSION_FILE: &str = "live-session.json";
pub const CALLS_FILE: &str = "live-calls.jsonl";
pub const EVENTLOG_FILE: &str = "live-xmlrpc.eventlog";

// ------------------------------------------------------------------------------------
// The recording
// ------------------------------------------------------------------------------------

/// One event as the server sent it.
#[derive(Debug, Clone)]
pub struct ReplayEvent {
    /// Its line in the call log (0-based): the order of sending.
    pub call: usize,
    /// Its line in the event log (1-based).
    pub log_line: usize,
    pub class: String,
    /// The event log's `vars`: the base64 text of the `<base64>` param.
    pub vars: String,
    /// The pickle.
    pub pickle: Vec<u8>,
}

/// One of the first raw HTTP requests the real server sent to the recording UI.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// A recorded session, ready to replay.
#[derive(Debug, Clone)]
pub struct ReplayData {
    /// Answers by method name, or by command name for `runCommand`
    /// (`"getVariable MACHINE"` for `getVariable`).
    pub responses: serde_json::Map<String, serde_json::Value>,
    /// Where the recording UI listened.
    pub ui_listen: Option<(String, u16)>,
    pub raw_requests: Vec<RawRequest>,
    /// The events in the order they were sent.
    pub events: Vec<ReplayEvent>,
    /// The event log's `allvariables` (the answer to `getAllKeysWithFlags`).
    pub allvariables: Option<serde_json::Value>,
}

/// A recording that cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}:{line}: {message}", path.display())]
    Format {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("call {call} ({class}, {bytes} bytes): {message}")]
    Mismatch {
        call: usize,
        class: String,
        bytes: u64,
        message: String,
    },
}

impl ReplayData {
    /// Loads `live-session.json`, `live-calls.jsonl` and `live-xmlrpc.eventlog` from
    /// `dir`.
    pub fn load_dir(dir: &Path) -> Result<ReplayData, ReplayError> {
        ReplayData::load(
            &dir.join(SESSION_FILE),
            &dir.join(CALLS_FILE),
            &dir.join(EVENTLOG_FILE),
        )
    }

    /// Loads a recording and puts the events of `eventlog` in the order of `calls`,
    /// checking class and size call by call.
    pub fn load(session: &Path, calls: &Path, eventlog: &Path) -> Result<ReplayData, ReplayError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| ReplayError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let format = |p: &Path, line: usize, message: String| ReplayError::Format {
            path: p.to_path_buf(),
            line,
            message,
        };

        let s: serde_json::Value = serde_json::from_str(&read(session)?)
            .map_err(|e| format(session, e.line(), e.to_string()))?;
        let responses = s
            .get("responses")
            .and_then(|r| r.as_object())
            .cloned()
            .ok_or_else(|| format(session, 0, "no \"responses\" object".into()))?;
        let ui_listen = s.get("ui_listen").and_then(|u| {
            Some((
                u.get(0)?.as_str()?.to_string(),
                u16::try_from(u.get(1)?.as_u64()?).ok()?,
            ))
        });
        let raw_requests = s
            .get("raw_requests")
            .and_then(|r| r.as_array())
            .map(|a| {
                a.iter()
                    .map(|r| RawRequest {
                        path: r["path"].as_str().unwrap_or("/").to_string(),
                        headers: r["headers"]
                            .as_object()
                            .map(|h| {
                                h.iter()
                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        body: r["body"].as_str().unwrap_or("").to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();

        // The event log: events and the variables.
        let mut logged: Vec<(usize, String, String, Vec<u8>)> = Vec::new();
        let mut allvariables = None;
        for (i, line) in read(eventlog)?.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let n = i + 1;
            let j: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format(eventlog, n, e.to_string()))?;
            if let Some(v) = j.get("allvariables") {
                allvariables = Some(v.clone());
                continue;
            }
            let (Some(class), Some(vars)) = (j["class"].as_str(), j["vars"].as_str()) else {
                return Err(format(
                    eventlog,
                    n,
                    "neither an event nor allvariables".into(),
                ));
            };
            let pickle = xmlrpc::decode_base64(vars).map_err(|e| format(eventlog, n, e))?;
            if xmlrpc::encode_base64_lines(&pickle) != vars {
                return Err(format(
                    eventlog,
                    n,
                    "vars is not in Python's base64.encodebytes form, so the call body would differ".into(),
                ));
            }
            logged.push((n, class.to_string(), vars.to_string(), pickle));
        }

        // The calls, matched to the log.
        let mut by_class: HashMap<&str, Vec<usize>> = HashMap::new();
        for (k, (_, class, _, _)) in logged.iter().enumerate() {
            by_class.entry(class.as_str()).or_default().push(k);
        }
        let mut used = vec![false; logged.len()];
        let mut events = Vec::new();
        for (i, line) in read(calls)?.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let j: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format(calls, i + 1, e.to_string()))?;
            if j["method"].as_str() != Some("event.sendpickle") {
                continue;
            }
            let class = j["class"].as_str().unwrap_or_default().to_string();
            let bytes = j["bytes"].as_u64().unwrap_or(u64::MAX);
            let mismatch = |message: String| ReplayError::Mismatch {
                call: i,
                class: class.clone(),
                bytes,
                message,
            };
            let k = by_class
                .get(class.as_str())
                .and_then(|ks| {
                    ks.iter()
                        .copied()
                        .find(|&k| !used[k] && logged[k].3.len() as u64 == bytes)
                })
                .ok_or_else(|| {
                    mismatch("no unused event of this class and size in the event log".into())
                })?;
            used[k] = true;
            let (log_line, class, vars, pickle) = logged[k].clone();
            if let Some(proto) = j["pickle_proto"].as_u64() {
                if pickle.first() != Some(&0x80) || u64::from(pickle[1]) != proto {
                    return Err(mismatch(format!("not a protocol {proto} pickle")));
                }
            }
            events.push(ReplayEvent {
                call: i,
                log_line,
                class,
                vars,
                pickle,
            });
        }
        if let Some(k) = used.iter().position(|u| !u) {
            return Err(format(
                eventlog,
                logged[k].0,
                format!("event {} was logged but never sent to the UI", logged[k].1),
            ));
        }
        Ok(ReplayData {
            responses,
            ui_listen,
            raw_requests,
            events,
            allvariables,
        })
    }

    /// The body of the `event.sendpickle` call for event `i`.
    pub fn body(&self, i: usize) -> Option<String> {
        let ev = self.events.get(i)?;
        Some(xmlrpc::encode_call(
            "event.sendpickle",
            &[Value::Base64(ev.pickle.clone())],
        ))
    }

    fn answer(&self, key: &str) -> Option<Value> {
        self.responses.get(key).map(Value::from_json)
    }
}

// ------------------------------------------------------------------------------------
// The server
// ------------------------------------------------------------------------------------

/// When the events are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStart {
    /// After answering `runCommand(["buildTargets", …])`.
    AfterBuildTargets,
    /// After answering a successful `registerEventHandler` (for observers).
    AfterRegister,
}

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Default `127.0.0.1:0`.
    pub listen: SocketAddr,
    pub start: ReplayStart,
    /// Answer `[null, busy_message]` to this many `registerEventHandler` calls first.
    pub busy_registrations: u32,
    pub busy_message: String,
    /// Raw bodies POSTed to the UI's event port before event `i` (`i` = the number of
    /// events sent before; the length of the list sends after the last).
    pub inject: Vec<(usize, Vec<u8>)>,
    /// Send only the first events.
    pub max_events: Option<usize>,
    /// Call `event.quit` after the last event.
    pub send_quit: bool,
    /// The `User-Agent` of the calls to the UI.
    pub user_agent: String,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            start: ReplayStart::AfterBuildTargets,
            busy_registrations: 0,
            busy_message: "Cooker is busy: parsing".into(),
            inject: Vec::new(),
            max_events: None,
            send_quit: false,
            user_agent: "Python-xmlrpc/3.11".into(),
        }
    }
}

/// A call the server received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedCall {
    pub method: String,
    pub params: Vec<Value>,
    /// The `Bitbake-token` header.
    pub token: Option<String>,
    /// Every header (lower-case names), in the order received.
    pub headers: Vec<(String, String)>,
}

impl RecordedCall {
    /// The command of a `runCommand` (`"buildTargets"`).
    pub fn command(&self) -> Option<&str> {
        if self.method != "runCommand" {
            return None;
        }
        self.params.first()?.as_array()?.first()?.as_str()
    }

    /// `runCommand(buildTargets)`, or the method name.
    pub fn label(&self) -> String {
        match self.command() {
            Some(c) => format!("runCommand({c})"),
            None => self.method.clone(),
        }
    }
}

/// The UI's answer to one call the server made.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The event (index in [`ReplayData::events`]); `None` for injected bodies and
    /// `event.quit`.
    pub event: Option<usize>,
    /// The HTTP status.
    pub status: Option<u16>,
    /// The parsed answer, or why there is none.
    pub answer: Result<MethodResponse, String>,
}

struct Shared {
    data: Arc<ReplayData>,
    opts: ReplayOptions,
    calls: Mutex<Vec<RecordedCall>>,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    registrations: AtomicU32,
    /// Where the registered UI listens.
    ui: Mutex<Option<(String, u16)>>,
    started: AtomicBool,
    sent: watch::Sender<bool>,
    sender: Mutex<Option<JoinHandle<()>>>,
}

/// A running replay server.
pub struct ReplayServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    served: Served,
}

impl ReplayServer {
    /// Starts serving on `opts.listen`.
    pub async fn start(data: Arc<ReplayData>, opts: ReplayOptions) -> io::Result<ReplayServer> {
        let listener = TcpListener::bind(opts.listen).await?;
        let addr = listener.local_addr()?;
        let (sent, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            data,
            opts,
            calls: Mutex::new(Vec::new()),
            deliveries: Arc::new(Mutex::new(Vec::new())),
            registrations: AtomicU32::new(0),
            ui: Mutex::new(None),
            started: AtomicBool::new(false),
            sent,
            sender: Mutex::new(None),
        });
        let handler: Handler = {
            let shared = shared.clone();
            Arc::new(move |call| {
                let shared = shared.clone();
                Box::pin(async move { shared.handle(call) })
            })
        };
        let served = serve(
            listener,
            ServeLimits {
                max_body: 64 << 20,
                max_connections: 64,
                read_timeout: Duration::from_secs(30),
            },
            handler,
        );
        Ok(ReplayServer {
            addr,
            shared,
            served,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The calls received so far, in order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        lock(&self.shared.calls).clone()
    }

    /// The UI's answers so far, in order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        lock(&self.shared.deliveries).clone()
    }

    /// Waits until every event has been sent (or sending stopped on an error).
    pub async fn wait_sent(&self) {
        let mut rx = self.shared.sent.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Stops sending and serving: afterwards connections are refused.
    pub async fn stop(self) {
        if let Some(t) = lock(&self.shared.sender).take() {
            t.abort();
        }
        self.served.stop().await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn fault_not_supported(method: &str) -> String {
    // What Python's SimpleXMLRPCDispatcher answers.
    xmlrpc::encode_fault(
        1,
        &format!("<class 'Exception'>:method \"{method}\" is not supported"),
    )
}

impl Shared {
    fn handle(self: &Arc<Self>, call: HttpCall) -> String {
        let parsed = match xmlrpc::parse_call(&call.body, &xmlrpc::Limits::default()) {
            Ok(c) => c,
            Err(e) => {
                return xmlrpc::encode_fault(
                    1,
                    &format!("<class 'xml.parsers.expat.ExpatError'>:{e}"),
                )
            }
        };
        let headers: Vec<(String, String)> = call
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let token = headers
            .iter()
            .find(|(k, _)| k == "bitbake-token")
            .map(|(_, v)| v.clone());
        let rec = RecordedCall {
            method: parsed.method.clone(),
            params: parsed.params.clone(),
            token,
            headers,
        };
        let command = rec.command().map(str::to_string);
        lock(&self.calls).push(rec);

        let nil_pair = || Value::Array(vec![Value::Nil, Value::Nil]);
        let answer = match parsed.method.as_str() {
            "registerEventHandler" => {
                let n = self.registrations.fetch_add(1, Ordering::SeqCst) + 1;
                if n <= self.opts.busy_registrations {
                    Value::Array(vec![Value::Nil, Value::str(&self.opts.busy_message)])
                } else {
                    let ui = match parsed.params.as_slice() {
                        [Value::String(h), Value::Int(p)] => {
                            u16::try_from(*p).ok().map(|p| (h.clone(), p))
                        }
                        _ => None,
                    };
                    let Some(ui) = ui else {
                        return xmlrpc::encode_fault(
                            1,
                            "<class 'TypeError'>:registerEventHandler(host, port)",
                        );
                    };
                    if self.opts.start == ReplayStart::AfterRegister {
                        self.start_sending(ui);
                    } else {
                        *lock(&self.ui) = Some(ui);
                    }
                    self.data
                        .answer("registerEventHandler")
                        .unwrap_or(Value::Array(vec![Value::Int(1), Value::str("OK")]))
                }
            }
            "runCommand" => {
                let Some(name) = command else {
                    return xmlrpc::encode_fault(
                        1,
                        "<class 'TypeError'>:runCommand([command, ...])",
                    );
                };
                let args = parsed.params[0].as_array().unwrap_or(&[]);
                match name.as_str() {
                    "getVariable" => {
                        let var = args.get(1).and_then(Value::as_str).unwrap_or_default();
                        self.data
                            .answer(&format!("getVariable {var}"))
                            .unwrap_or_else(nil_pair)
                    }
                    "getAllKeysWithFlags" => match &self.data.allvariables {
                        Some(v) => Value::Array(vec![Value::from_json(v), Value::Nil]),
                        None => Value::Array(vec![Value::Nil, Value::str("no variables recorded")]),
                    },
                    "stateShutdown" | "stateForceShutdown" => nil_pair(),
                    "buildTargets" => {
                        let a = self
                            .data
                            .answer("buildTargets")
                            .unwrap_or(Value::Array(vec![Value::Bool(true), Value::Nil]));
                        if self.opts.start == ReplayStart::AfterBuildTargets {
                            if let Some(ui) = lock(&self.ui).clone() {
                                self.start_sending(ui);
                            }
                        }
                        a
                    }
                    other => self.data.answer(other).unwrap_or_else(|| {
                        Value::Array(vec![
                            Value::Nil,
                            Value::String(format!("No such command: {other}")),
                        ])
                    }),
                }
            }
            "addClient" | "getEventHandle" | "unregisterEventHandler" | "removeClient" => {
                self.data.answer(&parsed.method).unwrap_or(Value::Nil)
            }
            "terminateServer" => Value::Nil,
            other => return fault_not_supported(other),
        };
        xmlrpc::encode_response(&answer)
    }

    fn start_sending(self: &Arc<Self>, ui: (String, u16)) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        let task = tokio::spawn(async move { me.send_all(ui).await });
        *lock(&self.sender) = Some(task);
    }

    async fn send_all(self: Arc<Self>, (host, port): (String, u16)) {
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut client = HttpClient::new(
            &addr,
            vec![
                ("Accept-Encoding", "gzip".into()),
                ("Content-Type", "text/xml".into()),
                ("User-Agent", self.opts.user_agent.clone()),
            ],
            true,
            1 << 20,
        );
        let n = self
            .opts
            .max_events
            .unwrap_or(usize::MAX)
            .min(self.data.events.len());
        for i in 0..=n {
            for (_, body) in self.opts.inject.iter().filter(|(at, _)| *at == i) {
                let d = post(&mut client, None, Bytes::from(body.clone())).await;
                lock(&self.deliveries).push(d);
            }
            if i == n {
                break;
            }
            let body = self.data.body(i).unwrap_or_default();
            let d = post(&mut client, Some(i), Bytes::from(body)).await;
            // Like BitBake, stop sending to a UI that failed or answered a fault.
            let failed = !matches!(d.answer, Ok(MethodResponse::Success(_)));
            lock(&self.deliveries).push(d);
            if failed {
                break;
            }
        }
        if self.opts.send_quit {
            let body = xmlrpc::encode_call("event.quit", &[]);
            let d = post(&mut client, None, Bytes::from(body)).await;
            lock(&self.deliveries).push(d);
        }
        let _ = self.sent.send(true);
    }
}

async fn post(client: &mut HttpClient, event: Option<usize>, body: Bytes) -> Delivery {
    match client.post(&[], body).await {
        Ok((status, answer)) => Delivery {
            event,
            status: Some(status.as_u16()),
            answer: if status.is_success() {
                xmlrpc::parse_response(&answer, &xmlrpc::Limits::default())
                    .map_err(|e| e.to_string())
            } else {
                Err(format!("HTTP status {status}"))
            },
        },
        Err(e) => Delivery {
            event,
            status: None,
            answer: Err(e.to_string()),
        },
    }
}

// ------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bitbake")
    }

    #[test]
    fn loads_the_recording_in_call_order_with_the_exact_bodies() {
        let d = ReplayData::load_dir(&dir()).unwrap();
        assert_eq!(d.events.len(), 686);
        assert!(d.events.iter().enumerate().all(|(i, e)| e.call == i));
        let calls: Vec<serde_json::Value> = std::fs::read_to_string(dir().join(CALLS_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for (ev, c) in d.events.iter().zip(&calls) {
            assert_eq!(ev.class, c["class"].as_str().unwrap());
            assert_eq!(ev.pickle.len() as u64, c["bytes"].as_u64().unwrap());
        }
        // The event log is in another order for 23 parse events, by at most 3 places
        // (the allvariables line, 88, shifts the later lines by one).
        let moved: Vec<_> = d
            .events
            .iter()
            .enumerate()
            .filter(|(i, e)| e.log_line != i + 1 + usize::from(e.log_line > 88))
            .map(|(i, e)| (i, e.log_line as i64 - (i as i64 + 1)))
            .collect();
        assert_eq!(moved.len(), 23, "{moved:?}");
        assert!(
            moved.iter().all(|(i, off)| *i < 70 && off.abs() <= 3),
            "{moved:?}"
        );

        // Every body is the template around the event log's vars, and the first three
        // are the raw requests recorded from the real server, byte for byte.
        for i in 0..d.events.len() {
            let want = format!(
                "<?xml version='1.0'?>\n<methodCall>\n<methodName>event.sendpickle</methodName>\n\
                 <params>\n<param>\n<value><base64>\n{}</base64></value>\n</param>\n</params>\n</methodCall>\n",
                d.events[i].vars
            );
            assert_eq!(d.body(i).unwrap(), want, "event {i}");
        }
        assert_eq!(d.raw_requests.len(), 3);
        for (i, r) in d.raw_requests.iter().enumerate() {
            assert_eq!(d.body(i).unwrap(), r.body);
            assert_eq!(r.path, "/", "request {i} went to the UI's root");
            let mut names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            assert_eq!(
                names,
                [
                    "Accept-Encoding",
                    "Content-Length",
                    "Content-Type",
                    "Host",
                    "User-Agent"
                ]
            );
        }
        let vars = d.allvariables.as_ref().unwrap().as_object().unwrap();
        assert_eq!(vars.len(), 112);
        assert_eq!(d.ui_listen, Some(("127.0.0.1".into(), 38213)));
    }

    #[test]
    fn a_call_without_its_event_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for f in [SESSION_FILE, EVENTLOG_FILE] {
            std::fs::copy(dir().join(f), tmp.path().join(f)).unwrap();
        }
        let calls = std::fs::read_to_string(dir().join(CALLS_FILE)).unwrap();
        let bad = calls.replacen("\"bytes\": 55,", "\"bytes\": 56,", 1);
        std::fs::write(tmp.path().join(CALLS_FILE), bad).unwrap();
        let e = ReplayData::load_dir(tmp.path()).unwrap_err().to_string();
        assert_eq!(e, "call 0 (bb.event.ConfigParsed, 56 bytes): no unused event of this class and size in the event log");
        let short: String = calls.lines().skip(1).map(|l| format!("{l}\n")).collect();
        std::fs::write(tmp.path().join(CALLS_FILE), short).unwrap();
        let e = ReplayData::load_dir(tmp.path()).unwrap_err().to_string();
        assert!(
            e.ends_with(": event bb.event.ConfigParsed was logged but never sent to the UI"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn answers_like_the_recorded_server_and_records_calls() {
        let d = Arc::new(ReplayData::load_dir(&dir()).unwrap());
        let opts = ReplayOptions {
            busy_registrations: 1,
            ..ReplayOptions::default()
        };
        let server = ReplayServer::start(d, opts).await.unwrap();
        let addr = server.addr().to_string();
        let call = |method: &'static str, params: Vec<Value>| {
            let body = Bytes::from(xmlrpc::encode_call(method, &params));
            let addr = addr.clone();
            async move {
                let mut c =
                    HttpClient::new(&addr, vec![("Bitbake-token", "tok".into())], false, 1 << 24);
                let (_, a) = c.post(&[], body).await.unwrap();
                xmlrpc::parse_response(&a, &xmlrpc::Limits::default()).unwrap()
            }
        };
        let ok = |v: Value| MethodResponse::Success(v);
        let reg = vec![Value::str("127.0.0.1"), Value::Int(1)];
        assert_eq!(
            call("registerEventHandler", reg.clone()).await,
            ok(Value::Array(vec![
                Value::Nil,
                Value::str("Cooker is busy: parsing")
            ]))
        );
        assert_eq!(
            call("registerEventHandler", reg).await,
            ok(Value::Array(vec![Value::Int(1), Value::str("OK")]))
        );
        assert_eq!(
            call("addClient", vec![]).await,
            ok(Value::str("60d237d0e2c07ed87a3c4babd2cd3626"))
        );
        let getvar = Value::Array(vec![Value::str("getVariable"), Value::str("MACHINE")]);
        assert_eq!(
            call("runCommand", vec![getvar]).await,
            ok(Value::Array(vec![
                Value::str("demo-qemux86-64"),
                Value::Nil
            ]))
        );
        let keys = Value::Array(vec![
            Value::str("getAllKeysWithFlags"),
            Value::strings(["doc", "func"]),
        ]);
        match call("runCommand", vec![keys]).await {
            MethodResponse::Success(Value::Array(pair)) => {
                assert_eq!(
                    pair[0].get("MACHINE").and_then(|m| m.get("v")),
                    Some(&Value::str("demo-qemux86-64"))
                );
            }
            other => panic!("{other:?}"),
        }
        match call("nosuch", vec![]).await {
            MethodResponse::Fault { code: 1, message } => {
                assert!(message.contains("\"nosuch\" is not supported"))
            }
            other => panic!("{other:?}"),
        }
        let calls = server.calls();
        assert_eq!(calls.len(), 6);
        assert_eq!(calls[3].label(), "runCommand(getVariable)");
        assert_eq!(calls[0].token.as_deref(), Some("tok"));
        assert!(
            server.deliveries().is_empty(),
            "nothing sent before buildTargets"
        );
        server.stop().await;
        assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
    }

    #[tokio::test]
    async fn sends_what_the_real_server_sent_on_the_wire() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let d = Arc::new(ReplayData::load_dir(&dir()).unwrap());
        let raw = d.raw_requests.clone();
        let opts = ReplayOptions {
            start: ReplayStart::AfterRegister,
            max_events: Some(3),
            ..ReplayOptions::default()
        };
        let server = ReplayServer::start(d, opts).await.unwrap();
        // A bare-socket UI, to see the bytes.
        let ui = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ui_port = ui.local_addr().unwrap().port();
        let mut reg = HttpClient::new(&server.addr().to_string(), vec![], false, 1 << 20);
        let body = xmlrpc::encode_call(
            "registerEventHandler",
            &[Value::str("127.0.0.1"), Value::Int(i64::from(ui_port))],
        );
        reg.post(&[], Bytes::from(body)).await.unwrap();

        let (mut sock, _) = ui.accept().await.unwrap();
        let nil = xmlrpc::encode_response(&Value::Nil);
        let mut buf = Vec::new();
        for want in &raw {
            // Read one request: the head, then Content-Length bytes.
            let head_end = loop {
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = sock.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed");
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
            let mut lines = head.split("\r\n");
            assert_eq!(lines.next(), Some("POST / HTTP/1.1"));
            let headers: Vec<(String, String)> = lines
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once(": ").unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect();
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "Content-Length")
                .unwrap()
                .1
                .parse()
                .unwrap();
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 4096];
                let n = sock.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8(buf[head_end..head_end + len].to_vec()).unwrap();
            buf.drain(..head_end + len);
            assert_eq!(body, want.body);
            let mut got = headers.clone();
            let mut expected: Vec<(String, String)> = want.headers.clone();
            for (k, v) in expected.iter_mut() {
                if k == "Host" {
                    *v = format!("127.0.0.1:{ui_port}");
                }
            }
            got.sort();
            expected.sort();
            assert_eq!(got, expected);
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{nil}",
                nil.len()
            );
            sock.write_all(answer.as_bytes()).await.unwrap();
        }
        server.wait_sent().await;
        let del = server.deliveries();
        assert_eq!(del.len(), 3, "three events on one kept-alive connection");
        assert!(del
            .iter()
            .all(|d| d.answer == Ok(MethodResponse::Success(Value::Nil))));
        server.stop().await;
    }
}
