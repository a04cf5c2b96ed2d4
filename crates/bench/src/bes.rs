//! `buildbus-bench bes`: events/s through the BES backend, beside the file translation
//! rate of the same events.
//!
//! The recorded session's Bazel events are repeated (each copy with a fresh uuid in its
//! `started` event, so each copy is its own build) to the requested count and split
//! over `--streams` invocations. A tonic client streams every invocation's requests at
//! once, as Bazel does, to a backend in this process that publishes to a private
//! RabbitMQ node with confirms; the time runs until the last ack arrived, so every
//! message is confirmed by the broker. The baseline translates the same events,
//! written as a binary BEP file, with `translate_file` and serializes every message:
//! what `publish` does before the broker; and `publish` of that file to the same broker
//! shows what the broker itself allows.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context as _};
use clap::Args;
use prost::Message;

use super::Cli;
use buildbus::bus::publish::{Publisher, PublisherConfig};
use buildbus::decode::bep::proto::build_event_stream::{build_event::Payload, BuildEvent};
use buildbus::model::DEFAULT_EXCHANGE_PREFIX;
use buildbus::pipeline::bes;
use buildbus::pipeline::file::{publish_file, FileOptions};
use buildbus::sources::bes::capture;
use buildbus::sources::bes::proto::v1::build_event::{
    build_component_stream_finished::FinishType, BuildComponentStreamFinished, Event as BesEvent,
};
use buildbus::sources::bes::proto::v1::{
    BuildEvent as BesBuildEvent, OrderedBuildEvent, PublishBuildToolEventStreamRequest, StreamId,
};
use buildbus::sources::bes::proto::BAZEL_EVENT_TYPE;
use buildbus::sources::bes::BesConfig;
use buildbus::sources::file::translate_file;
use buildbus::systems::Context;
use buildbus_testkit::RabbitNode;

