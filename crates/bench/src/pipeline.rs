//! `buildbus-bench pipeline`: publish rate, DSI storage rate and end-to-end latency on a
//! private RabbitMQ node and a private PostgreSQL cluster, each beside its baseline in
//! the same run.
//!
//! - publish: buildbus's confirmed publisher (window, token bookkeeping) against a bare
//!   lapin publisher of the same bytes (`basic_publish` for all, then
//!   `wait_for_confirms`), on the same broker;
//! - DSI: a queue preloaded with N distinct messages, drained by 1, 2 and 4 workers into
//!   a fresh SQLite file and a fresh PostgreSQL database (messages/s; each message is
//!   two rows: the message and its entity), beside the store alone (the same messages
//!   written straight into a fresh store, no broker);
//! - latency: messages published at a steady rate while the DSI runs; latency is the
//!   store's commit time minus the message's `sent` time, p50 and p99.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};

use super::Cli;
use buildbus::bus::message::Outgoing;
use buildbus::bus::publish::{Publisher, PublisherConfig};
use buildbus::bus::topology::{Topology, DSI_QUEUE};
use buildbus::consumers::dsi::worker::{run_pool, DsiConfig, DsiStats};
use buildbus::model::{ids, time, Envelope, DEFAULT_EXCHANGE_PREFIX};
use buildbus::sources::file::translate_file;
use buildbus::systems::Context;
use buildbus_testkit::postgres::PgCluster;
use buildbus_testkit::rabbitmq::RabbitNode;

/// Options of `bench pipeline`.
#[derive(Debug, Args)]
pub struct PipelineBench {
    /// Messages per measurement.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Worker counts to measure the DSI with.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub workers: Vec<usize>,
    /// Rate of the latency run, messages per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Length of the latency run, seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Skip PostgreSQL.
    #[arg(long)]
    pub no_postgres: bool,
    /// Where the fixtures are.
    #[arg(long, default_value = "tests/fixtures", value_name = "DIR")]
    pub fixtures: PathBuf,
    /// Working folder (broker data, stores); default a temporary one.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `n` distinct messages made from the fixtures' real ones: copy `k` of a message gets
/// its own build id, entity id and message id.
fn messages(fixtures: &std::path::Path, n: usize) -> anyhow::Result<Vec<Envelope>> {
    let ctx = Arc::new(Context::builtin());
    let mut base = Vec::new();
    for f in [
        "build_ok",
        "build_fail",
        "test_mixed",
        "pattern_fail",
        "interrupted",
    ] {
        let p = fixtures.join(format!("bazel/{f}.json"));
        let r = translate_file(&p, None, &ctx, &mut |e| base.push(e));
        anyhow::ensure!(r.clean(), "{}: {:?}", p.display(), r.errors);
    }
    let mut out = Vec::with_capacity(n);
    let mut k = 0u64;
    while out.len() < n {
        for e in &base {
            if out.len() == n {
                break;
            }
            let mut e = e.clone();
            let c = e.payload.common_mut();
            c.build_id = format!("{}-{k}", c.build_id).into();
            let entity = ids::entity_id(
                "bench",
                &k.to_string(),
                e.meta.kind.as_str(),
                &[&e.meta.entity_id],
            );
            e.meta.message_id = ids::message_id(&entity, &e.meta.state);
            e.meta.entity_id = entity;
            out.push(e);
        }
        k += 1;
    }
    Ok(out)
}

async fn purge(url: &str) -> anyhow::Result<()> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    Topology::new(DEFAULT_EXCHANGE_PREFIX)
        .declare_all(&ch)
        .await?;
    ch.queue_purge(DSI_QUEUE.into(), QueuePurgeOptions::default())
        .await?;
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

async fn publish_buildbus(url: &str, msgs: &[Outgoing]) -> anyhow::Result<f64> {
    let mut p =
        Publisher::<u64>::connect(PublisherConfig::new(url, DEFAULT_EXCHANGE_PREFIX)).await?;
    let t = Instant::now();
    for (i, m) in msgs.iter().enumerate() {
        p.publish(m.clone(), i as u64).await?;
    }
    p.close().await?;
    Ok(t.elapsed().as_secs_f64())
}

/// A bare lapin publisher: every message published, all confirms awaited at the end;
/// returns the seconds it took (also the bare baseline other benches preload with).
pub(crate) async fn publish_raw(url: &str, msgs: &[Outgoing]) -> anyhow::Result<f64> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let t = Instant::now();
    for m in msgs {
        // The confirm future is dropped: all are awaited at once below.
        drop(
            ch.basic_publish(
                m.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &m.body,
                m.properties.clone(),
            )
            .await?,
        );
    }
    ch.wait_for_confirms().await?;
    let secs = t.elapsed().as_secs_f64();
    let _ = ch.close(200, "bye".into()).await;
    let _ = conn.close(200, "bye".into()).await;
    Ok(secs)
}

