//! What the demo does on its fleet, in order: wait for every host's agent and for the balancer
//! to route from the inventory, start the load, roll `web` out (a good canary, promoted), roll
//! `api` out (a canary that breaks at 25 %, rolled back by serin), kill a stable `api` host,
//! then check everything against what the load generator received ([`super::verify`]).
//!
//! The operator side talks to the coordinator over gRPC, as the CLI does; each host's agent is
//! its own process ([`super::fleet`]); nothing here reads the agents' or nginx's state other
//! than through the coordinator and through requests sent to the balancer.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cluster::{Coordinators, MEMBERS};
use anyhow::{Context, bail};
use serin_coordinator::control::now_millis;
use serin_coordinator::metrics::Side;
use serin_proto::v1::{
    GetRolloutRequest, ListAgentsRequest, ListServicesRequest, Rollout, ServiceView,
    StartRolloutRequest, control_service_client::ControlServiceClient,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::fleet::{AGENT_INTERVAL, Fleet, Role, SERVICES, version_of};
use super::load::Load;
use super::verify::{self, Answer, Verdict};
use super::{DemoArgs, REMOVE_UNHEALTHY_AFTER, demo_strategy, say, worker_strategy};

/// The stable host the demo kills.
const DYING_HOST: &str = "api-2";

/// How long after a weight change the split is not judged: nginx's reload and its old
/// workers' last answers (docs: a reload settles within ~15-60 ms, the agent confirms it
/// after 200 ms of the new generation answering).
const SPLIT_SETTLE_MS: i64 = 1000;

/// Slack added to the agent interval at the count edges: a report is received a little after
/// its scrape, and a busy machine delays ticks.
const EDGE_SLACK_MS: i64 = 500;

/// Load kept running after the dead host left the upstream, to show nothing fails.
const AFTER_DEATH: Duration = Duration::from_secs(3);

/// Runs the whole scenario; `Ok(true)` when every verification held.
pub async fn run(
    args: &DemoArgs,
    dir: &Path,
    nginx_binary: &Path,
    stop: &CancellationToken,
    tasks: &mut Vec<JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<bool> {
    // The coordinator: a group of three processes.
    let serin = std::env::current_exe().context("finding the serin binary to run")?;
    let started = Instant::now();
    let mut coordinators = Coordinators::start(&serin, dir, REMOVE_UNHEALTHY_AFTER).await?;
    let (leader, _) = coordinators
        .wait_leader(Duration::from_secs(20), None)
        .await?;
    say(&format!(
        "coordinator group of {MEMBERS} processes up; node {leader} elected leader in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    let result = match Fleet::start(dir, nginx_binary, &coordinators.addresses()).await {
        Ok(mut fleet) => {
            let result = drive(args, dir, &mut coordinators, &mut fleet, stop, tasks).await;
            let mut exited = fleet.exited();
            exited.extend(coordinators.exited());
            if result.is_err() && !exited.is_empty() {
                say(&format!("processes that exited: {}", exited.join("; ")));
            }
            fleet.shutdown().await;
            result
        }
        Err(e) => Err(e),
    };
    coordinators.shutdown().await;
    result
}

fn print_shape(fleet: &Fleet, coordinators: &[std::net::SocketAddr]) {
    say("");
    say("── the fleet: one agent process per host, each host on its own loopback address ──");
    say(&format!(
        "  {:<12} {:<17} {}",
        "HOST", "ADDRESS", "RUNS (pid)"
    ));
    for (i, addr) in coordinators.iter().enumerate() {
        say(&format!(
            "  {:<12} {:<17} serin coordinator, raft member {} of {} (remove_unhealthy_after = {}s)",
            format!("coordinator-{}", i + 1),
            addr.to_string(),
            i + 1,
            coordinators.len(),
            REMOVE_UNHEALTHY_AFTER.as_secs()
        ));
    }
    for host in &fleet.hosts {
        let pids = host
            .pids()
            .iter()
            .map(|(name, pid)| format!("{name} {pid}"))
            .collect::<Vec<_>>()
            .join(", ");
        let runs = match &host.plan.role {
            Role::Balancer => format!(
                "nginx ({}) + serin agent ({pids}): carries {}, declares no instances (servers from the inventory)",
                fleet
                    .balancer_listen
                    .iter()
                    .map(|(s, l)| format!("{s} on :{}", l.port()))
                    .collect::<Vec<_>>()
                    .join(", "),
                SERVICES.join(" and ")
            ),
            Role::Gateway => format!(
                "serin demo-gateway ({pids}) on :{}: {} shards, {} start buckets, one start per bucket per {} ms",
                fleet.app_port,
                super::BOT_SHARDS,
                super::BOT_BUCKETS,
                super::BOT_START_INTERVAL.as_millis()
            ),
            Role::Bot { side } => format!(
                "serin agent ({pids}): one managed {} instance of bot on :{}; serin starts the bot versions and grants their shards",
                side_name(*side),
                fleet.app_port
            ),
            Role::Worker => format!(
                "serin agent ({pids}): one managed instance of worker on :{}; serin starts the worker versions itself (commands)",
                fleet.app_port
            ),
            Role::App {
                service,
                side,
                version,
            } => format!(
                "serin demo-app {service} {version} ({}) on :{} + serin agent ({pids}) scraping only it",
                side_name(*side),
                fleet.app_port
            ),
        };
        say(&format!(
            "  {:<12} {:<17} {runs}",
            host.plan.name,
            host.plan.address.to_string()
        ));
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Stable => "stable",
        Side::Canary => "canary",
    }
}

/// One finished rollout and what the verification needs of it.
struct Finished {
    rollout: Rollout,
    /// The coordinator's full record (its evidence holds the per-stage counts).
    record: serin_coordinator::rollout::Rollout,
    /// When every balancer applied its final traffic, Unix ms.
    applied_at_ms: i64,
    applied_line: String,
    applied: bool,
}

impl Finished {
    fn end_ms(&self) -> i64 {
        self.rollout
            .events
            .last()
            .map_or(self.rollout.started_at_ms, |e| e.at_ms)
    }
}

async fn drive(
    args: &DemoArgs,
    dir: &Path,
    coordinators: &mut Coordinators,
    fleet: &mut Fleet,
    stop: &CancellationToken,
    tasks: &mut Vec<JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<bool> {
    let mut client = coordinators.leader_client().await?;
    let ready = Instant::now();
    wait_fleet_ready(&mut client, fleet, false).await?;
    fleet.start_balancer().await?;
    print_shape(fleet, &coordinators.addresses());
    wait_fleet_ready(&mut client, fleet, true).await?;
    say(&format!(
        "fleet ready in {:.1} s: {} agents connected; lb routes each service to its stable hosts",
        ready.elapsed().as_secs_f64(),
        fleet
            .hosts
            .iter()
            .filter(|h| h.plan.role != Role::Gateway)
            .count()
    ));

    let mut loads = Vec::new();
    for (service, listen) in &fleet.balancer_listen {
        loads.push(Load::start(
            format!("http://{listen}/{service}/"),
            args.rps,
            version_of(service, Side::Stable),
            version_of(service, Side::Canary),
            stop.clone(),
            tasks,
        ));
    }
    let (web_load, api_load) = (loads[0].clone(), loads[1].clone());
    say(&format!(
        "load          {} req/s to each service through the balancer (a new connection per request)",
        args.rps
    ));
    // Let the load run for more than an agent interval first: the readiness probes are then
    // in reports received before the rollout starts, and the count's start edge is load.
    tokio::time::sleep(AGENT_INTERVAL * 2).await;
    let strategy = demo_strategy(args.stage_seconds);
    std::fs::write(dir.join("canary.toml"), &strategy)?;

    // The good canary.
    say("");
    say("── rollout 1: web v1.0.0 → v1.1.0 (healthy canary on web-3) ───────────────────────");
    let good = start(&mut client, "web", "v1.1.0", "v1.0.0", &strategy).await?;
    let (good, failover) =
        watch_through_failover(&mut client, coordinators, fleet, &good.id).await?;
    let good = finish(&mut client, good).await?;

    // The bad canary.
    say("");
    say("── rollout 2: api v2.3.0 → v2.4.0 (the canary on api-3 breaks at 25%) ─────────────");
    let bad = start(&mut client, "api", "v2.4.0", "v2.3.0", &strategy).await?;
    let injected: Arc<Mutex<Option<i64>>> = Arc::default();
    let canary_admin = format!("http://{}/admin", fleet.host("api-3")?.listen[0]);
    let bad = watch(&mut client, &bad.id, |r: Rollout| {
        let injected = injected.clone();
        let canary_admin = canary_admin.clone();
        async move {
            if r.stage_index >= 2 && injected.lock().map(|i| i.is_none()).unwrap_or(false) {
                match set_error_rate(&canary_admin, 0.5).await {
                    Ok(()) => {
                        say("  !! injecting 50% errors into the api canary (v2.4.0 on api-3)");
                        if let Ok(mut i) = injected.lock() {
                            *i = Some(now_millis());
                        }
                    }
                    Err(e) => say(&format!("  could not inject errors: {e:#}")),
                }
            }
        }
    })
    .await?;
    let injected_at = injected.lock().ok().and_then(|i| *i);
    let bad = finish(&mut client, bad).await?;
    // Traffic after the rollback, before the host death, for the "nothing on the canary" line.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A stable host dies.
    say("");
    say(&format!(
        "── a host dies: {DYING_HOST} (a stable api host) loses its app and its agent ──────────────"
    ));
    let death = host_death(&mut client, fleet, "api").await?;
    let answers_web = web_load.answers();
    let answers_api = api_load.answers();
    let finished_ms = now_millis();

    // serin deploys the worker versions itself.
    say("");
    say("── rollout 3: worker v3.0.0 → v3.1.0 (hosts model: serin starts the workers itself) ─");
    let worker = worker_rollout(args, &mut client, fleet).await?;

    // serin moves the bot's gateway shards itself.
    say("");
    say(
        "── rollout 4: bot v5.0.0 → v5.1.0 (shards model: 16 gateway shards move to the canary bot) ─",
    );
    let bot = super::bots::bot_rollout(args, &mut client, fleet).await?;

    // Verification.
    say("");
    say("── verification ──────────────────────────────────────────────────────────────────");
    let mut verdict = Verdict::default();
    verdict.require(good.rollout.state == "promoted", || {
        format!(
            "web: the good canary ended {}, not promoted",
            good.rollout.state
        )
    });
    verdict.require(bad.rollout.state == "rolled_back", || {
        format!(
            "api: the bad canary ended {}, not rolled back",
            bad.rollout.state
        )
    });
    match &failover {
        Some(f) => {
            say(&format!(
                "coordinator: leader coordinator-{} killed during the web rollout → coordinator-{} elected in {:.1} s, {}/{} agents back in {:.1} s; the rollout carried on",
                f.killed,
                f.new_leader,
                f.to_leader.as_secs_f64(),
                f.agents_back,
                f.agents,
                f.to_agents.as_secs_f64()
            ));
            verdict.require(f.agents_back == f.agents, || {
                format!(
                    "coordinator: only {}/{} agents reconnected to the new leader",
                    f.agents_back, f.agents
                )
            });
        }
        None => verdict.require(false, || {
            "coordinator: the web rollout finished before the leader could be killed".into()
        }),
    }
    say(&format!(
        "web  {}  {}  stages passed {}/{} — {}",
        good.rollout.id,
        good.rollout.state,
        good.record.evidence.len(),
        good.rollout.stage_count,
        crate::cli::output::one_line(&good.rollout.last_reason, 200)
    ));
    say(&format!(
        "api  {}  {}  at stage {}/{} — {}",
        bad.rollout.id,
        bad.rollout.state,
        bad.rollout.stage_index + 1,
        bad.rollout.stage_count,
        crate::cli::output::one_line(&bad.rollout.last_reason, 200)
    ));
    if let Some(t) = injected_at {
        say(&format!(
            "api  errors injected → rollback committed: {:.1} s",
            (bad.end_ms() - t) as f64 / 1000.0
        ));
    }
    for (service, finished) in [("web", &good), ("api", &bad)] {
        say(&format!(
            "{service}  final traffic applied by {}",
            finished.applied_line
        ));
        verdict.require(finished.applied, || {
            format!(
                "{service}: the final traffic was not applied everywhere: {}",
                finished.applied_line
            )
        });
    }
    let edge_ms = AGENT_INTERVAL.as_millis() as i64 + EDGE_SLACK_MS;
    say(&format!(
        "counts: the coordinator's per-variant totals (its stage evidence) vs what the load generator received, \
         allowed one agent interval ({} s + {:.1} s of report latency) at each edge",
        AGENT_INTERVAL.as_secs(),
        EDGE_SLACK_MS as f64 / 1000.0,
    ));
    let lost_at_death = failover.as_ref().map(|f| {
        let window = (f.killed_at_ms - LOST_AT_DEATH_MS, f.killed_at_ms + EDGE_SLACK_MS);
        say(&format!(
            "        and for web, the {:.1} s before the leader died: the reports it had not checkpointed or that were in flight to it",
            LOST_AT_DEATH_MS as f64 / 1000.0
        ));
        window
    });
    for (service, finished, answers, lost) in [
        ("web", &good, &answers_web, lost_at_death),
        ("api", &bad, &answers_api, None),
    ] {
        verify_counts(service, finished, answers, edge_ms, lost, &mut verdict);
    }
    say(&format!(
        "split: the canary's share through the balancer at each stage vs its weight \
         (binomial, ±{}σ + 1; the first {:.0} s after a change not judged)",
        verify::SPLIT_Z,
        SPLIT_SETTLE_MS as f64 / 1000.0
    ));
    for (service, finished, answers) in [("web", &good, &answers_web), ("api", &bad, &answers_api)]
    {
        verify_split(service, finished, answers, &mut verdict);
    }

    // After the rollback nothing reaches the bad canary; after the promotion everything
    // reaches the new version.
    let after_rollback = verify::tally(&answers_api, bad.applied_at_ms + 500, finished_ms);
    let on_bad_canary = verify::served(
        &answers_api,
        Side::Canary,
        bad.applied_at_ms + 500,
        finished_ms,
    );
    say(&format!(
        "api  after the rollback: {on_bad_canary} of {} requests went to v2.4.0 (must be 0)",
        after_rollback.requests
    ));
    verdict.require(on_bad_canary == 0 && after_rollback.requests > 0, || {
        format!(
            "api: {on_bad_canary} of {} requests reached the rolled-back canary",
            after_rollback.requests
        )
    });
    let after_promotion = verify::tally(&answers_web, good.applied_at_ms + 500, finished_ms);
    let on_new = verify::served(
        &answers_web,
        Side::Canary,
        good.applied_at_ms + 500,
        finished_ms,
    );
    say(&format!(
        "web  after the promotion: {on_new} of {} requests served by v1.1.0 (must be all)",
        after_promotion.requests
    ));
    verdict.require(on_new == after_promotion.requests && on_new > 0, || {
        format!(
            "web: only {on_new} of {} requests after the promotion reached v1.1.0",
            after_promotion.requests
        )
    });

    // The dead host.
    let between = verify::tally(&answers_api, death.died_at_ms, death.applied_at_ms);
    let after = verify::tally(
        &answers_api,
        death.applied_at_ms,
        death.applied_at_ms + AFTER_DEATH.as_millis() as i64,
    );
    say(&format!(
        "{DYING_HOST} died → out of the api upstream: committed after {:.1} s (remove_unhealthy_after = {} s), applied by lb after {:.1} s",
        (death.removed_at_ms - death.died_at_ms) as f64 / 1000.0,
        REMOVE_UNHEALTHY_AFTER.as_secs(),
        (death.applied_at_ms - death.died_at_ms) as f64 / 1000.0,
    ));
    say(&format!(
        "api  load while {DYING_HOST} was dead but still in the upstream: {} requests, {} failed (nginx retries a refused connection on the next server)",
        between.requests,
        between.not_ok()
    ));
    say(&format!(
        "api  load in the {} s after its removal: {} requests, {} failed (must be 0)",
        AFTER_DEATH.as_secs(),
        after.requests,
        after.not_ok()
    ));
    verdict.require(after.requests > 0 && after.not_ok() == 0, || {
        format!(
            "api: {} of {} requests failed after the dead host left the upstream",
            after.not_ok(),
            after.requests
        )
    });
    for (service, answers) in [("web", &answers_web), ("api", &answers_api)] {
        let all = verify::tally(answers, 0, i64::MAX);
        say(&format!(
            "{service}  the whole demo: {} requests, {} without an answer from an app, {} answered 5xx by an app{}",
            all.requests,
            all.failed,
            all.app_errors,
            if service == "api" {
                " (the bad canary's injected errors)"
            } else {
                ""
            }
        ));
        // While the dead host is still in the upstream nginx retries its refused connections
        // elsewhere; that window is reported above, not judged here.
        let judged =
            all.failed - verify::tally(answers, death.died_at_ms, death.applied_at_ms).failed;
        verdict.require(judged == 0, || {
            format!("{service}: {judged} requests got no answer from an app")
        });
    }
    say(&format!(
        "worker  {}  {}  — hosts on v3.1.0 at each stage: {}",
        worker.rollout.id,
        worker.rollout.state,
        worker
            .stages
            .iter()
            .map(|hosts| format!("[{}]", hosts.join(", ")))
            .collect::<Vec<_>>()
            .join(" → ")
    ));
    verdict.require(worker.rollout.state == "promoted", || {
        format!(
            "worker: the rollout ended {}, not promoted",
            worker.rollout.state
        )
    });
    let grows = worker
        .stages
        .windows(2)
        .all(|w| w[0].iter().all(|h| w[1].contains(h)));
    verdict.require(grows && !worker.stages.is_empty(), || {
        format!(
            "worker: the canary hosts did not only grow: {:?}",
            worker.stages
        )
    });
    verdict.require(worker.finally.iter().all(|(_, v)| v == "v3.1.0"), || {
        format!(
            "worker: not every worker host runs v3.1.0: {:?}",
            worker.finally
        )
    });
    say(&format!(
        "bot  {}  {}  — canary bot's shards at each stage: {}",
        bot.rollout.id,
        bot.rollout.state,
        bot.stages
            .iter()
            .map(|(_, held)| held.len().to_string())
            .collect::<Vec<_>>()
            .join(" → ")
    ));
    if let (Some(median), Some(max)) = (bot.gaps.get(bot.gaps.len() / 2), bot.gaps.last()) {
        say(&format!(
            "bot  {} shard handovers (old bot's release → new bot's start): median {median} ms, max {max} ms; {} refused as still held",
            bot.gaps.len(),
            bot.conflicts
        ));
    }
    verdict.require(bot.rollout.state == "promoted", || {
        format!("bot: the rollout ended {}, not promoted", bot.rollout.state)
    });
    let bot_grows = bot.stages.windows(2).all(|w| w[1].1.is_superset(&w[0].1));
    verdict.require(bot_grows && !bot.stages.is_empty(), || {
        format!("bot: the canary shards did not only grow: {:?}", bot.stages)
    });
    verdict.require(bot.conflicts == 0, || {
        format!(
            "bot: {} starts were refused because another bot still held the shard",
            bot.conflicts
        )
    });
    verdict.require(bot.stable_on_new == super::BOT_SHARDS as usize, || {
        format!(
            "bot: {} of {} shards are on a stable bot at v5.1.0 at the end",
            bot.stable_on_new,
            super::BOT_SHARDS
        )
    });
    let exited = fleet.exited();
    verdict.require(exited.is_empty(), || {
        format!("processes exited on their own: {}", exited.join("; "))
    });

    if verdict.ok() {
        say(
            "RESULT: ok — on the fleet shape (one agent process per host): the good canary was promoted, \
             the bad one rolled back automatically, the coordinator's counts and the split match the load, \
             and the dead host left the upstream with no failed request",
        );
    } else {
        say(&format!(
            "RESULT: FAILED — {}",
            verdict.failures().join("; ")
        ));
    }
    Ok(verdict.ok())
}

/// A stage index and the worker hosts that ran the new version at it.
type StageHosts = (u32, Vec<String>);

/// The worker rollout's outcome.
struct WorkerRollout {
    rollout: Rollout,
    /// The worker hosts running the new version, sampled at each stage.
    stages: Vec<Vec<String>>,
    /// What each worker host answers at the end.
    finally: Vec<(String, String)>,
}

/// What each worker host's worker answers on `/healthz` (`ok v3.1.0`): (host, version).
async fn worker_versions(fleet: &Fleet, http: &reqwest::Client) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for host in fleet.hosts.iter().filter(|h| h.plan.role == Role::Worker) {
        let url = format!("http://{}/healthz", host.listen[0]);
        let version = match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => r
                .text()
                .await
                .ok()
                .and_then(|t| t.trim().strip_prefix("ok ").map(str::to_owned))
                .unwrap_or_default(),
            _ => "-".to_owned(),
        };
        out.push((host.plan.name.to_owned(), version));
    }
    out
}

/// Rolls the worker service from v3.0.0 to v3.1.0 with the hosts model; serin starts every
/// worker itself. Samples which hosts run v3.1.0 once per stage.
async fn worker_rollout(
    args: &DemoArgs,
    client: &mut ControlServiceClient<Channel>,
    fleet: &Fleet,
) -> anyhow::Result<WorkerRollout> {
    let strategy = worker_strategy(
        fleet.serin(),
        fleet.workers_dir(),
        args.stage_seconds.min(5),
    );
    let started = start(client, "worker", "v3.1.0", "v3.0.0", &strategy).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()?;
    let stages: Arc<Mutex<Vec<StageHosts>>> = Arc::default();
    let rollout = watch(client, &started.id, |r: Rollout| {
        let stages = stages.clone();
        let http = http.clone();
        async move {
            if r.state != "progressing" {
                return;
            }
            // Sampled at every poll; a stage keeps its last sample. Hosts only ever turn to the
            // new version during the rollout, so the samples of later stages hold the earlier.
            let stage = r.stage_index;
            let on_new: Vec<String> = worker_versions(fleet, &http)
                .await
                .into_iter()
                .filter(|(_, v)| v == "v3.1.0")
                .map(|(h, _)| h)
                .collect();
            let Ok(mut s) = stages.lock() else {
                return;
            };
            let changed = match s.iter_mut().find(|(k, _)| *k == stage) {
                Some((_, hosts)) if *hosts == on_new => false,
                Some((_, hosts)) => {
                    *hosts = on_new.clone();
                    true
                }
                None => {
                    s.push((stage, on_new.clone()));
                    true
                }
            };
            if changed {
                say(&format!(
                    "  ▸ stage {} ({}%): serin runs v3.1.0 on {}",
                    stage + 1,
                    r.canary_weight,
                    if on_new.is_empty() {
                        "no host yet".into()
                    } else {
                        on_new.join(", ")
                    }
                ));
            }
        }
    })
    .await?;
    // Every host runs the new version once the promotion is deployed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let finally = loop {
        let versions = worker_versions(fleet, &http).await;
        if versions.iter().all(|(_, v)| v == "v3.1.0") || Instant::now() > deadline {
            break versions;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stages = stages
        .lock()
        .map(|s| s.iter().map(|(_, h)| h.clone()).collect())
        .unwrap_or_default();
    Ok(WorkerRollout {
        rollout,
        stages,
        finally,
    })
}

/// The coordinator's per-variant totals of a rollout against the load generator's.
fn verify_counts(
    service: &str,
    finished: &Finished,
    answers: &[Answer],
    edge_ms: i64,
    lost: Option<(i64, i64)>,
    verdict: &mut Verdict,
) {
    let evidence = &finished.record.evidence;
    let total = |side: Side| -> u64 {
        evidence
            .iter()
            .map(|e| match side {
                Side::Stable => e.analysis.data.stable.requests,
                Side::Canary => e.analysis.data.canary.requests,
            })
            .sum()
    };
    verdict.require(!evidence.is_empty(), || {
        format!("{service}: the rollout kept no evidence to count")
    });
    for side in [Side::Stable, Side::Canary] {
        let check = verify::count_check(
            answers,
            side,
            total(side),
            (finished.rollout.started_at_ms, finished.end_ms()),
            edge_ms,
        );
        let check = match lost {
            Some(window) => check.allowing_loss(answers, window),
            None => check,
        };
        let mark = if check.holds() { "✓" } else { "✗" };
        say(&format!(
            "  {mark} {service} {:<6} coordinator {:>5}, load generator {:>5} (allowed {}..={})",
            side_name(side),
            check.coordinator,
            check.sent,
            check.low,
            check.high
        ));
        verdict.require(check.holds(), || {
            format!(
                "{service} {}: the coordinator counted {} requests, the load generator received {} (allowed {}..={})",
                side_name(side),
                check.coordinator,
                check.sent,
                check.low,
                check.high
            )
        });
    }
}

/// The canary's share at every stage of a rollout against the stage's weight.
fn verify_split(service: &str, finished: &Finished, answers: &[Answer], verdict: &mut Verdict) {
    let mut stage_start = finished.rollout.started_at_ms;
    let mut judged = 0;
    for e in &finished.record.evidence {
        let (from, to) = (stage_start + SPLIT_SETTLE_MS, e.at);
        stage_start = e.at;
        if e.canary_weight == 0 || e.canary_weight >= 100 {
            continue;
        }
        let check = verify::split_check(answers, e.canary_weight, from, to);
        if !check.judged() {
            say(&format!(
                "  · {service} stage {} ({:>2}%): {} requests, too few to judge",
                e.stage_index + 1,
                e.canary_weight,
                check.total
            ));
            continue;
        }
        judged += 1;
        let mark = if check.holds() { "✓" } else { "✗" };
        say(&format!(
            "  {mark} {service} stage {} ({:>2}%): canary {:>4} of {:>4} = {:>5.1}% (expected {:.1} ± {:.1})",
            e.stage_index + 1,
            e.canary_weight,
            check.canary,
            check.total,
            check.share_percent(),
            check.expected,
            check.tolerance
        ));
        verdict.require(check.holds(), || {
            format!(
                "{service} stage {} ({}%): the canary answered {} of {} requests, expected {:.1} ± {:.1}",
                e.stage_index + 1,
                e.canary_weight,
                check.canary,
                check.total,
                check.expected,
                check.tolerance
            )
        });
    }
    verdict.require(judged > 0, || {
        format!("{service}: no stage had enough requests to judge the split")
    });
}

/// Waits (up to 30 s) until every app host's agent is connected and applied a desired state,
/// and, `with_balancer`, until the balancer's agent too, the coordinator's inventory holds every
/// instance, the balancer applied both services' upstreams, and requests through it reach the
/// stable version.
async fn wait_fleet_ready(
    client: &mut ControlServiceClient<Channel>,
    fleet: &mut Fleet,
    with_balancer: bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .pool_max_idle_per_host(0)
        .build()?;
    loop {
        let missing = fleet_not_ready(client, fleet, &http, with_balancer).await?;
        if missing.is_empty() {
            return Ok(());
        }
        let exited = fleet.exited();
        if !exited.is_empty() {
            bail!("a process of the fleet exited: {}", exited.join("; "));
        }
        if Instant::now() > deadline {
            bail!(
                "the fleet was not ready within 30 s: {} (logs under {})",
                missing.join("; "),
                fleet
                    .log_dirs()
                    .first()
                    .and_then(|d| d.parent())
                    .map_or("?".into(), |d| d.display().to_string())
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What keeps the fleet from being ready, in words (empty: ready).
async fn fleet_not_ready(
    client: &mut ControlServiceClient<Channel>,
    fleet: &Fleet,
    http: &reqwest::Client,
    with_balancer: bool,
) -> anyhow::Result<Vec<String>> {
    let mut missing = Vec::new();
    let agents = client
        .list_agents(ListAgentsRequest {})
        .await?
        .into_inner()
        .agents;
    for host in &fleet.hosts {
        // The gateway host runs no agent.
        if (host.plan.role == Role::Balancer && !with_balancer) || host.plan.role == Role::Gateway {
            continue;
        }
        let name = host.plan.name;
        match agents.iter().find(|a| a.name == name) {
            Some(a) if a.connected && a.applied.is_some() => {}
            Some(a) if !a.last_error.is_empty() => {
                missing.push(format!("agent {name}: {}", a.last_error))
            }
            _ => missing.push(format!("agent {name} not connected yet")),
        }
    }
    if !with_balancer {
        return Ok(missing);
    }
    let services = client
        .list_services(ListServicesRequest {})
        .await?
        .into_inner()
        .services;
    for (service, listen) in &fleet.balancer_listen {
        let Some(view) = services.iter().find(|s| s.name == *service) else {
            missing.push(format!("{service}: not in the inventory yet"));
            continue;
        };
        if view.instances.len() != 3 || !view.instances.iter().all(|i| i.in_upstream) {
            missing.push(format!(
                "{service}: {} of 3 instances in the upstream",
                view.instances.iter().filter(|i| i.in_upstream).count()
            ));
        }
        if !balancer_applied(view) {
            missing.push(format!("{service}: lb has not applied its upstream"));
            continue;
        }
        let stable = version_of(service, Side::Stable);
        for _ in 0..10 {
            let answered = match http.get(format!("http://{listen}/")).send().await {
                Ok(r) => r
                    .headers()
                    .get("x-serin-version")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                Err(_) => None,
            };
            if answered.as_deref() != Some(stable) {
                missing.push(format!(
                    "{service}: the balancer at {listen} answered {} instead of {stable}",
                    answered.as_deref().unwrap_or("nothing from an app")
                ));
                break;
            }
        }
    }
    Ok(missing)
}

fn balancer_applied(view: &ServiceView) -> bool {
    view.balancers
        .iter()
        .any(|b| b.agent == "lb" && b.connected && b.applied)
}

/// When a host died and when the coordinator and the balancer acted on it.
struct Death {
    died_at_ms: i64,
    /// The `SetUpstreams` that took it out (the service history's entry).
    removed_at_ms: i64,
    /// When the balancer was first seen to have applied it.
    applied_at_ms: i64,
}

/// Kills [`DYING_HOST`], waits until the coordinator took its instance out of `service`'s
/// upstream and the balancer applied that, then keeps the load running for [`AFTER_DEATH`].
async fn host_death(
    client: &mut ControlServiceClient<Channel>,
    fleet: &mut Fleet,
    service: &str,
) -> anyhow::Result<Death> {
    let address = fleet.host(DYING_HOST)?.listen[0].to_string();
    let died_at_ms = now_millis();
    fleet.kill_host(DYING_HOST).await?;
    say(&format!(
        "  !! {DYING_HOST} ({address}) killed: its demo app and its agent are gone (SIGKILL)"
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut said_disconnected = false;
    loop {
        let services = client
            .list_services(ListServicesRequest {})
            .await?
            .into_inner()
            .services;
        let view = services
            .iter()
            .find(|s| s.name == service)
            .with_context(|| format!("{service} left the inventory"))?;
        let instance = view.instances.iter().find(|i| i.address == address);
        if !said_disconnected && instance.is_some_and(|i| !i.connected) {
            said_disconnected = true;
            say(&format!(
                "  ▸ [{:.1} s] the coordinator sees {DYING_HOST}'s agent disconnected; it stays in the upstream for remove_unhealthy_after",
                (now_millis() - died_at_ms) as f64 / 1000.0
            ));
        }
        if instance.is_some_and(|i| !i.in_upstream) && balancer_applied(view) {
            let applied_at_ms = now_millis();
            let removal = view
                .history
                .iter()
                .rev()
                .find(|h| h.at_ms >= died_at_ms && h.reason.contains(&address));
            let removed_at_ms = removal.map_or(applied_at_ms, |h| h.at_ms);
            say(&format!(
                "  ▸ [{:.1} s] out of the upstream, applied by lb: {}",
                (applied_at_ms - died_at_ms) as f64 / 1000.0,
                removal.map_or("(no history entry)", |h| h.reason.as_str())
            ));
            tokio::time::sleep(AFTER_DEATH).await;
            return Ok(Death {
                died_at_ms,
                removed_at_ms,
                applied_at_ms,
            });
        }
        if Instant::now() > deadline {
            bail!(
                "{DYING_HOST} was still in {service}'s upstream (or lb had not applied its removal) 30 s after it died"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(super) async fn start(
    client: &mut ControlServiceClient<Channel>,
    service: &str,
    version: &str,
    stable: &str,
    strategy: &str,
) -> anyhow::Result<Rollout> {
    let reply = client
        .start_rollout(StartRolloutRequest {
            service: service.into(),
            version: version.into(),
            strategy_toml: strategy.into(),
            actor: "demo".into(),
            stable_version: stable.into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("starting the {service} rollout: {}", s.message()))?;
    let rollout = reply.into_inner().rollout.context("empty reply")?;
    say(&format!(
        "started {} ({} stages)",
        rollout.id, rollout.stage_count
    ));
    Ok(rollout)
}

/// Waits until the finished rollout's final traffic is applied and fetches its full record.
async fn finish(
    client: &mut ControlServiceClient<Channel>,
    rollout: Rollout,
) -> anyhow::Result<Finished> {
    let (applied, applied_line) = wait_applied(client, &rollout.id).await?;
    let applied_at_ms = now_millis();
    let record = crate::cli::evidence::decode(&rollout.detail_json)?;
    Ok(Finished {
        rollout,
        record,
        applied_at_ms,
        applied_line,
        applied,
    })
}

/// Waits (up to 10 s) until every agent that carries the rollout's service applied its current
/// traffic; returns whether they did and a line saying how many did.
async fn wait_applied(
    client: &mut ControlServiceClient<Channel>,
    id: &str,
) -> anyhow::Result<(bool, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rollout = client
            .get_rollout(GetRolloutRequest { id: id.into() })
            .await?
            .into_inner()
            .rollout
            .context("empty reply")?;
        let Some(apply) = rollout.apply else {
            return Ok((false, "no agent (not the service's latest rollout)".into()));
        };
        let generation = apply
            .generation
            .map_or("-".to_owned(), |g| format!("{}.{}", g.term, g.index));
        let line = format!(
            "{}/{} agents (generation {generation}){}",
            apply.applied,
            apply.agents,
            apply
                .lagging
                .iter()
                .map(|l| format!("; {} has not: {}", l.agent, l.error))
                .collect::<String>()
        );
        let complete = apply.agents > 0 && apply.lagging.is_empty();
        if complete || Instant::now() > deadline {
            return Ok((complete, line));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls a rollout every second, printing one live line, until it finishes.
pub(super) async fn watch<F, Fut>(
    client: &mut ControlServiceClient<Channel>,
    id: &str,
    mut on_update: F,
) -> anyhow::Result<Rollout>
where
    F: FnMut(Rollout) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let mut seen_events = 0;
    loop {
        let rollout = client
            .get_rollout(GetRolloutRequest { id: id.into() })
            .await?
            .into_inner()
            .rollout
            .context("empty reply")?;
        print_progress(&rollout, &mut seen_events, started);
        if matches!(
            rollout.state.as_str(),
            "promoted" | "rolled_back" | "aborted"
        ) {
            return Ok(rollout);
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("rollout {id} did not finish within 5 minutes");
        }
        on_update(rollout).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Prints the rollout's events not yet printed, then its live line.
fn print_progress(rollout: &Rollout, seen_events: &mut usize, started: Instant) {
    for e in rollout.events.iter().skip(*seen_events) {
        // A driver action names its whole command line: its start is enough here.
        let width = if e.kind == "deploy_action" { 150 } else { 400 };
        say(&format!(
            "  ▸ {:<18} {}",
            e.kind,
            crate::cli::output::one_line(&e.reason, width)
        ));
    }
    *seen_events = rollout.events.len();
    say(&live_line(rollout, started.elapsed()));
}

/// The leader killed during the good rollout, and how long the group took to recover.
#[derive(Debug, Clone)]
pub(super) struct Failover {
    /// The member killed (the leader then).
    pub killed: u64,
    /// When, Unix milliseconds.
    pub killed_at_ms: i64,
    /// The member elected after it.
    pub new_leader: u64,
    /// From the SIGKILL to a new leader.
    pub to_leader: Duration,
    /// From the SIGKILL until every agent had a session with the new leader.
    pub to_agents: Duration,
    /// Agents connected to the new leader (of `agents`).
    pub agents_back: usize,
    /// Agents of the fleet.
    pub agents: usize,
}

/// What a leader's death may take from a rollout's counts: the reports it received since its
/// last committed checkpoint (`CHECKPOINT_EVERY`, 1 s) and those in flight to it (one agent
/// interval), with the report latency.
const LOST_AT_DEATH_MS: i64 = 1000 + AGENT_INTERVAL.as_millis() as i64 + EDGE_SLACK_MS;

/// The stage at which [`watch_through_failover`] kills the leader (the third: 25 %).
const KILL_AT_STAGE: u32 = 2;

/// [`watch`], and once the rollout reaches [`KILL_AT_STAGE`], SIGKILLs the coordinator
/// leader: waits for the group to elect another, follows it, waits until every agent is
/// connected to it, restarts the killed member, and watches the rollout carry on.
async fn watch_through_failover(
    client: &mut ControlServiceClient<Channel>,
    coordinators: &mut Coordinators,
    fleet: &Fleet,
    id: &str,
) -> anyhow::Result<(Rollout, Option<Failover>)> {
    let started = Instant::now();
    let mut seen_events = 0;
    let mut failover = None;
    let agents = fleet
        .hosts
        .iter()
        .filter(|h| h.plan.role != Role::Gateway)
        .count();
    loop {
        let rollout = client
            .get_rollout(GetRolloutRequest { id: id.into() })
            .await?
            .into_inner()
            .rollout
            .context("empty reply")?;
        print_progress(&rollout, &mut seen_events, started);
        if matches!(
            rollout.state.as_str(),
            "promoted" | "rolled_back" | "aborted"
        ) {
            return Ok((rollout, failover));
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("rollout {id} did not finish within 5 minutes");
        }
        if failover.is_none() && rollout.stage_index >= KILL_AT_STAGE {
            let done = kill_the_leader(client, coordinators, agents, rollout.stage_index).await?;
            failover = Some(done);
            continue;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn kill_the_leader(
    client: &mut ControlServiceClient<Channel>,
    coordinators: &mut Coordinators,
    agents: usize,
    stage_index: u32,
) -> anyhow::Result<Failover> {
    let (killed, addr) = coordinators
        .wait_leader(Duration::from_secs(10), None)
        .await?;
    say(&format!(
        "  !! SIGKILL coordinator-{killed} ({addr}), the leader, at stage {}",
        stage_index + 1
    ));
    let killed_at = Instant::now();
    let killed_at_ms = now_millis();
    coordinators.kill(killed).await?;
    let (new_leader, new_addr) = coordinators
        .wait_leader(Duration::from_secs(15), Some(killed))
        .await?;
    let to_leader = killed_at.elapsed();
    say(&format!(
        "  ▸ [{:.1} s] coordinator-{new_leader} ({new_addr}) elected leader; the CLI and the agents follow it",
        to_leader.as_secs_f64()
    ));
    *client = crate::cli::connect_to(&format!("http://{new_addr}"))
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the new leader at {new_addr}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let agents_back = loop {
        let connected = match client.list_agents(ListAgentsRequest {}).await {
            Ok(reply) => reply
                .into_inner()
                .agents
                .iter()
                .filter(|a| a.connected)
                .count(),
            Err(_) => 0,
        };
        if connected >= agents || Instant::now() > deadline {
            break connected;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let to_agents = killed_at.elapsed();
    say(&format!(
        "  ▸ [{:.1} s] {agents_back}/{agents} agents connected to coordinator-{new_leader}",
        to_agents.as_secs_f64()
    ));
    coordinators.restart(killed)?;
    say(&format!(
        "  ▸ coordinator-{killed} restarted on its data directory: it rejoins as a follower and catches up"
    ));
    Ok(Failover {
        killed,
        killed_at_ms,
        new_leader,
        to_leader,
        to_agents,
        agents_back,
        agents,
    })
}

/// `[ 12s] stage 2/5   5% progressing | canary  12 req err 0.0% p95  6ms | stable …`
fn live_line(r: &Rollout, elapsed: Duration) -> String {
    let fmt = |v: Option<&serin_proto::v1::VariantStats>| match v {
        Some(s) => format!(
            "{:>5} req err {:>5.1}% p95 {:>6}",
            s.requests,
            s.error_rate * 100.0,
            if s.p95_ms < 0.0 {
                "-".to_owned()
            } else {
                format!("{:.1}ms", s.p95_ms)
            }
        ),
        None => "no data yet".to_owned(),
    };
    let live = r.live.as_ref();
    format!(
        "  [{:>3}s] stage {}/{} {:>3}% {:<12} | canary {} | stable {}",
        elapsed.as_secs(),
        r.stage_index + 1,
        r.stage_count,
        r.canary_weight,
        r.state,
        fmt(live.and_then(|l| l.canary.as_ref())),
        fmt(live.and_then(|l| l.stable.as_ref())),
    )
}

async fn set_error_rate(admin: &str, rate: f64) -> anyhow::Result<()> {
    let response = reqwest::Client::new()
        .post(admin)
        .header("content-type", "application/json")
        .body(format!("{{\"error_rate\": {rate}}}"))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("admin endpoint answered {}", response.status());
    }
    Ok(())
}
