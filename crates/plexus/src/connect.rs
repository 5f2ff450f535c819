//! `plexus connect URL`: a small interactive WebSocket client, like wscat or websocat.
//!
//! Each line on stdin is sent as a message (text, or binary with `--binary`); each message
//! received is printed on stdout (text as is, binary as `[binary N bytes] HEX`). Status goes to
//! stderr: the HTTP status on connect, and the close code and reason at the end. When stdin ends
//! the client sends a normal close (1000) and waits for the server's reply, so it works in a
//! pipe as well as at a terminal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use futures_util::{SinkExt, StreamExt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

use crate::Failure;

#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    /// ws:// or wss:// URL
    url: String,
    /// Extra request header, "Name: value" (repeatable)
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Subprotocol to offer in Sec-WebSocket-Protocol (repeatable)
    #[arg(short = 's', long = "subprotocol", value_name = "NAME")]
    subprotocols: Vec<String>,
    /// Send each stdin line as a binary message instead of text
    #[arg(short, long)]
    binary: bool,
    /// Accept any TLS certificate (for self-signed test servers)
    #[arg(short = 'k', long)]
    insecure: bool,
    /// How long to wait for the server's close reply after stdin ends
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    close_timeout: u64,
}

fn tls_config(insecure: bool) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    Ok(if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        builder.with_root_certificates(roots).with_no_client_auth()
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub async fn run(args: ConnectArgs) -> Result<(), Failure> {
    let usage = |error: anyhow::Error| Failure::new(2, error);
    let mut request = args
        .url
        .as_str()
        .into_client_request()
        .with_context(|| format!("invalid URL {:?}", args.url))
        .map_err(usage)?;
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| anyhow!("header {header:?} is not \"Name: value\""))
            .map_err(usage)?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("invalid header name in {header:?}"))
            .map_err(usage)?;
        let value = HeaderValue::from_str(value.trim())
            .with_context(|| format!("invalid header value in {header:?}"))
            .map_err(usage)?;
        request.headers_mut().append(name, value);
    }
    if !args.subprotocols.is_empty() {
        let value = HeaderValue::from_str(&args.subprotocols.join(", "))
            .context("invalid subprotocol")
            .map_err(usage)?;
        request
            .headers_mut()
            .insert("sec-websocket-protocol", value);
    }
    let connector = Connector::Rustls(Arc::new(tls_config(args.insecure).map_err(usage)?));
    let (socket, response) =
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector))
            .await
            .with_context(|| format!("cannot connect to {}", args.url))
            .map_err(|error| Failure::new(1, error))?;
    let subprotocol = response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|value| value.to_str().ok())
        .map(|value| format!(", subprotocol {value}"))
        .unwrap_or_default();
    eprintln!(
        "connected to {} (HTTP {}{subprotocol})",
        args.url,
        response.status().as_u16()
    );

    let (mut sink, mut stream) = socket.split();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let close_wait = tokio::time::sleep(Duration::MAX);
    tokio::pin!(close_wait);
    let mut close: Option<(u16, String)> = None;
    loop {
        tokio::select! {
            line = stdin.next_line(), if stdin_open => {
                let message = match line {
                    Ok(Some(line)) if args.binary => Message::Binary(line.into_bytes().into()),
                    Ok(Some(line)) => Message::Text(line.into()),
                    Ok(None) | Err(_) => {
                        stdin_open = false;
                        close_wait.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(args.close_timeout));
                        Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))
                    }
                };
                if let Err(error) = sink.send(message).await {
                    eprintln!("send failed: {error}");
                    break;
                }
            }
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => println!("{text}"),
                Some(Ok(Message::Binary(data))) => println!("[binary {} bytes] {}", data.len(), hex(&data)),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map_or((1005, String::new()), |frame| (u16::from(frame.code), frame.reason.to_string()));
                    eprintln!("closed: {code} {reason}");
                    close = Some((code, reason));
                }
                Some(Ok(_)) => {} // ping, pong: answered by the library
                Some(Err(error)) => {
                    if close.is_none() {
                        eprintln!("connection error: {error}");
                    }
                    break;
                }
                None => break,
            },
            () = &mut close_wait => {
                eprintln!("no close reply within {}s", args.close_timeout);
                break;
            }
        }
    }
    match close {
        Some((1000 | 1001, _)) => Ok(()),
        Some((code, reason)) => Err(Failure::new(4, anyhow!("abnormal close: {code} {reason}"))),
        None => Err(Failure::new(
            4,
            anyhow!("connection ended without a close frame"),
        )),
    }
}

/// `--insecure`: checks signatures but trusts any certificate.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
