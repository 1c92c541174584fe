//! `lockstep-agent serve --config FILE`: the agent's configuration file.
//!
//! Its keys are the `serve` flags' names in snake case and its values their values
//! (`deploy/agent.example.toml` lists every key). The file becomes those flags: a flag given
//! on the command line wins over the file (a list such as `wal_to` is replaced, not merged),
//! and the file wins over environment variables. Unknown keys and wrong types are refused
//! with the key's name, before anything starts; every value then goes through the same
//! checks as the flag it stands for.

use std::ffi::OsString;
use std::path::PathBuf;

use lockstep_repository::{Error, ErrorCode, Result};
use serde::Deserialize;

/// Every key the file may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentConfig {
    db: Option<PathBuf>,
    shard: Option<String>,
    listen: Option<String>,
    repo: Option<String>,
    engine: Option<String>,
    cfs: Option<Vec<String>>,
    capture_dir: Option<PathBuf>,
    min_free_mib: Option<u64>,
    background_priority: Option<String>,
    parallelism: Option<usize>,
    chunk_mib: Option<usize>,
    zstd_level: Option<i32>,
    wal_to: Option<Vec<String>>,
    wal_segment_mib: Option<usize>,
    wal_segment_ms: Option<u64>,
    wal_retention_mib: Option<u64>,
    upload_mib_s: Option<u64>,
    download_mib_s: Option<u64>,
    wal_share_percent: Option<u32>,
    metrics_listen: Option<String>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_tokens: Option<PathBuf>,
    plaintext: Option<bool>,
}

impl AgentConfig {
    /// The file as flags: (flag, its values; one occurrence each).
    fn flags(self) -> Vec<(&'static str, Vec<String>)> {
        let one = |value: Option<String>| value.map(|v| vec![v]);
        let path = |value: Option<PathBuf>| value.map(|p| vec![p.display().to_string()]);
        [
            ("--db", path(self.db)),
            ("--shard", one(self.shard)),
            ("--listen", one(self.listen)),
            ("--repo", one(self.repo)),
            ("--engine", one(self.engine)),
            ("--cfs", self.cfs.map(|cfs| vec![cfs.join(",")])),
            ("--capture-dir", path(self.capture_dir)),
            (
                "--min-free-mib",
                one(self.min_free_mib.map(|v| v.to_string())),
            ),
            ("--background-priority", one(self.background_priority)),
            (
                "--parallelism",
                one(self.parallelism.map(|v| v.to_string())),
            ),
            ("--chunk-mib", one(self.chunk_mib.map(|v| v.to_string()))),
            ("--zstd-level", one(self.zstd_level.map(|v| v.to_string()))),
            ("--wal-to", self.wal_to),
            (
                "--wal-segment-mib",
                one(self.wal_segment_mib.map(|v| v.to_string())),
            ),
            (
                "--wal-segment-ms",
                one(self.wal_segment_ms.map(|v| v.to_string())),
            ),
            (
                "--wal-retention-mib",
                one(self.wal_retention_mib.map(|v| v.to_string())),
            ),
            (
                "--upload-mib-s",
                one(self.upload_mib_s.map(|v| v.to_string())),
            ),
            (
                "--download-mib-s",
                one(self.download_mib_s.map(|v| v.to_string())),
            ),
            (
                "--wal-share-percent",
                one(self.wal_share_percent.map(|v| v.to_string())),
            ),
            ("--metrics-listen", one(self.metrics_listen)),
            ("--tls-ca", path(self.tls_ca)),
            ("--tls-cert", path(self.tls_cert)),
            ("--tls-key", path(self.tls_key)),
            ("--tls-tokens", path(self.tls_tokens)),
            // A switch: present, without a value, when true.
            (
                "--plaintext",
                self.plaintext.filter(|on| *on).map(|_| Vec::new()),
            ),
        ]
        .into_iter()
        .filter_map(|(flag, values)| values.map(|values| (flag, values)))
        .collect()
    }
}

/// The flags that take no value: present when the file sets them true.
const SWITCHES: [&str; 1] = ["--plaintext"];

