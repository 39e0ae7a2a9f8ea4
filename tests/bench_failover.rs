//! Benchmark (ignored by default): failover and commit throughput of a 3-node coordinator
//! group on loopback, behind a real agent, nginx and load (docs/benchmarks.md §12 and §13).
//!
//! Run: `cargo nextest run --release --run-ignored only --test bench_failover --no-capture`
//!
//! §12, per SIGKILL of the leader during a rollout (20 kills; each killed member is restarted
//! and caught up before the next kill):
//! - new leader: from the SIGKILL until a surviving member answers `ClusterStatus` as the
//!   leader (each survivor asked directly over gRPC every 20 ms, the call
//!   `serin cluster status` makes, without a process start per poll);
//! - control loop acting: from the SIGKILL until the rollout's status (`GetRollout` on the new
//!   leader, every 20 ms) shows a checkpoint or event committed after the kill: its `at`
//!   (the leader's clock, which is this machine's) later than the kill. The time reported is
//!   when the test saw it, so it includes the commit and up to one poll;
//! - agent reconnected: from the SIGKILL until `ListAgents` on the new leader (what
//!   `serin agent list --json` calls) lists every agent connected.
//!
//! §13: `STEER_WORKERS` concurrent gRPC clients send `SteerRollout` pause/resume (alternating)
//! to the leader for `STEER_SECONDS`. A "command" is one log entry: proposed, committed by a
//! majority (each member fsyncs its log before acknowledging), applied. Throughput is the
//! commit index's rise over the run (the log's own count; it includes the control loop's
//! ~1/s checkpoints). Latency is that of calls answered "applied" (they went through the
//! log); a pause of a paused rollout is refused, by the leader before proposing when its state
//! already shows it, else at apply time after the commit, so refusals are counted apart.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::group::member_view_at;
use common::{Coordinators, Stack, StackOptions, StageSpec, strategy};
use serin_proto::v1::control_service_client::ControlServiceClient;
use serin_proto::v1::{GetRolloutRequest, ListAgentsRequest, SteerAction, SteerRolloutRequest};

const KILLS: usize = 20;
const POLL: Duration = Duration::from_millis(20);
const STEER_WORKERS: usize = 16;
const STEER_SECONDS: u64 = 10;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock before 1970")
        .as_millis() as i64
}

