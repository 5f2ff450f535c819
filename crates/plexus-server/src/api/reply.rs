//! Response shapes: `{"result":...}` or `{"error":{...}}`, and a batch reply
//! `{"<method>":...}` or `{"error":{...}}`.
//!
//! Results are kept as serialised JSON ([`RawJson`]) so publication data passes through byte
//! for byte, keys in the publisher's order.

use std::borrow::Cow;

use plexus_protocol::client::{ErrorCode, RawJson};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// An error in a body: `{"code":N,"message":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(super) struct ErrorBody {
    pub(super) code: u32,
    pub(super) message: Cow<'static, str>,
}

impl From<ErrorCode> for ErrorBody {
    fn from(code: ErrorCode) -> ErrorBody {
        ErrorBody {
            code: code.code(),
            message: code.message().into(),
        }
    }
}

/// What a method answered: HTTP 200 with one of these.
#[derive(Debug)]
pub(super) enum Reply {
    Result(RawJson),
    Error(ErrorBody),
}

impl Reply {
    pub(super) fn result<T: Serialize>(result: &T) -> Reply {
        match RawJson::from_value(result) {
            Ok(json) => Reply::Result(json),
            Err(error) => {
                tracing::warn!(%error, "API result did not serialize");
                Reply::Error(ErrorCode::Internal.into())
            }
        }
    }
}

impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        match self {
            Reply::Result(result) => map.serialize_entry("result", result)?,
            Reply::Error(error) => map.serialize_entry("error", error)?,
        }
        map.end()
    }
}

/// One reply of a batch: the method's result under its name, or an error.
#[derive(Debug)]
pub(super) enum BatchReply {
    Result(&'static str, RawJson),
    Error(ErrorBody),
}

impl Serialize for BatchReply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        match self {
            BatchReply::Result(method, result) => map.serialize_entry(method, result)?,
            BatchReply::Error(error) => map.serialize_entry("error", error)?,
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json<T: Serialize>(value: &T) -> String {
        serde_json::to_string(value).unwrap()
    }

    #[test]
    fn shapes() {
        let data = RawJson::from_str(r#"{"b":1,"a":2}"#).unwrap();
        assert_eq!(
            json(&Reply::Result(data.clone())),
            r#"{"result":{"b":1,"a":2}}"#
        );
        assert_eq!(
            json(&Reply::Error(ErrorCode::UnknownChannel.into())),
            r#"{"error":{"code":102,"message":"unknown channel"}}"#
        );
        assert_eq!(
            json(&BatchReply::Result("publish", data)),
            r#"{"publish":{"b":1,"a":2}}"#
        );
        assert_eq!(
            json(&BatchReply::Error(ErrorCode::NotAvailable.into())),
            r#"{"error":{"code":108,"message":"not available"}}"#
        );
    }
}
