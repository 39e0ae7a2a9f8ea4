//! Faults on purpose, end to end: the coordinator killed with SIGKILL mid-stage, a canary whose
//! metrics page answers garbage or nothing, and a traffic change that nginx rejects.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{CANARY, STABLE, Stack, StackOptions, StageSpec, stage, strategy};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("`{key}` is not a string in {v:#}"))
}

/// The coordinator is killed with SIGKILL in the middle of stage 2 and restarted on the same
/// port and data directory: the rollout keeps its id, stage and history, the agent reconnects
/// by itself, and the rollout completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sigkill_mid_stage_resumes_where_it_was() {
    let mut stack = Stack::start().await;
    let four = |weight| StageSpec {
        weight,
        min_duration: "4s",
        manual_gate: false,
    };
    let id = stack
        .start_rollout(&strategy(&[four(1), four(50), four(100)], ""))
        .await;
    let before = stack
        .wait_status(&id, Duration::from_secs(60), "stage index 1 (50%)", |s| {
            s["stage_index"].as_u64() >= Some(1) || s["terminal"] == true
        })
        .await;
    assert_eq!(str_of(&before, "state"), "progressing", "{before:#}");
    assert_eq!(before["stage_index"], 1, "{before:#}");
    let agent_pid = stack.agent.pid();

    stack.kill_coordinator().await;
    // While it is down the CLI fails, and says why.
    let down = stack.cli(&["rollout", "status", &id, "--json"]).await;
    assert!(!down.status.success(), "{}", common::describe(&down));
    assert!(
        common::stderr(&down).contains("cannot reach the coordinator"),
        "{}",
        common::describe(&down)
    );
    stack.restart_coordinator();

    let after = stack
        .wait_status(
            &id,
            Duration::from_secs(30),
            "the restarted coordinator to answer",
            |_| true,
        )
        .await;
    assert_eq!(str_of(&after, "id"), id);
    assert!(
        after["stage_index"].as_u64() >= Some(1),
        "the restarted coordinator went back to stage 0: {after:#}"
    );
    assert!(
        matches!(str_of(&after, "state"), "progressing" | "promoted"),
        "{after:#}"
    );
    // The history committed before the kill is all there, unchanged.
    let old_events = before["events"].as_array().expect("events");
    let new_events = after["events"].as_array().expect("events");
    assert!(
        new_events.len() >= old_events.len() && new_events[..old_events.len()] == old_events[..],
        "events lost or changed by the restart:\nbefore: {old_events:#?}\nafter: {new_events:#?}"
    );
    assert_eq!(after["started_at_ms"], before["started_at_ms"]);

    // It completes, never going back to stage 0; that needs the agent's reports, so the agent
    // (the same process) reconnected by itself.
    let mut regressed = None;
    let done = stack
        .wait_terminal(&id, Duration::from_secs(60), |s| {
            if s["stage_index"].as_u64() < Some(1) {
                regressed.get_or_insert_with(|| s.clone());
            }
        })
        .await;
    assert_eq!(regressed, None, "went back to stage 0 after the restart");
    assert_eq!(
        str_of(&done, "state"),
        "promoted",
        "not promoted after the restart:\n{}",
        stack.diagnostics()
    );
    assert!(stack.agent_alive(), "the agent died");
    assert_eq!(stack.agent.pid(), agent_pid, "the agent was restarted");
    let kinds: Vec<&str> = done["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| str_of(e, "kind"))
        .collect();
    assert_eq!(
        kinds,
        ["started", "stage_advanced", "stage_advanced", "promoted"],
        "{done:#}"
    );
    stack.wait_nginx_weight(100).await;
    let burst = stack.burst(100).await;
    assert_eq!(burst.of(CANARY), 100, "{burst:?}");
}

/// What the fake metrics endpoint does.
const GARBAGE: u8 = 0;
const SILENT: u8 = 1;
const PROXY: u8 = 2;

/// A stand-in for the canary's metrics page: answers garbage, never answers, or passes the
/// real page through, as the test switches it.
struct FakeMetrics {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    /// The real page, for [`PROXY`]; set once the canary's address is known.
    real: Arc<Mutex<String>>,
    task: JoinHandle<()>,
}

