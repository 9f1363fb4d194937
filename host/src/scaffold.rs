//! `callme new`: a plugin project to start from, in Rust, Python or JavaScript.
//!
//! The templates are files of this crate (`host/templates/`), compiled into
//! the binary; the plugin's name replaces `{{name}}` in them (and `{{crate}}`,
//! the name as Cargo spells a Rust crate's files). Every project gets a copy
//! of the callme contract (`wit/callme.wit`) in `wit/deps/callme/`, so that
//! it builds on its own, outside this repository: the Rust one depends on
//! `wit-bindgen` from crates.io, the Python and JavaScript ones on the
//! toolchains `scripts/build-plugins` pins.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The longest plugin name: a server id may be longer, but the name is
/// also a file, crate and package name, and typed on command lines.
pub const MAX_NAME_LEN: usize = 64;

/// The rule a plugin name follows, as the refusal of a bad one states it.
pub const NAME_RULE: &str = "a plugin name is lowercase words of ASCII letters and digits \
     joined by single `-`, each word starting with a letter (`hello`, `my-plugin`, `calc2`), \
     at most 64 characters, not a keyword of WIT or Rust, not the name of a Rust built-in \
     crate (`core`, `std`, `test`) and not a device name on Windows (`con`, `nul`, `com1`)";

/// The callme contract every project carries in `wit/deps/callme/`.
const CONTRACT: &str = include_str!("../../wit/callme.wit");

/// The world every template shares: the contract and one function.
const WORLD: &str = include_str!("../templates/world.wit");

/// WIT keywords (wit-parser's lexer, 0.239 to 0.261): a world named `list`
/// does not parse.
const WIT_KEYWORDS: &[&str] = &[
    "as",
    "async",
    "bool",
    "borrow",
    "char",
    "constructor",
    "enum",
    "error-context",
    "export",
    "f32",
    "f64",
    "flags",
    "from",
    "func",
    "future",
    "import",
    "include",
    "interface",
    "list",
    "map",
    "option",
    "own",
    "package",
    "record",
    "resource",
    "result",
    "s16",
    "s32",
    "s64",
    "s8",
    "static",
    "stream",
    "string",
    "tuple",
    "type",
    "u16",
    "u32",
    "u64",
    "u8",
    "use",
    "variant",
    "with",
    "world",
];

/// Rust keywords, strict and reserved, of every edition: Cargo refuses
/// them as package names.
const RUST_KEYWORDS: &[&str] = &[
    "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
    "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
    "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref",
    "return", "self", "static", "struct", "super", "trait", "true", "try", "type", "typeof",
    "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
];

/// Rust's built-in crates (`proc-macro` is `proc_macro` to Cargo): a crate
/// of the same name clashes with them, and Cargo refuses or warns.
const RUST_CRATES: &[&str] = &["alloc", "core", "proc-macro", "std", "test"];

/// Windows device names: a folder or file of that name (`con`, `con.wasm`)
/// cannot be made there, and Cargo refuses them as package names.
const WINDOWS_DEVICES: &[&str] = &[
    "aux", "con", "nul", "prn", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8",
    "com9", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
];

/// The language of a new plugin project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// A `cdylib` crate built with `cargo` for `wasm32-wasip2`.
    Rust,
    /// A module compiled by componentize-py.
    Python,
    /// An ES module compiled by componentize-js.
    JavaScript,
}

