//! `serin demo`: a complete, real rollout on loopback, shown live.
//!
//! It starts a coordinator, an agent, a private nginx and four demo service instances (two
//! services, each with a stable and a canary instance), sends load through nginx, then:
//! 1. rolls `web` from v1.0.0 to v1.1.0, a good canary, through 1 → 5 → 25 → 50 → 100 % to
//!    promotion;
//! 2. rolls `api` from v2.3.0 to v2.4.0 and, once it reaches 25 %, makes the canary fail half of
//!    its requests; serin must roll it back by itself and nginx must stop sending it traffic.
//!
//! Everything talks for real: the operator side uses the gRPC API as the CLI does, the agent
//! scrapes the apps' Prometheus endpoints and rewrites and reloads nginx.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serin_agent::nginx::{BalancedService, LocalNginx, find_nginx};
use serin_coordinator::server::CoordinatorConfig;
use serin_proto::v1::{
    GetRolloutRequest, ListAgentsRequest, Rollout, StartRolloutRequest,
    control_service_client::ControlServiceClient,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::demo_app::{self, DemoAppArgs};

/// Options of `serin demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Minimum observation time of each stage, in seconds.
    #[arg(long, default_value_t = 6)]
    pub stage_seconds: u64,
    /// Requests per second sent through nginx to each service.
    #[arg(long, default_value_t = 150)]
    pub rps: u32,
    /// Keep the demo's files (configs, logs, raft data) in this directory instead of a
    /// temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Install nginx with apt-get when it is missing (needs root).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub install_nginx: bool,
}

