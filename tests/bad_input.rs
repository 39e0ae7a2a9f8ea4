//! Bad input through the real binary: a clear error naming what is wrong, a non-zero exit, and
//! nothing changed.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{cli_at, describe, free_port, spawn_coordinator, stage, stderr, stdout, strategy};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing a test file");
    path.display().to_string()
}

/// `serin strategy check FILE` (no coordinator needed).
async fn check(file: &str) -> std::process::Output {
    // The address is never contacted.
    cli_at(
        SocketAddr::from(([127, 0, 0, 1], 9)),
        &["strategy", "check", file],
    )
    .await
}

#[tokio::test]
async fn strategy_check_accepts_a_valid_file_and_names_bad_fields() {
    let dir = tempfile::tempdir().expect("tempdir");

    let valid = write(
        dir.path(),
        "valid.toml",
        &strategy(&[stage(1), stage(50), stage(100)], ""),
    );
    let out = check(&valid).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("valid"), "{}", describe(&out));

    let too_big = write(dir.path(), "too-big.toml", &strategy(&[stage(120)], ""));
    let out = check(&too_big).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("stages[0].weight") && err.contains("120"),
        "the error should name stages[0].weight and the value: {}",
        describe(&out)
    );

    let decreasing = write(
        dir.path(),
        "decreasing.toml",
        &strategy(&[stage(50), stage(10)], ""),
    );
    let out = check(&decreasing).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("stages[1].weight"),
        "the error should name stages[1].weight: {}",
        describe(&out)
    );
    assert!(
        !err.contains("stages[0]"),
        "only the second stage is wrong: {}",
        describe(&out)
    );

    let missing = dir.path().join("no-such-file.toml").display().to_string();
    let out = check(&missing).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains(&missing), "{}", describe(&out));
}

/// A minimal valid agent config with `[nginx]` using `binary`.
fn agent_toml(dir: &Path, binary: &str, stable_variant: &str) -> String {
    let nginx_conf = dir.join("nginx.conf");
    std::fs::write(&nginx_conf, "events {}\nhttp {}\n").expect("writing nginx.conf");
    let coordinator = free_port();
    let app = free_port();
    format!(
        r#"name = "bad-input"
coordinators = ["http://127.0.0.1:{coordinator}"]
interval = "500ms"
data_dir = "{data}"

[[instances]]
name = "web-stable"
service = "web"
variant = "{stable_variant}"
address = "127.0.0.1:{app}"
metrics_url = "http://127.0.0.1:{app}/metrics"

[nginx]
binary = "{binary}"
config = "{config}"
site = "{site}"

[[nginx.services]]
service = "web"
listen = "127.0.0.1:{listen}"
"#,
        data = dir.join("agent").display(),
        config = nginx_conf.display(),
        site = dir.join("site.conf").display(),
        listen = free_port(),
    )
}

/// Runs `serin agent run --config FILE`, which must exit by itself within 10 s.
async fn agent_run(config: &str) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(common::SERIN)
            .args(["agent", "run", "--config", config])
            .env_remove("SERIN_COORDINATOR")
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the agent did not exit within 10 s")
    .expect("running serin agent run");
    (out, started.elapsed())
}

#[tokio::test]
async fn agent_with_a_missing_nginx_binary_exits_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = dir.path().join("no-such-dir/nginx");
    let config = write(
        dir.path(),
        "agent.toml",
        &agent_toml(dir.path(), &binary.display().to_string(), "stable"),
    );
    let (out, took) = agent_run(&config).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        stderr(&out).contains(&binary.display().to_string()),
        "the error should name the missing binary: {}",
        describe(&out)
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // It failed before touching anything.
    assert!(!dir.path().join("site.conf").exists());
}

#[tokio::test]
async fn agent_with_an_invalid_field_exits_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = common::SERIN; // never run: validation fails first
    let config = write(
        dir.path(),
        "agent.toml",
        &agent_toml(dir.path(), nginx, "canry"),
    );
    let (out, _) = agent_run(&config).await;
    assert!(!out.status.success(), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("instances[0].variant") && err.contains("canry"),
        "the error should name instances[0].variant: {}",
        describe(&out)
    );
    assert!(
        err.contains(&config),
        "the error should name the file: {}",
        describe(&out)
    );
}

