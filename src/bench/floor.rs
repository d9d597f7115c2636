//! The floor: what two plain HTTP round trips over loopback cost on this machine, in this
//! process, right now. A warm invoke is at least two such trips (caller → Invoke API, and
//! the guest's `/next` answered → `/response`), so the ratio to this floor says how much
//! the platform itself adds, independent of how fast the machine is.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use indicatif::ProgressBar;
use nix::time::ClockId;
use tokio::net::{TcpListener, TcpStream};

use super::cpu::cpu_clock;

/// A tiny event, the same size the bench invokes with.
const BODY: &[u8] = b"{}";

/// One run's floor.
pub struct Floor {
    /// Each round-trip pair's time.
    pub pairs: Vec<Duration>,
    /// The CPU one pair costs, client and server together: what the same two exchanges
    /// cost this machine's kernel and hyper, the yardstick of a warm invoke's CPU.
    pub cpu_per_pair: Duration,
}

/// Times `pairs` pairs of round trips on one kept-alive connection (TCP_NODELAY on
/// both ends) to a hyper server that answers every request with a small body.
pub async fn measure(pairs: usize, progress: &ProgressBar) -> anyhow::Result<Floor> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let answer = service_fn(|_req: Request<hyper::body::Incoming>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"null"))))
        });
        http1::Builder::new()
            .serve_connection(TokioIo::new(stream), answer)
            .await
            .context("the loopback server failed")
    });

    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let client = tokio::spawn(connection);
    let host = addr.to_string();
    let mut samples = Vec::with_capacity(pairs);
    // The whole process's CPU: the floor's client and server run on the bench's runtime,
    // and nothing else does meanwhile.
    let cpu_before = cpu_clock(ClockId::CLOCK_PROCESS_CPUTIME_ID)?;
    for _ in 0..pairs {
        let started = Instant::now();
        round_trip(&mut sender, &host).await?;
        round_trip(&mut sender, &host).await?;
        samples.push(started.elapsed());
        progress.inc(1);
    }
    let cpu = cpu_clock(ClockId::CLOCK_PROCESS_CPUTIME_ID)?.saturating_sub(cpu_before);
    // Without a sender the client's connection closes, which ends the server's.
    drop(sender);
    client.await??;
    server.await??;
    Ok(Floor {
        cpu_per_pair: cpu / u32::try_from(pairs.max(1)).unwrap_or(u32::MAX),
        pairs: samples,
    })
}

async fn round_trip(sender: &mut SendRequest<Full<Bytes>>, host: &str) -> anyhow::Result<()> {
    let req = Request::post("/")
        .header(hyper::header::HOST, host)
        .body(Full::new(Bytes::from_static(BODY)))?;
    sender.ready().await?;
    let response = sender.send_request(req).await?;
    response.into_body().collect().await?;
    Ok(())
}
