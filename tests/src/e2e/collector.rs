//! `portcullis collector` as a process inside a namespace, for the tests,
//! the demo and the fleet: started, stopped (SIGTERM or SIGKILL) and
//! started again on the same output directory; killed on drop.

use std::{
    fs::{self, OpenOptions},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use portcullis_testkit::{Netns, poll_until};

/// `portcullis collector` inside a namespace; killed on drop.
pub struct Collector {
    child: Option<Child>,
    binary: PathBuf,
    ns_path: PathBuf,
    listen: SocketAddr,
    extra: Vec<String>,
    out: PathBuf,
    log: PathBuf,
}

impl Collector {
    /// Starts `portcullis collector --listen LISTEN --out OUT` in `ns`,
    /// logging to `log_dir/collector.log`.
    pub fn start(
        binary: &Path,
        ns: &Netns,
        listen: SocketAddr,
        out: &Path,
        log_dir: &Path,
    ) -> Collector {
        Collector::start_with(binary, ns, listen, out, log_dir, &[])
    }

    /// As [`Collector::start`], with more arguments (`--allow-plaintext`).
    pub fn start_with(
        binary: &Path,
        ns: &Netns,
        listen: SocketAddr,
        out: &Path,
        log_dir: &Path,
        extra: &[&str],
    ) -> Collector {
        let mut c = Collector {
            child: None,
            binary: binary.to_path_buf(),
            ns_path: ns.path(),
            listen,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            out: out.to_path_buf(),
            log: log_dir.join("collector.log"),
        };
        c.spawn(ns);
        c
    }

    pub fn spawn(&mut self, ns: &Netns) {
        assert!(self.child.is_none());
        assert_eq!(ns.path(), self.ns_path);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("collector log");
        let listen = self.listen.to_string();
        let child = ns
            .exec(&self.binary)
            .args(["collector", "--listen", &listen, "--out"])
            .arg(&self.out)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn collector");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            if poll_until(Duration::from_secs(10), || c.try_wait().ok().flatten()).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- collector log ----\n{}---- end ----", self.log());
        }
    }
}

/// A collector's output files (`*.jsonl`) in write order.
pub fn output_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Every record of a collector's output, parsed, in order (lines that are
/// not JSON are skipped: a line being written).
pub fn records(dir: &Path) -> Vec<serde_json::Value> {
    output_files(dir)
        .iter()
        .flat_map(|f| {
            fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>()
        })
        .collect()
}
