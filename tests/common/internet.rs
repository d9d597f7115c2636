//! "The internet" for the network tests: a network namespace of the test's own, reached
//! from the host through a veth, holding a web server on a TEST-NET address with a page, a
//! DNS server that answers [`NAME`] with that address, an API on the same address
//! ([`API_PORT`]) that answers only requests signed (AWS SigV4) with the test's credentials
//! ([`ACCESS_KEY_ID`], [`SECRET_ACCESS_KEY`], [`SESSION_TOKEN`]), and a web server on the cloud
//! metadata address (routed into the namespace, so that a test proves that environments
//! are *refused* 169.254.169.254, not that it has no route). The namespace has no default
//! route: no packet of a test leaves this machine.
//!
//! The servers are the test's own threads, each of which entered the namespace to bind
//! its socket (a network namespace is per thread): nothing but `ip` is needed, so the
//! same internet runs inside the nested-KVM host, which has no Python.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The host's end of the link into the namespace (a host address).
pub const HOST_END: &str = "198.51.100.1";
/// The web server, and the address [`NAME`] resolves to.
pub const WEB: &str = "198.51.100.2";
/// The DNS server, to give `kindling serve --dns`.
pub const DNS: &str = "198.51.100.53";
/// The cloud metadata address, served inside the namespace too.
pub const METADATA: &str = "169.254.169.254";
/// The name of [`WEB`] (`.test` is reserved for testing, RFC 6761).
pub const NAME: &str = "www.kindling.test";
/// The web server's page.
pub const PAGE: &str = "hello from the test's internet\n";
/// The signed API's port on [`WEB`].
pub const API_PORT: u16 = 8000;
/// The test's AWS credentials: what the tests give `kindling serve` for its functions, and
/// the only ones the signed API accepts.
pub const ACCESS_KEY_ID: &str = "AKIDKINDLINGINTERNET1";
pub const SECRET_ACCESS_KEY: &str = "internetTESTsecret/1a2b3c4d5e6f7a8b9c0dQZ";
pub const SESSION_TOKEN: &str = "internetTESTtoken+FwoGZXIvYXdzEBcaDK9";
/// The signed API's answer to a request whose signature it verified.
pub const API_ANSWER: &str = "signature verified for AKIDKINDLINGINTERNET1\n";

