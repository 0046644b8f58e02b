//! The unsafe edge: adopting inherited fds, fork and exec, pidfds, signal
//! dispositions. Everything else in the crate is safe code.
//!
//! Code between `fork` and `exec` (see [`spawn`]) is async-signal-safe: the
//! whole argv, environment and fd layout are prepared before forking, and the
//! child only calls `sigprocmask`, `signal`, `getpid`, `chdir`, `dup2`,
//! `execve`, `write` and `_exit`.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::Signal;
use nix::sys::stat::{fstat, SFlag};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};

/// Set once the inherited fds of this process have been taken: they can be
/// owned only once.
static INHERITED_TAKEN: AtomicBool = AtomicBool::new(false);

/// Marks the inherited fds as taken; false when they already were.
pub(crate) fn take_inherited_once() -> bool {
    !INHERITED_TAKEN.swap(true, Ordering::SeqCst)
}

/// Takes ownership of an fd number passed by the process that started us,
/// after checking that it is open, and marks it close-on-exec at once so that
/// nothing we start inherits it.
///
/// Callers must call this at most once per fd number, and only for numbers the
/// protocol assigned to this process (`LISTEN_PID` matched), guarded by
/// [`take_inherited_once`].
pub(crate) fn adopt(fd: RawFd, name: &str) -> Result<OwnedFd> {
    let bad = |problem: String| Error::InheritedFd {
        name: name.to_owned(),
        fd,
        problem,
    };
    // SAFETY: F_GETFD only reads the flags of the number; it is harmless on a
    // closed or foreign number and tells us whether it is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(format!("is not open ({})", io::Error::last_os_error())));
    }
    // SAFETY: the fd is open (checked above), it was passed to this process by
    // the protocol, and `take_inherited_once` guarantees nothing else in this
    // process takes ownership of it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(owned.as_fd()).map_err(|e| bad(format!("cannot be set close-on-exec: {e}")))?;
    Ok(owned)
}

