//! The demo's fleet: the shape serin is for, on one machine.
//!
//! A balancer host and six app hosts, each on its own loopback address (all of 127.0.0.0/8 is
//! loopback on Linux, so no root and no namespaces are needed), each running its own processes:
//!
//! - `lb` (127.0.1.1): a private nginx and a `serin agent` whose config carries both services
//!   under `[nginx]` and declares no instances: its upstream servers come from the
//!   coordinator's inventory;
//! - `web-1`, `web-2` (stable), `web-3` (canary), `api-1`, `api-2` (stable), `api-3` (canary)
//!   (127.0.1.11.. and 127.0.1.21..): a `serin demo-app` and a `serin agent` that declares and
//!   scrapes only that host's instance.
//!
//! Every process is a child of the demo (the `serin` binary itself, from
//! [`std::env::current_exe`]), killed when its host dies on purpose, when the demo ends, fails or
//! is interrupted: each child is `kill_on_drop`, [`Fleet::shutdown`] kills and reaps them all,
//! and the balancer's nginx stops with its [`LocalNginx`]. Logs go to `<dir>/<host>/<process>.log`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serin_agent::nginx::{BalancedService, LocalNginx, NginxSettings};
use serin_coordinator::metrics::Side;
use tokio::process::{Child, Command};

/// How often every agent of the demo reports; also the edge of the count verification.
pub const AGENT_INTERVAL: Duration = Duration::from_secs(1);

/// The balancer host's address.
pub const BALANCER_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 1);

/// The demo's two services behind the balancer.
pub const SERVICES: [&str; 2] = ["web", "api"];

/// The queue-worker service whose versions serin deploys itself.
pub const WORKER_SERVICE: &str = "worker";

/// The sharded bot service whose gateway shards serin moves itself.
pub const BOT_SERVICE: &str = "bot";

/// What runs on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// nginx and a balancer-only agent carrying every service.
    Balancer,
    /// An agent whose one instance of [`WORKER_SERVICE`] is managed: serin itself starts the
    /// `serin demo-worker` version there (hosts model, command driver; docs/deploy.md).
    Worker,
    /// `serin demo-gateway`, the stand-in for Discord's gateway the bots start their shards at.
    Gateway,
    /// An agent whose one instance of [`BOT_SERVICE`] is managed: serin starts the
    /// `serin demo-bot` version there and grants it its shards (shards model).
    Bot {
        /// The variant its instance is declared as.
        side: Side,
    },
    /// One demo app instance of `service` and an agent scraping only it.
    App {
        /// The service.
        service: &'static str,
        /// Its variant.
        side: Side,
        /// The version it answers.
        version: &'static str,
    },
}

/// One host of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    /// Host (and agent) name.
    pub name: &'static str,
    /// Its loopback address.
    pub address: Ipv4Addr,
    /// What runs there.
    pub role: Role,
}

/// The demo's hosts: the balancer first, then for each service two stable hosts and a canary.
pub fn plan() -> Vec<HostPlan> {
    let app = |name, last, service, side, version| HostPlan {
        name,
        address: Ipv4Addr::new(127, 0, 1, last),
        role: Role::App {
            service,
            side,
            version,
        },
    };
    let worker = |name, last| HostPlan {
        name,
        address: Ipv4Addr::new(127, 0, 1, last),
        role: Role::Worker,
    };
    let bot = |name, last, side| HostPlan {
        name,
        address: Ipv4Addr::new(127, 0, 1, last),
        role: Role::Bot { side },
    };
    vec![
        HostPlan {
            name: "lb",
            address: BALANCER_ADDRESS,
            role: Role::Balancer,
        },
        app("web-1", 11, "web", Side::Stable, "v1.0.0"),
        app("web-2", 12, "web", Side::Stable, "v1.0.0"),
        app("web-3", 13, "web", Side::Canary, "v1.1.0"),
        app("api-1", 21, "api", Side::Stable, "v2.3.0"),
        app("api-2", 22, "api", Side::Stable, "v2.3.0"),
        app("api-3", 23, "api", Side::Canary, "v2.4.0"),
        worker("worker-1", 31),
        worker("worker-2", 32),
        worker("worker-3", 33),
        HostPlan {
            name: "gateway",
            address: Ipv4Addr::new(127, 0, 1, 40),
            role: Role::Gateway,
        },
        bot("bot-1", 41, Side::Stable),
        bot("bot-2", 42, Side::Stable),
        bot("bot-3", 43, Side::Canary),
    ]
}

