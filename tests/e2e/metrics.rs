//! Prometheus metrics: a real cluster's coordinator and agent serve them and `promtool`
//! accepts the exposition; the shipped alert rules pass their `promtool` unit tests; the
//! rules and the Grafana dashboard use only series Lockstep exports.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use lockstep_process::metrics::SERIES;
use lockstep_tests::text;

use crate::cluster::{Cluster, wait_until};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn promtool(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool (Debian's prometheus package; `make deps` installs it)")
}

#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() {
    let dir = deploy("prometheus");
    let check = promtool(&["check", "rules", "lockstep-alerts.yml"], &dir);
    assert!(check.status.success(), "{}", text(&check));
    let test = promtool(&["test", "rules", "lockstep-alerts.test.yml"], &dir);
    assert!(test.status.success(), "{}", text(&test));
}

/// Every `lockstep_*` name in `text`, a histogram's series named by its histogram.
fn series_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("lockstep_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        names.insert(base.to_string());
    }
    names
}

#[test]
fn the_alert_rules_and_the_dashboard_use_only_exported_series() {
    let exported: BTreeSet<String> = SERIES.iter().map(|(name, _, _)| name.to_string()).collect();
    let rules = std::fs::read_to_string(deploy("prometheus/lockstep-alerts.yml")).expect("rules");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/lockstep-dashboard.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let exprs: String = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(String::from))
        .collect::<Vec<_>>()
        .join("\n");
    for (what, used) in [
        ("alert rules", series_in(&rules)),
        ("dashboard", series_in(&exprs)),
    ] {
        assert!(!used.is_empty(), "{what} use no series");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{what} use series Lockstep does not export: {unknown:?}"
        );
    }
}

/// A free port on 127.0.0.1 (bound, then released for the server to take).
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").to_string()
}

/// `GET /metrics` at `address`; `None` while nothing answers there.
fn scrape(address: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.lines()
        .next()?
        .contains(" 200 ")
        .then(|| body.to_string())
}

/// Waits until a scrape of `address` has every line starting with one of `wanted`.
async fn scraped_with(address: &str, wanted: &[&str]) -> String {
    let mut last = String::new();
    let found = wait_until(Duration::from_secs(60), || {
        last = scrape(address).unwrap_or_default();
        let all = wanted
            .iter()
            .all(|line| last.lines().any(|l| l.starts_with(line)));
        async move { all }
    })
    .await;
    assert!(
        found.is_some(),
        "{address} never showed {wanted:?}:\n{last}"
    );
    last
}

fn promtool_accepts(exposition: &str) {
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write");
    let output = check.wait_with_output().expect("promtool ends");
    assert!(
        output.status.success(),
        "promtool check metrics: {}\n{exposition}",
        text(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_serves_its_metrics_and_promtool_accepts_them() {
    let mut cluster = Cluster::start(5000, None);
    let (coordinator, agent) = (free_address(), free_address());
    cluster.kill_coordinator();
    cluster.start_coordinator_with(&[("LOCKSTEP_METRICS_LISTEN".into(), coordinator.clone())]);
    cluster.restart_agent_with(0, &[("LOCKSTEP_METRICS_LISTEN", agent.as_str())]);
    let backup = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(backup.status.success(), "{}", text(&backup));
    let gc = cluster.lockstep(&["gc"]);
    assert!(gc.status.success(), "{}", text(&gc));

    let scraped = scraped_with(
        &coordinator,
        &[
            "lockstep_backup_last_status{kind=\"full\"} 1",
            "lockstep_backups_total{kind=\"full\",outcome=\"committed\"} 1",
            "lockstep_backup_last_success_timestamp_seconds{kind=\"full\"}",
            "lockstep_barrier_write_pause_seconds_count 1",
            "lockstep_agent_up{shard=\"shard-0\"} 1",
            "lockstep_agent_up{shard=\"shard-2\"} 1",
            "lockstep_coordinator_fenced 0",
            "lockstep_gc_last_success_timestamp_seconds",
            "lockstep_gc_candidate_bytes 0",
            "lockstep_build_info{binary=\"lockstep\"",
        ],
    )
    .await;
    promtool_accepts(&scraped);
    let scraped = scraped_with(
        &agent,
        &[
            "lockstep_shard_seq{shard=\"shard-0\"}",
            "lockstep_shard_gate_closed{shard=\"shard-0\"} 0",
            "lockstep_wal_lag_seq{shard=\"shard-0\",destination=",
            "lockstep_wal_gap{shard=\"shard-0\",destination=",
            "lockstep_wal_segments_shipped_total{shard=\"shard-0\",destination=",
        ],
    )
    .await;
    promtool_accepts(&scraped);
}
