//! A small filesystem of its own for full-disk tests.

use std::io;
use std::path::Path;
use std::process::Command;

/// A tmpfs of a given size mounted on a new temporary directory, unmounted
/// (and the directory removed) when dropped. Needs root.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it: `2m`,
    /// `256k`).
    pub fn mount(size: &str) -> io::Result<Tmpfs> {
        let dir = tempfile::tempdir()?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()?;
        if !st.success() {
            return Err(io::Error::other(format!(
                "mounting a {size} tmpfs on {}: {st}",
                dir.path().display()
            )));
        }
        Ok(Tmpfs { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