/// The version `service`'s `side` instances answer in [`plan`].
pub fn version_of(service: &str, side: Side) -> &'static str {
    plan()
        .into_iter()
        .find_map(|h| match h.role {
            Role::App {
                service: s,
                side: v,
                version,
            } if s == service && v == side => Some(version),
            _ => None,
        })
        .unwrap_or("?")
}

/// A port in 20000..32000 (below Linux's ephemeral range, so the load's outgoing connections
/// cannot take it meanwhile) that is free on every one of `addresses` now.
pub(super) fn port_free_on(addresses: &[Ipv4Addr], taken: &[u16]) -> anyhow::Result<u16> {
    for _ in 0..1000 {
        let port: u16 = rand::random_range(20_000..32_000);
        if taken.contains(&port) {
            continue;
        }
        if addresses
            .iter()
            .all(|a| std::net::TcpListener::bind((*a, port)).is_ok())
        {
            return Ok(port);
        }
    }
    bail!("no port in 20000..32000 is free on every demo host address")
}

/// One child process of a host.
struct Proc {
    /// `app` or `agent`.
    name: &'static str,
    log: PathBuf,
    child: Child,
}

/// A host of the running fleet.
pub struct Host {
    /// What the host is.
    pub plan: HostPlan,
    /// Where its instance (app hosts) or its nginx (the balancer) listens.
    pub listen: Vec<SocketAddr>,
    dir: PathBuf,
    procs: Vec<Proc>,
    /// Killed on purpose ([`Fleet::kill_host`]).
    killed: bool,
}

impl Host {
    /// `pid` of each of its processes still running, by name.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.procs
            .iter()
            .filter_map(|p| p.child.id().map(|pid| (p.name, pid)))
            .collect()
    }
}

