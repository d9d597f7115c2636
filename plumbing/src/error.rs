//! The error of every operation here: what was done, to which path, and the OS's answer.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// The result of an operation of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An I/O error with the action and path it came from (`writing "max" to
/// /sys/fs/cgroup/w/memory.max: Invalid argument`). The OS error stays inspectable:
/// callers retry on `EBUSY` or accept `NotFound`.
#[derive(Debug)]
pub struct Error {
    action: String,
    path: PathBuf,
    source: io::Error,
}

impl Error {
    pub(crate) fn new(action: impl Into<String>, path: &Path, source: io::Error) -> Self {
        Error {
            action: action.into(),
            path: path.to_path_buf(),
            source,
        }
    }

    /// The kind of the underlying I/O error.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }

    /// The errno of the underlying I/O error, if the OS gave one.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The source's message is part of this one, so `source()` stays `None`.
        write!(
            f,
            "{} {}: {}",
            self.action,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for Error {}

/// For callers that report `io::Error`: the kind is kept, the message names the path.
impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::new(e.kind(), e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_action_and_path_and_keeps_the_os_error() {
        let e = Error::new(
            "removing",
            Path::new("/x/y"),
            io::Error::from_raw_os_error(nix::libc::EBUSY),
        );
        assert_eq!(e.raw_os_error(), Some(nix::libc::EBUSY));
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        let message = e.to_string();
        assert!(message.starts_with("removing /x/y: "), "{message}");
        let io = io::Error::from(e);
        assert_eq!(io.kind(), io::ErrorKind::ResourceBusy);
        assert_eq!(io.to_string(), message);
    }
}