/// Sets close-on-exec on an fd.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// What an fd is, in words, when it is not a socket (`None` for a socket).
pub(crate) fn non_socket_kind(fd: BorrowedFd<'_>) -> io::Result<Option<&'static str>> {
    let stat = fstat(fd)?;
    let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
    Ok(match kind {
        SFlag::S_IFSOCK => None,
        SFlag::S_IFREG => Some("a regular file"),
        SFlag::S_IFDIR => Some("a directory"),
        SFlag::S_IFIFO => Some("a pipe"),
        SFlag::S_IFCHR => Some("a character device"),
        SFlag::S_IFBLK => Some("a block device"),
        SFlag::S_IFLNK => Some("a symbolic link"),
        _ => Some("not a socket"),
    })
}

/// Registers an fd we own (an `OwnedFd`, an `Arc` of one, a `SignalFd`)
/// with Tokio's reactor (it must be non-blocking).
pub(crate) fn async_fd<T: AsRawFd>(fd: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: the AsyncFd owns `fd` (an owner of the fd, or a share of
    // one): the fd stays open, and is neither replaced nor closed, for as
    // long as it is registered.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Duplicates an fd to a number at least `min`, close-on-exec.
pub(crate) fn dup_above(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Does nothing: a handler that keeps a signal from killing the process.
extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs a handler that does nothing if the signal's disposition is still
/// the default, so that a signal arriving before the real handlers are
/// installed does not kill the process (SIGHUP's default action is to
/// terminate). Unlike `SIG_IGN`, a handler is reset to the default at exec,
/// so the app's own children do not inherit an ignored signal.
pub(crate) fn ignore_if_default(signal: Signal) -> io::Result<()> {
    let sig = signal as libc::c_int;
    // SAFETY: a zeroed sigaction is a valid out-parameter.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only queries the current one into `old`.
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if old.sa_sigaction == libc::SIG_DFL {
        // SAFETY: a zeroed sigaction (empty mask, no flags) is valid storage.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: the handler is async-signal-safe (it does nothing); a
        // handler installed later (by Tokio) replaces it.
        if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Finds a program the way `execvp` does, for the library's upgrades and
/// the supervisor's commands alike: a name with a `/` is used as it is; a
/// bare name is looked up in `path_var` (`PATH`; `/usr/local/bin:/usr/bin:/bin`
/// when unset), where an empty entry means the working directory, and the
/// first executable regular file wins.
pub(crate) fn find_program(
    program: &OsStr,
    path_var: Option<&OsStr>,
) -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the program name is empty",
        ));
    }
    if program.as_bytes().contains(&b'/') {
        return Ok(std::path::PathBuf::from(program));
    }
    let dirs = path_var.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    for dir in std::env::split_paths(dirs) {
        let dir = if dir.as_os_str().is_empty() {
            std::path::PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        let executable = std::fs::metadata(&candidate)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if executable {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{} is not found in PATH",
            std::path::Path::new(program).display()
        ),
    ))
}

/// Width reserved for the digits of `LISTEN_PID`, filled in after `fork`.
const PID_DIGITS: usize = 20;

/// A fully prepared `execve`: nothing in it allocates after `fork`.
pub(crate) struct Exec {
    path: CString,
    argv: Vec<CString>,
    /// `KEY=VALUE\0` entries; the `LISTEN_PID` one has a zeroed slot of
    /// `PID_DIGITS` bytes after the `=`.
    env: Vec<Vec<u8>>,
    listen_pid_entry: Option<usize>,
    cwd: Option<CString>,
    /// Start the child in a process group of its own (`setpgid(0, 0)`).
    process_group: bool,
}

fn cstring(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

impl Exec {
    /// Prepares the exec of `path` with `argv` (including `argv[0]`), the
    /// given environment, and a `LISTEN_PID` set to the child's own pid when
    /// `listen_pid` is true.
    pub(crate) fn new<'a, 'e>(
        path: &OsStr,
        argv: impl IntoIterator<Item = &'a OsStr>,
        env: impl IntoIterator<Item = (&'e OsStr, &'e OsStr)>,
        listen_pid: bool,
        cwd: Option<&OsStr>,
    ) -> io::Result<Self> {
        let path = cstring(path.as_bytes(), "the executable path")?;
        let argv = argv
            .into_iter()
            .map(|a| cstring(a.as_bytes(), "an argument"))
            .collect::<io::Result<Vec<_>>>()?;
        let mut entries = Vec::new();
        for (key, value) in env {
            if key.as_bytes().contains(&b'=') || key.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "an environment variable name is empty or contains '='",
                ));
            }
            let mut entry = Vec::with_capacity(key.len() + value.len() + 2);
            entry.extend_from_slice(key.as_bytes());
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            // Checks for interior NULs, then keeps the bytes with their NUL.
            entries.push(cstring(&entry, "an environment variable")?.into_bytes_with_nul());
        }
        let listen_pid_entry = listen_pid.then(|| {
            let mut entry = b"LISTEN_PID=".to_vec();
            entry.resize(entry.len() + PID_DIGITS + 1, 0);
            entries.push(entry);
            entries.len() - 1
        });
        let cwd = cwd
            .map(|c| cstring(c.as_bytes(), "the working directory"))
            .transpose()?;
        Ok(Exec {
            path,
            argv,
            env: entries,
            listen_pid_entry,
            cwd,
            process_group: false,
        })
    }
}

impl Exec {
    /// Starts the child in a process group of its own, so that the whole
    /// group (the child and whatever it starts and does not move elsewhere)
    /// can be signalled at once with [`Child::signal_group`] or
    /// [`signal_group`].
    pub(crate) fn in_new_process_group(mut self) -> Self {
        self.process_group = true;
        self
    }

    /// Prepares the exec of a new generation: `base_env` plus the protocol
    /// variables of `handoff`, and `LISTEN_PID` set to the child's own pid.
    pub(crate) fn generation<'a>(
        path: &OsStr,
        argv: impl IntoIterator<Item = &'a OsStr>,
        base_env: &[(OsString, OsString)],
        handoff: &crate::protocol::Handoff<'_>,
        cwd: Option<&OsStr>,
    ) -> io::Result<Self> {
        let vars = handoff.render();
        let env = base_env
            .iter()
            .map(|(k, v)| (k.as_os_str(), v.as_os_str()))
            .chain(
                vars.iter()
                    .map(|(k, v)| (OsStr::new(*k), OsStr::new(v.as_str()))),
            );
        Exec::new(path, argv, env, true, cwd)
    }
}

