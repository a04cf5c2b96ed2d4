//! The scripts leave other brokers alone (issue 14, defect 7): an operator's RabbitMQ
//! node, started the way an operator starts one, is still up after the test set-up
//! (`scripts/ensure-deps.sh`) and the demo (`scripts/demo.sh`) ran beside it.
//!
//! The node is started with Debian's launcher as root (`/usr/sbin/rabbitmq-server`
//! drops to user `rabbitmq`, as the packaged service does), detached, with a node name,
//! ports, epmd port and folders of its own, so the test runs beside anything else. Only
//! that node (and the epmd it started on its own port) is stopped at the end.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = "/usr/sbin/rabbitmq-server";
const CTL: &str = "/usr/sbin/rabbitmqctl";

/// An operator's node: started by [`OperatorNode::start`], stopped (and its folder
/// removed) when dropped.
struct OperatorNode {
    name: String,
    dir: PathBuf,
    amqp_port: u16,
    dist_port: u16,
    epmd_port: u16,
}

/// Ports free right now on 127.0.0.1 (held together so they differ).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn shown(o: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl OperatorNode {
    /// The environment an operator would give a second node on this machine.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("RABBITMQ_") || k.starts_with("ERL_") {
                cmd.env_remove(&key);
            }
        }
        let d = |p: &str| self.dir.join(p);
        cmd.env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_USE_LONGNAME", "false")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_PID_FILE", d("node.pid"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_CONFIG_FILES", d("conf.d"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf"))
            .env("RABBITMQ_CTL_DIST_PORT_MIN", "0")
            .env("RABBITMQ_CTL_DIST_PORT_MAX", "0")
            .stdin(Stdio::null());
        cmd
    }

    fn start() -> OperatorNode {
        let [amqp_port, dist_port, epmd_port] = free_ports::<3>();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("operator-{}-{stamp}@localhost", std::process::id());
        let dir =
            std::env::temp_dir().join(format!("buildbus-operator-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(dir.join("conf.d")).unwrap();
        std::fs::write(dir.join("rabbitmq.conf"), "").unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        let chown = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(chown.success(), "chown {}", dir.display());
        let node = OperatorNode {
            name,
            dir,
            amqp_port,
            dist_port,
            epmd_port,
        };
        let out = node.command(SERVER).arg("-detached").output().unwrap();
        assert!(out.status.success(), "{SERVER} -detached: {}", shown(&out));
        let deadline = Instant::now() + Duration::from_secs(90);
        while !node.answers() {
            assert!(
                Instant::now() < deadline,
                "the operator's node {} did not start; see {}",
                node.name,
                node.dir.join("log").display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        node
    }

    /// Whether `rabbitmqctl -n NODE status` answers.
    fn answers(&self) -> bool {
        self.command(CTL)
            .args(["-n", &self.name, "-q", "status"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// Runs `cmd` (output discarded), giving up after `limit`: the command is then killed
/// (it is our own child) so that cleaning up never hangs a test.
fn run_within(mut cmd: Command, limit: Duration) {
    let Ok(mut child) = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() else {
        return;
    };
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for OperatorNode {
    fn drop(&mut self) {
        // This node only, by name (waiting for its process to end); then the epmd it
        // started on its own port.
        let mut stop = self.command(CTL);
        stop.args(["-n", &self.name, "stop"])
            .arg(self.dir.join("node.pid"));
        run_within(stop, Duration::from_secs(60));
        let mut epmd = Command::new("epmd");
        epmd.args(["-port", &self.epmd_port.to_string(), "-kill"]);
        run_within(epmd, Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `bash scripts/<script>` from the repository, as `scripts/test.sh` does.
fn run_script(script: &str) -> Output {
    Command::new("bash")
        .arg(repo().join("scripts").join(script))
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn ensure_deps_and_demo_leave_an_operators_node_running() {
    if !is_root() {
        // The defect was about the nodes of user rabbitmq, which only root's launcher
        // starts; CI runs as root.
        eprintln!("skipped: starting a node as the rabbitmq user needs root");
        return;
    }
    let node = OperatorNode::start();

    let deps = run_script("ensure-deps.sh");
    assert!(deps.status.success(), "ensure-deps.sh: {}", shown(&deps));
    assert!(
        node.answers(),
        "the operator's node {} is gone after scripts/ensure-deps.sh",
        node.name
    );

    let demo = run_script("demo.sh");
    assert!(demo.status.success(), "demo.sh: {}", shown(&demo));
    let said = String::from_utf8_lossy(&demo.stdout);
    assert!(said.contains("== buildbus demo"), "demo.sh said: {said}");
    assert!(
        node.answers(),
        "the operator's node {} is gone after scripts/demo.sh",
        node.name
    );
}
