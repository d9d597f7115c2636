//! Lambda's Extensions API inside the guest (`/2020-01-01/extension/…`), served beside
//! the Runtime API on the same port.
//!
//! External extensions, the executables in `/opt/extensions` (from layers), are started
//! before the runtime, as it is started (see [`runtime::confined`]); the runtime starts
//! once every one of them registered (or exited, or [`REGISTER_PATIENCE`] passed).
//! Internal extensions register from the runtime's process during its init. Lambda's
//! rules follow:
//! - init ends when every extension and the runtime asked for their next event;
//! - an `INVOKE` goes to every extension registered for it as the runtime gets the
//!   event, and the environment takes no next event until each of them asked for its
//!   next one again (the caller has had its answer already). An extension still busy at
//!   the invocation's deadline resets the environment, as Lambda's timeout does;
//! - on shutdown the extensions registered for it get `SHUTDOWN` and 2 s (500 ms when
//!   all are internal) before they are killed.
//!
//! Every call but `register` names its extension with `Lambda-Extension-Identifier`;
//! a missing or unknown one is refused with Lambda's 403.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use kindling_wire::{ErrorBody, FunctionEnvironment};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::agent::Agent;
use crate::runtime::{self, RuntimeSpec};
use crate::telemetry::{Api, Category, PATH_LOGS_API, PATH_TELEMETRY};
use crate::upstream::{full, Body};

pub const PREFIX: &str = "/2020-01-01/extension";
const HEADER_NAME: &str = "lambda-extension-name";
const HEADER_ID: &str = "lambda-extension-identifier";
const HEADER_EVENT_ID: &str = "lambda-extension-event-identifier";
const HEADER_ERROR_TYPE: &str = "lambda-extension-function-error-type";
/// Lambda's limit on extensions per function.
const MAX_EXTENSIONS: usize = 10;
/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;
/// How long external extensions get to register (Lambda's init timeout).
const REGISTER_PATIENCE: Duration = Duration::from_secs(10);
/// How long extensions get after `SHUTDOWN`: Lambda's figures.
const SHUTDOWN_EXTERNAL: Duration = Duration::from_millis(2000);
const SHUTDOWN_INTERNAL: Duration = Duration::from_millis(500);

/// Does this path belong to the Extensions, Telemetry or Logs API?
pub fn owns(path: &str) -> bool {
    path.starts_with(PREFIX) || path == PATH_TELEMETRY || path == PATH_LOGS_API
}

struct Extension {
    id: String,
    name: String,
    /// An executable of `/opt/extensions` (rather than the runtime's own).
    external: bool,
    invoke: bool,
    shutdown: bool,
    /// The event it has not fetched yet.
    pending: Option<Value>,
    /// It waits in (or will come back to) `/event/next` with nothing left to do.
    ready: bool,
    /// Its process ended: it holds nothing up any more.
    gone: bool,
}

impl Extension {
    fn busy(&self) -> bool {
        !self.gone && (!self.ready || self.pending.is_some())
    }
}

#[derive(Default)]
struct State {
    registered: Vec<Extension>,
    /// Names of the external extensions started, and whether each is still running
    /// unregistered (until it registers or exits).
    started: Vec<(String, Option<Pid>)>,
    /// Init is over (the runtime's first `/next` got past the extensions): no more
    /// registrations.
    init_done: bool,
    shutting_down: bool,
}

/// The extensions of this environment.
pub struct Extensions {
    state: Mutex<State>,
    /// Bumped on every change of `state`: waiters look again.
    changed: watch::Sender<u64>,
    /// What `register` answers.
    function: Value,
}

fn millis_now() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    u64::try_from(now).unwrap_or(u64::MAX)
}