/// Writes `value` in decimal at `dst` followed by a NUL. Async-signal-safe.
///
/// # Safety
/// `dst` must be valid for writes of `PID_DIGITS + 1` bytes.
unsafe fn write_decimal(dst: *mut u8, value: u32) {
    let mut digits = [0u8; PID_DIGITS];
    let mut n = value;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: i < len <= PID_DIGITS, within the caller's buffer.
        unsafe { *dst.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: len <= PID_DIGITS, and the buffer holds PID_DIGITS + 1 bytes.
    unsafe { *dst.add(len) = 0 };
}

/// Reports `errno` on the exec-error pipe and exits. Async-signal-safe.
fn child_fail(err_fd: RawFd) -> ! {
    // SAFETY: errno is thread-local and readable anywhere.
    let errno = unsafe { *libc::__errno_location() };
    let bytes = errno.to_ne_bytes();
    // SAFETY: `bytes` is a live buffer of 4 bytes; `_exit` is always safe to
    // call and skips atexit handlers and stdio flushing, as a forked child must.
    unsafe {
        libc::write(err_fd, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// Forks and execs `exec`, with `fds[i]` at fd `3 + i` in the child
/// (close-on-exec cleared there) and every other fd close-on-exec in the
/// child, whatever this process inherited. Returns the child's pid once it
/// has exec'd, or the reason it could not; the caller must reap it.
///
/// Every signal is blocked in the calling thread across the `fork`, so that
/// no handler of this process runs in the child before its dispositions are
/// reset; the child then unblocks everything (a fresh program starts with an
/// empty mask), and the caller's mask is restored.
pub(crate) fn spawn(mut exec: Exec, fds: &[BorrowedFd<'_>]) -> io::Result<i32> {
    let first = crate::protocol::FIRST_FD;
    let above = first + fds.len() as RawFd;
    // Every source is moved above the target range first, so no dup2 in the
    // child can overwrite a source it still needs, and no dup2 is a no-op
    // (dup2(fd, fd) would leave close-on-exec set).
    let high: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| dup_above(*fd, above))
        .collect::<io::Result<_>>()?;
    let high_raw: Vec<RawFd> = high.iter().map(AsRawFd::as_raw_fd).collect();
    let (err_read, err_write_low) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let err_write = dup_above(err_write_low.as_fd(), above)?;
    // Only the high copy may stay open: the parent reads until every write
    // end is closed.
    drop(err_write_low);
    let err_raw = err_write.as_raw_fd();
    // For the fallback of `close_range` in the child: the highest fd number
    // this process can have.
    let fd_limit = max_fd_number();

    let argv_ptrs: Vec<*const libc::c_char> = exec
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let env_ptrs: Vec<*mut libc::c_char> = exec
        .env
        .iter_mut()
        .map(|e| e.as_mut_ptr().cast())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect();
    let pid_slot: *mut u8 = match exec.listen_pid_entry {
        // "LISTEN_PID=" is 11 bytes; the slot of PID_DIGITS + 1 bytes follows.
        // SAFETY: the entry was made 11 + PID_DIGITS + 1 bytes long in `Exec::new`.
        Some(i) => unsafe { env_ptrs[i].cast::<u8>().add(11) },
        None => std::ptr::null_mut(),
    };
    let cwd_ptr = exec.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    let path_ptr = exec.path.as_ptr();
    let new_group = exec.process_group;
    let masks = SignalMasks::new();
    let old_mask = masks.block_all()?;

    // SAFETY: the child branch below runs only async-signal-safe calls on
    // memory prepared before the fork (pointers into `exec`, `high_raw`,
    // `masks`), which stays alive until the parent returns, and ends in
    // execve or _exit; it never returns into Rust code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see above: only async-signal-safe calls from here to exec.
        unsafe {
            // Every signal is blocked (by the parent, across the fork): reset
            // the dispositions first, then unblock, so that no handler of the
            // parent ever runs here.
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    reset_disposition(sig);
                }
            }
            libc::sigprocmask(libc::SIG_SETMASK, &masks.empty, std::ptr::null_mut());
            if new_group && libc::setpgid(0, 0) != 0 {
                child_fail(err_raw);
            }
            if !pid_slot.is_null() {
                write_decimal(pid_slot, libc::getpid() as u32);
            }
            if !cwd_ptr.is_null() && libc::chdir(cwd_ptr) != 0 {
                child_fail(err_raw);
            }
            for (i, &src) in high_raw.iter().enumerate() {
                if libc::dup2(src, first + i as RawFd) < 0 {
                    child_fail(err_raw);
                }
            }
            // Nothing above the passed fds survives the exec, whatever this
            // process inherited without close-on-exec (the error pipe is
            // close-on-exec already and stays open until the exec).
            cloexec_above(above, fd_limit);
            libc::execve(path_ptr, argv_ptrs.as_ptr(), env_ptrs.as_ptr().cast());
            child_fail(err_raw);
        }
    }
    let fork_error = (pid < 0).then(io::Error::last_os_error);
    masks.restore(&old_mask);
    if let Some(e) = fork_error {
        return Err(e);
    }

    drop(err_write);
    drop(high);
    let mut buf = [0u8; 4];
    let mut got = 0;
    let mut file = std::fs::File::from(err_read);
    while got < buf.len() {
        match io::Read::read(&mut file, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Whether it exec'd is unknown: do not leave it behind.
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = waitpid(Pid::from_raw(pid), None);
                return Err(e);
            }
        }
    }
    if got == buf.len() {
        // exec failed: the child has exited with 127; reap it.
        let _ = waitpid(Pid::from_raw(pid), None);
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)));
    }
    Ok(pid)
}

