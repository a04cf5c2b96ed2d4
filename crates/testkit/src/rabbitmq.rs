//! A private RabbitMQ node for tests, the demo and the benchmarks.
//!
//! This file owns [`RabbitNode`]: one `rabbitmq-server` (Debian's package,
//! RabbitMQ 3.10 on Erlang 25 in bookworm) started as a child process, with
//! its own node name (`buildbus-<pid>-<n>@localhost`), its own Erlang cookie,
//! its own epmd, its own ports on 127.0.0.1 and its own folder; never the
//! system-wide broker.
//!
//! How it is isolated (all checked against bookworm's scripts):
//! * The scripts in `/usr/lib/rabbitmq/bin` are run directly. The
//!   `/usr/sbin/rabbitmq*` wrappers would, as root, `su` to the `rabbitmq`
//!   user, `cd /var/lib/rabbitmq` and reset `HOME` (so the system cookie).
//!   RabbitMQ and Erlang run fine as root.
//! * `HOME` points at a private folder holding a fresh `.erlang.cookie`;
//!   both the server and the CLI (`rabbitmqctl`) read the cookie from there.
//! * epmd: a private `epmd -port P -address 127.0.0.1` is started as our
//!   own child, and `ERL_EPMD_PORT=P` makes the server and the CLI use it.
//!   `-start_epmd false` keeps Erlang from ever spawning a stray,
//!   daemonized epmd of its own (it would outlive us). The system epmd on
//!   4369, if any, is never contacted.
//! * Ports: `RABBITMQ_NODE_PORT` (AMQP) and `RABBITMQ_DIST_PORT` (Erlang
//!   distribution), both bound to 127.0.0.1 (`RABBITMQ_NODE_IP_ADDRESS`, and
//!   `-kernel inet_dist_use_interface {127,0,0,1}`). The CLI's own
//!   distribution port is left to the kernel (`RABBITMQ_CTL_DIST_PORT_MIN/MAX
//!   = 0`) rather than the shared default range 35672-35682.
//! * Files: `RABBITMQ_MNESIA_BASE`, `RABBITMQ_LOG_BASE`,
//!   `RABBITMQ_CONFIG_FILE`, `RABBITMQ_CONFIG_FILES`,
//!   `RABBITMQ_ADVANCED_CONFIG_FILE`, `RABBITMQ_ENABLED_PLUGINS_FILE`
//!   (no plugins), `RABBITMQ_PID_FILE` and `RABBITMQ_CONF_ENV_FILE` (so
//!   `/etc/rabbitmq/rabbitmq-env.conf` is not read) all point into the
//!   node's folder. Inherited `RABBITMQ_*`/`ERL_*` variables are removed.
//! * The node name's host is `localhost` (short names), which resolves on
//!   any machine; quorum queues work on this single node.
//!
//! * TLS (optional, [`RabbitNode::start_with_tls`]): a second listener on its own
//!   port (`listeners.ssl.default`) with the given CA, certificate and key, written
//!   to `conf.d/20-tls.conf`; the plain listener stays.
//!
//! The server runs in its own process group, so killing the group takes
//! the start script, the Erlang VM and its helpers at once.

use super::{
    describe, find_program, free_ports, io_err, kill_and_reap, run_ok, tails, tcp_accepts,
    unique_suffix, wait_timeout, InfraError, Result, Watchdog,
};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a start may take before it is given up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit for one `rabbitmqctl` command.
const CTL_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a graceful stop may take before the node is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Where Debian's package puts the real scripts.
const SCRIPTS_DIR: &str = "/usr/lib/rabbitmq/bin";

/// Starts a section of `server.out`/`epmd.out`, one per start.
const MARKER: &str = "=== buildbus: start #";

/// Extra Erlang VM flags for both the server and the CLI.
const ERL_ARGS: &str = "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}";

/// A TLS listener of a node: PEM files, and whether clients must present a
/// certificate signed by `ca_file`.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// `ssl_options.fail_if_no_peer_cert`: refuse clients without a certificate.
    pub require_client_cert: bool,
}

/// A private RabbitMQ node; see the module documentation.
///
/// `Drop` kills the node (and its epmd) if still running and removes the
/// node's folder. The folder is `<base_dir>/rabbitmq-<pid>-<n>`; `base_dir`
/// itself is left alone.
#[derive(Debug)]
pub struct RabbitNode {
    node_name: String,
    dir: PathBuf,
    server_bin: PathBuf,
    ctl_bin: PathBuf,
    epmd_bin: PathBuf,
    amqp_port: u16,
    dist_port: u16,
    epmd_port: u16,
    tls: Option<TlsListener>,
    tls_port: u16,
    epmd: Option<Child>,
    server: Option<Child>,
    starts: u32,
    watchdog: Option<Watchdog>,
}

