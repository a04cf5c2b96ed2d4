//! The pulsebuildmonitor equivalent: a build callback and a test callback, filtered by
//! tree and platform, and Pulse's join loop.
//!
//! ```sh
//! cargo run --example pulse_monitor -- --url amqp://guest:guest@127.0.0.1:5672/%2f \
//!     --tree acme --platform k8 --platform linux64 [--label my-dashboard]
//! ```
//!
//! Pulse's `start_pulse_monitor(buildCallback=..., testCallback=..., trees=[...],
//! platforms=[...])` bound `#` and filtered in Python; here the tree and platform
//! filters become bindings, so the broker only sends what these callbacks want. With
//! `--label`, the subscription is durable: what is published while this is not
//! running waits for it. Ctrl-C stops it (the callback in hand finishes).

use std::time::Duration;

use buildbus::consumers::client::MonitorBuilder;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut url = std::env::var("BUILDBUS_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let (mut trees, mut platforms, mut label) = (Vec::new(), Vec::new(), None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--url" => url = value()?,
            "--tree" => trees.push(value()?),
            "--platform" => platforms.push(value()?),
            "--label" => label = Some(value()?),
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }

    let mut builder = MonitorBuilder::new(&url)
        .trees(trees)
        .platforms(platforms)
        // buildCallback: finished builds only.
        .on_build(|_msg, build| {
            let c = &build.common;
            println!(
                "build {} on {}/{}: {} (exit {}, {} ms)",
                c.build_id,
                c.tree.as_deref().unwrap_or("-"),
                c.platform.as_deref().unwrap_or("-"),
                build.result.map_or("?", |r| r.as_str()),
                build.exit_code.unwrap_or(-1),
                build.duration_ms.unwrap_or(0),
            );
        })
        // testCallback: test summaries (one per test and configuration).
        .on_test(|_msg, test| {
            println!(
                "  test {} {} ({} attempts)",
                test.test,
                test.status,
                test.total_attempts.unwrap_or(1)
            );
        });
    if let Some(l) = label {
        builder = builder.label(l);
    }
    let monitor = builder.start()?;
    for b in monitor.bindings() {
        eprintln!("bound {} {}", b.exchange, b.routing_key);
    }

    // Ctrl-C asks the monitor to stop; the join loop below then ends.
    let stopper = monitor.stopper();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for Ctrl-C");
        if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
            stopper.stop();
        }
    });

    // Pulse's join loop: wake up every second until the monitor ends.
    let mut last = 0;
    while !monitor.join(Duration::from_secs(1)) {
        let s = monitor.stats();
        if s.received != last {
            eprintln!(
                "[{} received, {} callbacks, {} failed]",
                s.received,
                s.callbacks,
                s.errors + s.panics
            );
            last = s.received;
        }
    }
    monitor.stop()?;
    Ok(())
}
