//! Starting an exec's child: validate and convert the request once, then
//! `clone(CLONE_VM | CLONE_VFORK)` and, in the child, only plain system
//! calls up to `execve` — what glibc's `posix_spawn` does, plus the
//! credentials `posix_spawn` cannot set.
//!
//! The child shares the agent's memory until `execve`, and the agent is
//! suspended until then (CLONE_VFORK), so nothing is copied: no page
//! tables, no copy-on-write faults afterwards. The price is discipline in
//! the child: it runs on its own stack (reused across spawns), allocates
//! nothing, takes no lock, uses raw system calls for credentials (glibc's
//! `setuid` would try to broadcast to the agent's threads), and reports a
//! failure by writing the stage and errno into a struct the agent reads
//! once it resumes. "Started" therefore means the new program's `execve`
//! succeeded.

use std::ffi::{CString, c_char, c_void};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use ember_agent_proto::ExecRequest;

use crate::sys;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The descriptor a `ready` exec gets its end of the readiness socket on.
pub const READY_FD: RawFd = 3;
/// The environment variable naming it.
pub const READY_ENV: &str = "EMBER_READY_FD";

/// A request converted to what `execve` and friends take, built before
/// cloning, so the child allocates nothing.
pub struct Prepared {
    /// Paths to try in order (one, unless `argv[0]` was looked up in PATH).
    candidates: Vec<CString>,
    /// Kept alive for `argv_ptrs`.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    /// Kept alive for `envp_ptrs`.
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const c_char>,
    cwd: Option<CString>,
    uid: Option<libc::uid_t>,
    gid: Option<libc::gid_t>,
    program: String,
    /// The child gets a readiness socket at [`READY_FD`].
    pub ready: bool,
}

fn cstring(what: &str, s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
}