/// Median and maximum, in ms.
fn summary(samples: &[Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let median = if ms.len() % 2 == 1 {
        ms[ms.len() / 2]
    } else {
        (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0
    };
    (median, *ms.last().expect("samples"))
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted_ms.len() as f64).ceil() as usize;
    sorted_ms[rank.clamp(1, sorted_ms.len()) - 1]
}

async fn client(url: &str) -> Option<ControlServiceClient<tonic::transport::Channel>> {
    tokio::time::timeout(
        Duration::from_secs(1),
        ControlServiceClient::connect(url.to_owned()),
    )
    .await
    .ok()?
    .ok()
}

/// Polls `probe` every [`POLL`] until it returns `Some`, for at most `timeout` (then panics).
async fn until<T>(what: &str, timeout: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// The leader among `urls`, asked directly: (its id, its url).
async fn find_leader(urls: &[String]) -> Option<(u64, String)> {
    let views = futures::future::join_all(urls.iter().map(|u| member_view_at(u))).await;
    views.into_iter().zip(urls).find_map(|(v, u)| match v {
        Ok(v) if v.role == "leader" => Some((v.node_id, u.clone())),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo nextest run --release --run-ignored only --test bench_failover"]
async fn bench_failover_and_commit_throughput_on_three_nodes() {
    let mut stack = Stack::start_on(Coordinators::Group(3), StackOptions::default()).await;
    let long = |weight| StageSpec {
        weight,
        min_duration: "1h",
        manual_gate: false,
    };
    let id = stack
        .start_rollout(&strategy(&[long(50), long(100)], ""))
        .await;
    // Let the first leader checkpoint and the agent settle.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut to_leader = Vec::new();
    let mut to_control = Vec::new();
    let mut to_agents = Vec::new();
    for kill in 1..=KILLS {
        let all: Vec<String> = stack.group().members.iter().map(|m| m.url()).collect();
        let (old, _) = until("a leader", Duration::from_secs(30), async || {
            find_leader(&all).await
        })
        .await;
        let survivors: Vec<String> = stack
            .group()
            .members
            .iter()
            .filter(|m| m.id != old)
            .map(|m| m.url())
            .collect();
        let killed_at = Instant::now();
        let killed_ms = now_ms();
        stack.group_mut().kill(old).await;

        let (new, url) = until("a new leader", Duration::from_secs(30), async || {
            find_leader(&survivors).await
        })
        .await;
        let leader_after = killed_at.elapsed();
        let mut leader_client = client(&url).await.expect("connecting to the new leader");

        // The control loop and the agent, watched together.
        let mut control_after = None;
        let mut agents_after = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while control_after.is_none() || agents_after.is_none() {
            assert!(
                Instant::now() < deadline,
                "kill {kill}: leader {new} did not act or the agent did not reconnect within 30 s\n{}",
                stack.diagnostics()
            );
            if control_after.is_none()
                && let Ok(reply) = leader_client
                    .get_rollout(GetRolloutRequest { id: id.clone() })
                    .await
                && let Some(r) = reply.into_inner().rollout
            {
                let detail: serde_json::Value =
                    serde_json::from_str(&r.detail_json).unwrap_or_default();
                let checkpoint = detail["checkpoint"]["at"].as_i64().unwrap_or(0);
                let event = r.events.last().map_or(0, |e| e.at_ms);
                if checkpoint.max(event) > killed_ms {
                    control_after = Some(killed_at.elapsed());
                }
            }
            if agents_after.is_none()
                && let Ok(reply) = leader_client.list_agents(ListAgentsRequest {}).await
            {
                let agents = reply.into_inner().agents;
                if !agents.is_empty() && agents.iter().all(|a| a.connected) {
                    agents_after = Some(killed_at.elapsed());
                }
            }
            tokio::time::sleep(POLL).await;
        }
        let (control_after, agents_after) = (control_after.unwrap(), agents_after.unwrap());
        eprintln!(
            "kill {kill:2}: leader {old} -> {new}: new leader {leader_after:?}, control loop \
             {control_after:?}, agent {agents_after:?}"
        );
        to_leader.push(leader_after);
        to_control.push(control_after);
        to_agents.push(agents_after);

        // Restart the killed member and let it catch up before the next kill.
        stack.group_mut().start(old);
        let old_url = stack.group().member(old).url();
        until(
            "the restarted member to catch up",
            Duration::from_secs(30),
            async || {
                let leader = member_view_at(&url).await.ok()?;
                let member = member_view_at(&old_url).await.ok()?;
                (member.applied_index >= leader.commit_index && member.leader_id == new)
                    .then_some(())
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let (lm, lx) = summary(&to_leader);
    let (cm, cx) = summary(&to_control);
    let (am, ax) = summary(&to_agents);
    println!("=== failover, 3 nodes, {KILLS} SIGKILLs of the leader (ms)");
    println!("                         median      max");
    println!("new leader              {lm:7.0}  {lx:7.0}");
    println!("control loop acts again {cm:7.0}  {cx:7.0}");
    println!("agent reconnected       {am:7.0}  {ax:7.0}");

    // §13: commit throughput and latency.
    let all: Vec<String> = stack.group().members.iter().map(|m| m.url()).collect();
    let (_, url) = until("a leader", Duration::from_secs(30), async || {
        find_leader(&all).await
    })
    .await;
    let commit_before = member_view_at(&url)
        .await
        .expect("leader view")
        .commit_index;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..STEER_WORKERS)
        .map(|w| {
            let url = url.clone();
            let id = id.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut c = client(&url).await.expect("connecting to the leader");
                let mut latencies = Vec::new();
                let (mut accepted, mut rejected, mut failed) = (0u64, 0u64, 0u64);
                let mut k = w;
                while !stop.load(Ordering::Relaxed) {
                    let action = if k % 2 == 0 {
                        SteerAction::Pause
                    } else {
                        SteerAction::Resume
                    };
                    k += 1;
                    let t = Instant::now();
                    let r = c
                        .steer_rollout(SteerRolloutRequest {
                            id: id.clone(),
                            action: action as i32,
                            reason: String::new(),
                            actor: "bench".into(),
                        })
                        .await;
                    let took = t.elapsed();
                    match r {
                        // Applied: it went through the log. (A refusal may not have: the
                        // leader refuses what its current state would, before proposing.)
                        Ok(_) => {
                            accepted += 1;
                            latencies.push(took.as_secs_f64() * 1e3);
                        }
                        Err(s) if s.code() == tonic::Code::FailedPrecondition => rejected += 1,
                        Err(_) => failed += 1,
                    }
                }
                (latencies, accepted, rejected, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(STEER_SECONDS)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let (mut accepted, mut rejected, mut failed) = (0, 0, 0);
    for w in workers {
        let (l, a, r, f) = w.await.expect("worker");
        latencies.extend(l);
        accepted += a;
        rejected += r;
        failed += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let commit_after = member_view_at(&url)
        .await
        .expect("leader view")
        .commit_index;
    latencies.sort_by(f64::total_cmp);
    println!(
        "=== commit throughput, 3 nodes, {STEER_WORKERS} concurrent SteerRollout clients, {elapsed:.1} s"
    );
    println!(
        "calls: {accepted} applied, {rejected} refused (before or after the log), {failed} \
         failed; commit index +{} = {:.0} committed entries/s",
        commit_after - commit_before,
        (commit_after - commit_before) as f64 / elapsed
    );
    println!(
        "latency of applied calls, ms: p50 {:.1}, p99 {:.1}, max {:.1}",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(0.0)
    );
}
