//! A real cluster on 127.0.0.1: a coordinator and three agents (one RAID5 group: two data
//! shards and one parity shard) as separate processes, driven through the `lockstep` CLI and
//! the gRPC API, with processes killed mid-barrier.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use lockstep_agent::engine::{RocksEngine, ShardEngine};
use lockstep_proto::v1;
use lockstep_proto::v1::agent_client::AgentClient;
use lockstep_proto::v1::shard_client::ShardClient;
use lockstep_tests::{agent_ok, binary, kill_hard, start_server, text};
use tonic::transport::Channel;

pub const N_AGENTS: usize = 3;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub agents: Vec<Option<Child>>,
    pub addresses: Vec<String>,
    pub coordinator: Option<Child>,
    pub coordinator_address: String,
    pub lease_ms: u64,
    /// More arguments for every agent (another `--wal-to`, say), and its environment.
    pub agent_extra: Vec<String>,
    pub agent_env: Vec<(String, String)>,
    /// With mutual TLS: the directory of the CA and every identity's certificate and key
    /// (`coordinator`, `agent-shard-N`, `operator-alice`, `reader-grafana`, `client-app`).
    pub pki: Option<PathBuf>,
    /// Environment of every process that opens the repository (agents, the coordinator and
    /// the CLI): an encrypted repository's passphrase file.
    pub repo_env: Vec<(String, String)>,
}

impl Cluster {
    pub fn shard(i: usize) -> String {
        format!("shard-{i}")
    }

    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// The WAL archive every agent ships to (the "other region").
    pub fn archive(&self) -> PathBuf {
        self.dir.path().join("wal-archive")
    }

