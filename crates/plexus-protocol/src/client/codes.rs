//! The numeric codes of the client protocol: reply errors, disconnects and unsubscribes.
//!
//! The numbers and texts are the ones Centrifugo documents for its client protocol, so the
//! official SDKs react to them as they would to Centrifugo: an SDK reconnects after a disconnect
//! code below 3500 and gives up at 3500 and above; it resubscribes after an unsubscribe code from
//! 2500 to 2999 and stays unsubscribed below 2500.

use super::types::{Disconnect, Error, Unsubscribe};

/// An error code sent in a reply's `error` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 100: something went wrong on the server; the client is probably not at fault.
    Internal,
    /// 101: the request is not authorized.
    Unauthorized,
    /// 102: the channel's namespace does not exist.
    UnknownChannel,
    /// 103: access to the resource is not allowed.
    PermissionDenied,
    /// 104: the method sent in the command does not exist.
    MethodNotFound,
    /// 105: the client is already subscribed to the channel.
    AlreadySubscribed,
    /// 106: some limit was exceeded.
    LimitExceeded,
    /// 107: the request is malformed; retrying makes no sense.
    BadRequest,
    /// 108: the feature is not enabled (for example history in a channel without history).
    NotAvailable,
    /// 109: the connection token expired; SDKs fetch a new one.
    TokenExpired,
    /// 110: the connection expired (no token involved).
    Expired,
    /// 111: rejected by rate limiting.
    TooManyRequests,
    /// 112: the stream no longer holds the requested range (often a wrong epoch).
    UnrecoverablePosition,
}

impl ErrorCode {
    /// Every error code, in numeric order.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::Internal,
        ErrorCode::Unauthorized,
        ErrorCode::UnknownChannel,
        ErrorCode::PermissionDenied,
        ErrorCode::MethodNotFound,
        ErrorCode::AlreadySubscribed,
        ErrorCode::LimitExceeded,
        ErrorCode::BadRequest,
        ErrorCode::NotAvailable,
        ErrorCode::TokenExpired,
        ErrorCode::Expired,
        ErrorCode::TooManyRequests,
        ErrorCode::UnrecoverablePosition,
    ];

    /// The number on the wire.
    pub const fn code(self) -> u32 {
        match self {
            ErrorCode::Internal => 100,
            ErrorCode::Unauthorized => 101,
            ErrorCode::UnknownChannel => 102,
            ErrorCode::PermissionDenied => 103,
            ErrorCode::MethodNotFound => 104,
            ErrorCode::AlreadySubscribed => 105,
            ErrorCode::LimitExceeded => 106,
            ErrorCode::BadRequest => 107,
            ErrorCode::NotAvailable => 108,
            ErrorCode::TokenExpired => 109,
            ErrorCode::Expired => 110,
            ErrorCode::TooManyRequests => 111,
            ErrorCode::UnrecoverablePosition => 112,
        }
    }

    /// The message sent with the code.
    pub const fn message(self) -> &'static str {
        match self {
            ErrorCode::Internal => "internal server error",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnknownChannel => "unknown channel",
            ErrorCode::PermissionDenied => "permission denied",
            ErrorCode::MethodNotFound => "method not found",
            ErrorCode::AlreadySubscribed => "already subscribed",
            ErrorCode::LimitExceeded => "limit exceeded",
            ErrorCode::BadRequest => "bad request",
            ErrorCode::NotAvailable => "not available",
            ErrorCode::TokenExpired => "token expired",
            ErrorCode::Expired => "expired",
            ErrorCode::TooManyRequests => "too many requests",
            ErrorCode::UnrecoverablePosition => "unrecoverable position",
        }
    }

    /// Whether the error is marked temporary, so SDKs may retry (internal, too many requests).
    pub const fn temporary(self) -> bool {
        matches!(self, ErrorCode::Internal | ErrorCode::TooManyRequests)
    }

    /// The code with this number, if it is a built-in one.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The wire [`Error`] for this code.
    pub fn to_error(self) -> Error {
        Error {
            code: self.code(),
            message: self.message().to_owned(),
            temporary: self.temporary(),
        }
    }
}

impl From<ErrorCode> for Error {
    fn from(code: ErrorCode) -> Self {
        code.to_error()
    }
}

