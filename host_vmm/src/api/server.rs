//! HTTP/1.1 over the API Unix socket: requests parsed with httparse, one connection at a time
//! (like Firecracker's API thread), keep-alive honoured.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use super::{request, ApiState, Response};

/// Largest request head + body accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// Serves the API on `listener` until the process ends.
pub fn serve(listener: UnixListener, mut state: ApiState) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(e) = serve_connection(stream, &mut state) {
                    tracing::debug!("API connection ended: {e}");
                }
            }
            Err(e) => tracing::warn!("API accept: {e}"),
        }
    }
}

struct Head {
    method: String,
    path: String,
    len: usize,
    content_length: usize,
    close: bool,
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed HTTP request: {e}")),
    };
    let mut content_length = 0;
    let mut close = req.version == Some(0);
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .trim()
                .parse()
                .map_err(|_| "invalid Content-Length".to_string())?;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.trim().eq_ignore_ascii_case("close");
        }
    }
    if len + content_length > MAX_REQUEST {
        return Err(format!("request larger than {MAX_REQUEST} bytes"));
    }
    Ok(Some(Head {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        len,
        content_length,
        close,
    }))
}

/// Reads more bytes into `buf`; false at end of stream.
fn fill(stream: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

fn serve_connection(mut stream: UnixStream, state: &mut ApiState) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let head = loop {
            match parse_head(&buf) {
                Ok(Some(head)) => break head,
                Ok(None) if buf.len() < MAX_REQUEST => {
                    if !fill(&mut stream, &mut buf)? {
                        return Ok(());
                    }
                }
                Ok(None) => {
                    return write_response(&mut stream, &Response::fault("request head too large"))
                }
                Err(msg) => return write_response(&mut stream, &Response::fault(msg)),
            }
        };
        let end = head.len + head.content_length;
        while buf.len() < end {
            if !fill(&mut stream, &mut buf)? {
                return Ok(());
            }
        }
        let body: Vec<u8> = buf.drain(..end).skip(head.len).collect();
        let response = match request::parse(&head.method, &head.path, &body) {
            Ok(req) => state.handle(req),
            Err(msg) => Response::fault(msg),
        };
        tracing::info!("API {} {} -> {}", head.method, head.path, response.status);
        write_response(&mut stream, &response)?;
        if head.close {
            return Ok(());
        }
    }
}

fn write_response(stream: &mut UnixStream, r: &Response) -> io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        204 => "No Content",
        _ => "Bad Request",
    };
    let mut out = format!("HTTP/1.1 {} {reason}\r\nServer: kindling-vmm\r\n", r.status);
    match &r.body {
        Some(body) => out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None => out.push_str("\r\n"),
    }
    stream.write_all(out.as_bytes())
}