impl Language {
    /// The files of this language's template: path in the project, text
    /// with `{{name}}` and `{{crate}}` still in it.
    fn files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Language::Rust => &[
                (
                    "Cargo.toml",
                    include_str!("../templates/rust/Cargo.toml.tmpl"),
                ),
                ("README.md", include_str!("../templates/rust/README.md")),
                (".gitignore", include_str!("../templates/rust/gitignore")),
                (
                    ".cargo/config.toml",
                    include_str!("../templates/rust/cargo-config.toml"),
                ),
                ("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
                ("wit/world.wit", WORLD),
            ],
            Language::Python => &[
                ("README.md", include_str!("../templates/python/README.md")),
                (".gitignore", include_str!("../templates/python/gitignore")),
                (
                    "requirements.txt",
                    include_str!("../templates/python/requirements.txt"),
                ),
                ("src/app.py", include_str!("../templates/python/src/app.py")),
                (
                    "src/greeting.py",
                    include_str!("../templates/python/src/greeting.py"),
                ),
                (
                    "tests/test_greeting.py",
                    include_str!("../templates/python/tests/test_greeting.py"),
                ),
                ("wit/world.wit", WORLD),
            ],
            Language::JavaScript => &[
                ("README.md", include_str!("../templates/js/README.md")),
                (".gitignore", include_str!("../templates/js/gitignore")),
                ("package.json", include_str!("../templates/js/package.json")),
                (
                    "src/plugin.js",
                    include_str!("../templates/js/src/plugin.js"),
                ),
                (
                    "src/greeting.js",
                    include_str!("../templates/js/src/greeting.js"),
                ),
                (
                    "test/greeting.test.js",
                    include_str!("../templates/js/test/greeting.test.js"),
                ),
                ("wit/world.wit", WORLD),
            ],
        }
    }

    /// The commands that build the project, run in its folder.
    pub fn build_commands(self, name: &str) -> Vec<String> {
        match self {
            Language::Rust => vec!["cargo build --target wasm32-wasip2 --release".to_string()],
            Language::Python => vec![
                "python3 -m venv .venv".to_string(),
                ".venv/bin/pip install -r requirements.txt".to_string(),
                format!(
                    "env -u VIRTUAL_ENV .venv/bin/componentize-py --wit-path wit --world {name} \
                     componentize --python-path src --output {name}.wasm app"
                ),
            ],
            Language::JavaScript => vec!["npm install".to_string(), "npm run build".to_string()],
        }
    }

    /// Where the build puts the component, relative to the project's folder.
    pub fn component_path(self, name: &str) -> PathBuf {
        match self {
            Language::Rust => Path::new("target/wasm32-wasip2/release")
                .join(format!("{}.wasm", crate_file_name(name))),
            Language::Python | Language::JavaScript => PathBuf::from(format!("{name}.wasm")),
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Language::Rust => "Rust",
            Language::Python => "Python",
            Language::JavaScript => "JavaScript",
        })
    }
}

/// Why a project was not created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScaffoldError {
    /// The name breaks [`NAME_RULE`]; `problem` says where.
    #[error("invalid plugin name {name:?}: {problem}; {NAME_RULE}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The target is a directory that is not empty: nothing was written.
    #[error("{} is not empty: a new plugin goes into a new or empty directory", path.display())]
    NotEmpty {
        /// The target directory.
        path: PathBuf,
    },
    /// The target cannot be a directory, or is reached through `..` out
    /// of a folder that does not exist: nothing was written.
    #[error("{problem}: a new plugin goes into a new or empty directory")]
    NotADirectory {
        /// The target directory.
        path: PathBuf,
        /// What is in the way, naming the target (`notes.txt is a file`).
        problem: String,
    },
    /// Reading or writing the project failed.
    #[error("cannot write {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Checks `name` against [`NAME_RULE`].
///
/// # Errors
///
/// [`ScaffoldError::InvalidName`], saying which part of the rule it breaks.
pub fn check_name(name: &str) -> Result<(), ScaffoldError> {
    let refuse = |problem: String| {
        Err(ScaffoldError::InvalidName {
            name: name.to_string(),
            problem,
        })
    };
    if name.is_empty() {
        return refuse("it is empty".to_string());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return refuse(format!("it contains {c:?}"));
    }
    // ASCII from here: its length in bytes is its length in characters.
    if name.len() > MAX_NAME_LEN {
        return refuse(format!("it is {} characters long", name.len()));
    }
    for word in name.split('-') {
        match word.chars().next() {
            None => {
                return refuse(
                    "it has an empty word (a leading, trailing or double `-`)".to_string(),
                );
            }
            Some(c) if !c.is_ascii_lowercase() => {
                return refuse(format!("its word {word:?} starts with {c:?}"));
            }
            Some(_) => {}
        }
    }
    let reserved = match (WIT_KEYWORDS.contains(&name), RUST_KEYWORDS.contains(&name)) {
        (true, true) => Some("it is a WIT keyword and a Rust keyword"),
        (true, false) => Some("it is a WIT keyword"),
        (false, true) => Some("it is a Rust keyword"),
        (false, false) if RUST_CRATES.contains(&name) => {
            Some("it is the name of a Rust built-in crate")
        }
        (false, false) if WINDOWS_DEVICES.contains(&name) => Some("it is a device name on Windows"),
        (false, false) => None,
    };
    if let Some(problem) = reserved {
        return refuse(problem.to_string());
    }
    Ok(())
}

