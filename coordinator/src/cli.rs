//! The `lockstep` command line: `serve` runs the coordinator; every other command is a client
//! of its gRPC API, so it works from any machine that can reach the coordinator.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lockstep_proto::v1::coordinator_client::CoordinatorClient;
use lockstep_proto::{from_status, v1};
use lockstep_repository::{Error, ErrorCode, Result};
use tonic::transport::Channel;

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Lockstep: consistent backups of a cluster of RocksDB shards"
)]
pub struct Cli {
    /// The coordinator to talk to.
    #[arg(
        long,
        global = true,
        env = "LOCKSTEP_COORDINATOR",
        default_value = "http://127.0.0.1:7400"
    )]
    pub coordinator: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Create, list, show, verify and delete backups.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Cluster state.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Restore every shard of a backup through its agent: all shards are downloaded and
    /// checked first, and only then swapped in.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["in_place", "to"])))]
    Restore {
        /// A backup id, or `latest`.
        backup: String,
        /// Replace every agent's live shard (writes made since the backup are lost).
        #[arg(long)]
        in_place: bool,
        /// Restore into this directory on each agent's machine instead, one subdirectory per
        /// shard (or where `{shard}` says); the live shards are untouched.
        #[arg(long, value_name = "DIR")]
        to: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a consistent backup of every shard.
    Create {
        /// full (incremental and differential come with WAL archiving).
        #[arg(long, default_value = "full")]
        kind: String,
        /// Wait until the backup is committed or failed, showing progress.
        #[arg(long)]
        wait: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List committed backups.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one backup (`latest` works).
    Show {
        backup: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify one backup (`latest` works), or all.
    Verify {
        backup: Option<String>,
        #[arg(long)]
        full: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a backup's manifests; its objects become garbage.
    Delete { backup: String },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Every agent: reachable, sequence number, gate, RAID role.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

async fn client(endpoint: &str) -> Result<CoordinatorClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|err| {
            Error::with_source(
                ErrorCode::InvalidArgument,
                format!("coordinator address {endpoint}"),
                err,
            )
        })?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|err| {
            Error::with_source(
                ErrorCode::AgentUnavailable,
                format!("connect to the coordinator at {endpoint}"),
                err,
            )
        })?;
    Ok(CoordinatorClient::new(channel))
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn job_state(job: &v1::BackupJob) -> v1::JobState {
    v1::JobState::try_from(job.state).unwrap_or(v1::JobState::Unspecified)
}

fn job_json(job: &v1::BackupJob) -> serde_json::Value {
    serde_json::json!({
        "backup_id": job.backup_id,
        "state": job_state(job).as_str_name().trim_start_matches("JOB_STATE_").to_ascii_lowercase(),
        "error_code": job.error_code,
        "error_message": job.error_message,
        "shards": shards_json(&job.shards),
    })
}

fn job_error(job: &v1::BackupJob) -> Error {
    let code = ErrorCode::parse(&job.error_code).unwrap_or(ErrorCode::BackupCreationFailed);
    let mut message = format!("backup {} failed: {}", job.backup_id, job.error_message);
    for shard in job.shards.iter().filter(|s| !s.error_code.is_empty()) {
        message.push_str(&format!(
            "\n  shard {}: {} {}",
            shard.shard_id, shard.error_code, shard.error_message
        ));
    }
    Error::new(code, message)
}

async fn create(endpoint: &str, kind: String, wait: bool, json: bool) -> Result<()> {
    let mut client = client(endpoint).await?;
    let job = client
        .create_backup(v1::CreateBackupRequest { kind })
        .await
        .map_err(|s| from_status("create backup", &s))?
        .into_inner();
    if !wait {
        if json {
            print_json(&job_json(&job));
        } else {
            println!(
                "Backup {} started; follow it with `lockstep backup show {}`",
                job.backup_id, job.backup_id
            );
        }
        return Ok(());
    }
    let bar = byte_bar();
    let mut every = tokio::time::interval(Duration::from_millis(200));
    let job = loop {
        every.tick().await;
        let job = client
            .get_backup_job(v1::GetBackupJobRequest {
                backup_id: job.backup_id.clone(),
            })
            .await
            .map_err(|s| from_status("follow backup", &s))?
            .into_inner();
        let state = job_state(&job);
        bar.set_message(
            state
                .as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_ascii_lowercase(),
        );
        show_progress(&bar, &job.shards);
        if matches!(state, v1::JobState::Committed | v1::JobState::Failed) {
            break job;
        }
    };
    bar.finish_and_clear();
    if json {
        print_json(&job_json(&job));
    }
    if job_state(&job) == v1::JobState::Failed {
        return Err(job_error(&job));
    }
    if !json {
        let info = client
            .get_backup(v1::GetBackupRequest {
                backup_id: job.backup_id.clone(),
            })
            .await
            .map_err(|s| from_status("show backup", &s))?
            .into_inner();
        print_backup(&info);
    }
    Ok(())
}

/// A progress bar over bytes, on stderr (hidden when stderr is not a terminal).
fn byte_bar() -> indicatif::ProgressBar {
    let bar =
        indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

fn show_progress(bar: &indicatif::ProgressBar, shards: &[v1::ShardProgress]) {
    bar.set_length(shards.iter().map(|s| s.bytes_total).sum());
    bar.set_position(shards.iter().map(|s| s.bytes_done).sum());
}

fn shards_json(shards: &[v1::ShardProgress]) -> Vec<serde_json::Value> {
    shards
        .iter()
        .map(|s| {
            serde_json::json!({
                "shard_id": s.shard_id, "state": s.state, "seq": s.seq, "bytes_done": s.bytes_done,
                "bytes_total": s.bytes_total, "gate_closed_us": s.gate_closed_us,
                "error_code": s.error_code, "error_message": s.error_message,
            })
        })
        .collect()
}

fn restore_phase(job: &v1::RestoreJob) -> v1::RestorePhase {
    v1::RestorePhase::try_from(job.phase).unwrap_or(v1::RestorePhase::Unspecified)
}

async fn restore(
    endpoint: &str,
    backup: String,
    in_place: bool,
    to: Option<String>,
    json: bool,
) -> Result<()> {
    let mut client = client(endpoint).await?;
    let mut stream = client
        .restore(v1::RestoreClusterRequest {
            backup_id: backup,
            in_place,
            target_dir: to.unwrap_or_default(),
        })
        .await
        .map_err(|s| from_status("restore", &s))?
        .into_inner();
    let bar = byte_bar();
    let mut last = None;
    while let Some(job) = stream
        .message()
        .await
        .map_err(|s| from_status("follow restore", &s))?
    {
        bar.set_message(
            restore_phase(&job)
                .as_str_name()
                .trim_start_matches("RESTORE_PHASE_")
                .to_ascii_lowercase(),
        );
        show_progress(&bar, &job.shards);
        last = Some(job);
    }
    bar.finish_and_clear();
    let job = last.ok_or_else(|| {
        Error::new(
            ErrorCode::BackupRestorationFailed,
            "the coordinator closed the restore stream without an outcome; check `lockstep cluster status`",
        )
    })?;
    let phase = restore_phase(&job);
    if json {
        print_json(&serde_json::json!({
            "restore_id": job.restore_id,
            "backup_id": job.backup_id,
            "phase": phase.as_str_name().trim_start_matches("RESTORE_PHASE_").to_ascii_lowercase(),
            "error_code": job.error_code,
            "error_message": job.error_message,
            "shards": shards_json(&job.shards),
        }));
    }
    if phase != v1::RestorePhase::Done {
        let code = ErrorCode::parse(&job.error_code).unwrap_or(ErrorCode::BackupRestorationFailed);
        return Err(Error::new(
            code,
            format!(
                "restore of backup {} failed: {}",
                job.backup_id, job.error_message
            ),
        ));
    }
    if !json {
        println!(
            "Restored backup {} ({}): {} shards, every chunk checked against its SHA-256",
            job.backup_id,
            if in_place {
                "in place"
            } else {
                "into directories"
            },
            job.shards.len()
        );
        for s in &job.shards {
            println!(
                "  {:<16} seq {:>12}  {} bytes",
                s.shard_id, s.seq, s.bytes_total
            );
        }
    }
    Ok(())
}

fn print_backup(info: &v1::BackupInfo) {
    println!(
        "Backup {} committed ({}): {} shards",
        info.backup_id, info.kind, info.n_shards
    );
    let mut cut: Vec<_> = info.cut.iter().collect();
    cut.sort();
    for (shard, seq) in cut {
        println!("  {shard:<16} seq {seq}");
    }
    println!(
        "  {} bytes, {} stored new; write pause (max over shards) {:.3} ms; {} .. {}",
        info.bytes_total,
        info.bytes_uploaded,
        info.max_gate_closed_us as f64 / 1000.0,
        info.started_at,
        info.completed_at
    );
}

fn info_json(info: &v1::BackupInfo) -> serde_json::Value {
    if info.manifest_json.is_empty() {
        return serde_json::json!({ "backup_id": info.backup_id, "error": info.error_code });
    }
    serde_json::from_str(&info.manifest_json).unwrap_or_default()
}

async fn run_command(cli: Cli) -> Result<bool> {
    let endpoint = cli.coordinator.as_str();
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            let (listener, address) = lockstep_proto::bind(&config.listen).await?;
            let n_agents = config.agents.len();
            let shutdown = lockstep_proto::shutdown_on_signal();
            let on_ready = move || {
                println!("lockstep: coordinator of {n_agents} shards listening on {address}")
            };
            crate::service::serve(config, listener, shutdown, on_ready).await?;
        }
        Command::Restore {
            backup,
            in_place,
            to,
            json,
        } => restore(endpoint, backup, in_place, to, json).await?,
        Command::Backup(BackupCommand::Create { kind, wait, json }) => {
            create(endpoint, kind, wait, json).await?
        }
        Command::Backup(BackupCommand::List { json }) => {
            let mut client = client(endpoint).await?;
            let reply = client
                .list_backups(v1::ListBackupsRequest {})
                .await
                .map_err(|s| from_status("list backups", &s))?
                .into_inner();
            if json {
                print_json(&reply.backups.iter().map(info_json).collect::<Vec<_>>());
            } else if reply.backups.is_empty() {
                println!("No backups.");
            } else {
                println!(
                    "{:<26} {:<6} {:<26} {:>6} {:>14} {:>10}",
                    "BACKUP", "KIND", "COMPLETED", "SHARDS", "BYTES", "PAUSE ms"
                );
                for b in &reply.backups {
                    if b.error_code.is_empty() {
                        println!(
                            "{:<26} {:<6} {:<26} {:>6} {:>14} {:>10.3}",
                            b.backup_id,
                            b.kind,
                            b.completed_at,
                            b.n_shards,
                            b.bytes_total,
                            b.max_gate_closed_us as f64 / 1000.0
                        );
                    } else {
                        println!("{:<26} {}", b.backup_id, b.error_code);
                    }
                }
            }
        }
        Command::Backup(BackupCommand::Show { backup, json }) => {
            let mut client = client(endpoint).await?;
            let info = client
                .get_backup(v1::GetBackupRequest { backup_id: backup })
                .await
                .map_err(|s| from_status("show backup", &s))?
                .into_inner();
            if json {
                print_json(&info_json(&info));
            } else {
                print_backup(&info);
            }
        }
        Command::Backup(BackupCommand::Verify { backup, full, json }) => {
            let mut client = client(endpoint).await?;
            let reply = client
                .verify_backup(v1::VerifyBackupRequest {
                    backup_id: backup.unwrap_or_default(),
                    full,
                })
                .await
                .map_err(|s| from_status("verify backup", &s))?
                .into_inner();
            if json {
                println!("{}", reply.report_json);
            } else {
                println!("{}", reply.report);
            }
            return Ok(reply.passed);
        }
        Command::Backup(BackupCommand::Delete { backup }) => {
            let mut client = client(endpoint).await?;
            client
                .delete_backup(v1::DeleteBackupRequest {
                    backup_id: backup.clone(),
                })
                .await
                .map_err(|s| from_status("delete backup", &s))?;
            println!("Backup {backup} deleted.");
        }
        Command::Cluster(ClusterCommand::Status { json }) => {
            let mut client = client(endpoint).await?;
            let reply = client
                .cluster_status(v1::ClusterStatusRequest {})
                .await
                .map_err(|s| from_status("cluster status", &s))?
                .into_inner();
            let healthy = reply
                .agents
                .iter()
                .all(|a| a.reachable && a.error.is_empty());
            if json {
                print_json(&serde_json::json!({
                    "repository": reply.repository,
                    "running_backup_id": reply.running_backup_id,
                    "agents": reply.agents.iter().map(|a| serde_json::json!({
                        "shard_id": a.shard_id, "endpoint": a.endpoint, "reachable": a.reachable, "seq": a.seq,
                        "gate_closed": a.gate_closed, "raid_group": a.raid_group, "role": a.role, "error": a.error,
                    })).collect::<Vec<_>>(),
                }));
            } else {
                println!("Repository: {}", reply.repository);
                if !reply.running_backup_id.is_empty() {
                    println!("Running backup: {}", reply.running_backup_id);
                }
                println!(
                    "{:<16} {:<26} {:<10} {:<8} {:>12} {:<6} ERROR",
                    "SHARD", "ENDPOINT", "GROUP", "ROLE", "SEQ", "GATE"
                );
                for a in &reply.agents {
                    println!(
                        "{:<16} {:<26} {:<10} {:<8} {:>12} {:<6} {}",
                        a.shard_id,
                        a.endpoint,
                        a.raid_group,
                        a.role,
                        if a.reachable {
                            a.seq.to_string()
                        } else {
                            "-".into()
                        },
                        if !a.reachable {
                            "-"
                        } else if a.gate_closed {
                            "closed"
                        } else {
                            "open"
                        },
                        a.error
                    );
                }
            }
            return Ok(healthy);
        }
    }
    Ok(true)
}

/// Runs one command; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match run_command(cli).await {
        Ok(true) => 0,
        Ok(false) => ErrorCode::BackupVerificationFailed.exit_code(),
        Err(err) => lockstep_proto::report_error(&err),
    }
}
