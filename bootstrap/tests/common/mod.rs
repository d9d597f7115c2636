//! A real host for the real `kindling-bootstrap` binary: an HTTP/1.1 server on a Unix
//! socket that serves the function's environment and queued events, and records every
//! call the bootstrap relays or makes, in order.

#![allow(dead_code)] // each test file uses its own part of the harness

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kindling_wire::{FunctionEnvironment, InvocationReport, RuntimeExit};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, Notify};
use tokio_vsock::{VsockAddr, VsockListener};

/// How long a test waits for something the bootstrap should do.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// One call that reached the host.
#[derive(Debug, Clone)]
pub enum Record {
    Next,
    Response {
        id: String,
        headers: BTreeMap<String, String>,
        body: Bytes,
    },
    Error {
        id: String,
        headers: BTreeMap<String, String>,
        body: Bytes,
    },
    InitError {
        headers: BTreeMap<String, String>,
        body: Bytes,
    },
    Logs {
        id: Option<String>,
        text: String,
    },
    Report {
        id: String,
        report: InvocationReport,
    },
    Exit(RuntimeExit),
    Other {
        method: String,
        path: String,
    },
}

/// An event to hand out on `/next`.
#[derive(Clone)]
pub struct Event {
    pub id: String,
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
}

struct Shared {
    env: FunctionEnvironment,
    events: Mutex<std::collections::VecDeque<Event>>,
    new_event: Notify,
    records: mpsc::UnboundedSender<Record>,
    /// How long each log post waits before it is taken (a slow host).
    log_delay: Mutex<Duration>,
}

pub struct Host {
    shared: Arc<Shared>,
    records: mpsc::UnboundedReceiver<Record>,
    /// Everything seen so far, in arrival order.
    pub history: Vec<Record>,
    pub socket: PathBuf,
    counter: AtomicU64,
}

pub fn function_env(runtime: &str, handler: &str) -> FunctionEnvironment {
    FunctionEnvironment {
        function_name: "test-fn".into(),
        function_version: "$LATEST".into(),
        memory_mb: 256,
        timeout_ms: 30_000,
        runtime: runtime.into(),
        handler: handler.into(),
        region: "eu-west-1".into(),
        account_id: "123456789012".into(),
        log_group_name: "/aws/lambda/test-fn".into(),
        log_stream_name: "2026/11/27/[$LATEST]abc".into(),
        initialization_type: "on-demand".into(),
        variables: BTreeMap::from([("GREETING".into(), "hi".into())]),
    }
}

