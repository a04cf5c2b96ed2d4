//! `buildbus demo`: the whole pipeline on this machine, on the bundled real streams.
//!
//! On the broker at `--url` (`scripts/demo.sh` starts a private RabbitMQ node for it with
//! `buildbus-testkit` and stops it afterwards), publishes every bundled Bazel and BitBake
//! stream with confirms, replays two recorded live Bazel sessions against the BES backend
//! (acks only after the broker confirmed), runs a pool of DSI workers into a demo SQLite
//! file until every message is stored, runs a filtered monitor (finished builds and test
//! summaries of one tree and platform) alongside, and prints `query builds` and one build
//! in detail.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;

use super::{Cli, FieldArgs};
use crate::bus::publish::{Publisher, PublisherConfig};
use crate::consumers::client::MonitorBuilder;
use crate::consumers::dsi::worker::{run_pool, DsiConfig, DsiStats};
use crate::pipeline::file::{publish_file, FileOptions};
use crate::sources::bes::{capture, BesConfig};

const EXAMPLES: &str = "\
Examples:
  bash scripts/demo.sh
  buildbus demo --url amqp://guest:guest@127.0.0.1:5672/%2f
  buildbus demo --fixtures tests/fixtures --dir .demo --workers 4

scripts/demo.sh installs what is missing (RabbitMQ), starts a private RabbitMQ node,
runs this on it with --url, and stops the node.";

/// Run the whole pipeline on the bundled real build streams and show the result.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct DemoArgs {
    /// Broker URL (default: [bus] url of the config).
    #[arg(long, env = "BUILDBUS_URL", value_name = "URL")]
    pub url: Option<String>,
    /// Where the bundled streams are.
    #[arg(long, default_value = "tests/fixtures", value_name = "DIR")]
    pub fixtures: PathBuf,
    /// Working folder: the demo store (demo.db) and the BES backend's spool.
    #[arg(long, default_value = ".demo", value_name = "DIR")]
    pub dir: PathBuf,
    /// DSI workers.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
}

fn step(t: Instant, what: &str) {
    eprintln!("[{:>6.1}s] {what}", t.elapsed().as_secs_f64());
}

