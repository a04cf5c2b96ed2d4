//! A live BitBake session, translated: the XML-RPC event sink ([`crate::sources::bitbake_live`]) feeding
//! the same translator as event logs, so a live build and its `-w` log give the same
//! messages.
//!
//! Each event's pickle goes to the translator in arrival order; the variables the UI
//! fetches on `BuildStarted` (what an event log's `allvariables` line holds) follow it.
//! The sink `out` may block (a publisher waiting for confirms): the session then stops
//! draining its queue, and BitBake's synchronous `event.sendpickle` calls wait, which is
//! the backpressure a live source can have.

use std::sync::Arc;

use crate::model::{Envelope, SourceMeta};
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
                    tr.event(BbEvent::Variables(variables_from_json(vars)), &mut emit);
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