#[derive(Debug, Args)]
pub struct BesBench {
    /// Bazel events to stream (at least; whole builds are repeated).
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// Invocations streamed at once (the events are split between them).
    #[arg(long, default_value = "1,4", value_delimiter = ',')]
    pub streams: Vec<usize>,
    /// The recorded session to repeat.
    #[arg(long, default_value = "tests/fixtures/bazel/bes_capture.jsonl")]
    pub capture: PathBuf,
    /// Run the backend without its spool (to see what the spool costs).
    #[arg(long)]
    pub no_spool: bool,
    /// Working directory (default: a fresh one under the temp dir, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The capture's Bazel events, repeated with fresh uuids until there are `n`.
fn repeated(capture_events: &[BuildEvent], n: usize) -> Vec<BuildEvent> {
    let mut out = Vec::with_capacity(n + capture_events.len());
    let mut copy = 0u64;
    while out.len() < n {
        let uuid = format!("00000000-0000-4000-8000-{copy:012x}");
        for ev in capture_events {
            let mut ev = ev.clone();
            if let Some(Payload::Started(s)) = ev.payload.as_mut() {
                s.uuid = uuid.clone();
            }
            out.push(ev);
        }
        copy += 1;
    }
    out
}

fn requests(invocation: &str, events: &[BuildEvent]) -> Vec<PublishBuildToolEventStreamRequest> {
    let sid = StreamId {
        build_id: format!("build-{invocation}"),
        invocation_id: invocation.to_string(),
        component: 3,
    };
    let ordered = |seq: i64, event: BesEvent| PublishBuildToolEventStreamRequest {
        ordered_build_event: Some(OrderedBuildEvent {
            stream_id: Some(sid.clone()),
            sequence_number: seq,
            event: Some(BesBuildEvent {
                event_time: None,
                event: Some(event),
            }),
        }),
        ..Default::default()
    };
    let mut reqs: Vec<_> = events
        .iter()
        .enumerate()
        .map(|(i, ev)| {
            let any = pbjson_types::Any {
                type_url: BAZEL_EVENT_TYPE.to_string(),
                value: ev.encode_to_vec().into(),
            };
            ordered(i as i64 + 1, BesEvent::BazelEvent(any))
        })
        .collect();
    reqs.push(ordered(
        events.len() as i64 + 1,
        BesEvent::ComponentStreamFinished(BuildComponentStreamFinished {
            r#type: FinishType::Finished as i32,
        }),
    ));
    reqs
}

pub fn run(_cli: &Cli, a: &BesBench) -> anyhow::Result<ExitCode> {
    let own_dir = a.dir.is_none();
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("buildbus-bench-bes-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    let calls = capture::read_capture(&a.capture)?;
    let base = capture::bazel_events(&calls);
    ensure!(!base.is_empty(), "{}: no Bazel events", a.capture.display());
    let events = repeated(&base, a.events);
    let n = events.len();

    // Baseline: the same events as a binary BEP file, translated and serialized.
    let bin = dir.join("bench.bin");
    {
        let mut w = BufWriter::new(std::fs::File::create(&bin)?);
        for ev in &events {
            w.write_all(&ev.encode_length_delimited_to_vec())?;
        }
        w.flush()?;
    }
    let ctx = Arc::new(Context::builtin());
    let mut file_best = f64::MAX;
    let mut messages = 0u64;
    for _ in 0..3 {
        let mut count = 0u64;
        let t = Instant::now();
        let r = translate_file(
            &bin,
            Some(buildbus::systems::bazel::BEP_BINARY),
            &ctx,
            &mut |env| {
                count += 1;
                std::hint::black_box(env.to_json());
            },
        );
        file_best = file_best.min(t.elapsed().as_secs_f64());
        ensure!(r.clean(), "baseline translation: {:?}", r.errors);
        messages = count;
    }

    eprintln!("starting a private RabbitMQ node");
    let node = RabbitNode::start(&dir).context("RabbitMQ (scripts/ensure-deps.sh)")?;
    let url = node.amqp_url();
    let rt = super::runtime()?;
    println!(
        "# buildbus bench bes: {n} Bazel events ({messages} messages) from {}",
        a.capture.display()
    );
    println!();
    println!("| run | streams | s | events/s | messages/s | vs file translation |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| file translation (binary BEP, serialized, no broker) | – | {file_best:.3} | {:.0} | {:.0} | 1.00x |",
        n as f64 / file_best,
        messages as f64 / file_best
    );
    // The file path through the same broker: `publish` of the binary file.
    let publish_secs = rt.block_on(async {
        let mut p =
            Publisher::<u64>::connect(PublisherConfig::new(&url, DEFAULT_EXCHANGE_PREFIX)).await?;
        let t = Instant::now();
        let r = publish_file(&mut p, &bin, Arc::clone(&ctx), &FileOptions::default(), 512).await?;
        p.close().await?;
        ensure!(
            r.published == messages,
            "published {} of {messages}",
            r.published
        );
        anyhow::Ok(t.elapsed().as_secs_f64())
    })?;
    println!(
        "| file → RabbitMQ (`publish`, confirmed) | – | {publish_secs:.3} | {:.0} | {:.0} | {:.2}x |",
        n as f64 / publish_secs,
        messages as f64 / publish_secs,
        publish_secs / file_best
    );
    for (round, &streams) in a.streams.iter().enumerate() {
        let streams = streams.max(1);
        let per = n.div_ceil(streams);
        let work: Vec<Vec<PublishBuildToolEventStreamRequest>> = events
            .chunks(per)
            .enumerate()
            .map(|(i, chunk)| requests(&format!("bench-{round}-{i}"), chunk))
            .collect();
        let secs = rt.block_on(async {
            let mut cfg = BesConfig::new(
                "127.0.0.1:0".parse()?,
                Some(PublisherConfig::new(&url, DEFAULT_EXCHANGE_PREFIX)),
            );
            if !a.no_spool {
                cfg.spool = Some(dir.join(format!("spool-{round}")));
            }
            let backend = bes::start(cfg, Arc::clone(&ctx)).await?;
            let addr = format!("http://{}", backend.addr);
            let t = Instant::now();
            let mut tasks = Vec::new();
            for reqs in work {
                let addr = addr.clone();
                tasks.push(tokio::spawn(async move {
                    let want = reqs.len();
                    let mut client = capture::connect(&addr).await?;
                    let acks = capture::send_stream(&mut client, reqs, &vec![]).await?;
                    anyhow::ensure!(
                        acks.len() == want,
                        "{} acks for {want} requests",
                        acks.len()
                    );
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            let secs = t.elapsed().as_secs_f64();
            backend.stop().await?;
            anyhow::Ok(secs)
        })?;
        println!(
            "| BES backend → RabbitMQ (confirmed) | {streams} | {secs:.3} | {:.0} | {:.0} | {:.2}x |",
            n as f64 / secs,
            messages as f64 / secs,
            secs / file_best
        );
    }
    drop(node);
    if own_dir {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(ExitCode::SUCCESS)
}