/// Held by the [`Internet`] of this process: its namespace and addresses are one per
/// process, so tests running at once take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub struct Internet {
    ns: String,
    host_if: String,
    /// Tells the servers to stop.
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    /// Released after [`Drop`] has removed the namespace.
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Internet {
    /// Makes the namespace and its servers, and waits until each answers from the host.
    pub fn start() -> Result<Internet, String> {
        // A test that failed while holding it left nothing behind: its Drop ran.
        let turn = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = std::process::id();
        let mut internet = Internet {
            ns: format!("kinet-{id}"),
            host_if: format!("kinh{id}"),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            _turn: turn,
        };
        let ns_if = format!("kinn{id}");
        let ns = internet.ns.clone();
        let host_if = internet.host_if.clone();
        let host_cidr = format!("{HOST_END}/24");
        let web_cidr = format!("{WEB}/24");
        let dns_cidr = format!("{DNS}/24");
        let metadata_cidr = format!("{METADATA}/32");
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &ns],
            vec![
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ],
            vec!["link", "set", &ns_if, "netns", &ns],
            vec!["addr", "add", &host_cidr, "dev", &host_if],
            vec!["link", "set", &host_if, "up"],
            vec!["route", "add", &metadata_cidr, "dev", &host_if],
            vec!["-n", &ns, "addr", "add", &web_cidr, "dev", &ns_if],
            vec!["-n", &ns, "addr", "add", &dns_cidr, "dev", &ns_if],
            vec!["-n", &ns, "addr", "add", &metadata_cidr, "dev", &ns_if],
            vec!["-n", &ns, "link", "set", &ns_if, "up"],
            vec!["-n", &ns, "link", "set", "lo", "up"],
        ];
        for step in steps {
            ip(&step)?;
        }
        for bind in [WEB, METADATA] {
            internet.spawn(
                move || {
                    let listener = TcpListener::bind((bind, 80))?;
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                },
                serve_page,
            )?;
        }
        internet.spawn(
            || {
                let listener = TcpListener::bind((WEB, API_PORT))?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            },
            serve_signed_api,
        )?;
        internet.spawn(
            || {
                let socket = UdpSocket::bind((DNS, 53))?;
                socket.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(socket)
            },
            answer_dns,
        )?;
        let api = format!("{WEB}:{API_PORT}");
        for target in [format!("{WEB}:80"), format!("{METADATA}:80"), api] {
            wait_for(&target, |a| {
                TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok()
            })?;
        }
        wait_for(&format!("{DNS}:53"), answers_dns)?;
        Ok(internet)
    }

    /// A server thread: it enters the namespace, binds with `bind`, and calls `serve`
    /// (which returns within a moment when idle) until the internet is dropped.
    fn spawn<S: 'static>(
        &mut self,
        bind: impl FnOnce() -> std::io::Result<S> + Send + 'static,
        serve: fn(&S),
    ) -> Result<(), String> {
        let netns = std::fs::File::open(format!("/run/netns/{}", self.ns))
            .map_err(|e| format!("the namespace {}: {e}", self.ns))?;
        let stop = self.stop.clone();
        let (bound_tx, bound) = mpsc::channel();
        let server = std::thread::spawn(move || {
            let socket = nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
                .and_then(|()| bind());
            match socket {
                Ok(socket) => {
                    let _ = bound_tx.send(Ok(()));
                    while !stop.load(Ordering::SeqCst) {
                        serve(&socket);
                    }
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(format!("a server of the test's internet: {e}")));
                }
            }
        });
        self.servers.push(server);
        bound
            .recv()
            .map_err(|_| "a server of the test's internet died".to_string())?
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
        // The veth and the route go with the namespace's end.
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// The next connection of `listener` and its request's head (up to the blank line), or
/// `None` after a moment without one.
fn next_request(listener: &TcpListener) -> Option<(TcpStream, String)> {
    let Ok((mut stream, _)) = listener.accept() else {
        std::thread::sleep(Duration::from_millis(20));
        return None;
    };
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16384 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    Some((stream, String::from_utf8_lossy(&request).into_owned()))
}

/// Answers `status` with `body`, then the connection closes.
fn respond(mut stream: TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
}

/// The web servers: [`PAGE`] for any request.
fn serve_page(listener: &TcpListener) {
    if let Some((stream, _)) = next_request(listener) {
        respond(stream, "200 OK", PAGE);
    }
}

/// The signed API: [`API_ANSWER`] for a request signed with the test's credentials, 403
/// and why for any other.
fn serve_signed_api(listener: &TcpListener) {
    if let Some((stream, head)) = next_request(listener) {
        match sigv4::verify(&head) {
            Ok(()) => respond(stream, "200 OK", API_ANSWER),
            Err(why) => respond(stream, "403 Forbidden", &format!("refused: {why}\n")),
        }
    }
}

