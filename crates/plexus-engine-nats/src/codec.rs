//! Subject tokens for channel names; the bytes nodes exchange are `plexus_core::envelope`'s
//! (shared with every broker engine): delivery envelopes on `{prefix}.pub.{token}`, client
//! descriptors in presence, node commands on `{prefix}.control`.

use base64::Engine as _;

pub use plexus_core::envelope::*;

/// One subject token (and key-value key) for any name: URL-safe base64 without padding, so
/// `.`, `*`, `>` and spaces in channel names are never subject syntax. The empty name, whose
/// base64 would be an empty token, is `-` (no other name encodes to one character).
pub fn token(name: &str) -> String {
    if name.is_empty() {
        return "-".to_owned();
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name.as_bytes())
}

/// The name a [`token`] stands for.
pub fn untoken(token: &str) -> Option<String> {
    if token == "-" {
        return Some(String::new());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_one_safe_subject_token() {
        for name in ["chat:a", "a.b", "*", ">", "with space", "ünï", "", "x"] {
            let token = token(name);
            assert!(!token.is_empty());
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{name:?} → {token:?}"
            );
            assert_eq!(untoken(&token).as_deref(), Some(name));
        }
        assert_ne!(token("a.b"), token("a_b"));
        assert_eq!(untoken("!"), None);
    }
}