/// Signal sets prepared before a fork: the child may not build them.
struct SignalMasks {
    all: libc::sigset_t,
    empty: libc::sigset_t,
}

impl SignalMasks {
    fn new() -> Self {
        // SAFETY: zeroed sigset_t values are valid storage; sigfillset and
        // sigemptyset initialise them.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::sigemptyset(&mut empty);
            SignalMasks { all, empty }
        }
    }

    /// Blocks every signal in the calling thread; returns the mask before.
    fn block_all(&self) -> io::Result<libc::sigset_t> {
        // SAFETY: a zeroed sigset_t is valid storage for the old mask.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to live, initialised signal sets.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &self.all, &mut old) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(old)
    }

    /// Puts back the mask `block_all` returned.
    fn restore(&self, old: &libc::sigset_t) {
        // SAFETY: `old` is the mask pthread_sigmask filled in; cannot fail
        // with a valid `how`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
    }
}

/// The highest fd number this process may have (`RLIMIT_NOFILE`, capped).
fn max_fd_number() -> RawFd {
    // SAFETY: a zeroed rlimit is valid storage for getrlimit's answer.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes one rlimit into the live struct.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return 1 << 20;
    }
    RawFd::try_from(limit.rlim_cur)
        .unwrap_or(RawFd::MAX)
        .min(1 << 20)
}

