//! `plexus publish`: one `POST /api/publish` to a running server.
//!
//! The API key is found as the server finds it (see [`crate::token::ServerConfig`]) unless
//! `--api-key` gives it. The request is plain HTTP/1.1 over a `TcpStream`: one request, one
//! response, nothing else needed.

use std::time::Duration;

use anyhow::{anyhow, Context as _};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::token::{server_secrets, ServerConfig};
use crate::Failure;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Channel to publish into, e.g. chat:lobby (what /chat/lobby clients are in)
    channel: String,
    /// The data: JSON as is; any other text is sent as a JSON string
    data: String,
    /// The server [default: http:// and the configured listen address, 127.0.0.1:8000]
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Publish at most once with this key: a retry within 5 minutes answers the first
    /// publish's offset instead of publishing again
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    #[command(flatten)]
    server: ServerConfig,
}

/// Where to send the request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// `host:port` as written in the URL (the `Host` header).
    authority: String,
    host: String,
    port: u16,
    /// The URL's path without a trailing slash (`""` for none); `/api/...` goes after it.
    prefix: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        if url.starts_with("https://") {
            format!("{url}: https is not supported by plexus publish; use http://")
        } else {
            format!("{url}: expected a URL like http://127.0.0.1:8000")
        }
    })?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            let port = port
                .parse()
                .map_err(|_| format!("{url}: bad port {port:?}"))?;
            (host, port)
        }
        _ => (authority, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok(Target {
        authority: authority.to_owned(),
        host: host.to_owned(),
        port,
        prefix: path.trim_end_matches('/').to_owned(),
    })
}

/// The request body: `data` kept as written when it is JSON, else as a JSON string.
fn request_body(channel: &str, data: &str, idempotency_key: Option<&str>) -> String {
    let data = if serde_json::from_str::<Value>(data).is_ok() {
        data.trim().to_owned()
    } else {
        Value::from(data).to_string()
    };
    let key = idempotency_key.map_or_else(String::new, |key| {
        format!(r#","idempotency_key":{}"#, Value::from(key))
    });
    format!(
        r#"{{"channel":{},"data":{data}{key}}}"#,
        Value::from(channel)
    )
}

/// A response's status and body.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    body: String,
}

/// Reads an HTTP/1.1 response that ends with the connection (`Connection: close`).
fn parse_response(bytes: &[u8]) -> Result<Response, String> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the server's response ended early")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {:?}", head.lines().next()))?;
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(Response { status, body })
}

/// Joins the chunks of a chunked body.
fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or("bad chunked body")?;
        let size = size.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| "bad chunk size")?;
        if size == 0 {
            return Ok(body);
        }
        let chunk = after.get(..size).ok_or("truncated chunk")?;
        body.push_str(chunk);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

