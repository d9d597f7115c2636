//! Firecracker's hybrid vsock backend: guest streams map to host Unix sockets.
//!
//! * Guest → host: a REQUEST to CID 2 port P connects to the Unix socket `<uds_path>_P`;
//!   RESPONSE on success, RST when nothing listens there.
//! * Host → guest: a client connects to `<uds_path>` and writes `CONNECT <port>\n`; the muxer
//!   sends a REQUEST to the guest from a fresh host port and, once the guest answers with
//!   RESPONSE, writes `OK <host_port>\n` to the client. A guest RST closes the client.
//!
//! Flow control follows the virtio spec's credit scheme both ways: the guest's `buf_alloc` and
//! `fwd_cnt` bound what is read from host sockets; ours (`BUF_ALLOC`, bytes written to host
//! sockets) bound what the guest may send. All sockets are non-blocking and sit in one epoll
//! set whose fd the event loop watches (the muxer pattern of Firecracker's vsock).

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::*;
use crate::virtio::GuestWarnings;

/// Receive buffer we advertise per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload of one packet to the guest.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Longest accepted `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Host ports for host-initiated connections count up from here (below: guest-chosen ones).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const LISTENER_TOKEN: u64 = 0;
/// Connections open at once, guest- and host-initiated together (Firecracker's limit): a
/// guest asking for more gets RST, so it cannot exhaust the VMM's file descriptors.
pub const MAX_CONNECTIONS: usize = 1023;
/// Packets without payload waiting for an RX buffer. A guest that sends packets but gives
/// no RX buffers makes an answer (RST, credit update) pile up for each: past this bound
/// new ones are dropped, which costs only that guest's own connections.
pub const MAX_PENDING_CONTROL: usize = 4 * MAX_CONNECTIONS;

/// (host port, guest port)
type Key = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    AwaitingGuest,
    Established,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// Bytes written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` the guest last heard of.
    fwd_cnt_told: Wrapping<u32>,
    /// Guest data the host socket did not take yet.
    to_host: Vec<u8>,
    /// The host socket may have data (edge-triggered epoll: set on events, cleared on EAGAIN).
    readable: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            to_host: Vec::new(),
            readable: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// A host client that connected to `<uds_path>` and has not finished its CONNECT line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug)]
enum Token {
    Handshake,
    Conn(Key),
}

/// The host side of every vsock connection of one device.
#[derive(Debug)]
pub struct Muxer {
    uds_path: PathBuf,
    guest_cid: u64,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    handshakes: HashMap<u64, Handshake>,
    tokens: HashMap<u64, Token>,
    conn_tokens: HashMap<Key, u64>,
    next_token: u64,
    next_local_port: u32,
    /// Packets without payload waiting for an RX buffer, at most [`MAX_PENDING_CONTROL`].
    control: VecDeque<Header>,
    /// Control packets dropped because the queue was full (warned about once per 1024).
    dropped_control: u64,
    /// Guest-triggered warnings, rate-limited.
    warnings: GuestWarnings,
    /// [`MAX_CONNECTIONS`], lower in tests.
    pub(super) max_connections: usize,
}