/// The running fleet.
pub struct Fleet {
    /// Every host, in [`plan`] order.
    pub hosts: Vec<Host>,
    /// Where the balancer serves each service, in [`SERVICES`] order.
    pub balancer_listen: Vec<(&'static str, SocketAddr)>,
    /// The port every app host's instance listens on.
    pub app_port: u16,
    nginx: Option<LocalNginx>,
    serin: PathBuf,
    workers_dir: PathBuf,
    bots_dir: PathBuf,
}

impl Fleet {
    /// Starts the balancer's nginx and every app host's processes (waiting until each app
    /// answers), all pointed at the coordinator group at `coordinators`, and writes the balancer's
    /// agent config; [`Fleet::start_balancer`] starts that agent.
    pub async fn start(
        dir: &Path,
        nginx_binary: &Path,
        coordinators: &[SocketAddr],
    ) -> anyhow::Result<Fleet> {
        let serin = std::env::current_exe().context("finding the serin binary to run")?;
        let plan = plan();
        let app_addresses: Vec<Ipv4Addr> = plan
            .iter()
            .filter(|h| h.role != Role::Balancer)
            .map(|h| h.address)
            .collect();
        let app_port = port_free_on(&app_addresses, &[])?;
        let web_port = port_free_on(&[BALANCER_ADDRESS], &[app_port])?;
        let api_port = port_free_on(&[BALANCER_ADDRESS], &[app_port, web_port])?;
        let balancer_listen = vec![
            ("web", SocketAddr::from((BALANCER_ADDRESS, web_port))),
            ("api", SocketAddr::from((BALANCER_ADDRESS, api_port))),
        ];
        let nginx = LocalNginx::start(&dir.join("lb").join("nginx"), nginx_binary)
            .await
            .context("starting the balancer's nginx")?;
        let mut fleet = Fleet {
            hosts: Vec::new(),
            balancer_listen,
            app_port,
            nginx: None,
            serin: serin.clone(),
            workers_dir: dir.join("workers"),
            bots_dir: dir.join("bots"),
        };
        for d in [&fleet.workers_dir, &fleet.bots_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let settings = nginx.settings(
            fleet
                .balancer_listen
                .iter()
                .map(|(service, listen)| BalancedService {
                    service: (*service).into(),
                    listen: listen.to_string(),
                })
                .collect(),
        );
        fleet.nginx = Some(nginx);
        for host in plan {
            let host_dir = dir.join(host.name);
            std::fs::create_dir_all(&host_dir)
                .with_context(|| format!("creating {}", host_dir.display()))?;
            let mut running = Host {
                listen: Vec::new(),
                dir: host_dir.clone(),
                procs: Vec::new(),
                killed: false,
                plan: host.clone(),
            };
            let agent_toml = match &host.role {
                Role::Balancer => {
                    running.listen = fleet.balancer_listen.iter().map(|(_, l)| *l).collect();
                    balancer_config(&host, coordinators, &host_dir, &settings)
                }
                Role::Worker => {
                    let listen = SocketAddr::from((host.address, app_port));
                    running.listen = vec![listen];
                    worker_config(&host, coordinators, &host_dir, listen)
                }
                Role::Gateway => {
                    let listen = SocketAddr::from((host.address, app_port));
                    running.listen = vec![listen];
                    let gateway = spawn(
                        &serin,
                        &host_dir,
                        "gateway",
                        &[
                            "demo-gateway",
                            "--host",
                            &host.address.to_string(),
                            "--port",
                            &app_port.to_string(),
                            "--shards",
                            &super::BOT_SHARDS.to_string(),
                            "--max-concurrency",
                            &super::BOT_BUCKETS.to_string(),
                            "--bucket-interval",
                            &format!("{}ms", super::BOT_START_INTERVAL.as_millis()),
                        ],
                    )?;
                    running.procs.push(gateway);
                    String::new()
                }
                Role::Bot { side } => {
                    let listen = SocketAddr::from((host.address, app_port));
                    running.listen = vec![listen];
                    bot_config(&host, coordinators, &host_dir, listen, *side)
                }
                Role::App { version, .. } => {
                    let listen = SocketAddr::from((host.address, app_port));
                    running.listen = vec![listen];
                    let app = spawn(
                        &serin,
                        &host_dir,
                        "app",
                        &[
                            "demo-app",
                            "--host",
                            &host.address.to_string(),
                            "--port",
                            &app_port.to_string(),
                            "--version",
                            version,
                        ],
                    )?;
                    running.procs.push(app);
                    app_config(&host, coordinators, &host_dir, listen)
                }
            };
            if host.role == Role::Gateway {
                fleet.hosts.push(running);
                continue;
            }
            let file = host_dir.join("agent.toml");
            std::fs::write(&file, agent_toml)
                .with_context(|| format!("writing {}", file.display()))?;
            if host.role != Role::Balancer {
                running.procs.push(spawn_agent(&fleet.serin, &host_dir)?);
            }
            fleet.hosts.push(running);
        }
        for host in &mut fleet.hosts {
            if matches!(host.plan.role, Role::App { .. } | Role::Gateway) {
                wait_answering(host).await?;
            }
        }
        Ok(fleet)
    }

    /// Starts the balancer host's agent. Started after the app hosts' agents connected, as on a
    /// fleet whose app hosts are up first: its first desired state then carries every server.
    pub async fn start_balancer(&mut self) -> anyhow::Result<()> {
        let serin = self.serin.clone();
        let host = self
            .hosts
            .iter_mut()
            .find(|h| h.plan.role == Role::Balancer)
            .context("the demo fleet has no balancer host")?;
        if host.procs.is_empty() {
            host.procs.push(spawn_agent(&serin, &host.dir)?);
        }
        Ok(())
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> anyhow::Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.plan.name == name)
            .with_context(|| format!("no host {name} in the demo fleet"))
    }

