//! AWS's event-stream encoding (`application/vnd.amazon.eventstream`), as
//! `InvokeWithResponseStream` answers: a sequence of binary messages, each
//!
//! ```text
//! total length (u32 BE) | headers length (u32 BE) | CRC32 of those 8 bytes
//! headers: name length (u8) | name | type 7 = string | value length (u16 BE) | value
//! payload
//! CRC32 of everything before it (u32 BE)
//! ```
//!
//! Lambda sends `PayloadChunk` events (the payload's bytes) and one `InvokeComplete`
//! event at the end (JSON with `ErrorCode`, `ErrorDetails`, `LogResult`).

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Map, Value};

pub const CONTENT_TYPE: &str = "application/vnd.amazon.eventstream";
/// The header value type of a string.
const STRING: u8 = 7;
/// Prelude (two lengths and their CRC) and the trailing message CRC.
const FRAMING: usize = 16;

/// One `PayloadChunk` event with these bytes.
pub fn payload_chunk(payload: &[u8]) -> Bytes {
    event("PayloadChunk", "application/octet-stream", payload)
}

/// The `InvokeComplete` event: `error` is the error's code and details when the
/// invocation failed; `log_result` the base64 log tail when it was asked for.
pub fn invoke_complete(error: Option<(&str, &str)>, log_result: Option<&str>) -> Bytes {
    let mut fields = Map::new();
    if let Some((code, details)) = error {
        fields.insert("ErrorCode".into(), code.into());
        fields.insert("ErrorDetails".into(), details.into());
    }
    if let Some(log) = log_result {
        fields.insert("LogResult".into(), log.into());
    }
    let json = Value::Object(fields).to_string();
    event("InvokeComplete", "application/json", json.as_bytes())
}

fn event(event_type: &str, content_type: &str, payload: &[u8]) -> Bytes {
    message(
        &[
            (":event-type", event_type),
            (":content-type", content_type),
            (":message-type", "event"),
        ],
        payload,
    )
}

/// One message with string headers.
fn message(headers: &[(&str, &str)], payload: &[u8]) -> Bytes {
    let mut encoded_headers = BytesMut::new();
    for (name, value) in headers {
        // Our own names and values: short constants, well within u8/u16.
        encoded_headers.put_u8(u8::try_from(name.len()).unwrap_or(u8::MAX));
        encoded_headers.put_slice(name.as_bytes());
        encoded_headers.put_u8(STRING);
        encoded_headers.put_u16(u16::try_from(value.len()).unwrap_or(u16::MAX));
        encoded_headers.put_slice(value.as_bytes());
    }
    let total = FRAMING + encoded_headers.len() + payload.len();
    let mut out = BytesMut::with_capacity(total);
    // A payload is at most one chunk of a 20 MB stream: far below 4 GiB.
    out.put_u32(u32::try_from(total).unwrap_or(u32::MAX));
    out.put_u32(u32::try_from(encoded_headers.len()).unwrap_or(u32::MAX));
    let prelude_crc = crc32fast::hash(&out);
    out.put_u32(prelude_crc);
    out.put_slice(&encoded_headers);
    out.put_slice(payload);
    let message_crc = crc32fast::hash(&out);
    out.put_u32(message_crc);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes one message, checking both CRCs: (headers, payload).
    fn decode(m: &[u8]) -> (Vec<(String, String)>, Vec<u8>) {
        let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
        let total = be(&m[0..4]) as usize;
        let headers_len = be(&m[4..8]) as usize;
        assert_eq!(total, m.len());
        assert_eq!(be(&m[8..12]), crc32fast::hash(&m[0..8]));
        assert_eq!(be(&m[total - 4..]), crc32fast::hash(&m[..total - 4]));
        let mut h = &m[12..12 + headers_len];
        let mut headers = Vec::new();
        while !h.is_empty() {
            let n = h[0] as usize;
            let name = String::from_utf8(h[1..1 + n].to_vec()).unwrap();
            assert_eq!(h[1 + n], STRING);
            let v = u16::from_be_bytes([h[2 + n], h[3 + n]]) as usize;
            let value = String::from_utf8(h[4 + n..4 + n + v].to_vec()).unwrap();
            headers.push((name, value));
            h = &h[4 + n + v..];
        }
        (headers, m[12 + headers_len..total - 4].to_vec())
    }

    #[test]
    fn messages_carry_their_headers_payload_and_checksums() {
        let (headers, payload) = decode(&payload_chunk(b"hello"));
        assert!(headers.contains(&(":event-type".into(), "PayloadChunk".into())));
        assert!(headers.contains(&(":message-type".into(), "event".into())));
        assert_eq!(payload, b"hello");
        let (headers, payload) = decode(&invoke_complete(Some(("Unhandled", "boom")), None));
        assert!(headers.contains(&(":event-type".into(), "InvokeComplete".into())));
        let json: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(json["ErrorCode"], "Unhandled");
        assert_eq!(json["ErrorDetails"], "boom");
        assert!(json.get("LogResult").is_none());
    }

    #[test]
    fn matches_a_known_message() {
        // The empty message with no headers: prelude 0x00000010 0x00000000 + CRCs, as in
        // AWS's event-stream test vectors ("empty_message").
        let m = message(&[], b"");
        assert_eq!(
            &m[..],
            &[0, 0, 0, 0x10, 0, 0, 0, 0, 0x05, 0xc2, 0x48, 0xeb, 0x7d, 0x98, 0xc8, 0xff]
        );
    }
}
