//! JSON <-> component values: the one mapping between WIT types and JSON.
//!
//! `docs/values.md` is the table a caller reads; this module is its
//! implementation. Conversion is driven by the WIT type, so every value is
//! checked against what the function declares: integers are range-checked,
//! `char` is one scalar, records must have exactly their fields. Errors name
//! the path to the offending value (`p.label`, `xs[3]`) and the expected type.

use std::fmt;

use serde_json::{Map, Number, Value};
use wasmtime::component::{Type, Val};

use super::signature::type_name;

/// A value that does not fit its WIT type: where, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mismatch {
    /// Path from the parameter to the value, e.g. `p.label` or `xs[3]`.
    pub path: String,
    /// What was wrong.
    pub message: String,
}

fn mismatch(path: &Path<'_>, ty: &Type, got: &Value) -> Mismatch {
    Mismatch {
        path: path.to_string(),
        message: format!("expected {}, got {}", type_name(ty), describe_json(got)),
    }
}

fn describe_json(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 40 {
        let short: String = text.chars().take(37).collect();
        format!("{short}...")
    } else {
        text
    }
}

/// Whether the JSON form of `ty` can be `null`, which decides whether an
/// `option` around it needs the `{"some": ...}` wrapper to stay unambiguous.
fn can_be_null(ty: &Type) -> bool {
    matches!(ty, Type::Option(_))
}

/// Where a value is in the arguments (`p.label`, `xs[3]`): made into text
/// only for an error, so binding allocates nothing for it.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root(&'a str),
    Index(&'a Path<'a>, usize),
    Field(&'a Path<'a>, &'a str),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root(name) => f.write_str(name),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
            Path::Field(parent, name) => write!(f, "{parent}.{name}"),
        }
    }
}

/// Most values one call's arguments may become, an absent optional field
/// counting two (its `none` and its name) and one more per
/// [`NAME_BYTES_PER_VALUE`] bytes of its name: twice what a 4 MiB request
/// of small numbers makes. A record type of many optional fields would
/// otherwise make each `{}` in a request thousands of values, and one of
/// long field names (a plugin's type may name a field in 100,000 bytes)
/// gigabytes of names.
pub(crate) const MAX_BOUND_VALUES: usize = 1 << 22;

/// Bytes of an absent optional field's name that count as one value: its
/// name is copied into the value made for it, though the request holds
/// nothing of it.
const NAME_BYTES_PER_VALUE: usize = 16;

/// Names of an enum, flags or variant type looked past to find the one a
/// value names that count as one value made. The names are compared one
/// by one, outside the call's fuel and deadline: a type of thousands of
/// names would otherwise have a request of its last name cost billions of
/// comparisons. The types of ordinary plugins (a few dozen names) count
/// nothing more.
const NAMES_LOOKED_PAST_PER_VALUE: usize = 64;

/// Values made so far for one call's arguments: one for all of them.
#[derive(Default)]
pub(crate) struct Made(usize);

impl Made {
    fn add(&mut self, values: usize, path: &Path<'_>) -> Result<(), Mismatch> {
        self.0 += values;
        if self.0 > MAX_BOUND_VALUES {
            return Err(Mismatch {
                path: path.to_string(),
                message: format!(
                    "the arguments make more than {MAX_BOUND_VALUES} values \
                     (an absent optional field counts two and one per \
                     {NAME_BYTES_PER_VALUE} bytes of its name, a name of an \
                     enum, flags or variant one per \
                     {NAMES_LOOKED_PAST_PER_VALUE} names before it)"
                ),
            });
        }
        Ok(())
    }
}

/// Converts JSON to a value of type `ty`, `path` naming it in errors, the
/// values made counted in `made` (one for all of a call's arguments).
pub(crate) fn from_json_counted(
    ty: &Type,
    json: &Value,
    path: &str,
    made: &mut Made,
) -> Result<Val, Mismatch> {
    bind(ty, json, &Path::Root(path), made)
}