/// A GET of `path_and_query` sent from the host to the signed API, signed as a function
/// would sign it but with `secret`: the API's status line and body.
pub fn call_api_signed_with(secret: &str, path_and_query: &str) -> Result<String, String> {
    let host = format!("{NAME}:{API_PORT}");
    let amz_date = "20260102T030405Z";
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let headers = [
        ("host", host.as_str()),
        ("x-amz-date", amz_date),
        ("x-amz-security-token", SESSION_TOKEN),
    ];
    let authorization =
        sigv4::authorization(ACCESS_KEY_ID, secret, path, query, &headers, "us-east-1");
    let mut stream = TcpStream::connect((WEB, API_PORT)).map_err(|e| format!("the API: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let head: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    write!(
        stream,
        "GET {path_and_query} HTTP/1.0\r\n{head}Authorization: {authorization}\r\n\r\n"
    )
    .map_err(|e| format!("the API: {e}"))?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer.lines().next().unwrap_or_default();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok(format!("{status}\n{body}"))
}

/// AWS Signature Version 4 (the `Authorization` header form, unsigned-payload GETs), as
/// the AWS SDKs compute it: what the signed API checks.
mod sigv4 {
    use hmac::{KeyInit, Mac};
    use sha2::{Digest, Sha256};

    use super::{ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN};

    const ALGORITHM: &str = "AWS4-HMAC-SHA256";

    fn hmac(key: &[u8], text: &str) -> hmac::Hmac<Sha256> {
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
        mac.update(text.as_bytes());
        mac
    }

    /// The request's signing MAC, from the secret, the credential scope
    /// (`DATE/REGION/SERVICE/aws4_request`) and the string to sign.
    fn signing_mac(secret: &str, scope: &str, to_sign: &str) -> hmac::Hmac<Sha256> {
        let mut key = format!("AWS4{secret}").into_bytes();
        for part in scope.split('/') {
            key = hmac(&key, part).finalize().into_bytes().to_vec();
        }
        hmac(&key, to_sign)
    }

    /// The string to sign of a GET of `path?query` with the `signed` headers (lowercase
    /// names, sorted), at `amz_date` in `scope`.
    fn string_to_sign(
        path: &str,
        query: &str,
        signed: &[(&str, &str)],
        amz_date: &str,
        scope: &str,
    ) -> String {
        let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        params.sort_unstable();
        let canonical_headers: String = signed
            .iter()
            .map(|(name, value)| format!("{name}:{}\n", value.trim()))
            .collect();
        let names: Vec<&str> = signed.iter().map(|(name, _)| *name).collect();
        let canonical = [
            "GET",
            path,
            &params.join("&"),
            &canonical_headers,
            &names.join(";"),
            &hex::encode(Sha256::digest(b"")),
        ]
        .join("\n");
        let hashed = hex::encode(Sha256::digest(canonical.as_bytes()));
        format!("{ALGORITHM}\n{amz_date}\n{scope}\n{hashed}")
    }

    /// The `Authorization` header for a GET of `path?query` with `headers` (lowercase
    /// names, sorted, `x-amz-date` among them), for the `execute-api` service.
    pub fn authorization(
        key: &str,
        secret: &str,
        path: &str,
        query: &str,
        headers: &[(&str, &str)],
        region: &str,
    ) -> String {
        let amz_date = headers
            .iter()
            .find(|(name, _)| *name == "x-amz-date")
            .map_or("", |(_, value)| *value);
        let scope = format!("{}/{region}/execute-api/aws4_request", &amz_date[..8]);
        let to_sign = string_to_sign(path, query, headers, amz_date, &scope);
        let signature = hex::encode(
            signing_mac(secret, &scope, &to_sign)
                .finalize()
                .into_bytes(),
        );
        let names: Vec<&str> = headers.iter().map(|(name, _)| *name).collect();
        format!(
            "{ALGORITHM} Credential={key}/{scope}, SignedHeaders={}, Signature={signature}",
            names.join(";")
        )
    }

    /// Checks a GET's head: signed by [`ACCESS_KEY_ID`] with [`SECRET_ACCESS_KEY`], its
    /// session token [`SESSION_TOKEN`] and its host among the signed headers.
    pub fn verify(head: &str) -> Result<(), String> {
        let mut lines = head.split("\r\n");
        let target = match lines
            .next()
            .unwrap_or_default()
            .split(' ')
            .collect::<Vec<_>>()[..]
        {
            ["GET", target, _version] => target,
            _ => return Err("not a GET".into()),
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let headers: Vec<(String, &str)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, value)| *value)
        };
        let authorization = header("authorization")
            .and_then(|a| a.strip_prefix(ALGORITHM))
            .ok_or("not signed with AWS4-HMAC-SHA256")?;
        let part = |key: &str| {
            authorization
                .split(',')
                .find_map(|p| p.trim().strip_prefix(key)?.strip_prefix('='))
                .ok_or(format!("the Authorization header lacks {key}"))
        };
        let (key, scope) = part("Credential")?
            .split_once('/')
            .ok_or("a Credential without a scope")?;
        if key != ACCESS_KEY_ID {
            return Err(format!("unknown access key {key}"));
        }
        let names: Vec<&str> = part("SignedHeaders")?.split(';').collect();
        for needed in ["host", "x-amz-date", "x-amz-security-token"] {
            if !names.contains(&needed) {
                return Err(format!("{needed} is not signed"));
            }
        }
        if header("x-amz-security-token") != Some(SESSION_TOKEN) {
            return Err("not the session's token".into());
        }
        let signed: Vec<(&str, &str)> = names
            .iter()
            .map(|name| Ok((*name, header(name).ok_or(format!("no {name} header"))?)))
            .collect::<Result<_, String>>()?;
        let amz_date = header("x-amz-date").unwrap_or_default();
        let to_sign = string_to_sign(path, query, &signed, amz_date, scope);
        let signature =
            hex::decode(part("Signature")?).map_err(|e| format!("the signature: {e}"))?;
        signing_mac(SECRET_ACCESS_KEY, scope, &to_sign)
            .verify_slice(&signature)
            .map_err(|_| "the signature does not match".to_string())
    }
}

