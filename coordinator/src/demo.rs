//! `lockstep demo`: the main job on the embedded default (a `file://` repository, encrypted
//! at rest; everything on 127.0.0.1, on mutual TLS), run by the binary as an operator would
//! by hand. A coordinator and three
//! agents in one RAID5 group (two data shards, one parity shard) ship their WAL to a second
//! "region"; data, a full and an incremental backup taken while clients keep writing, a
//! restore drill into directories, a tag before a bad migration and a restore to that tag,
//! a disaster that destroys every shard, and a verified in-place restore of the whole
//! cluster. Each step prints the commands' own output; the shards are compared by digest
//! (`lockstep-agent digest`: sequence number, keys and values).
//!
//! The agents are `lockstep-agent` beside this binary (or `--agent-bin`); every process the
//! demo starts is stopped when it ends, with an error too, and on SIGINT or SIGTERM
//! ([`stop_everything`]); each command it runs has five minutes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lockstep_repository::seal::PASSPHRASE_FILE_ENV;
use lockstep_repository::{Error, ErrorCode, Result};

const SHARDS: [&str; 3] = ["shard-0", "shard-1", "shard-2"];
const CFS: &str = "default,users,events";
/// The longest one command of the demo may take.
const COMMAND_DEADLINE: Duration = Duration::from_secs(300);

/// Every process the demo started and has not stopped yet, for [`stop_everything`].
static RUNNING: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn running() -> std::sync::MutexGuard<'static, Vec<u32>> {
    RUNNING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns `command`, remembered until [`reap`].
fn spawn(command: &mut Command, what: &str) -> Result<Child> {
    let child = command.spawn().map_err(io(format!("start {what}")))?;
    running().push(child.id());
    Ok(child)
}

/// Waits for `child` (already told to stop, or done) and forgets it.
fn reap(child: &mut Child) {
    let _ = child.wait();
    running().retain(|pid| *pid != child.id());
}

fn terminate(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Sends SIGTERM to every process the demo started (the demo itself is being stopped).
pub fn stop_everything() {
    for pid in running().iter() {
        terminate(*pid);
    }
}

/// `lockstep demo`'s options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the demo keeps its repository, shards and logs (default: a new temporary
    /// directory, kept afterwards for a look).
    #[arg(long, env = "LOCKSTEP_DEMO_DIR")]
    pub dir: Option<PathBuf>,
    /// The agent binary (default: `lockstep-agent` beside this one).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
}

fn failed(what: impl Into<String>) -> Error {
    Error::new(ErrorCode::InvalidArgument, what.into())
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |err| Error::io(ErrorCode::StorageUnavailable, what, err)
}

/// The processes and paths of one run; its processes are stopped when it is dropped.
struct Demo {
    work: PathBuf,
    lockstep: PathBuf,
    agent: PathBuf,
    repo: String,
    region: String,
    /// The cluster's CA, and the certificates and keys of every process and client
    /// (`lockstep cert`): every server and client of the demo speaks mutual TLS.
    tls: PathBuf,
    /// Each agent's process and address.
    agents: BTreeMap<&'static str, (Child, String)>,
    coordinator: Option<(Child, String)>,
    /// Clients writing while backups run.
    writers: Vec<Child>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let mut children: Vec<Child> = self.writers.drain(..).collect();
        children.extend(self.coordinator.take().map(|(child, _)| child));
        children.extend(
            std::mem::take(&mut self.agents)
                .into_values()
                .map(|(c, _)| c),
        );
        stop_all(children);
    }
}

/// Stops servers cleanly (SIGTERM to all, as `kill` does) and waits for them; SIGKILL to
/// any still running 30 s later.
fn stop_all(mut children: Vec<Child>) {
    for child in &children {
        terminate(child.id());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && children
            .iter_mut()
            .any(|c| !matches!(c.try_wait(), Ok(Some(_))))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for child in &mut children {
        let _ = child.kill();
        reap(child);
    }
}

fn stop(child: Child) {
    stop_all(vec![child]);
}

/// Waits up to [`COMMAND_DEADLINE`] for `child`; kills it after that.
fn finish(mut child: Child, what: &str) -> Result<ExitStatus> {
    let deadline = Instant::now() + COMMAND_DEADLINE;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                reap(&mut child);
                return Ok(status);
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                reap(&mut child);
                return Err(failed(format!(
                    "`{what}` did not finish within {} s",
                    COMMAND_DEADLINE.as_secs()
                )));
            }
        }
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

