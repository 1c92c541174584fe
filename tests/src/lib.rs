//! Helpers shared by the end-to-end tests in `e2e/`: locating the built binaries, running
//! them, and starting object store servers on 127.0.0.1: moto (S3) and Azurite (Azure
//! Blob), each installed from its registry when missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The path of a built binary: `$LOCKSTEP_BIN_DIR/NAME` (set by `make test`), else the
/// release or debug build under `$CARGO_TARGET_DIR` or `target/`.
pub fn binary(name: &str) -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("LOCKSTEP_BIN_DIR") {
        candidates.push(PathBuf::from(dir).join(name));
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    candidates.push(target.join("release").join(name));
    candidates.push(target.join("debug").join(name));
    candidates.into_iter().find(|p| p.exists()).unwrap_or_else(|| {
        panic!("binary {name} not found: run `make test`, or `cargo build --release -p lockstep-agent` first")
    })
}

/// Runs `lockstep-agent` with `args` and returns its output.
pub fn agent(args: &[&str]) -> Output {
    Command::new(binary("lockstep-agent"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run lockstep-agent")
}

/// Everything a command printed, for assertions and failure messages.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `lockstep-agent` and fails the test with its output unless it succeeded.
pub fn agent_ok(args: &[&str]) -> String {
    let output = agent(args);
    assert!(
        output.status.success(),
        "lockstep-agent {args:?} failed:\n{}",
        text(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A moto S3 server on 127.0.0.1, killed when dropped.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    /// Starts moto (installing `moto[server]` from PyPI if missing) and creates `bucket`.
    pub fn start(bucket: &str) -> Moto {
        if Command::new("moto_server").arg("--help").output().is_err() {
            let status = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "moto[server]"])
                .status()
                .expect("run pip");
            assert!(status.success(), "could not install moto[server]");
        }
        let port = free_port();
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start moto_server");
        let stderr = child.stderr.take().expect("moto stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Running on")
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut moto = Moto { child, endpoint };
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = moto.child.kill();
            panic!("moto_server did not start within 60s");
        }
        let script = format!(
            "import boto3; boto3.client('s3', endpoint_url='{}', aws_access_key_id='test', \
             aws_secret_access_key='test', region_name='us-east-1').create_bucket(Bucket='{bucket}')",
            moto.endpoint
        );
        let output = Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("create bucket");
        assert!(output.status.success(), "create bucket: {}", text(&output));
        moto
    }

    /// The environment that points object_store's S3 client at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Runs a Python snippet; its output, or the failure with what it printed.
fn python(script: &str) -> Result<String, String> {
    let output = Command::new("python3")
        .args(["-c", script])
        .output()
        .map_err(|err| format!("run python3: {err}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(text(&output))
    }
}

/// Installs `package` from PyPI unless `import` (a Python import statement) works.
fn pip_install_unless(import: &str, package: &str) {
    if python(import).is_err() {
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", package])
            .status()
            .expect("run pip");
        assert!(status.success(), "could not install {package} from PyPI");
    }
}

/// Waits until `child` answers HTTP on `port` (any status), or fails the test after 60 s or
/// when it exits.
fn wait_http(child: &mut Child, what: &str, port: u16, path: &str) {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) before it answered");
        }
        let answered = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head)?;
            Ok(head.starts_with(b"HTTP/"))
        });
        if answered.unwrap_or(false) {
            return;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not answer on port {port} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Azurite's Blob service (npm `azurite`) on 127.0.0.1, storing in a temporary directory;
/// killed when dropped.
pub struct Azurite {
    child: Child,
    pub endpoint: String,
    _root: tempfile::TempDir,
}

/// Azurite's one account and its well-known key.
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl Azurite {
    /// Starts the server and creates `container`.
    pub fn start(container: &str) -> Azurite {
        if Command::new("azurite-blob")
            .arg("--version")
            .output()
            .is_err()
        {
            let status = Command::new("npm")
                .args(["install", "--global", "--silent", "azurite"])
                .status()
                .expect("run npm");
            assert!(status.success(), "could not install azurite from npm");
        }
        pip_install_unless("import azure.storage.blob", "azure-storage-blob");
        let root = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let child = Command::new("azurite-blob")
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(root.path())
            .args(["--skipApiVersionCheck", "--loose", "--silent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite-blob");
        let mut azurite = Azurite {
            child,
            endpoint: format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
            _root: root,
        };
        wait_http(&mut azurite.child, "azurite-blob", port, "/");
        let script = format!(
            "from azure.storage.blob import BlobServiceClient; BlobServiceClient.from_connection_string(\
             'DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};\
             BlobEndpoint={};').create_container('{container}')",
            azurite.endpoint
        );
        python(&script).unwrap_or_else(|err| panic!("create container {container}: {err}"));
        azurite
    }

    /// The environment (or, lower-cased, the repository options) that points object_store's
    /// Azure client at this server with the account's key.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_STORAGE_ACCOUNT_NAME".into(), AZURITE_ACCOUNT.into()),
            ("AZURE_STORAGE_ACCOUNT_KEY".into(), AZURITE_KEY.into()),
            ("AZURE_STORAGE_ENDPOINT".into(), self.endpoint.clone()),
            ("AZURE_ALLOW_HTTP".into(), "true".into()),
        ]
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        kill_hard(&mut self.child);
    }
}

/// Starts `program` with `args` and waits for its "listening on ADDR" line; returns the child
/// and the address. Its remaining output goes to `log`.
pub fn start_server(
    program: &str,
    args: &[String],
    env: &[(String, String)],
    log: &std::path::Path,
) -> (Child, String) {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open server log");
    let mut child = Command::new(binary(program))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|err| panic!("start {program}: {err}"));
    let stdout = child.stdout.take().expect("server stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let (Some((_, address)), Some(sender)) =
                (line.split_once("listening on "), tx.take())
            {
                let _ = sender.send(address.trim().to_string());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(address) => (child, address),
        Err(_) => {
            let _ = child.kill();
            panic!(
                "{program} did not start listening within 60s; see {}",
                log.display()
            );
        }
    }
}

/// Kills a process with SIGKILL and reaps it.
pub fn kill_hard(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Every file under `dir`, at any depth (none if it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                dirs.push(entry.path());
            } else {
                out.push(entry.path());
            }
        }
    }
    out
}

/// Cases per property of the property-based fuzz tests: 2,000 (`make test`), or
/// `LOCKSTEP_FUZZ_CASES` (`make fuzz`).
pub fn fuzz_cases() -> u32 {
    std::env::var("LOCKSTEP_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000)
}
