//! [`Payload`]: a protocol `bytes` field, passed through byte for byte in either encoding.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use super::raw::RawJson;

/// The `data`, `conn_info` and `chan_info` fields: an application's payload, which the server
/// passes on unchanged.
///
/// - In the **Protobuf** encoding a payload is any bytes.
/// - In the **JSON** encoding it is one JSON value embedded as is (not base64), so a payload read
///   from JSON is always valid JSON text. Written to JSON, a payload that is not one JSON value
///   (binary data from a Protobuf client, say) becomes a JSON string holding its standard
///   base64: a JSON client always gets valid JSON.
///
/// An absent field is `None` in the `Option<Payload>` that holds it; Protobuf cannot tell an
/// absent field from an empty one, so empty bytes read as `None` there.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Payload(Bytes);

impl Payload {
    /// A payload of these bytes.
    pub fn new(bytes: impl Into<Bytes>) -> Payload {
        Payload(bytes.into())
    }

    /// Checks that `text` is one JSON value and keeps a copy of it.
    pub fn json(text: &str) -> Result<Payload, serde_json::Error> {
        RawJson::from_str(text).map(Payload::from)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The payload as one JSON value, if it is one.
    pub fn as_json(&self) -> Option<&RawValue> {
        let text = std::str::from_utf8(&self.0).ok()?;
        serde_json::from_str(text).ok()
    }

    /// Deserializes the payload as JSON.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.0)
    }
}

impl From<RawJson> for Payload {
    fn from(raw: RawJson) -> Payload {
        let text: Box<str> = Box::<RawValue>::from(raw).into();
        Payload(Bytes::from(String::from(text)))
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.as_json() {
            // A JSON message is one line (replies are joined by `\n`), so line breaks inside
            // the value, which in valid JSON can only be whitespace between tokens, become
            // spaces.
            Some(raw) if raw.get().contains(['\n', '\r']) => {
                let flat = raw.get().replace(['\n', '\r'], " ");
                RawValue::from_string(flat)
                    .map_err(serde::ser::Error::custom)?
                    .serialize(serializer)
            }
            Some(raw) => raw.serialize(serializer),
            None => serializer.serialize_str(&BASE64.encode(&self.0)),
        }
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        RawJson::deserialize(deserializer).map(Payload::from)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) => write!(f, "Payload({text})"),
            Err(_) => write!(f, "Payload({:?})", &self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_embedded_as_is_and_anything_else_as_base64() {
        let json = Payload::json(r#"{ "a" : 1 }"#).unwrap();
        assert_eq!(serde_json::to_string(&json).unwrap(), r#"{ "a" : 1 }"#);
        let binary = Payload::new(vec![0u8, 1, 2]);
        assert_eq!(serde_json::to_string(&binary).unwrap(), r#""AAEC""#);
        let text = Payload::new("not json");
        assert_eq!(serde_json::to_string(&text).unwrap(), r#""bm90IGpzb24=""#);
        assert!(Payload::json("{").is_err());
    }

    #[test]
    fn line_breaks_in_json_become_spaces() {
        let pretty = Payload::new("{\n  \"a\": \"x\\ny\"\r\n}");
        let written = serde_json::to_string(&pretty).unwrap();
        assert_eq!(written, "{   \"a\": \"x\\ny\"  }");
        let back: serde_json::Value = serde_json::from_str(&written).unwrap();
        assert_eq!(back, serde_json::json!({"a": "x\ny"}));
    }

    #[test]
    fn read_from_json_keeps_the_text() {
        let p: Payload = serde_json::from_str(r#" [1, 2] "#).unwrap();
        assert_eq!(p.as_bytes(), b"[1, 2]");
        let v: Vec<u8> = p.parse().unwrap();
        assert_eq!(v, [1, 2]);
    }
}