impl Demo {
    /// Starts `program` with its output in `log` and waits for its "listening on ADDR".
    fn start(&self, log: &str, program: &Path, args: &[&str]) -> Result<(Child, String)> {
        let log = self.work.join(log);
        let file = std::fs::File::create(&log).map_err(io(format!("create {}", log.display())))?;
        let err = file
            .try_clone()
            .map_err(io(format!("open {}", log.display())))?;
        let mut child = spawn(
            Command::new(program)
                .args(args)
                .env(PASSPHRASE_FILE_ENV, self.passphrase())
                .stdout(file)
                .stderr(err),
            &program.display().to_string(),
        )?;
        // (Servers get their TLS files as flags or configuration, not from the environment;
        // the repository's passphrase, like cloud credentials, from it.)
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let mut text = String::new();
            if let Ok(mut file) = std::fs::File::open(&log) {
                let _ = file.read_to_string(&mut text);
            }
            if let Some(address) = text
                .lines()
                .find_map(|line| line.split_once("listening on ").map(|(_, a)| a.trim()))
            {
                let address = address.split_whitespace().next().unwrap_or(address);
                return Ok((child, address.to_string()));
            }
            if let Ok(Some(status)) = child.try_wait() {
                reap(&mut child);
                return Err(failed(format!(
                    "{} exited ({status}) before it listened; its log:\n{text}",
                    program.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        reap(&mut child);
        Err(failed(format!(
            "{} did not start listening within 60 s; see {}",
            program.display(),
            log.display()
        )))
    }

    /// Starts the agent of `shard` on `listen` (`127.0.0.1:0` picks a free port), shipping
    /// its WAL to the second region.
    fn start_agent(&mut self, shard: &'static str, listen: &str) -> Result<String> {
        let db = self.work.join(shard);
        let file = |ext: &str| {
            self.tls
                .join(format!("agent-{shard}.{ext}"))
                .display()
                .to_string()
        };
        let (cert, key) = (file("pem"), file("key"));
        let ca = self.tls.join("ca.pem").display().to_string();
        let (child, address) = self.start(
            &format!("agent-{shard}.log"),
            &self.agent,
            &[
                "serve",
                "--db",
                &db.display().to_string(),
                "--shard",
                shard,
                "--listen",
                listen,
                "--repo",
                &self.repo,
                "--cfs",
                CFS,
                "--wal-to",
                &self.region,
                "--tls-ca",
                &ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ],
        )?;
        self.agents.insert(shard, (child, address.clone()));
        Ok(address)
    }

    fn start_coordinator(&mut self) -> Result<()> {
        let config = self.work.join("lockstep.toml");
        let (child, address) = self.start(
            "coordinator.log",
            &self.lockstep,
            &["serve", "--config", &config.display().to_string()],
        )?;
        println!("coordinator on https://{address}");
        self.coordinator = Some((child, format!("https://{address}")));
        Ok(())
    }

    fn stop_coordinator(&mut self) {
        if let Some((child, _)) = self.coordinator.take() {
            stop(child);
        }
    }

    /// Stops every agent cleanly; their addresses.
    fn stop_agents(&mut self) -> Vec<String> {
        let agents = std::mem::take(&mut self.agents);
        let addresses = agents.values().map(|(_, a)| a.clone()).collect();
        stop_all(agents.into_values().map(|(c, _)| c).collect());
        addresses
    }

    /// Writes the coordinator's configuration for the agents running now.
    fn write_config(&self) -> Result<()> {
        let mut config = format!(
            "repository = \"{}\"\nwal_archive = \"{}\"\nlisten = \"127.0.0.1:0\"\n",
            self.repo, self.region
        );
        config.push_str(&format!(
            "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/coordinator.pem\"\nkey = \"{0}/coordinator.key\"\ntokens = \"{0}/tokens\"\n",
            self.tls.display()
        ));
        for (shard, (_, address)) in &self.agents {
            config.push_str(&format!(
                "[[agents]]\nshard = \"{shard}\"\nendpoint = \"https://{address}\"\n"
            ));
        }
        config.push_str(
            "[[raid_groups]]\nname = \"group-0\"\nlayout = \"raid5\"\ndata = [\"shard-0\", \"shard-1\"]\nparity = [\"shard-2\"]\n",
        );
        let path = self.work.join("lockstep.toml");
        std::fs::write(&path, config).map_err(io(format!("write {}", path.display())))
    }

    fn address(&self, shard: &str) -> String {
        self.agents
            .get(shard)
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
    }

    /// Runs `lockstep ARGS` against the coordinator, its output shown; fails if it does.
    fn lockstep(&self, args: &[&str]) -> Result<()> {
        self.shown(&self.lockstep, args)
    }

    /// `PROGRAM ARGS` as a client of the cluster: the coordinator's address, and the TLS
    /// files of the operator (`lockstep`) or of an application (`lockstep-agent load`).
    fn client(&self, program: &Path, args: &[&str]) -> Command {
        let endpoint = self.coordinator.as_ref().map(|(_, e)| e.as_str());
        let name = if program == self.agent {
            "client-demo"
        } else {
            "operator-demo"
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .env("LOCKSTEP_COORDINATOR", endpoint.unwrap_or_default())
            .env("LOCKSTEP_CA", self.tls.join("ca.pem"))
            .env("LOCKSTEP_CERT", self.tls.join(format!("{name}.pem")))
            .env("LOCKSTEP_KEY", self.tls.join(format!("{name}.key")))
            .env(PASSPHRASE_FILE_ENV, self.passphrase());
        command
    }

    /// The file of the encrypted repository's passphrase, beside the TLS files.
    fn passphrase(&self) -> PathBuf {
        self.tls.join("repository.passphrase")
    }

    /// Runs `PROGRAM ARGS` against the coordinator, its output shown; fails if it does.
    fn shown(&self, program: &Path, args: &[&str]) -> Result<()> {
        let what = format!("{} {}", program.display(), args.join(" "));
        let child = spawn(&mut self.client(program, args), &what)?;
        if !finish(child, &what)?.success() {
            return Err(failed(format!("`{what}` failed")));
        }
        Ok(())
    }

    /// Runs `PROGRAM ARGS` and returns what it printed; fails if it does. Its output goes
    /// through a file (a pipe nobody reads while waiting could fill).
    fn output(&self, program: &Path, args: &[&str]) -> Result<String> {
        let what = format!("{} {}", program.display(), args.join(" "));
        let path = self.work.join("command.out");
        let file =
            std::fs::File::create(&path).map_err(io(format!("create {}", path.display())))?;
        let child = spawn(self.client(program, args).stdout(file), &what)?;
        let status = finish(child, &what)?;
        let printed = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        if !status.success() {
            return Err(failed(format!("`{what}` failed:\n{printed}")));
        }
        Ok(printed.trim().to_string())
    }

    /// Writes `keys` keys of 200-byte values in every column family through an agent.
    fn load(&self, shard: &str, keys: &str, seed: &str) -> Result<()> {
        let endpoint = format!("https://{}", self.address(shard));
        self.shown(
            &self.agent,
            &[
                "load",
                "--endpoint",
                &endpoint,
                "--keys",
                keys,
                "--value-size",
                "200",
                "--cfs",
                CFS,
                "--seed",
                seed,
            ],
        )
    }

    /// The digest of the shard directory `dir` (its agent stopped).
    fn digest(&self, dir: &Path) -> Result<String> {
        self.output(&self.agent, &["digest", "--db", &dir.display().to_string()])
    }

    /// Stops every agent cleanly, prints and returns each shard's digest, and restarts them
    /// on their addresses.
    fn digest_agents(&mut self) -> Result<Vec<String>> {
        let addresses: Vec<String> = SHARDS.iter().map(|s| self.address(s)).collect();
        self.stop_agents();
        let mut digests = Vec::new();
        for shard in SHARDS {
            let digest = self.digest(&self.work.join(shard))?;
            println!("{shard}: {digest}");
            digests.push(digest);
        }
        for (shard, address) in SHARDS.into_iter().zip(&addresses) {
            self.start_agent(shard, address)?;
        }
        Ok(digests)
    }
}

/// Runs the demo; 0 when every restored shard equals its backup.
pub fn run(args: &DemoArgs) -> Result<i32> {
    let lockstep = std::env::current_exe().map_err(io("find this binary".into()))?;
    let agent = match &args.agent_bin {
        Some(agent) => agent.clone(),
        None => lockstep.with_file_name("lockstep-agent"),
    };
    if !agent.exists() {
        return Err(failed(format!(
            "{} is missing: build it (`cargo build --bins`), or name it with --agent-bin",
            agent.display()
        )));
    }
    let work = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("lockstep-demo.{}", uuid::Uuid::new_v4())),
    };
    std::fs::create_dir_all(&work).map_err(io(format!("create {}", work.display())))?;
    // Absolute: it goes into file:// URLs.
    let work = work
        .canonicalize()
        .map_err(io(format!("resolve {}", work.display())))?;
    println!("Demo files go to {}", work.display());
    let mut demo = Demo {
        repo: format!("file://{}", work.join("repository").display()),
        region: format!("file://{}", work.join("region-2/wal").display()),
        tls: work.join("tls"),
        work,
        lockstep,
        agent,
        agents: BTreeMap::new(),
        coordinator: None,
        writers: Vec::new(),
    };
    let code = steps(&mut demo);
    println!("Demo files are in {}", demo.work.display());
    code
}

/// The identities the demo issues certificates for, beside the coordinator and the agents.
const PEOPLE: [&str; 2] = ["lockstep://operator/demo", "lockstep://client/demo"];

fn steps(demo: &mut Demo) -> Result<i32> {
    step("0. The cluster's CA and a certificate for every process and client (mutual TLS)");
    let dir = demo.tls.display().to_string();
    if demo.tls.join("ca.pem").exists() {
        println!("reusing the CA and certificates in {dir}");
    } else {
        demo.lockstep(&["cert", "ca", "--dir", &dir])?;
        let agents = SHARDS.map(|shard| format!("lockstep://agent/{shard}"));
        for identity in ["lockstep://coordinator"]
            .into_iter()
            .chain(agents.iter().map(String::as_str))
            .chain(PEOPLE)
        {
            demo.lockstep(&["cert", "issue", "--dir", &dir, "--identity", identity])?;
        }
        // A reader without a certificate: a bearer token, stored hashed by the coordinator.
        let (tokens, token) = (demo.tls.join("tokens"), demo.tls.join("reader-demo.token"));
        demo.lockstep(&[
            "cert",
            "token",
            "--identity",
            "lockstep://reader/demo",
            "--tokens",
            &tokens.display().to_string(),
            "--out",
            &token.display().to_string(),
        ])?;
    }
    // The repository is encrypted at rest: the first agent creates it with this passphrase,
    // which every process reads from the file its environment names.
    let passphrase = demo.passphrase();
    if !passphrase.exists() {
        let random = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&passphrase)
            .map_err(io(format!("create {}", passphrase.display())))?;
        file.write_all(random.as_bytes())
            .map_err(io(format!("write {}", passphrase.display())))?;
        println!(
            "repository passphrase in {} (the repository is encrypted at rest)",
            passphrase.display()
        );
    }

    step(
        "1. Start three agents (RAID5: shard-0 and shard-1 data, shard-2 parity) shipping their WAL to region 2, and a coordinator",
    );
    for shard in SHARDS {
        let address = demo.start_agent(shard, "127.0.0.1:0")?;
        println!("agent {shard} on {address}");
    }
    demo.write_config()?;
    demo.start_coordinator()?;
    demo.lockstep(&["cluster", "status"])?;

    step("2. Load 50k keys in 3 column families into every shard, through the agents");
    for (i, shard) in SHARDS.iter().enumerate() {
        demo.load(shard, "50000", &i.to_string())?;
    }

    step(
        "3. A full and an incremental backup (the WAL since the full one) while clients keep writing to every shard",
    );
    for shard in SHARDS {
        let log = demo.work.join(format!("writer-{shard}.log"));
        let file = std::fs::File::create(&log).map_err(io(format!("create {}", log.display())))?;
        let endpoint = format!("https://{}", demo.address(shard));
        let err = file
            .try_clone()
            .map_err(io(format!("open {}", log.display())))?;
        let writer = spawn(
            demo.client(
                &demo.agent,
                &["load", "--endpoint", &endpoint, "--keys", "400000"],
            )
            .args(["--value-size", "200", "--prefix", "live", "--seed", "7"])
            .stdout(file)
            .stderr(err),
            "a writer",
        )?;
        demo.writers.push(writer);
    }
    std::thread::sleep(Duration::from_secs(1));
    demo.lockstep(&["backup", "create", "--wait"])?;
    std::thread::sleep(Duration::from_secs(1));
    demo.lockstep(&["backup", "create", "--kind", "incremental", "--wait"])?;
    for mut writer in demo.writers.drain(..) {
        let _ = writer.kill();
        reap(&mut writer);
    }
    println!("(listed by a reader with a bearer token, which may not change anything)");
    let mut list = demo.client(&demo.lockstep, &["backup", "list"]);
    list.env_remove("LOCKSTEP_CERT")
        .env_remove("LOCKSTEP_KEY")
        .env("LOCKSTEP_TOKEN_FILE", demo.tls.join("reader-demo.token"));
    let what = "lockstep backup list (as the reader)";
    if !finish(spawn(&mut list, what)?, what)?.success() {
        return Err(failed(format!("`{what}` failed")));
    }
    let latest = demo.output(&demo.lockstep, &["backup", "show", "latest", "--json"])?;
    let backup = serde_json::from_str::<serde_json::Value>(&latest)
        .ok()
        .and_then(|v| v["backup_id"].as_str().map(str::to_string))
        .ok_or_else(|| failed(format!("no backup id in {latest}")))?;

    step(
        "4. Restore drill: the latest backup into directories beside the live shards (which keep serving)",
    );
    let drill_dir = demo.work.join("drill");
    demo.lockstep(&["restore", &backup, "--to", &drill_dir.display().to_string()])?;
    let mut drill = Vec::new();
    for shard in SHARDS {
        let digest = demo.digest(&drill_dir.join(shard))?;
        println!("{shard} at the cut: {digest}");
        drill.push(digest);
    }

    step("5. WAL shipping to region 2: every shard's archive is caught up");
    demo.lockstep(&["wal", "status"])?;

    step("6. A tag before a schema migration; the migration goes wrong and rewrites every value");
    demo.lockstep(&["tag", "create", "before-migration"])?;
    demo.lockstep(&["tag", "list"])?;
    println!("The shards at the tag (agents stopped to read them, then restarted):");
    let at_tag = demo.digest_agents()?;
    for shard in SHARDS {
        demo.load(shard, "50000", "99")?;
    }
    println!("bad migration applied: 150k values rewritten");

    step(
        "7. Restore the cluster in place to the tag: base backup, its chain, then region 2's WAL up to the tag",
    );
    demo.lockstep(&[
        "restore",
        "--tag",
        "before-migration",
        "--in-place",
        "--dry-run",
    ])?;
    demo.lockstep(&["restore", "--tag", "before-migration", "--in-place"])?;
    println!("The shards after the restore:");
    let after = demo.digest_agents()?;
    if let Some((shard, _)) = SHARDS
        .iter()
        .zip(after.iter().zip(&at_tag))
        .find(|(_, (a, b))| a != b)
    {
        println!("MISMATCH: {shard} after the restore to the tag differs from the tag");
        return Ok(1);
    }
    println!(
        "OK: every shard is exactly at the tag again (same sequence number, keys and values)."
    );

    step("8. Disaster: every agent is killed and every shard directory destroyed");
    demo.stop_coordinator();
    demo.stop_agents();
    for shard in SHARDS {
        for dir in [
            demo.work.join(shard),
            demo.work.join(format!("{shard}.lockstep-captures")),
        ] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io(format!("remove {}", dir.display())))?;
            }
        }
    }
    let mut left: Vec<String> = std::fs::read_dir(&demo.work)
        .map_err(io(format!("list {}", demo.work.display())))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    left.sort();
    println!("{}", left.join("  "));

    step(
        "9. Fresh agents on empty shards, the same coordinator configuration; full verify of the backup",
    );
    for shard in SHARDS {
        demo.start_agent(shard, "127.0.0.1:0")?;
    }
    demo.write_config()?;
    demo.start_coordinator()?;
    demo.lockstep(&["cluster", "status"])?;
    demo.lockstep(&["backup", "verify", &backup, "--full"])?;

    step(
        "10. Restore the whole cluster in place: every shard downloaded and checked, then swapped in",
    );
    demo.lockstep(&["restore", &backup, "--in-place"])?;
    demo.lockstep(&["cluster", "status"])?;

    step("11. Check: every restored shard equals the drill copy of the backup");
    demo.stop_coordinator();
    demo.stop_agents();
    let mut code = 0;
    for (shard, expected) in SHARDS.iter().zip(&drill) {
        let restored = demo.digest(&demo.work.join(shard))?;
        if &restored == expected {
            println!("OK   {shard}: {restored}");
        } else {
            println!("DIFF {shard}: {restored}");
            code = 1;
        }
    }
    if code == 0 {
        println!(
            "OK: the cluster is back at backup {backup}, every shard identical to its backup (same sequence number, keys and values)."
        );
    } else {
        println!("MISMATCH: a restored shard differs from the backup");
    }
    Ok(code)
}
