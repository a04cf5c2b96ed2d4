//! `buildbus-bench monitor`: the client library on a private RabbitMQ node.
//!
//! - callbacks/s: a labelled (durable quorum) queue preloaded with N messages, drained
//!   by a monitor whose callback does nothing, with 1 and 4 workers, beside a bare
//!   lapin consumer (ack per message, no parsing) on the same preloaded queue;
//! - latency: messages published by the confirmed publisher at a steady rate while a
//!   monitor runs; latency is the callback's start minus the moment just before the
//!   message was handed to the publisher (a header carries it, in microseconds), p50,
//!   p99 and max, for an unlabelled (exclusive) and a labelled (quorum) queue.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::Args;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::Cli;
use buildbus::bus::message::Outgoing;
use buildbus::bus::publish::{Publisher, PublisherConfig};
use buildbus::consumers::client::MonitorBuilder;
use buildbus::model::{ids, Envelope, DEFAULT_EXCHANGE_PREFIX};
use buildbus::sources::file::translate_file;
use buildbus::systems::Context;
use buildbus_testkit::rabbitmq::RabbitNode;

const EXAMPLES: &str = "\
Examples:
  # The figures of BENCHMARKS.md (a private RabbitMQ node is started and removed)
  cargo run --release -p buildbus-bench -- monitor
  # A shorter run
  cargo run --release -p buildbus-bench -- monitor --messages 5000 --seconds 3

callbacks/s: a labelled queue preloaded with --messages messages, drained by a monitor
with a no-op callback (1 and 4 workers) and by a bare lapin consumer. Latency: from just
before the publisher takes a message to the start of its callback, at --rate msg/s.";

/// Options of `bench monitor`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct MonitorBench {
    /// Messages preloaded for the callbacks/s measurement.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Rate of the latency runs, messages per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Length of each latency run, seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Where the fixtures are.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"), value_name = "DIR")]
    pub fixtures: PathBuf,
    /// Working folder (broker data); default a temporary one.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

const HEADER: &str = "x-bench-sent-us";

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// `n` distinct messages from the fixtures' real ones.
fn messages(fixtures: &std::path::Path, n: usize) -> anyhow::Result<Vec<Outgoing>> {
    let ctx = Arc::new(Context::builtin());
    let mut base: Vec<Envelope> = Vec::new();
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
    Ok(base
        .iter()
        .cycle()
        .take(n)
        .enumerate()
        .map(|(k, e)| {
            let mut e = e.clone();
            let entity = ids::entity_id("bench", &k.to_string(), e.meta.kind.as_str(), &[]);
            e.meta.message_id = ids::message_id(&entity, &e.meta.state);
            e.meta.entity_id = entity;
            Outgoing::from_envelope(&e)
        })
        .collect())
}

/// Publishes everything at once (confirms awaited at the end).
async fn preload(url: &str, msgs: &[Outgoing]) -> anyhow::Result<()> {
    super::pipeline::publish_raw(url, msgs).await.map(|_| ())
}

/// A labelled monitor with a no-op callback, declared once so its queue fills.
fn noop(url: &str, label: &str, workers: usize, count: Arc<AtomicU64>) -> MonitorBuilder {
    MonitorBuilder::new(url)
        .label(label)
        .workers(workers)
        .prefetch(500)
        .on_match(move |_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        })
}

