//! A private PostgreSQL 15 cluster for tests, the demo and the benchmarks.
//!
//! This file owns [`PgCluster`]: a cluster made with `initdb` in its own
//! folder, run by `pg_ctl` from `/usr/lib/postgresql/15/bin` on a free port
//! of 127.0.0.1 (TCP) plus a Unix socket in its own folder, with superuser
//! `buildbus` (trust authentication: nothing but this machine can connect)
//! and a database `buildbus`. It never touches a system-wide cluster.
//!
//! Running as root: `initdb` and `postgres` refuse to run as root. Then
//! every server-side command (`initdb`, `pg_ctl`) runs through
//! `runuser -u postgres --`: the `postgres` user exists wherever the
//! `postgresql-15` package is installed (no user of our own is created),
//! and owns the cluster's folder. For that user to reach the folder,
//! `base_dir` gets the others-search bit (`o+x`, so "0711": it can pass
//! through but not list) if it lacks it; its parents must already allow
//! that (`/tmp` does). Clients (`psql`, `pg_isready`) connect over TCP and
//! run as the current user. As any other user, everything runs directly.
//!
//! The server is tuned for throw-away use: `fsync=off` and `initdb
//! --no-sync` (an OS crash may corrupt it; a server crash or kill does
//! not), `--locale=C`.

use super::{
    find_program, free_ports, io_err, is_root, run, run_ok, shell_quote, tail_str, tails,
    unique_suffix, InfraError, Result, Watchdog,
};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// Where Debian puts PostgreSQL 15's programs.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The superuser and the database created in the cluster.
const USER: &str = "buildbus";
const DATABASE: &str = "buildbus";
/// How long `pg_ctl start` waits for the server.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit for `initdb`, `psql` and other commands.
const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest Unix socket path Linux accepts (`sun_path` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A private PostgreSQL cluster; see the module documentation.
///
/// `Drop` stops it (`pg_ctl stop -m immediate`) if still running and
/// removes its folder, `<base_dir>/postgres-<pid>-<n>`; `base_dir` itself
/// is left alone.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    socket_dir: Option<PathBuf>,
    initdb: PathBuf,
    pg_ctl: PathBuf,
    pg_isready: PathBuf,
    psql: PathBuf,
    /// `runuser` and the user to run server-side programs as, when root.
    run_as: Option<(PathBuf, String)>,
    running: bool,
    watchdog: Option<Watchdog>,
}

impl PgCluster {
    /// Create and start a new cluster in a fresh folder under `base_dir`
    /// (created if missing), with superuser and database `buildbus`, and
    /// wait until it accepts connections.
    pub fn start(base_dir: &Path) -> Result<PgCluster> {
        let pg = |name: &str| find_program(name, &[&format!("{PG_BIN}/{name}")]);
        let (initdb, pg_ctl, pg_isready, psql) =
            (pg("initdb")?, pg("pg_ctl")?, pg("pg_isready")?, pg("psql")?);
        let run_as = if is_root() {
            let runuser = find_program("runuser", &["/usr/sbin/runuser", "/sbin/runuser"])?;
            Some((runuser, "postgres".to_string()))
        } else {
            None
        };

        fs::create_dir_all(base_dir)
            .map_err(|e| io_err(format!("creating {}", base_dir.display()), e))?;
        let suffix = unique_suffix();
        let dir = base_dir.join(format!("postgres-{suffix}"));
        fs::create_dir(&dir).map_err(|e| io_err(format!("creating {}", dir.display()), e))?;

        // From here on, `cluster`'s Drop cleans up whatever fails.
        let mut cluster = PgCluster {
            dir,
            port: 0,
            socket_dir: None,
            initdb,
            pg_ctl,
            pg_isready,
            psql,
            run_as,
            running: false,
            watchdog: None,
        };
        if let Some((_, user)) = &cluster.run_as {
            let user = user.clone();
            hand_over(base_dir, &cluster.dir, &user)?;
        }
        let mut pg_ctl_prefix: Vec<OsString> = Vec::new();
        if let Some((runuser, user)) = &cluster.run_as {
            pg_ctl_prefix.extend([runuser.into(), "-u".into(), user.into(), "--".into()]);
        }
        pg_ctl_prefix.push(cluster.pg_ctl.clone().into());
        let data_dir = cluster.data_dir();
        let mut args: Vec<&std::ffi::OsStr> = vec![cluster.dir.as_os_str(), data_dir.as_os_str()];
        args.extend(pg_ctl_prefix.iter().map(|s| s.as_os_str()));
        cluster.watchdog = Some(Watchdog::spawn(
            "d=\"$1\"; data=\"$2\"; shift 2; \
             \"$@\" stop -D \"$data\" -m immediate -s -w -t 20 >/dev/null 2>&1; rm -rf \"$d\"",
            &args,
            &cluster.dir,
        )?);

        cluster.init_db()?;

        let mut attempt = 1;
        loop {
            cluster.port = free_ports(1)?[0];
            cluster.socket_dir = cluster.pick_socket_dir();
            match cluster.start_server() {
                Ok(()) => break,
                Err(_) if attempt < 3 && cluster.port_clash() => attempt += 1,
                Err(e) => return Err(e),
            }
        }
        cluster.create_database()?;
        Ok(cluster)
    }

