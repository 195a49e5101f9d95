//! The agent daemon, and one-shot commands, inside a namespace.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{
    command::{POLL, poll_until},
    netns::Netns,
    tempdir::TempDir,
};

/// `portcullis agent --config F --ready-file R [extra...]` running inside a
/// namespace; stdout and stderr go to a log file. Dropping it kills the
/// process (SIGKILL) and reaps it; if the thread is panicking the log is
/// printed to stderr first, so a failing test shows what the agent said.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    ready_file: PathBuf,
    log_file: PathBuf,
    // Last: removed after the child is gone.
    dir: TempDir,
}

impl AgentProcess {
    pub fn spawn(
        binary: &Path,
        ns: &Netns,
        config: &Path,
        extra_args: &[&str],
    ) -> io::Result<AgentProcess> {
        AgentProcess::spawn_wrapped(&[], binary, ns, config, extra_args)
    }

    /// As [`AgentProcess::spawn`], with the agent run by `wrapper` (a
    /// program and its arguments, e.g. `setpriv --bounding-set ... --`)
    /// inside the namespace.
    pub fn spawn_wrapped(
        wrapper: &[&str],
        binary: &Path,
        ns: &Netns,
        config: &Path,
        extra_args: &[&str],
    ) -> io::Result<AgentProcess> {
        if !binary.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("agent binary {} is missing", binary.display()),
            ));
        }
        let dir = TempDir::new("agent")?;
        let ready_file = dir.path().join("ready");
        let log_file = dir.path().join("agent.log");
        let log = File::create(&log_file)?;
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = ns.exec(program);
                c.args(args).arg(binary);
                c
            }
            None => ns.exec(binary),
        };
        let child = cmd
            .arg("agent")
            .arg("--config")
            .arg(config)
            .arg("--ready-file")
            .arg(&ready_file)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(AgentProcess {
            child: Some(child),
            ready_file,
            log_file,
            dir,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the agent has printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Waits until the agent has written its ready file and returns the
    /// file's content (the origin: `fresh`, `adopted` or `replaced`). Fails
    /// if the agent exits first or `timeout` passes, quoting its log.
    pub fn wait_ready(&mut self, timeout: Duration) -> io::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.ready_file) {
                let word = text.trim();
                if !word.is_empty() {
                    return Ok(word.to_owned());
                }
            }
            if let Some(status) = self.try_wait()? {
                return Err(io::Error::other(format!(
                    "agent exited ({status}) before it was ready; log:\n{}",
                    self.log()
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("agent not ready after {timeout:?}; log:\n{}", self.log()),
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// SIGKILL and reap: the agent gets no chance to clean up.
    pub fn kill9(&mut self) -> io::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then wait up to `timeout` for the exit (SIGKILL after it).
    /// Returns the exit status of a graceful exit.
    pub fn terminate(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        let Some(mut c) = self.child.take() else {
            return Err(io::Error::other("agent already stopped"));
        };
        // SAFETY: plain kill(2) on our own child, which is not yet reaped.
        if unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) } != 0 {
            return Err(io::Error::last_os_error());
        }
        match poll_until(timeout, || c.try_wait().ok().flatten()) {
            Some(status) => Ok(status),
            None => {
                let _ = c.kill();
                let _ = c.wait();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("agent ignored SIGTERM for {timeout:?}; killed"),
                ))
            }
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- agent log ({}) ----\n{}---- end of agent log ----",
                self.log_file.display(),
                self.log()
            );
        }
    }
}

/// Runs `binary ARGS...` inside `ns` and waits for it (the agent's one-shot
/// subcommands: `agent status`, `agent admit`, ...). The output is returned
/// whatever the exit status.
pub fn run_in(ns: &Netns, binary: &Path, args: &[&str]) -> io::Result<Output> {
    ns.exec(binary).args(args).stdin(Stdio::null()).output()
}
