//! The TCP chat listener's line protocol.
//!
//! One line (ending in `\n`, an optional `\r` before it is dropped) is one input. A line that
//! starts with `/` is a command, anything else is a message for the current room:
//!
//! | line | meaning |
//! |---|---|
//! | `/nick NAME` | change the nickname (1–32 characters, no spaces) |
//! | `/join ROOM` | leave the current room and enter `ROOM` (channel `chat:ROOM`) |
//! | `/who` | list who is in the current room |
//! | `/quit` | say goodbye and close |
//! | `/help` | list the commands |
//!
//! Messages typed over TCP are published as `NICK: TEXT`, so WebSocket clients of the same room see
//! who wrote them. Publications coming the other way are written as one line each; a binary
//! publication, which has no line form, is shown as `[binary message, N bytes]`.

use crate::channel::{validate_room, RoomError};

/// Longest nickname accepted, in characters.
pub const MAX_NICK_CHARS: usize = 32;

/// One parsed input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatLine<'a> {
    /// A blank line: nothing to do.
    Empty,
    /// Text for the current room.
    Message(&'a str),
    Nick(&'a str),
    Join(&'a str),
    Who,
    Quit,
    Help,
}

/// Why a line was refused; the listener answers `ERR <this>` and keeps the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatLineError {
    #[error("unknown command {0}; try /help")]
    UnknownCommand(String),
    #[error("usage: /nick NAME (1-{MAX_NICK_CHARS} characters, no spaces)")]
    BadNick,
    #[error("usage: /join ROOM ({0})")]
    BadRoom(RoomError),
    #[error("line is not valid UTF-8")]
    NotUtf8,
}

/// Parses one line without its terminator (a trailing `\r` is tolerated).
pub fn parse_line(raw: &[u8]) -> Result<ChatLine<'_>, ChatLineError> {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let line = std::str::from_utf8(raw).map_err(|_| ChatLineError::NotUtf8)?;
    if line.trim().is_empty() {
        return Ok(ChatLine::Empty);
    }
    let Some(command) = line.strip_prefix('/') else {
        return Ok(ChatLine::Message(line));
    };
    let (verb, argument) = match command.split_once(char::is_whitespace) {
        Some((verb, rest)) => (verb, rest.trim()),
        None => (command, ""),
    };
    match verb {
        "nick" => {
            let valid = !argument.is_empty()
                && argument.chars().count() <= MAX_NICK_CHARS
                && !argument
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control());
            if valid {
                Ok(ChatLine::Nick(argument))
            } else {
                Err(ChatLineError::BadNick)
            }
        }
        "join" => match validate_room(argument) {
            Ok(()) => Ok(ChatLine::Join(argument)),
            Err(error) => Err(ChatLineError::BadRoom(error)),
        },
        "who" => Ok(ChatLine::Who),
        "quit" => Ok(ChatLine::Quit),
        "help" => Ok(ChatLine::Help),
        _ => Err(ChatLineError::UnknownCommand(format!("/{verb}"))),
    }
}

/// Text of `/help`.
pub const HELP: &str =
    "* commands: /nick NAME, /join ROOM, /who, /quit, /help; anything else is a message\n";

/// The publication data for a message typed over TCP: `NICK: TEXT`.
pub fn message_data(nick: &str, text: &str) -> String {
    format!("{nick}: {text}")
}

/// Renders a publication as TCP chat output: each line of a text message on its own line,
/// a binary message as a one-line notice.
pub fn render_publication(data: &[u8], is_text: bool) -> Vec<u8> {
    let text = if is_text {
        std::str::from_utf8(data).ok()
    } else {
        None
    };
    match text {
        Some(text) => {
            let mut out = Vec::with_capacity(text.len() + 1);
            for line in text.split('\n') {
                out.extend_from_slice(line.strip_suffix('\r').unwrap_or(line).as_bytes());
                out.push(b'\n');
            }
            out
        }
        None => format!("[binary message, {} bytes]\n", data.len()).into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<ChatLine<'_>, ChatLineError>) {
        assert_eq!(parse_line(input.as_bytes()), expected, "input {input:?}");
    }

    #[test]
    fn parses_lines() {
        check("hello world", Ok(ChatLine::Message("hello world")));
        check("hello\r", Ok(ChatLine::Message("hello")));
        check("   ", Ok(ChatLine::Empty));
        check("/nick bob", Ok(ChatLine::Nick("bob")));
        check("/nick  bob  ", Ok(ChatLine::Nick("bob")));
        check("/nick", Err(ChatLineError::BadNick));
        check("/nick a b", Err(ChatLineError::BadNick));
        check(
            &format!("/nick {}", "x".repeat(33)),
            Err(ChatLineError::BadNick),
        );
        check("/join lobby", Ok(ChatLine::Join("lobby")));
        check("/join", Err(ChatLineError::BadRoom(RoomError::Empty)));
        check(
            "/join a:b",
            Err(ChatLineError::BadRoom(RoomError::BadCharacter)),
        );
        check("/who", Ok(ChatLine::Who));
        check("/quit", Ok(ChatLine::Quit));
        check("/help", Ok(ChatLine::Help));
        check(
            "/dance",
            Err(ChatLineError::UnknownCommand("/dance".into())),
        );
        assert_eq!(parse_line(b"\xff\xfe"), Err(ChatLineError::NotUtf8));
    }

    #[test]
    fn renders_publications() {
        assert_eq!(render_publication(b"hi", true), b"hi\n");
        assert_eq!(render_publication(b"a\r\nb", true), b"a\nb\n");
        assert_eq!(
            render_publication(&[0, 1, 2], false),
            b"[binary message, 3 bytes]\n"
        );
        assert_eq!(message_data("bob", "hi"), "bob: hi");
    }
}