fn bind(ty: &Type, json: &Value, path: &Path<'_>, made: &mut Made) -> Result<Val, Mismatch> {
    made.add(1, path)?;
    let err = || mismatch(path, ty, json);
    Ok(match ty {
        Type::Bool => Val::Bool(json.as_bool().ok_or_else(err)?),
        Type::S8 => Val::S8(
            signed(json)
                .and_then(|v| v.try_into().ok())
                .ok_or_else(err)?,
        ),
        Type::S16 => Val::S16(
            signed(json)
                .and_then(|v| v.try_into().ok())
                .ok_or_else(err)?,
        ),
        Type::S32 => Val::S32(
            signed(json)
                .and_then(|v| v.try_into().ok())
                .ok_or_else(err)?,
        ),
        Type::S64 => Val::S64(signed(json).ok_or_else(err)?),
        Type::U8 => Val::U8(
            json.as_u64()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(err)?,
        ),
        Type::U16 => Val::U16(
            json.as_u64()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(err)?,
        ),
        Type::U32 => Val::U32(
            json.as_u64()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(err)?,
        ),
        Type::U64 => Val::U64(json.as_u64().ok_or_else(err)?),
        Type::Float32 => {
            let v = float(json).ok_or_else(err)?;
            // Too large, or so small it would be 0 (a subnormal f32 is
            // kept): out of range either way, not silently changed.
            if v.is_finite() && ((v as f32).is_infinite() || (v != 0.0 && v as f32 == 0.0)) {
                return Err(Mismatch {
                    path: path.to_string(),
                    message: format!("{v} is out of range for f32"),
                });
            }
            Val::Float32(v as f32)
        }
        Type::Float64 => Val::Float64(float(json).ok_or_else(err)?),
        Type::Char => {
            let s = json.as_str().ok_or_else(err)?;
            let mut chars = s.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => Val::Char(c),
                _ => {
                    return Err(Mismatch {
                        path: path.to_string(),
                        message: format!(
                            "expected char (exactly one Unicode scalar value), got {}",
                            describe_json(json)
                        ),
                    });
                }
            }
        }
        Type::String => Val::String(json.as_str().ok_or_else(err)?.to_string()),
        Type::List(list) => {
            let items = json.as_array().ok_or_else(err)?;
            let elem = list.ty();
            let mut out = Vec::with_capacity(items.len());
            for (i, v) in items.iter().enumerate() {
                out.push(bind(&elem, v, &Path::Index(path, i), made)?);
            }
            Val::List(out)
        }
        Type::FixedLengthList(list) => {
            let items = json.as_array().ok_or_else(err)?;
            if items.len() != list.len() as usize {
                return Err(err());
            }
            let elem = list.ty();
            let mut out = Vec::with_capacity(items.len());
            for (i, v) in items.iter().enumerate() {
                out.push(bind(&elem, v, &Path::Index(path, i), made)?);
            }
            Val::FixedLengthList(out)
        }
        Type::Map(map) => {
            let (kt, vt) = (map.key(), map.value());
            let mut out = Vec::new();
            match json {
                Value::Object(obj) if kt == Type::String => {
                    for (k, v) in obj {
                        made.add(1, path)?;
                        out.push((
                            Val::String(k.clone()),
                            bind(&vt, v, &Path::Field(path, k), made)?,
                        ));
                    }
                }
                Value::Array(pairs) => {
                    for (i, pair) in pairs.iter().enumerate() {
                        let p = Path::Index(path, i);
                        match pair.as_array().map(Vec::as_slice) {
                            Some([k, v]) => out.push((
                                bind(&kt, k, &Path::Index(&p, 0), made)?,
                                bind(&vt, v, &Path::Index(&p, 1), made)?,
                            )),
                            _ => {
                                return Err(Mismatch {
                                    path: p.to_string(),
                                    message: format!(
                                        "expected a [key, value] pair, got {}",
                                        describe_json(pair)
                                    ),
                                });
                            }
                        }
                    }
                }
                _ => return Err(err()),
            }
            Val::Map(out)
        }
        Type::Tuple(tuple) => {
            let items = json.as_array().ok_or_else(err)?;
            let types: Vec<Type> = tuple.types().collect();
            if items.len() != types.len() {
                return Err(err());
            }
            let mut out = Vec::with_capacity(items.len());
            for (i, (t, v)) in types.iter().zip(items).enumerate() {
                out.push(bind(t, v, &Path::Index(path, i), made)?);
            }
            Val::Tuple(out)
        }
        Type::Record(record) => {
            let obj = json.as_object().ok_or_else(err)?;
            let mut fields = Vec::new();
            let mut given = 0;
            for field in record.fields() {
                let p = Path::Field(path, field.name);
                match obj.get(field.name) {
                    Some(v) => {
                        given += 1;
                        fields.push((field.name.to_string(), bind(&field.ty, v, &p, made)?))
                    }
                    // An absent optional field is `none`: records grow
                    // optional fields without breaking old callers.
                    None if matches!(field.ty, Type::Option(_)) => {
                        made.add(2 + field.name.len() / NAME_BYTES_PER_VALUE, &p)?;
                        fields.push((field.name.to_string(), Val::Option(None)))
                    }
                    None => {
                        return Err(Mismatch {
                            path: p.to_string(),
                            message: format!("missing field of type {}", type_name(&field.ty)),
                        });
                    }
                }
            }
            // Looked for only when there is one: a key per field, each
            // compared with every field, is a type's width squared.
            if given < obj.len()
                && let Some(extra) = obj
                    .keys()
                    .find(|k| !record.fields().any(|f| f.name == k.as_str()))
            {
                // A key as long as the request: shown cut, as an id is.
                let extra = crate::protocol::shown_id(extra);
                return Err(Mismatch {
                    path: Path::Field(path, &extra).to_string(),
                    message: format!("unknown field for {}", type_name(ty)),
                });
            }
            Val::Record(fields)
        }
        Type::Variant(variant) => {
            let (name, payload) = single_key(json).ok_or_else(err)?;
            let (past, case) = variant
                .cases()
                .enumerate()
                .find(|(_, c)| c.name == name)
                .ok_or_else(|| Mismatch {
                    path: path.to_string(),
                    message: format!(
                        "unknown case `{}` for {}",
                        crate::protocol::shown_id(name),
                        type_name(ty)
                    ),
                })?;
            made.add(past / NAMES_LOOKED_PAST_PER_VALUE, path)?;
            let payload = match (&case.ty, payload) {
                (None, None | Some(Value::Null)) => None,
                (Some(t), Some(v)) => Some(Box::new(bind(t, v, &Path::Field(path, name), made)?)),
                _ => return Err(err()),
            };
            Val::Variant(name.to_string(), payload)
        }
        Type::Enum(e) => {
            let name = json.as_str().ok_or_else(err)?;
            let past = e.names().position(|n| n == name).ok_or_else(err)?;
            made.add(past / NAMES_LOOKED_PAST_PER_VALUE, path)?;
            Val::Enum(name.to_string())
        }
        Type::Flags(flags) => {
            let items = json.as_array().ok_or_else(err)?;
            let mut set = Vec::new();
            for item in items {
                let name = item.as_str().ok_or_else(err)?;
                let past = flags
                    .names()
                    .position(|n| n == name)
                    .ok_or_else(|| Mismatch {
                        path: path.to_string(),
                        message: format!(
                            "unknown flag `{}` for {}",
                            crate::protocol::shown_id(name),
                            type_name(ty)
                        ),
                    })?;
                made.add(past / NAMES_LOOKED_PAST_PER_VALUE, path)?;
                if !set.iter().any(|s: &String| s == name) {
                    set.push(name.to_string());
                }
            }
            Val::Flags(set)
        }
        Type::Option(opt) => {
            let inner = opt.ty();
            match json {
                Value::Null => Val::Option(None),
                _ if can_be_null(&inner) => {
                    let obj = json.as_object().filter(|o| o.len() == 1).ok_or_else(err)?;
                    let v = obj.get("some").ok_or_else(err)?;
                    Val::Option(Some(Box::new(bind(&inner, v, path, made)?)))
                }
                _ => Val::Option(Some(Box::new(bind(&inner, json, path, made)?))),
            }
        }
        Type::Result(result) => {
            let (name, payload) = single_key(json).ok_or_else(err)?;
            let side = match name {
                "ok" => result.ok(),
                "err" => result.err(),
                _ => return Err(err()),
            };
            let value = match (side, payload) {
                (None, None | Some(Value::Null)) => None,
                (Some(t), Some(v)) => Some(Box::new(bind(&t, v, &Path::Field(path, name), made)?)),
                _ => return Err(err()),
            };
            Val::Result(if name == "ok" { Ok(value) } else { Err(value) })
        }
        Type::Own(_) | Type::Borrow(_) | Type::Future(_) | Type::Stream(_) | Type::ErrorContext => {
            return Err(Mismatch {
                path: path.to_string(),
                message: format!("{} has no JSON form", type_name(ty)),
            });
        }
    })
}