/// Writes a new `language` plugin project named `name` into `dir`, which
/// must be missing or empty; the files written.
///
/// # Errors
///
/// [`ScaffoldError::InvalidName`] or [`ScaffoldError::NotEmpty`] before
/// anything is written; [`ScaffoldError::Io`] if writing fails.
pub fn create(dir: &Path, name: &str, language: Language) -> Result<Vec<PathBuf>, ScaffoldError> {
    check_name(name)?;
    // An empty path is the current directory, checked as any other: the
    // files would land there, and `read_dir("")` finds nothing to refuse.
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    check_target(dir)?;
    let crate_name = crate_file_name(name);
    let mut files: Vec<(PathBuf, String)> = language
        .files()
        .iter()
        .map(|(path, text)| {
            let text = text
                .replace("{{name}}", name)
                .replace("{{crate}}", &crate_name);
            (dir.join(path), text)
        })
        .collect();
    files.push((dir.join("wit/deps/callme/callme.wit"), CONTRACT.to_string()));
    let mut written = Written::default();
    // The target, made if missing, is empty still: whatever way the path
    // takes to it, and whatever appeared there since it was checked.
    if let Err(e) = written.dir(dir).and_then(|()| require_empty(dir)) {
        written.undo();
        return Err(e);
    }
    for (path, text) in &files {
        if let Err(e) = written.file(path, text) {
            // A project half written is no project: the directory is left
            // as it was found, so the same command can be run again.
            written.undo();
            return Err(e);
        }
    }
    Ok(files.into_iter().map(|(path, _)| path).collect())
}

