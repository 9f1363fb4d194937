//! One function a plugin exports: the name a caller uses, its WIT signature, and the types a call needs.
//!
//! An [`Export`] is made once, when the plugin loads, and only for a
//! function whose parameters and results all have a JSON form; binding
//! arguments and mapping results then never meet a type they cannot
//! handle.

use serde::Serialize;
use wasmtime::component::types::ComponentFunc;
use wasmtime::component::{ComponentExportIndex, Type};

use super::signature::{func_signature, type_name, unsupported};
use crate::PluginError;

/// The name and WIT signature of a callable function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FunctionInfo {
    /// The name a caller uses: `add`, or `stats.mean` for a function of an
    /// exported interface.
    pub name: String,
    /// The WIT signature, e.g. `func(a: s64, b: s64) -> s64`.
    pub signature: String,
}

/// The longest name a plugin's function may have (with its interface's
/// short name and the `.`): a name is a metric label and a log field of
/// every call.
pub(crate) const MAX_NAME_BYTES: usize = 256;

/// The most functions a plugin may export: each becomes a series of
/// several metrics once called.
pub(crate) const MAX_FUNCTIONS: usize = 1024;

/// A callable function of a loaded plugin.
pub(super) struct Export {
    pub(super) info: FunctionInfo,
    /// Where to find it in an instance.
    pub(super) index: ComponentExportIndex,
    /// Parameter names and types, in order.
    pub(super) params: Vec<(String, Type)>,
    pub(super) results: Vec<Type>,
}

impl Export {
    /// Describes the function `func` found at `index`, called `name`.
    ///
    /// # Errors
    ///
    /// [`PluginError::InvalidPlugin`] when its name is over
    /// [`MAX_NAME_BYTES`], a parameter or the result has a type without a
    /// JSON form (naming the function, the parameter and the type), or the
    /// function is async.
    pub(super) fn new(
        name: String,
        index: ComponentExportIndex,
        func: &ComponentFunc,
    ) -> Result<Export, PluginError> {
        if name.len() > MAX_NAME_BYTES {
            let shown: String = name.chars().take(64).collect();
            return Err(PluginError::invalid_plugin(format!(
                "function `{}…`: its name is {} bytes, over the {MAX_NAME_BYTES} a name may have",
                shown.escape_debug(),
                name.len()
            )));
        }
        let params: Vec<(String, Type)> = func.params().map(|(n, t)| (n.to_string(), t)).collect();
        let results: Vec<Type> = func.results().collect();
        for (pname, t) in &params {
            if let Some(bad) = unsupported(t) {
                return Err(PluginError::invalid_plugin(format!(
                    "function `{name}`: parameter `{pname}` has type {}, which has no JSON form",
                    type_name(&bad)
                )));
            }
        }
        for t in &results {
            if let Some(bad) = unsupported(t) {
                return Err(PluginError::invalid_plugin(format!(
                    "function `{name}`: its result has type {}, which has no JSON form",
                    type_name(&bad)
                )));
            }
        }
        if func.async_() {
            return Err(PluginError::invalid_plugin(format!(
                "function `{name}` is an async component function, which the host does not call yet"
            )));
        }
        Ok(Export {
            info: FunctionInfo {
                signature: func_signature(func),
                name,
            },
            index,
            params,
            results,
        })
    }
}
