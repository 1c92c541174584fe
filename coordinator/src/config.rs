//! The coordinator's configuration: one TOML file, validated with clear messages; unknown
//! keys are rejected. `deploy/lockstep.example.toml` is the reference, every key with its
//! default; a test parses it.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use lockstep_proto::auth::Identity;
use lockstep_proto::tls::{Security, Tls};
use lockstep_repository::manifest::{RaidGroup, RaidLayout};
use lockstep_repository::{Error, ErrorCode, Result, ShardId};
use serde::Deserialize;

/// One agent and the shard it owns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub shard: ShardId,
    /// gRPC endpoint: `https://10.0.0.5:7401` (its certificate must name
    /// `lockstep://agent/<shard>`), or `http://` with `plaintext = true`.
    pub endpoint: String,
}

/// Timing of the two-phase barrier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BarrierConfig {
    pub lease_ms: u64,
    pub prepare_timeout_ms: u64,
    /// The deadline for every agent's Staged (its capture, with the gate open).
    pub stage_timeout_ms: u64,
    /// How long after sending Prepare every agent closes its gate (ARCHITECTURE.md,
    /// "Scheduled close"); 0 closes each gate when its Prepare arrives.
    pub close_lead_ms: u64,
    /// Longest wait for all uploads after Commit.
    pub upload_timeout_ms: u64,
    /// The deadline of one short agent call: Abort, a status poll, Describe, a discard.
    pub control_timeout_ms: u64,
    /// The deadline of one agent's in-place swap of a staged restore.
    pub apply_timeout_ms: u64,
    /// How long a coordinator that took the repository over waits before it removes an
    /// uncommitted backup's leftovers: the coordinator it fenced out may be publishing it.
    pub takeover_grace_ms: u64,
}

impl Default for BarrierConfig {
    fn default() -> Self {
        BarrierConfig {
            lease_ms: 10_000,
            prepare_timeout_ms: 5_000,
            stage_timeout_ms: 60_000,
            close_lead_ms: 5,
            upload_timeout_ms: 3_600_000,
            control_timeout_ms: 2_000,
            apply_timeout_ms: 120_000,
            takeover_grace_ms: 5_000,
        }
    }
}

impl BarrierConfig {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    pub fn stage_timeout(&self) -> Duration {
        Duration::from_millis(self.stage_timeout_ms)
    }

    pub fn prepare_timeout(&self) -> Duration {
        Duration::from_millis(self.prepare_timeout_ms)
    }

    pub fn upload_timeout(&self) -> Duration {
        Duration::from_millis(self.upload_timeout_ms)
    }

    pub fn control_timeout(&self) -> Duration {
        Duration::from_millis(self.control_timeout_ms)
    }

    pub fn takeover_grace(&self) -> Duration {
        Duration::from_millis(self.takeover_grace_ms)
    }
}

/// Named restore points.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TagsConfig {
    /// Take an automatic tag every this many seconds; 0 turns it off.
    pub auto_every_s: u64,
}

/// `[verify]`: checks the repository makes by itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// Verify every committed backup right after its commit: `off`, `quick` (every object
    /// there with its size) or `full` (every object downloaded and re-hashed).
    pub after_backup: AfterBackup,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterBackup {
    #[default]
    Off,
    Quick,
    Full,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The cluster's name, recorded in the repository when it is first used: a coordinator
    /// of another cluster pointed at the same repository is refused.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Repository URL or local path.
    pub repository: String,
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default)]
    pub barrier: BarrierConfig,
    /// Every agent of the cluster. None (`agents = []`): a coordinator that only serves its
    /// repository as a WAL archive to another region's agents.
    #[serde(default)]
    pub agents: Vec<AgentConfig>,
    #[serde(default)]
    pub raid_groups: Vec<RaidGroup>,
    /// The WAL archive point-in-time restores replay from (one of the agents' `--wal-to`
    /// destinations); a restore can name another with `--wal-from`.
    #[serde(default)]
    pub wal_archive: Option<String>,
    #[serde(default)]
    pub tags: TagsConfig,
    #[serde(default)]
    pub retention: crate::retention::RetentionConfig,
    #[serde(default)]
    pub gc: crate::gc::GcConfig,
    #[serde(default)]
    pub verify: VerifyConfig,
    /// `[[schedules]]`: what the coordinator runs by itself, and when.
    #[serde(default)]
    pub schedules: Vec<crate::schedule::ScheduleConfig>,
    /// Serve Prometheus metrics at http://ADDR/metrics; the coordinator then polls its
    /// agents every 15 s for `lockstep_agent_up`.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// `[tls]`: mutual TLS for the coordinator's server and its calls to agents and to
    /// `lockstep://` archives (`lockstep cert` makes the files).
    #[serde(default)]
    pub tls: Option<lockstep_proto::tls::TlsFiles>,
    /// Serve and call without TLS: anyone who reaches the port may act on the cluster. Chosen
    /// explicitly, never a default.
    #[serde(default)]
    pub plaintext: bool,
}

