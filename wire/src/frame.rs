//! The framed stream between the agent and the host: once a connection is upgraded
//! ([`crate::PATH_STREAM`], `Upgrade: `[`PROTOCOL`]), it carries length-prefixed frames
//! instead of HTTP/1.1 messages. A frame is an HTTP request (agent → host) or the
//! answer to one (host → agent), matched by a sequence number, so that a `/next` waiting
//! for its event does not hold up a log post or a result behind it; the host answers
//! each as soon as it can, the event of a waiting `/next` as soon as it is assigned.
//!
//! Nothing here needs more than one ordered, reliable byte stream: the same frames run
//! over vsock and Unix sockets today, and could run over a virtio-console port (a
//! single stream QEMU can snapshot, unlike vhost-user-vsock).
//!
//! ```text
//! frame    := length:u32  kind:u8  seq:u32  start  headers  body     (big-endian)
//! start    := request: method-len:u8 method  path-len:u16 path  |  response: status:u16
//! headers  := count:u16  { name-len:u16 name  value-len:u16 value }
//! body     := the rest of the frame (length counts everything after itself)
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The `Upgrade:` token the agent asks for and the host grants.
pub const PROTOCOL: &str = "kindling-frames/1";
/// Largest frame either side accepts: the largest result, with room for its headers.
pub const MAX_FRAME: usize = crate::MAX_RESPONSE_BYTES + (1 << 20);
/// A write buffer grown past this by a large frame is dropped after it, not kept.
const KEEP_BUFFER: usize = 256 << 10;

const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;

/// One message on the stream.
#[derive(Debug)]
pub enum Frame {
    Request { seq: u32, request: Request<Bytes> },
    Response { seq: u32, response: Response<Bytes> },
}

/// A frame that cannot be encoded or decoded: the stream is given up.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError(pub String);

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FrameError {}

fn bad(what: impl Into<String>) -> FrameError {
    FrameError(what.into())
}

/// Appends `frame` to `out`.
pub fn encode(frame: &Frame, out: &mut BytesMut) -> Result<(), FrameError> {
    let start = out.len();
    out.put_u32(0); // the length, filled in below
    let (headers, body) = match frame {
        Frame::Request { seq, request } => {
            out.put_u8(KIND_REQUEST);
            out.put_u32(*seq);
            let method = request.method().as_str();
            let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
            out.put_u8(fit(method.len(), "method")?);
            out.put_slice(method.as_bytes());
            put_u16_prefixed(out, path.as_bytes(), "path")?;
            (request.headers(), request.body())
        }
        Frame::Response { seq, response } => {
            out.put_u8(KIND_RESPONSE);
            out.put_u32(*seq);
            out.put_u16(response.status().as_u16());
            (response.headers(), response.body())
        }
    };
    out.put_u16(fit(headers.len(), "header count")?);
    for (name, value) in headers {
        put_u16_prefixed(out, name.as_str().as_bytes(), "header name")?;
        put_u16_prefixed(out, value.as_bytes(), "header value")?;
    }
    out.put_slice(body);
    let length = out.len() - start - 4;
    let length = u32::try_from(length)
        .ok()
        .filter(|_| length <= MAX_FRAME)
        .ok_or_else(|| {
            out.truncate(start);
            bad(format!("frame of {length} bytes (limit {MAX_FRAME})"))
        })?;
    out[start..start + 4].copy_from_slice(&length.to_be_bytes());
    Ok(())
}

/// `n` as a field of type `T`, or an error naming `what` when it does not fit.
fn fit<T: TryFrom<usize>>(n: usize, what: &str) -> Result<T, FrameError> {
    T::try_from(n).map_err(|_| bad(format!("{what} too long for a frame ({n})")))
}

fn put_u16_prefixed(out: &mut BytesMut, bytes: &[u8], what: &str) -> Result<(), FrameError> {
    out.put_u16(fit(bytes.len(), what)?);
    out.put_slice(bytes);
    Ok(())
}

