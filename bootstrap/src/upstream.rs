//! The connection to the host's Runtime API over vsock (microVM), streams of a virtio-serial
//! port ([`crate::port`]: a QEMU microVM that SnapStart snapshots) or a Unix socket
//! (sandbox): one frame stream ([`kindling_wire::frame`]) for every call whose body is
//! whole, negotiated with an HTTP/1.1 upgrade on first use, and a small keep-alive pool of
//! HTTP/1.1 connections for streamed bodies (and for everything, when the host does not
//! offer frames).
//!
//! Connecting retries with backoff for as long as it takes, so a request never fails just
//! because the host is not up yet or is restarting: the request (and a streamed body) is
//! only handed to a connection once one exists. Every message is framed by
//! Content-Length or chunked encoding; nothing relies on half-close, which the vsock
//! path under test does not propagate.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kindling_wire::frame::{self, Frame, FrameReader, FrameWriter};
use kindling_wire::quiet_stream::QuietUnixStream;
use kindling_wire::{FunctionEnvironment, HostAddr, PATH_ENVIRONMENT, PATH_STREAM};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, WriteHalf};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio_vsock::{VsockAddr, VsockStream};

use crate::port::PortLink;
use tower_service::Service as _;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of everything the bootstrap sends, relayed streams and its own messages.
pub type Body = BoxBody<Bytes, BoxError>;

/// The authority used in upstream URIs; only a pool key, the socket is fixed.
const HOST_AUTHORITY: &str = "kindling-host";
/// Idle connections kept to the host: the runtime's /next plus a few concurrent posts.
const POOL_SIZE: usize = 4;
const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A body from bytes the bootstrap already holds.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// Doubling delays between `BACKOFF_START` and `BACKOFF_MAX`.
pub struct Backoff(Duration);

impl Backoff {
    pub fn new() -> Self {
        Backoff(BACKOFF_START)
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
    }
}

#[derive(Clone)]
pub struct Upstream {
    client: Client<HostConnector, Body>,
    connector: HostConnector,
    link: Arc<tokio::sync::Mutex<Link>>,
}

/// How whole calls reach the host.
enum Link {
    /// Not negotiated yet, or the stream broke: the next call negotiates.
    Unknown,
    Framed(Arc<FrameStream>),
    /// The host refused the upgrade (an older host): HTTP for good.
    Http,
}

impl Upstream {
    pub fn new(addr: HostAddr) -> Self {
        let connector = HostConnector {
            target: Arc::new(match &addr {
                HostAddr::Unix(path) => Target::Unix(path.clone()),
                HostAddr::Vsock { cid, port } => Target::Vsock(VsockAddr::new(*cid, *port)),
                HostAddr::VirtioPort(name) => Target::Port(PortLink::new(name)),
            }),
            addr: Arc::new(addr),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_SIZE)
            .pool_idle_timeout(None)
            .build(connector.clone());
        Upstream {
            client,
            connector,
            link: Arc::new(tokio::sync::Mutex::new(Link::Unknown)),
        }
    }

    /// Sends `req` (whose URI holds only a path and query) to the host over HTTP, its
    /// body streamed through.
    pub async fn send(
        &self,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *req.uri_mut() = host_uri(&path);
        self.client.request(req).await
    }