impl Muxer {
    /// Listens on `uds_path` for host-initiated connections. Fails if the path exists.
    pub fn new(uds_path: &Path, guest_cid: u64) -> io::Result<Self> {
        let listener = UnixListener::bind(uds_path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("binding vsock socket {}: {e}", uds_path.display()),
            )
        })?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Self {
            uds_path: uds_path.to_path_buf(),
            guest_cid,
            listener,
            epoll,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            tokens: HashMap::new(),
            conn_tokens: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            dropped_control: 0,
            warnings: GuestWarnings::default(),
            max_connections: MAX_CONNECTIONS,
        })
    }

    /// The epoll fd that becomes readable when a host socket needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn header(&self, key: Key, op: u16, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.conns.get(&key).map_or(0, |c| c.fwd_cnt.0),
        }
    }

    fn push_control(&mut self, key: Key, op: u16, flags: u32) {
        let h = self.header(key, op, flags);
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_cnt_told = c.fwd_cnt;
        }
        // One credit update per connection is enough: a queued one takes the newest count.
        if op == OP_CREDIT_UPDATE {
            if let Some(queued) = self.control.iter_mut().find(|q| {
                q.op == OP_CREDIT_UPDATE && (q.src_port, q.dst_port) == (h.src_port, h.dst_port)
            }) {
                *queued = h;
                return;
            }
        }
        if self.control.len() >= MAX_PENDING_CONTROL {
            if self.dropped_control.is_multiple_of(1024) {
                tracing::warn!(
                    "vsock: the guest takes no packets; {} control packets dropped",
                    self.dropped_control + 1
                );
            }
            self.dropped_control += 1;
            return;
        }
        self.control.push_back(h);
    }

    /// Whether another connection would pass [`Muxer::max_connections`].
    fn at_connection_limit(&self) -> bool {
        self.conns.len() >= self.max_connections
    }

    fn new_token(&mut self, token: Token) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        self.tokens.insert(t, token);
        t
    }

    fn register_conn(&mut self, key: Key, conn: Conn, token: Option<u64>) -> io::Result<()> {
        let events = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
        let (op, token) = match token {
            Some(t) => {
                self.tokens.insert(t, Token::Conn(key));
                (ControlOperation::Modify, t)
            }
            None => (ControlOperation::Add, self.new_token(Token::Conn(key))),
        };
        self.epoll
            .ctl(op, conn.stream.as_raw_fd(), EpollEvent::new(events, token))?;
        // A client may have written before we watched it edge-triggered: look once.
        let mut conn = conn;
        conn.readable = true;
        self.conns.insert(key, conn);
        self.conn_tokens.insert(key, token);
        Ok(())
    }

    fn remove_conn(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            // Closing the fd drops it from the epoll set.
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.conn_tokens.remove(&key) {
            self.tokens.remove(&t);
        }
    }

    /// Resets every connection: host clients see their sockets closed and the guest gets
    /// an RST for each. Host clients still writing their CONNECT line are kept; the guest
    /// never heard of them.
    pub fn reset_all(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        keys.into_iter().for_each(|key| self.reset(key));
    }

    /// Where host clients connect.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    fn reset(&mut self, key: Key) {
        self.remove_conn(key);
        self.push_control(key, OP_RST, 0);
    }

    /// Handles one packet the guest sent.
    pub fn send_to_host(&mut self, hdr: &Header, payload: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        let op = hdr.op;
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM || hdr.src_cid != self.guest_cid {
            if op != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.peer_buf_alloc = hdr.buf_alloc;
            conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        }
        let state = self.conns.get(&key).map(|c| c.state);
        match (op, state) {
            (OP_REQUEST, None) => self.connect_to_host(key, hdr),
            (OP_RESPONSE, Some(State::AwaitingGuest)) => {
                let conn = self
                    .conns
                    .get_mut(&key)
                    .expect("state came from this entry");
                conn.state = State::Established;
                let ok = format!("OK {}\n", key.0);
                match byte_count(ok.len()) {
                    Ok(n) => {
                        conn.to_host.extend_from_slice(ok.as_bytes());
                        // The OK line is not guest data: keep it out of the credit count.
                        conn.fwd_cnt -= n;
                        self.flush_to_host(key);
                    }
                    Err(e) => {
                        tracing::warn!("vsock: {e}");
                        self.reset(key);
                    }
                }
            }
            (OP_RW, Some(State::Established)) => {
                let conn = self
                    .conns
                    .get_mut(&key)
                    .expect("state came from this entry");
                if conn.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    self.warnings
                        .warn(format_args!("vsock: guest overran its credit on {key:?}"));
                    self.reset(key);
                    return;
                }
                conn.to_host.extend_from_slice(payload);
                self.flush_to_host(key);
            }
            (OP_CREDIT_REQUEST, Some(_)) => self.push_control(key, OP_CREDIT_UPDATE, 0),
            (OP_CREDIT_UPDATE, Some(_)) => {}
            (OP_SHUTDOWN, Some(_)) => {
                if hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    self.reset(key);
                } else if hdr.flags & SHUTDOWN_SEND != 0 {
                    let conn = &self.conns[&key];
                    if conn.to_host.is_empty() {
                        let _ = conn.stream.shutdown(Shutdown::Write);
                    }
                }
            }
            (OP_RST, _) => self.remove_conn(key),
            _ => self.reset(key),
        }
    }

    fn connect_to_host(&mut self, key: Key, hdr: &Header) {
        if self.at_connection_limit() {
            tracing::debug!(
                "vsock: guest connect {key:?} refused: {} open",
                self.conns.len()
            );
            self.push_control(key, OP_RST, 0);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.0);
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                let mut conn = Conn::new(stream, State::Established);
                conn.peer_buf_alloc = hdr.buf_alloc;
                conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
                match self.register_conn(key, conn, None) {
                    Ok(()) => self.push_control(key, OP_RESPONSE, 0),
                    Err(e) => {
                        tracing::warn!("vsock: watching {path}: {e}");
                        self.reset(key);
                    }
                }
            }
            Err(e) => {
                tracing::debug!("vsock: guest connect to {path} refused: {e}");
                self.push_control(key, OP_RST, 0);
            }
        }
    }

    /// Writes buffered guest data to the host socket as far as it takes it.
    fn flush_to_host(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        while !conn.to_host.is_empty() {
            match conn
                .stream
                .write(&conn.to_host)
                .and_then(|n| Ok((n, byte_count(n)?)))
            {
                Ok((n, count)) => {
                    conn.to_host.drain(..n);
                    conn.fwd_cnt += count;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock: host socket {key:?} write failed: {e}");
                    self.reset(key);
                    return;
                }
            }
        }
        if (conn.fwd_cnt - conn.fwd_cnt_told).0 >= BUF_ALLOC / 2 {
            self.push_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// Accepts clients, reads CONNECT lines and notes readable/writable sockets.
    pub fn handle_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("vsock: epoll_wait: {e}");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let (token, set) = (ev.data(), ev.event_set());
                if token == LISTENER_TOKEN {
                    self.accept_all();
                    continue;
                }
                match self.tokens.get(&token) {
                    Some(Token::Handshake) => self.read_connect_line(token),
                    Some(Token::Conn(key)) => {
                        let key = *key;
                        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                            if let Some(c) = self.conns.get_mut(&key) {
                                c.readable = true;
                            }
                        }
                        if set.contains(EventSet::OUT) {
                            self.flush_to_host(key);
                        }
                    }
                    None => {}
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("vsock: {e}");
                        continue;
                    }
                    let token = self.new_token(Token::Handshake);
                    let ev = EpollEvent::new(EventSet::IN, token);
                    if let Err(e) = self
                        .epoll
                        .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                    {
                        tracing::warn!("vsock: watching a client: {e}");
                        self.tokens.remove(&token);
                        continue;
                    }
                    self.handshakes.insert(
                        token,
                        Handshake {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads a client's `CONNECT <port>\n` byte by byte (so no guest data is consumed with it).
    fn read_connect_line(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match hs.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(1) if hs.line.len() < MAX_CONNECT_LINE => hs.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => break None, // EOF, error or an overlong line
            }
        };
        let hs = self.handshakes.remove(&token).expect("looked up above");
        let port = port.filter(|_| !self.at_connection_limit());
        let Some(port) = port else {
            tracing::debug!(
                "vsock: CONNECT line {:?} refused (malformed, or {} connections open)",
                String::from_utf8_lossy(&hs.line),
                self.conns.len()
            );
            self.tokens.remove(&token);
            return; // dropping the stream closes it
        };
        let key = (self.allocate_local_port(), port);
        match self.register_conn(key, Conn::new(hs.stream, State::AwaitingGuest), Some(token)) {
            Ok(()) => {
                let conn = self.conns.get_mut(&key).expect("just inserted");
                conn.readable = false; // nothing is read before the guest accepted
                self.push_control(key, OP_REQUEST, 0);
            }
            Err(e) => {
                tracing::warn!("vsock: {e}");
                self.tokens.remove(&token);
            }
        }
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    /// Control packets waiting for RX buffers.
    #[cfg(test)]
    pub(super) fn pending_control(&self) -> usize {
        self.control.len()
    }

    /// Whether a packet for the guest may be ready (RX buffers are worth taking).
    pub fn has_pending_rx(&self) -> bool {
        !self.control.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.state == State::Established && c.readable && c.peer_credit() > 0)
    }

    /// The next packet for the guest, its payload at most `max_payload` bytes.
    pub fn next_rx(&mut self, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        let ready: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Established && c.readable && c.peer_credit() > 0)
            .map(|(k, _)| *k)
            .collect();
        for key in ready {
            let conn = self.conns.get_mut(&key).expect("key from the map");
            let want = max_payload
                .min(MAX_PAYLOAD)
                .min(conn.peer_credit() as usize);
            let mut buf = vec![0u8; want];
            match conn
                .stream
                .read(&mut buf)
                .and_then(|n| Ok((n, byte_count(n)?)))
            {
                Ok((0, _)) if want > 0 => {
                    // The host closed its end: tell the guest nothing more will come.
                    conn.readable = false;
                    let h = self.header(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                    return Some((h, Vec::new()));
                }
                Ok((n, len)) => {
                    buf.truncate(n);
                    conn.tx_cnt += len;
                    conn.fwd_cnt_told = conn.fwd_cnt;
                    let mut h = self.header(key, OP_RW, 0);
                    h.len = len;
                    return Some((h, buf));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => conn.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock: host socket {key:?} read failed: {e}");
                    self.remove_conn(key);
                    return Some((self.header(key, OP_RST, 0), Vec::new()));
                }
            }
        }
        None
    }
}

/// `n` bytes as the 32-bit counts of the protocol (`len`, `fwd_cnt`, `tx_cnt`). One socket
/// read or write here moves at most a connection's buffer (about `BUF_ALLOC` bytes), so an
/// error means a broken invariant; callers handle it like a failed I/O.
fn byte_count(n: usize) -> io::Result<u32> {
    u32::try_from(n).map_err(|_| io::Error::other(format!("{n} bytes in one I/O")))
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    std::str::from_utf8(line)
        .ok()?
        .trim_end_matches('\r')
        .strip_prefix("CONNECT ")?
        .parse()
        .ok()
}

impl Drop for Muxer {
    /// Unlinks the listening socket: a clean exit leaves nothing behind.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
