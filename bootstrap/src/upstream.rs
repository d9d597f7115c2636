//! The connection to the host's Runtime API: a small keep-alive pool of HTTP/1.1
//! connections over vsock (microVM) or a Unix socket (sandbox).
//!
//! Connecting retries with backoff for as long as it takes, so a request never fails just
//! because the host is not up yet or is restarting: the request (and a streamed body) is
//! only handed to a connection once one exists. Every message is framed by
//! Content-Length or chunked encoding; nothing relies on half-close, which the vsock
//! path under test does not propagate.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kindling_wire::{FunctionEnvironment, HostAddr, PATH_ENVIRONMENT};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio_vsock::{VsockAddr, VsockStream};

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
}

impl Upstream {
    pub fn new(addr: HostAddr) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_SIZE)
            .pool_idle_timeout(None)
            .build(HostConnector {
                addr: Arc::new(addr),
            });
        Upstream { client }
    }

    /// Sends `req` (whose URI holds only a path and query) to the host.
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

    /// Posts a small message and reads the answer; a non-2xx status is an error.
    pub async fn post(
        &self,
        path: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<(), String> {
        let mut req = Request::post(path).body(full(body)).expect("valid request");
        for (name, value) in headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        let resp = self
            .send(req)
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

/// Opens connections to the host, retrying with backoff until one succeeds.
#[derive(Clone)]
struct HostConnector {
    addr: Arc<HostAddr>,
}

impl HostConnector {
    async fn connect_once(addr: &HostAddr) -> io::Result<HostStream> {
        Ok(match addr {
            HostAddr::Unix(path) => HostStream(Box::new(UnixStream::connect(path).await?)),
            HostAddr::Vsock { cid, port } => HostStream(Box::new(
                VsockStream::connect(VsockAddr::new(*cid, *port)).await?,
            )),
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
        let addr = self.addr.clone();
        Box::pin(async move {
            let mut backoff = Backoff::new();
            let mut failures = 0u32;
            let mut next_say = 0u32;
            loop {
                match Self::connect_once(&addr).await {
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