    /// `postgres://buildbus@127.0.0.1:PORT/buildbus` (no password: trust).
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's name, `buildbus`.
    pub fn user(&self) -> &str {
        USER
    }

    /// The database's name, `buildbus`.
    pub fn database(&self) -> &str {
        DATABASE
    }

    /// The cluster's own folder (data, log, socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data folder (`PGDATA`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server's log file.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The folder of the server's Unix socket, if it has one (it has none
    /// when the path would be too long for a socket).
    pub fn socket_dir(&self) -> Option<&Path> {
        self.socket_dir.as_deref()
    }

    /// Whether the server runs (as `pg_ctl status` sees it).
    pub fn is_running(&self) -> bool {
        let mut cmd = self.server_cmd(&self.pg_ctl);
        cmd.arg("status").arg("-D").arg(self.data_dir());
        matches!(run(cmd, CMD_TIMEOUT), Ok(out) if out.status.success())
    }

    /// Run `sql` with `psql` in database `buildbus` as `buildbus` over TCP
    /// (stop at the first error; unaligned, tuples only) and return its
    /// stdout.
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_in(DATABASE, sql)
    }

    /// Stop the server gracefully (`pg_ctl stop -m fast`; `-m immediate` if
    /// that fails). The data stays: [`start_again`] resumes it. Does nothing
    /// if it is not running.
    ///
    /// [`start_again`]: PgCluster::start_again
    pub fn stop(&mut self) -> Result<()> {
        if !self.running && !self.is_running() {
            return Ok(());
        }
        let fast = self.pg_ctl_stop("fast");
        let result = match fast {
            Ok(()) => Ok(()),
            Err(_) => self.pg_ctl_stop("immediate"),
        };
        if result.is_ok() {
            self.running = false;
        }
        result
    }

    /// Start the server again after [`stop`], on the same port, with the
    /// same data. Does nothing if it runs.
    ///
    /// [`stop`]: PgCluster::stop
    pub fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            self.running = true;
            return Ok(());
        }
        self.start_server()
    }

    /// [`stop`](PgCluster::stop) then [`start_again`](PgCluster::start_again).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// A command for a server-side program (`initdb`, `pg_ctl`): through
    /// `runuser -u postgres --` when root.
    fn server_cmd(&self, program: &Path) -> Command {
        let mut cmd = match &self.run_as {
            Some((runuser, user)) => {
                let mut c = Command::new(runuser);
                c.arg("-u").arg(user).arg("--").arg(program);
                c
            }
            None => Command::new(program),
        };
        clean_env(&mut cmd);
        cmd.current_dir(&self.dir);
        cmd
    }

    fn init_db(&self) -> Result<()> {
        let mut cmd = self.server_cmd(&self.initdb);
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]);
        run_ok(cmd, CMD_TIMEOUT).map(|_| ())
    }

    /// The socket folder, unless its socket path would be too long.
    fn pick_socket_dir(&self) -> Option<PathBuf> {
        let dir = self.dir.join("sock");
        let socket = dir.join(format!(".s.PGSQL.{}", self.port));
        (socket.as_os_str().len() <= MAX_SOCKET_PATH).then_some(dir)
    }

    fn start_server(&mut self) -> Result<()> {
        let socket = match &self.socket_dir {
            Some(dir) => {
                fs::create_dir_all(dir)
                    .map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
                if let Some((_, user)) = &self.run_as {
                    chown_to(dir, user)?;
                }
                dir.to_string_lossy().into_owned()
            }
            None => String::new(),
        };
        // pg_ctl hands -o to /bin/sh: quote the path.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            shell_quote(&socket)
        );
        let mut cmd = self.server_cmd(&self.pg_ctl);
        cmd.arg("start")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .arg("-w")
            .arg("-t")
            .arg(START_TIMEOUT.as_secs().to_string())
            .arg("-o")
            .arg(options);
        if let Err(e) = run_ok(cmd, START_TIMEOUT + Duration::from_secs(30)) {
            // pg_ctl may have given up on a server that still comes up.
            let _ = self.pg_ctl_stop("immediate");
            return Err(self.start_failed(format!("{e}")));
        }
        self.running = true;
        // pg_ctl -w waited for the server; check it answers over TCP too.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut cmd = Command::new(&self.pg_isready);
            clean_env(&mut cmd);
            cmd.current_dir(&self.dir)
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-t",
                    "5",
                    "-U",
                    USER,
                    "-d",
                    "postgres",
                ])
                .arg("-p")
                .arg(self.port.to_string());
            match run(cmd, Duration::from_secs(15)) {
                Ok(out) if out.status.success() => return Ok(()),
                _ if Instant::now() >= deadline => {
                    let _ = self.pg_ctl_stop("immediate");
                    return Err(self.start_failed(format!(
                        "pg_isready -h 127.0.0.1 -p {} kept failing for 30 s",
                        self.port
                    )));
                }
                _ => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn create_database(&self) -> Result<()> {
        self.psql_in("postgres", &format!("CREATE DATABASE {DATABASE}"))
            .map(|_| ())
    }

    fn psql_in(&self, database: &str, sql: &str) -> Result<String> {
        let mut cmd = Command::new(&self.psql);
        clean_env(&mut cmd);
        cmd.current_dir(&self.dir)
            .env("PGCONNECT_TIMEOUT", "10")
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", USER, "-d", database, "-c", sql]);
        run_ok(cmd, CMD_TIMEOUT)
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> Result<()> {
        let mut cmd = self.server_cmd(&self.pg_ctl);
        cmd.arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-s", "-w", "-t", "30"]);
        run_ok(cmd, Duration::from_secs(45))?;
        self.running = false;
        Ok(())
    }

    fn start_failed(&self, reason: String) -> InfraError {
        InfraError::StartFailed {
            service: "PostgreSQL",
            reason: format!(
                "cluster {} on port {}: {reason}",
                self.dir.display(),
                self.port
            ),
            logs: tails(&[&self.log_file()]),
        }
    }

    fn port_clash(&self) -> bool {
        let log = fs::read_to_string(self.log_file()).unwrap_or_default();
        tail_str(&log, 40).contains("already in use")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running || self.data_dir().join("postmaster.pid").exists() {
            let _ = self.pg_ctl_stop("immediate");
        }
        if let Some(mut w) = self.watchdog.take() {
            w.disarm();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Remove inherited `PG*` variables (`PGHOST`, `PGDATA`, `PGPASSWORD`...)
/// that could point a command at another server.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
}

/// As root: give `dir` to `user` and make sure `user` can reach it.
fn hand_over(base_dir: &Path, dir: &Path, user: &str) -> Result<()> {
    let (uid, _) = user_ids(user)?;
    chown_to(dir, user)?;
    let base = fs::canonicalize(base_dir)
        .map_err(|e| io_err(format!("resolving {}", base_dir.display()), e))?;
    let mut first = true;
    for ancestor in base.ancestors() {
        let meta = fs::metadata(ancestor)
            .map_err(|e| io_err(format!("reading {}", ancestor.display()), e))?;
        let mode = meta.permissions().mode();
        if mode & 0o001 != 0 || meta.uid() == uid {
            first = false;
            continue;
        }
        if first {
            // base_dir itself (typically a 0700 temp folder): let the
            // server's user pass through it.
            fs::set_permissions(ancestor, fs::Permissions::from_mode(mode | 0o001))
                .map_err(|e| io_err(format!("chmod o+x {}", ancestor.display()), e))?;
        } else {
            return Err(InfraError::Setup(format!(
                "running as root, PostgreSQL runs as user `{user}`, which cannot reach {}: \
                 {} (mode {:o}) is not searchable by others; use a base folder under /tmp",
                dir.display(),
                ancestor.display(),
                mode & 0o7777
            )));
        }
        first = false;
    }
    Ok(())
}

fn chown_to(path: &Path, user: &str) -> Result<()> {
    let (uid, gid) = user_ids(user)?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| io_err(format!("chown {user} {}", path.display()), e))
}

/// The uid and gid of `user`.
fn user_ids(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let mut cmd = Command::new("id");
        cmd.arg(flag).arg(user);
        let out = run_ok(cmd, Duration::from_secs(10)).map_err(|e| {
            InfraError::Setup(format!(
                "running as root, PostgreSQL must run as the unprivileged user `{user}` \
                 (initdb and postgres refuse root), which was not found; run \
                 scripts/ensure-deps.sh (installing postgresql-15 creates it): {e}"
            ))
        })?;
        out.trim()
            .parse::<u32>()
            .map_err(|_| InfraError::Setup(format!("`id {flag} {user}` printed {:?}", out.trim())))
    };
    Ok((id("-u")?, id("-g")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PgCluster>();
    }

    #[test]
    fn watchdog_cleans_up_when_the_process_ends_without_drop() {
        let base = tempfile::tempdir().unwrap();
        let mut pg = PgCluster::start(base.path()).unwrap_or_else(|e| panic!("{e}"));
        let dir = pg.dir().to_path_buf();
        assert!(pg.is_running());
        let mut watchdog = pg.watchdog.take().unwrap();
        assert!(
            watchdog.trigger(Duration::from_secs(30)).is_some(),
            "watchdog hung"
        );
        assert!(!dir.exists(), "cluster folder left behind");
        assert!(pg.psql("SELECT 1").is_err(), "server still answers");
        let t = Instant::now();
        drop(pg);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "drop took {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn cluster_starts_answers_restarts_and_cleans_up() {
        let base = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let mut pg = PgCluster::start(base.path()).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "postgres: start (initdb + start + createdb) took {:?}",
            t.elapsed()
        );
        let port = pg.port();
        assert_eq!(
            pg.url(),
            format!("postgres://buildbus@127.0.0.1:{port}/buildbus")
        );
        assert!(pg.is_running());

        // The brief's own check: psql over TCP, as buildbus.
        let out = Command::new(&pg.psql)
            .args([
                "-X",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-U",
                "buildbus",
                "-c",
                "select 1",
            ])
            .arg("-p")
            .arg(port.to_string())
            .arg("-d")
            .arg("buildbus")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

        pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
            .unwrap_or_else(|e| panic!("{e}"));
        let who = pg
            .psql("SELECT current_user || ' ' || current_database()")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(who.trim(), "buildbus buildbus");

        let t = Instant::now();
        pg.restart().unwrap_or_else(|e| panic!("{e}"));
        eprintln!("postgres: restart took {:?}", t.elapsed());
        assert_eq!(pg.port(), port);
        assert_eq!(pg.psql("SELECT x FROM t").unwrap().trim(), "42");

        let err = pg
            .psql("SELECT * FROM no_such_table")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no_such_table"), "{err}");

        pg.stop().unwrap_or_else(|e| panic!("{e}"));
        assert!(!pg.is_running());
        assert!(pg.psql("SELECT 1").is_err());
        pg.start_again().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pg.psql("SELECT count(*) FROM t").unwrap().trim(), "1");

        let dir = pg.dir().to_path_buf();
        drop(pg);
        assert!(!dir.exists(), "cluster folder left behind");
        let gone = Command::new(PathBuf::from(PG_BIN).join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-t", "1"])
            .arg("-p")
            .arg(port.to_string())
            .status()
            .unwrap();
        assert!(!gone.success(), "server still answers after drop");
    }
}
