//! What the real agent and coordinator processes say when they start: plain text on a pipe,
//! and a warning from an agent with nothing to do.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::free_port;

/// Runs `serin ARGS` for `run_for` with stderr on a pipe and `NO_COLOR` unset, then stops it
/// (SIGKILL) and returns what it wrote to stderr.
async fn stderr_of(dir: &Path, args: &[&str], run_for: Duration) -> String {
    let mut child = tokio::process::Command::new(common::SERIN)
        .args(args)
        .current_dir(dir)
        .env_remove("NO_COLOR")
        .env_remove("SERIN_COORDINATOR")
        .env_remove("SERIN_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning serin");
    tokio::time::sleep(run_for).await;
    child.start_kill().expect("killing serin");
    let out = child.wait_with_output().await.expect("serin output");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn logs_on_a_pipe_carry_no_colour_codes_and_an_idle_agent_warns_it_does_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"idle-1\"\ncoordinators = [\"http://127.0.0.1:{port}\"]\ndata_dir = \"{}\"\n",
            dir.path().join("agent").display()
        ),
    )
    .expect("writing agent.toml");
    let config = config.display().to_string();

    // Nothing listens on the coordinator port: the agent starts, warns and retries.
    let agent = stderr_of(
        dir.path(),
        &["agent", "run", "--config", &config],
        Duration::from_millis(1500),
    )
    .await;
    assert!(agent.contains("agent starting"), "{agent}");
    assert!(
        agent.contains("no [[instances]] and no [nginx]") && agent.contains("WARN"),
        "an agent with nothing to do says so: {agent}"
    );
    assert!(!agent.contains('\x1b'), "ANSI codes on a pipe: {agent:?}");

    let data = dir.path().join("coordinator");
    let coordinator = stderr_of(
        dir.path(),
        &[
            "coordinator",
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &data.display().to_string(),
        ],
        Duration::from_millis(2000),
    )
    .await;
    assert!(coordinator.contains("INFO"), "{coordinator}");
    assert!(
        !coordinator.contains('\x1b'),
        "ANSI codes on a pipe: {coordinator:?}"
    );
}

fn agent_config(dir: &Path, file: &str, name: &str, port: u16, data: &str) -> String {
    let path = dir.join(file);
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\ncoordinators = [\"http://127.0.0.1:{port}\"]\ninterval = \"500ms\"\ndata_dir = \"{}\"\n\n[[instances]]\nname = \"app\"\nservice = \"web\"\nvariant = \"stable\"\naddress = \"127.0.0.1:1\"\nmetrics_url = \"http://127.0.0.1:1/metrics\"\n",
            dir.join(data).display()
        ),
    )
    .expect("writing an agent config");
    path.display().to_string()
}

/// Two hosts configured with the same agent name: the second is refused with the name and the
/// first one's address, exits 1 saying so, and the first stays connected (no flapping).
#[tokio::test]
async fn a_second_agent_with_a_taken_name_exits_saying_who_has_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _coordinator = common::spawn_coordinator(dir.path(), port, &dir.path().join("coordinator"));
    let first = agent_config(dir.path(), "a.toml", "host-1", port, "agent-a");
    let mut first = common::Proc::spawn(
        "agent-a",
        dir.path(),
        &["agent".into(), "run".into(), "--config".into(), first],
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut connected = false;
    for _ in 0..100 {
        let out = common::cli_at(addr, &["agent", "list", "--json"]).await;
        let text = common::stdout(&out);
        if text.contains("\"connected\": true") {
            connected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(connected, "the first agent never connected");

    let second = agent_config(dir.path(), "b.toml", "host-1", port, "agent-b");
    let run = tokio::process::Command::new(common::SERIN)
        .args(["agent", "run", "--config", &second])
        .env("NO_COLOR", "1")
        .env_remove("SERIN_COORDINATOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the second agent exits by itself")
        .expect("running the second agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("second agent: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("'host-1' is already connected from 127.0.0.1:"),
        "{stderr}"
    );
    assert!(first.alive(), "the first agent died");
    let list = common::cli_at(addr, &["agent", "list", "--json"]).await;
    assert!(
        common::stdout(&list).contains("\"connected\": true"),
        "the first agent lost its session: {}",
        common::describe(&list)
    );
}
