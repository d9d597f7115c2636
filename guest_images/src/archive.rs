//! Writes newc cpio archives, the format the kernel unpacks as its initramfs. Every entry is
//! owned by root with mtime 0, so equal inputs give equal archives.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A newc cpio stream written to `W`; [`CpioArchive::finish`] writes the trailer.
#[derive(Debug)]
pub struct CpioArchive<W: Write> {
    out: W,
    ino: u32,
    /// Folders already in the archive, so [`CpioArchive::file_in_tree`] adds each once.
    dirs: BTreeSet<PathBuf>,
}

impl<W: Write> CpioArchive<W> {
    pub fn new(out: W) -> Self {
        CpioArchive {
            out,
            ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn header(&mut self, name: &str, mode: u32) -> cpio::newc::Builder {
        self.ino += 1;
        cpio::newc::Builder::new(name)
            .ino(self.ino)
            .mode(mode)
            .uid(0)
            .gid(0)
            .mtime(0)
    }

    /// A folder (mode 0755).
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.dirs.insert(PathBuf::from(name));
        self.header(name, 0o040755)
            .nlink(2)
            .write(&mut self.out, 0)
            .finish()?;
        Ok(())
    }

    /// A device node; `mode` carries the file type (`0o020000` for a character device).
    pub fn node(&mut self, name: &str, mode: u32, (major, minor): (u32, u32)) -> io::Result<()> {
        self.header(name, mode)
            .rdev_major(major)
            .rdev_minor(minor)
            .write(&mut self.out, 0)
            .finish()?;
        Ok(())
    }

    /// A regular file; `mode` carries the file type (`0o100000`) and permissions.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        let size =
            u32::try_from(data.len()).with_context(|| format!("{name} is too large for cpio"))?;
        let mut writer = self.header(name, mode).nlink(1).write(&mut self.out, size);
        writer.write_all(data)?;
        writer.finish()?;
        Ok(())
    }

    /// A regular file at a relative path, after whichever of its parent folders the archive
    /// does not hold yet.
    pub fn file_in_tree(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        let mut missing = Vec::new();
        let mut parent = Path::new(name).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            if !self.dirs.contains(dir) {
                missing.push(dir.to_path_buf());
            }
            parent = dir.parent();
        }
        for dir in missing.iter().rev() {
            self.dir(&dir.to_string_lossy())?;
        }
        self.file(name, mode, data)
    }

    /// Writes the trailer and hands back the stream.
    pub fn finish(mut self) -> io::Result<W> {
        cpio::newc::trailer(&mut self.out)?;
        Ok(self.out)
    }
}
