//! Channel names as clients spell them.
//!
//! A channel is `namespace:name`. The seed-compatible raw chat endpoint `/chat/{room}` and the TCP
//! chat's `/join ROOM` both map a room to the channel `chat:{room}`, so every kind of client meets
//! in the same place.

/// Namespace that raw chat rooms live in.
pub const CHAT_NAMESPACE: &str = "chat";

/// Longest room name accepted, in bytes.
pub const MAX_ROOM_LEN: usize = 64;

/// Why a room name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("room name is empty")]
    Empty,
    #[error("room name is longer than {MAX_ROOM_LEN} bytes")]
    TooLong,
    #[error("room name may contain only letters, digits, '-', '_' and '.'")]
    BadCharacter,
}

/// Checks a room name: 1 to 64 of `A-Z a-z 0-9 - _ .`.
pub fn validate_room(room: &str) -> Result<(), RoomError> {
    if room.is_empty() {
        return Err(RoomError::Empty);
    }
    if room.len() > MAX_ROOM_LEN {
        return Err(RoomError::TooLong);
    }
    if !room
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(RoomError::BadCharacter);
    }
    Ok(())
}

/// The channel that holds a chat room: `chat:{room}`.
pub fn room_channel(room: &str) -> Result<String, RoomError> {
    validate_room(room)?;
    Ok(format!("{CHAT_NAMESPACE}:{room}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms() {
        assert_eq!(room_channel("lobby").as_deref(), Ok("chat:lobby"));
        assert_eq!(room_channel("a-b_c.9").as_deref(), Ok("chat:a-b_c.9"));
        assert_eq!(room_channel(""), Err(RoomError::Empty));
        assert_eq!(room_channel("a b"), Err(RoomError::BadCharacter));
        assert_eq!(room_channel("a:b"), Err(RoomError::BadCharacter));
        assert_eq!(room_channel(&"x".repeat(65)), Err(RoomError::TooLong));
    }
}
