//! [`RawJson`]: a protocol `bytes` field, which the JSON encoding embeds as a JSON value.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One JSON value kept as its exact text: the `data`, `info`, `conn_info` and `chan_info` fields.
///
/// In the JSON encoding of the protocol a `bytes` field holds a JSON value embedded as is (not
/// base64), so a client's payload is passed through byte for byte: what a publisher sends is what
/// subscribers receive. The text is always one valid JSON value; an absent field is `None` in the
/// `Option<RawJson>` that holds it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

impl RawJson {
    /// Checks that `text` is one JSON value and keeps it as is (surrounding whitespace included).
    pub fn from_string(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(RawJson)
    }

    /// Checks that `text` is one JSON value and keeps a copy of it.
    #[allow(clippy::should_implement_trait)] // fallible and named like serde_json's
    pub fn from_str(text: &str) -> Result<Self, serde_json::Error> {
        Self::from_string(text.to_owned())
    }

    /// Serializes `value` to compact JSON.
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(RawJson)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The JSON text as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.get().as_bytes()
    }

    /// Deserializes the value.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }
}

impl PartialEq for RawJson {
    /// Equal when the texts are identical (so `{"a":1}` and `{ "a": 1 }` differ).
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RawJson {}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RawJson({})", self.as_str())
    }
}

impl fmt::Display for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Box<RawValue>> for RawJson {
    fn from(raw: Box<RawValue>) -> Self {
        RawJson(raw)
    }
}

impl From<RawJson> for Box<RawValue> {
    fn from(raw: RawJson) -> Self {
        raw.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_text_exactly_and_rejects_invalid_json() {
        let raw = RawJson::from_str(r#"{ "text" : "hi" }"#).unwrap();
        assert_eq!(raw.as_str(), r#"{ "text" : "hi" }"#);
        assert_eq!(serde_json::to_string(&raw).unwrap(), r#"{ "text" : "hi" }"#);
        assert!(RawJson::from_str("{").is_err());
        assert!(RawJson::from_str("1 2").is_err());
        assert_eq!(
            RawJson::from_value(&[1, 2]).unwrap(),
            RawJson::from_str("[1,2]").unwrap()
        );
        let v: Vec<u8> = RawJson::from_str("[3]").unwrap().parse().unwrap();
        assert_eq!(v, [3]);
    }
}
