//! Strict JSON for JOSE objects (JWS headers, JWT claim sets, JWKs).
//!
//! `serde_json::Value` silently keeps the last of two members with the same
//! name, which is exactly the ambiguity RFC 7515 §4 ("Header Parameter names
//! ... MUST be unique; JWS parsers MUST either reject JWSs with duplicate
//! Header Parameter names or ...") and RFC 7519 §4 (claim names "MUST be
//! unique ... JWT parsers MUST either reject JWTs with duplicate Claim Names")
//! warn about; we take the "reject" branch. Parsing also caps the nesting
//! depth (serde_json's own recursion limit is 128; ours is far lower), so a
//! hostile document can neither confuse two parsers nor cost much to read.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Deepest nesting accepted (the top-level object is depth 1). A JWKS is
/// depth 3 (`{"keys":[{...}]}`) plus arrays inside a key; a token's `cnf.jwk`
/// is depth 3.
pub(crate) const MAX_DEPTH: usize = 16;

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JsonError {
    /// Not JSON at all (or not UTF-8, or trailing bytes).
    Syntax(String),
    /// Valid JSON, but the top level is not an object.
    NotObject,
    /// An object has this member name twice (at any depth).
    Duplicate(String),
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::Syntax(e) => write!(f, "invalid JSON: {e}"),
            JsonError::NotObject => f.write_str("valid JSON but not an object"),
            JsonError::Duplicate(name) => {
                write!(f, "the member {} appears more than once", super::clip(name))
            }
            JsonError::TooDeep => write!(f, "nested deeper than {MAX_DEPTH} levels"),
        }
    }
}

/// Parses `bytes` as one JSON object, refusing duplicate member names at any
/// depth, nesting deeper than [`MAX_DEPTH`], and anything after the object.
/// The caller bounds `bytes.len()`.
pub(crate) fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, JsonError> {
    let fail = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = Strict {
        depth: 1,
        fail: &fail,
    }
    .deserialize(&mut de)
    .and_then(|value| de.end().map(|()| value));
    match parsed {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(JsonError::NotObject),
        Err(e) => Err(fail
            .into_inner()
            .unwrap_or_else(|| JsonError::Syntax(e.to_string()))),
    }
}

/// A seed that builds a `Value` while checking depth and duplicates; the
/// precise failure goes into `fail` (serde errors are only strings).
#[derive(Clone, Copy)]
struct Strict<'a> {
    depth: usize,
    fail: &'a RefCell<Option<JsonError>>,
}

impl Strict<'_> {
    fn nested(self) -> Self {
        Strict {
            depth: self.depth + 1,
            fail: self.fail,
        }
    }

    fn refuse<E: de::Error>(self, why: JsonError) -> E {
        let message = why.to_string();
        self.fail.borrow_mut().get_or_insert(why);
        E::custom(message)
    }

    fn enter<E: de::Error>(self) -> Result<(), E> {
        if self.depth > MAX_DEPTH {
            Err(self.refuse(JsonError::TooDeep))
        } else {
            Ok(())
        }
    }
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number is not finite"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.enter()?;
        // No size_hint-based preallocation: the input bounds the growth.
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.nested())? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut map = Map::new();
        while let Some(name) = access.next_key::<String>()? {
            // RFC 7515 §4 / RFC 7519 §4 / RFC 7517 §4: member names unique.
            if map.contains_key(&name) {
                return Err(self.refuse(JsonError::Duplicate(name)));
            }
            let value = access.next_value_seed(self.nested())?;
            map.insert(name, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_parse() {
        let map = parse_object(br#" {"a":1,"b":[true,null,"x",-2,1.5],"c":{"d":{}}} "#).unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map["b"][3], Value::from(-2));
    }

    #[test]
    fn duplicates_are_refused_at_any_depth() {
        assert_eq!(
            parse_object(br#"{"a":1,"a":2}"#),
            Err(JsonError::Duplicate("a".into()))
        );
        // Escapes are decoded before comparing: "\u0061" is "a".
        assert_eq!(
            parse_object(br#"{"a":1,"\u0061":2}"#),
            Err(JsonError::Duplicate("a".into()))
        );
        assert_eq!(
            parse_object(br#"{"x":[{"k":1,"k":1}]}"#),
            Err(JsonError::Duplicate("k".into()))
        );
    }

    #[test]
    fn non_objects_and_garbage_are_refused() {
        assert_eq!(parse_object(b"[1]"), Err(JsonError::NotObject));
        assert_eq!(parse_object(b"\"s\""), Err(JsonError::NotObject));
        assert!(matches!(parse_object(b"{"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_object(b"{} {}"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_object(b""), Err(JsonError::Syntax(_))));
        assert!(matches!(
            parse_object(b"{\"a\":\"\xff\"}"),
            Err(JsonError::Syntax(_))
        ));
    }

    #[test]
    fn depth_is_capped() {
        let ok = format!(
            "{}1{}",
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        assert!(parse_object(format!("{{\"a\":{ok}}}").as_bytes()).is_ok());
        let deep = format!("{}1{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(
            parse_object(format!("{{\"a\":{deep}}}").as_bytes()),
            Err(JsonError::TooDeep)
        );
        // Far beyond serde_json's own limit: still a clean error, no overflow.
        let abyss = "[".repeat(100_000);
        assert_eq!(
            parse_object(format!("{{\"a\":{abyss}").as_bytes()),
            Err(JsonError::TooDeep)
        );
    }
}