async fn post(target: &Target, path: &str, api_key: &str, body: &str) -> anyhow::Result<Response> {
    let exchange = async {
        let mut stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .with_context(|| format!("cannot connect to {}", target.authority))?;
        let request = format!(
            "POST {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: plexus/{}\r\nX-API-Key: {api_key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            target.prefix,
            target.authority,
            env!("CARGO_PKG_VERSION"),
            body.len(),
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        parse_response(&response).map_err(|message| anyhow!(message))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("no response from {} within {TIMEOUT:?}", target.authority))?
}

/// The result of a 200 response, or why there is none.
fn outcome(response: &Response) -> Result<Value, String> {
    let body: Option<Value> = serde_json::from_str(&response.body).ok();
    let error = body.as_ref().and_then(|body| body.get("error"));
    let describe = |error: &Value| {
        format!(
            "{} (code {})",
            error["message"].as_str().unwrap_or("?"),
            error["code"]
        )
    };
    match (response.status, error) {
        (401, _) => Err("the server refused the API key (HTTP 401 unauthorized); pass --api-key, or the server's --data-dir or --config".into()),
        (200, Some(error)) => Err(format!("the server answered with an error: {}", describe(error))),
        (200, None) => body
            .and_then(|mut body| body.get_mut("result").map(Value::take))
            .ok_or_else(|| format!("unexpected response: {}", response.body.trim())),
        (status, Some(error)) => Err(format!("HTTP {status}: {}", describe(error))),
        (status, None) => Err(format!("HTTP {status}: {}", response.body.trim())),
    }
}

pub async fn run(args: PublishArgs) -> Result<(), Failure> {
    let config = args.server.load()?;
    let url = args
        .url
        .unwrap_or_else(|| format!("http://{}", config.listen));
    let target = parse_url(&url).map_err(|message| Failure::new(2, anyhow!(message)))?;
    let api_key = match &config.api_key {
        Some(key) => key.clone(),
        None => server_secrets(&config)?.api_key,
    };
    let body = request_body(&args.channel, &args.data, args.idempotency_key.as_deref());
    let response = post(&target, "/api/publish", &api_key, &body)
        .await
        .map_err(|error| Failure::new(1, error))?;
    let result = outcome(&response).map_err(|message| Failure::new(1, anyhow!(message)))?;
    println!("{result}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let target = |authority: &str, host: &str, port, prefix: &str| Target {
            authority: authority.into(),
            host: host.into(),
            port,
            prefix: prefix.into(),
        };
        let check = |url: &str, expected: Result<Target, &str>| {
            let got = parse_url(url);
            match expected {
                Ok(expected) => assert_eq!(got, Ok(expected), "{url}"),
                Err(part) => assert!(
                    got.as_ref().is_err_and(|e| e.contains(part)),
                    "{url}: {got:?}"
                ),
            }
        };
        check(
            "http://127.0.0.1:8000",
            Ok(target("127.0.0.1:8000", "127.0.0.1", 8000, "")),
        );
        check(
            "http://localhost/",
            Ok(target("localhost", "localhost", 80, "")),
        );
        check(
            "http://[::1]:9000/base/",
            Ok(target("[::1]:9000", "::1", 9000, "/base")),
        );
        check("http://[::1]", Ok(target("[::1]", "::1", 80, "")));
        check("https://x", Err("https is not supported"));
        check("ftp://x", Err("expected a URL"));
        check("http://x:port", Err("bad port"));
        check("http://:80", Err("no host"));
    }

    #[test]
    fn bodies() {
        assert_eq!(
            request_body("chat:a", r#"{"b":1, "a":2}"#, None),
            r#"{"channel":"chat:a","data":{"b":1, "a":2}}"#
        );
        assert_eq!(
            request_body("chat:a", " 42 ", Some("k-1")),
            r#"{"channel":"chat:a","data":42,"idempotency_key":"k-1"}"#
        );
        assert_eq!(
            request_body("chat:\"q\"", "hello there", None),
            r#"{"channel":"chat:\"q\"","data":"hello there"}"#
        );
    }

    #[test]
    fn responses() {
        let response = |status, body: &str| Response {
            status,
            body: body.into(),
        };
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap(),
            response(200, "{}")
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n").unwrap(),
            response(200, r#"{"a":1}"#)
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert_eq!(
            outcome(&response(200, r#"{"result":{"offset":1,"epoch":"e"}}"#)),
            Ok(serde_json::json!({"offset":1,"epoch":"e"}))
        );
        let error = outcome(&response(
            200,
            r#"{"error":{"code":102,"message":"unknown channel"}}"#,
        ));
        assert!(error.unwrap_err().contains("unknown channel (code 102)"));
        let error = outcome(&response(
            401,
            r#"{"error":{"code":101,"message":"unauthorized"}}"#,
        ));
        assert!(error.unwrap_err().contains("refused the API key"));
        let error = outcome(&response(
            400,
            r#"{"error":{"code":107,"message":"bad request: x"}}"#,
        ));
        assert_eq!(error.unwrap_err(), "HTTP 400: bad request: x (code 107)");
    }
}