/// Marks every fd from `first` up close-on-exec: `close_range` with
/// `CLOSE_RANGE_CLOEXEC` (Linux 5.11), else one `fcntl` per number up to
/// `limit`. Async-signal-safe: used between `fork` and `exec`.
fn cloexec_above(first: RawFd, limit: RawFd) {
    // SAFETY: close_range only changes the flags of this process's fds in
    // the range; it touches no memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return;
    }
    for fd in first..limit {
        // SAFETY: F_GETFD/F_SETFD read and set the flags of a number; on a
        // number that is not open they fail with EBADF and change nothing.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// A child process we started and must reap.
pub(crate) struct Child {
    pid: i32,
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<WaitStatus>,
    /// It leads a process group of its own (see [`Exec::in_new_process_group`]).
    group: bool,
    /// Let go: it serves on, and is no longer ours to kill.
    detached: bool,
}

/// Sends `signal` to every process of the process group `pgid` (which must
/// be a group one of our children leads). `ESRCH` (the group is empty) is
/// not an error.
pub(crate) fn signal_group(pgid: i32, signal: Signal) -> io::Result<()> {
    if pgid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to signal process group 0 or 1",
        ));
    }
    match nix::sys::signal::killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd (close-on-exec by definition of
    // pidfd_open) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

impl Drop for Child {
    /// A child that was never reaped is killed (with its process group when
    /// it leads one) and reaped here, so that no generation outlives the
    /// handle that was to wait for it.
    fn drop(&mut self) {
        if self.status.is_some() || self.detached {
            return;
        }
        if matches!(self.try_wait(), Ok(Some(_))) {
            if self.group {
                let _ = signal_group(self.pid, Signal::SIGKILL);
            }
            return;
        }
        if self.group {
            let _ = signal_group(self.pid, Signal::SIGKILL);
        }
        let _ = self.signal(Signal::SIGKILL);
        while let Err(nix::errno::Errno::EINTR) = waitpid(Pid::from_raw(self.pid), None) {}
        tracing::warn!(
            pid = self.pid,
            "a child handle was dropped before its process ended: killed and reaped"
        );
    }
}

impl Child {
    /// Takes charge of `pid`, a child just started by [`spawn`]: it is
    /// reaped by [`wait`](Child::wait), or killed and reaped on drop.
    /// `group` says whether it leads a process group of its own.
    pub(crate) fn new(pid: i32, group: bool) -> Self {
        // Without pidfds (Linux < 5.3) `wait` falls back to polling.
        let pidfd = pidfd_open(pid).ok().and_then(|fd| async_fd(fd).ok());
        Child {
            pid,
            pidfd,
            status: None,
            group,
            detached: false,
        }
    }

    /// Lets the child go: it is serving in our place, and outlives us. It
    /// is no longer killed on drop (the process that outlives it reaps it,
    /// or its parent's exit reparents it).
    pub(crate) fn detach(mut self) {
        self.detached = true;
    }

    /// Sends `signal` to the child, and to the process group it was started
    /// in when it leads one (it may have moved to another group since: what
    /// it started before stays in the first).
    pub(crate) fn signal_everything(&self, signal: Signal) -> io::Result<()> {
        let own = self.signal(signal);
        if self.group {
            signal_group(self.pid, signal)?;
        }
        own
    }

    /// The child's pid.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Reaps the child if it has exited.
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<WaitStatus>> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        match waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG))? {
            WaitStatus::StillAlive => Ok(None),
            status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => {
                self.status = Some(status);
                Ok(Some(status))
            }
            _ => Ok(None),
        }
    }

    /// Waits until the child exits, and reaps it.
    pub(crate) async fn wait(&mut self) -> io::Result<WaitStatus> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            match &self.pidfd {
                Some(fd) => {
                    let mut guard = fd.readable().await?;
                    guard.clear_ready();
                }
                None => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }

    /// Sends a signal, unless the child was already reaped. Through the
    /// pidfd when there is one, so that a pid reused after someone else
    /// reaped the child is never hit.
    pub(crate) fn signal(&self, signal: Signal) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        if let Some(fd) = &self.pidfd {
            let raw = fd.get_ref().as_raw_fd();
            // SAFETY: pidfd_send_signal takes an fd we own, a signal number,
            // a null siginfo (the kernel fills one in) and no flags.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    raw,
                    signal as libc::c_int,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(());
        }
        nix::sys::signal::kill(Pid::from_raw(self.pid), signal)?;
        Ok(())
    }
}

/// A wait status as the standard library's [`std::process::ExitStatus`].
pub(crate) fn exit_status(status: WaitStatus) -> std::process::ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    let raw = match status {
        WaitStatus::Exited(_, code) => (code & 0xff) << 8,
        WaitStatus::Signaled(_, signal, core) => signal as i32 | if core { 0x80 } else { 0 },
        _ => 0xff << 8,
    };
    std::process::ExitStatus::from_raw(raw)
}

/// The start time of `pid` (`/proc/<pid>/stat` field 22, clock ticks since
/// boot), which tells it from a later process with the same pid; `None`
/// when no such process exists (or it is a zombie).
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold anything; split at the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    // Field 22 overall is the 20th after the comm.
    fields.get(19)?.parse().ok()
}

/// The process group of this process.
pub(crate) fn process_group() -> i32 {
    nix::unistd::getpgrp().as_raw()
}

/// Moves this process into the existing process group `pgid` (of the same
/// session).
pub(crate) fn join_process_group(pgid: i32) -> io::Result<()> {
    nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(pgid))?;
    Ok(())
}

/// Describes how a process ended, in words.
pub(crate) fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("was killed by {}", signal.as_str()),
        other => format!("changed state ({other:?})"),
    }
}

// ---------------------------------------------------------------------------
// Helpers of the `handover run` supervisor: reaping any child, signals by
// number (real-time ones included), and fds received with SCM_RIGHTS.

/// Reaps one child that has exited, whichever it is (`waitpid(-1, WNOHANG)`):
/// the supervisor's own children and orphans reparented to it alike.
/// `Ok(None)` when no child has exited (or there are no children).
pub(crate) fn reap_any() -> io::Result<Option<WaitStatus>> {
    reap(Pid::from_raw(-1))
}