/// `{"name": payload}` (payload may be absent for a bare `"name"` string).
fn single_key(json: &Value) -> Option<(&str, Option<&Value>)> {
    match json {
        Value::String(s) => Some((s.as_str(), None)),
        Value::Object(obj) if obj.len() == 1 => {
            let (k, v) = obj.iter().next()?;
            Some((k.as_str(), Some(v)))
        }
        _ => None,
    }
}

fn signed(json: &Value) -> Option<i64> {
    json.as_i64()
}

fn float(json: &Value) -> Option<f64> {
    match json {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

fn float_json(v: f64) -> Value {
    match Number::from_f64(v) {
        Some(n) => Value::Number(n),
        None if v.is_nan() => Value::String("NaN".into()),
        None if v > 0.0 => Value::String("Infinity".into()),
        None => Value::String("-Infinity".into()),
    }
}

/// Bytes a JSON value is allowed to take, spent as it is built.
pub(crate) struct Budget {
    left: usize,
}

/// The result did not fit the result size cap.
#[derive(Debug)]
pub(crate) struct TooLarge;

impl Budget {
    pub(crate) fn new(bytes: usize) -> Self {
        Budget { left: bytes }
    }

    pub(crate) fn spend(&mut self, bytes: usize) -> Result<(), TooLarge> {
        self.left = self.left.checked_sub(bytes).ok_or(TooLarge)?;
        Ok(())
    }
}

/// What [`to_json`] counts for each value, besides a string's bytes.
const VALUE_BYTES: usize = 8;

/// The longest text of a float in JSON (`-2.2250738585072014e-308`).
const FLOAT_BYTES: usize = 24;

/// The bytes of `s` as a JSON string: quotes and escapes counted (a
/// control character is 6 bytes, `\u0001`).
pub(crate) fn json_string_bytes(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// The bytes of `key` as an object's key: the JSON string and its `:`.
/// (The braces and the comma after the entry are the value's own
/// [`VALUE_BYTES`].)
fn key_bytes(key: &str) -> usize {
    json_string_bytes(key) + 1
}

/// The `null` of a case without a payload (`{"ok":null}`), which has no
/// value of its own to be counted.
fn null(budget: &mut Budget) -> Result<Value, TooLarge> {
    budget.spend(4)?;
    Ok(Value::Null)
}

/// Least host memory a guest may have the host take from it at once.
const MIN_LIFT_BYTES: usize = 16 << 20;

/// The most host memory a guest may have the host take from it at once
/// (a call's result as it is lifted, or the arguments of one of its
/// calls to the host), for a result cap of `result_bytes`: what lifting
/// the largest result that cap lets through takes (every value is a
/// whole [`Val`] on the host, though a `list<u8>` element is one byte in
/// the guest), and at least [`MIN_LIFT_BYTES`]. wasmtime refuses a
/// transfer over it before allocating it; without it, it allows 128 MiB,
/// whatever the plugin's limits, refusing results its cap lets through
/// (a cap over 25 MiB) and lifting 128 MiB of values for results its cap
/// refuses afterwards.
pub(crate) fn lift_bytes(result_bytes: usize) -> usize {
    (result_bytes / VALUE_BYTES)
        .saturating_mul(size_of::<Val>())
        .saturating_add(result_bytes)
        .max(MIN_LIFT_BYTES)
}

/// Converts a value of type `ty` to JSON, failing once the encoded size
/// would exceed `budget` (estimated: exact for strings, a small constant
/// for scalars and punctuation).
pub(crate) fn to_json(ty: &Type, val: &Val, budget: &mut Budget) -> Result<Value, TooLarge> {
    budget.spend(VALUE_BYTES)?;
    // A number's text beyond what every value is counted (up to 20 digits
    // and a sign; a float up to 24 characters).
    let digits = |n: u64, negative: bool| -> usize {
        n.checked_ilog10().map_or(1, |d| d as usize + 1) + usize::from(negative)
    };
    let mut number = |len: usize| budget.spend(len.saturating_sub(VALUE_BYTES));
    match val {
        Val::S64(v) => number(digits(v.unsigned_abs(), *v < 0))?,
        Val::U64(v) => number(digits(*v, false))?,
        Val::S32(v) => number(digits(u64::from(v.unsigned_abs()), *v < 0))?,
        Val::U32(v) => number(digits(u64::from(*v), false))?,
        Val::Float32(_) | Val::Float64(_) => number(FLOAT_BYTES)?,
        _ => {}
    }
    Ok(match (ty, val) {
        (_, Val::Bool(b)) => Value::Bool(*b),
        (_, Val::S8(v)) => Value::from(*v),
        (_, Val::S16(v)) => Value::from(*v),
        (_, Val::S32(v)) => Value::from(*v),
        (_, Val::S64(v)) => Value::from(*v),
        (_, Val::U8(v)) => Value::from(*v),
        (_, Val::U16(v)) => Value::from(*v),
        (_, Val::U32(v)) => Value::from(*v),
        (_, Val::U64(v)) => Value::from(*v),
        (_, Val::Float32(v)) => float_json(f64::from(*v)),
        (_, Val::Float64(v)) => float_json(*v),
        (_, Val::Char(c)) => {
            budget.spend(json_string_bytes(c.encode_utf8(&mut [0; 4])))?;
            Value::String(c.to_string())
        }
        (_, Val::String(s)) => {
            budget.spend(json_string_bytes(s))?;
            Value::String(s.clone())
        }
        (Type::List(l), Val::List(items)) => {
            let t = l.ty();
            Value::Array(list_json(&t, items, budget)?)
        }
        (Type::FixedLengthList(l), Val::FixedLengthList(items)) => {
            let t = l.ty();
            Value::Array(list_json(&t, items, budget)?)
        }
        (Type::Map(m), Val::Map(pairs)) => {
            let (kt, vt) = (m.key(), m.value());
            if kt == Type::String {
                let mut obj = Map::new();
                for (k, v) in pairs {
                    if let Val::String(k) = k {
                        budget.spend(key_bytes(k))?;
                        obj.insert(k.clone(), to_json(&vt, v, budget)?);
                    }
                }
                Value::Object(obj)
            } else {
                let mut out = Vec::with_capacity(pairs.len());
                for (k, v) in pairs {
                    out.push(Value::Array(vec![
                        to_json(&kt, k, budget)?,
                        to_json(&vt, v, budget)?,
                    ]));
                }
                Value::Array(out)
            }
        }
        (Type::Tuple(t), Val::Tuple(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (t, v) in t.types().zip(items) {
                out.push(to_json(&t, v, budget)?);
            }
            Value::Array(out)
        }
        (Type::Record(r), Val::Record(fields)) => {
            let mut obj = Map::new();
            for (field, (name, v)) in r.fields().zip(fields) {
                budget.spend(key_bytes(name))?;
                obj.insert(name.clone(), to_json(&field.ty, v, budget)?);
            }
            Value::Object(obj)
        }
        (Type::Variant(var), Val::Variant(name, payload)) => {
            let case_ty = var.cases().find(|c| c.name == name).and_then(|c| c.ty);
            let inner = match (case_ty, payload) {
                (Some(t), Some(p)) => to_json(&t, p, budget)?,
                _ => null(budget)?,
            };
            budget.spend(key_bytes(name))?;
            let mut obj = Map::new();
            obj.insert(name.clone(), inner);
            Value::Object(obj)
        }
        (_, Val::Enum(name)) => {
            budget.spend(json_string_bytes(name))?;
            Value::String(name.clone())
        }
        (Type::Flags(flags), Val::Flags(set)) => {
            let mut names = Vec::new();
            for n in flags.names().filter(|n| set.iter().any(|s| s == n)) {
                // `"name",` for each flag set.
                budget.spend(n.len() + 3)?;
                names.push(Value::String(n.to_string()));
            }
            Value::Array(names)
        }
        (Type::Option(_), Val::Option(None)) => Value::Null,
        (Type::Option(o), Val::Option(Some(v))) => {
            let inner = o.ty();
            let json = to_json(&inner, v, budget)?;
            if can_be_null(&inner) {
                budget.spend(key_bytes("some"))?;
                let mut obj = Map::new();
                obj.insert("some".into(), json);
                Value::Object(obj)
            } else {
                json
            }
        }
        (Type::Result(r), Val::Result(v)) => {
            let (name, side, payload) = match v {
                Ok(p) => ("ok", r.ok(), p),
                Err(p) => ("err", r.err(), p),
            };
            let inner = match (side, payload) {
                (Some(t), Some(p)) => to_json(&t, p, budget)?,
                _ => null(budget)?,
            };
            budget.spend(key_bytes(name))?;
            let mut obj = Map::new();
            obj.insert(name.into(), inner);
            Value::Object(obj)
        }
        // Types without a JSON form are refused when the plugin loads, and
        // lifted values always match their type, so nothing else arrives.
        _ => Value::Null,
    })
}

fn list_json(ty: &Type, items: &[Val], budget: &mut Budget) -> Result<Vec<Value>, TooLarge> {
    let mut out = Vec::with_capacity(items.len());
    for v in items {
        out.push(to_json(ty, v, budget)?);
    }
    Ok(out)
}

/// A default value of type `ty`, used to size the results slice before a call.
pub(crate) fn placeholder() -> Val {
    Val::Bool(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_host_takes_at_once_follows_the_result_cap() {
        assert_eq!(size_of::<Val>(), 40, "the figures in docs/plugins.md");
        assert_eq!(lift_bytes(16 << 20), 96 << 20);
        assert_eq!(lift_bytes(1), MIN_LIFT_BYTES);
        assert_eq!(lift_bytes(512 << 20), 3 << 30);
        assert_eq!(lift_bytes(usize::MAX), usize::MAX);
    }
}
