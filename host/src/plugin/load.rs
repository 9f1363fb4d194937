//! Loading a plugin: reading and compiling a component, checking what it imports and exports, linking it.
//!
//! A component is refused whole, with one line that says why, when it is
//! not a component, imports anything but WASI 0.2 and the callme
//! interfaces (0.1's host, 0.2's host and capabilities), exports a
//! function without a JSON form, or cannot be linked. What passes is
//! pre-instantiated, so a call only makes an instance.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

use super::caps::{capability_of, is_callme_v2};
use super::export::{Export, MAX_FUNCTIONS};
use super::instances::Instances;
use super::{Plugin, PluginSettings, Runtime};
use crate::PluginError;

/// Lower-case hex SHA-256 of `bytes`: the version of a plugin.
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The short name of an exported interface: `stats` for both the inline
/// `stats` and `example:calc/stats@1.0.0`.
fn interface_short_name(name: &str) -> &str {
    let tail = name.rsplit_once('/').map_or(name, |(_, t)| t);
    tail.split_once('@').map_or(tail, |(h, _)| h)
}

/// Whether a plugin may import `name`: WASI 0.2, the callme host
/// interface of 0.1, or an interface of callme 0.2.
fn import_allowed(name: &str) -> bool {
    let (path, version) = name.split_once('@').unwrap_or((name, ""));
    (path.starts_with("wasi:") && version.starts_with("0.2."))
        || (path == "callme:plugin/host" && version.starts_with("0.1."))
        || is_callme_v2(name)
}

impl Plugin {
    /// Loads a plugin from a file; its name is the file stem.
    ///
    /// # Errors
    ///
    /// [`PluginError::InvalidPlugin`] when the file cannot be read or the
    /// component is refused (see [`Plugin::load`]).
    pub fn load_file(
        runtime: &Runtime,
        path: &Path,
        settings: PluginSettings,
    ) -> Result<Plugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|e| {
            PluginError::invalid_plugin(format!("cannot read {}: {e}", path.display()))
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        Plugin::load(runtime, &name, &bytes, settings)
    }