    /// Sends a request whose body is whole: as one frame on the stream, or over HTTP
    /// where the host offers no stream.
    pub async fn exchange(&self, req: Request<Bytes>) -> Result<Response<Body>, String> {
        match self.stream().await? {
            Some(stream) => Ok(stream.call(req).await?.map(full)),
            None => match self.send(req.map(full)).await {
                Ok(resp) => Ok(resp.map(|b| b.map_err(Into::into).boxed())),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// The frame stream, negotiated now if there is none; `None` on HTTP.
    async fn stream(&self) -> Result<Option<Arc<FrameStream>>, String> {
        let mut link = self.link.lock().await;
        match &*link {
            Link::Framed(stream) if stream.is_live() => return Ok(Some(stream.clone())),
            Link::Http => return Ok(None),
            Link::Unknown | Link::Framed(_) => {}
        }
        let negotiated = FrameStream::negotiate(&self.connector).await?;
        *link = match &negotiated {
            Some(stream) => Link::Framed(stream.clone()),
            None => {
                say!("the host offers no frame stream: speaking HTTP to it");
                Link::Http
            }
        };
        Ok(negotiated)
    }

    /// Posts a small message and reads the answer; a non-2xx status is an error.
    pub async fn post(
        &self,
        path: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<(), String> {
        let mut req = Request::post(path).body(body).expect("valid request");
        for (name, value) in headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        let resp = self
            .exchange(req)
            .await
            .map_err(|e| format!("POST {path}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("POST {path}: {e}"))?
            .to_bytes();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "POST {path}: {status}: {}",
                String::from_utf8_lossy(&body)
            ))
        }
    }

    /// Posts a JSON document.
    pub async fn post_json(&self, path: &str, value: &impl serde::Serialize) -> Result<(), String> {
        let body = serde_json::to_vec(value).map_err(|e| format!("POST {path}: {e}"))?;
        let json = (CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.post(path, &[json], body.into()).await
    }

    /// The function's configuration. Waits for the host to answer; a body that is not a
    /// valid [`FunctionEnvironment`] is an error, since retrying would not change it.
    pub async fn environment(&self) -> Result<FunctionEnvironment, String> {
        let mut backoff = Backoff::new();
        loop {
            let req = Request::builder()
                .method(Method::GET)
                .uri(PATH_ENVIRONMENT)
                .body(full(Bytes::new()))
                .expect("valid request");
            let answer = match self.send(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    match resp.into_body().collect().await {
                        Ok(body) if status.is_success() => {
                            return serde_json::from_slice(&body.to_bytes()).map_err(|e| {
                                format!("GET {PATH_ENVIRONMENT}: not a function environment: {e}")
                            });
                        }
                        Ok(body) => {
                            format!("{status}: {}", String::from_utf8_lossy(&body.to_bytes()))
                        }
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) => e.to_string(),
            };
            say!("GET {PATH_ENVIRONMENT}: {answer}; retrying");
            backoff.wait().await;
        }
    }
}

fn host_uri(path_and_query: &str) -> Uri {
    Uri::builder()
        .scheme("http")
        .authority(HOST_AUTHORITY)
        .path_and_query(path_and_query)
        .build()
        .expect("a path from a parsed request is a valid URI")
}

/// Answers awaited on a stream, by sequence number.
type Waiting = HashMap<u32, oneshot::Sender<Response<Bytes>>>;

/// A negotiated frame stream: calls go out as request frames (one write each), and a
/// reader task hands each answer to the call waiting for its sequence number.
struct FrameStream {
    writer: tokio::sync::Mutex<FrameWriter<WriteHalf<TokioIo<Upgraded>>>>,
    /// `None` once the stream broke: its calls fail, and the next one negotiates anew
    /// (after a host restart, or a snapshot's reset of every vsock connection).
    waiting: Mutex<Option<Waiting>>,
    next_seq: AtomicU32,
}

const STREAM_BROKE: &str = "the frame stream to the host broke";

impl FrameStream {
    /// Opens a connection (retrying until the host is there) and asks to upgrade it;
    /// `None` when the host answers anything but 101.
    async fn negotiate(connector: &HostConnector) -> Result<Option<Arc<Self>>, String> {
        let io = connector
            .clone()
            .call(host_uri(PATH_STREAM))
            .await
            .map_err(|e| format!("frame stream: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Body>(io)
            .await
            .map_err(|e| format!("frame stream: {e}"))?;
        tokio::spawn(async move {
            // Ends at the upgrade; an error here also fails the request below.
            let _ = connection.with_upgrades().await;
        });
        let req = Request::get(PATH_STREAM)
            .header(HOST, HOST_AUTHORITY)
            .header(UPGRADE, frame::PROTOCOL)
            .header(CONNECTION, "upgrade")
            .body(full(Bytes::new()))
            .expect("valid request");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("frame stream: {e}"))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(None);
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| format!("frame stream: {e}"))?;
        let (reader, writer) = tokio::io::split(TokioIo::new(upgraded));
        let stream = Arc::new(FrameStream {
            writer: tokio::sync::Mutex::new(FrameWriter::new(writer)),
            waiting: Mutex::new(Some(HashMap::new())),
            next_seq: AtomicU32::new(0),
        });
        tokio::spawn(stream.clone().read_answers(FrameReader::new(reader)));
        Ok(Some(stream))
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Option<Waiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_live(&self) -> bool {
        self.waiting().is_some()
    }

    /// Fails every waiting call, and every later one.
    fn break_off(&self) {
        self.waiting().take();
    }

    async fn read_answers(
        self: Arc<Self>,
        mut reader: FrameReader<tokio::io::ReadHalf<TokioIo<Upgraded>>>,
    ) {
        loop {
            match reader.next().await {
                Ok(Some(Frame::Response { seq, response })) => {
                    let waiter = self.waiting().as_mut().and_then(|w| w.remove(&seq));
                    // A call given up on (its runtime hung up) finds no one waiting.
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(response);
                    }
                }
                Ok(Some(Frame::Request { .. })) => {
                    say!("frame stream: the host sent a request; dropping the stream");
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    say!("frame stream: {e}");
                    break;
                }
            }
        }
        self.break_off();
    }

    /// Sends one call and waits for its answer.
    async fn call(&self, request: Request<Bytes>) -> Result<Response<Bytes>, String> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self.waiting().as_mut() {
            Some(waiting) => waiting.insert(seq, tx),
            None => return Err(STREAM_BROKE.into()),
        };
        let _forget = Forget { stream: self, seq };
        let sent = self
            .writer
            .lock()
            .await
            .send(&Frame::Request { seq, request })
            .await;
        if let Err(e) = sent {
            // A frame too large leaves the stream whole; a failed write does not.
            if e.kind() != io::ErrorKind::InvalidInput {
                self.break_off();
            }
            return Err(format!("frame stream: {e}"));
        }
        rx.await.map_err(|_| STREAM_BROKE.to_string())
    }
}

/// Forgets a call's place among the waiting when the call ends, answered or not.
struct Forget<'a> {
    stream: &'a FrameStream,
    seq: u32,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(waiting) = self.stream.waiting().as_mut() {
            waiting.remove(&self.seq);
        }
    }
}

/// Opens connections to the host, retrying with backoff until one succeeds.
#[derive(Clone)]
struct HostConnector {
    /// For messages.
    addr: Arc<HostAddr>,
    target: Arc<Target>,
}

/// What a connection to the host is opened on.
enum Target {
    Unix(PathBuf),
    Vsock(VsockAddr),
    /// The session of a virtio-serial link, shared by every connection.
    Port(PortLink),
}

impl HostConnector {
    async fn connect_once(&self) -> io::Result<HostStream> {
        Ok(match &*self.target {
            // Registered for reading only: the host reading each frame would otherwise
            // wake the agent for nothing ([`QuietUnixStream`]).
            Target::Unix(path) => {
                let socket = UnixStream::connect(path).await?.into_std()?;
                HostStream(Box::new(QuietUnixStream::new(socket)?))
            }
            Target::Vsock(addr) => HostStream(Box::new(VsockStream::connect(*addr).await?)),
            Target::Port(link) => HostStream(Box::new(link.connect().await?)),
        })
    }
}

impl tower_service::Service<Uri> for HostConnector {
    type Response = TokioIo<HostStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let connector = self.clone();
        let addr = self.addr.clone();
        Box::pin(async move {
            let mut backoff = Backoff::new();
            let mut failures = 0u32;
            let mut next_say = 0u32;
            loop {
                match connector.connect_once().await {
                    Ok(stream) => {
                        if failures > 0 {
                            say!("connected to the host at {addr}");
                        }
                        return Ok(TokioIo::new(stream));
                    }
                    Err(e) => {
                        // First failure, then about every ten seconds at the backoff cap.
                        if failures == next_say {
                            next_say += 10;
                            say!("host {addr} not reachable ({e}); retrying");
                        }
                        failures += 1;
                        backoff.wait().await;
                    }
                }
            }
        })
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connected stream to the host, whichever transport carries it.
pub struct HostStream(Box<dyn Io>);

impl Connection for HostStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for HostStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for HostStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}