/// Runs the demo; exit 0 only when the good canary was promoted and the bad one rolled back
/// with no traffic left on it.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let nginx_binary = ensure_nginx(args.install_nginx).await?;
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("serin-demo-").tempdir()?;
            temp.path().to_owned()
        }
    };
    say(&format!("serin demo — files in {}", dir.display()));

    let stop = CancellationToken::new();
    let mut tasks: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
    let result = run_scenario(&args, &dir, &nginx_binary, &stop, &mut tasks).await;
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let outcome = result?;
    say(&format!(
        "demo finished in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(if outcome {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The four instances.
struct Instances {
    web_stable: SocketAddr,
    web_canary: SocketAddr,
    api_stable: SocketAddr,
    api_canary: SocketAddr,
}

async fn run_scenario(
    args: &DemoArgs,
    dir: &Path,
    nginx_binary: &Path,
    stop: &CancellationToken,
    tasks: &mut Vec<JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<bool> {
    // 1. Coordinator.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let config = CoordinatorConfig::on_loopback(dir.join("coordinator"));
    let token = stop.clone();
    tasks.push(tokio::spawn(async move {
        serin_coordinator::server::run(config, token, Some(ready_tx))
            .await
            .map_err(Into::into)
    }));
    let coordinator = ready_rx
        .await
        .context("the coordinator did not start (see the error above)")?;
    say(&format!(
        "coordinator   listening on {coordinator} (raft, 1 voter)"
    ));

    // 2. Demo service instances.
    let spawn_app = |version: &str| {
        let args = DemoAppArgs {
            host: "127.0.0.1".into(),
            port: 0,
            version: version.into(),
            error_rate: 0.0,
            latency_ms: 5,
        };
        let token = stop.clone();
        async move {
            let (addr, app) = demo_app::bind(args).await?;
            let task = tokio::spawn(async move { app.serve(token.cancelled_owned()).await });
            anyhow::Ok((addr, task))
        }
    };
    let mut addrs = Vec::new();
    for version in ["v1.0.0", "v1.1.0", "v2.3.0", "v2.4.0"] {
        let (addr, task) = spawn_app(version).await?;
        tasks.push(task);
        addrs.push(addr);
    }
    let apps = Instances {
        web_stable: addrs[0],
        web_canary: addrs[1],
        api_stable: addrs[2],
        api_canary: addrs[3],
    };
    say(&format!(
        "demo apps     web v1.0.0 @ {} (stable), v1.1.0 @ {} (canary); api v2.3.0 @ {} (stable), v2.4.0 @ {} (canary)",
        apps.web_stable, apps.web_canary, apps.api_stable, apps.api_canary
    ));

    // 3. nginx and the agent.
    let nginx = LocalNginx::start(&dir.join("nginx"), nginx_binary).await?;
    let web_listen = free_port()?;
    let api_listen = free_port()?;
    let settings = nginx.settings(vec![
        BalancedService {
            service: "web".into(),
            listen: web_listen.to_string(),
        },
        BalancedService {
            service: "api".into(),
            listen: api_listen.to_string(),
        },
    ]);
    say(&format!(
        "nginx         {} — web on http://{web_listen}/, api on http://{api_listen}/",
        nginx_binary.display()
    ));
    let agent_toml = agent_config(dir, coordinator, &apps, &settings)?;
    std::fs::write(dir.join("agent.toml"), &agent_toml)?;
    let agent_config = serin_agent::config::AgentConfig::from_toml(&agent_toml)?;
    let token = stop.clone();
    tasks.push(tokio::spawn(async move {
        serin_agent::runtime::run(agent_config, token)
            .await
            .map_err(Into::into)
    }));
    let mut client = ControlServiceClient::connect(format!("http://{coordinator}")).await?;
    wait_for_agent(&mut client, web_listen, api_listen).await?;
    say("agent         demo-host connected; nginx serves both services from stable");

    // 4. Load.
    let web_load = Load::start("web", web_listen, args.rps, stop.clone(), tasks);
    let api_load = Load::start("api", api_listen, args.rps, stop.clone(), tasks);
    say(&format!(
        "load          {} req/s to each service through nginx (a new connection per request)",
        args.rps
    ));

    let strategy = demo_strategy(args.stage_seconds);
    std::fs::write(dir.join("canary.toml"), &strategy)?;

    // 5. The good canary.
    say("");
    say("── rollout 1: web v1.0.0 → v1.1.0 (healthy canary) ──────────────────────────────");
    let good = start(&mut client, "web", "v1.1.0", "v1.0.0", &strategy).await?;
    let good_final = watch(&mut client, &good.id, |_| async {}).await?;
    web_load.reset();

    // 6. The bad canary.
    say("");
    say("── rollout 2: api v2.3.0 → v2.4.0 (canary breaks at 25%) ─────────────────────────");
    let bad = start(&mut client, "api", "v2.4.0", "v2.3.0", &strategy).await?;
    let injected: Arc<Mutex<Option<Instant>>> = Arc::default();
    let canary_admin = format!("http://{}/admin", apps.api_canary);
    let bad_final = watch(&mut client, &bad.id, |r: Rollout| {
        let injected = injected.clone();
        let canary_admin = canary_admin.clone();
        async move {
            if r.stage_index >= 2 && injected.lock().map(|i| i.is_none()).unwrap_or(false) {
                match set_error_rate(&canary_admin, 0.5).await {
                    Ok(()) => {
                        say("  !! injecting 50% errors into the api canary (v2.4.0)");
                        if let Ok(mut i) = injected.lock() {
                            *i = Some(Instant::now());
                        }
                    }
                    Err(e) => say(&format!("  could not inject errors: {e:#}")),
                }
            }
        }
    })
    .await?;
    let inject_time = injected.lock().ok().and_then(|i| *i);
    let bad_rollback_at = bad_final.events.last().map(|e| e.at_ms).unwrap_or(0);

    // 7. After the rollback nginx must send nothing to the bad canary.
    tokio::time::sleep(Duration::from_millis(500)).await;
    api_load.reset();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = api_load.snapshot();
    let canary_after = after.by_version.get("v2.4.0").copied().unwrap_or(0);

    // Desired is not actual: wait until every agent that carries each service applied its
    // final traffic, and show it.
    let good_applied = wait_applied(&mut client, &good_final.id).await?;
    let bad_applied = wait_applied(&mut client, &bad_final.id).await?;

    let web_seen = web_load.snapshot();
    say("");
    say("── summary ───────────────────────────────────────────────────────────────────────");
    say(&format!(
        "web  {}  {}  stages passed {}/{} — {}",
        good_final.id,
        good_final.state,
        good_final
            .events
            .iter()
            .filter(|e| e.kind == "stage_advanced")
            .count()
            + usize::from(good_final.state == "promoted"),
        good_final.stage_count,
        good_final.last_reason
    ));
    say(&format!(
        "api  {}  {}  at stage {}/{} — {}",
        bad_final.id,
        bad_final.state,
        bad_final.stage_index + 1,
        bad_final.stage_count,
        bad_final.last_reason
    ));
    if let Some(t) = inject_time {
        let detected = bad_rollback_at - unix_ms_at(t);
        say(&format!(
            "api  errors injected → rollback committed: {:.1} s",
            detected as f64 / 1000.0
        ));
    }
    say(&format!(
        "api  after rollback: {} of {} requests went to v2.4.0 (must be 0)",
        canary_after, after.total
    ));
    say(&format!(
        "web  after promotion: {} of {} requests served by v1.1.0",
        web_seen.by_version.get("v1.1.0").copied().unwrap_or(0),
        web_seen.total
    ));
    for (service, applied) in [("web", &good_applied), ("api", &bad_applied)] {
        say(&format!(
            "{service}  final traffic applied by {}",
            applied.1
        ));
    }
    let ok = good_final.state == "promoted"
        && bad_final.state == "rolled_back"
        && canary_after == 0
        && after.total > 0
        && good_applied.0
        && bad_applied.0;
    if ok {
        say("RESULT: ok — the good canary was promoted and the bad one rolled back automatically");
    } else {
        say("RESULT: FAILED — see above");
    }
    nginx.stop().await;
    Ok(ok)
}

fn say(line: &str) {
    println!("{line}");
}

fn unix_ms_at(t: Instant) -> i64 {
    serin_coordinator::control::now_millis() - t.elapsed().as_millis() as i64
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Finds nginx, installing Debian's package when allowed and possible.
async fn ensure_nginx(install: bool) -> anyhow::Result<PathBuf> {
    if let Some(p) = find_nginx() {
        return Ok(p);
    }
    let can_install = install && Path::new("/usr/bin/apt-get").exists() && is_root();
    if !can_install {
        bail!(
            "nginx is not installed. Install Debian's package first: `sudo apt-get install -y nginx` (or nginx-light)"
        );
    }
    say("nginx not found: installing Debian's nginx package (apt-get install -y nginx-light)…");
    for args in [
        vec!["update", "-qq"],
        vec!["install", "-y", "-qq", "nginx-light"],
    ] {
        let status = tokio::process::Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .await
            .context("running apt-get")?;
        if !status.success() {
            bail!(
                "`apt-get {}` failed ({status}); install nginx by hand",
                args.join(" ")
            );
        }
    }
    find_nginx().context("nginx still not found after installing it")
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn agent_config(
    dir: &Path,
    coordinator: SocketAddr,
    apps: &Instances,
    nginx: &serin_agent::nginx::NginxSettings,
) -> anyhow::Result<String> {
    let mut services = String::new();
    for s in &nginx.services {
        services.push_str(&format!(
            "\n[[nginx.services]]\nservice = \"{}\"\nlisten = \"{}\"\n",
            s.service, s.listen
        ));
    }
    let instance = |name: &str, service: &str, variant: &str, addr: SocketAddr| {
        format!(
            "\n[[instances]]\nname = \"{name}\"\nservice = \"{service}\"\nvariant = \"{variant}\"\naddress = \"{addr}\"\nmetrics_url = \"http://{addr}/metrics\"\n"
        )
    };
    Ok(format!(
        r#"# Written by `serin demo`.
name = "demo-host"
coordinators = ["http://{coordinator}"]
interval = "1s"
data_dir = "{data}"

[labels]
role = "demo"
{i1}{i2}{i3}{i4}
[nginx]
binary = "{binary}"
config = "{config}"
prefix = "{prefix}"
site = "{site}"
{services}"#,
        data = dir.join("agent").display(),
        i1 = instance("web-stable", "web", "stable", apps.web_stable),
        i2 = instance("web-canary", "web", "canary", apps.web_canary),
        i3 = instance("api-stable", "api", "stable", apps.api_stable),
        i4 = instance("api-canary", "api", "canary", apps.api_canary),
        binary = nginx.binary.display(),
        config = nginx.config.display(),
        prefix = nginx
            .prefix
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        site = nginx.site.display(),
    ))
}

/// The demo's strategy: the classic five stages with short observation times.
pub fn demo_strategy(stage_seconds: u64) -> String {
    let mut s = String::from("# Written by `serin demo`: five stages, short observation times.\n");
    for w in [1, 5, 25, 50, 100] {
        s.push_str(&format!(
            "\n[[stages]]\nweight = {w}\nmin_duration = \"{stage_seconds}s\"\n"
        ));
    }
    s.push_str(
        r#"
# The canary's error rate may not exceed stable's by more than 2x (plus 1 point of slack).
[[checks]]
name = "error-rate-vs-stable"
metric = "error_rate"
max_ratio = 2.0
slack = 0.01
min_requests = 10

# Absolute latency ceiling.
[[checks]]
name = "p95-latency"
metric = "latency_p95"
max = 200
min_requests = 10

# A canary failing more than 20% of requests over 3 s is rolled back at once.
[[triggers]]
name = "canary-error-spike"
metric = "error_rate"
max = 0.2
window = "3s"
min_requests = 10
severity = "critical"
"#,
    );
    s
}

async fn wait_for_agent(
    client: &mut ControlServiceClient<Channel>,
    web: SocketAddr,
    api: SocketAddr,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    loop {
        let agents = client
            .list_agents(ListAgentsRequest {})
            .await?
            .into_inner()
            .agents;
        let connected = agents.iter().any(|a| a.connected && a.applied.is_some());
        let mut serving = connected;
        for listen in [web, api] {
            serving &= http
                .get(format!("http://{listen}/__serin/generation"))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
        }
        if serving {
            return Ok(());
        }
        if Instant::now() > deadline {
            let errors: Vec<_> = agents
                .iter()
                .filter(|a| !a.last_error.is_empty())
                .map(|a| format!("{}: {}", a.name, a.last_error))
                .collect();
            bail!(
                "the agent did not connect and configure nginx within 20 s {}",
                errors.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start(
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
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls a rollout every second, printing one live line, until it finishes.
async fn watch<F, Fut>(
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
        for e in rollout.events.iter().skip(seen_events) {
            say(&format!(
                "  ▸ {:<18} {}",
                e.kind,
                crate::cli::output::one_line(&e.reason, 400)
            ));
        }
        seen_events = rollout.events.len();
        say(&live_line(&rollout, started.elapsed()));
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

/// `[ 12s] stage 2/5   5% progressing | canary  12 req err 0.0% p95  6ms | stable …`
pub fn live_line(r: &Rollout, elapsed: Duration) -> String {
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

/// What the load generator saw since its last reset.
#[derive(Debug, Clone, Default)]
struct Seen {
    total: u64,
    errors: u64,
    by_version: BTreeMap<String, u64>,
}

/// A constant-rate load generator: a new connection per request, as most probes and many
/// clients behind NAT do.
#[derive(Clone)]
struct Load {
    seen: Arc<Mutex<Seen>>,
}

impl Load {
    fn start(
        service: &str,
        listen: SocketAddr,
        rps: u32,
        stop: CancellationToken,
        tasks: &mut Vec<JoinHandle<anyhow::Result<()>>>,
    ) -> Load {
        let load = Load {
            seen: Arc::default(),
        };
        const WORKERS: u32 = 6;
        let period = Duration::from_secs_f64(f64::from(WORKERS) / f64::from(rps.max(1)));
        for worker in 0..WORKERS {
            let load = load.clone();
            let stop = stop.clone();
            let url = format!("http://{listen}/{service}/{worker}");
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .timeout(Duration::from_secs(2))
                    .build()?;
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tick.tick() => {}
                    }
                    let result = client.get(&url).send().await;
                    let mut seen = load.seen.lock().unwrap_or_else(|e| e.into_inner());
                    seen.total += 1;
                    match result {
                        Ok(r) => {
                            if r.status().is_server_error() {
                                seen.errors += 1;
                            }
                            let version = r
                                .headers()
                                .get("x-serin-version")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("?")
                                .to_owned();
                            *seen.by_version.entry(version).or_default() += 1;
                        }
                        Err(_) => seen.errors += 1,
                    }
                }
            }));
        }
        load
    }

    fn reset(&self) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Seen::default();
    }

    fn snapshot(&self) -> Seen {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
