//! Decoding one framed BEP event, from either of Bazel's two local formats, into the
//! one typed [`BuildEvent`].
//!
//! Events are boxed, and a binary one is decoded in place in its box: a `BuildEvent` is
//! about 650 bytes, and moving it through the decoder, the stream and the translator
//! cost more than the allocation.

use prost::Message;

use super::proto::build_event_stream::BuildEvent;
pub use super::sparse::Needs;
use crate::decode::error::Reason;

/// Decodes one line of `--build_event_json_file` (proto3 JSON).
pub fn decode_json(bytes: &[u8]) -> Result<Box<BuildEvent>, Reason> {
    let text = std::str::from_utf8(bytes).map_err(|e| Reason::InvalidUtf8(e.valid_up_to()))?;
    serde_json::from_str(text).map_err(|e| Reason::Json(e.to_string()))
}

/// Decodes one frame of `--build_event_binary_file` (without its length prefix),
/// leaving out what the translator never reads given `needs` (see [`super::sparse`]).
pub fn decode_binary(bytes: &[u8], needs: &Needs) -> Result<Box<BuildEvent>, Reason> {
    super::sparse::decode(bytes, needs)
        .unwrap_or_else(|| {
            let mut ev = Box::<BuildEvent>::default();
            ev.merge(bytes).map(|()| ev)
        })
        .map_err(|e| Reason::Protobuf(e.to_string()))
}

/// Decodes one frame of a Bazel stream: a JSON line, or (`binary`) a protobuf frame as
/// [`decode_binary`] does.
pub fn decode(bytes: &[u8], binary: bool, needs: &Needs) -> Result<Box<BuildEvent>, Reason> {
    if binary {
        decode_binary(bytes, needs)
    } else {
        decode_json(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_clear_error() {
        assert!(matches!(decode_json(b"{not json"), Err(Reason::Json(_))));
        assert!(matches!(
            decode_json(b"\xff\xfe"),
            Err(Reason::InvalidUtf8(0))
        ));
        assert!(matches!(
            decode_binary(&[0x0a, 0x05, 0x01], &Needs::ALL),
            Err(Reason::Protobuf(_))
        ));
    }

    #[test]
    fn unknown_fields_and_ids_are_tolerated() {
        let ev = decode_json(br#"{"id":{"somethingNew":{"x":1}},"brandNew":{"y":2}}"#).unwrap();
        assert!(ev.id.unwrap().id.is_none());
        assert!(ev.payload.is_none());
    }
}
