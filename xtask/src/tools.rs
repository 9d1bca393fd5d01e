//! Third-party tools the privileged tasks need, installed from Debian when missing.

use std::process::Command;

use anyhow::{Result, bail};

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