/// Validates `req` and converts it; the error is a message for the client.
pub fn prepare(req: &ExecRequest) -> Result<Prepared, String> {
    let program = req.argv.first().ok_or("argv is empty")?;
    if program.is_empty() {
        return Err("argv[0] is empty".into());
    }
    let argv = req
        .argv
        .iter()
        .map(|a| cstring("an argv entry", a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut path_var = None;
    let mut envp = Vec::with_capacity(req.env.len() + 1);
    let ready_entry = format!("{READY_ENV}={READY_FD}");
    if req.ready {
        envp.push(cstring("an env entry", &ready_entry)?);
    }
    for e in &req.env {
        match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                if k == "PATH" && path_var.is_none() {
                    path_var = Some(v);
                }
            }
            _ => return Err(format!("env entry {e:?} is not KEY=VALUE")),
        }
        // The agent's own value wins over one the request carries.
        if req.ready && e.split_once('=').is_some_and(|(k, _)| k == READY_ENV) {
            continue;
        }
        envp.push(cstring("an env entry", e)?);
    }
    let candidates = if program.contains('/') {
        vec![cstring("argv[0]", program)?]
    } else {
        path_var
            .unwrap_or(DEFAULT_PATH)
            .split(':')
            .map(|dir| {
                let dir = if dir.is_empty() { "." } else { dir };
                cstring("PATH", &format!("{dir}/{program}"))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    let cwd = match &req.cwd {
        Some(c) if c.is_empty() => return Err("cwd is empty".into()),
        Some(c) => Some(cstring("cwd", c)?),
        None => None,
    };
    let argv_ptrs = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs = envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    Ok(Prepared {
        candidates,
        _argv: argv,
        argv_ptrs,
        _envp: envp,
        envp_ptrs,
        cwd,
        uid: req.uid,
        gid: req.gid,
        program: program.clone(),
        ready: req.ready,
    })
}

/// A running child and the agent's ends of its pipes (non-blocking).
pub struct Child {
    /// Pid, also the child's process group and session id.
    pub pid: libc::pid_t,
    /// Read end of the child's stdout.
    pub stdout: File,
    /// Read end of the child's stderr.
    pub stderr: File,
    /// Write end of the child's stdin, when the request carried stdin.
    pub stdin: Option<File>,
    /// The agent's end of the readiness socket (non-blocking), for
    /// `ready` execs.
    pub ready: Option<UnixStream>,
}

/// What `spawn` achieved.
pub enum Spawned {
    /// The program is running.
    Running(Child),
    /// The child could not get as far as running the program; it has been
    /// reaped already.
    Failed {
        /// `exec /x: No such file or directory`, `chdir /y: ...`.
        message: String,
        /// 126 for permission errors at `execve`, else 127 (as shells do).
        exit_code: i32,
    },
}

// Where the child failed, reported with errno through `ChildCtx`.
const STAGE_SETSID: u32 = 1;
const STAGE_DUP: u32 = 2;
const STAGE_SETGROUPS: u32 = 3;
const STAGE_SETGID: u32 = 4;
const STAGE_SETUID: u32 = 5;
const STAGE_CHDIR: u32 = 6;
const STAGE_EXEC: u32 = 7;

/// Size of the child's stack: it only makes system calls.
pub const CHILD_STACK: usize = 64 * 1024;

/// What the child reads, and writes back on failure. Shared memory: the
/// child runs in the agent's address space until `execve`.
struct ChildCtx<'a> {
    p: &'a Prepared,
    /// stdin, stdout, stderr, and the readiness socket or -1.
    fds: [RawFd; 4],
    /// 0 while all goes well; a `STAGE_*` when the child gave up.
    stage: u32,
    errno: i32,
}

/// Spawns `p`. Stdin is a pipe when `with_stdin`, else `devnull`. `stack`
/// is the child's stack, at least [`CHILD_STACK`] bytes, reused across
/// calls. Errors are the agent's own (out of descriptors, clone failed).
pub fn spawn(
    p: &Prepared,
    with_stdin: bool,
    devnull: &OwnedFd,
    stack: &mut [u8],
) -> io::Result<Spawned> {
    let (out_r, out_w) = sys::pipe(0)?;
    let (errout_r, errout_w) = sys::pipe(0)?;
    let (in_r, in_w) = if with_stdin {
        let (r, w) = sys::pipe(0)?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    // Close-on-exec on both ends (std's socketpair), so only the dup2'd
    // copy reaches the program.
    let ready = if p.ready {
        Some(UnixStream::pair()?)
    } else {
        None
    };
    let stdin_fd = in_r.as_ref().unwrap_or(devnull).as_raw_fd();
    let ready_fd = ready.as_ref().map_or(-1, |(_, theirs)| theirs.as_raw_fd());
    let mut ctx = ChildCtx {
        p,
        fds: [stdin_fd, out_w.as_raw_fd(), errout_w.as_raw_fd(), ready_fd],
        stage: 0,
        errno: 0,
    };
    let ctx_ptr: *mut ChildCtx = &mut ctx;
    // The stack grows down: pass its top, 16-byte aligned as the ABI wants.
    let top = stack.as_mut_ptr_range().end as usize & !15;

    // SAFETY: `child_entry` runs on `stack`, which is exclusively borrowed
    // for this call and is not used by the agent while the child runs:
    // CLONE_VFORK suspends the agent until the child has called execve or
    // exited, and the child touches only `ctx` (through `ctx_ptr`, which
    // outlives the call) and the prepared data it points to. The child
    // gets its own signal-handler table (no CLONE_SIGHAND), and the agent
    // installs no handlers, so no agent code runs in the child.
    let pid = unsafe {
        libc::clone(
            child_entry,
            top as *mut c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            ctx_ptr.cast(),
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the child is done with `ctx` (it has exec'd or exited); the
    // volatile reads keep the compiler from assuming the fields unchanged
    // across the clone.
    let (stage, errno) = unsafe {
        (
            std::ptr::read_volatile(&raw const (*ctx_ptr).stage),
            std::ptr::read_volatile(&raw const (*ctx_ptr).errno),
        )
    };
    drop(out_w);
    drop(errout_w);
    drop(in_r);
    let ready = ready.map(|(ours, _theirs)| ours);

    if stage == 0 {
        sys::set_nonblocking(out_r.as_raw_fd())?;
        sys::set_nonblocking(errout_r.as_raw_fd())?;
        if let Some(w) = &in_w {
            sys::set_nonblocking(w.as_raw_fd())?;
        }
        if let Some(r) = &ready {
            r.set_nonblocking(true)?;
        }
        return Ok(Spawned::Running(Child {
            pid,
            stdout: out_r.into(),
            stderr: errout_r.into(),
            stdin: in_w.map(File::from),
            ready,
        }));
    }
    // The child has exited: reap it now so it never shows up as an
    // unknown zombie.
    sys::wait_for(pid);
    let text = sys::errno_text(errno);
    let what = match stage {
        STAGE_SETSID => "setsid".to_owned(),
        STAGE_DUP => "dup2".to_owned(),
        STAGE_SETGROUPS => "setgroups".to_owned(),
        STAGE_SETGID => format!("setgid {}", p.gid.unwrap_or(0)),
        STAGE_SETUID => format!("setuid {}", p.uid.unwrap_or(0)),
        STAGE_CHDIR => format!(
            "chdir {}",
            p.cwd
                .as_ref()
                .map(|c| c.to_string_lossy())
                .unwrap_or_default()
        ),
        _ => format!("exec {}", p.program),
    };
    let denied = matches!(errno, libc::EACCES | libc::EPERM | libc::ENOEXEC);
    Ok(Spawned::Failed {
        message: format!("{what}: {text}"),
        exit_code: if stage == STAGE_EXEC && denied {
            126
        } else {
            127
        },
    })
}

extern "C" fn child_entry(arg: *mut c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildCtx` the agent passed to clone; the agent
    // is suspended and does not touch it until we exec or exit.
    let ctx = unsafe { &mut *arg.cast::<ChildCtx>() };
    // SAFETY: we are the clone child, as `child` requires.
    let (stage, errno) = unsafe { child(ctx.p, ctx.fds) };
    ctx.stage = stage;
    ctx.errno = errno;
    // SAFETY: ends only this child process.
    unsafe { libc::_exit(127) }
}

fn errno() -> i32 {
    // SAFETY: reads the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

/// The child side of `spawn`: new session, stdio, credentials, cwd, exec.
/// Returns only on failure: the stage and errno.
///
/// # Safety
///
/// Must be called only in the clone child, with `fds` open. Allocates
/// nothing and takes no lock.
unsafe fn child(p: &Prepared, fds: [RawFd; 4]) -> (u32, i32) {
    // SAFETY: (whole body) every call is a system call (or glibc's thin
    // wrapper of one) on pointers into `p`, which the agent built before
    // cloning and keeps alive while suspended; the pointer arrays are
    // NULL-terminated.
    unsafe {
        // The agent ignores SIGPIPE and blocks the signals it reads from
        // its signalfd; the program must start with the usual defaults.
        // Dispositions first, then the mask, so nothing pending is
        // delivered to an ignoring handler.
        for s in [
            libc::SIGPIPE,
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGQUIT,
        ] {
            libc::signal(s, libc::SIG_DFL);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        if libc::setsid() < 0 {
            return (STAGE_SETSID, errno());
        }
        for (target, &fd) in fds.iter().enumerate() {
            if fd < 0 {
                continue;
            }
            // dup2 clears close-on-exec on the new descriptor; all the
            // originals are close-on-exec and vanish at execve. A source
            // already at its target keeps its flag, so clear it by hand.
            // Stdio goes first, so the readiness socket cannot be
            // overwritten by it: 0-2 are always open in the agent, so the
            // socket is at 3 or above, and only its own dup2 writes 3.
            let r = if fd == target as RawFd {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target as RawFd)
            };
            if r < 0 {
                return (STAGE_DUP, errno());
            }
        }
        if p.uid.is_some() || p.gid.is_some() {
            let groups: [libc::gid_t; 1] = [p.gid.unwrap_or(0)];
            let n = usize::from(p.gid.is_some());
            if libc::syscall(libc::SYS_setgroups, n, groups.as_ptr()) < 0 {
                return (STAGE_SETGROUPS, errno());
            }
        }
        if let Some(gid) = p.gid
            && libc::syscall(libc::SYS_setgid, gid) < 0
        {
            return (STAGE_SETGID, errno());
        }
        if let Some(uid) = p.uid
            && libc::syscall(libc::SYS_setuid, uid) < 0
        {
            return (STAGE_SETUID, errno());
        }
        // After setuid, so the directory is entered with the program's own
        // permissions.
        if let Some(cwd) = &p.cwd
            && libc::chdir(cwd.as_ptr()) < 0
        {
            return (STAGE_CHDIR, errno());
        }
        // Like execvp: go on past candidates that do not exist; remember a
        // permission error in case nothing better turns up.
        let mut err = libc::ENOENT;
        for c in &p.candidates {
            libc::execve(c.as_ptr(), p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr());
            match errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => err = libc::EACCES,
                e => {
                    err = e;
                    break;
                }
            }
        }
        (STAGE_EXEC, err)
    }
}
