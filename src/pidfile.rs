//! PID files (`Options::pid_file`, `handover run --pid-file`): the pid of the
//! serving generation, replaced atomically (a temporary file in the same
//! directory, fsync, rename), removed on exit.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A pid file that remembers what it last wrote (the supervisor's).
pub(crate) struct PidFile {
    path: PathBuf,
    /// The pid last written, if any.
    written: Option<i32>,
}

impl PidFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        PidFile {
            path,
            written: None,
        }
    }

    /// Its path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file's content with `pid`: readers see the old pid or
    /// the new one, never an empty or half-written file. Does nothing if it
    /// holds `pid` already.
    pub(crate) fn write(&mut self, pid: i32) -> io::Result<()> {
        if self.written == Some(pid) {
            return Ok(());
        }
        write(&self.path, pid)?;
        self.written = Some(pid);
        Ok(())
    }

    /// Removes the file, if it still holds the pid we wrote last.
    pub(crate) fn remove(&mut self) -> io::Result<()> {
        match self.written.take() {
            Some(pid) => remove_if_names(&self.path, pid),
            None => Ok(()),
        }
    }
}

/// Replaces the content of `path` with `pid`: readers see the old pid or the
/// new one, never an empty or half-written file.
pub(crate) fn write(path: &Path, pid: i32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.write_all(format!("{pid}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself survives a crash once the directory is synced.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes `path` if it names `pid` (and not a generation that wrote it
/// since).
pub(crate) fn remove_if_names(path: &Path, pid: i32) -> io::Result<()> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim() == pid.to_string() => std::fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_replaced_removed() {
        let dir = std::env::temp_dir().join(format!("handover-pidfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("app.pid");
        let mut file = PidFile::new(path.clone());
        file.write(42).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "42\n");
        file.write(43).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "43\n");
        // Only the file itself is left: no temporary file.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        file.remove().unwrap();
        assert!(!path.exists());
        // A directory that does not exist: an error, nothing panics.
        let mut bad = PidFile::new(dir.join("missing/app.pid"));
        assert!(bad.write(1).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