impl Host {
    /// A host whose socket path is chosen but not yet listening (see [`Host::listen`]).
    pub fn new(socket: PathBuf, env: FunctionEnvironment) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Host {
            shared: Arc::new(Shared {
                env,
                events: Mutex::default(),
                new_event: Notify::new(),
                records: tx,
                log_delay: Mutex::new(Duration::ZERO),
            }),
            records: rx,
            history: Vec::new(),
            socket,
            counter: AtomicU64::new(0),
        }
    }

    /// Starts serving; returns the server task (abort it to play a host restart).
    pub fn listen(&self) -> tokio::task::JoinHandle<()> {
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket).expect("bind the host socket");
        serve_on(listener, self.shared.clone())
    }

    /// Serves on vsock port `port` of the local CID (vsock loopback), as the host does
    /// for a microVM; `None` where this kernel has no vsock loopback.
    pub fn listen_vsock(&self, port: u32) -> Option<tokio::task::JoinHandle<()>> {
        let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_LOCAL, port))
            .map_err(|e| println!("SKIPPED (host cannot): no vsock loopback on this kernel ({e})"))
            .ok()?;
        Some(serve_on(listener, self.shared.clone()))
    }

    /// Makes every log post wait `delay` before the host takes it, as a host that keeps
    /// up with the function's output less fast than the function writes it.
    pub fn delay_logs(&self, delay: Duration) {
        *self.shared.log_delay.lock().unwrap() = delay;
    }

    /// Queues an event; returns its request id.
    pub fn invoke(&self, body: &str) -> String {
        self.invoke_with(body, Vec::new())
    }

    pub fn invoke_with(&self, body: &str, extra: Vec<(String, String)>) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("8476a536-e9f4-11e8-9739-{:012x}", n + 1);
        let deadline = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis()
            + 30_000;
        let mut headers = vec![
            ("Lambda-Runtime-Aws-Request-Id".to_string(), id.clone()),
            (
                "Lambda-Runtime-Deadline-Ms".to_string(),
                deadline.to_string(),
            ),
            (
                "Lambda-Runtime-Invoked-Function-Arn".to_string(),
                "arn:aws:lambda:eu-west-1:000000000000:function:test-fn".to_string(),
            ),
            (
                "Lambda-Runtime-Trace-Id".to_string(),
                format!("Root=1-5bef4de7-{n:024x};Sampled=1"),
            ),
        ];
        headers.extend(extra);
        self.shared.events.lock().unwrap().push_back(Event {
            id: id.clone(),
            body: Bytes::copy_from_slice(body.as_bytes()),
            headers,
        });
        self.shared.new_event.notify_waiters();
        id
    }

    /// Waits for the next record that `want` accepts; everything read is kept in `history`.
    pub async fn wait_for<T>(&mut self, what: &str, want: impl Fn(&Record) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let record = tokio::time::timeout_at(deadline, self.records.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("timed out waiting for {what}; history: {:#?}", self.history)
                })
                .expect("host alive");
            self.history.push(record.clone());
            if let Some(t) = want(&record) {
                return t;
            }
        }
    }

    /// The result (`/response` or `/error`) the runtime posted for `id`.
    pub async fn result(&mut self, id: &str) -> Record {
        self.wait_for(&format!("the result of {id}"), |r| match r {
            Record::Response { id: got, .. } | Record::Error { id: got, .. } if got == id => {
                Some(r.clone())
            }
            _ => None,
        })
        .await
    }

    /// The body of the `/init/error` the runtime posted, as JSON.
    pub async fn init_error(&mut self) -> serde_json::Value {
        let body = self
            .wait_for("an init error", |r| match r {
                Record::InitError { body, .. } => Some(body.clone()),
                _ => None,
            })
            .await;
        serde_json::from_slice(&body).expect("an init error is JSON")
    }

    pub async fn exit(&mut self) -> RuntimeExit {
        self.wait_for("a runtime exit", |r| match r {
            Record::Exit(e) => Some(e.clone()),
            _ => None,
        })
        .await
    }

    /// The report of `id`, which must already have arrived.
    pub fn report(&self, id: &str) -> InvocationReport {
        self.history
            .iter()
            .find_map(|r| match r {
                Record::Report { id: got, report } if got == id => Some(report.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no report for {id}: {:#?}", self.history))
    }

    /// All log text forwarded with request id `id` (or with none).
    pub fn logs(&self, id: Option<&str>) -> String {
        self.history
            .iter()
            .filter_map(|r| match r {
                Record::Logs { id: got, text } if got.as_deref() == id => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Index in `history` of the first record `pred` accepts.
    pub fn position(&self, pred: impl Fn(&Record) -> bool) -> Option<usize> {
        self.history.iter().position(pred)
    }
}

/// The vsock CID that loops back to the local host.
const VMADDR_CID_LOCAL: u32 = 1;

/// A listener the host can serve on.
trait Accept: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_one(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&mut self) -> std::io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

impl Accept for VsockListener {
    type Stream = tokio_vsock::VsockStream;
    async fn accept_one(&mut self) -> std::io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

fn serve_on(mut listener: impl Accept, shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Owned here, so that aborting the server also drops every open connection.
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let stream = listener.accept_one().await.expect("accept");
            let shared = shared.clone();
            conns.spawn(async move {
                let service = service_fn(move |req| serve(shared.clone(), req));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn headers_of<B>(req: &Request<B>) -> BTreeMap<String, String> {
    req.headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect()
}

fn answer(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(body.into()))
        .unwrap()
}

async fn serve(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().as_str().to_owned();
    let headers = headers_of(&req);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let record = |r: Record| {
        let _ = shared.records.send(r);
    };
    let accepted = || answer(StatusCode::ACCEPTED, r#"{"status":"OK"}"#);
    let invocation = path
        .strip_prefix("/2018-06-01/runtime/invocation/")
        .and_then(|p| p.rsplit_once('/'))
        .map(|(id, what)| (id.to_owned(), what.to_owned()));
    // Bootstrap's report rides on the result it relays: recorded first, as measured first.
    if let (Some((id, _)), Some(report)) = (
        &invocation,
        headers.get(kindling_wire::HEADER_INVOCATION_REPORT),
    ) {
        record(Record::Report {
            id: id.clone(),
            report: serde_json::from_str(report).expect("an InvocationReport"),
        });
    }
    Ok(match (method.as_str(), path.as_str()) {
        ("GET", kindling_wire::PATH_ENVIRONMENT) => {
            answer(StatusCode::OK, serde_json::to_vec(&shared.env).unwrap())
        }
        ("GET", kindling_wire::PATH_NEXT) => {
            record(Record::Next);
            let event = loop {
                let notified = shared.new_event.notified();
                if let Some(e) = shared.events.lock().unwrap().pop_front() {
                    break e;
                }
                notified.await;
            };
            let mut resp = answer(StatusCode::OK, event.body);
            for (k, v) in event.headers {
                resp.headers_mut().insert(
                    hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            resp
        }
        ("POST", kindling_wire::PATH_INIT_ERROR) => {
            record(Record::InitError { headers, body });
            accepted()
        }
        ("POST", kindling_wire::PATH_LOGS) => {
            let delay = *shared.log_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            let id = headers.get(kindling_wire::HEADER_REQUEST_ID).cloned();
            record(Record::Logs {
                id,
                text: String::from_utf8_lossy(&body).into_owned(),
            });
            accepted()
        }
        ("POST", kindling_wire::PATH_RUNTIME_EXIT) => {
            record(Record::Exit(
                serde_json::from_slice(&body).expect("a RuntimeExit"),
            ));
            accepted()
        }
        ("POST", _) if invocation.as_ref().is_some_and(|(_, w)| w == "response") => {
            record(Record::Response {
                id: invocation.unwrap().0,
                headers,
                body,
            });
            accepted()
        }
        ("POST", _) if invocation.as_ref().is_some_and(|(_, w)| w == "error") => {
            record(Record::Error {
                id: invocation.unwrap().0,
                headers,
                body,
            });
            accepted()
        }
        _ => {
            record(Record::Other { method, path });
            answer(StatusCode::NOT_FOUND, "{}")
        }
    })
}

/// The guest's directories, all temporary.
pub struct Guest {
    pub dir: tempfile::TempDir,
}

impl Guest {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["task", "opt", "runtime"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        Guest { dir }
    }

    pub fn task(&self) -> PathBuf {
        self.dir.path().join("task")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("vsock.sock_9001")
    }

    /// A copy of the shipped runtime `name` (`guest_images/runtimes/<name>`) in the guest's
    /// folder, to be its `/var/runtime`: what the runtime writes there (python's
    /// `__pycache__`) must not land in the checkout.
    pub fn shipped_runtime(&self, name: &str) -> PathBuf {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../guest_images/runtimes")
            .join(name);
        let copy = self.dir.path().join("shipped-runtime");
        std::fs::create_dir_all(&copy).unwrap();
        for entry in std::fs::read_dir(&shipped).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                // fs::copy keeps the mode: the bootstrap stays executable.
                std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
            }
        }
        copy
    }

    /// Writes `file` under `task/` (mode 755 when `executable`).
    pub fn write_task(&self, file: &str, text: &str, executable: bool) {
        let path = self.task().join(file);
        std::fs::write(&path, text).unwrap();
        if executable {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    /// Starts the real bootstrap binary; `runtime_dir` is what becomes `/var/runtime`.
    pub fn start(&self, runtime_dir: Option<&Path>) -> Bootstrap {
        self.start_with_host(runtime_dir, &format!("unix://{}", self.socket().display()))
    }

    /// Like [`Guest::start`], with the host at `host` (a `KINDLING_HOST` value).
    pub fn start_with_host(&self, runtime_dir: Option<&Path>, host: &str) -> Bootstrap {
        let runtime_dir =
            runtime_dir.map_or_else(|| self.dir.path().join("runtime"), Path::to_path_buf);
        Command::new(env!("CARGO_BIN_EXE_kindling-bootstrap"))
            .env("KINDLING_HOST", host)
            .env("KINDLING_LISTEN", "127.0.0.1:0")
            .env("KINDLING_TASK_ROOT", self.task())
            .env("KINDLING_OPT_ROOT", self.dir.path().join("opt"))
            .env("KINDLING_RUNTIME_DIR", runtime_dir)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map(Bootstrap)
            .expect("start kindling-bootstrap")
    }
}

/// The running bootstrap. Dropping it stops it the way init does at shutdown (SIGTERM),
/// so that it takes its runtime and the runtime's cgroup with it.
pub struct Bootstrap(pub Child);

impl Drop for Bootstrap {
    fn drop(&mut self) {
        let Some(pid) = self.0.id().and_then(|pid| i32::try_from(pid).ok()) else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        for _ in 0..100 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("kindling-bootstrap {pid} ignored SIGTERM; killing it");
    }
}

/// A shipped runtime's folder in this checkout (`guest_images/runtimes/NAME`).
/// Starts the real bootstrap with the shipped runtime `runtime` (whose interpreter,
/// `interpreter`, must be on the host) over the task files `task`, against a host serving
/// `handler`; `None` (the test is skipped) without the interpreter.
pub fn start_shipped(
    runtime: &str,
    interpreter: &str,
    task: &[(&str, &str)],
    handler: &str,
) -> Option<(Guest, Host, Bootstrap)> {
    if !have(interpreter) {
        return None;
    }
    let guest = Guest::new();
    for (name, text) in task {
        guest.write_task(name, text, false);
    }
    let host = Host::new(guest.socket(), function_env(runtime, handler));
    // Detached: the server lives until the test ends.
    drop(host.listen());
    let bootstrap = guest.start(Some(&guest.shipped_runtime(runtime)));
    Some((guest, host, bootstrap))
}

/// A result's body as JSON.
pub fn json_of(record: &Record) -> serde_json::Value {
    match record {
        Record::Response { body, .. } | Record::Error { body, .. } => {
            serde_json::from_slice(body).unwrap()
        }
        other => panic!("not a result: {other:?}"),
    }
}

/// Whether `program` is on the PATH the runtime gets; prints the skip line if not.
pub fn have(program: &str) -> bool {
    let found = ["/usr/local/bin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(program).is_file());
    if !found {
        println!("SKIPPED: {program} is not installed in /usr/local/bin, /usr/bin or /bin");
    }
    found
}
