//! Publishing through the server API (`POST /api/publish`) over one keep-alive HTTP/1.1
//! connection, written by hand: a request, a response read to its exact end, the next request.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::target::Target;

/// One keep-alive connection to the API; reconnects when the server closes it.
pub struct ApiPublisher {
    target: Target,
    addr: SocketAddr,
    api_key: String,
    timeout: Duration,
    stream: Option<TcpStream>,
    buffer: Vec<u8>,
}

/// How a response's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    Exactly(usize),
    Chunked,
    /// Until the connection closes (no length given).
    UntilClose,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head, the blank line included.
    pub len: usize,
    pub status: u16,
    pub body: BodyLength,
    /// `Connection: close`: the server will not take another request on this connection.
    pub close: bool,
}

/// Parses the head of a response at the start of `bytes`: `Ok(None)` while incomplete.
pub fn parse_head(bytes: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = bytes.windows(4).position(|window| window == b"\r\n\r\n") else {
        return if bytes.len() > 64 * 1024 {
            Err("response head larger than 64 KiB".into())
        } else {
            Ok(None)
        };
    };
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP/1 response: {status_line:?}"))?;
    let mut body = BodyLength::UntilClose;
    let mut close = status_line.starts_with("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length = value
                .parse()
                .map_err(|_| format!("bad content-length {value:?}"))?;
            if body != BodyLength::Chunked {
                body = BodyLength::Exactly(length);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            body = BodyLength::Chunked;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    if matches!(status, 100..=199 | 204 | 304) {
        body = BodyLength::Exactly(0);
    }
    Ok(Some(Head {
        len: end + 4,
        status,
        body,
        close,
    }))
}

/// Decodes a chunked body at the start of `bytes`: `Ok(None)` while incomplete, else the body
/// and how many bytes it took (trailers included).
pub fn parse_chunked(bytes: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = find(&bytes[at..], b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&bytes[at..at + line_end]).map_err(|_| "bad chunk size")?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|_| format!("bad chunk size {size:?}"))?;
        at += line_end + 2;
        if size == 0 {
            // Trailers, then a blank line.
            loop {
                let Some(end) = find(&bytes[at..], b"\r\n") else {
                    return Ok(None);
                };
                at += end + 2;
                if end == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        if bytes.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&bytes[at..at + size]);
        if &bytes[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        at += size + 2;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Why a publish through the API did not succeed.
pub fn api_outcome(status: u16, body: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(body);
    let value: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    let error = value.as_ref().and_then(|value| value.get("error"));
    match (status, error) {
        (200, None) => Ok(()),
        (401, _) => Err("API key refused (HTTP 401)".into()),
        (_, Some(error)) => Err(format!(
            "API error {}: {}",
            error["code"],
            error["message"].as_str().unwrap_or("?")
        )),
        (status, None) => Err(format!("HTTP {status}")),
    }
}

/// One request on a new connection (`Connection: close`), read to the end of its response:
/// its status. `api_key` (for the API) makes it a `POST` of `{}` with `X-API-Key`; without it,
/// a `GET`. For probes: it measures what a new client of the server waits for.
pub async fn one_request(
    addr: SocketAddr,
    target: &Target,
    api_key: Option<&str>,
) -> Result<u16, String> {
    let reason = |error: std::io::Error| crate::client::io_reason(&error);
    let mut stream = TcpStream::connect(addr).await.map_err(reason)?;
    let _ = stream.set_nodelay(true);
    let request = match api_key {
        Some(key) => format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}",
            target.path, target.authority
        ),
        None => format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            target.path, target.authority
        ),
    };
    stream.write_all(request.as_bytes()).await.map_err(reason)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(reason)?;
    let head = parse_head(&response)?.ok_or("incomplete response")?;
    if let BodyLength::Exactly(length) = head.body {
        if response.len() < head.len + length {
            return Err("response body cut short".into());
        }
    }
    Ok(head.status)
}

impl ApiPublisher {
    pub fn new(target: Target, addr: SocketAddr, api_key: String, timeout: Duration) -> Self {
        ApiPublisher {
            target,
            addr,
            api_key,
            timeout,
            stream: None,
            buffer: Vec::with_capacity(4096),
        }
    }

    /// Publishes `data` (JSON text) into `channel`; waits for the response.
    pub async fn publish(&mut self, channel: &str, data: &str) -> Result<(), String> {
        let body = format!(
            r#"{{"channel":{},"data":{data}}}"#,
            serde_json::Value::from(channel)
        );
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange(&body)).await {
            Ok(Ok((status, response))) => api_outcome(status, &response),
            Ok(Err(error)) => {
                self.stream = None;
                Err(error)
            }
            Err(_) => {
                self.stream = None;
                Err(format!("no API response within {timeout:?}"))
            }
        }
    }

    async fn exchange(&mut self, body: &str) -> Result<(u16, Vec<u8>), String> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr).await.map_err(|error| {
                format!(
                    "API {}: {}",
                    self.target.authority,
                    crate::client::io_reason(&error)
                )
            })?;
            let _ = stream.set_nodelay(true);
            self.stream = Some(stream);
            self.buffer.clear();
        }
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: plexus-bench/{}\r\nX-API-Key: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.target.path,
            self.target.authority,
            env!("CARGO_PKG_VERSION"),
            self.api_key,
            body.len()
        );
        let stream = self.stream.as_mut().expect("connected above");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|error| format!("API write: {}", crate::client::io_reason(&error)))?;
        let head = loop {
            if let Some(head) = parse_head(&self.buffer)? {
                break head;
            }
            self.read_more().await?;
        };
        let (body, used) = match head.body {
            BodyLength::Exactly(length) => {
                while self.buffer.len() < head.len + length {
                    self.read_more().await?;
                }
                (
                    self.buffer[head.len..head.len + length].to_vec(),
                    head.len + length,
                )
            }
            BodyLength::Chunked => loop {
                if let Some((body, used)) = parse_chunked(&self.buffer[head.len..])? {
                    break (body, head.len + used);
                }
                self.read_more().await?;
            },
            BodyLength::UntilClose => {
                while self.read_more().await.is_ok() {}
                (self.buffer[head.len..].to_vec(), self.buffer.len())
            }
        };
        self.buffer.drain(..used);
        if head.close || head.body == BodyLength::UntilClose {
            self.stream = None;
        }
        Ok((head.status, body))
    }

    async fn read_more(&mut self) -> Result<(), String> {
        let stream = self.stream.as_mut().ok_or("API connection closed")?;
        let mut chunk = [0u8; 4096];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|error| format!("API read: {}", crate::client::io_reason(&error)))?;
        if n == 0 {
            return Err("API connection closed by the server".into());
        }
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{\"result\":{}}";
        let head = parse_head(response).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.body, BodyLength::Exactly(12));
        assert!(!head.close);
        assert_eq!(&response[head.len..head.len + 2], b"{\"");
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap(), None);
        let head = parse_head(b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.status, head.body, head.close),
            (503, BodyLength::Chunked, true)
        );
        let head = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!((head.body, head.close), (BodyLength::UntilClose, true));
        let head = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.body, BodyLength::Exactly(0));
        assert!(parse_head(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nNEXT";
        let (decoded, used) = parse_chunked(body).unwrap().unwrap();
        assert_eq!(decoded, b"hello world");
        assert_eq!(&body[used..], b"NEXT");
        let with_trailer = b"1\r\na\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(
            parse_chunked(with_trailer).unwrap().unwrap(),
            (b"a".to_vec(), with_trailer.len())
        );
        for cut in 0..body.len() - 4 {
            assert_eq!(parse_chunked(&body[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(parse_chunked(b"zz\r\n").is_err());
        assert!(parse_chunked(b"1\r\nab\r\n").is_err());
    }

    #[tokio::test]
    async fn one_request_reads_a_whole_response_and_returns_its_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0; 4096];
            let n = socket.read(&mut request).await.unwrap();
            socket
                .write_all(b"HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy")
                .await
                .unwrap();
            String::from_utf8_lossy(&request[..n]).into_owned()
        });
        let target = Target::http(&format!("http://{addr}/api/info")).unwrap();
        assert_eq!(one_request(addr, &target, Some("k")).await, Ok(503));
        let request = server.await.unwrap();
        assert!(
            request.starts_with("POST /api/info HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("X-API-Key: k\r\n"), "{request}");
        assert!(request.ends_with("\r\n\r\n{}"), "{request}");
    }

    #[test]
    fn api_outcomes() {
        assert_eq!(api_outcome(200, br#"{"result":{"offset":3}}"#), Ok(()));
        assert_eq!(
            api_outcome(
                200,
                br#"{"error":{"code":102,"message":"unknown channel"}}"#
            ),
            Err("API error 102: unknown channel".into())
        );
        assert!(api_outcome(401, b"").unwrap_err().contains("401"));
        assert_eq!(api_outcome(500, b"oops"), Err("HTTP 500".into()));
    }
}