    /// Loads a plugin from component bytes.
    ///
    /// # Errors
    ///
    /// [`PluginError::InvalidPlugin`] when the bytes are not a valid
    /// component, an export uses a type without a JSON form (naming the
    /// function and the type), it imports anything but WASI 0.2 and the
    /// `callme:plugin` interfaces of 0.1 and 0.2 (naming the import), or it
    /// cannot be linked;
    /// also for `settings` outside the bounds a sidecar keeps to (naming
    /// the sidecar key).
    pub fn load(
        runtime: &Runtime,
        name: &str,
        bytes: &[u8],
        settings: PluginSettings,
    ) -> Result<Plugin, PluginError> {
        let rt = &runtime.inner;
        settings
            .check()
            .map_err(|e| PluginError::invalid_plugin(format!("invalid settings: {e}")))?;
        let memory_bytes = settings.limits.memory_bytes;
        if memory_bytes > rt.config.max_memory_bytes {
            return Err(PluginError::invalid_plugin(format!(
                "memory cap of {memory_bytes} bytes exceeds the runtime's maximum of {}",
                rt.config.max_memory_bytes
            )));
        }
        let hash = content_hash(bytes);
        // One line, and nothing of the file: the parser's message quotes
        // the bytes of a file that is not WebAssembly at all (a text file,
        // or whatever a symlink points at), and the message goes to logs
        // and to callers.
        let component = Component::new(&rt.engine, bytes).map_err(|e| {
            PluginError::invalid_plugin(if bytes.starts_with(b"\0asm") {
                format!("not a valid component: {e:#}").replace('\n', " ")
            } else {
                format!(
                    "not a WebAssembly component ({} bytes that do not start with `\\0asm`)",
                    bytes.len()
                )
            })
        })?;
        let ty = component.component_type();

        let mut capabilities = Vec::new();
        for (import, _) in ty.imports(&rt.engine) {
            capabilities.extend(capability_of(import));
            if !import_allowed(import) {
                return Err(PluginError::invalid_plugin(format!(
                    "imports `{import}`, which the host does not provide (plugins may import \
                     WASI 0.2, callme:plugin/host@0.1.0 and callme:plugin@0.2.0)"
                )));
            }
        }

        let mut exports = BTreeMap::new();
        for (export_name, item) in ty.exports(&rt.engine) {
            match item.ty {
                ComponentItem::ComponentFunc(func) => {
                    let index = component
                        .get_export_index(None, export_name)
                        .ok_or_else(|| PluginError::internal(format!("export `{export_name}`")))?;
                    let e = Export::new(export_name.to_string(), index, &func)?;
                    add_export(&mut exports, e)?;
                }
                // Toolchain plumbing, not the author's functions:
                // componentize-py exports its interpreter set-up as a bare
                // `exports` instance (so a plugin cannot name its own
                // interface `exports`).
                ComponentItem::ComponentInstance(_)
                    if export_name.starts_with("componentize-py:") || export_name == "exports" => {}
                ComponentItem::ComponentInstance(inst) => {
                    let short = interface_short_name(export_name);
                    let inst_index = component
                        .get_export_index(None, export_name)
                        .ok_or_else(|| PluginError::internal(format!("export `{export_name}`")))?;
                    for (func_name, item) in inst.exports(&rt.engine) {
                        if let ComponentItem::ComponentFunc(func) = item.ty {
                            let index = component
                                .get_export_index(Some(&inst_index), func_name)
                                .ok_or_else(|| {
                                    PluginError::internal(format!("export `{func_name}`"))
                                })?;
                            let e = Export::new(format!("{short}.{func_name}"), index, &func)?;
                            add_export(&mut exports, e)?;
                        }
                    }
                }
                _ => {}
            }
        }

        let pre = rt
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::invalid_plugin(format!("cannot be linked: {e:#}")))?;
        let weight = runtime.slots_for(&component)?;
        capabilities.sort_unstable();
        capabilities.dedup();
        Ok(Plugin {
            hash,
            exports,
            capabilities,
            instances: Instances::new(runtime.clone(), name.into(), settings, pre, weight),
        })
    }
}

/// Adds `export`, unless the plugin has its most functions already.
fn add_export(exports: &mut BTreeMap<String, Export>, export: Export) -> Result<(), PluginError> {
    if exports.len() >= MAX_FUNCTIONS {
        return Err(PluginError::invalid_plugin(format!(
            "exports more than {MAX_FUNCTIONS} functions"
        )));
    }
    // Interfaces of one short name (two versions of one interface, or
    // two packages' `util`) would give two functions one name, and the
    // last would silently take every call meant for the first.
    if exports.contains_key(&export.info.name) {
        return Err(PluginError::invalid_plugin(format!(
            "exports two functions callers would both call `{}` (interfaces of one short name, such as two versions of one interface): rename one",
            export.info.name
        )));
    }
    exports.insert(export.info.name.clone(), export);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_short() {
        assert_eq!(interface_short_name("stats"), "stats");
        assert_eq!(interface_short_name("example:calc/stats@1.0.0"), "stats");
        assert_eq!(interface_short_name("example:calc/stats"), "stats");
    }

    #[test]
    fn only_wasi_02_and_host_imports_are_allowed() {
        assert!(import_allowed("wasi:cli/environment@0.2.6"));
        assert!(import_allowed("callme:plugin/host@0.1.0"));
        assert!(import_allowed("callme:plugin/host@0.2.0"));
        assert!(import_allowed("callme:plugin/rpc@0.2.0"));
        assert!(!import_allowed("callme:plugin/rpc@0.1.0"));
        assert!(!import_allowed("wasi:cli/environment@0.3.0"));
        assert!(!import_allowed("evil"));
        assert!(!import_allowed("callme:plugin/other@0.1.0"));
    }

    #[test]
    fn content_hash_is_sha256_hex() {
        assert_eq!(
            content_hash(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