fn default_cluster() -> String {
    "default".to_string()
}

fn default_listen() -> String {
    "127.0.0.1:7400".to_string()
}

fn invalid(message: String) -> Error {
    Error::new(ErrorCode::InvalidArgument, message)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            Error::io(
                ErrorCode::InvalidArgument,
                format!("read config {}", path.display()),
                err,
            )
        })?;
        Config::parse(&text).map_err(|err| err.context(format!("config {}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|err| invalid(err.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        match (&self.tls, self.plaintext) {
            (Some(_), true) => {
                return Err(invalid(
                    "[tls] and plaintext = true contradict each other: keep one".to_string(),
                ));
            }
            (None, false) => {
                return Err(invalid(
                    "no [tls] section: configure mutual TLS (`lockstep cert` makes the files), or set plaintext = true to let anyone who reaches the ports act on the cluster"
                        .to_string(),
                ));
            }
            (Some(tls), false) if tls.cert.is_none() || tls.key.is_none() => {
                return Err(invalid(
                    "[tls] needs cert and key: the coordinator's certificate (lockstep://coordinator) and its key"
                        .to_string(),
                ));
            }
            _ => {}
        }
        let mut shards = HashSet::new();
        for agent in &self.agents {
            if !shards.insert(agent.shard.clone()) {
                return Err(invalid(format!(
                    "shard {} is listed for two agents",
                    agent.shard
                )));
            }
            let scheme_ok = if self.plaintext {
                agent.endpoint.starts_with("http://")
            } else {
                agent.endpoint.starts_with("https://")
            };
            if !scheme_ok {
                return Err(invalid(format!(
                    "agent {}: endpoint {:?} must start with {}",
                    agent.shard,
                    agent.endpoint,
                    if self.plaintext {
                        "http:// (plaintext = true)"
                    } else {
                        "https:// ([tls] is configured)"
                    }
                )));
            }
        }
        if self.cluster.is_empty()
            || !self
                .cluster
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(format!(
                "cluster name {:?} must be letters, digits, '-', '_' or '.'",
                self.cluster
            )));
        }
        crate::schedule::validate(&self.schedules, !self.agents.is_empty(), &self.retention)?;
        if !(1..=10 * 365 * 86_400).contains(&self.gc.grace_s) {
            return Err(invalid(format!(
                "[gc] grace_s ({}) must be 1..=315360000: longer than any upload takes, at most ten years",
                self.gc.grace_s
            )));
        }
        let b = &self.barrier;
        if b.lease_ms == 0 || b.prepare_timeout_ms == 0 || b.prepare_timeout_ms >= b.lease_ms {
            return Err(invalid(format!(
                "[barrier] prepare_timeout_ms ({}) must be positive and shorter than lease_ms ({}), so the \
                 coordinator gives up before any agent's lease runs out",
                b.prepare_timeout_ms, b.lease_ms
            )));
        }
        // An agent holds a staged capture for stage + prepare timeouts + lease, at most 300 s.
        if b.stage_timeout_ms == 0
            || b.stage_timeout_ms + b.prepare_timeout_ms + b.lease_ms > 300_000
        {
            return Err(invalid(format!(
                "[barrier] stage_timeout_ms ({}) must be positive, and with prepare_timeout_ms and \
                 lease_ms at most 300000 ms (the longest an agent holds a capture)",
                b.stage_timeout_ms
            )));
        }
        // An agent waits at most 1 s for its close time (MAX_CLOSE_WAIT in the agent).
        if b.close_lead_ms > 1000 || b.close_lead_ms >= b.prepare_timeout_ms {
            return Err(invalid(format!(
                "[barrier] close_lead_ms ({}) must be at most 1000 and shorter than \
                 prepare_timeout_ms ({})",
                b.close_lead_ms, b.prepare_timeout_ms
            )));
        }
        if b.upload_timeout_ms == 0 || b.control_timeout_ms == 0 || b.apply_timeout_ms == 0 {
            return Err(invalid(
                "[barrier] upload_timeout_ms, control_timeout_ms and apply_timeout_ms must be positive"
                    .to_string(),
            ));
        }
        let mut grouped = HashSet::new();
        for group in &self.raid_groups {
            let (n_data, n_parity) = (group.data.len(), group.parity.len());
            let rule = match group.layout {
                RaidLayout::None => (n_data >= 1 && n_parity == 0)
                    .then_some(())
                    .ok_or("at least 1 data shard and no parity"),
                RaidLayout::Raid1 => (n_data >= 2 && n_parity == 0)
                    .then_some(())
                    .ok_or("at least 2 data (mirror) shards and no parity"),
                RaidLayout::Raid5 => (n_data >= 2 && n_parity == 1)
                    .then_some(())
                    .ok_or("at least 2 data shards and exactly 1 parity shard"),
                RaidLayout::Raid6 => (n_data >= 2 && n_parity == 2)
                    .then_some(())
                    .ok_or("at least 2 data shards and exactly 2 parity shards"),
                RaidLayout::Raid10 => (n_data >= 4 && n_data.is_multiple_of(2) && n_parity == 0)
                    .then_some(())
                    .ok_or("an even number (at least 4) of data shards and no parity"),
            };
            if let Err(needs) = rule {
                return Err(invalid(format!(
                    "RAID group {} ({}) has {n_data} data and {n_parity} parity shards; it needs {needs}",
                    group.name, group.layout
                )));
            }
            for (member, role) in group.members() {
                if !shards.contains(member) {
                    return Err(invalid(format!(
                        "RAID group {}: {role} shard {member} has no agent in [[agents]]",
                        group.name
                    )));
                }
                if !grouped.insert(member.clone()) {
                    return Err(invalid(format!(
                        "shard {member} is in more than one RAID group"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The transport security the configuration chose: its `[tls]` files loaded (the
    /// certificate must name `lockstep://coordinator`), or plaintext.
    pub fn security(&self) -> Result<Security> {
        match &self.tls {
            None => Ok(Security::Plaintext),
            Some(files) => {
                let tls = Tls::load(files.clone()).map_err(|err| err.context("[tls]"))?;
                tls.check_serves_as(&Identity::Coordinator)?;
                Ok(Security::Tls(tls))
            }
        }
    }

    /// Every shard id, in configuration order.
    pub fn shard_ids(&self) -> Vec<ShardId> {
        self.agents.iter().map(|a| a.shard.clone()).collect()
    }

    /// The RAID group and role of a shard, for status displays.
    pub fn group_of(&self, shard: &ShardId) -> Option<(String, String)> {
        self.raid_groups.iter().find_map(|g| {
            g.members()
                .find(|(m, _)| *m == shard)
                .map(|(_, role)| (g.name.clone(), role.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
repository = "memory://x"
plaintext = true
[[agents]]
shard = "shard-0"
endpoint = "http://127.0.0.1:1"
[[agents]]
shard = "shard-1"
endpoint = "http://127.0.0.1:2"
[[agents]]
shard = "shard-2"
endpoint = "http://127.0.0.1:3"
[[raid_groups]]
name = "g"
layout = "raid5"
data = ["shard-0", "shard-1"]
parity = ["shard-2"]
"#;

    fn message(text: &str) -> String {
        Config::parse(text)
            .err()
            .map(|e| e.message)
            .unwrap_or_default()
    }

    #[test]
    fn the_reference_configuration_parses_with_every_section() {
        let config = Config::parse(include_str!("../../deploy/lockstep.example.toml"))
            .expect("the reference configuration");
        assert_eq!(config.shard_ids().len(), 3);
        assert_eq!(config.raid_groups.len(), 1);
        assert!(config.wal_archive.is_some());
        assert_eq!(config.schedules.len(), 4);
        // Its values are the defaults.
        assert_eq!(config.tags.auto_every_s, TagsConfig::default().auto_every_s);
        assert_eq!(config.gc.grace_s, crate::gc::GcConfig::default().grace_s);
        assert_eq!(config.verify.after_backup, AfterBackup::default());
        let (shown, default) = (&config.barrier, BarrierConfig::default());
        assert_eq!(
            (
                shown.lease_ms,
                shown.prepare_timeout_ms,
                shown.stage_timeout_ms
            ),
            (
                default.lease_ms,
                default.prepare_timeout_ms,
                default.stage_timeout_ms
            )
        );
        assert_eq!(
            (shown.close_lead_ms, shown.upload_timeout_ms),
            (default.close_lead_ms, default.upload_timeout_ms)
        );
        assert_eq!(
            (shown.control_timeout_ms, shown.apply_timeout_ms),
            (default.control_timeout_ms, default.apply_timeout_ms)
        );
    }

    #[test]
    fn a_valid_raid5_topology_parses() {
        let config = Config::parse(GOOD).expect("valid config");
        assert_eq!(config.shard_ids().len(), 3);
        assert_eq!(config.barrier.lease_ms, 10_000);
        let shard = ShardId::new("shard-2").expect("id");
        assert_eq!(config.group_of(&shard), Some(("g".into(), "parity".into())));
    }

    #[test]
    fn mistakes_get_clear_messages() {
        assert!(message(&format!("{GOOD}\nunknown_key = 1")).contains("unknown"));
        assert!(
            message(&GOOD.replace("parity = [\"shard-2\"]", "parity = []"))
                .contains("exactly 1 parity")
        );
        assert!(message(&GOOD.replace("raid5", "raid6")).contains("exactly 2 parity"));
        assert!(message(&GOOD.replace("raid5", "raid7")).contains("unknown variant"));
        assert!(
            message(&GOOD.replace("data = [\"shard-0\"", "data = [\"shard-9\""))
                .contains("has no agent")
        );
        assert!(message(&GOOD.replace("http://127.0.0.1:2", "127.0.0.1:2")).contains("http://"));
        assert!(
            message(&GOOD.replace("http://127.0.0.1:2", "https://127.0.0.1:2"))
                .contains("must start with http://")
        );
        assert!(message(&GOOD.replace("plaintext = true", "")).contains("no [tls] section"));
        let tls = GOOD
            .replace("plaintext = true", "")
            .replace("http://", "https://")
            .replace(
                "[[raid_groups]]",
                "[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n[[raid_groups]]",
            );
        assert!(Config::parse(&tls).is_ok(), "{}", message(&tls));
        assert!(
            message(&tls.replace("https://127.0.0.1:2", "http://127.0.0.1:2"))
                .contains("must start with https://")
        );
        assert!(message(&format!("plaintext = true\n{tls}")).contains("contradict"));
        assert!(message(&tls.replace("key = \"c.key\"\n", "")).contains("needs cert and key"));
        assert!(
            message(&format!("{GOOD}\n[barrier]\ncontrol_timeout_ms = 0")).contains("positive")
        );
        assert!(
            message(&GOOD.replace("shard-1\"\nendpoint", "shard-0\"\nendpoint"))
                .contains("two agents")
        );
        assert!(
            message(&format!(
                "{GOOD}\n[barrier]\nlease_ms = 100\nprepare_timeout_ms = 200"
            ))
            .contains("shorter than lease_ms")
        );
        assert!(
            message(&format!("{GOOD}\n[barrier]\nclose_lead_ms = 5000"))
                .contains("close_lead_ms (5000) must be at most 1000")
        );
        assert!(
            message(&GOOD.replace("shard = \"shard-0\"", "shard = \"../x\""))
                .contains("invalid shard id")
        );
        for grace in ["0", "400000000"] {
            assert!(
                message(&format!("{GOOD}\n[gc]\ngrace_s = {grace}")).contains("[gc] grace_s"),
                "{grace}"
            );
        }
    }
}
