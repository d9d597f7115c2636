//! Directories made the way `mkdir -p` makes them, with an explicit mode.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use crate::{Error, Result};

/// Creates `path` and its missing parents, each with `mode` (less the umask); an existing
/// directory is fine. Mount points and the sandbox's guest root want `0o755`, not the
/// `0o777` of [`std::fs::create_dir_all`].
pub fn create_all(path: &Path, mode: u32) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| Error::new("creating", path, e))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn creates_missing_parents_with_the_mode_and_accepts_an_existing_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        // 0o700: no umask takes bits away from it, so the result is exact.
        create_all(&deep, 0o700).unwrap();
        for dir in ["a", "a/b", "a/b/c"] {
            let mode = fs::metadata(tmp.path().join(dir))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o7777, 0o700, "{dir}");
        }
        create_all(&deep, 0o700).unwrap();
    }

    #[test]
    fn a_file_in_the_way_is_an_error_naming_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, "").unwrap();
        let e = create_all(&file.join("d"), 0o755).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotADirectory);
        assert!(e
            .to_string()
            .contains(&format!("creating {}", file.join("d").display())));
        let e = create_all(&file, 0o755).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    }
}