/// Rollout commands against a real coordinator with no agents: errors name the problem and
/// nothing is created.
#[tokio::test]
async fn rollout_commands_reject_bad_input_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let coordinator = spawn_coordinator(dir.path(), port, &dir.path().join("data"));
    let logs = || {
        format!(
            "=== coordinator log\n{}",
            common::tail(&coordinator.log, 40)
        )
    };
    common::wait_for(
        Duration::from_secs(30),
        "the coordinator to answer `rollout list`",
        async || {
            cli_at(addr, &["rollout", "list", "--json"])
                .await
                .status
                .success()
        },
        logs,
    )
    .await;
    let list_is_empty = async || {
        let out = cli_at(addr, &["rollout", "list", "--json"]).await;
        assert!(out.status.success(), "{}", describe(&out));
        let list: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("list --json is JSON");
        assert_eq!(list, serde_json::json!([]), "{}", describe(&out));
    };
    list_is_empty().await;

    // An unknown id.
    let out = cli_at(addr, &["rollout", "status", "no-such-id"]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        stderr(&out).contains("not found") && stderr(&out).contains("no-such-id"),
        "{}",
        describe(&out)
    );
    let out = cli_at(addr, &["rollout", "abort", "no-such-id"]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(stderr(&out).contains("not found"), "{}", describe(&out));

    // An invalid strategy: exit 2 naming the field, nothing started.
    let bad = write(dir.path(), "bad.toml", &strategy(&[stage(120)], ""));
    let start = ["rollout", "start", "web", "--version", "v2", "--strategy"];
    let out = cli_at(addr, &[&start[..], &[bad.as_str()]].concat()).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("stages[0].weight"),
        "{}",
        describe(&out)
    );
    assert!(stdout(&out).trim().is_empty(), "{}", describe(&out));
    list_is_empty().await;

    // Overlong strings: refused naming the field, the limit and the length; nothing started.
    let good = write(
        dir.path(),
        "good.toml",
        &strategy(&[stage(1), stage(100)], ""),
    );
    let long_service = "s".repeat(65);
    let long_version = "v".repeat(65);
    for (args, expected) in [
        (
            vec![
                "rollout",
                "start",
                &long_service,
                "--version",
                "v2",
                "--strategy",
                &good,
            ],
            "service: 65 bytes is longer than the limit of 64 bytes",
        ),
        (
            vec![
                "rollout",
                "start",
                "web",
                "--version",
                &long_version,
                "--strategy",
                &good,
            ],
            "version: 65 bytes is longer than the limit of 64 bytes",
        ),
    ] {
        let out = cli_at(addr, &args).await;
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(stderr(&out).contains(expected), "{}", describe(&out));
        assert!(stdout(&out).trim().is_empty(), "{}", describe(&out));
    }
    let long_reason = "r".repeat(1025);
    let out = cli_at(
        addr,
        &["rollout", "abort", "no-such-id", "--reason", &long_reason],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains("reason: 1025 bytes is longer than the limit of 1024 bytes"),
        "{}",
        describe(&out)
    );
    let long_name = write(
        dir.path(),
        "long-name.toml",
        &strategy(
            &[stage(1), stage(100)],
            &format!(
                "[[checks]]\nname = \"{}\"\nmetric = \"error_rate\"\nmax = 0.1\n",
                "n".repeat(65)
            ),
        ),
    );
    let out = cli_at(addr, &[&start[..], &[long_name.as_str()]].concat()).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("checks[2].name: 65 bytes is longer than the limit of 64 bytes"),
        "{}",
        describe(&out)
    );
    list_is_empty().await;

    // A valid strategy, but no agent serves the service: refused, nothing started. (Retried
    // while the fresh coordinator is still electing itself and answers "not the leader".)
    let last = std::sync::Mutex::new(None);
    common::wait_for(
        Duration::from_secs(30),
        "`rollout start` to be refused for want of agents",
        async || {
            let out = cli_at(addr, &[&start[..], &[good.as_str()]].concat()).await;
            let refused = !out.status.success() && stderr(&out).contains("no connected agent");
            *last.lock().expect("lock") = Some(describe(&out));
            refused
        },
        || format!("last attempt: {:?}\n{}", last.lock().expect("lock"), logs()),
    )
    .await;
    list_is_empty().await;
}

/// A listener that accepts connections, sends HTTP/2's empty SETTINGS, reads what the client
/// sends for a moment and then drops the connection without an answer: a coordinator that
/// crashed, or a network that failed, after a command was sent.
async fn dropping_listener() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding a port");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = socket.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                let mut received = 0;
                let mut buf = [0u8; 4096];
                let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
                // Read until the request (preface, settings, headers, body) has come in.
                while received < 200 {
                    match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => received += n,
                        _ => break,
                    }
                }
                drop(socket);
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_change_whose_answer_is_lost_has_an_unknown_outcome_and_says_how_to_check() {
    let addr = dropping_listener().await;
    let out = cli_at(
        addr,
        &["rollout", "pause", "web-3f9a1c", "--reason", "checking"],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let err = stderr(&out);
    assert!(err.contains("outcome is unknown"), "{}", describe(&out));
    assert!(
        err.contains("serin rollout status web-3f9a1c"),
        "{}",
        describe(&out)
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let good = write(
        dir.path(),
        "good.toml",
        &strategy(&[stage(1), stage(100)], ""),
    );
    let out = cli_at(
        addr,
        &[
            "rollout",
            "start",
            "web",
            "--version",
            "v2",
            "--strategy",
            &good,
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let err = stderr(&out);
    assert!(err.contains("outcome is unknown"), "{}", describe(&out));
    assert!(
        err.contains("serin rollout list --limit 5"),
        "{}",
        describe(&out)
    );
    assert!(stdout(&out).trim().is_empty(), "{}", describe(&out));

    // Nothing listens: the command was never sent, a plain failure.
    let closed = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let out = cli_at(closed, &["rollout", "pause", "web-3f9a1c"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains("cannot reach the coordinator"),
        "{}",
        describe(&out)
    );
    assert!(!stderr(&out).contains("unknown"), "{}", describe(&out));
}
