//! JSON read strictly: a value whose objects each name a key once.
//!
//! RFC 8259 (section 4) leaves an object with a key given twice to the
//! parser: serde_json keeps the last, other parsers the first or refuse
//! it. A request read one way by a gateway that checks it and another way
//! by the host would let the check be passed by a request that means
//! something else here, so a request's JSON is read with [`Unique`], which
//! refuses a repeated key anywhere in it, as I-JSON (RFC 7493, section
//! 2.3) asks.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::protocol::shown_id;

/// Reads a [`Value`], refusing an object that names a key twice.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Unique;

impl<'de> DeserializeSeed<'de> for Unique {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// Reads an array of [`Unique`] values.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct UniqueArray;

impl<'de> DeserializeSeed<'de> for UniqueArray {
    type Value = Vec<Value>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Vec<Value>, D::Error> {
        struct Items;
        impl<'de> Visitor<'de> for Items {
            type Value = Vec<Value>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<Value>, A::Error> {
                items(seq)
            }
        }
        d.deserialize_seq(Items)
    }
}

/// Reads an object of [`Unique`] values, itself naming each key once.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct UniqueObject;

impl<'de> DeserializeSeed<'de> for UniqueObject {
    type Value = Map<String, Value>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Map<String, Value>, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Map<String, Value>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Map<String, Value>, A::Error> {
                entries(map)
            }
        }
        d.deserialize_map(Entries)
    }
}

fn items<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Vec<Value>, A::Error> {
    // As serde does, never more room ahead than a small bound: the size
    // hint comes from the input.
    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
    while let Some(v) = seq.next_element_seed(Unique)? {
        out.push(v);
    }
    Ok(out)
}

fn entries<'de, A: MapAccess<'de>>(mut map: A) -> Result<Map<String, Value>, A::Error> {
    let mut out = Map::new();
    while let Some(key) = map.next_key::<String>()? {
        if out.contains_key(&key) {
            return Err(de::Error::custom(format_args!(
                "the key `{}` is given twice in one object",
                shown_id(&key)
            )));
        }
        let value = map.next_value_seed(Unique)?;
        out.insert(key, value);
    }
    Ok(out)
}

impl<'de> Visitor<'de> for Unique {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // JSON text has no NaN or infinity; a number too large for f64 is
        // refused by the parser before it gets here.
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number JSON cannot hold"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        items(seq).map(Value::Array)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        entries(map).map(Value::Object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(text: &str) -> Result<Value, serde_json::Error> {
        Unique.deserialize(&mut serde_json::Deserializer::from_str(text))
    }

    #[test]
    fn values_read_as_serde_json_reads_them() {
        for text in [
            "null",
            "true",
            "-7",
            "18446744073709551615",
            "-9223372036854775808",
            "1.5e300",
            "-3.043388641313571e238",
            "0.1",
            r#""a\u00e9\n""#,
            r#"[1, [2, {"a": [3, {}]}], "x", null]"#,
            r#"{"b": 1, "a": {"c": [true, false]}}"#,
        ] {
            let strict = read(text).unwrap();
            let loose: Value = serde_json::from_str(text).unwrap();
            assert_eq!(strict, loose, "{text}");
            if let (Some(a), Some(b)) = (strict.as_f64(), loose.as_f64()) {
                assert_eq!(a.to_bits(), b.to_bits(), "{text}");
            }
        }
    }

    #[test]
    fn a_key_given_twice_is_refused_at_any_depth() {
        for text in [
            r#"{"a": 1, "a": 2}"#,
            r#"[{"a": 1, "b": 2, "a": 1}]"#,
            r#"{"x": [{"y": {"k": 1, "k": 1}}]}"#,
            r#"{"\u0061": 1, "a": 2}"#,
        ] {
            let e = read(text).unwrap_err().to_string();
            assert!(e.contains("given twice in one object"), "{text}: {e}");
        }
        // The same key in different objects is fine.
        assert_eq!(
            read(r#"[{"a": 1}, {"a": 2}]"#).unwrap(),
            json!([{"a": 1}, {"a": 2}])
        );
    }
}