    /// Kills every process of host `name` at once (SIGKILL), as a machine that dies, and
    /// reaps them.
    pub async fn kill_host(&mut self, name: &str) -> anyhow::Result<()> {
        let host = self
            .hosts
            .iter_mut()
            .find(|h| h.plan.name == name)
            .with_context(|| format!("no host {name} in the demo fleet"))?;
        host.killed = true;
        for p in &mut host.procs {
            p.child
                .start_kill()
                .with_context(|| format!("killing {}'s {}", name, p.name))?;
        }
        for p in &mut host.procs {
            let _ = p.child.wait().await;
        }
        Ok(())
    }

    /// Processes that exited though nobody killed them: `host/process: status`.
    pub fn exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for host in self.hosts.iter_mut().filter(|h| !h.killed) {
            for p in &mut host.procs {
                if let Ok(Some(status)) = p.child.try_wait() {
                    out.push(format!(
                        "{}/{} exited ({status}); see {}",
                        host.plan.name,
                        p.name,
                        p.log.display()
                    ));
                }
            }
        }
        out
    }

    /// Where the agents' and apps' logs are.
    pub fn log_dirs(&self) -> Vec<&Path> {
        self.hosts.iter().map(|h| h.dir.as_path()).collect()
    }

    /// Kills and reaps every process and stops nginx.
    pub async fn shutdown(mut self) {
        for host in &mut self.hosts {
            for p in &mut host.procs {
                let _ = p.child.start_kill();
            }
        }
        for host in &mut self.hosts {
            for p in &mut host.procs {
                let _ = tokio::time::timeout(Duration::from_secs(5), p.child.wait()).await;
            }
        }
        if let Some(nginx) = self.nginx.take() {
            nginx.stop().await;
        }
        // The workers serin's command driver started are no children of the demo: their
        // start template left a pid file each.
        stop_workers(&self.workers_dir);
        stop_workers(&self.bots_dir);
    }

    /// Where the bots' pid files and logs go (the bot strategy's templates name it).
    pub fn bots_dir(&self) -> &Path {
        &self.bots_dir
    }

    /// The demo gateway's base URL.
    pub fn gateway_url(&self) -> anyhow::Result<String> {
        let host = self.host("gateway")?;
        Ok(format!("http://{}", host.listen[0]))
    }

    /// Where the workers' pid files and logs go (the worker strategy's templates name it).
    pub fn workers_dir(&self) -> &Path {
        &self.workers_dir
    }

    /// The serin binary the demo runs (the worker strategy's start template names it).
    pub fn serin(&self) -> &Path {
        &self.serin
    }
}

/// Kills every worker whose pid file is in `dir` (SIGTERM, then waits up to 2 s each).
fn stop_workers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pid") {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let alive = || Path::new(&format!("/proc/{pid}")).exists();
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(2);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// Spawns the agent of the host whose directory is `dir`, from `dir/agent.toml`.
fn spawn_agent(serin: &Path, dir: &Path) -> anyhow::Result<Proc> {
    let config = dir.join("agent.toml");
    spawn(
        serin,
        dir,
        "agent",
        &["agent", "run", "--config", &config.display().to_string()],
    )
}

/// Spawns `serin ARGS` in `dir`, output to `dir/<name>.log`, killed when dropped.
fn spawn(serin: &Path, dir: &Path, name: &'static str, args: &[&str]) -> anyhow::Result<Proc> {
    let log = dir.join(format!("{name}.log"));
    let file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = file.try_clone().context("duplicating a log file handle")?;
    let child = Command::new(serin)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .env_remove("SERIN_COORDINATOR")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `{} {}`", serin.display(), args.join(" ")))?;
    Ok(Proc { name, log, child })
}

