//! Guards for what the privileged tasks create: network namespaces and processes. Each removes
//! what it made when dropped, pass or fail; [`sweep`] removes what a killed run left behind.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Every namespace xtask makes is named `prism-<role>-<pid>`.
const PREFIX: &str = "prism-";

/// Runs a command to completion; fails with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A veth pair: `a_name` in `a`, `b_name` in `b` (addresses and links are the caller's).
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    run(
        "ip",
        &[
            "link",
            "add",
            a_name,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_name,
            "netns",
            b.name(),
        ],
    )?;
    Ok(())
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `prism-<role>-<pid>` with loopback up.
    pub fn create(role: &str) -> Result<Self> {
        let name = format!("{PREFIX}{role}-{}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip <args>` inside the namespace (args split on whitespace).
    pub fn ip(&self, args: &str) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend(args.split_whitespace());
        run("ip", &all)
    }

    /// Runs a command inside the namespace to completion.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Hosts file for processes started in this namespace with `ip netns exec`.
    pub fn set_hosts(&self, hosts: &str) -> Result<()> {
        let dir = self.etc_dir();
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), hosts)?;
        Ok(())
    }

    /// resolv.conf for processes started in this namespace with `ip netns exec`.
    pub fn set_resolver(&self, nameserver: &str) -> Result<()> {
        let dir = self.etc_dir();
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\n"),
        )?;
        Ok(())
    }

    fn etc_dir(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name)
    }
}

/// Moves the calling thread into namespace `name`.
pub fn enter(name: &str) -> Result<()> {
    let file = File::open(Path::new("/var/run/netns").join(name))
        .with_context(|| format!("namespace {name} is gone"))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("cannot enter namespace {name}"))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(self.etc_dir());
    }
}

/// Children alive right now, killed by [`interrupted`].
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Makes SIGINT, SIGTERM and SIGHUP clean up: a handler (signal-hook's self-pipe) wakes one
/// thread, which kills the children and removes this run's namespaces before exiting. The
/// signals are caught, not blocked: a blocked mask would be inherited by every program this
/// process starts (std does not reset it), and prism would never see its SIGINT.
pub fn clean_up_on_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return;
    };
    thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            eprintln!("xtask: signal {signal} received; removing what this run made");
            interrupted();
            std::process::exit(128 + signal);
        }
    });
}

fn interrupted() {
    let children = std::mem::take(&mut *CHILDREN.lock().unwrap_or_else(|e| e.into_inner()));
    for pid in children {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    remove_namespaces(|pid| pid == std::process::id() as i32);
}

/// Deletes namespaces left behind by xtask runs whose process is gone.
pub fn sweep() {
    remove_namespaces(|pid| {
        pid != std::process::id() as i32 && kill(Pid::from_raw(pid), None).is_err()
    });
}

/// Deletes the `prism-*-PID` namespaces whose PID `doomed` picks.
fn remove_namespaces(doomed: impl Fn(i32) -> bool) {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if doomed(pid) {
            eprintln!("xtask: removing namespace {name}");
            let _ = run("ip", &["netns", "del", name]);
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(name));
        }
    }
}

/// A child process, killed on drop if still running.
#[derive(Debug)]
pub struct Process {
    child: Child,
    name: String,
    log: Option<PathBuf>,
}

impl Process {
    /// Starts `command` with stdout and stderr to `log` (or discarded).
    pub fn spawn(name: &str, mut command: Command, log: Option<&Path>) -> Result<Self> {
        let (out, err) = match log {
            Some(path) => {
                let file = File::create(path)?;
                (Stdio::from(file.try_clone()?), Stdio::from(file))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Ok(Self {
            child,
            name: name.to_owned(),
            log: log.map(Path::to_owned),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Whether it has exited (and how).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` and waits up to `patience` for the exit.
    pub fn stop(&mut self, signal: Signal, patience: Duration) -> Result<ExitStatus> {
        let pid = Pid::from_raw(self.child.id() as i32);
        if self.try_status().is_none() {
            kill(pid, signal).with_context(|| format!("cannot signal {}", self.name))?;
        }
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.try_status() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {patience:?} of {signal}", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` and fails, with what it logged, unless it exits with success within 20
    /// seconds: how every test and bench ends a process whose exit is part of what it checks.
    pub fn stop_cleanly(&mut self, signal: Signal) -> Result<()> {
        let status = self.stop(signal, Duration::from_secs(20))?;
        ensure!(
            status.success(),
            "{} exited with {status}:\n{}",
            self.name,
            self.log()
        );
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let id = self.child.id();
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&pid| pid != id);
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Work on its own thread inside a namespace, on a single-threaded runtime, until dropped.
#[derive(Debug)]
pub struct NsTask {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NsTask {
    /// Enters namespace `ns`, runs `setup` (which binds its sockets, say) and then the future it
    /// returns until the task is dropped. Returns once `setup` succeeded, or with its error.
    pub fn start<W, F, S>(ns: &str, what: &str, setup: W) -> Result<Self>
    where
        W: FnOnce() -> F + Send + 'static,
        F: std::future::Future<Output = Result<S>>,
        S: std::future::Future<Output = ()>,
    {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let name = ns.to_owned();
        let thread = thread::spawn(move || {
            let ready = ready_tx.clone();
            let run = move || -> Result<()> {
                enter(&name)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let serve = setup().await?;
                    let _ = ready.send(Ok(()));
                    tokio::select! {
                        () = serve => {}
                        _ = stop_rx => {}
                    }
                    Ok(())
                })
            };
            if let Err(error) = run() {
                let _ = ready_tx.send(Err(error));
            }
        });
        ready_rx
            .recv()
            .with_context(|| format!("{what} died before it was ready"))??;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for NsTask {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A field of `/proc/PID/status`, in KiB.
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Waits until `check` passes, up to `patience`.
pub fn wait_for(what: &str, patience: Duration, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + patience;
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out after {patience:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