impl Extensions {
    pub fn new(function: &FunctionEnvironment) -> Self {
        Extensions {
            state: Mutex::default(),
            changed: watch::Sender::new(0),
            function: json!({
                "functionName": function.function_name,
                "functionVersion": function.function_version,
                "handler": function.handler,
                "accountId": function.account_id,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Waits until `done` holds of the state, or `deadline` passes (false then).
    async fn wait_for(
        &self,
        deadline: Option<Instant>,
        mut done: impl FnMut(&State) -> bool,
    ) -> bool {
        let mut changes = self.changed.subscribe();
        loop {
            if done(&self.state()) {
                return true;
            }
            let changed = changes.changed();
            match deadline {
                Some(at) => match tokio::time::timeout_at(at.into(), changed).await {
                    Ok(Ok(())) => {}
                    _ => return done(&self.state()),
                },
                None => {
                    let _ = changed.await;
                }
            }
        }
    }

    /// Starts the executables of `dir` (`/opt/extensions`) and waits until each has
    /// registered or exited (bounded).
    pub async fn start_external(agent: &Arc<Agent>, spec: &RuntimeSpec, dir: &Path) {
        let programs = executables(dir);
        if programs.is_empty() {
            return;
        }
        for program in programs.into_iter().take(MAX_EXTENSIONS) {
            let name = program
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match start(agent, spec, &program, &name) {
                Ok(pid) => agent.extensions.state().started.push((name, Some(pid))),
                Err(e) => say!("extension {name}: {e}"),
            }
        }
        let all_in = |s: &State| s.started.iter().all(|(_, waiting)| waiting.is_none());
        if !agent
            .extensions
            .wait_for(Some(Instant::now() + REGISTER_PATIENCE), all_in)
            .await
        {
            say!("extensions did not all register within {REGISTER_PATIENCE:?}; starting the runtime");
        }
    }

    /// Holds the runtime's `/next` until every extension has asked for its next event
    /// too (Lambda's end of init and of each invocation), or `deadline` passes: then
    /// returns the names of those still busy. The first call ends init.
    pub async fn settled(&self, deadline: Option<Instant>) -> Result<(), Vec<String>> {
        let ok = self
            .wait_for(deadline, |s| !s.registered.iter().any(Extension::busy))
            .await;
        let mut state = self.state();
        state.init_done = true;
        if ok {
            return Ok(());
        }
        Err(state
            .registered
            .iter()
            .filter(|e| e.busy())
            .map(|e| e.name.clone())
            .collect())
    }

    /// Whether any extension is registered.
    pub fn any(&self) -> bool {
        !self.state().registered.is_empty()
    }

    /// The runtime was handed invocation `id`: every extension registered for `INVOKE`
    /// gets it too.
    pub fn invoke(&self, id: &str, deadline_ms: u64, arn: &str, trace_id: Option<&str>) {
        let mut event = json!({
            "eventType": "INVOKE",
            "deadlineMs": deadline_ms,
            "requestId": id,
            "invokedFunctionArn": arn,
        });
        if let Some(trace) = trace_id {
            event["tracing"] = json!({"type": "X-Amzn-Trace-Id", "value": trace});
        }
        self.deliver(|e| e.invoke, &event);
    }

    fn deliver(&self, to: impl Fn(&Extension) -> bool, event: &Value) -> bool {
        let mut any = false;
        {
            let mut state = self.state();
            for e in state.registered.iter_mut().filter(|e| !e.gone && to(e)) {
                e.pending = Some(event.clone());
                e.ready = false;
                any = true;
            }
        }
        if any {
            self.bump();
        }
        any
    }

    /// Sends `SHUTDOWN` (`reason`) to the extensions registered for it, waits until each
    /// asked for its next event or exited (Lambda's 2 s, or 500 ms when all are internal),
    /// then kills the external ones.
    pub async fn shut_down(&self, reason: &str) {
        let (patience, pids) = {
            let mut state = self.state();
            state.shutting_down = true;
            let external = state.registered.iter().any(|e| e.external) || !state.started.is_empty();
            let patience = if external {
                SHUTDOWN_EXTERNAL
            } else {
                SHUTDOWN_INTERNAL
            };
            (
                patience,
                state
                    .started
                    .iter()
                    .filter_map(|(_, p)| *p)
                    .collect::<Vec<_>>(),
            )
        };
        let deadline = Instant::now() + patience;
        let event = json!({
            "eventType": "SHUTDOWN",
            "shutdownReason": reason,
            "deadlineMs": millis_now() + u64::try_from(patience.as_millis()).unwrap_or(0),
        });
        if self.deliver(|e| e.shutdown, &event)
            && !self
                .wait_for(Some(deadline), |s| {
                    !s.registered.iter().any(Extension::busy)
                })
                .await
        {
            say!("extensions still busy {patience:?} after SHUTDOWN: killed");
        }
        for pid in pids {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }

    /// An external extension's process ended.
    fn exited(&self, name: &str, pid: Pid) {
        {
            let mut state = self.state();
            for (n, waiting) in state.started.iter_mut() {
                if n == name && *waiting == Some(pid) {
                    *waiting = None;
                }
            }
            for e in state
                .registered
                .iter_mut()
                .filter(|e| e.external && e.name == name)
            {
                e.gone = true;
            }
        }
        self.bump();
    }

    fn register(&self, name: &str, events: &[String]) -> Result<String, Refusal> {
        let mut state = self.state();
        if state.init_done || state.shutting_down {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "Extension.InvalidStateTransition",
                "State transition is not allowed: extensions register during init",
            ));
        }
        if state.registered.len() >= MAX_EXTENSIONS {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "Extension.TooManyExtensions",
                format!("at most {MAX_EXTENSIONS} extensions"),
            ));
        }
        if state.registered.iter().any(|e| e.name == name) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "Extension.AlreadyRegistered",
                format!("extension {name:?} is registered already"),
            ));
        }
        let mut wanted = (false, false);
        for event in events {
            match event.as_str() {
                "INVOKE" => wanted.0 = true,
                "SHUTDOWN" => wanted.1 = true,
                other => {
                    return Err(refuse(
                        StatusCode::BAD_REQUEST,
                        "InvalidEventType",
                        format!("unknown event {other:?}: INVOKE or SHUTDOWN"),
                    ))
                }
            }
        }
        let mut external = false;
        for (n, waiting) in state.started.iter_mut() {
            if n == name {
                external = true;
                *waiting = None;
            }
        }
        let id = new_id();
        state.registered.push(Extension {
            id: id.clone(),
            name: name.to_owned(),
            external,
            invoke: wanted.0,
            shutdown: wanted.1,
            pending: None,
            ready: false,
            gone: false,
        });
        drop(state);
        self.bump();
        Ok(id)
    }

    /// The extension `id` names, or Lambda's 403.
    fn identify(&self, req: &Request<Incoming>) -> Result<(String, String), Refusal> {
        let Some(id) = req.headers().get(HEADER_ID) else {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "Extension.MissingExtensionIdentifier",
                "Missing Lambda-Extension-Identifier header",
            ));
        };
        let state = self.state();
        state
            .registered
            .iter()
            .find(|e| e.id.as_bytes() == id.as_bytes())
            .map(|e| (e.id.clone(), e.name.clone()))
            .ok_or_else(|| {
                refuse(
                    StatusCode::FORBIDDEN,
                    "Extension.InvalidExtensionIdentifier",
                    "Invalid Lambda-Extension-Identifier",
                )
            })
    }

    /// `/event/next`: this extension is done with its last event; waits for its next.
    async fn next(&self, id: &str) -> Value {
        {
            let mut state = self.state();
            if let Some(e) = state.registered.iter_mut().find(|e| e.id == id) {
                e.ready = true;
            }
        }
        self.bump();
        let mut changes = self.changed.subscribe();
        loop {
            {
                let mut state = self.state();
                let event = state
                    .registered
                    .iter_mut()
                    .find(|e| e.id == id)
                    .and_then(|e| e.pending.take());
                if let Some(event) = event {
                    return event;
                }
            }
            let _ = changes.changed().await;
        }
    }
}