fn dsi_config(url: &str, store: &str, workers: usize) -> DsiConfig {
    DsiConfig {
        url: url.to_string(),
        tls: Default::default(),
        exchange_prefix: DEFAULT_EXCHANGE_PREFIX.to_string(),
        store_url: store.to_string(),
        workers,
        prefetch: 2000,
        batch: 500,
        batch_wait: Duration::from_millis(20),
        connect_timeout: None,
    }
}

/// Drains `n` preloaded messages with `workers` workers; returns seconds.
async fn drain(url: &str, store: &str, workers: usize, n: u64) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(DsiStats::default());
    let t = Instant::now();
    let pool = tokio::spawn(run_pool(
        dsi_config(url, store, workers),
        stop.clone(),
        stats.clone(),
    ));
    while stats.stored.load(Ordering::Relaxed) < n {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(600), "DSI did not finish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    pool.await??;
    Ok(secs)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(_cli: &Cli, a: &PipelineBench) -> anyhow::Result<ExitCode> {
    let own_dir = a.dir.is_none();
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("buildbus-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    eprintln!("generating {} messages from the fixtures", a.messages);
    let envs = messages(&a.fixtures, a.messages)?;
    let outgoing: Vec<Outgoing> = envs.iter().map(Outgoing::from_envelope).collect();
    let bytes: usize = outgoing.iter().map(|o| o.body.len()).sum();
    eprintln!("starting a private RabbitMQ node");
    let node = RabbitNode::start(&dir).context("RabbitMQ (scripts/ensure-deps.sh)")?;
    let url = node.amqp_url();
    let pg = if a.no_postgres {
        None
    } else {
        eprintln!("starting a private PostgreSQL cluster");
        Some(PgCluster::start(&dir).context("PostgreSQL")?)
    };
    let rt = super::runtime()?;
    let n = outgoing.len() as u64;
    println!(
        "# buildbus bench pipeline: {n} messages, {:.1} MB of JSON bodies",
        bytes as f64 / 1e6
    );
    println!();
    // Publishing: best of 3, each side alternately, queue purged in between.
    let (mut ours, mut raw) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        rt.block_on(purge(&url))?;
        ours = ours.min(rt.block_on(publish_buildbus(&url, &outgoing))?);
        rt.block_on(purge(&url))?;
        raw = raw.min(rt.block_on(publish_raw(&url, &outgoing))?);
    }
    println!("| publish (confirmed, persistent) | msg/s | MB/s |");
    println!("|---|---:|---:|");
    println!(
        "| bare lapin, same bytes | {:.0} | {:.1} |",
        n as f64 / raw,
        bytes as f64 / 1e6 / raw
    );
    println!(
        "| buildbus publisher (window 512) | {:.0} | {:.1} |",
        n as f64 / ours,
        bytes as f64 / 1e6 / ours
    );
    println!("| ratio | {:.2} | |", raw / ours);
    println!();
    // The store alone (its baseline): the same messages written straight into a fresh
    // store in batches of 500, on a plain thread, no broker.
    println!("| store alone, batches of 500 | messages/s | rows/s |");
    println!("|---|---:|---:|");
    let mut alone = vec![(
        "SQLite".to_string(),
        format!("sqlite:{}", dir.join("alone.db").display()),
    )];
    if let Some(pg) = &pg {
        pg.psql("DROP DATABASE IF EXISTS bench_alone")?;
        pg.psql("CREATE DATABASE bench_alone")?;
        alone.push((
            "PostgreSQL".to_string(),
            format!(
                "postgres://{}@127.0.0.1:{}/bench_alone",
                pg.user(),
                pg.port()
            ),
        ));
    }
    for (name, store) in alone {
        let batch = envs.clone();
        let secs = std::thread::spawn(move || -> anyhow::Result<f64> {
            let mut st = buildbus::stores::open(&store)?;
            let t = Instant::now();
            for chunk in batch.chunks(500) {
                st.write_batch(chunk)?;
            }
            Ok(t.elapsed().as_secs_f64())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("store thread panicked"))??;
        println!(
            "| {name} | {:.0} | {:.0} |",
            n as f64 / secs,
            2.0 * n as f64 / secs
        );
    }
    println!();
    // DSI: preload, then drain into fresh stores.
    println!("| DSI store | workers | messages/s | rows/s |");
    println!("|---|---:|---:|---:|");
    for &w in &a.workers {
        rt.block_on(purge(&url))?;
        rt.block_on(publish_raw(&url, &outgoing))?;
        let store = format!("sqlite:{}", dir.join(format!("bench-{w}.db")).display());
        let secs = rt.block_on(drain(&url, &store, w, n))?;
        println!(
            "| SQLite | {w} | {:.0} | {:.0} |",
            n as f64 / secs,
            2.0 * n as f64 / secs
        );
    }
    if let Some(pg) = &pg {
        for &w in &a.workers {
            rt.block_on(purge(&url))?;
            rt.block_on(publish_raw(&url, &outgoing))?;
            let db = format!("bench_{w}");
            pg.psql(&format!("DROP DATABASE IF EXISTS {db}"))?;
            pg.psql(&format!("CREATE DATABASE {db}"))?;
            let store = format!("postgres://{}@127.0.0.1:{}/{db}", pg.user(), pg.port());
            let secs = rt.block_on(drain(&url, &store, w, n))?;
            println!(
                "| PostgreSQL | {w} | {:.0} | {:.0} |",
                n as f64 / secs,
                2.0 * n as f64 / secs
            );
        }
    }
    println!();
    // Latency at a steady rate, SQLite, 2 workers.
    rt.block_on(purge(&url))?;
    let store = format!("sqlite:{}", dir.join("latency.db").display());
    let count = (a.rate * a.seconds) as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(DsiStats::default());
    let lat = rt.block_on(async {
        let pool = tokio::spawn(run_pool(
            dsi_config(&url, &store, 2),
            stop.clone(),
            stats.clone(),
        ));
        let mut p =
            Publisher::<u64>::connect(PublisherConfig::new(&url, DEFAULT_EXCHANGE_PREFIX)).await?;
        let start = tokio::time::Instant::now();
        for (i, e) in envs.iter().cycle().take(count).enumerate() {
            tokio::time::sleep_until(
                start + Duration::from_micros(i as u64 * 1_000_000 / a.rate.max(1)),
            )
            .await;
            let mut e = e.clone();
            if i >= envs.len() {
                let entity = ids::entity_id("latency", &i.to_string(), e.meta.kind.as_str(), &[]);
                e.meta.message_id = ids::message_id(&entity, &e.meta.state);
                e.meta.entity_id = entity;
            }
            e.meta.sent = time::now();
            p.publish(Outgoing::from_envelope(&e), i as u64).await?;
        }
        p.close().await?;
        while stats.stored.load(Ordering::Relaxed) < count as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::Relaxed);
        pool.await??;
        anyhow::Ok(())
    });
    lat?;
    let path = dir.join("latency.db");
    let mut ms: Vec<i64> = {
        let conn = rusqlite::Connection::open(&path)?;
        let mut stmt = conn.prepare("SELECT sent, stored_at FROM messages")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .filter_map(|r| r.ok())
            .filter_map(|(s, t)| Some(time::to_millis(&t)? - time::to_millis(&s)?))
            .collect();
        rows
    };
    ms.sort_unstable();
    println!("| end-to-end latency (publish -> committed row), {} msg/s, SQLite, 2 workers | p50 | p99 | max |", a.rate);
    println!("|---|---:|---:|---:|");
    println!(
        "| {} messages | {} ms | {} ms | {} ms |",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(0)
    );
    drop(pg);
    drop(node);
    if own_dir {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(ExitCode::SUCCESS)
}
