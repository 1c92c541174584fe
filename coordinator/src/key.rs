//! `lockstep key`: the key slots of an encrypted repository (DESIGN §15), run on the
//! repository directly, like restic's and kopia's. Every command unlocks the repository with
//! the passphrase in the file named by `--passphrase-file` (or `LOCKSTEP_PASSPHRASE_FILE`, or
//! in `LOCKSTEP_PASSPHRASE`); a new passphrase comes from `--new-passphrase-file`. Passphrases
//! are never taken from the command line.

use std::path::{Path, PathBuf};

use lockstep_repository::seal::{KeySlot, PASSPHRASE_FILE_ENV, Passphrase};
use lockstep_repository::{Error, ErrorCode, Repository, Result};

#[derive(Debug, clap::Args)]
pub struct KeyRepo {
    /// The repository URL or path.
    #[arg(long, value_name = "URL")]
    repo: String,
    /// A file holding the passphrase that unlocks the repository.
    #[arg(long, value_name = "FILE", env = PASSPHRASE_FILE_ENV)]
    passphrase_file: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// The key slots: each holds the repository's master key under one passphrase.
    List {
        #[command(flatten)]
        repo: KeyRepo,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Add a key slot for the passphrase in --new-passphrase-file.
    Add {
        #[command(flatten)]
        repo: KeyRepo,
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: PathBuf,
    },
    /// Remove key slot SLOT: its passphrase no longer opens the repository (the last slot
    /// is never removed).
    Remove {
        #[command(flatten)]
        repo: KeyRepo,
        slot: String,
    },
    /// Give a new, empty repository the keys of FROM (a WAL archive the agents copied them
    /// to, or a repository of the same cluster): after a disaster took the repository, a new
    /// one opens with the old passphrases and restores from the archive's WAL.
    Import {
        /// The new repository.
        #[arg(long, value_name = "URL")]
        repo: String,
        /// Where the keys are.
        #[arg(long, value_name = "URL")]
        from: String,
    },
    /// Change the passphrase: add a slot for the new one, then remove the slot the current
    /// one opened.
    Passwd {
        #[command(flatten)]
        repo: KeyRepo,
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: PathBuf,
    },
}

/// What `key list --json` prints of a slot (never its sealed key).
#[derive(serde::Serialize)]
struct ShownSlot<'a> {
    slot: &'a str,
    created_at: chrono::DateTime<chrono::Utc>,
    kdf: &'a str,
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
    /// Whether the passphrase given opened this slot.
    current: bool,
}

impl KeyRepo {
    async fn open(&self) -> Result<Repository> {
        // Never creates a repository (a mistyped URL is not made an encrypted one).
        let unopened = Repository::open_archive(&self.repo, &Default::default()).await?;
        if !unopened
            .encryption_marker()
            .await?
            .is_some_and(|m| m.is_encrypted())
        {
            return Err(Error::new(
                ErrorCode::EncryptionKey,
                format!(
                    "repository {} is not encrypted: it has no key slots (a repository is encrypted when it is created with a passphrase)",
                    self.repo
                ),
            ));
        }
        let options: Vec<(String, String)> = self
            .passphrase_file
            .iter()
            .map(|path| (PASSPHRASE_FILE_ENV.to_string(), path.display().to_string()))
            .collect();
        Repository::open_with(&self.repo, &options).await
    }
}

fn current_slot(repo: &Repository) -> String {
    repo.seal()
        .keys()
        .map(|keys| keys.slot().to_string())
        .unwrap_or_default()
}

fn new_passphrase(path: &Path) -> Result<Passphrase> {
    Passphrase::from_file(path)
}

pub async fn run(command: KeyCommand) -> Result<()> {
    match command {
        KeyCommand::List { repo, json } => {
            let repo = repo.open().await?;
            let current = current_slot(&repo);
            let slots = repo.key_slots().await?;
            let shown: Vec<ShownSlot> = slots
                .iter()
                .map(|slot: &KeySlot| ShownSlot {
                    slot: &slot.slot,
                    created_at: slot.created_at,
                    kdf: &slot.kdf.algorithm,
                    memory_kib: slot.kdf.memory_kib,
                    iterations: slot.kdf.iterations,
                    parallelism: slot.kdf.parallelism,
                    current: slot.slot == current,
                })
                .collect();
            if json {
                crate::cli::print_json(&shown);
                return Ok(());
            }
            println!("{:<14} {:<25} KDF", "SLOT", "CREATED");
            for slot in &shown {
                println!(
                    "{:<14} {:<25} {} ({} MiB, {} passes, {} lanes){}",
                    slot.slot,
                    slot.created_at.format("%Y-%m-%dT%H:%M:%SZ"),
                    slot.kdf,
                    slot.memory_kib / 1024,
                    slot.iterations,
                    slot.parallelism,
                    if slot.current {
                        "  <- this passphrase"
                    } else {
                        ""
                    }
                );
            }
        }
        KeyCommand::Add {
            repo,
            new_passphrase_file,
        } => {
            let passphrase = new_passphrase(&new_passphrase_file)?;
            let slot = repo.open().await?.add_key(&passphrase).await?;
            println!("Key slot {} added", slot.slot);
        }
        KeyCommand::Remove { repo, slot } => {
            if !lockstep_repository::layout::is_slot_name(&slot) {
                return Err(Error::new(
                    ErrorCode::InvalidArgument,
                    format!("{slot:?} is not a key slot name (`lockstep key list` shows them)"),
                ));
            }
            repo.open().await?.remove_key(&slot).await?;
            println!("Key slot {slot} removed");
        }
        KeyCommand::Import { repo, from } => {
            let source = Repository::open_archive(&from, &Default::default()).await?;
            let slots = Repository::adopt_keys(&repo, &source).await?;
            println!(
                "Repository {repo} has the keys of {from} ({slots} key slots): open it with one of their passphrases"
            );
        }
        KeyCommand::Passwd {
            repo,
            new_passphrase_file,
        } => {
            let passphrase = new_passphrase(&new_passphrase_file)?;
            let repo = repo.open().await?;
            let old = current_slot(&repo);
            let slot = repo.add_key(&passphrase).await?;
            repo.remove_key(&old).await?;
            println!("Passphrase changed: key slot {} replaces {old}", slot.slot);
        }
    }
    Ok(())
}
