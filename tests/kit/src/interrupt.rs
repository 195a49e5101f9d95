//! Ctrl-C for the programs built on the kit (the demo, the fleet). Guards
//! clean up when they are dropped, but a signal ends the process without
//! running them, so [`clean_up_on_interrupt`] installs a handler that, on
//! the first SIGINT, SIGTERM or SIGHUP, removes what this process made by
//! name (every kit resource is named `pcl-<prefix>-<pid>-<n>`): it kills
//! this process's children, unmounts its mounts, deletes its namespaces
//! and temporary directories, and exits with status 130.

use std::{
    io::Read as _,
    os::fd::FromRawFd as _,
    path::Path,
    sync::atomic::{AtomicI32, Ordering},
};

static WAKE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = WAKE.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; one byte to our pipe.
        unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
    }
}

/// Installs the handler (once per process; later calls do nothing).
pub fn clean_up_on_interrupt() -> std::io::Result<()> {
    if WAKE.load(Ordering::Relaxed) >= 0 {
        return Ok(());
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds; close-on-exec keeps them from children.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    WAKE.store(fds[1], Ordering::Relaxed);
    // SAFETY: the read end is ours alone from here on.
    let mut wake = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    std::thread::spawn(move || {
        let mut byte = [0u8];
        if wake.read_exact(&mut byte).is_ok() {
            eprintln!("\ninterrupted: removing this run's processes, mounts, namespaces and files");
            remove_everything_of(std::process::id());
            std::process::exit(130);
        }
    });
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a plain handler that only writes to a pipe; the handler
        // is reset to the default in children at exec.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// True for a kit resource name made by process `pid`.
fn ours(name: &str, pid: u32) -> bool {
    name.starts_with("pcl-") && name.contains(&format!("-{pid}-"))
}

fn remove_everything_of(pid: u32) {
    // Children first: they hold the mounts and namespaces.
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(child) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            // Fields after the command name's closing parenthesis: state, ppid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if ppid == Some(pid) {
                // SAFETY: kill/waitpid on our own child.
                unsafe {
                    libc::kill(child, libc::SIGKILL);
                    libc::waitpid(child, std::ptr::null_mut(), 0);
                }
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| {
            Path::new(m)
                .components()
                .any(|c| ours(&c.as_os_str().to_string_lossy(), pid))
        })
        .collect();
    points.reverse();
    for m in points {
        if let Ok(c) = std::ffi::CString::new(m) {
            // SAFETY: a path string; a lazy unmount of our own mount.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    if let Ok(entries) = std::fs::read_dir(crate::command::NETNS_RUN_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if ours(&name, pid) {
                let _ = crate::command::ip(&["netns", "del", &name]);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            if ours(&e.file_name().to_string_lossy(), pid) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_this_process_names_are_ours() {
        assert!(super::ours("pcl-demo-c-4242-3", 4242));
        assert!(!super::ours("pcl-demo-c-42421-3", 4242));
        assert!(!super::ours("pcl-demo-c-14242-3", 4242));
        assert!(!super::ours("other-4242-1", 4242));
    }
}
