//! WIT signatures of exported functions, as text, and whether their types have a JSON form.
//!
//! wasmtime's runtime types are structural (a record carries its fields but
//! not its WIT name), so records, variants, enums and flags print inline:
//! `record { x: s32, y: s32 }`. That is what `callme inspect` and
//! `_describe` show, and what error messages name as the expected type.

use wasmtime::component::Type;
use wasmtime::component::types::ComponentFunc;

/// The WIT spelling of a type.
pub(crate) fn type_name(ty: &Type) -> String {
    match ty {
        Type::Bool => "bool".into(),
        Type::S8 => "s8".into(),
        Type::U8 => "u8".into(),
        Type::S16 => "s16".into(),
        Type::U16 => "u16".into(),
        Type::S32 => "s32".into(),
        Type::U32 => "u32".into(),
        Type::S64 => "s64".into(),
        Type::U64 => "u64".into(),
        Type::Float32 => "f32".into(),
        Type::Float64 => "f64".into(),
        Type::Char => "char".into(),
        Type::String => "string".into(),
        Type::List(l) => format!("list<{}>", type_name(&l.ty())),
        Type::FixedLengthList(l) => format!("list<{}, {}>", type_name(&l.ty()), l.len()),
        Type::Map(m) => format!("map<{}, {}>", type_name(&m.key()), type_name(&m.value())),
        Type::Tuple(t) => format!(
            "tuple<{}>",
            t.types()
                .map(|t| type_name(&t))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Type::Record(r) => format!(
            "record {{ {} }}",
            r.fields()
                .map(|f| format!("{}: {}", f.name, type_name(&f.ty)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Type::Variant(v) => format!(
            "variant {{ {} }}",
            v.cases()
                .map(|c| match c.ty {
                    Some(t) => format!("{}({})", c.name, type_name(&t)),
                    None => c.name.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Type::Enum(e) => format!("enum {{ {} }}", e.names().collect::<Vec<_>>().join(", ")),
        Type::Flags(f) => format!("flags {{ {} }}", f.names().collect::<Vec<_>>().join(", ")),
        Type::Option(o) => format!("option<{}>", type_name(&o.ty())),
        Type::Result(r) => match (r.ok(), r.err()) {
            (None, None) => "result".into(),
            (Some(ok), None) => format!("result<{}>", type_name(&ok)),
            (None, Some(err)) => format!("result<_, {}>", type_name(&err)),
            (Some(ok), Some(err)) => format!("result<{}, {}>", type_name(&ok), type_name(&err)),
        },
        Type::Own(_) => "own<resource>".into(),
        Type::Borrow(_) => "borrow<resource>".into(),
        Type::Future(_) => "future".into(),
        Type::Stream(_) => "stream".into(),
        Type::ErrorContext => "error-context".into(),
    }
}

/// The first type inside `ty` that has no JSON form, if any.
pub(crate) fn unsupported(ty: &Type) -> Option<Type> {
    match ty {
        Type::Own(_) | Type::Borrow(_) | Type::Future(_) | Type::Stream(_) | Type::ErrorContext => {
            Some(ty.clone())
        }
        Type::List(l) => unsupported(&l.ty()),
        Type::FixedLengthList(l) => unsupported(&l.ty()),
        Type::Map(m) => unsupported(&m.key()).or_else(|| unsupported(&m.value())),
        Type::Tuple(t) => t.types().find_map(|t| unsupported(&t)),
        Type::Record(r) => r.fields().find_map(|f| unsupported(&f.ty)),
        Type::Variant(v) => v.cases().find_map(|c| c.ty.as_ref().and_then(unsupported)),
        Type::Option(o) => unsupported(&o.ty()),
        Type::Result(r) => r
            .ok()
            .and_then(|t| unsupported(&t))
            .or_else(|| r.err().and_then(|t| unsupported(&t))),
        _ => None,
    }
}

/// `func(a: s64, b: s64) -> s64`
pub(crate) fn func_signature(func: &ComponentFunc) -> String {
    let params = func
        .params()
        .map(|(name, ty)| format!("{name}: {}", type_name(&ty)))
        .collect::<Vec<_>>()
        .join(", ");
    let results: Vec<Type> = func.results().collect();
    let prefix = if func.async_() { "async func" } else { "func" };
    match results.as_slice() {
        [] => format!("{prefix}({params})"),
        [one] => format!("{prefix}({params}) -> {}", type_name(one)),
        many => format!(
            "{prefix}({params}) -> ({})",
            many.iter().map(type_name).collect::<Vec<_>>().join(", ")
        ),
    }
}
