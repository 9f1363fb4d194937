//! WIT signatures of exported functions, as text, and whether their types have a JSON form.
//!
//! wasmtime's runtime types are structural (a record carries its fields but
//! not its WIT name), so records, variants, enums and flags print inline:
//! `record { x: s32, y: s32 }`. That is what `callme inspect` and
//! `_describe` show, and what error messages name as the expected type.

use wasmtime::component::Type;
use wasmtime::component::types::ComponentFunc;

/// The longest text of a type or a signature, in bytes; past it, `…`.
/// A component's types can name cases and fields with strings of 100,000
/// bytes and repeat a type a million times inside another (wasmparser's
/// limits), so written out in full one type could take gigabytes.
pub(crate) const MAX_TYPE_TEXT: usize = 16 * 1024;

/// Text of at most [`MAX_TYPE_TEXT`] bytes, cut with `…` where it was
/// longer; writing stops once it is full.
struct Text(String);

impl Text {
    fn new() -> Text {
        Text(String::new())
    }

    fn full(&self) -> bool {
        self.0.len() > MAX_TYPE_TEXT
    }

    fn push(&mut self, s: &str) {
        if !self.full() {
            self.0.push_str(s);
        }
    }

    /// `items` written with `each`, between `open` and `close`, separated
    /// by `, `; stops at the first item once the text is full.
    fn list<T>(
        &mut self,
        open: &str,
        items: impl Iterator<Item = T>,
        mut each: impl FnMut(&mut Text, T),
        close: &str,
    ) {
        self.push(open);
        for (i, item) in items.enumerate() {
            if self.full() {
                return;
            }
            if i > 0 {
                self.push(", ");
            }
            each(self, item);
        }
        self.push(close);
    }

    fn finish(mut self) -> String {
        if self.full() {
            let mut cut = MAX_TYPE_TEXT;
            while !self.0.is_char_boundary(cut) {
                cut -= 1;
            }
            self.0.truncate(cut);
            self.0.push('…');
        }
        self.0
    }

    fn ty(&mut self, ty: &Type) {
        if self.full() {
            return;
        }
        match ty {
            Type::Bool => self.push("bool"),
            Type::S8 => self.push("s8"),
            Type::U8 => self.push("u8"),
            Type::S16 => self.push("s16"),
            Type::U16 => self.push("u16"),
            Type::S32 => self.push("s32"),
            Type::U32 => self.push("u32"),
            Type::S64 => self.push("s64"),
            Type::U64 => self.push("u64"),
            Type::Float32 => self.push("f32"),
            Type::Float64 => self.push("f64"),
            Type::Char => self.push("char"),
            Type::String => self.push("string"),
            Type::List(l) => {
                self.push("list<");
                self.ty(&l.ty());
                self.push(">");
            }
            Type::FixedLengthList(l) => {
                self.push("list<");
                self.ty(&l.ty());
                self.push(&format!(", {}>", l.len()));
            }
            Type::Map(m) => {
                self.push("map<");
                self.ty(&m.key());
                self.push(", ");
                self.ty(&m.value());
                self.push(">");
            }
            Type::Tuple(t) => self.list("tuple<", t.types(), |out, t| out.ty(&t), ">"),
            Type::Record(r) => self.list(
                "record { ",
                r.fields(),
                |out, f| {
                    out.push(f.name);
                    out.push(": ");
                    out.ty(&f.ty);
                },
                " }",
            ),
            Type::Variant(v) => self.list(
                "variant { ",
                v.cases(),
                |out, c| {
                    out.push(c.name);
                    if let Some(t) = c.ty {
                        out.push("(");
                        out.ty(&t);
                        out.push(")");
                    }
                },
                " }",
            ),
            Type::Enum(e) => self.list("enum { ", e.names(), |out, n| out.push(n), " }"),
            Type::Flags(f) => self.list("flags { ", f.names(), |out, n| out.push(n), " }"),
            Type::Option(o) => {
                self.push("option<");
                self.ty(&o.ty());
                self.push(">");
            }
            Type::Result(r) => match (r.ok(), r.err()) {
                (None, None) => self.push("result"),
                (ok, err) => {
                    self.push("result<");
                    match ok {
                        Some(ok) => self.ty(&ok),
                        None => self.push("_"),
                    }
                    if let Some(err) = err {
                        self.push(", ");
                        self.ty(&err);
                    }
                    self.push(">");
                }
            },
            Type::Own(_) => self.push("own<resource>"),
            Type::Borrow(_) => self.push("borrow<resource>"),
            Type::Future(_) => self.push("future"),
            Type::Stream(_) => self.push("stream"),
            Type::ErrorContext => self.push("error-context"),
        }
    }
}

/// The WIT spelling of a type, at most [`MAX_TYPE_TEXT`] bytes.
pub(crate) fn type_name(ty: &Type) -> String {
    let mut out = Text::new();
    out.ty(ty);
    out.finish()
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

/// `func(a: s64, b: s64) -> s64`, at most [`MAX_TYPE_TEXT`] bytes.
pub(crate) fn func_signature(func: &ComponentFunc) -> String {
    let mut out = Text::new();
    out.push(if func.async_() { "async func" } else { "func" });
    out.list(
        "(",
        func.params(),
        |out, (name, ty)| {
            out.push(name);
            out.push(": ");
            out.ty(&ty);
        },
        ")",
    );
    let results: Vec<Type> = func.results().collect();
    match results.as_slice() {
        [] => {}
        [one] => {
            out.push(" -> ");
            out.ty(one);
        }
        many => out.list(" -> (", many.iter(), |out, t| out.ty(t), ")"),
    }
    out.finish()
}