/// A code the server disconnects a client with, in a `disconnect` push and as the WebSocket close
/// code (with the reason as the close reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectCode {
    /// 3000: the connection closed without advice from the server.
    ConnectionClosed,
    /// 3001: the node is shutting down.
    Shutdown,
    /// 3004: internal server error.
    ServerError,
    /// 3005: the connection expired.
    Expired,
    /// 3006: a subscription expired.
    SubExpired,
    /// 3008: the client does not read fast enough.
    Slow,
    /// 3009: writing to the connection failed.
    WriteError,
    /// 3010: a wrong position in a channel stream was detected; reconnecting recovers.
    InsufficientState,
    /// 3011: the server asks the client to reconnect.
    ForceReconnect,
    /// 3012: no pong arrived for a server ping in time.
    NoPong,
    /// 3013: the client sent too many commands.
    TooManyRequests,
    /// 3500: the connection token is invalid.
    InvalidToken,
    /// 3501: malformed protocol frames or commands in the wrong order.
    BadRequest,
    /// 3502: the connection did not authenticate in time.
    Stale,
    /// 3503: the server disconnects and asks the client not to come back.
    ForceNoReconnect,
    /// 3504: a connection limit was exceeded.
    ConnectionLimit,
    /// 3505: a channel limit was exceeded.
    ChannelLimit,
    /// 3506: the connection's format cannot carry the data (binary to a JSON client).
    InappropriateProtocol,
    /// 3507: not enough permissions.
    PermissionDenied,
    /// 3508: the feature is not available.
    NotAvailable,
    /// 3509: the client caused too many errors.
    TooManyErrors,
}

impl DisconnectCode {
    /// Every disconnect code, in numeric order.
    pub const ALL: [DisconnectCode; 21] = [
        DisconnectCode::ConnectionClosed,
        DisconnectCode::Shutdown,
        DisconnectCode::ServerError,
        DisconnectCode::Expired,
        DisconnectCode::SubExpired,
        DisconnectCode::Slow,
        DisconnectCode::WriteError,
        DisconnectCode::InsufficientState,
        DisconnectCode::ForceReconnect,
        DisconnectCode::NoPong,
        DisconnectCode::TooManyRequests,
        DisconnectCode::InvalidToken,
        DisconnectCode::BadRequest,
        DisconnectCode::Stale,
        DisconnectCode::ForceNoReconnect,
        DisconnectCode::ConnectionLimit,
        DisconnectCode::ChannelLimit,
        DisconnectCode::InappropriateProtocol,
        DisconnectCode::PermissionDenied,
        DisconnectCode::NotAvailable,
        DisconnectCode::TooManyErrors,
    ];

    /// The number on the wire (also the WebSocket close code).
    pub const fn code(self) -> u32 {
        match self {
            DisconnectCode::ConnectionClosed => 3000,
            DisconnectCode::Shutdown => 3001,
            DisconnectCode::ServerError => 3004,
            DisconnectCode::Expired => 3005,
            DisconnectCode::SubExpired => 3006,
            DisconnectCode::Slow => 3008,
            DisconnectCode::WriteError => 3009,
            DisconnectCode::InsufficientState => 3010,
            DisconnectCode::ForceReconnect => 3011,
            DisconnectCode::NoPong => 3012,
            DisconnectCode::TooManyRequests => 3013,
            DisconnectCode::InvalidToken => 3500,
            DisconnectCode::BadRequest => 3501,
            DisconnectCode::Stale => 3502,
            DisconnectCode::ForceNoReconnect => 3503,
            DisconnectCode::ConnectionLimit => 3504,
            DisconnectCode::ChannelLimit => 3505,
            DisconnectCode::InappropriateProtocol => 3506,
            DisconnectCode::PermissionDenied => 3507,
            DisconnectCode::NotAvailable => 3508,
            DisconnectCode::TooManyErrors => 3509,
        }
    }

    /// The code as a WebSocket close code.
    pub const fn close_code(self) -> u16 {
        // Every disconnect code is below 4000, so this never truncates.
        self.code() as u16
    }

    /// The reason sent with the code.
    pub const fn reason(self) -> &'static str {
        match self {
            DisconnectCode::ConnectionClosed => "connection closed",
            DisconnectCode::Shutdown => "shutdown",
            DisconnectCode::ServerError => "internal server error",
            DisconnectCode::Expired => "connection expired",
            DisconnectCode::SubExpired => "subscription expired",
            DisconnectCode::Slow => "slow",
            DisconnectCode::WriteError => "write error",
            DisconnectCode::InsufficientState => "insufficient state",
            DisconnectCode::ForceReconnect => "force reconnect",
            DisconnectCode::NoPong => "no pong",
            DisconnectCode::TooManyRequests => "too many requests",
            DisconnectCode::InvalidToken => "invalid token",
            DisconnectCode::BadRequest => "bad request",
            DisconnectCode::Stale => "stale",
            DisconnectCode::ForceNoReconnect => "force disconnect",
            DisconnectCode::ConnectionLimit => "connection limit",
            DisconnectCode::ChannelLimit => "channel limit",
            DisconnectCode::InappropriateProtocol => "inappropriate protocol",
            DisconnectCode::PermissionDenied => "permission denied",
            DisconnectCode::NotAvailable => "not available",
            DisconnectCode::TooManyErrors => "too many errors",
        }
    }

    /// Whether the client should reconnect: codes 3000–3499 yes, 3500 and above no.
    pub const fn reconnect(self) -> bool {
        disconnect_code_reconnects(self.code())
    }

    /// The code with this number, if it is a built-in one.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The `disconnect` push body for this code.
    pub fn to_disconnect(self) -> Disconnect {
        Disconnect {
            code: self.code(),
            reason: self.reason().to_owned(),
            reconnect: self.reconnect(),
        }
    }
}