impl RabbitNode {
    /// Start a new node in a fresh folder under `base_dir` (created if
    /// missing) and wait until it accepts AMQP connections and has fully
    /// booted (at most 60 s).
    pub fn start(base_dir: &Path) -> Result<RabbitNode> {
        Self::start_inner(base_dir, None)
    }

    /// [`start`](RabbitNode::start) with a TLS listener as well
    /// ([`amqps_url`](RabbitNode::amqps_url)).
    pub fn start_with_tls(base_dir: &Path, tls: TlsListener) -> Result<RabbitNode> {
        Self::start_inner(base_dir, Some(tls))
    }

    fn start_inner(base_dir: &Path, tls: Option<TlsListener>) -> Result<RabbitNode> {
        let server_bin = find_program(
            "rabbitmq-server",
            &[&format!("{SCRIPTS_DIR}/rabbitmq-server")],
        )
        .and_then(|p| script_not_wrapper(p, "rabbitmq-server"))?;
        let ctl_bin = find_program("rabbitmqctl", &[&format!("{SCRIPTS_DIR}/rabbitmqctl")])
            .and_then(|p| script_not_wrapper(p, "rabbitmqctl"))?;
        let epmd_bin = find_program("epmd", &["/usr/bin/epmd", "/usr/lib/erlang/bin/epmd"])?;

        let suffix = unique_suffix();
        let dir = base_dir.join(format!("rabbitmq-{suffix}"));
        let node_name = format!("buildbus-{suffix}@localhost");

        // From here on, `node`'s Drop cleans up whatever fails.
        let mut node = RabbitNode {
            node_name,
            dir,
            server_bin,
            ctl_bin,
            epmd_bin,
            amqp_port: 0,
            dist_port: 0,
            epmd_port: 0,
            tls,
            tls_port: 0,
            epmd: None,
            server: None,
            starts: 0,
            watchdog: None,
        };
        create_layout(&node.dir)?;
        node.watchdog = Some(Watchdog::spawn(
            "for g in $(cat \"$1/pgids\" 2>/dev/null); do kill -9 -\"$g\" 2>/dev/null; done; \
             sleep 1; rm -rf \"$1\"",
            &[node.dir.as_os_str()],
            &node.dir,
        )?);

        // A port found free may be taken by someone else before the node
        // binds it: then try again with fresh ports.
        let mut attempt = 1;
        loop {
            let ports = free_ports(4)?;
            node.amqp_port = ports[0];
            node.dist_port = ports[1];
            node.epmd_port = ports[2];
            node.tls_port = ports[3];
            node.write_tls_config()?;
            match node.launch() {
                Ok(()) => return Ok(node),
                Err(_) if attempt < 3 && node.port_clash() => {
                    node.kill();
                    if let Some(mut epmd) = node.epmd.take() {
                        kill_and_reap(&mut epmd);
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` (guest may log in over
    /// loopback only, which is all this node listens on).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// `amqps://guest:guest@127.0.0.1:TLS_PORT/%2f`: the TLS listener (only
    /// meaningful for a node started with [`start_with_tls`](RabbitNode::start_with_tls)).
    pub fn amqps_url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.tls_port)
    }

    /// The TLS listener's port on 127.0.0.1 (a node without one listens on none).
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// The AMQP port on 127.0.0.1.
    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// The Erlang node name, `buildbus-<pid>-<n>@localhost`.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The node's own folder (data, logs, config, cookie).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node's main log file.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.node_name))
    }

    /// Whether the server process is running (it may still be booting or
    /// stopping).
    pub fn is_running(&mut self) -> bool {
        match self.server.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Run `rabbitmqctl -n NODE ARGS...` against this node (right cookie,
    /// epmd and environment; 90 s limit) and return its stdout, with ANSI
    /// escape sequences removed.
    pub fn rabbitmqctl(&self, args: &[&str]) -> Result<String> {
        self.ctl(args, CTL_TIMEOUT)
    }

    /// The number of messages (ready + unacknowledged) in queue `queue` of
    /// virtual host `vhost`, asked of the queue itself, so exact at once.
    /// (`rabbitmqctl list_queues` counts for quorum queues come from
    /// metrics that lag by several seconds, especially after a restart.)
    pub fn queue_message_count(&self, vhost: &str, queue: &str) -> Result<u64> {
        let expr = format!(
            "case rabbit_amqqueue:lookup(rabbit_misc:r({}, queue, {})) of \
             {{ok, Q}} -> rabbit_amqqueue:stat(Q); Other -> Other end.",
            erlang_binary(vhost),
            erlang_binary(queue)
        );
        let out = self.rabbitmqctl(&["eval", &expr])?;
        let compact: String = out.chars().filter(|c| !c.is_whitespace()).collect();
        compact
            .strip_prefix("{ok,")
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| InfraError::CommandFailed {
                command: format!("rabbitmqctl -n {} eval {expr}", self.node_name),
                status: "unexpected answer".to_string(),
                output: out,
            })
    }

    /// Stop the node gracefully (`rabbitmqctl stop`; SIGTERM if that fails;
    /// SIGKILL after 30 s). The data stays: [`start_again`] resumes it.
    /// Does nothing if the node is not running.
    ///
    /// [`start_again`]: RabbitNode::start_again
    pub fn stop(&mut self) -> Result<()> {
        if !self.is_running() {
            self.server = None;
            return Ok(());
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let graceful = self.ctl(&["stop"], STOP_TIMEOUT);
        if let Some(mut child) = self.server.take() {
            if graceful.is_err() {
                // The start script traps TERM and stops the VM gracefully.
                let _ = Command::new("/bin/sh")
                    .args(["-c", "kill -15 \"$1\" 2>/dev/null", "sh"])
                    .arg(child.id().to_string())
                    .status();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if wait_timeout(&mut child, left.max(Duration::from_secs(5))).is_none() {
                kill_and_reap(&mut child);
            }
        }
        self.write_pgids();
        Ok(())
    }

    /// Kill the node at once (SIGKILL to the VM and its helpers), as a crash
    /// would. The data that reached the disk stays; [`start_again`] resumes.
    ///
    /// [`start_again`]: RabbitNode::start_again
    pub fn kill(&mut self) {
        if let Some(mut child) = self.server.take() {
            kill_and_reap(&mut child);
        }
        self.write_pgids();
    }

    /// Start the node again after [`stop`] or [`kill`], with the same node
    /// name, ports and data (durable queues and their persistent messages
    /// are back). Does nothing if it is running.
    ///
    /// [`stop`]: RabbitNode::stop
    /// [`kill`]: RabbitNode::kill
    pub fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.launch()
    }

    /// [`stop`](RabbitNode::stop) then [`start_again`](RabbitNode::start_again).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// `conf.d/20-tls.conf`: the TLS listener, if any, on the current TLS port.
    fn write_tls_config(&self) -> Result<()> {
        let Some(t) = &self.tls else {
            return Ok(());
        };
        let p = self.dir.join("conf.d").join("20-tls.conf");
        let text = format!(
            "listeners.ssl.default = 127.0.0.1:{}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = {}\n",
            self.tls_port,
            t.ca_file.display(),
            t.cert_file.display(),
            t.key_file.display(),
            t.require_client_cert
        );
        fs::write(&p, text).map_err(|e| io_err(format!("writing {}", p.display()), e))
    }

    /// The environment every RabbitMQ/Erlang process of this node gets.
    fn env(&self) -> Vec<(&'static str, OsString)> {
        let d = |p: &str| self.dir.join(p).into_os_string();
        let s = |v: &str| OsString::from(v);
        vec![
            ("HOME", d("home")),
            ("LANG", s("C.UTF-8")),
            ("LC_ALL", s("C.UTF-8")),
            ("RABBITMQ_NODENAME", s(&self.node_name)),
            ("RABBITMQ_USE_LONGNAME", s("false")),
            ("RABBITMQ_NODE_IP_ADDRESS", s("127.0.0.1")),
            ("RABBITMQ_NODE_PORT", s(&self.amqp_port.to_string())),
            ("RABBITMQ_DIST_PORT", s(&self.dist_port.to_string())),
            ("ERL_EPMD_PORT", s(&self.epmd_port.to_string())),
            ("ERL_EPMD_ADDRESS", s("127.0.0.1")),
            ("RABBITMQ_MNESIA_BASE", d("mnesia")),
            ("RABBITMQ_LOG_BASE", d("log")),
            ("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf")),
            ("RABBITMQ_CONFIG_FILES", d("conf.d")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins")),
            ("RABBITMQ_PID_FILE", d("rabbitmq.pid")),
            ("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf")),
            ("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", s(ERL_ARGS)),
            ("RABBITMQ_CTL_ERL_ARGS", s(ERL_ARGS)),
            ("RABBITMQ_CTL_DIST_PORT_MIN", s("0")),
            ("RABBITMQ_CTL_DIST_PORT_MAX", s("0")),
            ("ERL_CRASH_DUMP", d("erl_crash.dump")),
        ]
    }

    /// A command for `program` with this node's environment, nothing
    /// inherited that could point it elsewhere, run in the node's folder.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("RABBITMQ_") || k.starts_with("ERL_") || k == "NOTIFY_SOCKET" {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(self.env()).current_dir(&self.dir);
        cmd
    }

    fn ctl(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let mut cmd = self.command(&self.ctl_bin);
        cmd.arg("-n").arg(&self.node_name).args(args);
        run_ok(cmd, timeout).map(|s| strip_ansi(&s))
    }

    /// Make sure our epmd runs (start it if not), start the server, and wait
    /// until it has booted. On failure the server is killed (epmd stays).
    fn launch(&mut self) -> Result<()> {
        let started = Instant::now();
        self.ensure_epmd()?;
        self.starts += 1;
        let out_path = self.dir.join("server.out");
        let mut out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .map_err(|e| io_err(format!("opening {}", out_path.display()), e))?;
        let _ = writeln!(out, "{MARKER}{} ===", self.starts);
        let err = out
            .try_clone()
            .map_err(|e| io_err(format!("opening {}", out_path.display()), e))?;
        let mut cmd = self.command(&self.server_bin);
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = super::spawn(&mut cmd)?;
        self.server = Some(child);
        self.write_pgids();
        match self.wait_booted(started) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.kill();
                Err(e)
            }
        }
    }

