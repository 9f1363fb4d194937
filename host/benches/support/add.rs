//! The `add` the broker benchmarks serve: a native function, or the calc plugin's.

use callme::{NativeFunctions, Plugin, PluginSettings, Runtime, RuntimeConfig, Server};
use serde_json::json;

use super::plugin_bytes;

/// Serves `add(a, b)` under `id` on `server`: as a native function, or
/// (`native` false) as the calc plugin, a fresh sandbox per call.
pub async fn serve_add(server: &Server, id: &str, native: bool) -> anyhow::Result<()> {
    if native {
        let mut functions = NativeFunctions::new();
        functions.register("add", "func(a: s64, b: s64) -> s64", |args| {
            let n = |i: usize| args.args.get(i).and_then(|v| v.as_i64()).unwrap_or(0);
            Ok(json!(n(0) + n(1)))
        });
        server.serve_native(id, functions).await?;
    } else {
        let runtime = Runtime::with_config(RuntimeConfig::default())?;
        let plugin = Plugin::load(
            &runtime,
            id,
            &plugin_bytes("calc")?,
            PluginSettings::default(),
        )?;
        server.serve_plugin(plugin).await?;
    }
    Ok(())
}