/// The DNS server: A queries for [`NAME`] get [`WEB`], AAAA an empty answer, other names
/// NXDOMAIN.
fn answer_dns(socket: &UdpSocket) {
    let mut query = [0u8; 512];
    let Ok((n, peer)) = socket.recv_from(&mut query) else {
        return;
    };
    if let Some(answer) = dns_answer(&query[..n]) {
        let _ = socket.send_to(&answer, peer);
    }
}

fn dns_answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 17 {
        return None;
    }
    let (mut i, mut labels) = (12, Vec::new());
    while i < q.len() && q[i] != 0 {
        let len = usize::from(q[i]);
        labels.push(String::from_utf8_lossy(q.get(i + 1..i + 1 + len)?).into_owned());
        i += len + 1;
    }
    if i + 5 > q.len() {
        return None;
    }
    let name = labels.join(".").to_lowercase();
    let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
    let (mut answer, mut count, mut flags) = (Vec::new(), 0u8, [0x81, 0x80]);
    if name == NAME && qtype == 1 {
        let web: std::net::Ipv4Addr = WEB.parse().ok()?;
        answer.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        answer.extend(web.octets());
        count = 1;
    } else if name != NAME {
        flags = [0x81, 0x83];
    }
    let mut reply = q[..2].to_vec();
    reply.extend(flags);
    reply.extend([0, 1, 0, count, 0, 0, 0, 0]);
    reply.extend(&q[12..i + 5]);
    reply.extend(answer);
    Some(reply)
}