    fn wait_booted(&mut self, started: Instant) -> Result<()> {
        let deadline = started + START_TIMEOUT;
        loop {
            let exited = match self.server.as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                return Err(self.start_failed(format!(
                    "rabbitmq-server exited ({}) during boot",
                    super::describe_status(status)
                )));
            }
            if tcp_accepts(self.amqp_port) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(self.start_failed(format!(
                    "AMQP port 127.0.0.1:{} not open after {START_TIMEOUT:?}",
                    self.amqp_port
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
        // The port is open; make sure it is this node and it finished booting.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5));
        let secs = left.as_secs().to_string();
        self.ctl(
            &["await_startup", "--timeout", &secs],
            left + Duration::from_secs(10),
        )
        .map(|_| ())
        .map_err(|e| self.start_failed(format!("node did not finish booting: {e}")))
    }

    fn ensure_epmd(&mut self) -> Result<()> {
        if let Some(child) = self.epmd.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(());
            }
            self.epmd = None;
        }
        let out_path = self.dir.join("epmd.out");
        let mut out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .map_err(|e| io_err(format!("opening {}", out_path.display()), e))?;
        let _ = writeln!(out, "{MARKER}{} (epmd) ===", self.starts + 1);
        let err = out
            .try_clone()
            .map_err(|e| io_err(format!("opening {}", out_path.display()), e))?;
        let mut cmd = self.command(&self.epmd_bin);
        cmd.arg("-port")
            .arg(self.epmd_port.to_string())
            .arg("-address")
            .arg("127.0.0.1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let command = describe(&cmd);
        let mut child = super::spawn(&mut cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut listening = false;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                // epmd exits quietly, status 0, when its port is taken.
                let _ = fs::OpenOptions::new()
                    .append(true)
                    .open(&out_path)
                    .and_then(|mut f| {
                        writeln!(
                            f,
                            "buildbus: epmd exited at once; port {} is probably already in use",
                            self.epmd_port
                        )
                    });
                return Err(InfraError::StartFailed {
                    service: "RabbitMQ",
                    reason: format!(
                        "private epmd `{command}` exited ({})",
                        super::describe_status(status)
                    ),
                    logs: tails(&[&out_path]),
                });
            }
            if listening {
                break;
            }
            if tcp_accepts(self.epmd_port) {
                // Once more round the loop: a foreign listener on the port
                // answers too, and epmd then exits.
                listening = true;
                thread::sleep(Duration::from_millis(50));
                continue;
            }
            if Instant::now() >= deadline {
                kill_and_reap(&mut child);
                return Err(InfraError::StartFailed {
                    service: "RabbitMQ",
                    reason: format!("private epmd `{command}` not listening after 10 s"),
                    logs: tails(&[&out_path]),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.epmd = Some(child);
        self.write_pgids();
        Ok(())
    }

    /// Record the process groups the watchdog must kill if we vanish.
    fn write_pgids(&self) {
        let ids: Vec<String> = [&self.server, &self.epmd]
            .into_iter()
            .flatten()
            .map(|c| c.id().to_string())
            .collect();
        let _ = fs::write(self.dir.join("pgids"), ids.join(" "));
    }

    fn start_failed(&self, reason: String) -> InfraError {
        InfraError::StartFailed {
            service: "RabbitMQ",
            reason: format!(
                "node {} (AMQP port {}): {reason}",
                self.node_name, self.amqp_port
            ),
            logs: tails(&[
                &self.log_file(),
                &self.dir.join("server.out"),
                &self.dir.join("epmd.out"),
            ]),
        }
    }

    /// Whether the last failure looks like a port taken by someone else.
    /// (Looks at what the server and epmd printed since the last start.)
    fn port_clash(&self) -> bool {
        let latest = |name: &str| {
            let text = fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let from = text.rfind(MARKER).unwrap_or(0);
            text[from..].to_ascii_lowercase()
        };
        let text = latest("server.out") + &latest("epmd.out");
        ["eaddrinuse", "already in use", "already_used"]
            .iter()
            .any(|pattern| text.contains(pattern))
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            kill_and_reap(&mut child);
        }
        if let Some(mut child) = self.epmd.take() {
            kill_and_reap(&mut child);
        }
        if let Some(mut w) = self.watchdog.take() {
            w.disarm();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Refuse Debian's `/usr/sbin` wrapper (it would `su` to `rabbitmq` as
/// root) when it is all `PATH` offers.
fn script_not_wrapper(path: PathBuf, name: &str) -> Result<PathBuf> {
    let resolved = fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    if resolved.file_name() == Some(OsStr::new("rabbitmq-script-wrapper")) {
        let real = resolved.with_file_name(name);
        if real.is_file() {
            return Ok(real);
        }
        return Err(InfraError::MissingBinary {
            program: name.to_string(),
            looked_in: format!("{SCRIPTS_DIR} (only the wrapper {} exists)", path.display()),
        });
    }
    Ok(path)
}

/// Create the node's folder with its private config, cookie and plugins
/// list.
fn create_layout(dir: &Path) -> Result<()> {
    let mk = |p: &Path| {
        fs::create_dir_all(p).map_err(|e| io_err(format!("creating {}", p.display()), e))
    };
    for sub in ["home", "mnesia", "log", "conf.d"] {
        mk(&dir.join(sub))?;
    }
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        fs::write(&p, text).map_err(|e| io_err(format!("writing {}", p.display()), e))
    };
    write(
        "rabbitmq.conf",
        "# buildbus private test node; ports and paths come from the environment\n\
         log.console = false\n\
         log.file.level = info\n",
    )?;
    write("enabled_plugins", "[].\n")?;
    write("rabbitmq-env.conf", "")?;
    // Erlang insists the cookie is readable by its owner only.
    let cookie = dir.join("home").join(".erlang.cookie");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&cookie)
        .map_err(|e| io_err(format!("creating {}", cookie.display()), e))?;
    f.write_all(super::random_token().as_bytes())
        .map_err(|e| io_err(format!("writing {}", cookie.display()), e))?;
    Ok(())
}

/// `s` as an Erlang UTF-8 binary literal.
fn erlang_binary(s: &str) -> String {
    let escaped = s.replace('\\', "\\\\").replace('"', "\\\"");
    format!("<<\"{escaped}\"/utf8>>")
}

/// `s` without ANSI escape sequences (`rabbitmqctl` emits bold even
/// without a terminal).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for_count(node: &RabbitNode, queue: &str, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match node.queue_message_count("/", queue) {
                Ok(n) if n == want || Instant::now() >= deadline => return n,
                Err(e) if Instant::now() >= deadline => panic!("{e}"),
                _ => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    #[test]
    fn node_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RabbitNode>();
    }

    #[test]
    fn strip_ansi_and_erlang_binary() {
        assert_eq!(strip_ansi("\u{1b}[1mRuntime\u{1b}[0m\nx"), "Runtime\nx");
        assert_eq!(erlang_binary("a\"b\\c"), "<<\"a\\\"b\\\\c\"/utf8>>");
    }

    #[test]
    fn node_starts_restarts_and_keeps_durable_data() {
        let base = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let mut node = RabbitNode::start(base.path()).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("rabbitmq: first start took {:?}", t.elapsed());
        let port = node.amqp_port();
        assert!(node.node_name().starts_with("buildbus-"));
        assert_eq!(
            node.amqp_url(),
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
        );
        assert!(tcp_accepts(port), "AMQP port does not accept connections");

        let status = node
            .rabbitmqctl(&["status"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.contains(node.node_name()), "{status}");
        assert!(!status.contains('\u{1b}'));

        // A durable quorum queue and a durable classic queue, one persistent
        // message each.
        for (name, args) in [
            (
                "bb_quorum",
                "[{<<\"x-queue-type\">>, longstr, <<\"quorum\">>}]",
            ),
            ("bb_classic", "[]"),
        ] {
            let declare = format!(
                "rabbit_amqqueue:declare(rabbit_misc:r(<<\"/\">>, queue, <<\"{name}\">>), \
                 true, false, {args}, none, <<\"buildbus-test\">>)."
            );
            let out = node
                .rabbitmqctl(&["eval", &declare])
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(out.starts_with("{new,"), "{out}");
            let publish = format!(
                "rabbit_basic:publish(rabbit_misc:r(<<\"/\">>, exchange, <<>>), \
                 <<\"{name}\">>, [{{delivery_mode, 2}}], <<\"hello\">>)."
            );
            let out = node
                .rabbitmqctl(&["eval", &publish])
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(out.trim(), "ok");
            assert_eq!(wait_for_count(&node, name, 1), 1, "{name} before restart");
        }
        let queues = node
            .rabbitmqctl(&["-q", "list_queues", "name", "type", "durable"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(queues.contains("bb_quorum\tquorum\ttrue"), "{queues}");
        assert!(queues.contains("bb_classic\tclassic\ttrue"), "{queues}");

        // Graceful restart: same port, same data.
        let t = Instant::now();
        node.restart().unwrap_or_else(|e| panic!("{e}"));
        eprintln!("rabbitmq: graceful restart took {:?}", t.elapsed());
        assert_eq!(node.amqp_port(), port);
        assert!(tcp_accepts(port));
        assert_eq!(
            wait_for_count(&node, "bb_quorum", 1),
            1,
            "quorum after restart"
        );
        assert_eq!(
            wait_for_count(&node, "bb_classic", 1),
            1,
            "classic after restart"
        );

        // Crash (SIGKILL) and start again: the persisted data is still there.
        node.kill();
        assert!(!node.is_running());
        assert!(!tcp_accepts(port));
        assert!(node.rabbitmqctl(&["status"]).is_err());
        let t = Instant::now();
        node.start_again().unwrap_or_else(|e| panic!("{e}"));
        eprintln!("rabbitmq: start after kill took {:?}", t.elapsed());
        assert!(tcp_accepts(port));
        assert_eq!(
            wait_for_count(&node, "bb_quorum", 1),
            1,
            "quorum after kill"
        );
        assert_eq!(
            wait_for_count(&node, "bb_classic", 1),
            1,
            "classic after kill"
        );

        node.stop().unwrap_or_else(|e| panic!("{e}"));
        assert!(!node.is_running());
        assert!(!tcp_accepts(port));
        let dir = node.dir().to_path_buf();
        assert!(dir.exists());
        let epmd_port = node.epmd_port;
        assert!(tcp_accepts(epmd_port));
        drop(node);
        assert!(!dir.exists(), "node folder left behind");
        assert!(!tcp_accepts(epmd_port), "private epmd left running");
    }

    #[test]
    fn watchdog_cleans_up_when_the_process_ends_without_drop() {
        let base = tempfile::tempdir().unwrap();
        let mut node = RabbitNode::start(base.path()).unwrap_or_else(|e| panic!("{e}"));
        let (port, epmd_port, dir) = (node.amqp_port(), node.epmd_port, node.dir().to_path_buf());
        assert!(tcp_accepts(port) && tcp_accepts(epmd_port));
        // What happens when the test binary exits with the node in a static.
        let mut watchdog = node.watchdog.take().unwrap();
        assert!(
            watchdog.trigger(Duration::from_secs(20)).is_some(),
            "watchdog hung"
        );
        assert!(!tcp_accepts(port), "AMQP port still open");
        assert!(!tcp_accepts(epmd_port), "epmd still running");
        assert!(!dir.exists(), "node folder left behind");
        // Drop only reaps what the watchdog killed; it must not fail or hang.
        let t = Instant::now();
        drop(node);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "drop took {:?}",
            t.elapsed()
        );
    }
}