    fn agent_args(&self, i: usize, listen: &str) -> Vec<String> {
        let db = self.dir.path().join(format!("db-{i}"));
        let security: Vec<String> = match &self.pki {
            None => vec!["--plaintext".into()],
            Some(pki) => {
                let file = |name: &str| pki.join(name).display().to_string();
                vec![
                    "--tls-ca".into(),
                    file("ca.pem"),
                    "--tls-cert".into(),
                    file(&format!("agent-shard-{i}.pem")),
                    "--tls-key".into(),
                    file(&format!("agent-shard-{i}.key")),
                ]
            }
        };
        [
            "serve",
            "--db",
            db.to_str().expect("utf-8"),
            "--shard",
            &Cluster::shard(i),
            "--listen",
            listen,
            "--repo",
            self.repo().to_str().expect("utf-8"),
            "--wal-to",
            self.archive().to_str().expect("utf-8"),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(security)
        .chain(self.agent_extra.iter().cloned())
        .collect()
    }

    /// Starts three agents and a coordinator; `fault` sets `LOCKSTEP_FAULT_PAUSE` on it.
    pub fn start(lease_ms: u64, fault: Option<&str>) -> Cluster {
        Cluster::start_with(lease_ms, fault, Vec::new(), Vec::new())
    }

    /// `start`, with more arguments and environment for every agent.
    pub fn start_with(
        lease_ms: u64,
        fault: Option<&str>,
        agent_extra: Vec<String>,
        agent_env: Vec<(String, String)>,
    ) -> Cluster {
        Cluster::start_in(
            tempfile::tempdir().expect("tempdir"),
            lease_ms,
            fault,
            agent_extra,
            agent_env,
            false,
            Vec::new(),
        )
    }

    /// `start` with mutual TLS on every server and client: a CA, and a certificate for the
    /// coordinator, each agent, an operator (the CLI's), a reader and a Shard API client.
    pub fn start_secure(lease_ms: u64) -> Cluster {
        Cluster::start_in(
            tempfile::tempdir().expect("tempdir"),
            lease_ms,
            None,
            Vec::new(),
            Vec::new(),
            true,
            Vec::new(),
        )
    }

    /// `start` on an encrypted repository, created by the first agent with `passphrase`
    /// (which every process gets in a file named by `LOCKSTEP_PASSPHRASE_FILE`).
    pub fn start_encrypted(lease_ms: u64, passphrase: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("passphrase");
        std::fs::write(&file, passphrase).expect("write the passphrase");
        let repo_env = vec![(
            "LOCKSTEP_PASSPHRASE_FILE".to_string(),
            file.display().to_string(),
        )];
        Cluster::start_in(dir, lease_ms, None, Vec::new(), Vec::new(), false, repo_env)
    }

    /// The `[tls]` files of `name` (`operator-alice`, ...): CA, certificate, key.
    pub fn tls_files(&self, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let pki = self.pki.as_ref().expect("a cluster with TLS");
        (
            pki.join("ca.pem"),
            pki.join(format!("{name}.pem")),
            pki.join(format!("{name}.key")),
        )
    }

    /// A channel to agent `i` as `name` (a certificate in the PKI), or plaintext.
    pub async fn agent_channel(&self, i: usize, name: &str) -> Channel {
        use lockstep_proto::tls::{Security, Tls, TlsFiles, endpoint};
        let (security, scheme) = match &self.pki {
            None => (Security::Plaintext, "http"),
            Some(_) => {
                let (ca, cert, key) = self.tls_files(name);
                let tls = Tls::load(TlsFiles {
                    ca,
                    cert: Some(cert),
                    key: Some(key),
                    tokens: None,
                })
                .expect("load TLS files");
                (Security::Tls(tls), "https")
            }
        };
        let shard = lockstep_repository::ShardId::new(Cluster::shard(i)).expect("shard");
        endpoint(
            &format!("{scheme}://{}", self.addresses[i]),
            &security,
            lockstep_proto::auth::Identity::Agent(shard),
        )
        .expect("endpoint")
        .connect()
        .await
        .expect("connect agent")
    }

    /// `start`, every shard first loaded with `mib` MiB of incompressible values (so a
    /// backup's uploads take a while).
    pub fn start_loaded(lease_ms: u64, mib: u64) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..N_AGENTS {
            let db = dir.path().join(format!("db-{i}"));
            agent_ok(&[
                "load",
                "--db",
                db.to_str().expect("utf-8"),
                "--keys",
                &(mib * 1024).to_string(),
                "--value-size",
                "1024",
                "--random-fraction",
                "1.0",
            ]);
        }
        Cluster::start_in(
            dir,
            lease_ms,
            None,
            Vec::new(),
            Vec::new(),
            false,
            Vec::new(),
        )
    }

    fn start_in(
        dir: tempfile::TempDir,
        lease_ms: u64,
        fault: Option<&str>,
        agent_extra: Vec<String>,
        agent_env: Vec<(String, String)>,
        tls: bool,
        repo_env: Vec<(String, String)>,
    ) -> Cluster {
        let pki = tls.then(|| {
            use lockstep_coordinator::cert::{create_ca, file_name, issue};
            use lockstep_proto::auth::Identity;
            let pki = dir.path().join("tls");
            create_ca(&pki, 1).expect("create the CA");
            let names = [
                "lockstep://coordinator",
                "lockstep://operator/alice",
                "lockstep://reader/grafana",
                "lockstep://client/app",
            ]
            .map(String::from)
            .into_iter()
            .chain((0..N_AGENTS).map(|i| format!("lockstep://agent/shard-{i}")));
            for uri in names {
                let identity = Identity::parse(&uri).expect("identity");
                issue(&pki, &identity, &[], 1, Some(&file_name(&identity))).expect("issue");
            }
            std::fs::write(pki.join("tokens"), "").expect("write the token file");
            pki
        });
        let mut cluster = Cluster {
            dir,
            agents: Vec::new(),
            addresses: Vec::new(),
            coordinator: None,
            coordinator_address: String::new(),
            lease_ms,
            agent_extra,
            agent_env: agent_env.into_iter().chain(repo_env.clone()).collect(),
            pki,
            repo_env,
        };
        for i in 0..N_AGENTS {
            let args = cluster.agent_args(i, "127.0.0.1:0");
            let (child, address) = start_server(
                "lockstep-agent",
                &args,
                &cluster.agent_env,
                &cluster.log(&format!("agent-{i}")),
            );
            cluster.agents.push(Some(child));
            cluster.addresses.push(address);
        }
        let scheme = if cluster.pki.is_some() {
            "https"
        } else {
            "http"
        };
        let agents: String = (0..N_AGENTS)
            .map(|i| {
                format!(
                    "[[agents]]\nshard = \"{}\"\nendpoint = \"{scheme}://{}\"\n",
                    Cluster::shard(i),
                    cluster.addresses[i]
                )
            })
            .collect();
        let security = match &cluster.pki {
            None => "plaintext = true\n".to_string(),
            Some(pki) => format!(
                "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/coordinator.pem\"\nkey = \"{0}/coordinator.key\"\ntokens = \"{0}/tokens\"\n",
                pki.display()
            ),
        };
        let config = format!(
            "repository = \"{}\"\nwal_archive = \"{}\"\nlisten = \"127.0.0.1:0\"\n{security}[barrier]\nlease_ms = {lease_ms}\nprepare_timeout_ms = {}\n{agents}\
             [[raid_groups]]\nname = \"group-0\"\nlayout = \"raid5\"\ndata = [\"shard-0\", \"shard-1\"]\nparity = [\"shard-2\"]\n",
            cluster.repo().display(),
            cluster.archive().display(),
            lease_ms / 2
        );
        std::fs::write(cluster.config_path(), config).expect("write config");
        cluster.start_coordinator(fault);
        cluster
    }

