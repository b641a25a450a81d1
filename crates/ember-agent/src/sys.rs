//! Thin, safe wrappers over the system calls the agent needs that std does
//! not offer. Process creation lives in `spawn.rs`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The signals the agent handles through its signalfd: child exits, and
/// the ones it forwards to running execs (like tini).
pub const FORWARDED: [libc::c_int; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `pipe2(O_CLOEXEC | flags)`: (read end, write end).
pub fn pipe(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | flags) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller owns; no pointers.
    unsafe {
        let fl = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK))?;
    }
    Ok(())
}

/// Makes sure descriptors 0, 1 and 2 are open (on `/dev/null` if not), so
/// no socket or pipe the agent opens later lands on them.
pub fn ensure_stdio() -> io::Result<()> {
    for fd in 0..3 {
        // SAFETY: F_GETFD only inspects the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            let path = c"/dev/null";
            // SAFETY: a NUL-terminated path; the lowest free descriptor,
            // which is `fd`, is returned and deliberately kept open forever.
            cvt(unsafe { libc::open(path.as_ptr(), libc::O_RDWR) })?;
        }
    }
    Ok(())
}

/// Blocks SIGCHLD and [`FORWARDED`] and returns a non-blocking signalfd
/// that reports them. Also ignores SIGPIPE (a client that goes away must
/// not kill the agent).
pub fn signalfd() -> io::Result<OwnedFd> {
    // SAFETY: the sigset is initialised by sigemptyset before use and only
    // passed by pointer to the calls that read it; the agent is
    // single-threaded, so sigprocmask is the process's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        cvt(libc::sigprocmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let fd = cvt(libc::signalfd(
            -1,
            &set,
            libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
        ))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Reads one pending signal number from a non-blocking signalfd.
pub fn read_signal(fd: &OwnedFd) -> io::Result<Option<libc::c_int>> {
    // SAFETY: signalfd_siginfo is plain data; all-zero is a valid value.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`, which is that large.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut info).cast(), size) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            io::ErrorKind::Interrupted => read_signal(fd),
            _ => Err(e),
        };
    }
    if n as usize != size {
        return Err(io::Error::other("short read from signalfd"));
    }
    Ok(Some(info.ssi_signo as libc::c_int))
}

/// `prctl(PR_SET_CHILD_SUBREAPER)`: orphaned descendants are reparented to
/// the agent rather than to the host's init, so the agent can reap and
/// kill them when it is not PID 1.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: a prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) })?;
    Ok(())
}

/// `poll(2)`; EINTR counts as "nothing ready".
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, exclusively borrowed slice of pollfd of the
    // given length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

/// `kill(2)`; ESRCH (nothing left to signal) is not an error.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<bool> {
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(pid, sig) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// A reaped child.
pub struct Reaped {
    /// Its pid.
    pub pid: libc::pid_t,
    /// Its wait status.
    pub status: libc::c_int,
    /// Its resource usage, including the descendants it waited for.
    pub rusage: libc::rusage,
}

/// `wait4(-1, WNOHANG)`: one exited child, if any.
pub fn reap_one() -> Option<Reaped> {
    let mut status = 0;
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: status and rusage are valid for writes for the call.
        let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut rusage) };
        if pid > 0 {
            return Some(Reaped {
                pid,
                status,
                rusage,
            });
        }
        if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

/// `wait4(pid, 0)`: blocks until that child exits (used only for a child
/// known to be about to exit).
pub fn wait_for(pid: libc::pid_t) -> Option<Reaped> {
    let mut status = 0;
    // SAFETY: rusage is plain data; all-zero is a valid value.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: status and rusage are valid for writes for the call.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r == pid {
            return Some(Reaped {
                pid,
                status,
                rusage,
            });
        }
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

/// `strerror`-style text for an errno, without the "(os error N)" suffix.
pub fn errno_text(errno: i32) -> String {
    let s = io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// Sets the process umask, returning the old one.
pub fn umask(mask: libc::mode_t) -> libc::mode_t {
    // SAFETY: umask cannot fail and takes a plain integer.
    unsafe { libc::umask(mask) }
}

/// Opens `/dev/null` read-write, close-on-exec.
pub fn open_devnull() -> io::Result<OwnedFd> {
    let f = File::options().read(true).write(true).open("/dev/null")?;
    Ok(f.into())
}