/// Reaps `pid` if it has exited (`waitpid(pid, WNOHANG)`); `Ok(None)` while
/// it runs or when it is not (or no longer) our child.
pub(crate) fn reap_pid(pid: i32) -> io::Result<Option<WaitStatus>> {
    reap(Pid::from_raw(pid))
}

fn reap(pid: Pid) -> io::Result<Option<WaitStatus>> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                return Ok(Some(status))
            }
            // Stops and continues are not reported without WUNTRACED and
            // WCONTINUED; anything else means nothing has exited.
            Ok(_) => return Ok(None),
            Err(nix::errno::Errno::ECHILD) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends signal number `signo` to `pid`. Unlike [`Signal`], any number the
/// kernel knows is accepted, real-time signals included, so that the
/// supervisor can forward whatever it received.
pub(crate) fn send_signal_number(pid: i32, signo: i32) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to signal a process group or every process",
        ));
    }
    // SAFETY: kill takes plain integers; `pid > 0` names one process, never
    // a group or every process.
    if unsafe { libc::kill(pid, signo) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of fds the kernel just installed in this process (passed
/// with `SCM_RIGHTS`), so that they are closed when dropped.
///
/// # Safety
/// Every number in `raw` must be an fd received by the `recvmsg` call that
/// returned it, not yet owned by anything else, and passed here only once.
pub(crate) unsafe fn own_received_fds(raw: &[RawFd]) -> Vec<OwnedFd> {
    raw.iter()
        .filter(|fd| **fd >= 0)
        // SAFETY: the caller guarantees each fd is freshly received and
        // owned by nothing else.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect()
}

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Sets the disposition of `sig` to the default, with the raw system call:
/// glibc's `signal` and `sigaction` refuse its internal signals (32 and 33),
/// which a process started by `posix_spawn` (as `std::process::Command`
/// does) may have inherited as ignored, and an ignored disposition survives
/// `execve`. Async-signal-safe: used between `fork` and `exec`.
fn reset_disposition(sig: libc::c_int) {
    // All zeroes is `SIG_DFL` with no flags and an empty mask in the
    // kernel's `struct sigaction`, whatever the order of its fields; the
    // buffer is larger than any architecture's layout. The signal set is 8
    // bytes (64 signals) everywhere but MIPS, where the call fails and the
    // disposition stays as `signal` left it.
    let default = [0u64; 8];
    // SAFETY: rt_sigaction reads at most 64 bytes of `default`, writes
    // nothing (null old action), and only changes this process's disposition.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            default.as_ptr(),
            std::ptr::null_mut::<u64>(),
            8usize,
        );
    }
}

/// Marks every fd from `first` up close-on-exec, so that nothing this
/// process inherited (beyond what it passes on explicitly) reaches the
/// programs it starts. Returns how many fds it marked.
pub(crate) fn cloexec_from(first: RawFd) -> io::Result<usize> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        if let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        {
            if fd >= first {
                numbers.push(fd);
            }
        }
    }
    let mut marked = 0;
    for fd in numbers {
        // SAFETY: F_GETFD/F_SETFD only read and set the descriptor flags of
        // the number; on a number that is not open (the directory's own fd,
        // closed by now) they fail with EBADF and change nothing.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            // SAFETY: as above.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } == 0 {
                marked += 1;
            }
        }
    }
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_like_execvp() {
        assert_eq!(
            find_program(OsStr::new("./x/y"), None).unwrap(),
            std::path::PathBuf::from("./x/y")
        );
        assert_eq!(
            find_program(OsStr::new("sh"), Some(OsStr::new("/nonexistent:/bin"))).unwrap(),
            std::path::PathBuf::from("/bin/sh")
        );
        let e =
            find_program(OsStr::new("no-such-program-xyz"), Some(OsStr::new("/bin"))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(find_program(OsStr::new(""), None).is_err());
        let me = std::process::id() as i32;
        assert!(start_time(me).is_some());
        assert_eq!(start_time(me), start_time(me));
        assert_eq!(start_time(i32::MAX), None);
        // A regular file that nobody may execute is passed over.
        let dir = std::env::temp_dir().join(format!("handover-path-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("prog"), "").unwrap();
        let path = dir.as_os_str();
        assert!(find_program(OsStr::new("prog"), Some(path)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