/// The executables of `dir`, by name; none when it does not exist.
fn executables(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| runtime::is_executable(p))
        .collect();
    found.sort();
    found
}

/// Starts one external extension and a task that notes when it ends.
fn start(
    agent: &Arc<Agent>,
    spec: &RuntimeSpec,
    program: &Path,
    name: &str,
) -> Result<Pid, String> {
    let fail = |e: std::io::Error| format!("cannot start {}: {e}", program.display());
    let output = (
        agent.logs.pipe(Category::Extension).map_err(fail)?,
        agent.logs.pipe(Category::Extension).map_err(fail)?,
    );
    let mut cmd = runtime::confined(spec, program, &[], output, None)?;
    let mut child = cmd.spawn().map_err(fail)?;
    drop(cmd);
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw)
        .ok_or_else(|| format!("cannot start {}: no pid", program.display()))?;
    let agent = agent.clone();
    let name = name.to_owned();
    tokio::spawn(async move {
        let status = child.wait().await;
        say!("extension {name} exited ({status:?})");
        // What it left in its process group goes with it.
        let _ = killpg(pid, Signal::SIGKILL);
        agent.extensions.exited(&name, pid);
    });
    Ok(pid)
}

/// A random identifier in UUID form (Lambda's extension identifiers are UUIDs).
fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A call the API turns down, before it becomes Lambda's error JSON.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    error_type: &'static str,
    message: String,
}