/// Whether a TCP connection from the host to `target` opens (and what it reads first).
pub fn host_reaches(target: &str) -> Option<String> {
    let addr: SocketAddr = target.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    Some(text)
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn wait_for(what: &str, ready: impl Fn(&SocketAddr) -> bool) -> Result<(), String> {
    let addr: SocketAddr = what.parse().map_err(|e| format!("{what}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ready(&addr) {
        if Instant::now() > deadline {
            return Err(format!("the test's internet: nothing answers on {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether the DNS server answers [`NAME`] with [`WEB`].
fn answers_dns(server: &SocketAddr) -> bool {
    let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(300)));
    let mut query = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in NAME.split('.') {
        query.push(u8::try_from(label.len()).unwrap_or(0));
        query.extend(label.as_bytes());
    }
    query.extend([0, 0, 1, 0, 1]);
    let mut answer = [0u8; 512];
    socket.send_to(&query, server).is_ok()
        && socket.recv(&mut answer).is_ok_and(|n| {
            let web: std::net::Ipv4Addr = WEB.parse().expect("an address");
            n >= 4 && answer[n - 4..n] == web.octets()
        })
}

/// `EHOSTUNREACH`: what the host's filter answers (ICMP administratively prohibited).
const REFUSED: &str = "errno 113";

/// What the network tests ask `tests/vm-functions/netprobe` to try: fetch [`NAME`]'s page,
/// and reach the web server (the control), the host's Invoke API and `host_port` on the
/// host (through the gateway, and through [`HOST_END`]), `peer` (another environment's
/// address, serving on 8080), and the metadata address.
pub fn probe_event(invoke_port: u16, host_port: u16, peer: &str) -> serde_json::Value {
    serde_json::json!({
        "fetch": format!("http://{NAME}/"),
        "reach": targets(invoke_port, host_port, peer),
    })
}

fn targets(invoke_port: u16, host_port: u16, peer: &str) -> Vec<String> {
    vec![
        format!("{WEB}:80"),
        format!("gateway:{invoke_port}"),
        format!("gateway:{host_port}"),
        format!("{HOST_END}:{host_port}"),
        format!("{peer}:8080"),
        format!("{METADATA}:80"),
    ]
}

/// Checks the probe's answer to [`probe_event`]: the page came by name, the resolver is
/// the test's, the web server was reached and everything else refused by the host.
pub fn check_outbound_only(
    answer: &serde_json::Value,
    invoke_port: u16,
    host_port: u16,
    peer: &str,
) -> Result<(), String> {
    if answer["page"] != PAGE {
        return Err(format!("the page of {NAME} did not come: {answer}"));
    }
    if !answer["resolv_conf"]
        .as_str()
        .is_some_and(|r| r.contains(&format!("nameserver {DNS}")))
    {
        return Err(format!("resolv.conf does not name {DNS}: {answer}"));
    }
    for (i, target) in targets(invoke_port, host_port, peer).iter().enumerate() {
        let expected = if i == 0 { "connected" } else { REFUSED };
        if answer["reach"][target] != expected {
            return Err(format!("{target}: expected {expected}: {answer}"));
        }
    }
    Ok(())
}

/// A TCP listener on every host address, counting the connections it accepts: a port of
/// the host's that environments must not reach.
pub struct HostListener {
    pub port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HostListener {
    pub fn start() -> HostListener {
        let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("binding a host port");
        let port = listener.local_addr().expect("its address").port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for _ in listener.incoming().flatten() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        HostListener { port, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// What a function signing with the test's credentials (`tests/functions/signer`'s
/// `call`) is asked to do: GET the signed API by name.
pub fn signed_call_event() -> serde_json::Value {
    serde_json::json!({"url": format!("http://{NAME}:{API_PORT}/v1/check?a=1&b=2")})
}

/// The variables that give `kindling serve` the test's credentials for its functions.
pub const CREDENTIALS_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID),
    ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
    ("AWS_SESSION_TOKEN", SESSION_TOKEN),
];

/// Checks the answer to [`signed_call_event`]: the API verified the function's signature;
/// and that the check means something: the API refuses the same request signed from the
/// host with another secret, and accepts it with the test's.
pub fn check_signed_call(answer: &serde_json::Value) -> Result<(), String> {
    if answer["status"] != 200 || answer["body"] != API_ANSWER {
        return Err(format!(
            "the signed API did not verify the function's call: {answer}"
        ));
    }
    let path = "/v1/check?a=1&b=2";
    let forged = call_api_signed_with("not-the-secret", path)?;
    if !(forged.starts_with("HTTP/1.0 403") && forged.contains("the signature does not match")) {
        return Err(format!("the signed API took a forged signature: {forged}"));
    }
    let genuine = call_api_signed_with(SECRET_ACCESS_KEY, path)?;
    if !(genuine.starts_with("HTTP/1.0 200") && genuine.ends_with(API_ANSWER)) {
        return Err(format!(
            "the signed API refused the host's genuine signature: {genuine}"
        ));
    }
    Ok(())
}