impl From<DisconnectCode> for Disconnect {
    fn from(code: DisconnectCode) -> Self {
        code.to_disconnect()
    }
}

/// Whether the SDKs reconnect after a disconnect with this code (built-in or custom): below 3500.
pub const fn disconnect_code_reconnects(code: u32) -> bool {
    code < 3500
}

/// A code the server unsubscribes a client from a channel with, in an `unsubscribe` push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnsubscribeCode {
    /// 2000: an explicit server-side unsubscribe; the client does not resubscribe.
    Server,
    /// 2500: insufficient state in the channel stream; the client resubscribes and recovers.
    InsufficientState,
    /// 2501: the subscription expired; the client resubscribes with a new token.
    Expired,
}

impl UnsubscribeCode {
    /// Every unsubscribe code, in numeric order.
    pub const ALL: [UnsubscribeCode; 3] = [
        UnsubscribeCode::Server,
        UnsubscribeCode::InsufficientState,
        UnsubscribeCode::Expired,
    ];

    /// The number on the wire.
    pub const fn code(self) -> u32 {
        match self {
            UnsubscribeCode::Server => 2000,
            UnsubscribeCode::InsufficientState => 2500,
            UnsubscribeCode::Expired => 2501,
        }
    }

    /// The reason sent with the code.
    pub const fn reason(self) -> &'static str {
        match self {
            UnsubscribeCode::Server => "server unsubscribe",
            UnsubscribeCode::InsufficientState => "insufficient state",
            UnsubscribeCode::Expired => "subscription expired",
        }
    }

    /// Whether the client resubscribes by itself: codes 2500–2999.
    pub const fn resubscribe(self) -> bool {
        unsubscribe_code_resubscribes(self.code())
    }

    /// The code with this number, if it is a built-in one.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The `unsubscribe` push body for this code.
    pub fn to_unsubscribe(self) -> Unsubscribe {
        Unsubscribe {
            code: self.code(),
            reason: self.reason().to_owned(),
        }
    }
}

impl From<UnsubscribeCode> for Unsubscribe {
    fn from(code: UnsubscribeCode) -> Self {
        code.to_unsubscribe()
    }
}

/// Whether the SDKs resubscribe after an unsubscribe with this code: 2500–2999.
pub const fn unsubscribe_code_resubscribes(code: u32) -> bool {
    code >= 2500 && code < 3000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_numbered_100_to_112_in_order() {
        for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(code.code(), 100 + i as u32);
            assert_eq!(ErrorCode::from_code(code.code()), Some(code));
        }
        assert_eq!(ErrorCode::from_code(113), None);
        assert_eq!(ErrorCode::BadRequest.message(), "bad request");
        assert!(ErrorCode::Internal.temporary());
        assert!(ErrorCode::TooManyRequests.temporary());
        assert!(!ErrorCode::PermissionDenied.temporary());
        let e: Error = ErrorCode::PermissionDenied.into();
        assert_eq!(
            e,
            Error {
                code: 103,
                message: "permission denied".into(),
                temporary: false
            }
        );
    }

    #[test]
    fn disconnect_codes_reconnect_below_3500() {
        for code in DisconnectCode::ALL {
            assert_eq!(code.reconnect(), code.code() < 3500, "{code:?}");
            assert_eq!(DisconnectCode::from_code(code.code()), Some(code));
            assert_eq!(u32::from(code.close_code()), code.code());
        }
        assert_eq!(DisconnectCode::BadRequest.code(), 3501);
        assert_eq!(
            DisconnectCode::ForceNoReconnect.reason(),
            "force disconnect"
        );
        assert!(DisconnectCode::NoPong.reconnect());
        assert!(!DisconnectCode::InvalidToken.reconnect());
        assert_eq!(
            Disconnect::from(DisconnectCode::Shutdown),
            Disconnect {
                code: 3001,
                reason: "shutdown".into(),
                reconnect: true
            }
        );
        assert_eq!(DisconnectCode::from_code(3002), None);
    }

    #[test]
    fn unsubscribe_codes_resubscribe_from_2500() {
        assert!(!UnsubscribeCode::Server.resubscribe());
        assert!(UnsubscribeCode::InsufficientState.resubscribe());
        assert!(UnsubscribeCode::Expired.resubscribe());
        assert!(!unsubscribe_code_resubscribes(3000));
        assert_eq!(
            Unsubscribe::from(UnsubscribeCode::Server),
            Unsubscribe {
                code: 2000,
                reason: "server unsubscribe".into()
            }
        );
        for code in UnsubscribeCode::ALL {
            assert_eq!(UnsubscribeCode::from_code(code.code()), Some(code));
        }
    }
}
