//! Operations that hold the cluster, as `ClusterOps` owns them: one at a time, each run to
//! its end whatever its client does, and the status commands' exit codes.

use std::time::{Duration, Instant};

use lockstep_proto::v1;
use lockstep_proto::v1::coordinator_client::CoordinatorClient;
use lockstep_tests::text;

use crate::cluster::{Cluster, all_gates, json, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_whose_client_goes_away_after_prepare_reopens_every_gate_within_a_second() {
    // A long lease: only the operation itself can reopen the gates within a second. The
    // coordinator pauses 300 ms between the last Prepared and Commit, so the client is gone
    // while every gate is closed.
    let cluster = Cluster::start(20_000, Some("before-commit:300"));
    let mut client = CoordinatorClient::connect(cluster.coordinator_address.clone())
        .await
        .expect("connect coordinator");
    let call = tokio::spawn(async move {
        client
            .create_tag(v1::CreateTagRequest {
                name: "client-gone".into(),
                ..Default::default()
            })
            .await
    });
    let closed = wait_until(Duration::from_secs(10), || all_gates(&cluster, true, None)).await;
    assert!(
        closed.is_some(),
        "the tag's barrier never closed every gate"
    );
    // The client goes away: its call (and its connection) is dropped mid-barrier.
    call.abort();
    let gone = Instant::now();
    let reopened = wait_until(Duration::from_secs(15), || all_gates(&cluster, false, None)).await;
    assert!(reopened.is_some(), "the gates stayed closed");
    assert!(
        gone.elapsed() < Duration::from_secs(1),
        "the gates reopened {:?} after the client went away (lease 20 s): the tag did not go on by itself",
        gone.elapsed()
    );
    // The operation went on to its end: the tag exists.
    let tags = json(&cluster.lockstep(&["tag", "list", "--json"]));
    assert!(
        tags.as_array()
            .is_some_and(|tags| tags.iter().any(|t| t["name"] == "client-gone")),
        "{tags}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_operation_while_a_backup_runs_is_refused_busy() {
    // The backup pauses 2 s before Commit (lease 10 s), so it holds the cluster meanwhile.
    let cluster = Cluster::start(10_000, Some("before-commit:2000"));
    let first = cluster.lockstep(&["backup", "create", "--json"]);
    assert!(first.status.success(), "{}", text(&first));
    let backup = json(&first)["backup_id"]
        .as_str()
        .expect("backup_id")
        .to_string();

    for args in [
        &["backup", "create"][..],
        &["backup", "create", "--kind", "incremental"][..],
        &["tag", "create", "while-busy"][..],
        &["backup", "delete", &backup][..],
    ] {
        let second = cluster.lockstep(args);
        let out = text(&second);
        assert!(!second.status.success(), "{args:?} was not refused:\n{out}");
        assert!(out.contains("ERR_BARRIER_BUSY"), "{args:?}:\n{out}");
        assert!(
            out.contains(&format!("backup {backup} is running")),
            "the refusal names what runs: {args:?}:\n{out}"
        );
    }
    let status = json(&cluster.lockstep(&["cluster", "status", "--json"]));
    assert_eq!(status["running_backup_id"], backup.as_str(), "{status}");

    let committed = wait_until(Duration::from_secs(30), || async {
        let show = cluster.lockstep(&["backup", "show", &backup, "--json"]);
        show.status.success()
    })
    .await;
    assert!(committed.is_some(), "the first backup never committed");
    // Once it ended, the cluster takes the next operation.
    let next = cluster.lockstep(&["tag", "create", "after-backup"]);
    assert!(next.status.success(), "{}", text(&next));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_commands_exit_unreachable_not_integrity_when_an_agent_is_down() {
    let mut cluster = Cluster::start(5000, None);
    let healthy = cluster.lockstep(&["cluster", "status"]);
    assert_eq!(healthy.status.code(), Some(0), "{}", text(&healthy));
    cluster.kill_agent(2);
    for args in [&["cluster", "status"][..], &["wal", "status"][..]] {
        let output = cluster.lockstep(args);
        assert_eq!(
            output.status.code(),
            Some(6),
            "{args:?} with shard-2 down exits 6 (unreachable):\n{}",
            text(&output)
        );
        assert!(text(&output).contains("shard-2"), "{}", text(&output));
    }
}

/// Rate limits start from the agents' flags, change on every agent at once through the
/// coordinator (only what is given), survive nothing but a restart, and a value out of range
/// is refused before any agent is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_change_on_every_agent_through_the_coordinator() {
    let mut cluster = Cluster::start_with(
        5000,
        None,
        vec!["--upload-mib-s".into(), "40".into()],
        Vec::new(),
    );
    let limits = |cluster: &Cluster, args: &[&str]| {
        let mut all = vec!["cluster", "limits", "--json"];
        all.extend_from_slice(args);
        let output = cluster.lockstep(&all);
        assert!(output.status.success(), "{}", text(&output));
        let reply = json(&output);
        reply["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .map(|a| {
                (
                    a["shard_id"].as_str().unwrap_or_default().to_string(),
                    a["upload_mib_s"].as_u64().unwrap_or(0),
                    a["download_mib_s"].as_u64().unwrap_or(0),
                    a["wal_share_percent"].as_u64().unwrap_or(0),
                )
            })
            .collect::<Vec<_>>()
    };
    let expect = |upload: u64, download: u64, share: u64| {
        (0..3)
            .map(|i| (Cluster::shard(i), upload, download, share))
            .collect::<Vec<_>>()
    };
    assert_eq!(limits(&cluster, &[]), expect(40, 0, 20), "from the flags");
    assert_eq!(
        limits(&cluster, &["--download", "16"]),
        expect(40, 16, 20),
        "only what is given changes"
    );
    assert_eq!(
        limits(&cluster, &["--upload", "0", "--wal-share", "30"]),
        expect(0, 16, 30)
    );
    let refused = cluster.lockstep(&["cluster", "limits", "--wal-share", "95"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(
        text(&refused).contains("ERR_INVALID_ARGUMENT") && text(&refused).contains("0..=90"),
        "{}",
        text(&refused)
    );
    assert_eq!(limits(&cluster, &[]), expect(0, 16, 30), "nothing changed");
    // A backup runs under the limits, and an agent restarted starts from its flags again.
    let backup = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(backup.status.success(), "{}", text(&backup));
    cluster.restart_agent(1);
    let after = limits(&cluster, &[]);
    assert_eq!(after[1], (Cluster::shard(1), 40, 0, 20), "{after:?}");
    assert_eq!(after[0], (Cluster::shard(0), 0, 16, 30), "{after:?}");
}

/// `lockstep demo` (what `make demo` runs) goes through the main job to its end: every
/// shard restored after the disaster equals its backup, and nothing it started is left.
#[test]
fn the_demo_runs_the_main_job_to_a_verified_restore() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Every process the demo starts inherits this, so none can hide from the check below.
    let mark = format!("LOCKSTEP_DEMO_TEST={}", std::process::id());
    let output = std::process::Command::new(lockstep_tests::binary("lockstep"))
        .args(["demo", "--dir"])
        .arg(dir.path())
        .arg("--agent-bin")
        .arg(lockstep_tests::binary("lockstep-agent"))
        .env("LOCKSTEP_DEMO_TEST", std::process::id().to_string())
        .output()
        .expect("run lockstep demo");
    let printed = text(&output);
    assert!(output.status.success(), "{printed}");
    for expected in [
        "OK: every shard is exactly at the tag again",
        "OK: the cluster is back at backup",
    ] {
        assert!(
            printed.contains(expected),
            "{expected:?} missing:\n{printed}"
        );
    }
    assert_eq!(printed.matches("OK   shard-").count(), 3, "{printed}");
    // It ran with mutual TLS, and no secret (a private key, the reader's token) is in its
    // output, its logs, its configuration or the repository's small files (manifests).
    assert!(printed.contains("coordinator on https://"), "{printed}");
    let tls = dir.path().join("tls");
    let mut secrets: Vec<String> = std::fs::read_dir(&tls)
        .expect("list tls")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|pem| {
            pem.lines()
                .filter(|l| !l.starts_with("-----") && l.len() > 20)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    let token = std::fs::read_to_string(tls.join("reader-demo.token")).expect("token");
    secrets.push(token.trim().to_string());
    // The repository is encrypted: its passphrase is a secret too.
    let passphrase =
        std::fs::read_to_string(tls.join("repository.passphrase")).expect("passphrase");
    assert!(passphrase.len() >= 32);
    secrets.push(passphrase);
    assert!(
        dir.path()
            .join("repository/lockstep-encryption.json")
            .exists(),
        "the demo's repository is encrypted"
    );
    assert!(secrets.len() >= 8, "{secrets:?}");
    let mut seen = vec![("output".to_string(), printed.clone())];
    let mut dirs = vec![dir.path().to_path_buf()];
    while let Some(at) = dirs.pop() {
        for entry in std::fs::read_dir(&at).expect("list").filter_map(|e| e.ok()) {
            let path = entry.path();
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() && path != tls {
                dirs.push(path);
            } else if meta.is_file()
                && (meta.len() < 1 << 20 || path.extension().is_some_and(|e| e == "log"))
            {
                let bytes = std::fs::read(&path).unwrap_or_default();
                seen.push((
                    path.display().to_string(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                ));
            }
        }
    }
    for (what, text) in &seen {
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "a secret is in {what}");
        }
    }
    // No process the demo started is left.
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("list /proc")
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .is_ok_and(|environ| environ.split(|b| *b == 0).any(|var| var == mark.as_bytes()))
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .collect();
    assert!(left.is_empty(), "left running: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_streams_its_progress_then_the_report() {
    let cluster = Cluster::start(5000, None);
    let backup = cluster.lockstep(&["backup", "create", "--wait"]);
    assert!(backup.status.success(), "{}", text(&backup));
    let mut client = CoordinatorClient::connect(cluster.coordinator_address.clone())
        .await
        .expect("connect coordinator");
    let mut stream = client
        .verify_backup_stream(v1::VerifyBackupRequest {
            backup_id: "latest".into(),
            full: true,
            ..Default::default()
        })
        .await
        .expect("verify")
        .into_inner();
    let mut updates = Vec::new();
    while let Some(update) = stream.message().await.expect("progress") {
        updates.push(update);
    }
    let last = updates.last().expect("at least the report");
    let report = last
        .report
        .as_ref()
        .expect("the last message carries the report");
    assert!(report.passed, "{}", report.report);
    assert!(last.bytes_total > 0, "{last:?}");
    assert_eq!(last.bytes_done, last.bytes_total, "every object checked");
    assert!(
        updates[..updates.len() - 1]
            .iter()
            .all(|u| u.report.is_none()),
        "only the last message has a report"
    );
}

#[test]
fn labels_on_backups_and_tags_show_in_list_show_and_json_and_filter_the_lists() {
    let cluster = Cluster::start(5000, None);
    let labelled = cluster.lockstep(&[
        "backup",
        "create",
        "--wait",
        "--json",
        "--label",
        "team=payments",
        "--label",
        "ticket=OPS-42",
    ]);
    assert!(labelled.status.success(), "{}", text(&labelled));
    let labelled = json(&labelled)["backup_id"]
        .as_str()
        .expect("backup id")
        .to_string();
    let plain = cluster.lockstep(&["backup", "create", "--wait", "--json"]);
    assert!(plain.status.success(), "{}", text(&plain));

    // The list filters by every label given; text and JSON show them.
    let listed = json(&cluster.lockstep(&["backup", "list", "--json", "--label", "team=payments"]));
    let ids: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|b| b["backup_id"].as_str())
        .collect();
    assert_eq!(ids, vec![labelled.as_str()]);
    assert_eq!(listed[0]["labels"]["ticket"], "OPS-42");
    let none = json(&cluster.lockstep(&[
        "backup",
        "list",
        "--json",
        "--label",
        "team=payments",
        "--label",
        "ticket=OPS-7",
    ]));
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none}");
    let all = cluster.lockstep(&["backup", "list"]);
    assert!(
        text(&all).contains("LABELS") && text(&all).contains("team=payments,ticket=OPS-42"),
        "{}",
        text(&all)
    );
    let shown = cluster.lockstep(&["backup", "show", &labelled]);
    assert!(
        text(&shown).contains("labels team=payments,ticket=OPS-42"),
        "{}",
        text(&shown)
    );

    // Tags too.
    let tag = cluster.lockstep(&[
        "tag",
        "create",
        "before-migration",
        "--label",
        "change=db-7",
    ]);
    assert!(tag.status.success(), "{}", text(&tag));
    let tags = json(&cluster.lockstep(&["tag", "list", "--json", "--label", "change=db-7"]));
    assert_eq!(tags.as_array().map(Vec::len), Some(1), "{tags}");
    assert_eq!(tags[0]["labels"]["change"], "db-7");
    let other = json(&cluster.lockstep(&["tag", "list", "--json", "--label", "change=other"]));
    assert_eq!(other.as_array().map(Vec::len), Some(0), "{other}");

    // A bad label is refused by the CLI before anything runs (a usage error, exit 2).
    let bad = cluster.lockstep(&["backup", "create", "--label", "Bad Key=x"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("label key"), "{}", text(&bad));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serves_from_its_configuration_file_and_the_command_line_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "db = \"{}\"\nshard = \"shard-7\"\nlisten = \"127.0.0.1:1\"\nrepo = \"{}\"\nwal_to = [\"{}\"]\nplaintext = true\n",
            dir.path().join("db").display(),
            dir.path().join("repo").display(),
            dir.path().join("archive").display(),
        ),
    )
    .expect("write config");
    // The file's listen address (port 1) is overridden by the command line's.
    let args: Vec<String> = [
        "serve",
        "--config",
        config.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut child, address) =
        lockstep_tests::start_server("lockstep-agent", &args, &[], &dir.path().join("agent.log"));
    let mut client =
        lockstep_proto::v1::agent_client::AgentClient::connect(format!("http://{address}"))
            .await
            .expect("connect agent");
    let info = client
        .describe(v1::DescribeRequest {})
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(info.shard_id, "shard-7");
    let wal = client
        .wal_status(v1::WalStatusRequest {})
        .await
        .expect("wal status")
        .into_inner();
    assert_eq!(wal.destinations.len(), 1, "{wal:?}");
    lockstep_tests::kill_hard(&mut child);

    // A key the agent does not know is refused before it starts, naming the key.
    std::fs::write(&config, "shard = \"shard-7\"\nwal_too = []\n").expect("write config");
    let refused = lockstep_tests::agent(&["serve", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(text(&refused).contains("wal_too"), "{}", text(&refused));
}
