//! Binding a call's JSON arguments, by position and by keyword, to a function's WIT parameters.
//!
//! Positional arguments fill parameters from the first; keyword arguments
//! fill the rest by name. Every parameter must get exactly one value, and
//! each value is converted by its parameter's type (see `value`), so a
//! caller learns which argument is wrong, and how, before the guest runs.

use serde_json::Value;
use wasmtime::component::{Type, Val};

use super::export::FunctionInfo;
use super::signature::type_name;
use super::value::{Made, Mismatch, from_json_counted};
use crate::PluginError;
use crate::protocol::Args;

/// Binds `args` to the parameters `params` of the function `func`.
///
/// # Errors
///
/// [`PluginError::InvalidArguments`], the message starting with the
/// function's name: too many positional arguments, an unknown keyword, a
/// parameter given twice or not at all, or a value that does not fit its
/// type (naming the path to it).
pub(super) fn bind_args(
    func: &FunctionInfo,
    params: &[(String, Type)],
    args: &Args,
) -> Result<Vec<Val>, PluginError> {
    let invalid = |message: String| PluginError::InvalidArguments {
        message: format!("{}: {message}", func.name),
    };
    if args.args.len() > params.len() {
        return Err(invalid(format!(
            "takes {} argument{} ({}), got {}",
            params.len(),
            if params.len() == 1 { "" } else { "s" },
            func.signature,
            args.args.len()
        )));
    }
    if let Some(unknown) = args
        .kwargs
        .keys()
        .find(|k| !params.iter().any(|(n, _)| n == *k))
    {
        return Err(invalid(format!(
            "unknown keyword argument `{}` ({})",
            crate::protocol::shown_id(unknown),
            func.signature
        )));
    }
    let mut vals = Vec::with_capacity(params.len());
    // One count for all the arguments: the bound is a call's.
    let mut made = Made::default();
    for (i, (pname, ty)) in params.iter().enumerate() {
        let json: &Value = match (args.args.get(i), args.kwargs.get(pname)) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "argument `{pname}` given both by position and by keyword"
                )));
            }
            (Some(v), None) | (None, Some(v)) => v,
            (None, None) => {
                return Err(invalid(format!(
                    "missing argument `{pname}` of type {} ({})",
                    type_name(ty),
                    func.signature
                )));
            }
        };
        let val = from_json_counted(ty, json, pname, &mut made).map_err(
            |Mismatch { path, message }| invalid(format!("argument `{path}`: {message}")),
        )?;
        vals.push(val);
    }
    Ok(vals)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn greet() -> (FunctionInfo, Vec<(String, Type)>) {
        let info = FunctionInfo {
            name: "greet".into(),
            signature: "func(name: string, times: u8, loud: bool) -> string".into(),
        };
        let params = vec![
            ("name".to_string(), Type::String),
            ("times".to_string(), Type::U8),
            ("loud".to_string(), Type::Bool),
        ];
        (info, params)
    }

    fn args(positional: serde_json::Value, kwargs: serde_json::Value) -> Args {
        serde_json::from_value(json!({ "args": positional, "kwargs": kwargs })).unwrap()
    }

    fn refusal(a: &Args) -> String {
        let (info, params) = greet();
        match bind_args(&info, &params, a) {
            Err(PluginError::InvalidArguments { message }) => message,
            other => panic!("expected InvalidArguments, got {other:?}"),
        }
    }

    #[test]
    fn positional_and_keyword_arguments_fill_parameters_in_order() {
        let (info, params) = greet();
        let expected = vec![Val::String("ada".into()), Val::U8(3), Val::Bool(true)];
        for a in [
            args(json!(["ada", 3, true]), json!({})),
            args(json!(["ada"]), json!({ "loud": true, "times": 3 })),
            args(
                json!([]),
                json!({ "times": 3, "loud": true, "name": "ada" }),
            ),
        ] {
            assert_eq!(bind_args(&info, &params, &a).unwrap(), expected, "{a:?}");
        }
    }

    #[test]
    fn too_many_arguments_name_the_signature_and_count() {
        let message = refusal(&args(json!(["ada", 3, true, 4]), json!({})));
        assert_eq!(
            message,
            "greet: takes 3 arguments (func(name: string, times: u8, loud: bool) -> string), got 4"
        );
    }

    #[test]
    fn one_parameter_is_singular() {
        let info = FunctionInfo {
            name: "neg".into(),
            signature: "func(x: s64) -> s64".into(),
        };
        let params = [("x".to_string(), Type::S64)];
        let e = bind_args(&info, &params, &args(json!([1, 2]), json!({}))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid arguments: neg: takes 1 argument (func(x: s64) -> s64), got 2"
        );
    }

    #[test]
    fn an_unknown_keyword_is_named() {
        let message = refusal(&args(json!(["ada", 3, true]), json!({ "lang": "en" })));
        assert!(
            message.starts_with("greet: unknown keyword argument `lang`"),
            "{message}"
        );
    }

    #[test]
    fn a_parameter_given_twice_is_refused() {
        let message = refusal(&args(
            json!(["ada", 3]),
            json!({ "name": "bob", "loud": false }),
        ));
        assert_eq!(
            message,
            "greet: argument `name` given both by position and by keyword"
        );
    }

    #[test]
    fn a_missing_parameter_is_named_with_its_type() {
        let message = refusal(&args(json!(["ada"]), json!({ "loud": false })));
        assert!(
            message.starts_with("greet: missing argument `times` of type u8"),
            "{message}"
        );
    }

    #[test]
    fn a_value_of_the_wrong_type_names_the_argument_and_the_type() {
        let message = refusal(&args(json!(["ada", 300, true]), json!({})));
        assert_eq!(message, "greet: argument `times`: expected u8, got 300");
        let message = refusal(&args(
            json!([]),
            json!({ "name": 7, "times": 1, "loud": true }),
        ));
        assert_eq!(message, "greet: argument `name`: expected string, got 7");
    }

    #[test]
    fn a_function_without_parameters_takes_no_arguments() {
        let info = FunctionInfo {
            name: "now".into(),
            signature: "func() -> u64".into(),
        };
        assert_eq!(bind_args(&info, &[], &Args::default()).unwrap(), vec![]);
        assert!(bind_args(&info, &[], &args(json!([null]), json!({}))).is_err());
    }
}
