//! The `lockstep` command line: `serve` runs the coordinator; every other command is a client
//! of its gRPC API, so it works from any machine that can reach the coordinator.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lockstep_proto::auth::Identity;
use lockstep_proto::v1::coordinator_client::CoordinatorClient;
use lockstep_proto::wire::Label;
use lockstep_proto::{from_status, v1};
use lockstep_repository::{Error, ErrorCode, Result};
use tonic::service::interceptor::InterceptedService;
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
    #[command(flatten)]
    pub auth: ClientAuth,
    #[command(subcommand)]
    pub command: Command,
}

/// How a client command proves who it is to an `https://` coordinator.
#[derive(Debug, clap::Args)]
pub struct ClientAuth {
    /// The cluster's CA certificate (PEM): needed for an https:// coordinator.
    #[arg(long, global = true, env = "LOCKSTEP_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), naming lockstep://operator/NAME or
    /// lockstep://reader/NAME (`lockstep cert issue`).
    #[arg(long, global = true, env = "LOCKSTEP_CERT", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, global = true, env = "LOCKSTEP_KEY", value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// A file holding a bearer token, for a client without a certificate (`lockstep cert
    /// token`); never the token itself on the command line.
    #[arg(long, global = true, env = "LOCKSTEP_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// The coordinator a client command talks to, and how.
#[derive(Debug)]
pub struct Remote {
    url: String,
    security: lockstep_proto::tls::Security,
    bearer: lockstep_proto::tls::Bearer,
}

impl Remote {
    fn new(url: &str, auth: &ClientAuth) -> Result<Remote> {
        let (security, bearer) = lockstep_proto::tls::client_credentials(
            auth.ca.as_deref(),
            auth.cert.as_deref(),
            auth.key.as_deref(),
            auth.token_file.as_deref(),
        )?;
        Ok(Remote {
            url: url.to_string(),
            security,
            bearer,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Serve Prometheus metrics at http://ADDR/metrics (overrides `metrics_listen`).
        #[arg(long, value_name = "ADDR", env = "LOCKSTEP_METRICS_LISTEN")]
        metrics_listen: Option<String>,
    },
    /// Create, list, show, verify and delete backups.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Cluster state.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// WAL archiving and shipping.
    #[command(subcommand)]
    Wal(WalCommand),
    /// Named restore points: the barrier without a backup, recording every shard's position.
    #[command(subcommand)]
    Tag(TagCommand),
    /// The retention policy (`[retention]` in the coordinator's configuration).
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// Garbage collection: delete the objects no backup names any more, in two passes at
    /// least `[gc] grace_s` apart (the first records candidates, a later one deletes them),
    /// beside running backups, restores and WAL shipping.
    Gc {
        /// Report what the pass would record and delete; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Restore every shard through its agent, to a backup or a point in time: all shards are
    /// downloaded, replayed and checked first, and only then swapped in.
    Restore(RestoreArgs),
    /// What the coordinator runs by itself (`[[schedules]]` in its configuration).
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// The main job end to end on this machine: a RAID5 cluster of three agents and a
    /// coordinator, backups under writes, a tag and a restore to it, a disaster, and a
    /// verified restore of the whole cluster (`make demo`).
    Demo(crate::demo::DemoArgs),
    /// Make the cluster's CA, certificates and bearer tokens (mutual TLS, DESIGN §15).
    #[command(subcommand)]
    Cert(crate::cert::CertCommand),
    /// The key slots of an encrypted repository: list, add, remove, change a passphrase.
    #[command(subcommand)]
    Key(crate::key::KeyCommand),
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Every schedule: its action, cron and time zone, its next run, its last firing, and
    /// what it ran, skipped and missed since the coordinator started.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["in_place", "to", "abort"])))]
#[command(group(clap::ArgGroup::new("point").args(["backup", "tag", "to_seq", "to_time"])))]
pub struct RestoreArgs {
    /// A backup id, or `latest` (the default when no other point is named).
    backup: Option<String>,
    /// Point in time: a tag, exactly (`lockstep tag list`).
    #[arg(long, value_name = "NAME")]
    tag: Option<String>,
    /// Point in time: an exact sequence number per shard, `shard-0=1200,shard-1=950`.
    #[arg(long, value_delimiter = ',', value_name = "SHARD=SEQ")]
    to_seq: Vec<String>,
    /// Point in time: RFC 3339 with an explicit offset. Snaps to the latest consistent
    /// restore point (a backup's cut, or a tag, automatic ones included) at or before it
    /// unless --exact-per-shard.
    #[arg(long, value_name = "TIME")]
    to_time: Option<String>,
    /// With --to-time: every shard to its own last write at or before the time
    /// (consistent across shards only up to clock skew).
    #[arg(long, requires = "to_time")]
    exact_per_shard: bool,
    /// Every shard to the last write its WAL archive holds: the most recent state the archive
    /// can give, NOT a consistent cut across shards (each shard's archive ends where its own
    /// shipping stopped).
    #[arg(long, conflicts_with_all = ["backup", "tag", "to_seq", "to_time"])]
    to_archive_end: bool,
    /// The WAL archive to replay from (default: wal_archive in the configuration).
    #[arg(long, value_name = "URL")]
    wal_from: Option<String>,
    /// Print the plan (base backups, WAL to replay, bytes, estimated time) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replace every agent's live shard (writes made since the point are lost).
    #[arg(long)]
    in_place: bool,
    /// Restore into this directory on each agent's machine instead, one subdirectory per
    /// shard (or where `{shard}` says); the live shards are untouched.
    #[arg(long, value_name = "DIR")]
    to: Option<String>,
    /// With --to: restore only this column family (repeat, or comma separated); the others
    /// are absent from the result (the default one is empty unless named), and each shard
    /// starts a history of its own.
    #[arg(
        long = "cf",
        value_name = "NAME",
        value_delimiter = ',',
        requires = "to"
    )]
    column_families: Vec<String>,
    /// Stop the running restore (shards still staging are discarded), or settle the restores
    /// a stopped coordinator left: discarded, or applied everywhere if some shard has it.
    #[arg(long, conflicts_with_all = ["backup", "tag", "to_seq", "to_time", "to_archive_end", "dry_run", "wal_from"])]
    abort: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_seq_vector(items: &[String]) -> Result<std::collections::BTreeMap<String, u64>> {
    let mut out = std::collections::BTreeMap::new();
    for item in items {
        let parsed = item
            .split_once('=')
            .and_then(|(shard, seq)| Some((shard.trim().to_string(), seq.trim().parse().ok()?)));
        let Some((shard, seq)) = parsed else {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("--to-seq {item:?}: write SHARD=SEQ, for example shard-0=1200"),
            ));
        };
        out.insert(shard, seq);
    }
    Ok(out)
}

fn print_plan(job: &v1::RestoreJob) {
    println!(
        "{:<12} {:<26} {:>10} {:>12} {:<12} {:>10} {:>9} {:>10} TARGET TIME",
        "SHARD", "BASE BACKUP", "BASE SEQ", "BASE BYTES", "LINEAGE", "TARGET", "SEGMENTS", "REPLAY"
    );
    for p in &job.plan {
        println!(
            "{:<12} {:<26} {:>10} {:>12} {:<12} {:>10} {:>9} {:>10} {}",
            p.shard_id,
            p.base_backup_id,
            p.base_seq,
            indicatif::HumanBytes(p.base_bytes).to_string(),
            lockstep_proto::wire::lineage_text(p.lineage.as_ref()),
            p.target_seq,
            p.wal_segments,
            p.replay_seqs,
            lockstep_proto::wire::hlc_text(p.target_hlc)
        );
        if !p.chain.is_empty() {
            println!("{:<12} then the WAL of {}", "", p.chain.join(" -> "));
        }
        if p.wal_legs.len() > 1 {
            let legs: Vec<String> = p
                .wal_legs
                .iter()
                .map(|leg| {
                    format!(
                        "{} to {}",
                        lockstep_proto::wire::lineage_text(leg.lineage.as_ref()),
                        leg.to_seq
                    )
                })
                .collect();
            println!("{:<12} then the archive along {}", "", legs.join(" -> "));
        }
    }
    if !job.note.is_empty() {
        println!("Note: {}", job.note);
    }
    println!("Estimated time: {:.1} s", job.estimated_ms as f64 / 1000.0);
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a consistent backup of every shard.
    Create {
        /// full: every shard's files; incremental: the WAL since the previous backup of any
        /// kind; differential: the WAL since the latest full backup.
        #[arg(long, default_value = "full", value_parser = ["full", "incremental", "differential"])]
        kind: String,
        /// Attach a label (repeat for several): KEY of a-z, 0-9, '.', '_', '-'.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label)]
        labels: Vec<(String, String)>,
        /// Wait until the backup is committed or failed, showing progress.
        #[arg(long)]
        wait: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List committed backups.
    List {
        /// Only the backups with this label (repeat: with all of them).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label)]
        labels: Vec<(String, String)>,
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
    /// Verify one backup (`latest` works), or all of them and the WAL archive (`wal_archive`).
    Verify {
        backup: Option<String>,
        #[arg(long)]
        full: bool,
        /// Check a random PCT% of the objects (a new sample each run); manifests and the WAL
        /// archive's continuity are checked whole.
        #[arg(long, value_name = "PCT", default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
        sample: u8,
        /// With --full: leave out the objects a full verify checked within the last HOURS
        /// (incremental verify: a run each day with 168 re-reads each object about once a week;
        /// every full verify records what it checked whole and takes out what it found damaged).
        #[arg(long, value_name = "HOURS", requires = "full", value_parser = clap::value_parser!(u32).range(1..=9600))]
        skip_verified_within: Option<u32>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a backup's manifests; its objects become garbage.
    Delete { backup: String },
    /// Write a backup with its chain, or a tag with its backups and the WAL its restore
    /// replays, to one .tar.zst file (checked on import and by `lockstep-agent restore
    /// --from-file`); an encrypted repository's file stays encrypted.
    Export {
        /// Backup id (`latest` works).
        #[arg(required_unless_present = "tag", conflicts_with = "tag")]
        backup: Option<String>,
        #[arg(long)]
        tag: Option<String>,
        /// The file to write; it must not exist (written beside it, renamed when complete).
        #[arg(short = 'o', long = "output", value_name = "FILE.tar.zst")]
        output: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Load an export file into the coordinator's repository: every entry is checked, and
    /// the backups (and tag) appear only once the whole file checked.
    Import {
        file: PathBuf,
        /// Import even into a repository holding backups the file does not: the imported
        /// ones become its newest (`latest`, the next incremental's parent, retention's keep
        /// counts see them first).
        #[arg(long)]
        force: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TagCommand {
    /// Take a named restore point now (writes pause only as long as a backup's barrier).
    Create {
        name: String,
        /// Attach a label (repeat for several): KEY of a-z, 0-9, '.', '_', '-'.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label)]
        labels: Vec<(String, String)>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List tags, oldest first.
    List {
        /// Only the tags with this label (repeat: with all of them).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label)]
        labels: Vec<(String, String)>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// Remove the backups and tags the policy no longer keeps, and say why for each.
    Apply {
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `--label KEY=VALUE`, checked as the coordinator checks it.
fn label(text: &str) -> std::result::Result<(String, String), String> {
    lockstep_repository::manifest::parse_label(text).map_err(|err| err.message)
}

/// The `--label` pairs of one command as labels; a key given twice is refused.
fn labels_given(
    pairs: Vec<(String, String)>,
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut labels = std::collections::BTreeMap::new();
    for (key, value) in pairs {
        if labels.insert(key.clone(), value).is_some() {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("label {key} is given twice; give each key once"),
            ));
        }
    }
    Ok(labels)
}

/// Labels as `list` and `show` print them: `key=value,...`, or `-`.
fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn tag_cut(tag: &v1::TagInfo) -> String {
    let mut points: Vec<_> = tag.points.iter().collect();
    points.sort_by(|a, b| a.0.cmp(b.0));
    points
        .iter()
        .map(|(shard, p)| format!("{shard}={}", p.seq))
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Every agent: reachable, sequence number, gate, RAID role.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every agent's rate limits in MiB/s (0: none), changed where given; until an agent
    /// restarts (its flags or configuration file set them at start).
    Limits {
        /// Upload limit of backups and WAL shipping together.
        #[arg(long, value_name = "MIB_S")]
        upload: Option<u64>,
        /// Download limit of restores.
        #[arg(long, value_name = "MIB_S")]
        download: Option<u64>,
        /// The share of the upload limit kept for WAL shipping, in percent (0..=90).
        #[arg(long, value_name = "PCT")]
        wal_share: Option<u32>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Per shard and destination: last shipped sequence and time, lag, pending, rate, errors.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn print_wal_status(reply: &v1::ClusterWalStatus, json: bool) {
    if json {
        print_json(reply);
        return;
    }
    let mut table = Table::new(&[
        ("SHARD", Align::Left),
        ("DESTINATION", Align::Left),
        ("LINEAGE", Align::Left),
        ("SHIPPED", Align::Right),
        ("SHIPPED TIME", Align::Left),
        ("LAG SEQ", Align::Right),
        ("LAG ms", Align::Right),
        ("PENDING", Align::Right),
        ("RATE/s", Align::Right),
        ("p99 ms", Align::Right),
        ("ERROR", Align::Left),
    ]);
    let mut notes = Vec::new();
    for shard in &reply.shards {
        if shard.destinations.is_empty() {
            notes.push(format!(
                "{} (no WAL destination configured)",
                shard.shard_id
            ));
        }
        for d in &shard.destinations {
            let mut error = if d.error_code.is_empty() {
                String::new()
            } else {
                format!("{}: {}", d.error_code, d.error_message)
            };
            if d.pin_near_bound {
                error.push_str(" WAL retention near its bound!");
            }
            table.row(vec![
                shard.shard_id.clone(),
                d.url.clone(),
                lockstep_proto::wire::lineage_text(d.lineage.as_ref()),
                d.shipped_seq.to_string(),
                lockstep_proto::wire::hlc_text(d.shipped_hlc),
                d.lag_seq.to_string(),
                d.lag_ms.to_string(),
                indicatif::HumanBytes(d.pending_bytes).to_string(),
                indicatif::HumanBytes(d.rate_bytes_per_sec).to_string(),
                d.lag_p99_ms.to_string(),
                error.trim_start().to_string(),
            ]);
        }
    }
    print!("{table}");
    for note in notes {
        println!("{note}");
    }
    for a in &reply.unreachable {
        println!("{} unreachable at {}: {}", a.shard_id, a.endpoint, a.error);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A text table whose columns are as wide as their widest cell, so long URLs and ids keep
/// every row aligned; the last column is not padded.
struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, Align)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(i))
                    .map(|cell| cell.chars().count())
                    .chain([name.len()])
                    .max()
                    .unwrap_or_default()
            })
            .collect();
        let header: Vec<String> = self
            .columns
            .iter()
            .map(|(name, _)| name.to_string())
            .collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let last = row.len().saturating_sub(1);
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let width = if i == last { 0 } else { widths[i] };
                let cell = match self.columns.get(i).map_or(Align::Left, |c| c.1) {
                    Align::Left => format!("{cell:<width$}"),
                    Align::Right => format!("{cell:>width$}"),
                };
                if i > 0 {
                    line.push(' ');
                }
                line.push_str(&cell);
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, lockstep_proto::tls::Bearer>>;

async fn client(remote: &Remote) -> Result<Client> {
    let url = &remote.url;
    let channel = lockstep_proto::tls::endpoint(url, &remote.security, Identity::Coordinator)
        .map_err(|err| err.context("the coordinator (--coordinator, LOCKSTEP_COORDINATOR)"))?
        .with(|e| e.connect_timeout(Duration::from_secs(3)))
        .connect()
        .await
        .map_err(|err| {
            let hint = if url.starts_with("http://") {
                " (a coordinator with TLS is reached at https://, with --ca)"
            } else {
                ""
            };
            Error::with_source(
                ErrorCode::AgentUnavailable,
                format!("connect to the coordinator at {url}{hint}"),
                err,
            )
        })?;
    Ok(CoordinatorClient::with_interceptor(
        channel,
        remote.bearer.clone(),
    ))
}

/// A restore's outcome as `--json` prints it.
#[derive(serde::Serialize)]
struct RestoreOutput<'a> {
    #[serde(flatten)]
    job: &'a v1::RestoreJob,
    dry_run: bool,
}

fn print_garbage(report: &v1::GarbageReport) {
    let deleted = if report.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    println!(
        "objects:     {} listed, {} referenced ({} bytes)",
        report.objects_listed, report.objects_referenced, report.bytes_referenced
    );
    println!(
        "{deleted}: {} objects, {} bytes reclaimed{}",
        report.objects_deleted,
        report.bytes_reclaimed,
        if report.objects_rescued > 0 {
            format!(
                " ({} kept: a backup named them again)",
                report.objects_rescued
            )
        } else {
            String::new()
        }
    );
    println!(
        "candidates:  {} objects, {} bytes, unreferenced; deleted by a pass after their grace of {} s{}",
        report.candidates,
        report.candidate_bytes,
        report.grace_s,
        if report.next_due_at.is_empty() {
            String::new()
        } else {
            format!(" (first due {})", report.next_due_at)
        }
    );
    println!(
        "young:       {} unreferenced objects younger than the grace, left alone",
        report.objects_young
    );
    if report.orphan_manifests > 0 {
        println!(
            "orphans:     {} shard manifests of no backup {}",
            report.orphan_manifests,
            if report.dry_run {
                "would be removed"
            } else {
                "removed"
            }
        );
    }
    println!("took {} ms", report.duration_ms);
}

fn print_schedules(schedules: &[v1::ScheduleInfo]) {
    if schedules.is_empty() {
        println!("No schedules: add [[schedules]] to the coordinator's configuration.");
        return;
    }
    let mut table = Table::new(&[
        ("NAME", Align::Left),
        ("ACTION", Align::Left),
        ("CRON", Align::Left),
        ("TIMEZONE", Align::Left),
        ("NEXT RUN", Align::Left),
        ("LAST FIRED", Align::Left),
        ("RUNS", Align::Right),
        ("FAILED", Align::Right),
        ("SKIPPED", Align::Right),
        ("MISSED", Align::Right),
        ("LAST OUTCOME", Align::Left),
    ]);
    let or_dash = |text: &str| {
        if text.is_empty() {
            "-".to_string()
        } else {
            text.to_string()
        }
    };
    for s in schedules {
        table.row(vec![
            s.name.clone(),
            s.action.clone(),
            s.cron.clone(),
            s.timezone.clone(),
            or_dash(&s.next_run),
            or_dash(&s.last_fired),
            s.runs.to_string(),
            s.failed.to_string(),
            s.skipped.to_string(),
            s.missed.to_string(),
            if s.running {
                "running".to_string()
            } else {
                or_dash(&s.last_outcome)
            },
        ]);
    }
    print!("{table}");
}

fn print_retention(plan: &v1::RetentionPlan) {
    let mut table = Table::new(&[
        ("WHAT", Align::Left),
        ("NAME", Align::Left),
        ("ACTION", Align::Left),
        ("WHY", Align::Left),
    ]);
    for item in &plan.items {
        let action = match (item.remove, plan.applied) {
            (false, _) => "keep",
            (true, true) => "removed",
            (true, false) => "remove",
        };
        table.row(vec![
            item.what.clone(),
            item.name.clone(),
            action.into(),
            item.reasons.join("; "),
        ]);
    }
    print!("{table}");
    println!("WAL archive: {}", plan.wal);
    let count = |what: &str| {
        plan.items
            .iter()
            .filter(|item| item.remove && item.what == what)
            .count()
    };
    let (backups, tags, runs) = (count("backup"), count("tag"), count("wal"));
    if plan.applied {
        println!(
            "Removed {backups} backup(s), {tags} tag(s) and {runs} run(s) of WAL segments; the backups' objects are garbage now."
        );
    } else {
        println!(
            "Dry run: would remove {backups} backup(s), {tags} tag(s) and {runs} run(s) of WAL segments; nothing changed."
        );
    }
}

/// Backups per `ListBackups` page the CLI asks for.
const LIST_PAGE: u32 = 500;

pub(crate) fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
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

async fn create(
    endpoint: &Remote,
    kind: String,
    labels: Vec<(String, String)>,
    wait: bool,
    json: bool,
) -> Result<()> {
    let mut client = client(endpoint).await?;
    let job = client
        .create_backup(v1::CreateBackupRequest {
            kind,
            labels: labels_given(labels)?,
        })
        .await
        .map_err(|s| from_status("create backup", &s))?
        .into_inner();
    if !wait {
        if json {
            print_json(&job);
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
        let state = job.state();
        bar.set_message(state.label());
        show_progress(&bar, &job.shards);
        if matches!(state, v1::JobState::Committed | v1::JobState::Failed) {
            break job;
        }
    };
    bar.finish_and_clear();
    if json {
        print_json(&job);
    }
    if job.state() == v1::JobState::Failed {
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
/// `backup export`: the stream written to `<output>.partial` (a new file), synced, and linked
/// to its name only once the coordinator said it is complete (never over an existing file),
/// so the file never exists incomplete under its name.
async fn export_to_file(
    client: &mut Client,
    request: v1::ExportBackupRequest,
    output: &std::path::Path,
    json: bool,
) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let file_error = |what: &str, err| {
        Error::io(
            ErrorCode::StorageUnavailable,
            format!("{what} {}", output.display()),
            err,
        )
    };
    if output.exists() {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!("{} exists; export to a new file", output.display()),
        ));
    }
    let mut partial = output.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let started = std::time::Instant::now();
    // Made before anything is asked of the coordinator: a name taken or a directory that
    // cannot be written fails at once.
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .await
        .map_err(|err| {
            let why = if err.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    " (an export to {} is running, or one stopped: remove it)",
                    output.display()
                )
            } else {
                String::new()
            };
            Error::io(
                ErrorCode::InvalidArgument,
                format!("create {}{why}", partial.display()),
                err,
            )
        })?;
    let bar = byte_bar();
    bar.set_message("export");
    let mut written = 0u64;
    let outcome = async {
        let mut stream = client
            .export_backup(request)
            .await
            .map_err(|s| from_status("export backup", &s))?
            .into_inner();
        let mut complete = false;
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| from_status("export backup", &s))?
        {
            file.write_all(&chunk.data)
                .await
                .map_err(|err| file_error("write", err))?;
            written += chunk.data.len() as u64;
            bar.set_length(chunk.entry_bytes_total);
            bar.set_position(chunk.entry_bytes_done);
            complete = chunk.complete;
        }
        if !complete {
            return Err(Error::new(
                ErrorCode::AgentUnavailable,
                "the coordinator ended the export before the file was complete; export again",
            ));
        }
        file.sync_all()
            .await
            .map_err(|err| file_error("sync", err))?;
        publish_file(&partial, output).await
    }
    .await;
    bar.finish_and_clear();
    let _ = tokio::fs::remove_file(&partial).await;
    outcome?;
    let seconds = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({"file": output, "bytes": written, "seconds": seconds})
        );
    } else {
        println!(
            "Exported to {}: {} in {seconds:.2}s. Check it with `lockstep backup import` into a repository, or restore a shard from it with `lockstep-agent restore --from-file`.",
            output.display(),
            indicatif::HumanBytes(written),
        );
    }
    Ok(())
}

/// Gives the complete `partial` its name `output`, never over an existing file: a hard link
/// (which fails if the name exists), or on filesystems without links (FAT, exFAT, some
/// network shares) a rename after checking the name is free; then syncs the directory.
async fn publish_file(partial: &std::path::Path, output: &std::path::Path) -> Result<()> {
    let named = |what: &str, err| {
        Error::io(
            ErrorCode::StorageUnavailable,
            format!("{what} {}", output.display()),
            err,
        )
    };
    match tokio::fs::hard_link(partial, output).await {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::io(
                ErrorCode::InvalidArgument,
                format!(
                    "{} appeared while the export ran; it is left as it was",
                    output.display()
                ),
                err,
            ));
        }
        Err(_) if !output.exists() => tokio::fs::rename(partial, output)
            .await
            .map_err(|err| named("rename the export to", err))?,
        Err(err) => return Err(named("link the export to", err)),
    }
    let dir = match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    Ok(())
}

/// `backup import`: the file streamed to the coordinator in 1 MiB messages.
async fn import_file(
    client: &mut Client,
    path: &std::path::Path,
    force: bool,
    json: bool,
) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await.map_err(|err| {
        Error::io(
            ErrorCode::InvalidArgument,
            format!("open {}", path.display()),
            err,
        )
    })?;
    let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let bar = byte_bar();
    bar.set_message("import");
    bar.set_length(size);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let (ticker, shown) = (bar.clone(), path.display().to_string());
    let reading = tokio::spawn(async move {
        let mut first = true;
        loop {
            let mut data = vec![0u8; 1 << 20];
            let n = file.read(&mut data).await.map_err(|err| {
                Error::io(ErrorCode::InvalidArgument, format!("read {shown}"), err)
            })?;
            if n == 0 {
                return Ok::<_, Error>(());
            }
            data.truncate(n);
            ticker.inc(n as u64);
            let chunk = v1::ImportChunk {
                data,
                force: std::mem::take(&mut first) && force,
            };
            if tx.send(chunk).await.is_err() {
                return Ok(()); // the coordinator answered early and says why
            }
        }
    });
    let reply = client
        .import_backup(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    bar.finish_and_clear();
    if let Ok(Err(err)) = reading.await {
        return Err(err);
    }
    let reply = reply
        .map_err(|s| from_status("import backup", &s))?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reply).unwrap_or_default()
        );
        return Ok(());
    }
    let mut text = format!(
        "Imported {}: {} objects ({}), {} WAL segments",
        if reply.backup_ids.is_empty() {
            "no new backup".to_string()
        } else {
            format!("backups {}", reply.backup_ids.join(", "))
        },
        reply.objects,
        indicatif::HumanBytes(reply.stored_bytes),
        reply.wal_segments
    );
    if !reply.already_present.is_empty() {
        text.push_str(&format!(
            "; already here: {}",
            reply.already_present.join(", ")
        ));
    }
    if !reply.tag.is_empty() {
        text.push_str(&format!(
            ". Tag {} restores with `lockstep restore --tag {} --wal-from <this repository's URL>`",
            reply.tag, reply.tag
        ));
    }
    println!("{text}.");
    Ok(())
}

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