impl FakeMetrics {
    async fn start() -> FakeMetrics {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake metrics endpoint");
        let addr = listener.local_addr().expect("local address");
        let mode = Arc::new(AtomicU8::new(GARBAGE));
        let real: Arc<Mutex<String>> = Arc::default();
        let m = mode.clone();
        let r = real.clone();
        let task = tokio::spawn(async move {
            let client = common::fresh_client(Duration::from_secs(2));
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    continue;
                };
                let mode = m.load(Ordering::Relaxed);
                let client = client.clone();
                let real = r.lock().unwrap_or_else(|e| e.into_inner()).clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let (content_type, body) = match mode {
                        GARBAGE => (
                            "text/plain".to_owned(),
                            b"<html>not metrics {{{\nhttp_requests_total{code=\"200\" 12 x\n# TYPE\n}}}\n"
                                .to_vec(),
                        ),
                        SILENT => {
                            // Hold the connection open without a byte of answer.
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        _ => match client.get(&real).send().await {
                            Ok(r) => {
                                let ct = r
                                    .headers()
                                    .get("content-type")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("text/plain")
                                    .to_owned();
                                (ct, r.bytes().await.map(|b| b.to_vec()).unwrap_or_default())
                            }
                            Err(_) => return,
                        },
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(&body).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        FakeMetrics {
            addr,
            mode,
            real,
            task,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::Relaxed);
    }

    fn set_real(&self, url: String) {
        *self.real.lock().unwrap_or_else(|e| e.into_inner()) = url;
    }
}

impl Drop for FakeMetrics {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The agent's log lines about failed scrapes of the canary.
fn scrape_failures(stack: &Stack) -> String {
    std::fs::read_to_string(&stack.agent.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("scrape failed") && l.contains("web-canary"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// All checks of a status say `no_data`.
fn all_no_data(s: &Value) -> bool {
    s["live"]["checks"]
        .as_array()
        .is_some_and(|c| !c.is_empty() && c.iter().all(|c| c["verdict"] == "no_data"))
}

/// The canary's metrics page answers garbage, then nothing at all: the stage must not pass on
/// missing data (however long it waits) and the agent must survive. Once the page is real
/// again the stage passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_or_silent_canary_metrics_hold_the_stage_until_fixed() {
    // The agent's config needs the fake's address before the stack (and the canary app's
    // port) exists; the fake learns the real page's address afterwards.
    let fake = FakeMetrics::start().await;
    let mut stack = Stack::start_with(StackOptions {
        canary_metrics_url: Some(format!("http://{}/metrics", fake.addr)),
        // Failed scrapes are logged at debug level.
        agent_log: Some("info,serin_agent::runtime=debug".into()),
        ..StackOptions::default()
    })
    .await;
    fake.set_real(format!("http://{}/metrics", stack.canary_addr));

    // 50% so the canary serves plenty of requests: only its metrics are missing.
    let id = stack
        .start_rollout(&strategy(&[stage(50), stage(100)], ""))
        .await;
    stack
        .wait_status(&id, Duration::from_secs(30), "a live view", |s| {
            s["live"]["checks"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
        })
        .await;

    // 3 s of garbage, then 3 s of silence: three times the stage's 2 s.
    let stays = |s: &Value| s["state"] == "progressing" && s["stage_index"] == 0 && all_no_data(s);
    stack.load.reset();
    let garbage = stack
        .assert_holds(
            &id,
            Duration::from_secs(3),
            "stage 0 to hold with no data while the canary's metrics are garbage",
            stays,
        )
        .await;
    assert!(
        stack.agent_alive(),
        "the agent died on a garbage metrics page"
    );
    // The agent saw a bad page (rather than a page with no requests) and said so.
    let fake_url = format!("http://{}/metrics", fake.addr);
    let garbage_failures = scrape_failures(&stack);
    assert!(
        garbage_failures.contains(&fake_url) && garbage_failures.contains("Prometheus text format"),
        "the agent should log failed scrapes of the garbage page:\n{garbage_failures}"
    );
    fake.set(SILENT);
    let silent = stack
        .assert_holds(
            &id,
            Duration::from_secs(3),
            "stage 0 to hold with no data while the canary's metrics never answer",
            stays,
        )
        .await;
    assert!(
        stack.agent_alive(),
        "the agent died on a silent metrics page"
    );
    let silent_failures = scrape_failures(&stack);
    let silent_failures = &silent_failures[garbage_failures.len()..];
    assert!(
        silent_failures.contains(&fake_url) && silent_failures.contains("no complete answer"),
        "the agent should log timed-out scrapes of the silent page:\n{silent_failures}"
    );
    // The canary did serve requests all along; only its metrics were missing.
    let served = stack.load.snapshot();
    assert!(
        served.of(CANARY) >= 100,
        "the canary should have served traffic meanwhile: {served:?}"
    );
    for (s, says) in [
        (&garbage, "Prometheus text format"),
        (&silent, "no complete answer"),
    ] {
        assert_eq!(
            s["live"]["canary"]["requests"], 0,
            "the coordinator counted canary requests from a broken page: {s:#}"
        );
        // The operator sees why: the status names the instance and the scrape error.
        let error = s["live"]["canary"]["last_scrape_error"]
            .as_str()
            .unwrap_or("");
        assert!(
            error.starts_with("web-canary: ") && error.contains(says),
            "status should explain the missing canary data: {s:#}"
        );
        assert!(s["live"]["stable"]["last_scrape_error"].is_null(), "{s:#}");
    }

    // Fixed: the next successful scrapes give the stage its data and it passes.
    fake.set(PROXY);
    let done = stack
        .wait_terminal(&id, Duration::from_secs(60), |_| {})
        .await;
    assert_eq!(
        str_of(&done, "state"),
        "promoted",
        "the stage did not pass once the metrics were fixed:\n{}",
        stack.diagnostics()
    );
    assert!(stack.agent_alive());
}

/// A sticky key that passes strategy validation but that nginx rejects (`$cokie_uid` is not
/// a variable): the agent's `nginx -t` fails, it restores the previous site file, and the
/// coordinator rolls back naming the failure; traffic never leaves stable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_nginx_rejects_rolls_back_and_leaves_stable_serving() {
    let mut stack = Stack::start().await;
    let toml = strategy(
        &[stage(10), stage(100)],
        "\n[traffic]\nsticky_key = \"$cokie_uid\"\n",
    );
    // The premise: serin's own validation accepts it.
    let file = stack.write_strategy("typo.toml", &toml);
    let check = stack
        .cli(&["strategy", "check", &file.display().to_string()])
        .await;
    assert!(check.status.success(), "{}", common::describe(&check));

    let id = stack.start_rollout(&toml).await;
    let done = stack
        .wait_terminal(&id, Duration::from_secs(30), |_| {})
        .await;
    assert_eq!(
        str_of(&done, "state"),
        "rolled_back",
        "a change nginx rejects must roll back:\n{}",
        stack.diagnostics()
    );
    let reason = str_of(&done, "last_reason");
    eprintln!("rolled back: {reason}");
    assert!(
        reason.contains("nginx") && reason.contains("cokie_uid"),
        "last_reason should name the nginx failure: {reason:?}"
    );
    assert_eq!(done["canary_weight"], 0);

    stack.wait_nginx_weight(0).await;
    let site = stack.site_text();
    assert!(
        !site.contains("cokie_uid"),
        "the rejected config is still in the site file:\n{site}"
    );
    let after = stack.burst(200).await;
    assert_eq!(after.of(STABLE), 200, "{after:?}");
    assert!(stack.agent_alive(), "the agent died");
}

/// The nginx master dies during a canary at 10% (its workers keep serving the old weights), and
/// the operator aborts: the rollout is `aborted` at 0%, but the host cannot apply it. Status must
/// say so — how many agents applied the current generation, and which one did not, with its
/// error and since when — instead of implying that traffic is back on stable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_an_agent_cannot_apply_is_shown_as_not_applied_with_the_agents_error() {
    let stack = Stack::start().await;
    let toml = strategy(
        &[StageSpec {
            weight: 10,
            min_duration: "10m",
            manual_gate: false,
        }],
        "",
    );
    let id = stack.start_rollout(&toml).await;
    let running = stack
        .wait_status(
            &id,
            Duration::from_secs(30),
            "stage 1 applied everywhere",
            |s| s["canary_weight"] == 10 && s["apply"]["applied"] == 1,
        )
        .await;
    assert_eq!(running["apply"]["agents"], 1, "{running:#}");
    stack.wait_nginx_weight(10).await;

    let master = stack
        .nginx
        .as_ref()
        .and_then(|n| n.pid())
        .expect("nginx master pid");
    // The master's workers outlive it (nginx's own stop cannot reach them any more): they are
    // SIGKILLed when the test ends, pass or fail.
    let _workers = OrphanedWorkers(children_of(master));
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &master.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    let out = stack
        .cli(&["rollout", "abort", &id, "--reason", "nginx master gone"])
        .await;
    assert!(out.status.success(), "{}", common::describe(&out));
    let status = stack
        .wait_status(
            &id,
            Duration::from_secs(30),
            "the failed apply to be reported",
            |s| s["apply"]["lagging"][0]["error"].is_string(),
        )
        .await;
    assert_eq!(str_of(&status, "state"), "aborted");
    assert_eq!(status["canary_weight"], 0);
    assert_eq!(status["apply"]["agents"], 1, "{status:#}");
    assert_eq!(status["apply"]["applied"], 0, "{status:#}");
    let lag = &status["apply"]["lagging"][0];
    assert_eq!(lag["agent"], "e2e-host", "{status:#}");
    assert!(
        lag["since_ms"].as_i64().is_some_and(|t| t > 0),
        "{status:#}"
    );
    let text = stack.cli_ok(&["rollout", "status", &id]).await;
    assert!(
        text.contains("0/1 applied") && text.contains("NOT APPLIED EVERYWHERE"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("e2e-host"))
        .unwrap_or_else(|| panic!("no row naming the agent:\n{text}"));
    assert!(row.contains("ago"), "{row}");
    let list = stack.cli_ok(&["rollout", "list"]).await;
    let listed = list
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} not listed:\n{list}"));
    assert!(
        listed.contains("aborted ⚠ 1 agent(s) not applied"),
        "{list}"
    );
}

/// The pids of `parent`'s children (from `/proc/*/stat`'s ppid field).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // Fields after the command name, which is in parentheses and may hold spaces.
                    let rest = stat.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Processes SIGKILLed on drop: an nginx master's workers once the master was killed.
struct OrphanedWorkers(Vec<u32>);

impl Drop for OrphanedWorkers {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}
