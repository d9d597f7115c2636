//! Helpers shared by the integration tests: a plain HTTP/1.1 client over any stream
//! (so that tests can also send what no proper client would), and a launcher whose
//! environments are real host processes running `tests/fake_guest.py`.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub mod launcher;

/// A parsed HTTP answer; header names are lower case.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Writes one request (head and body in one write) and reads the answer.
pub async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await.unwrap();
    read_answer(stream)
        .await
        .expect("the server closed the connection without an answer")
}

/// Reads one HTTP/1.1 answer (Content-Length framed); `None` on a clean EOF.
pub async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Answer> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head_len) =
            parsed.parse(&buf).expect("a valid HTTP answer")
        {
            let status = parsed.code.unwrap();
            let headers: HashMap<String, String> = parsed
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let len: usize = headers
                .get("content-length")
                .map_or(0, |v| v.parse().unwrap());
            while buf.len() < head_len + len {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "EOF inside a body");
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(Answer {
                status,
                headers,
                body: buf[head_len..head_len + len].to_vec(),
            });
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