async fn restore(endpoint: &Remote, args: RestoreArgs) -> Result<()> {
    let (in_place, json) = (args.in_place, args.json);
    let mut client = client(endpoint).await?;
    if args.abort {
        let reply = client
            .abort_restore(v1::AbortRestoreRequest {})
            .await
            .map_err(|s| from_status("abort restore", &s))?
            .into_inner();
        if json {
            print_json(&reply);
        } else {
            println!("{}", reply.message);
            for restore in &reply.settled {
                println!("  {restore}");
            }
        }
        return Ok(());
    }
    let mut stream = client
        .restore(v1::RestoreClusterRequest {
            backup_id: args.backup.unwrap_or_default(),
            in_place,
            target_dir: args.to.unwrap_or_default(),
            to_seq: parse_seq_vector(&args.to_seq)?,
            to_time: args.to_time.unwrap_or_default(),
            exact_per_shard: args.exact_per_shard,
            wal_from: args.wal_from.unwrap_or_default(),
            dry_run: args.dry_run,
            tag: args.tag.unwrap_or_default(),
            to_archive_end: args.to_archive_end,
            column_families: args.column_families,
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
        bar.set_message(job.phase().label());
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
    let phase = job.phase();
    if json {
        print_json(&RestoreOutput {
            job: &job,
            dry_run: args.dry_run,
        });
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
    if args.dry_run {
        if !json {
            print_plan(&job);
        }
        return Ok(());
    }
    if !json {
        print_plan(&job);
        let replayed = job.plan.iter().any(|p| p.target_seq > p.base_seq);
        println!(
            "Restored from backup {} ({}): {} shards, every chunk checked against its SHA-256{}",
            job.backup_id,
            if in_place {
                "in place"
            } else {
                "into directories"
            },
            job.shards.len(),
            if replayed {
                ", then the WAL replayed exactly to each shard's target"
            } else {
                ""
            }
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
    if !info.labels.is_empty() {
        println!("  labels {}", labels_text(&info.labels));
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

/// The exit code of a command that ran but found the cluster unhealthy: an agent did not
/// answer (6, as for `ERR_AGENT_UNAVAILABLE`), or an agent or destination reports an error (1).
fn health_code(unreachable: bool, failing: bool) -> i32 {
    if unreachable {
        ErrorCode::AgentUnavailable.exit_code()
    } else if failing {
        1
    } else {
        0
    }
}

/// Runs one command; returns its exit code when it ran (a failed verify or an unhealthy
/// cluster is not 0).
async fn run_command(cli: Cli) -> Result<i32> {
    let remote = Remote::new(&cli.coordinator, &cli.auth);
    // Commands that talk to no coordinator run without its TLS files.
    let endpoint = &match (&cli.command, remote) {
        (Command::Serve { .. } | Command::Demo(_) | Command::Cert(_) | Command::Key(_), _) => {
            Remote {
                url: cli.coordinator.clone(),
                security: lockstep_proto::tls::Security::Plaintext,
                bearer: Default::default(),
            }
        }
        (_, remote) => remote?,
    };
    match cli.command {
        Command::Cert(command) => crate::cert::run(command)?,
        Command::Key(command) => crate::key::run(command).await?,
        Command::Serve {
            config,
            metrics_listen,
        } => {
            let mut config = Config::load(&config)?;
            if metrics_listen.is_some() {
                config.metrics_listen = metrics_listen;
            }
            if let Some(address) = &config.metrics_listen {
                lockstep_process::metrics::serve(address, "lockstep")?;
            }
            let (listener, address) = lockstep_process::bind(&config.listen).await?;
            let n_agents = config.agents.len();
            let shutdown = lockstep_process::shutdown_on_signal();
            let on_ready = move || {
                if n_agents == 0 {
                    // The address ends the line: scripts read it after "listening on ".
                    println!(
                        "lockstep: WAL archive for other regions (no agents; ship with --wal-to lockstep://{address}) listening on {address}"
                    )
                } else {
                    println!("lockstep: coordinator of {n_agents} shards listening on {address}")
                }
            };
            crate::service::serve(config, listener, shutdown, on_ready).await?;
        }
        Command::Restore(args) => restore(endpoint, args).await?,
        Command::Backup(BackupCommand::Create {
            kind,
            labels,
            wait,
            json,
        }) => create(endpoint, kind, labels, wait, json).await?,
        Command::Backup(BackupCommand::List { labels, json }) => {
            let mut client = client(endpoint).await?;
            let labels = labels_given(labels)?;
            // Page by page: one reply for every backup outgrows the message limit.
            let mut reply = v1::ListBackupsReply::default();
            loop {
                let page = client
                    .list_backups(v1::ListBackupsRequest {
                        labels: labels.clone(),
                        page_size: LIST_PAGE,
                        page_token: reply.next_page_token.clone(),
                    })
                    .await
                    .map_err(|s| from_status("list backups", &s))?
                    .into_inner();
                reply.backups.extend(page.backups);
                reply.next_page_token = page.next_page_token;
                if reply.next_page_token.is_empty() {
                    break;
                }
            }
            if json {
                print_json(&reply.backups.iter().map(info_json).collect::<Vec<_>>());
            } else if reply.backups.is_empty() {
                println!("No backups.");
            } else {
                let mut table = Table::new(&[
                    ("BACKUP", Align::Left),
                    ("KIND", Align::Left),
                    ("COMPLETED", Align::Left),
                    ("SHARDS", Align::Right),
                    ("BYTES", Align::Right),
                    ("PAUSE ms", Align::Right),
                    ("PARENT", Align::Left),
                    ("LABELS", Align::Left),
                ]);
                let mut unreadable = Vec::new();
                for b in &reply.backups {
                    if b.error_code.is_empty() {
                        table.row(vec![
                            b.backup_id.clone(),
                            b.kind.clone(),
                            b.completed_at.clone(),
                            b.n_shards.to_string(),
                            b.bytes_total.to_string(),
                            format!("{:.3}", b.max_gate_closed_us as f64 / 1000.0),
                            if b.parent.is_empty() {
                                "-".into()
                            } else {
                                b.parent.clone()
                            },
                            labels_text(&b.labels),
                        ]);
                    } else {
                        unreadable.push(format!("{} {}", b.backup_id, b.error_code));
                    }
                }
                print!("{table}");
                for line in unreadable {
                    println!("{line}");
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
        Command::Backup(BackupCommand::Verify {
            backup,
            full,
            sample,
            skip_verified_within,
            json,
        }) => {
            let mut client = client(endpoint).await?;
            let mut stream = client
                .verify_backup_stream(v1::VerifyBackupRequest {
                    backup_id: backup.unwrap_or_default(),
                    full,
                    sample_percent: u32::from(sample),
                    skip_verified_within_hours: skip_verified_within.unwrap_or(0),
                })
                .await
                .map_err(|s| from_status("verify backup", &s))?
                .into_inner();
            let bar = byte_bar();
            bar.set_message("verify");
            let reply = loop {
                let Some(update) = stream
                    .message()
                    .await
                    .map_err(|s| from_status("verify backup", &s))?
                else {
                    return Err(Error::new(
                        ErrorCode::AgentUnavailable,
                        "the coordinator ended the verify without a report; run it again",
                    ));
                };
                bar.set_length(update.bytes_total);
                bar.set_position(update.bytes_done);
                if let Some(report) = update.report {
                    break report;
                }
            };
            bar.finish_and_clear();
            if json {
                println!("{}", reply.report_json);
            } else {
                println!("{}", reply.report);
            }
            return Ok(if reply.passed {
                0
            } else {
                ErrorCode::BackupVerificationFailed.exit_code()
            });
        }
        Command::Backup(BackupCommand::Export {
            backup,
            tag,
            output,
            json,
        }) => {
            let request = v1::ExportBackupRequest {
                backup_id: backup.unwrap_or_default(),
                tag: tag.unwrap_or_default(),
            };
            export_to_file(&mut client(endpoint).await?, request, &output, json).await?;
        }
        Command::Backup(BackupCommand::Import { file, force, json }) => {
            import_file(&mut client(endpoint).await?, &file, force, json).await?;
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
            let code = health_code(
                reply.agents.iter().any(|a| !a.reachable),
                reply.agents.iter().any(|a| !a.error.is_empty()),
            );
            if json {
                print_json(&reply);
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
            return Ok(code);
        }
        Command::Cluster(ClusterCommand::Limits {
            upload,
            download,
            wal_share,
            json,
        }) => {
            let mut client = client(endpoint).await?;
            let reply = client
                .set_limits(v1::SetLimitsRequest {
                    upload_mib_s: upload,
                    download_mib_s: download,
                    wal_share_percent: wal_share,
                })
                .await
                .map_err(|s| from_status("cluster limits", &s))?
                .into_inner();
            let failed = reply.agents.iter().any(|a| !a.error_code.is_empty());
            if json {
                print_json(&reply);
            } else {
                let rate = |mib: u64| {
                    if mib == 0 {
                        "none".to_string()
                    } else {
                        format!("{mib} MiB/s")
                    }
                };
                println!(
                    "{:<16} {:>12} {:>12} {:>10} ERROR",
                    "SHARD", "UPLOAD", "DOWNLOAD", "WAL SHARE"
                );
                for a in &reply.agents {
                    if a.error_code.is_empty() {
                        println!(
                            "{:<16} {:>12} {:>12} {:>9}%",
                            a.shard_id,
                            rate(a.upload_mib_s),
                            rate(a.download_mib_s),
                            a.wal_share_percent
                        );
                    } else {
                        println!(
                            "{:<16} {:>12} {:>12} {:>10} {}: {}",
                            a.shard_id, "-", "-", "-", a.error_code, a.error_message
                        );
                    }
                }
            }
            return Ok(health_code(failed, false));
        }
        Command::Tag(TagCommand::Create { name, labels, json }) => {
            let mut client = client(endpoint).await?;
            let tag = client
                .create_tag(v1::CreateTagRequest {
                    name,
                    labels: labels_given(labels)?,
                })
                .await
                .map_err(|s| from_status("create tag", &s))?
                .into_inner();
            if json {
                print_json(&tag);
            } else {
                println!(
                    "Tag {} created: {} (writes paused at most {:.3} ms).",
                    tag.name,
                    tag_cut(&tag),
                    tag.max_gate_closed_us as f64 / 1000.0
                );
            }
        }
        Command::Gc { dry_run, json } => {
            let mut client = client(endpoint).await?;
            let report = client
                .collect_garbage(v1::CollectGarbageRequest { dry_run })
                .await
                .map_err(|s| from_status("collect garbage", &s))?
                .into_inner();
            if json {
                print_json(&report);
            } else {
                print_garbage(&report);
            }
        }
        Command::Demo(args) => {
            let demo = tokio::task::spawn_blocking(move || crate::demo::run(&args));
            let stopping = lockstep_process::shutdown_on_signal();
            return tokio::select! {
                ran = demo => ran.map_err(|err| {
                    Error::with_source(ErrorCode::InvalidArgument, "run the demo", err)
                })?,
                () = stopping.cancelled() => {
                    crate::demo::stop_everything();
                    Err(Error::new(ErrorCode::InvalidArgument, "the demo was stopped; its processes are told to stop"))
                }
            };
        }
        Command::Schedule(ScheduleCommand::List { json }) => {
            let mut client = client(endpoint).await?;
            let reply = client
                .list_schedules(v1::ListSchedulesRequest {})
                .await
                .map_err(|s| from_status("list schedules", &s))?
                .into_inner();
            if json {
                print_json(&reply.schedules);
            } else {
                print_schedules(&reply.schedules);
            }
        }
        Command::Retention(RetentionCommand::Apply { dry_run, json }) => {
            let mut client = client(endpoint).await?;
            let plan = client
                .apply_retention(v1::ApplyRetentionRequest { dry_run })
                .await
                .map_err(|s| from_status("apply retention", &s))?
                .into_inner();
            if json {
                print_json(&plan);
            } else {
                print_retention(&plan);
            }
        }
        Command::Tag(TagCommand::List { labels, json }) => {
            let mut client = client(endpoint).await?;
            let reply = client
                .list_tags(v1::ListTagsRequest {
                    labels: labels_given(labels)?,
                })
                .await
                .map_err(|s| from_status("list tags", &s))?
                .into_inner();
            if json {
                print_json(&reply.tags);
            } else if reply.tags.is_empty() {
                println!("No tags.");
            } else {
                let mut table = Table::new(&[
                    ("TAG", Align::Left),
                    ("CREATED", Align::Left),
                    ("AUTO", Align::Left),
                    ("CUT", Align::Left),
                    ("LABELS", Align::Left),
                ]);
                let mut unreadable = Vec::new();
                for tag in &reply.tags {
                    if tag.error_code.is_empty() {
                        table.row(vec![
                            tag.name.clone(),
                            tag.created_at.clone(),
                            if tag.automatic { "yes" } else { "no" }.into(),
                            tag_cut(tag),
                            labels_text(&tag.labels),
                        ]);
                    } else {
                        unreadable.push(format!("{} {}", tag.name, tag.error_code));
                    }
                }
                print!("{table}");
                for line in unreadable {
                    println!("{line}");
                }
            }
        }
        Command::Wal(WalCommand::Status { json }) => {
            let mut client = client(endpoint).await?;
            let reply = client
                .wal_status(v1::WalStatusRequest {})
                .await
                .map_err(|s| from_status("WAL status", &s))?
                .into_inner();
            print_wal_status(&reply, json);
            let failing = reply
                .shards
                .iter()
                .flat_map(|s| &s.destinations)
                .any(|d| !d.error_code.is_empty() || d.pin_near_bound);
            return Ok(health_code(!reply.unreachable.is_empty(), failing));
        }
    }
    Ok(0)
}

/// Runs one command; returns the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match run_command(cli).await {
        Ok(code) => code,
        Err(err) => lockstep_process::report_error(&err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_keeps_its_columns_aligned_whatever_the_width_of_a_cell() {
        let mut table = Table::new(&[
            ("SHARD", Align::Left),
            ("DESTINATION", Align::Left),
            ("SHIPPED", Align::Right),
            ("ERROR", Align::Left),
        ]);
        table.row(vec![
            "shard-0".into(),
            "file:///a".into(),
            "7".into(),
            String::new(),
        ]);
        table.row(vec![
            "shard-1".into(),
            "s3://a-very-long-bucket-name/with/a/deep/prefix/for/the/wal-archive".into(),
            "123456".into(),
            "ERR_BACKUP_WAL_GAP: a hole".into(),
        ]);
        let text = table.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        // Every right-aligned SHIPPED value ends where its header does.
        let end = lines[0].find("SHIPPED").expect("header") + "SHIPPED".len();
        assert_eq!(&lines[1][end - 1..end], "7", "{text}");
        assert_eq!(&lines[2][end - 6..end], "123456", "{text}");
        assert!(lines[2].ends_with("ERR_BACKUP_WAL_GAP: a hole"), "{text}");
        assert!(!lines[1].ends_with(' '), "no trailing spaces: {text:?}");
    }
}