/// Checks, before anything is made, that `dir` is an empty directory or
/// can become one.
fn check_target(dir: &Path) -> Result<(), ScaffoldError> {
    let refuse = |problem: String| {
        Err(ScaffoldError::NotADirectory {
            path: dir.to_path_buf(),
            problem,
        })
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => require_empty(dir),
        Ok(meta) if meta.is_file() => refuse(format!("{} is a file", dir.display())),
        Ok(_) => refuse(format!("{} is not a directory", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            refuse(format!("a parent of {} is not a directory", dir.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // `missing/..` names no folder until `missing` is made, and then
            // one that exists already (`missing/../full` is `full`): such
            // a path is refused before anything is made.
            let mut prefix = PathBuf::new();
            let mut absent: Option<PathBuf> = None;
            for part in dir.components() {
                if part == std::path::Component::ParentDir
                    && let Some(absent) = &absent
                {
                    return refuse(format!(
                        "{} goes up (`..`) out of {}, which does not exist",
                        dir.display(),
                        absent.display()
                    ));
                }
                prefix.push(part);
                if absent.is_none() && std::fs::metadata(&prefix).is_err() {
                    absent = Some(prefix.clone());
                }
            }
            Ok(())
        }
        Err(source) => Err(ScaffoldError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Refuses `dir`, an existing directory, unless it is empty.
fn require_empty(dir: &Path) -> Result<(), ScaffoldError> {
    let mut entries = std::fs::read_dir(dir).map_err(|source| ScaffoldError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if entries.next().is_some() {
        return Err(ScaffoldError::NotEmpty {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// What one [`create`] has made so far, so that a failure part-way can
/// take it away again.
#[derive(Default)]
struct Written {
    /// Directories made, outermost first.
    dirs: Vec<PathBuf>,
    /// Files made, or opened to be made.
    files: Vec<PathBuf>,
}

impl Written {
    /// Writes `text` to `path`, a file that must not exist yet, making the
    /// directories it needs: nothing that appeared meanwhile is
    /// overwritten.
    fn file(&mut self, path: &Path, text: &str) -> Result<(), ScaffoldError> {
        if let Some(parent) = path.parent() {
            self.dir(parent)?;
        }
        let io = |source| ScaffoldError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io)?;
        self.files.push(path.to_path_buf());
        file.write_all(text.as_bytes()).map_err(io)
    }

    /// Makes `dir` and whichever of its parents are missing.
    fn dir(&mut self, dir: &Path) -> Result<(), ScaffoldError> {
        let missing: Vec<&Path> = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && d.symlink_metadata().is_err())
            .collect();
        for d in missing.into_iter().rev() {
            match std::fs::create_dir(d) {
                Ok(()) => self.dirs.push(d.to_path_buf()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(ScaffoldError::Io {
                        path: d.to_path_buf(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes what was made, newest first; a directory that something
    /// else has put a file into meanwhile stays.
    fn undo(self) {
        for file in self.files.iter().rev() {
            let _ = std::fs::remove_file(file);
        }
        for dir in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The name Cargo gives a crate's library files: `-` becomes `_`.
fn crate_file_name(name: &str) -> String {
    name.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LANGUAGES: [Language; 3] = [Language::Rust, Language::Python, Language::JavaScript];

    /// An empty path is the current directory (here the crate's, never
    /// empty), refused as such rather than written into unchecked.
    #[test]
    fn an_empty_path_is_the_current_directory_and_checked() {
        assert!(std::fs::read_dir(".").unwrap().next().is_some());
        let e = create(Path::new(""), "hello", Language::Rust).unwrap_err();
        assert!(matches!(e, ScaffoldError::NotEmpty { .. }), "{e:?}");
    }

    /// A fresh path under the system's temporary directory, not created.
    fn scratch(label: &str) -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        std::env::temp_dir().join(format!(
            "callme-scaffold-{}-{}-{label}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn template(language: Language, path: &str) -> &'static str {
        let found = language.files().iter().find(|(p, _)| *p == path);
        found.expect("the template has the file").1
    }

    fn problem(name: &str) -> String {
        match check_name(name) {
            Err(ScaffoldError::InvalidName { problem, .. }) => problem,
            other => panic!("{name:?}: expected InvalidName, got {other:?}"),
        }
    }

    #[test]
    fn good_names_are_server_ids() {
        for name in [
            "hello",
            "my-plugin",
            "calc2",
            "a-b2-c",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            check_name(name).unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert!(crate::protocol::is_valid_server_id(name), "{name}");
        }
    }

    #[test]
    fn bad_names_are_refused_with_the_rule_they_break() {
        assert_eq!(problem(""), "it is empty");
        assert_eq!(problem(&"x".repeat(65)), "it is 65 characters long");
        assert_eq!(problem("Hello"), "it contains 'H'");
        assert_eq!(problem("my_plugin"), "it contains '_'");
        assert_eq!(problem("my.plugin"), "it contains '.'");
        assert_eq!(problem("my plugin"), "it contains ' '");
        assert_eq!(problem("héllo"), "it contains 'é'");
        assert_eq!(problem("../evil"), "it contains '.'");
        assert_eq!(problem("2fast"), "its word \"2fast\" starts with '2'");
        assert_eq!(problem("plugin-2"), "its word \"2\" starts with '2'");
        for name in ["-x", "x-", "a--b"] {
            assert!(problem(name).contains("empty word"), "{name}");
        }
        assert_eq!(problem("list"), "it is a WIT keyword");
        // The rule a name breaks first is its characters, then its length.
        assert_eq!(problem(&"é".repeat(33)), "it contains 'é'");
        let message = check_name("Hello").unwrap_err().to_string();
        assert!(message.contains(NAME_RULE), "{message}");
    }

    /// Each reserved name is refused saying which rule makes it so.
    #[test]
    fn reserved_names_are_refused_saying_why() {
        // Every keyword of WIT (wit-parser 0.254's lexer).
        let wit = "func u8 u16 u32 u64 s8 s16 s32 s64 f32 f64 char resource own \
                   borrow record flags variant bool string option result future stream \
                   error-context list map from interface tuple world import export \
                   package constructor include with";
        for name in wit.split_whitespace() {
            assert_eq!(problem(name), "it is a WIT keyword", "{name}");
        }
        for name in ["as", "async", "enum", "static", "type", "use"] {
            assert_eq!(problem(name), "it is a WIT keyword and a Rust keyword");
        }
        for name in ["fn", "gen", "struct", "self", "crate", "yield"] {
            assert_eq!(problem(name), "it is a Rust keyword", "{name}");
        }
        for name in ["core", "alloc", "std", "test", "proc-macro"] {
            assert_eq!(problem(name), "it is the name of a Rust built-in crate");
        }
        // Spelled `f32` and `f64` in WIT since wit-parser 0.239 (by default;
        // the old spellings are gone from 0.254), and no Rust keyword.
        for name in ["float32", "float64", "tests", "standard", "listing"] {
            check_name(name).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        }
    }

    /// A folder or file named after a Windows device cannot be made there.
    #[test]
    fn windows_device_names_are_refused() {
        let devices = ["con", "prn", "aux", "nul"]
            .into_iter()
            .map(str::to_string)
            .chain((1..=9).flat_map(|n| [format!("com{n}"), format!("lpt{n}")]));
        for name in devices {
            assert_eq!(problem(&name), "it is a device name on Windows", "{name}");
        }
        for name in [
            "com", "com0", "com10", "lpt", "console", "null", "con-x", "aux2",
        ] {
            check_name(name).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        }
        let message = check_name("nul").unwrap_err().to_string();
        assert!(message.contains("device name on Windows"), "{message}");
    }

    #[test]
    fn refuses_a_non_empty_directory_without_touching_it() {
        let dir = scratch("full");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let e = create(&dir, "hello", Language::Rust).unwrap_err();
        assert!(matches!(e, ScaffoldError::NotEmpty { .. }), "{e:?}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["notes.txt"]);
        assert_eq!(
            std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
            "mine"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_file_in_the_way_saying_so() {
        let file = scratch("file");
        std::fs::write(&file, "mine").unwrap();
        let e = create(&file, "hello", Language::Python).unwrap_err();
        assert!(matches!(e, ScaffoldError::NotADirectory { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a file: a new plugin goes into a new or empty directory",
                file.display()
            )
        );
        let under = file.join("sub");
        let e = create(&under, "hello", Language::Python).unwrap_err();
        assert!(matches!(e, ScaffoldError::NotADirectory { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "a parent of {} is not a directory: a new plugin goes into a new or empty directory",
                under.display()
            )
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
        std::fs::remove_file(&file).unwrap();
    }

    /// `missing/..` exists only once `missing` is made: a path through it
    /// cannot reach a directory that is not empty, and leaves no `missing`.
    #[test]
    fn refuses_a_path_going_up_out_of_a_missing_folder() {
        let parent = scratch("up");
        let full = parent.join("full");
        std::fs::create_dir_all(&full).unwrap();
        std::fs::write(full.join("notes.txt"), "mine").unwrap();
        let missing = parent.join("missing");
        for dir in [
            missing.join("../full"),
            missing.join(".."),
            missing.join("../new"),
        ] {
            let e = create(&dir, "hello", Language::Python).unwrap_err();
            assert!(matches!(e, ScaffoldError::NotADirectory { .. }), "{e:?}");
            let message = e.to_string();
            let says = format!("out of {}, which does not exist", missing.display());
            assert!(message.contains(&says), "{message}");
            let left: Vec<_> = std::fs::read_dir(&full)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left, ["notes.txt"], "{}", dir.display());
            assert!(!missing.exists(), "{}", dir.display());
            assert!(!parent.join("new").exists(), "{}", dir.display());
        }
        // Up out of a folder that exists is fine.
        let dir = full.join("../new");
        create(&dir, "hello", Language::Python).unwrap();
        assert!(parent.join("new/src/app.py").is_file());
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn an_invalid_name_writes_nothing() {
        let dir = scratch("bad-name");
        let e = create(&dir, "Bad Name", Language::JavaScript).unwrap_err();
        assert!(matches!(e, ScaffoldError::InvalidName { .. }), "{e:?}");
        assert!(!dir.exists());
    }

    #[test]
    fn every_template_names_the_plugin_and_carries_the_contract() {
        for language in LANGUAGES {
            let dir = scratch("new");
            // An existing empty directory is fine too.
            if language == Language::Python {
                std::fs::create_dir_all(&dir).unwrap();
            }
            let files = create(&dir, "my-plugin", language).unwrap();
            for path in &files {
                let text = std::fs::read_to_string(path).unwrap();
                assert!(!text.contains("{{"), "{}: {text}", path.display());
            }
            let world = std::fs::read_to_string(dir.join("wit/world.wit")).unwrap();
            assert!(world.contains("world my-plugin {"), "{world}");
            assert!(world.contains("include callme:plugin/plugin@0.1.0;"));
            let contract = std::fs::read_to_string(dir.join("wit/deps/callme/callme.wit")).unwrap();
            assert!(contract.contains("package callme:plugin@0.1.0;"));
            // Shell lines continued with `\` read as one.
            let readme = std::fs::read_to_string(dir.join("README.md"))
                .unwrap()
                .replace(" \\\n    ", " ");
            let component = language.component_path("my-plugin");
            let invoke = format!("callme invoke {} greet", component.display());
            assert!(readme.contains(&invoke), "{language}: {readme}");
            for command in language.build_commands("my-plugin") {
                assert!(readme.contains(&command), "{language}: {command}");
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// The world's package is of a namespace no toolchain brings a package
    /// of: componentize-js 0.23's engine has `local:bindings`, and a
    /// plugin named `bindings` in `local:` failed to build.
    #[test]
    fn the_world_is_in_a_namespace_of_its_own() {
        let dir = scratch("package");
        create(&dir, "bindings", Language::JavaScript).unwrap();
        let world = std::fs::read_to_string(dir.join("wit/world.wit")).unwrap();
        let package = world.lines().find(|l| l.starts_with("package "));
        assert_eq!(package, Some("package callme-plugin:bindings;"), "{world}");
        assert!(!world.contains("package local:"), "{world}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The Rust template turns on wit-bindgen's `bitflags`, as
    /// `callme-guest` does: without it a WIT `flags` type gets a minimal
    /// stand-in, without `contains` and the other methods of `bitflags`.
    #[test]
    fn the_rust_template_has_the_bitflags_feature() {
        let guest = include_str!("../../guest-sdk/Cargo.toml");
        assert!(
            guest.contains(r#"wit-bindgen = { workspace = true, features = ["bitflags"] }"#),
            "callme-guest moved off wit-bindgen's bitflags"
        );
        let manifest = template(Language::Rust, "Cargo.toml");
        let line = manifest.lines().find(|l| l.starts_with("wit-bindgen = "));
        let line = line.expect("the template depends on wit-bindgen");
        assert!(line.contains(r#""bitflags""#), "{line}");
    }

    /// The templates use the toolchains the repository's own plugins are
    /// built and tested with.
    #[test]
    fn templates_pin_the_repository_toolchains() {
        let workspace = include_str!("../../Cargo.toml");
        let pin = r#"wit-bindgen = { version = "0.46", default-features = false, features = ["macros", "realloc"] }"#;
        assert!(
            workspace.contains(pin),
            "the workspace moved off wit-bindgen 0.46"
        );
        // The workspace's, with callme-guest's `bitflags` added.
        let template_pin = r#"wit-bindgen = { version = "0.46", default-features = false, features = ["macros", "realloc", "bitflags"] }"#;
        assert!(template(Language::Rust, "Cargo.toml").contains(template_pin));

        let py = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("componentize-py=="))
                .map(str::to_string)
        };
        let python = template(Language::Python, "requirements.txt");
        assert_eq!(
            py(python),
            py(include_str!("../../plugins/calc-py/requirements.txt"))
        );
        assert!(py(python).is_some());

        let js = |text: &str| {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            v["devDependencies"].clone()
        };
        let package = template(Language::JavaScript, "package.json");
        assert_eq!(
            js(package),
            js(include_str!("../../plugins/calc-js/package.json"))
        );
    }
}