fn refuse(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        error_type,
        message: message.into(),
    }
}

fn error(status: StatusCode, error_type: &str, message: &str) -> Response<Body> {
    respond(
        status,
        &serde_json::to_value(ErrorBody::new(error_type, message)).unwrap_or_default(),
    )
}

fn respond(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .expect("valid response")
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Refusal> {
    http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Extension.InvalidRequest",
                format!("the body could not be read (at most {MAX_BODY} bytes): {e}"),
            )
        })
}

/// Serves one call of the Extensions, Telemetry or Logs API.
pub async fn handle(agent: &Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    match serve(agent, req).await {
        Ok(resp) => resp,
        Err(r) => error(r.status, r.error_type, &r.message),
    }
}

async fn serve(agent: &Arc<Agent>, req: Request<Incoming>) -> Result<Response<Body>, Refusal> {
    let extensions = &agent.extensions;
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let not_found = || {
        refuse(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {method} {path}"),
        )
    };
    if path == PATH_TELEMETRY || path == PATH_LOGS_API {
        if method != Method::PUT {
            return Err(not_found());
        }
        let (id, name) = extensions.identify(&req)?;
        let body = read_body(req).await?;
        let api = if path == PATH_TELEMETRY {
            Api::Telemetry
        } else {
            Api::Logs
        };
        return match agent.telemetry.subscribe(api, &id, &name, &body) {
            Ok(()) => Ok(Response::builder()
                .status(StatusCode::OK)
                .header(CONTENT_TYPE, "text/plain")
                .body(full("OK"))
                .expect("valid response")),
            Err(e) => Err(refuse(StatusCode::BAD_REQUEST, "ValidationError", e)),
        };
    }
    let route = path.strip_prefix(PREFIX).unwrap_or_default();
    match (method.clone(), route) {
        (Method::POST, "/register") => {
            let name = req
                .headers()
                .get(HEADER_NAME)
                .and_then(|v| v.to_str().ok())
                .filter(|n| !n.is_empty() && n.len() <= 256)
                .map(str::to_owned)
                .ok_or_else(|| {
                    refuse(
                        StatusCode::BAD_REQUEST,
                        "Extension.InvalidRequest",
                        "Missing Lambda-Extension-Name header",
                    )
                })?;
            let body = read_body(req).await?;
            let events: Vec<String> = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| serde_json::from_value(v["events"].clone()).ok())
                .ok_or_else(|| {
                    refuse(
                        StatusCode::BAD_REQUEST,
                        "Extension.InvalidRequest",
                        "expected {\"events\": [\"INVOKE\", \"SHUTDOWN\"]}",
                    )
                })?;
            let id = extensions.register(&name, &events)?;
            agent.registered(&name, &events);
            let mut resp = respond(StatusCode::OK, &extensions.function);
            resp.headers_mut().insert(
                HEADER_ID,
                HeaderValue::from_str(&id).expect("a UUID is a header value"),
            );
            Ok(resp)
        }
        (Method::GET, "/event/next") => {
            let (id, _) = extensions.identify(&req)?;
            let event = extensions.next(&id).await;
            let mut resp = respond(StatusCode::OK, &event);
            resp.headers_mut().insert(
                HEADER_EVENT_ID,
                HeaderValue::from_str(&new_id()).expect("a UUID is a header value"),
            );
            Ok(resp)
        }
        (Method::POST, "/init/error" | "/exit/error") => {
            let (_, name) = extensions.identify(&req)?;
            let error_type = req
                .headers()
                .get(HEADER_ERROR_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("Extension.Unknown")
                .to_owned();
            let body = read_body(req).await?;
            let message = format!(
                "extension {name} failed ({error_type}): {}",
                String::from_utf8_lossy(&body)
            );
            agent.extension_failed(&error_type, &message).await;
            Ok(respond(StatusCode::ACCEPTED, &json!({"status": "OK"})))
        }
        _ => Err(not_found()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function() -> FunctionEnvironment {
        FunctionEnvironment {
            function_name: "f".into(),
            function_version: "$LATEST".into(),
            memory_mb: 128,
            timeout_ms: 3000,
            runtime: "python".into(),
            handler: "app.handler".into(),
            region: "us-east-1".into(),
            account_id: "123456789012".into(),
            log_group_name: String::new(),
            log_stream_name: String::new(),
            initialization_type: "on-demand".into(),
            variables: Default::default(),
        }
    }

    #[tokio::test]
    async fn an_invocation_settles_only_when_every_extension_asked_again() {
        let ext = Arc::new(Extensions::new(&function()));
        let a = ext
            .register("a", &["INVOKE".into(), "SHUTDOWN".into()])
            .unwrap();
        let b = ext.register("b", &["SHUTDOWN".into()]).unwrap();
        assert!(ext.register("a", &[]).is_err());
        assert!(ext.register("c", &["BOGUS".into()]).is_err());
        // Init: both must ask for their first event.
        let soon = || Some(Instant::now() + Duration::from_millis(50));
        assert_eq!(ext.settled(soon()).await, Err(vec!["a".into(), "b".into()]));
        let (ea, eb) = (ext.clone(), ext.clone());
        let (ida, idb) = (a.clone(), b.clone());
        let first = tokio::spawn(async move { ea.next(&ida).await });
        let _shutdown_of_b = tokio::spawn(async move { eb.next(&idb).await });
        assert_eq!(ext.settled(soon()).await, Ok(()));
        // Registration is over once init is.
        assert!(ext.register("late", &[]).is_err());
        ext.invoke("r1", 5, "arn", Some("Root=1"));
        let event = first.await.unwrap();
        assert_eq!(event["eventType"], "INVOKE");
        assert_eq!(event["requestId"], "r1");
        assert_eq!(event["tracing"]["value"], "Root=1");
        // `b` did not register for INVOKE: only `a` holds the environment up.
        assert_eq!(ext.settled(soon()).await, Err(vec!["a".into()]));
        let ea = ext.clone();
        let _again = tokio::spawn(async move { ea.next(&a).await });
        assert_eq!(ext.settled(soon()).await, Ok(()));
    }
}