/// Callbacks per second draining `msgs` preloaded into a labelled queue.
fn callbacks_per_sec(
    rt: &tokio::runtime::Runtime,
    url: &str,
    msgs: &[Outgoing],
    workers: usize,
) -> anyhow::Result<f64> {
    let label = format!("bench-{workers}");
    let count = Arc::new(AtomicU64::new(0));
    let m = noop(url, &label, workers, count.clone()).start()?;
    anyhow::ensure!(m.wait_ready(Duration::from_secs(60)), "monitor not ready");
    m.stop()?;
    rt.block_on(preload(url, msgs))?;
    let t = Instant::now();
    let m = noop(url, &label, workers, count.clone()).start()?;
    let n = msgs.len() as u64;
    while m.stats().handled < n {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(600),
            "drained {} of {n}",
            m.stats().handled
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = t.elapsed().as_secs_f64();
    m.stop()?;
    Ok(n as f64 / secs)
}

/// The same queue drained by bare lapin: consume, ack each, nothing else.
fn bare_per_sec(rt: &tokio::runtime::Runtime, url: &str, msgs: &[Outgoing]) -> anyhow::Result<f64> {
    // The queue is the 1-worker monitor's (declared with its arguments already).
    let queue = "queue/guest/bench-1";
    rt.block_on(preload(url, msgs))?;
    rt.block_on(async {
        let t = Instant::now();
        let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(500, BasicQosOptions::default()).await?;
        let mut c = ch
            .basic_consume(
                queue.into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut n = 0;
        while n < msgs.len() {
            match c.next().await {
                Some(Ok(d)) => {
                    d.acker.ack(BasicAckOptions::default()).await?;
                    n += 1;
                }
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("consumer ended"),
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let _ = conn.close(200, "bye".into()).await;
        Ok(msgs.len() as f64 / secs)
    })
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sent_us(props: &lapin::BasicProperties) -> Option<i64> {
    match props.headers().as_ref()?.inner().get(HEADER)? {
        AMQPValue::LongLongInt(sent) => Some(*sent),
        _ => None,
    }
}

/// A bare lapin consumer beside the monitor, on the same kind of queue: its own
/// exclusive one, or a durable quorum queue like a labelled monitor's. Gives the task
/// that collects `count` latencies (µs), once it consumes.
async fn bare_consumer(
    url: &str,
    durable: bool,
    count: usize,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Vec<i64>>>> {
    use buildbus::bus::topology::Topology;
    use buildbus::consumers::client::queue::{self, QueueLimits};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let topo = Topology::new(DEFAULT_EXCHANGE_PREFIX);
    topo.declare_exchanges(&ch).await?;
    let q = if durable {
        let limits = QueueLimits {
            max_length: buildbus::consumers::client::DEFAULT_MAX_LENGTH,
            max_length_bytes: None,
        };
        let name = "queue/guest/bench-bare";
        queue::declare_durable(&ch, name, &limits, &topo.dead_letter_exchange()).await?;
        name.to_string()
    } else {
        queue::declare_exclusive(&ch).await?
    };
    let all: Vec<buildbus::consumers::client::Binding> = buildbus::model::Kind::ALL
        .iter()
        .map(|k| buildbus::consumers::client::Binding {
            exchange: topo.exchange(*k),
            routing_key: "#".into(),
        })
        .collect();
    queue::bind_all(&ch, &q, &all).await?;
    ch.basic_qos(100, BasicQosOptions::default()).await?;
    let mut c = ch
        .basic_consume(
            q.as_str().into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(tokio::spawn(async move {
        let mut v = Vec::with_capacity(count);
        while v.len() < count {
            match tokio::time::timeout(Duration::from_secs(60), c.next()).await {
                Ok(Some(Ok(d))) => {
                    if let Some(sent) = sent_us(&d.properties) {
                        v.push(now_us() - sent);
                    }
                    d.acker.ack(BasicAckOptions::default()).await?;
                }
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) | Err(_) => anyhow::bail!("bare consumer: {} of {count}", v.len()),
            }
        }
        let _ = ch.close(200, "bye".into()).await;
        let _ = conn.close(200, "bye".into()).await;
        v.sort_unstable();
        Ok(v)
    }))
}

/// Publish → callback latencies (µs) at `rate` for `seconds`: the monitor's and, on the
/// same messages at the same time, a bare lapin consumer's.
fn latency(
    rt: &tokio::runtime::Runtime,
    url: &str,
    msgs: &[Outgoing],
    label: Option<&str>,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(Vec<i64>, Vec<i64>)> {
    let lat = Arc::new(Mutex::new(Vec::with_capacity((rate * seconds) as usize)));
    let l = lat.clone();
    let mut b = MonitorBuilder::new(url).on_match(move |m, _| {
        let now = now_us();
        if let Some(sent) = sent_us(&m.properties) {
            if let Ok(mut v) = l.lock() {
                v.push(now - sent);
            }
        }
    });
    if let Some(label) = label {
        b = b.label(label);
    }
    let m = b.start()?;
    anyhow::ensure!(m.wait_ready(Duration::from_secs(60)), "monitor not ready");
    let count = (rate * seconds) as usize;
    let bare = rt.block_on(async {
        let bare = bare_consumer(url, label.is_some(), count).await?;
        let mut cfg = PublisherConfig::new(url, DEFAULT_EXCHANGE_PREFIX);
        cfg.declare_dsi_queue = false;
        let mut p = Publisher::<u64>::connect(cfg).await?;
        let start = tokio::time::Instant::now();
        for (i, o) in msgs.iter().cycle().take(count).enumerate() {
            tokio::time::sleep_until(
                start + Duration::from_micros(i as u64 * 1_000_000 / rate.max(1)),
            )
            .await;
            let mut o = o.clone();
            let mut h = o.properties.headers().clone().unwrap_or_default();
            h.insert(ShortString::from(HEADER), AMQPValue::LongLongInt(now_us()));
            o.properties = o.properties.with_headers(h);
            p.publish(o, i as u64).await?;
        }
        p.close().await?;
        bare.await?
    })?;
    let t = Instant::now();
    while m.stats().handled < count as u64 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
    m.stop()?;
    let mut v = lat.lock().map(|v| v.clone()).unwrap_or_default();
    anyhow::ensure!(v.len() == count, "{} of {count} callbacks", v.len());
    v.sort_unstable();
    Ok((v, bare))
}

pub fn run(_cli: &Cli, a: &MonitorBench) -> anyhow::Result<ExitCode> {
    let own_dir = a.dir.is_none();
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("buildbus-bench-monitor-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    eprintln!("generating {} messages from the fixtures", a.messages);
    let msgs = messages(&a.fixtures, a.messages.max(1))?;
    eprintln!("starting a private RabbitMQ node");
    let node = RabbitNode::start(&dir).context("RabbitMQ (scripts/ensure-deps.sh)")?;
    let url = node.amqp_url();
    let rt = super::runtime()?;
    let n = msgs.len();
    println!(
        "# buildbus bench monitor: {n} messages, {} cores",
        std::thread::available_parallelism().map_or(0, |c| c.get())
    );
    println!();
    println!(
        "| drain a preloaded labelled (quorum) queue, no-op callback, best of 2 | callbacks/s |"
    );
    println!("|---|---:|");
    // Best of two runs each: the first drain after a start is often the slower.
    for w in [1, 4] {
        let r = callbacks_per_sec(&rt, &url, &msgs, w)?;
        let r = r.max(callbacks_per_sec(&rt, &url, &msgs, w)?);
        println!(
            "| monitor, {w} worker{} | {r:.0} |",
            if w > 1 { "s" } else { "" }
        );
    }
    let bare = bare_per_sec(&rt, &url, &msgs)?;
    let bare = bare.max(bare_per_sec(&rt, &url, &msgs)?);
    println!("| bare lapin consumer (ack each, no parsing) | {bare:.0} |");
    println!();
    println!(
        "| publish → callback latency, {} msg/s for {} s, 1 worker | p50 | p99 | max | over 20 ms |",
        a.rate, a.seconds
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, label) in [
        ("exclusive queue (no label)", None),
        ("labelled quorum queue", Some("bench-latency")),
    ] {
        let (ours, bare) = latency(&rt, &url, &msgs, label, a.rate, a.seconds)?;
        let ms = |us: i64| us as f64 / 1000.0;
        for (who, v) in [("monitor", &ours), ("bare lapin beside it", &bare)] {
            println!(
                "| {name}, {who}, {} messages | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
                v.len(),
                ms(percentile(v, 0.5)),
                ms(percentile(v, 0.99)),
                ms(v.last().copied().unwrap_or(0)),
                v.iter().filter(|&&us| us > 20_000).count(),
            );
        }
    }
    drop(node);
    if own_dir {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(ExitCode::SUCCESS)
}
