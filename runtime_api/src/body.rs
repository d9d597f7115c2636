//! Reading request bodies with a size limit, shared by both servers.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

/// A request body either server reads: hyper's, or one that arrived whole in a frame
/// ([`kindling_wire::frame`]).
pub(crate) trait InBody:
    hyper::body::Body<Data = Bytes, Error: std::fmt::Display> + Unpin + Send
{
}

impl<B> InBody for B where
    B: hyper::body::Body<Data = Bytes, Error: std::fmt::Display> + Unpin + Send
{
}

/// How much of an oversized body is read (and dropped) before the connection is given up.
const DRAIN_LIMIT: usize = 64 << 20;

pub(crate) enum BodyError {
    TooLarge,
    /// The client went away or sent a broken body.
    Broken(String),
}

/// Reads a body of at most `limit` bytes. Past the limit the rest is read and dropped
/// (up to [`DRAIN_LIMIT`]), so that a client that writes its whole body before reading
/// sees the 413 instead of a reset connection.
pub(crate) async fn read_limited(mut body: impl InBody, limit: usize) -> Result<Bytes, BodyError> {
    if body
        .size_hint()
        .exact()
        .is_some_and(|n| usize::try_from(n).is_ok_and(|n| n <= limit))
    {
        // Known to fit (a framed body is whole already): kept as it comes, not copied.
        return body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| BodyError::Broken(e.to_string()));
    }
    let mut kept = BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Broken(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            kept.extend_from_slice(&data);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > limit {
        return Err(BodyError::TooLarge);
    }
    Ok(kept.freeze())
}
