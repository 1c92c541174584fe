//! Mutual TLS with roles (DESIGN §15) against real processes: the positive path (a backup,
//! a list, a restore in place with TLS on every server and client), and the negative matrix,
//! each refusal checked by its gRPC status and by nothing having changed.

use lockstep_proto::auth::Identity;
use lockstep_proto::tls::{Security, Tls, TlsFiles, endpoint};
use lockstep_proto::v1;
use lockstep_proto::v1::agent_client::AgentClient;
use lockstep_proto::v1::wal_archive_client::WalArchiveClient;
use lockstep_tests::text;
use tonic::Code;

use crate::cluster::{Cluster, N_AGENTS, json};

/// A channel to `url` as `name` (a certificate of the cluster's PKI), where `expected`
/// must answer.
async fn channel(
    cluster: &Cluster,
    name: &str,
    url: &str,
    expected: Identity,
) -> tonic::transport::Channel {
    let (ca, cert, key) = cluster.tls_files(name);
    let tls = Tls::load(TlsFiles {
        ca,
        cert: Some(cert),
        key: Some(key),
        tokens: None,
    })
    .expect("load TLS files");
    endpoint(url, &Security::Tls(tls), expected)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

fn backups(cluster: &Cluster) -> usize {
    let listed = cluster.lockstep(&["backup", "list", "--json"]);
    assert!(listed.status.success(), "{}", text(&listed));
    json(&listed).as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_authenticated_and_authorized_by_role() {
    let mut cluster = Cluster::start_secure(10_000);
    let pki = cluster.pki.clone().expect("pki");
    let ca = pki.join("ca.pem");

    // The positive path: the operator backs up, lists and restores in place over TLS.
    let backup = cluster.backup("full");
    assert_eq!(backups(&cluster), 1);
    let restored = cluster.lockstep(&["restore", &backup, "--in-place", "--json"]);
    assert!(restored.status.success(), "{}", text(&restored));
    let mut shard = cluster.shard_client(0).await;
    shard
        .put(v1::PutRequest {
            column_family: String::new(),
            key: b"after".to_vec(),
            value: b"restore".to_vec(),
        })
        .await
        .expect("a client writes through the Shard API");

    // WAL shipping over TLS: agent 0 also ships to the coordinator's own archive
    // (lockstep://), as the agent of shard-0, and catches up.
    let archive = cluster
        .coordinator_address
        .replace("https://", "lockstep://");
    cluster.agent_extra = vec!["--wal-to".into(), archive];
    cluster.restart_agent(0);
    // A backup on the restored timeline, that the point-in-time restore below starts from.
    cluster.backup("full");
    let mut shard = cluster.shard_client(0).await;
    for k in 0..20 {
        crate::pitr::write_with(&mut shard, format!("shipped-{k}"), false).await;
    }
    // Every shard has written since the restore, so each has WAL to replay on its timeline.
    for i in 1..N_AGENTS {
        crate::pitr::write(&cluster, i, "shipped-elsewhere".into(), false).await;
    }
    let status = crate::pitr::wait_shipped(&cluster).await;
    assert!(
        status.to_string().contains("lockstep://"),
        "the TLS archive is not among shard-0's destinations: {status:#}"
    );
    // A point-in-time restore over TLS: the shipped writes replayed onto the backup.
    let pitr = cluster.dir.path().join("pitr-over-tls");
    let restored = cluster.lockstep(&[
        "restore",
        "--to-archive-end",
        "--to",
        pitr.to_str().expect("utf-8"),
    ]);
    assert!(restored.status.success(), "{}", text(&restored));
    let keys = crate::pitr::keys_in(&pitr.join(Cluster::shard(0)));
    assert!(
        (0..20).all(|k| keys.contains(&format!("shipped-{k}"))),
        "{keys:?}"
    );

    // Runs `lockstep ARGS` with these TLS environment variables instead of the operator's.
    let as_ = |env: &[(&str, std::path::PathBuf)], args: &[&str]| {
        let mut command = cluster.command(args);
        for key in ["LOCKSTEP_CA", "LOCKSTEP_CERT", "LOCKSTEP_KEY"] {
            command.env_remove(key);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        command.output().expect("run lockstep")
    };
    let refused = |output: &std::process::Output, code: &str, why: &str| {
        assert!(!output.status.success(), "{}", text(output));
        let out = text(output);
        assert!(
            out.contains(code) && out.contains(why),
            "{code} {why}: {out}"
        );
    };

    // No client certificate, no token.
    let none = as_(
        &[("LOCKSTEP_CA", ca.clone())],
        &["backup", "create", "--wait"],
    );
    refused(&none, "ERR_AUTH_UNAUTHENTICATED", "no client certificate");

    // A certificate from another CA.
    let other = cluster.dir.path().join("other-ca");
    let made = std::process::Command::new(lockstep_tests::binary("lockstep"))
        .args(["cert", "ca", "--dir", other.to_str().expect("utf-8")])
        .output()
        .expect("lockstep cert ca");
    assert!(made.status.success(), "{}", text(&made));
    let mallory = std::process::Command::new(lockstep_tests::binary("lockstep"))
        .args(["cert", "issue", "--dir", other.to_str().expect("utf-8")])
        .args(["--identity", "lockstep://operator/mallory"])
        .output()
        .expect("lockstep cert issue");
    assert!(mallory.status.success(), "{}", text(&mallory));
    let foreign = as_(
        &[
            ("LOCKSTEP_CA", ca.clone()),
            ("LOCKSTEP_CERT", other.join("operator-mallory.pem")),
            ("LOCKSTEP_KEY", other.join("operator-mallory.key")),
        ],
        &["backup", "delete", &backup],
    );
    refused(
        &foreign,
        "ERR_AUTH_UNAUTHENTICATED",
        "not issued by this cluster's CA",
    );

    // An expired certificate of the right CA.
    let now = time::OffsetDateTime::now_utc();
    let (cert, key) = lockstep_coordinator::cert::issue_valid(
        &pki,
        &Identity::parse("lockstep://operator/old").expect("identity"),
        &[],
        (
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        ),
        Some("operator-old"),
    )
    .expect("issue an expired certificate");
    let expired = as_(
        &[
            ("LOCKSTEP_CA", ca.clone()),
            ("LOCKSTEP_CERT", cert),
            ("LOCKSTEP_KEY", key),
        ],
        &["backup", "delete", &backup],
    );
    refused(&expired, "ERR_AUTH_UNAUTHENTICATED", "expired");

    // A reader lists, and may not change anything.
    let (_, reader_cert, reader_key) = cluster.tls_files("reader-grafana");
    let reader = [
        ("LOCKSTEP_CA", ca.clone()),
        ("LOCKSTEP_CERT", reader_cert),
        ("LOCKSTEP_KEY", reader_key),
    ];
    let listed = as_(&reader, &["backup", "list"]);
    assert!(listed.status.success(), "{}", text(&listed));
    let delete = as_(&reader, &["backup", "delete", &backup]);
    refused(&delete, "ERR_AUTH_PERMISSION_DENIED", "may not call");

    // A Shard API client calling the agent's restore.
    let agent_url = format!("https://{}", cluster.addresses[0]);
    let shard0 = Identity::parse("lockstep://agent/shard-0").expect("identity");
    let mut as_client =
        AgentClient::new(channel(&cluster, "client-app", &agent_url, shard0.clone()).await);
    let apply = as_client
        .restore_apply(v1::RestoreRequest {
            restore_id: "rs-forged".into(),
            ..Default::default()
        })
        .await
        .expect_err("a client may not apply a restore");
    assert_eq!(apply.code(), Code::PermissionDenied, "{apply:?}");

    // WAL segments: an operator may not push them, the agent of shard-1 not shard-0's.
    let coordinator_url = cluster.coordinator_address.clone();
    let put = v1::PutWalSegmentRequest {
        shard_id: "shard-0".into(),
        lineage: None,
        name: "0000000000000001-0000000000000009.wal".into(),
        stored: b"forged".to_vec(),
    };
    for (name, code) in [
        ("operator-alice", Code::PermissionDenied),
        ("agent-shard-1", Code::PermissionDenied),
    ] {
        let mut archive = WalArchiveClient::new(
            channel(&cluster, name, &coordinator_url, Identity::Coordinator).await,
        );
        let err = archive
            .put_segment(put.clone())
            .await
            .expect_err("a forged segment");
        assert_eq!(err.code(), code, "{name}: {err:?}");
    }
    // shard-0's own agent gets past authorization (and is refused for the bad segment).
    let mut own = WalArchiveClient::new(
        channel(
            &cluster,
            "agent-shard-0",
            &coordinator_url,
            Identity::Coordinator,
        )
        .await,
    );
    let err = own.put_segment(put).await.expect_err("a bad segment");
    assert_ne!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_ne!(err.code(), Code::Unauthenticated, "{err:?}");

    // A plaintext client does not reach a TLS server.
    let plain = std::process::Command::new(lockstep_tests::binary("lockstep"))
        .args(["backup", "list"])
        .env(
            "LOCKSTEP_COORDINATOR",
            coordinator_url.replace("https://", "http://"),
        )
        .output()
        .expect("run lockstep");
    refused(&plain, "ERR_AGENT_UNAVAILABLE", "list backups");
    // A token is never sent without TLS.
    std::fs::write(pki.join("any.token"), "0123456789abcdef\n").expect("write");
    let no_ca = std::process::Command::new(lockstep_tests::binary("lockstep"))
        .args(["backup", "list"])
        .env("LOCKSTEP_COORDINATOR", &coordinator_url)
        .env("LOCKSTEP_TOKEN_FILE", pki.join("any.token"))
        .output()
        .expect("run lockstep");
    refused(&no_ca, "ERR_INVALID_ARGUMENT", "needs --ca");

    // Each role outside its part: a reader asking an agent, the coordinator writing to a
    // shard, an application listing backups.
    let mut reader_to_agent =
        AgentClient::new(channel(&cluster, "reader-grafana", &agent_url, shard0.clone()).await);
    let err = reader_to_agent
        .describe(v1::DescribeRequest {})
        .await
        .expect_err("a reader may not call an agent");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut coordinator_to_shard = lockstep_proto::v1::shard_client::ShardClient::new(
        channel(&cluster, "coordinator", &agent_url, shard0.clone()).await,
    );
    let err = coordinator_to_shard
        .put(v1::PutRequest {
            column_family: String::new(),
            key: b"forged".to_vec(),
            value: b"x".to_vec(),
        })
        .await
        .expect_err("the coordinator may not write to a shard");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut client_to_coordinator = lockstep_proto::v1::coordinator_client::CoordinatorClient::new(
        channel(
            &cluster,
            "client-app",
            &coordinator_url,
            Identity::Coordinator,
        )
        .await,
    );
    let err = client_to_coordinator
        .list_backups(v1::ListBackupsRequest::default())
        .await
        .expect_err("an application may not list backups");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Bearer tokens: added to the coordinator's token file and loaded on SIGHUP; a reader's
    // token lists and may not delete; an unknown token is refused.
    let token = pki.join("dash.token");
    let made = std::process::Command::new(lockstep_tests::binary("lockstep"))
        .args(["cert", "token", "--identity", "lockstep://reader/dash"])
        .args(["--tokens", pki.join("tokens").to_str().expect("utf-8")])
        .args(["--out", token.to_str().expect("utf-8")])
        .output()
        .expect("lockstep cert token");
    assert!(made.status.success(), "{}", text(&made));
    let with_token = [
        ("LOCKSTEP_CA", ca.clone()),
        ("LOCKSTEP_TOKEN_FILE", token.clone()),
    ];
    let before_reload = as_(&with_token, &["backup", "list"]);
    refused(&before_reload, "ERR_AUTH_UNAUTHENTICATED", "bearer token");
    let pid = cluster.coordinator.as_ref().expect("coordinator").id();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let reloaded = crate::cluster::wait_until(std::time::Duration::from_secs(10), || {
        let ok = as_(&with_token, &["backup", "list"]).status.success();
        async move { ok }
    })
    .await;
    assert!(reloaded.is_some(), "the token never worked after SIGHUP");
    let delete = as_(&with_token, &["backup", "delete", &backup]);
    refused(&delete, "ERR_AUTH_PERMISSION_DENIED", "may not call");
    std::fs::write(pki.join("wrong.token"), "0123456789abcdef\n").expect("write");
    let wrong = as_(
        &[
            ("LOCKSTEP_CA", ca.clone()),
            ("LOCKSTEP_TOKEN_FILE", pki.join("wrong.token")),
        ],
        &["backup", "list"],
    );
    refused(&wrong, "ERR_AUTH_UNAUTHENTICATED", "bearer token");

    // Nothing any refused call asked for happened (the two backups are the operator's).
    assert_eq!(backups(&cluster), 2);
}