    /// Restarts the coordinator with `tables` appended to its configuration.
    pub fn reconfigure(&mut self, tables: &str) {
        let mut config = std::fs::read_to_string(self.config_path()).expect("config");
        config.push_str(tables);
        std::fs::write(self.config_path(), config).expect("write config");
        self.kill_coordinator();
        self.start_coordinator(None);
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("lockstep.toml")
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    pub fn start_coordinator(&mut self, fault: Option<&str>) {
        let env: Vec<(String, String)> = fault
            .map(|f| vec![("LOCKSTEP_FAULT_PAUSE".to_string(), f.to_string())])
            .unwrap_or_default();
        self.start_coordinator_with(&env);
    }

    /// Starts the coordinator with this environment.
    pub fn start_coordinator_with(&mut self, env: &[(String, String)]) {
        let args = vec![
            "serve".to_string(),
            "--config".to_string(),
            self.config_path().display().to_string(),
        ];
        let env: Vec<(String, String)> = env.iter().chain(&self.repo_env).cloned().collect();
        let (child, address) = start_server("lockstep", &args, &env, &self.log("coordinator"));
        self.coordinator = Some(child);
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        self.coordinator_address = format!("{scheme}://{address}");
    }

    pub fn kill_coordinator(&mut self) {
        if let Some(mut child) = self.coordinator.take() {
            kill_hard(&mut child);
        }
    }

    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut child) = self.agents[i].take() {
            kill_hard(&mut child);
        }
    }

    /// Restarts agent `i` on its old address.
    pub fn restart_agent(&mut self, i: usize) {
        self.restart_agent_with(i, &[]);
    }

    /// Restarts agent `i` on its old address with more environment (a fault to inject).
    pub fn restart_agent_with(&mut self, i: usize, env: &[(&str, &str)]) {
        self.kill_agent(i);
        let args = self.agent_args(i, &self.addresses[i].clone());
        let env: Vec<(String, String)> = self
            .agent_env
            .iter()
            .cloned()
            .chain(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        let (child, _) = start_server(
            "lockstep-agent",
            &args,
            &env,
            &self.log(&format!("agent-{i}")),
        );
        self.agents[i] = Some(child);
    }

    /// Starts `lockstep ARGS` against this cluster's coordinator, in the background.
    pub fn spawn_lockstep(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start lockstep")
    }

    /// Waits (up to 60 s) until the coordinator's log says it paused at its fault point.
    pub async fn wait_for_fault_pause(&self) {
        let log = self.log("coordinator");
        let paused = wait_until(Duration::from_secs(60), || {
            let paused = std::fs::read_to_string(&log)
                .is_ok_and(|log| log.contains("fault injection: pausing"));
            async move { paused }
        })
        .await;
        assert!(
            paused.is_some(),
            "the coordinator never reached its fault point"
        );
    }

    /// The committed backups' ids, as `backup list` gives them (oldest first).
    pub fn listed(&self) -> Vec<String> {
        json(&self.lockstep(&["backup", "list", "--json"]))
            .as_array()
            .expect("a list")
            .iter()
            .map(|b| b["backup_id"].as_str().expect("id").to_string())
            .collect()
    }

    /// Takes a backup of `kind` and returns its id.
    pub fn backup(&self, kind: &str) -> String {
        let output = self.lockstep(&["backup", "create", "--kind", kind, "--wait", "--json"]);
        assert!(output.status.success(), "{kind}: {}", text(&output));
        json(&output)["backup_id"]
            .as_str()
            .expect("backup id")
            .to_string()
    }

    /// Runs `lockstep ARGS` against this cluster's coordinator.
    pub fn lockstep(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("run lockstep")
    }

    /// `lockstep ARGS` against this cluster's coordinator; with TLS, as its operator.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(binary("lockstep"));
        command
            .args(args)
            .env("LOCKSTEP_COORDINATOR", &self.coordinator_address)
            .envs(self.repo_env.iter().cloned());
        if self.pki.is_some() {
            let (ca, cert, key) = self.tls_files("operator-alice");
            command
                .env("LOCKSTEP_CA", ca)
                .env("LOCKSTEP_CERT", cert)
                .env("LOCKSTEP_KEY", key);
        }
        command
    }

    pub async fn shard_client(&self, i: usize) -> ShardClient<Channel> {
        ShardClient::new(self.agent_channel(i, "client-app").await)
    }

    pub async fn agent_client(&self, i: usize) -> AgentClient<Channel> {
        AgentClient::new(self.agent_channel(i, "coordinator").await)
    }

    /// Whether agent `i` reports its gate closed; `None` if it does not answer.
    pub async fn gate_closed(&self, i: usize) -> Option<bool> {
        let mut client = AgentClient::connect(format!("http://{}", self.addresses[i]))
            .await
            .ok()?;
        let info = client.describe(v1::DescribeRequest {}).await.ok()?;
        Some(info.into_inner().gate_closed)
    }

    /// Restores shard `i` of `backup` into a fresh directory and returns its keys.
    pub fn restored_keys(&self, backup: &str, i: usize) -> Vec<Vec<u8>> {
        let target = self.dir.path().join(format!("restore-{backup}-{i}"));
        agent_ok(&[
            "restore",
            "--repo",
            self.repo().to_str().expect("utf-8"),
            "--backup",
            backup,
            "--shard",
            &Cluster::shard(i),
            "--to",
            target.to_str().expect("utf-8"),
        ]);
        let engine = RocksEngine::open(&target, &[]).expect("open restored shard");
        engine
            .scan("default", b"", None, usize::MAX)
            .expect("scan")
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_coordinator();
        for i in 0..self.agents.len() {
            self.kill_agent(i);
        }
    }
}

/// Polls `condition` every 20 ms until it holds or `limit` passes; returns the time it took.
pub async fn wait_until<F, Fut>(limit: Duration, mut condition: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_millis(20));
    while started.elapsed() < limit {
        every.tick().await;
        if condition().await {
            return Some(started.elapsed());
        }
    }
    None
}

pub async fn all_gates(cluster: &Cluster, closed: bool, skip: Option<usize>) -> bool {
    for i in (0..N_AGENTS).filter(|i| Some(*i) != skip) {
        if cluster.gate_closed(i).await != Some(closed) {
            return false;
        }
    }
    true
}

pub fn json(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("not JSON ({err}):\n{}", text(output)))
}