pub fn run(cli: &Cli, a: &DemoArgs) -> anyhow::Result<ExitCode> {
    let t = Instant::now();
    let (cfg, ctx) = super::context(cli.config.as_deref(), &FieldArgs::default())?;
    let ctx = Arc::new(ctx);
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let store_path = a.dir.join("demo.db");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", store_path.display()));
    }
    let store = format!("sqlite:{}", store_path.display());
    let mut files: Vec<PathBuf> = Vec::new();
    // Bazel 4.2.3 as JSON, Bazel 2.1.0 as binary protobuf, BitBake event logs.
    for (sub, ext) in [
        ("bazel", ".json"),
        ("bazel/bazel-2.1.0", ".bin"),
        ("bitbake", ".eventlog"),
    ] {
        let dir = a.fixtures.join(sub);
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with("bes_capture") && name.ends_with(ext)
            })
            .collect();
        found.sort();
        files.extend(found);
    }
    let url = a.url.clone().unwrap_or(cfg.bus.url.clone());
    let tls = cli.broker_tls(&cfg)?;
    // Every connection of the demo: this broker, this TLS set-up.
    let publisher_config = || {
        let mut p = PublisherConfig::new(&url, &cfg.bus.exchange_prefix);
        p.tls = tls.clone();
        p
    };
    step(t, &format!("broker at {}", crate::bus::redact_url(&url)));
    // A filtered monitor, as another team would run it: finished builds and test
    // summaries of tree bep-fixture on platform k8 (its filters are broker bindings).
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let monitor = {
        let (b, t) = (seen.clone(), seen.clone());
        MonitorBuilder::new(&url)
            .tls(tls.clone())
            .trees(["bep-fixture"])
            .platforms(["k8"])
            .on_build(move |_m, build| {
                let line = format!(
                    "build {} {} ({})",
                    build.result.map(|r| r.as_str()).unwrap_or("?"),
                    build.targets.join(" "),
                    build.common.build_id
                );
                b.lock().map(|mut v| v.push(line)).ok();
            })
            .on_test(move |_m, test| {
                let line = format!("test {} {}", test.status, test.test);
                t.lock().map(|mut v| v.push(line)).ok();
            })
            .start()
            .context("starting the monitor")?
    };
    monitor.wait_ready(Duration::from_secs(30));
    step(
        t,
        &format!(
            "monitor subscribed (tree bep-fixture, platform k8): {} bindings, e.g. {}",
            monitor.bindings().len(),
            monitor
                .bindings()
                .first()
                .map(|b| format!("{} <- {}", b.routing_key, b.exchange))
                .unwrap_or_default()
        ),
    );
    let rt = super::runtime()?;
    let published = rt.block_on(async {
        let mut p = Publisher::<u64>::connect(publisher_config()).await?;
        let mut total = 0;
        for f in &files {
            let r = publish_file(&mut p, f, ctx.clone(), &FileOptions::default(), 512).await?;
            step(
                t,
                &format!(
                    "published {:>3} messages from {} ({} events, confirmed by the broker)",
                    r.published,
                    f.display(),
                    r.stream.events
                ),
            );
            total += r.published;
        }
        p.close().await?;
        anyhow::Ok(total)
    })?;
    // Live Bazel: recorded BES sessions (a test run with a flaky and a failing test,
    // and a build whose stream Bazel retried) played against our BES backend.
    let bes_messages = rt.block_on(async {
        let mut bcfg = BesConfig::new(
            "127.0.0.1:0".parse()?,
            Some(publisher_config()),
        );
        bcfg.spool = Some(a.dir.join("bes-spool"));
        let backend = crate::pipeline::bes::start(bcfg, ctx.clone()).await?;
        step(t, &format!("BES backend listening on {}", backend.addr));
        let mut total = 0u64;
        for f in ["bazel/bes_capture_test.jsonl", "bazel/bes_capture_retry.jsonl"] {
            let path = a.fixtures.join(f);
            let calls = capture::read_capture(&path)?;
            let expected = capture::translate(&calls, ctx.clone()).len() as u64;
            let r = capture::replay(&format!("http://{}", backend.addr), calls, &vec![]).await?;
            step(
                t,
                &format!(
                    "BES: replayed {} ({} streams, {} requests, all acked: {expected} messages confirmed)",
                    path.display(),
                    r.streams,
                    r.requests
                ),
            );
            total += expected;
        }
        backend.stop().await?;
        anyhow::Ok(total)
    })?;
    let published = published + bes_messages;
    step(
        t,
        &format!("running {} DSI workers into {store}", a.workers),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(DsiStats::default());
    let dcfg = DsiConfig {
        url: url.clone(),
        tls: tls.clone(),
        exchange_prefix: cfg.bus.exchange_prefix.clone(),
        store_url: store.clone(),
        workers: a.workers,
        prefetch: 500,
        batch: 200,
        batch_wait: Duration::from_millis(20),
        connect_timeout: None,
    };
    let pool = rt.spawn(run_pool(dcfg, stop.clone(), stats.clone()));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = stats.stored.load(Ordering::Relaxed) + stats.duplicates.load(Ordering::Relaxed);
        if n >= published || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(pool)??;
    // Give the monitor a moment to finish its last callbacks, then stop it.
    std::thread::sleep(Duration::from_millis(500));
    let _ = monitor.stop();
    let lines = seen.lock().map(|v| v.clone()).unwrap_or_default();
    step(
        t,
        &format!("the monitor's callbacks ran {} times:", lines.len()),
    );
    for l in &lines {
        eprintln!("           {l}");
    }
    step(
        t,
        &format!(
            "stored {} messages ({} duplicates skipped, {} dead-lettered)",
            stats.stored.load(Ordering::Relaxed),
            stats.duplicates.load(Ordering::Relaxed),
            stats.dead_lettered.load(Ordering::Relaxed)
        ),
    );
    step(t, "what the DSI stored:");
    let exe = std::env::current_exe()?;
    let status = Command::new(&exe)
        .args(["query", "builds", "--store", &store])
        .status()?;
    let failed = Command::new(&exe)
        .args([
            "query", "builds", "--store", &store, "--result", "failure", "--json",
        ])
        .output()?;
    let rows: serde_json::Value = serde_json::from_slice(&failed.stdout).unwrap_or_default();
    // Show the most telling build in detail: a failed test run if there is one.
    let rows = rows.as_array().cloned().unwrap_or_default();
    let pick = rows
        .iter()
        .find(|b| b.to_string().contains("//tests/"))
        .or(rows.first());
    if let Some(id) = pick.and_then(|b| b["build_id"].as_str()) {
        eprintln!("\n$ buildbus query build {id}");
        Command::new(&exe)
            .args(["query", "build", id, "--store", &store])
            .status()?;
    }
    eprintln!(
        "\nThe store stays in {}: try `buildbus query builds --store {store}`.",
        store_path.display()
    );
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
