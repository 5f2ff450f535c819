//! Close codes (RFC 6455 §7.4) that Plexus sends, and the rule for codes a peer may send.

/// Normal closure.
pub const NORMAL: u16 = 1000;
/// The server is going away (shutdown).
pub const GOING_AWAY: u16 = 1001;
/// The peer broke the protocol.
pub const PROTOCOL_ERROR: u16 = 1002;
/// Text that is not UTF-8, or a corrupt compressed message.
pub const INVALID_PAYLOAD: u16 = 1007;
/// Policy violation (limits, missing heartbeats).
pub const POLICY: u16 = 1008;
/// A message larger than the configured maximum.
pub const TOO_BIG: u16 = 1009;
/// The server hit an unexpected condition.
pub const INTERNAL: u16 = 1011;
/// The connection could not keep up with its messages (Centrifugo's "slow").
pub const SLOW: u16 = 3008;

/// Whether a peer may put `code` in a close frame (RFC 6455 §7.4.1–2).
pub fn is_valid_received(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    #[test]
    fn received_codes() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999,
        ] {
            assert!(super::is_valid_received(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1012, 1015, 2999, 5000] {
            assert!(!super::is_valid_received(code), "{code}");
        }
    }
}