/// Takes the first whole frame off `buf`; `None` until one has fully arrived. A length
/// past [`MAX_FRAME`] is an error before its bytes are waited for.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if length > MAX_FRAME {
        return Err(bad(format!("frame of {length} bytes (limit {MAX_FRAME})")));
    }
    if buf.len() < 4 + length {
        buf.reserve(4 + length - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let mut frame = buf.split_to(length).freeze();
    let kind = take_u8(&mut frame)?;
    let seq = take_u32(&mut frame)?;
    match kind {
        KIND_REQUEST => {
            let method_len = usize::from(take_u8(&mut frame)?);
            let method = Method::from_bytes(&take(&mut frame, method_len)?)
                .map_err(|e| bad(format!("method: {e}")))?;
            let path = take_u16_prefixed(&mut frame)?;
            let mut request = Request::new(Bytes::new());
            *request.method_mut() = method;
            *request.uri_mut() =
                http::Uri::from_maybe_shared(path).map_err(|e| bad(format!("path: {e}")))?;
            *request.headers_mut() = take_headers(&mut frame)?;
            *request.body_mut() = frame;
            Ok(Some(Frame::Request { seq, request }))
        }
        KIND_RESPONSE => {
            let status = StatusCode::from_u16(take_u16(&mut frame)?)
                .map_err(|e| bad(format!("status: {e}")))?;
            let mut response = Response::new(Bytes::new());
            *response.status_mut() = status;
            *response.headers_mut() = take_headers(&mut frame)?;
            *response.body_mut() = frame;
            Ok(Some(Frame::Response { seq, response }))
        }
        other => Err(bad(format!("unknown frame kind {other}"))),
    }
}

fn take(frame: &mut Bytes, n: usize) -> Result<Bytes, FrameError> {
    if frame.len() < n {
        return Err(bad("frame cut short"));
    }
    Ok(frame.split_to(n))
}

fn take_u8(frame: &mut Bytes) -> Result<u8, FrameError> {
    Ok(take(frame, 1)?[0])
}

fn take_u16(frame: &mut Bytes) -> Result<u16, FrameError> {
    let b = take(frame, 2)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn take_u32(frame: &mut Bytes) -> Result<u32, FrameError> {
    let b = take(frame, 4)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn take_u16_prefixed(frame: &mut Bytes) -> Result<Bytes, FrameError> {
    let n = usize::from(take_u16(frame)?);
    take(frame, n)
}

fn take_headers(frame: &mut Bytes) -> Result<HeaderMap, FrameError> {
    let count = usize::from(take_u16(frame)?);
    let mut headers = HeaderMap::with_capacity(count);
    for _ in 0..count {
        let name = HeaderName::from_bytes(&take_u16_prefixed(frame)?)
            .map_err(|e| bad(format!("header name: {e}")))?;
        let value = HeaderValue::from_maybe_shared(take_u16_prefixed(frame)?)
            .map_err(|e| bad(format!("header {name}: {e}")))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The reading half of a stream: frames as they arrive, one read buffer reused.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(8 << 10),
        }
    }

    /// The next frame; `None` at a clean end of the stream. Cancel-safe: a frame read in
    /// part stays buffered for the next call.
    pub async fn next(&mut self) -> std::io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = decode(&mut self.buf).map_err(std::io::Error::other)? {
                return Ok(Some(frame));
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }
}

/// The writing half of a stream: each frame goes out in one write from a reused buffer.
#[derive(Debug)]
pub struct FrameWriter<W> {
    io: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W) -> Self {
        FrameWriter {
            io,
            buf: BytesMut::with_capacity(8 << 10),
        }
    }

    /// Writes `frame` whole. A frame too large to encode is an `InvalidInput` error and
    /// leaves the stream usable.
    pub async fn send(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.buf.clear();
        encode(frame, &mut self.buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let written = self.io.write_all(&self.buf).await;
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = BytesMut::with_capacity(8 << 10);
        }
        written?;
        self.io.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: &Frame) -> Frame {
        let mut buf = BytesMut::new();
        encode(frame, &mut buf).unwrap();
        // Every strict prefix is incomplete, not an error.
        for cut in 0..buf.len() {
            let mut part = BytesMut::from(&buf[..cut]);
            assert!(decode(&mut part).unwrap().is_none(), "prefix of {cut}");
        }
        buf.extend_from_slice(b"\0\0"); // the start of the next frame stays
        let got = decode(&mut buf).unwrap().expect("a whole frame");
        assert_eq!(&buf[..], b"\0\0");
        got
    }

    #[test]
    fn requests_and_responses_survive_the_trip() {
        let request = Request::post("/2018-06-01/runtime/invocation/abc/response?x=1")
            .header("lambda-runtime-function-error-type", "Function.Oops")
            .header("set-cookie", "a")
            .header("set-cookie", "b")
            .body(Bytes::from_static(b"{\"ok\":true}"))
            .unwrap();
        let Frame::Request { seq, request: got } = round_trip(&Frame::Request { seq: 7, request })
        else {
            panic!("not a request")
        };
        assert_eq!(seq, 7);
        assert_eq!(got.method(), Method::POST);
        assert_eq!(
            got.uri().path_and_query().unwrap().as_str(),
            "/2018-06-01/runtime/invocation/abc/response?x=1"
        );
        assert_eq!(
            got.headers()["lambda-runtime-function-error-type"],
            "Function.Oops"
        );
        let cookies: Vec<_> = got.headers().get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a", "b"]);
        assert_eq!(&got.body()[..], b"{\"ok\":true}");

        let response = Response::builder()
            .status(202)
            .header("content-type", "application/json")
            .body(Bytes::new())
            .unwrap();
        let Frame::Response { seq, response: got } = round_trip(&Frame::Response {
            seq: u32::MAX,
            response,
        }) else {
            panic!("not a response")
        };
        assert_eq!((seq, got.status().as_u16()), (u32::MAX, 202));
        assert_eq!(got.headers()["content-type"], "application/json");
        assert!(got.body().is_empty());
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused() {
        let mut huge = BytesMut::new();
        huge.put_u32(u32::try_from(MAX_FRAME).unwrap() + 1);
        assert!(
            decode(&mut huge).is_err(),
            "refused before its bytes arrive"
        );

        let body = Bytes::from(vec![0u8; MAX_FRAME]);
        let request = Request::post("/x").body(body).unwrap();
        let mut out = BytesMut::from(&b"kept"[..]);
        assert!(encode(&Frame::Request { seq: 1, request }, &mut out).is_err());
        assert_eq!(
            &out[..],
            b"kept",
            "a refused frame leaves the buffer as it was"
        );

        for garbage in [&[0u8, 0, 0, 5, 9, 0, 0, 0, 1][..], &[0, 0, 0, 2, 1, 0][..]] {
            let mut buf = BytesMut::from(garbage);
            assert!(decode(&mut buf).is_err(), "{garbage:?}");
        }
        // A header count larger than the headers sent.
        let mut buf = BytesMut::new();
        buf.put_u32(1 + 4 + 2 + 2);
        buf.put_u8(KIND_RESPONSE);
        buf.put_u32(1);
        buf.put_u16(200);
        buf.put_u16(3);
        assert_eq!(decode(&mut buf).unwrap_err(), bad("frame cut short"));
    }
}
