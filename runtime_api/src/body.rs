//! Reading request bodies with a size limit, shared by both servers, and the budget of
//! callers' bodies held at once.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// Why [`read_charged`] gave up.
pub(crate) enum ChargedError {
    Body(BodyError),
    /// The server already holds its [`BodyBudget`] of callers' bodies.
    OverBudget,
}

/// The bytes of callers' request bodies (Invoke payloads, function URL requests) the
/// server holds at once, over all its connections: each may be 6 MB, so a thousand
/// connections could otherwise hold 6 GB. A body is charged as it arrives and released
/// when its last copy is dropped, wherever the payload went meanwhile.
#[derive(Debug, Clone)]
pub(crate) struct BodyBudget(Arc<Semaphore>);

impl BodyBudget {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))))
    }

    /// Charges `bytes`; `None` when the budget has not that much left.
    fn charge(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let bytes = u32::try_from(bytes).ok()?;
        self.0.clone().try_acquire_many_owned(bytes).ok()
    }
}

/// A body and its charge to the budget, which lasts as long as the body.
struct Charged {
    body: Bytes,
    _charge: Option<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

/// Reads a body of at most `limit` bytes. Past the limit the rest is read and dropped
/// (up to [`DRAIN_LIMIT`]), so that a client that writes its whole body before reading
/// sees the 413 instead of a reset connection.
pub(crate) async fn read_limited(body: impl InBody, limit: usize) -> Result<Bytes, BodyError> {
    match read(body, limit, None).await {
        Ok(body) => Ok(body),
        Err(ChargedError::Body(e)) => Err(e),
        // (Nothing is charged without a budget.)
        Err(ChargedError::OverBudget) => Err(BodyError::Broken("over budget".into())),
    }
}

/// [`read_limited`], charging what it keeps to `budget`: past the budget,
/// [`ChargedError::OverBudget`] at once, the rest unread.
pub(crate) async fn read_charged(
    body: impl InBody,
    limit: usize,
    budget: &BodyBudget,
) -> Result<Bytes, ChargedError> {
    read(body, limit, Some(budget)).await
}

async fn read(
    mut body: impl InBody,
    limit: usize,
    budget: Option<&BodyBudget>,
) -> Result<Bytes, ChargedError> {
    let broken = |e: String| ChargedError::Body(BodyError::Broken(e));
    let exact = body
        .size_hint()
        .exact()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n <= limit);
    if let Some(size) = exact {
        // Known to fit (a framed body is whole already): charged at once, kept as it
        // comes, not copied.
        let charge = match budget {
            Some(budget) => Some(budget.charge(size).ok_or(ChargedError::OverBudget)?),
            None => None,
        };
        let body = body.collect().await.map_err(|e| broken(e.to_string()))?;
        return Ok(charged(body.to_bytes(), charge));
    }
    let mut kept = BytesMut::new();
    let mut charge: Option<OwnedSemaphorePermit> = None;
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| broken(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            if let Some(budget) = budget {
                let more = budget.charge(data.len()).ok_or(ChargedError::OverBudget)?;
                match &mut charge {
                    Some(charge) => charge.merge(more),
                    None => charge = Some(more),
                }
            }
            kept.extend_from_slice(&data);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > limit {
        return Err(ChargedError::Body(BodyError::TooLarge));
    }
    Ok(charged(kept.freeze(), charge))
}

/// `body`, holding `charge` for as long as any copy of it lives.
fn charged(body: Bytes, charge: Option<OwnedSemaphorePermit>) -> Bytes {
    match charge {
        Some(charge) => Bytes::from_owner(Charged {
            body,
            _charge: Some(charge),
        }),
        None => body,
    }
}
