//! A live BitBake session, translated: the XML-RPC event sink ([`crate::sources::bitbake_live`]) feeding
//! the same translator as event logs, so a live build and its `-w` log give the same
//! messages.
//!
//! Each event's pickle goes to the translator in arrival order; the variables the UI
//! fetches on `BuildStarted` (what an event log's `allvariables` line holds) follow it.
//! The sink `out` may block (a publisher waiting for confirms): the session then stops
//! draining its queue, and BitBake's synchronous `event.sendpickle` calls wait, which is
//! the backpressure a live source can have.
//!
//! [`publish_live`] is the whole pipeline: the session's messages go through a
//! [`Pipeline`] (publisher or stdout, and the build's artifacts when it finishes).

use std::sync::Arc;

use crate::bus::BusError;
use crate::model::{Envelope, SourceMeta};
use crate::pipeline::Pipeline;
use crate::sources::bitbake_live::{run_live_with, Interrupts, LiveError, LiveOptions, LiveReport};
use crate::systems::bitbake::codec::{variables_from_json, BbEvent};
use crate::systems::bitbake::BitbakeTranslator;
use crate::systems::{Context, Translator};

/// What a translated live session did.
#[derive(Debug)]
pub struct SessionReport {
    pub live: LiveReport,
    /// Messages produced.
    pub messages: u64,
    /// Events whose pickle did not decode (skipped), with their sequence number.
    pub errors: Vec<String>,
}

/// Runs a live session and translates it; every message goes to `out`, in order.
pub async fn translate_live<F>(
    opts: LiveOptions,
    ctx: Arc<Context>,
    interrupts: Option<Interrupts>,
    mut out: F,
) -> Result<SessionReport, LiveError>
where
    F: FnMut(Envelope) + Send,
{
    let source = SourceMeta {
        system: "bitbake".into(),
        format: "bitbake-xmlrpc".into(),
        origin: format!("xmlrpc://{}", opts.server),
        tool_version: None,
    };
    let origin = source.origin.clone();
    let mut tr = BitbakeTranslator::new(ctx, source);
    let mut messages = 0u64;
    let mut errors = Vec::new();
    let live = {
        let mut emit = |env: Envelope| {
            messages += 1;
            out(env);
        };
        let report = run_live_with(opts, interrupts, |ev| match ev.value {
            Ok(value) => {
                let class = value
                    .as_object()
                    .map(|o| o.class.to_string())
                    .unwrap_or_default();
                let event = BbEvent::Event {
                    class,
                    raw: ev.pickle.to_vec(),
                    value: Some(value),
                };
                tr.event(event, &mut emit);
                if let Some(vars) = ev.variables.as_ref() {
                    match variables_from_json(vars) {
                        Ok(v) => tr.event(BbEvent::Variables(v), &mut emit),
                        Err(e) => errors.push(format!("{origin}: event #{}: {e}", ev.seq)),
                    }
                }
            }
            Err(e) => errors.push(format!("{origin}: event #{}: {e}", ev.seq)),
        })
        .await?;
        tr.finish(&mut emit);
        report
    };
    Ok(SessionReport {
        live,
        messages,
        errors,
    })
}

/// Runs a live session through `pipe`: every message (and a finished build's
/// artifacts) is sent in order. Nothing is acknowledged to BitBake (its calls return
/// once queued), so no position is marked. While the publisher's window is full the session waits (and BitBake
/// with it). A publishing error ends the session's output; it is returned after the
/// session ends.
pub async fn publish_live(
    opts: LiveOptions,
    ctx: Arc<Context>,
    interrupts: Option<Interrupts>,
    pipe: &mut Pipeline<'_, u64>,
) -> Result<Result<SessionReport, BusError>, LiveError> {
    let handle = tokio::runtime::Handle::current();
    let mut failed: Option<BusError> = None;
    let report = translate_live(opts, ctx, interrupts, |env| {
        if failed.is_some() {
            return;
        }
        // Blocks this thread (the session's), not the runtime's other tasks: the
        // artifact scan and a full window both wait here.
        let r = tokio::task::block_in_place(|| handle.block_on(pipe.emit(&env)));
        if let Err(e) = r {
            failed = Some(e);
        }
    })
    .await?;
    Ok(match failed {
        Some(e) => Err(e),
        None => Ok(report),
    })
}
