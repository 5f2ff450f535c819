//! The opening handshake (RFC 6455 §4.2) and permessage-deflate negotiation (RFC 7692 §7.1).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID every server appends to the client's key (RFC 6455 §1.3).
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Extensions` value Plexus answers an acceptable deflate offer with.
pub const DEFLATE_RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The headers of an upgrade request that the handshake looks at.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpgradeRequest<'a> {
    pub method_is_get: bool,
    pub upgrade: Option<&'a str>,
    pub connection: Option<&'a str>,
    pub version: Option<&'a str>,
    pub key: Option<&'a str>,
}

/// Why an upgrade request was refused. Each maps to an HTTP status and a reason in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    #[error("WebSocket upgrade requires the GET method")]
    NotGet,
    #[error("this endpoint speaks WebSocket only: missing 'Upgrade: websocket' header")]
    NoUpgradeHeader,
    #[error("missing 'Connection: Upgrade' header")]
    NoConnectionUpgrade,
    #[error("unsupported WebSocket version: only 13 is supported")]
    BadVersion,
    #[error("missing or malformed Sec-WebSocket-Key (must be 16 bytes in base64)")]
    BadKey,
}

impl UpgradeError {
    /// HTTP status to answer with: 405, 426 (with `Sec-WebSocket-Version: 13`) or 400.
    pub fn status(self) -> u16 {
        match self {
            UpgradeError::NotGet => 405,
            UpgradeError::NoUpgradeHeader | UpgradeError::BadVersion => 426,
            UpgradeError::NoConnectionUpgrade | UpgradeError::BadKey => 400,
        }
    }
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|value| {
        value
            .split(',')
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    })
}

impl<'a> UpgradeRequest<'a> {
    /// Checks the request and returns the `Sec-WebSocket-Accept` value to answer with.
    pub fn accept(&self) -> Result<String, UpgradeError> {
        if !self.method_is_get {
            return Err(UpgradeError::NotGet);
        }
        if !has_token(self.upgrade, "websocket") {
            return Err(UpgradeError::NoUpgradeHeader);
        }
        if !has_token(self.connection, "upgrade") {
            return Err(UpgradeError::NoConnectionUpgrade);
        }
        if self.version.map(str::trim) != Some("13") {
            return Err(UpgradeError::BadVersion);
        }
        let key = self.key.map(str::trim).ok_or(UpgradeError::BadKey)?;
        match BASE64.decode(key) {
            Ok(decoded) if decoded.len() == 16 => Ok(accept_key(key)),
            _ => Err(UpgradeError::BadKey),
        }
    }
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

/// Looks through a `Sec-WebSocket-Extensions` request header for a permessage-deflate offer
/// that Plexus can honour. Returns true if one is found; the server then answers with
/// [`DEFLATE_RESPONSE`]. Offers asking for a server window below 15 bits are declined (the
/// compressor always uses the full window), as are offers with unknown or repeated parameters.
pub fn accepts_deflate(extensions: &str) -> bool {
    extensions.split(',').any(|offer| {
        let mut parts = offer.split(';').map(str::trim);
        if parts.next() != Some("permessage-deflate") {
            return false;
        }
        let mut seen: Vec<&str> = Vec::new();
        for param in parts {
            let (name, value) = match param.split_once('=') {
                Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
                None => (param, None),
            };
            if seen.contains(&name) {
                return false;
            }
            seen.push(name);
            let acceptable = match name {
                "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
                "client_max_window_bits" => value.is_none_or(|bits| {
                    bits.parse::<u8>()
                        .is_ok_and(|bits| (8..=15).contains(&bits))
                }),
                "server_max_window_bits" => value == Some("15"),
                _ => false,
            };
            if !acceptable {
                return false;
            }
        }
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> UpgradeRequest<'static> {
        UpgradeRequest {
            method_is_get: true,
            upgrade: Some("websocket"),
            connection: Some("keep-alive, Upgrade"),
            version: Some("13"),
            key: Some("dGhlIHNhbXBsZSBub25jZQ=="),
        }
    }

    #[test]
    fn rfc_example_key() {
        assert_eq!(request().accept().unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn refusals() {
        let check = |request: UpgradeRequest<'static>, expected: UpgradeError| {
            assert_eq!(request.accept(), Err(expected));
        };
        check(
            UpgradeRequest {
                method_is_get: false,
                ..request()
            },
            UpgradeError::NotGet,
        );
        check(
            UpgradeRequest {
                upgrade: None,
                ..request()
            },
            UpgradeError::NoUpgradeHeader,
        );
        check(
            UpgradeRequest {
                connection: Some("close"),
                ..request()
            },
            UpgradeError::NoConnectionUpgrade,
        );
        check(
            UpgradeRequest {
                version: Some("8"),
                ..request()
            },
            UpgradeError::BadVersion,
        );
        check(
            UpgradeRequest {
                key: Some("short"),
                ..request()
            },
            UpgradeError::BadKey,
        );
        assert_eq!(UpgradeError::BadVersion.status(), 426);
    }

    #[test]
    fn deflate_offers() {
        assert!(accepts_deflate(
            "permessage-deflate; client_max_window_bits"
        ));
        assert!(accepts_deflate("permessage-deflate"));
        assert!(accepts_deflate(
            "x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover"
        ));
        assert!(!accepts_deflate(
            "permessage-deflate; server_max_window_bits=10"
        ));
        assert!(accepts_deflate(
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ));
        assert!(!accepts_deflate("permessage-deflate; unknown"));
        assert!(!accepts_deflate(
            "permessage-deflate; client_max_window_bits=20"
        ));
        assert!(!accepts_deflate(
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
        ));
        assert!(!accepts_deflate("foo"));
    }
}
