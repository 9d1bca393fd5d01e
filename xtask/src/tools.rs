//! Third-party tools the privileged tasks need, installed from Debian when missing.

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};

/// A whole number above 0 from the environment variable `name`, or `default` when it is unset;
/// anything else is an error that names the variable.
pub fn positive_env(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.parse() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{name}={v}: a whole number above 0 is wanted"),
        },
    }
}

/// Makes sure each `(program, package)` is on the PATH, installing the packages that are not.
pub fn ensure(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} from Debian", missing.join(" "));
    let quiet = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let mut installed = quiet(&[&["install", "-y", "-q"], &missing[..]].concat())?;
    if !installed.status.success() {
        // A fresh machine may have no package lists yet.
        let _ = quiet(&["update", "-q"]);
        installed = quiet(&[&["install", "-y", "-q"], &missing[..]].concat())?;
    }
    if !installed.status.success() {
        bail!(
            "cannot install {} with apt-get: {}",
            missing.join(" "),
            String::from_utf8_lossy(&installed.stderr).trim()
        );
    }
    for (program, package) in tools {
        if !on_path(program) {
            bail!("{package} is installed but {program} is still not on the PATH");
        }
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `once` up to three times, printing each failure but the last, which is returned with
/// `what` as its context. For tools such as iperf3 whose server may still be finishing the
/// test before, behind a slow tunnel.
pub fn retried<T>(what: &str, pause: Duration, mut once: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 1;
    loop {
        match once() {
            Ok(result) => return Ok(result),
            Err(error) if attempt < 3 => {
                println!("    {what} failed (attempt {attempt}): {error:#}");
                attempt += 1;
                std::thread::sleep(pause);
            }
            Err(error) => return Err(error.context(format!("{what}, three attempts"))),
        }
    }
}