/// Waits (up to 20 s) until the host's demo app answers `/healthz`.
async fn wait_answering(host: &mut Host) -> anyhow::Result<()> {
    let url = format!("http://{}/healthz", host.listen[0]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if http
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        for p in &mut host.procs {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!(
                    "{}'s {} exited ({status}) before answering: {}",
                    host.plan.name,
                    p.name,
                    last_lines(&p.log, 5)
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{}'s demo app did not answer {url} within 20 s",
                host.plan.name
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `n` lines of a log file, on one line.
fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn common_config(host: &HostPlan, coordinators: &[SocketAddr], dir: &Path) -> String {
    let coordinators: Vec<String> = coordinators
        .iter()
        .map(|c| format!("\"http://{c}\""))
        .collect();
    format!(
        "# Written by `serin demo`: the agent of host {name} ({address}).\n\
         name = \"{name}\"\n\
         coordinators = [{coordinators}]\n\
         interval = \"{interval}s\"\n\
         data_dir = \"{data}\"\n\n\
         [labels]\n\
         host_address = \"{address}\"\n",
        name = host.name,
        address = host.address,
        coordinators = coordinators.join(", "),
        interval = AGENT_INTERVAL.as_secs(),
        data = dir.join("agent-data").display(),
    )
}

/// A worker host's agent: one managed instance of [`WORKER_SERVICE`], judged on the worker's
/// own counters (it has no HTTP traffic).
fn worker_config(
    host: &HostPlan,
    coordinators: &[SocketAddr],
    dir: &Path,
    listen: SocketAddr,
) -> String {
    format!(
        "{}\n[[instances]]\nname = \"{name}\"\nservice = \"{WORKER_SERVICE}\"\nvariant = \"stable\"\naddress = \"{listen}\"\nmetrics_url = \"http://{listen}/metrics\"\nmanaged = true\nmetrics = {{ requests = \"worker_jobs_processed_total\", errors = \"worker_jobs_failed_total\", latency = \"worker_job_duration_seconds\" }}\n",
        common_config(host, coordinators, dir),
        name = host.name,
    )
}

/// A bot host's agent: one managed instance of [`BOT_SERVICE`] declared `side`, judged on
/// the bot's own event counters.
fn bot_config(
    host: &HostPlan,
    coordinators: &[SocketAddr],
    dir: &Path,
    listen: SocketAddr,
    side: Side,
) -> String {
    let variant = match side {
        Side::Stable => "stable",
        Side::Canary => "canary",
    };
    format!(
        "{}\n[[instances]]\nname = \"{name}\"\nservice = \"{BOT_SERVICE}\"\nvariant = \"{variant}\"\naddress = \"{listen}\"\nmetrics_url = \"http://{listen}/metrics\"\nmanaged = true\nmetrics = {{ requests = \"bot_events_total\", errors = \"bot_events_failed_total\", latency = \"bot_event_duration_seconds\" }}\n",
        common_config(host, coordinators, dir),
        name = host.name,
    )
}

/// An app host's agent: its one instance, nothing else.
fn app_config(
    host: &HostPlan,
    coordinators: &[SocketAddr],
    dir: &Path,
    listen: SocketAddr,
) -> String {
    let Role::App { service, side, .. } = &host.role else {
        unreachable!("app_config is called for app hosts only")
    };
    let variant = match side {
        Side::Stable => "stable",
        Side::Canary => "canary",
    };
    format!(
        "{}\n[[instances]]\nname = \"{name}\"\nservice = \"{service}\"\nvariant = \"{variant}\"\naddress = \"{listen}\"\nmetrics_url = \"http://{listen}/metrics\"\n",
        common_config(host, coordinators, dir),
        name = host.name,
    )
}

/// The balancer's agent: `[nginx]` carrying every service, no instances.
fn balancer_config(
    host: &HostPlan,
    coordinators: &[SocketAddr],
    dir: &Path,
    nginx: &NginxSettings,
) -> String {
    let mut text = format!(
        "{}\n# No [[instances]]: the upstream servers come from the coordinator's inventory.\n[nginx]\nbinary = \"{}\"\nconfig = \"{}\"\nsite = \"{}\"\n",
        common_config(host, coordinators, dir),
        nginx.binary.display(),
        nginx.config.display(),
        nginx.site.display(),
    );
    if let Some(prefix) = &nginx.prefix {
        text.push_str(&format!("prefix = \"{}\"\n", prefix.display()));
    }
    for s in &nginx.services {
        text.push_str(&format!(
            "\n[[nginx.services]]\nservice = \"{}\"\nlisten = \"{}\"\n",
            s.service, s.listen
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serin_agent::config::AgentConfig;

    #[test]
    fn the_plan_has_one_balancer_and_two_stable_and_one_canary_host_per_service() {
        let plan = plan();
        assert_eq!(plan.iter().filter(|h| h.role == Role::Balancer).count(), 1);
        for service in SERVICES {
            let sides: Vec<Side> = plan
                .iter()
                .filter_map(|h| match h.role {
                    Role::App {
                        service: s, side, ..
                    } if s == service => Some(side),
                    _ => None,
                })
                .collect();
            assert_eq!(
                sides,
                [Side::Stable, Side::Stable, Side::Canary],
                "{service}"
            );
        }
        let mut addresses: Vec<Ipv4Addr> = plan.iter().map(|h| h.address).collect();
        addresses.sort();
        addresses.dedup();
        assert_eq!(
            addresses.len(),
            plan.len(),
            "every host has its own address"
        );
        assert!(addresses.iter().all(|a| a.is_loopback()));
        assert_eq!(version_of("api", Side::Canary), "v2.4.0");
        assert_eq!(version_of("nope", Side::Canary), "?");
    }

    #[test]
    fn an_app_hosts_config_is_valid_and_declares_only_its_own_instance() {
        let host = &plan()[1];
        let listen = SocketAddr::from((host.address, 24_000));
        let text = app_config(
            host,
            &["127.0.0.1:7000".parse().expect("addr")],
            Path::new("/tmp/demo/web-1"),
            listen,
        );
        let config = AgentConfig::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.name, "web-1");
        assert_eq!(config.interval, AGENT_INTERVAL);
        assert!(config.nginx.is_none());
        assert_eq!(config.instances.len(), 1);
        assert_eq!(config.instances[0].address, "127.0.1.11:24000");
        assert_eq!(
            config.instances[0].metrics_url,
            "http://127.0.1.11:24000/metrics"
        );
    }

    #[test]
    fn the_balancers_config_is_valid_carries_both_services_and_declares_no_instance() {
        let host = &plan()[0];
        let settings = NginxSettings {
            binary: "/usr/sbin/nginx".into(),
            config: "/tmp/demo/lb/nginx/nginx.conf".into(),
            prefix: Some("/tmp/demo/lb/nginx".into()),
            site: "/tmp/demo/lb/nginx/site.conf".into(),
            confirm_timeout: Duration::from_secs(5),
            services: SERVICES
                .iter()
                .zip([24_001, 24_002])
                .map(|(s, port)| BalancedService {
                    service: (*s).into(),
                    listen: format!("127.0.1.1:{port}"),
                })
                .collect(),
        };
        let text = balancer_config(
            host,
            &["127.0.0.1:7000".parse().expect("addr")],
            Path::new("/tmp/demo/lb"),
            &settings,
        );
        let config = AgentConfig::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(config.instances.is_empty());
        let nginx = config.nginx.expect("an [nginx] table");
        let carried: Vec<&str> = nginx.services.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(carried, SERVICES);
    }
}
