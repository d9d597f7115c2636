//! A small Invoke API client, for `kindling invoke`, tests and benchmarks.
//!
//! [`Client`] keeps one HTTP/1.1 connection (TCP_NODELAY) open so that benchmarks
//! measure the server, not connection set-up; [`invoke`] is the one-shot form.

use std::net::SocketAddr;

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::invoke_api::{
    HEADER_CLIENT_CONTEXT, HEADER_FUNCTION_ERROR, HEADER_INVOCATION_TYPE, HEADER_LOG_RESULT,
    HEADER_LOG_TYPE,
};
use crate::vocabulary::closed_vocabulary;

closed_vocabulary! {
    /// `X-Amz-Invocation-Type`.
    #[derive(Default)]
    pub enum InvocationType {
        /// Wait for the result (the default).
        #[default]
        RequestResponse = "RequestResponse",
        /// Queue the event and answer 202.
        Event = "Event",
        /// Check the request and answer 204, running nothing.
        DryRun = "DryRun",
    }
}

/// How to invoke.
#[derive(Debug, Clone, Default)]
pub struct InvokeOptions {
    pub invocation_type: InvocationType,
    /// Ask for the log tail (`X-Amz-Log-Type: Tail`).
    pub log_tail: bool,
    /// Client context JSON; sent base64-encoded as Lambda wants.
    pub client_context: Option<String>,
}

/// What the server answered.
#[derive(Debug, Clone)]
pub struct InvokeResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// `X-Amz-Function-Error` (`Unhandled`) when the function failed.
    pub function_error: Option<String>,
    /// The decoded `X-Amz-Log-Result`.
    pub log_tail: Option<String>,
}

/// One kept-alive connection to an Invoke API.
pub struct Client {
    addr: SocketAddr,
    sender: SendRequest<Full<Bytes>>,
    connection: JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let (sender, connection) = Self::open(addr).await?;
        Ok(Self {
            addr,
            sender,
            connection,
        })
    }

    /// A fresh connection: its request sender and the task driving it.
    async fn open(addr: SocketAddr) -> anyhow::Result<(SendRequest<Full<Bytes>>, JoinHandle<()>)> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to the Invoke API at {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let connection = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "invoke client connection ended");
            }
        });
        Ok((sender, connection))
    }

    /// `POST /2015-03-31/functions/{function}/invocations`.
    pub async fn invoke(
        &mut self,
        function: &str,
        payload: impl Into<Bytes>,
        options: &InvokeOptions,
    ) -> anyhow::Result<InvokeResponse> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(format!("/2015-03-31/functions/{function}/invocations"))
            .header(http::header::HOST, self.addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(HEADER_INVOCATION_TYPE, options.invocation_type.name());
        if options.log_tail {
            req = req.header(HEADER_LOG_TYPE, "Tail");
        }
        if let Some(cc) = &options.client_context {
            req = req.header(
                HEADER_CLIENT_CONTEXT,
                base64::engine::general_purpose::STANDARD.encode(cc),
            );
        }
        let req = req.body(Full::new(payload.into()))?;
        let mut response = self.send(req).await?;
        let header = |name: &str| {
            response
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        response.function_error = header(HEADER_FUNCTION_ERROR);
        response.log_tail = match header(HEADER_LOG_RESULT) {
            None => None,
            Some(b64) => Some(
                String::from_utf8_lossy(
                    &base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .context("X-Amz-Log-Result is not base64")?,
                )
                .into_owned(),
            ),
        };
        Ok(response)
    }

    /// A plain `GET` (e.g. `/metrics`).
    pub async fn get(&mut self, path: &str) -> anyhow::Result<InvokeResponse> {
        let req = Request::builder()
            .uri(path)
            .header(http::header::HOST, self.addr.to_string())
            .body(Full::new(Bytes::new()))?;
        self.send(req).await
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> anyhow::Result<InvokeResponse> {
        // The server closes a kept-alive connection left idle past its keep-alive timeout
        // (while, say, other clients' environments boot): nothing was sent on it yet, so a
        // fresh connection takes the request, as any HTTP client's pool would.
        if self.sender.ready().await.is_err() {
            tracing::debug!("the Invoke API closed the idle connection: reconnecting");
            let (sender, connection) = Self::open(self.addr).await?;
            self.connection.abort();
            (self.sender, self.connection) = (sender, connection);
            self.sender
                .ready()
                .await
                .context("the Invoke API closed a fresh connection")?;
        }
        let response = self.sender.send_request(req).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(InvokeResponse {
            status: parts.status,
            headers: parts.headers,
            body,
            function_error: None,
            log_tail: None,
        })
    }
}

/// Invokes once on a fresh connection.
pub async fn invoke(
    addr: SocketAddr,
    function: &str,
    payload: impl Into<Bytes>,
    options: &InvokeOptions,
) -> anyhow::Result<InvokeResponse> {
    Client::connect(addr)
        .await?
        .invoke(function, payload, options)
        .await
}
