//! `prism run --config FILE`: a TOML file whose keys are `prism run`'s long flag names
//! (`default_route` or `default-route` for `--default-route`), expanded into flags placed
//! before the command line's own, so that a flag given there overrides the file (a repeatable
//! flag adds to it). Parsing stays clap's: a wrong value gets the same message as the flag
//! would; only a key that names no flag of `prism run` is refused here, with the file's name.
//!
//! ```toml
//! tun = "prism0"
//! address = ["10.99.0.1/24", "fd99::1/64"]
//! default_route = true
//! upstream = "socks5://192.168.1.10:1080"
//! ```

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// The command line with every `--config FILE` of `prism run` replaced by the flags its file
/// holds, placed right after `run`.
pub(crate) fn expand(args: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(run) = args.iter().position(|a| a == "run") else {
        return Ok(args);
    };
    let mut args = args;
    let tail = args.split_off(run + 1);
    let mut from_files = Vec::new();
    let mut rest = Vec::new();
    let mut given = tail.into_iter();
    while let Some(arg) = given.next() {
        let file = match arg.to_str() {
            Some("--config") => given.next().context("--config needs a FILE")?,
            Some(text) if text.starts_with("--config=") => {
                OsString::from(text.trim_start_matches("--config="))
            }
            _ => {
                rest.push(arg);
                continue;
            }
        };
        let path = Path::new(&file);
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration {}", path.display()))?;
        from_files.extend(flags(&text).with_context(|| format!("in {}", path.display()))?);
    }
    // `args` is now everything up to and including `run`.
    let mut expanded = args;
    expanded.extend(from_files.into_iter().map(OsString::from));
    expanded.extend(rest);
    Ok(expanded)
}

/// The flags a TOML configuration stands for.
pub(crate) fn flags(text: &str) -> Result<Vec<String>> {
    let table: toml::Table = text.parse().map_err(|error: toml::de::Error| {
        // toml's own message spans lines (it quotes the line and points at the column).
        let line = error.span().map(|span| {
            let before = text.as_bytes().get(..span.start).unwrap_or(text.as_bytes());
            before.iter().filter(|&&b| b == b'\n').count() + 1
        });
        let message = error.message().trim();
        match line {
            Some(line) => anyhow::anyhow!("not valid TOML, line {line}: {message}"),
            None => anyhow::anyhow!("not valid TOML: {message}"),
        }
    })?;
    let run = <crate::cli::Cli as clap::CommandFactory>::command();
    let known: Vec<String> = run
        .find_subcommand("run")
        .map(|run| {
            run.get_arguments()
                .filter_map(|arg| arg.get_long().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut flags = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        if long == "config" {
            bail!("a configuration cannot include another (config)");
        }
        if !known.contains(&long) {
            bail!("unknown key {key}: the keys are prism run's long flag names (prism run --help)");
        }
        let flag = format!("--{long}");
        let values = match value {
            toml::Value::Array(items) => items,
            single => vec![single],
        };
        for value in values {
            match value {
                toml::Value::Boolean(true) => flags.push(flag.clone()),
                toml::Value::Boolean(false) => {}
                toml::Value::String(text) => flags.extend([flag.clone(), text]),
                toml::Value::Integer(n) => flags.extend([flag.clone(), n.to_string()]),
                other => {
                    bail!("{key}: expected a string, a number, true or a list of them, not {other}")
                }
            }
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn keys_become_flags_and_lists_repeat_them() {
        let flags = flags(
            "tun = \"prism0\"\naddress = [\"10.0.0.1/24\", \"fd00::1/64\"]\ndefault_route = true\n\
             no_offload = false\nmtu = 9000\n",
        )
        .unwrap();
        assert_eq!(
            flags,
            [
                "--address",
                "10.0.0.1/24",
                "--address",
                "fd00::1/64",
                "--default-route",
                "--mtu",
                "9000",
                "--tun",
                "prism0"
            ]
        );
        assert!(self::flags("mtu = 1.5").is_err());
        assert!(self::flags("config = \"other.toml\"").is_err());
    }

    #[test]
    fn a_wrong_key_or_bad_toml_is_one_line_that_says_where() {
        let error = flags("tun = \"prism0\"\ndefault_routes = true\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown key default_routes"), "{error}");
        let error = format!("{:#}", flags("tun = \"prism0\"\nmtu = = 3\n").unwrap_err());
        assert!(error.contains("line 2"), "{error}");
        assert_eq!(error.lines().count(), 1, "{error}");
    }

    #[test]
    fn the_file_comes_first_so_flags_override_it() {
        let dir = std::env::temp_dir().join(format!("prism-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("prism.toml");
        std::fs::write(&file, "mtu = 1400\nupstream = \"direct\"\n").unwrap();
        let args: Vec<OsString> = ["prism", "run", "--config"]
            .iter()
            .map(OsString::from)
            .chain([file.clone().into_os_string(), "--mtu".into(), "9000".into()])
            .collect();
        let expanded = expand(args).unwrap();
        let text: Vec<&str> = expanded.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            text,
            [
                "prism",
                "run",
                "--mtu",
                "1400",
                "--upstream",
                "direct",
                "--mtu",
                "9000"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
