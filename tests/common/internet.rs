//! "The internet" for the network tests: a network namespace of the test's own, reached
//! from the host through a veth, holding a web server on a TEST-NET address with a page, a
//! DNS server that answers [`NAME`] with that address, and a web server on the cloud
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

pub struct Internet {
    ns: String,
    host_if: String,
    /// Tells the servers to stop.
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
}

impl Internet {
    /// Makes the namespace and its servers, and waits until each answers from the host.
    pub fn start() -> Result<Internet, String> {
        let id = std::process::id();
        let mut internet = Internet {
            ns: format!("kinet-{id}"),
            host_if: format!("kinh{id}"),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
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
                let socket = UdpSocket::bind((DNS, 53))?;
                socket.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(socket)
            },
            answer_dns,
        )?;
        for addr in [WEB, METADATA] {
            wait_for(&format!("{addr}:80"), |a| {
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

/// The web servers: [`PAGE`] for any request, then the connection closes.
fn serve_page(listener: &TcpListener) {
    let Ok((mut stream, _)) = listener.accept() else {
        std::thread::sleep(Duration::from_millis(20));
        return;
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
    let _ = write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{PAGE}",
        PAGE.len()
    );
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