/// `argv` with `serve --config FILE` replaced by the flags the file sets and the command line
/// does not; any other command line is returned as it is.
pub fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    if argv.get(1).and_then(|a| a.to_str()) != Some("serve") {
        return Ok(argv);
    }
    let mut out = Vec::with_capacity(argv.len());
    let mut file = None;
    let mut args = argv.into_iter();
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--config") => {
                file = Some(PathBuf::from(args.next().ok_or_else(|| {
                    invalid("--config needs a file: lockstep-agent serve --config agent.toml")
                })?));
            }
            Some(text) if text.starts_with("--config=") => {
                file = Some(PathBuf::from(&text["--config=".len()..]));
            }
            _ => out.push(arg),
        }
    }
    let Some(file) = file else {
        return Ok(out);
    };
    let text = std::fs::read_to_string(&file).map_err(|err| {
        Error::io(
            ErrorCode::InvalidArgument,
            format!("read the agent configuration {}", file.display()),
            err,
        )
    })?;
    let config: AgentConfig = toml::from_str(&text)
        .map_err(|err| invalid(&format!("agent configuration {}: {err}", file.display())))?;
    let on_command_line = |flag: &str| {
        out.iter().any(|arg| {
            arg.to_str()
                .is_some_and(|a| a == flag || a.starts_with(&format!("{flag}=")))
        })
    };
    // TLS and plaintext exclude each other: the command line's choice wins as a whole.
    let given = |flag: &str| {
        on_command_line(flag)
            || (flag.starts_with("--tls-") && on_command_line("--plaintext"))
            || (flag == "--plaintext" && on_command_line("--tls-ca"))
    };
    let mut added = Vec::new();
    for (flag, values) in config.flags() {
        if given(flag) {
            continue;
        }
        if SWITCHES.contains(&flag) {
            added.push(OsString::from(flag));
            continue;
        }
        for value in values {
            added.push(OsString::from(flag));
            added.push(OsString::from(value));
        }
    }
    out.extend(added);
    Ok(out)
}

fn invalid(message: &str) -> Error {
    Error::new(ErrorCode::InvalidArgument, message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_reference_file_becomes_flags_and_the_command_line_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, include_str!("../../deploy/agent.example.toml")).expect("write");
        let path = path.display().to_string();
        let expanded = strings(
            expand(argv(&[
                "lockstep-agent",
                "serve",
                "--config",
                &path,
                "--listen",
                "127.0.0.1:9999",
            ]))
            .expect("expand"),
        );
        let value = |flag: &str| {
            let at = expanded.iter().position(|a| a == flag)?;
            expanded.get(at + 1).cloned()
        };
        assert_eq!(value("--listen").as_deref(), Some("127.0.0.1:9999"));
        assert_eq!(expanded.iter().filter(|a| *a == "--listen").count(), 1);
        assert_eq!(value("--shard").as_deref(), Some("shard-0"));
        assert_eq!(expanded.iter().filter(|a| *a == "--wal-to").count(), 2);
        assert_eq!(value("--wal-share-percent").as_deref(), Some("20"));
        assert!(!expanded.iter().any(|a| a == "--config"));
        // Every key of the reference file is one the agent knows.
        let parsed = <crate::cli::Cli as clap::Parser>::try_parse_from(&expanded);
        assert!(parsed.is_ok(), "{parsed:?}");
    }

    #[test]
    fn plaintext_is_a_switch_and_the_command_line_chooses_tls_or_plaintext_as_a_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        let path_arg = path.display().to_string();
        let expanded = |file: &str, extra: &[&str]| {
            std::fs::write(&path, file).expect("write");
            let mut args = vec!["lockstep-agent", "serve", "--config", &path_arg];
            args.extend(extra);
            strings(expand(argv(&args)).expect("expand"))
        };
        let file = "plaintext = true\nwal_to = []\n";
        let out = expanded(file, &[]);
        assert!(out.iter().any(|a| a == "--plaintext"), "{out:?}");
        assert!(
            !out.iter().any(|a| a == "--wal-to"),
            "an empty list is no flag: {out:?}"
        );
        // TLS on the command line replaces the file's plaintext...
        let out = expanded(file, &["--tls-ca", "ca.pem"]);
        assert!(!out.iter().any(|a| a == "--plaintext"), "{out:?}");
        // ...and plaintext on the command line the file's TLS files.
        let tls = "tls_ca = \"ca.pem\"\ntls_cert = \"a.pem\"\ntls_key = \"a.key\"\n";
        let out = expanded(tls, &["--plaintext"]);
        assert!(!out.iter().any(|a| a.starts_with("--tls-")), "{out:?}");
        assert!(
            !expanded("plaintext = false\n", &[])
                .iter()
                .any(|a| a == "--plaintext")
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_their_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (text, named) in [
            ("shard = \"shard-0\"\nwal_too = [\"x\"]\n", "wal_too"),
            ("parallelism = \"four\"\n", "parallelism"),
        ] {
            let path = dir.path().join("agent.toml");
            std::fs::write(&path, text).expect("write");
            let err = expand(argv(&[
                "lockstep-agent",
                "serve",
                "--config",
                &path.display().to_string(),
            ]))
            .expect_err(text);
            assert_eq!(err.code, ErrorCode::InvalidArgument);
            assert!(err.message.contains(named), "{err}");
        }
        // Other commands are left alone.
        let other = argv(&["lockstep-agent", "list", "--repo", "x"]);
        assert_eq!(expand(other.clone()).ok(), Some(other));
    }
}
