//! The compilation cache's directory: made callme's own, and checked before wasmtime may load native code from it.
//!
//! wasmtime maps a cached artifact's machine code as it finds it: nothing
//! but the file's name ties it to the plugin it was compiled from, and the
//! name can be worked out by anyone with the same build. So whoever can
//! write into the cache, or swap a directory on the way to it, runs code
//! as the host, outside every sandbox. And wasmtime's cache cleaner
//! (wasmtime 48, `cache/worker.rs`) deletes what it does not recognise in
//! its directory, two levels deep: pointed at a directory that holds
//! anything else (`--cache-dir` mistaken for `--plugins`, or `$HOME`), it
//! would delete it.
//!
//! So wasmtime gets a directory of its own inside the one configured,
//! [`ARTIFACTS`], made with mode 0700, and the cache is used only if no
//! other user can change what that path leads to: on its real path (links
//! resolved, and given to wasmtime as such), the directory and every
//! directory above it is owned by this user or root, and none is writable
//! by others, unless sticky (as `/tmp` is: others cannot rename or remove
//! what they do not own there). A directory that fails refuses the
//! runtime with the reason, rather than loading code from it.

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The directory inside the configured one that holds wasmtime's cache.
pub(crate) const ARTIFACTS: &str = "wasmtime";

/// Makes (if need be) and checks the cache's directory inside `dir`; the
/// path to give wasmtime.
///
/// # Errors
///
/// Why the directory cannot be used: it cannot be made, or another user
/// could change what it holds.
pub(crate) fn artifacts_dir(dir: &Path) -> Result<PathBuf, String> {
    let me = rustix::process::geteuid().as_raw();
    let mut builder = DirBuilder::new();
    builder.recursive(true).mode(0o700);
    // The path to the directory given first: nothing is made inside it
    // unless no other user can change where it leads. Its real path (links
    // resolved) is what is checked, and what wasmtime is given, so a link
    // on the way cannot lead somewhere unchecked, then or later.
    let dir = made(&builder, dir)?;
    check(&dir, me, false)?;
    let artifacts = made(&builder, &dir.join(ARTIFACTS))?;
    check(&artifacts, me, true)?;
    Ok(artifacts)
}

/// `path`, made if need be, as its real path.
fn made(builder: &DirBuilder, path: &Path) -> Result<PathBuf, String> {
    builder
        .create(path)
        .and_then(|()| std::fs::canonicalize(path))
        .map_err(|e| format!("{}: cannot create it: {e}", path.display()))
}

/// Checks `path`, a real path (the cache's own directory when `own`), and
/// every directory above it.
fn check(path: &Path, me: u32, own: bool) -> Result<(), String> {
    for (i, p) in path.ancestors().enumerate() {
        let meta = std::fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if let Some(why) = unsafe_dir(&meta, me, own && i == 0) {
            return Err(format!(
                "{} {why}: another user could put code there that the host would run; \
                 use a directory only this user can write to",
                p.display()
            ));
        }
    }
    Ok(())
}

/// Why a directory on the way to the cache (or the cache's own, `own`)
/// is unsafe for a process running as user `me`, if it is.
fn unsafe_dir(meta: &std::fs::Metadata, me: u32, own: bool) -> Option<&'static str> {
    let mode = meta.mode();
    if !meta.is_dir() {
        return Some("is not a directory");
    }
    if meta.uid() != me && (own || meta.uid() != 0) {
        return Some("is owned by another user");
    }
    let others_write = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    if own && mode & 0o077 != 0 {
        return Some("may be read or written by other users (it must be mode 0700)");
    }
    if others_write && !sticky {
        return Some("may be written by other users");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh directory under the system's temporary directory.
    fn scratch() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "callme-cache-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    fn mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_directory_of_its_own_is_made_and_reused() {
        let dir = scratch().join("cache");
        let artifacts = artifacts_dir(&dir).expect("a fresh directory");
        assert_eq!(artifacts, dir.canonicalize().unwrap().join(ARTIFACTS));
        let meta = std::fs::metadata(&artifacts).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        assert_eq!(artifacts_dir(&dir).expect("again"), artifacts);
    }

    #[test]
    fn a_directory_others_may_write_to_is_refused() {
        let dir = scratch().join("cache");
        std::fs::create_dir(&dir).unwrap();
        mode(&dir, 0o777);
        let e = artifacts_dir(&dir).unwrap_err();
        assert!(e.contains("may be written by other users"), "{e}");
        // Sticky, as /tmp is: others cannot swap what is in it.
        mode(&dir, 0o1777);
        artifacts_dir(&dir).expect("a sticky directory above");
        // The cache's own directory, opened up.
        mode(&dir.join(ARTIFACTS), 0o755);
        let e = artifacts_dir(&dir).unwrap_err();
        assert!(e.contains("must be mode 0700"), "{e}");
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let dir = scratch().join("cache");
        std::fs::create_dir(&dir).unwrap();
        // Only root may give a directory away; as anyone else, a
        // directory above owned by another user is what there is to test.
        if std::os::unix::fs::chown(&dir, Some(65534), None).is_ok() {
            let e = artifacts_dir(&dir).unwrap_err();
            assert!(e.contains("owned by another user"), "{e}");
        } else {
            let me = rustix::process::geteuid().as_raw();
            let meta = std::fs::metadata("/").unwrap();
            assert_eq!(
                unsafe_dir(&meta, me + 1, true),
                Some("is owned by another user")
            );
        }
    }

    #[test]
    fn a_link_to_a_directory_others_may_write_to_is_refused() {
        let base = scratch();
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        mode(&open, 0o777);
        let link = base.join("cache");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        let e = artifacts_dir(&link).unwrap_err();
        assert!(e.contains("may be written by other users"), "{e}");
        // A link to a safe directory is followed, and its real path used.
        mode(&open, 0o700);
        let artifacts = artifacts_dir(&link).expect("a link to a safe directory");
        assert_eq!(artifacts, open.canonicalize().unwrap().join(ARTIFACTS));
    }

    #[test]
    fn a_file_in_the_way_is_refused() {
        let dir = scratch().join("cache");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(ARTIFACTS), b"not a directory").unwrap();
        assert!(artifacts_dir(&dir).is_err());
    }
}
