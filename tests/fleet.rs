//! A fleet on one machine, one host per network namespace (tests/common/netns.rs): the harness
//! itself (addresses, cut, kill, cleanup, sweep) and a smoke test of serin on it, a coordinator
//! in the root namespace and an agent per host that the coordinator sees come, go and return.
//!
//! Needs root and iproute2 (CI runs as root and installs it); without them every test here
//! fails with the harness's message naming what is missing.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::netns::{
    APP_PORT, Fleet, Host, missing_requirements, owner_pid, spawn_coordinator, spawn_demo_app,
    start_app_host,
};
use common::{Proc, cli_at, describe, free_port, fresh_client, get_version, wait_for};
use serde_json::Value;

/// The coordinator's `remove_unhealthy_after` in these tests.
const REMOVE_AFTER_SECS: u64 = 3;

fn new_fleet(n: usize) -> Fleet {
    Fleet::new(n).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Every fleet namespace and root-namespace link that exists now.
fn existing_resources() -> Vec<String> {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running ip {}: {e}", args.join(" ")));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut names: Vec<String> = run(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    names.extend(
        run(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned()),
    );
    names.retain(|n| owner_pid(n).is_some());
    names
}

/// One HTTP GET from inside `from`'s namespace to `to`, with bash's /dev/tcp (no client tool
/// needed); true when the demo app answered.
async fn host_reaches(from: &Host, to: Ipv4Addr) -> bool {
    let script = format!(
        "exec 3<>/dev/tcp/{to}/{APP_PORT} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let out = from
        .exec(
            "timeout",
            &["2", "bash", "-c", &script],
            Duration::from_secs(10),
        )
        .await;
    out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("HTTP/1.")
}

/// True when the demo app at `addr` answers a GET from the root namespace within 1 s.
async fn root_reaches(addr: Ipv4Addr) -> bool {
    let client = fresh_client(Duration::from_secs(1));
    matches!(
        get_version(&client, &format!("http://{addr}:{APP_PORT}/")).await,
        Ok((200, _))
    )
}

#[test]
fn the_missing_requirement_is_named_root_or_ip_or_both() {
    let ip = Path::new("/usr/sbin/ip");
    assert_eq!(missing_requirements(0, Some(ip)), None);
    let not_root = missing_requirements(1000, Some(ip)).expect("uid 1000 is not root");
    assert!(
        not_root.contains("root") && not_root.contains("uid 1000") && !not_root.contains("`ip`"),
        "{not_root}"
    );
    let no_ip = missing_requirements(0, None).expect("no ip command");
    assert!(
        no_ip.contains("`ip`") && no_ip.contains("iproute2") && !no_ip.contains("uid"),
        "{no_ip}"
    );
    let both = missing_requirements(1000, None).expect("neither");
    assert!(
        both.contains("uid 1000") && both.contains("iproute2"),
        "{both}"
    );
}

/// Not the test itself: run by
/// [`a_fleet_started_by_a_user_other_than_root_fails_saying_it_needs_root`] as uid 65534, it
/// prints what `Fleet::new` said. As root it must succeed.
#[test]
#[ignore = "helper, run as another user by the non-root test"]
fn helper_fleet_new_as_the_current_user() {
    match Fleet::new(1) {
        Ok(_) => assert_eq!(
            rustix::process::geteuid().as_raw(),
            0,
            "only root gets a fleet"
        ),
        Err(e) => println!("FLEET ERROR: {e:#}"),
    }
}

/// The harness's refusal is real, not only its message: the same test binary, run as uid
/// 65534, gets an error naming root and the uid instead of a fleet.
#[test]
fn a_fleet_started_by_a_user_other_than_root_fails_saying_it_needs_root() {
    // A copy in a directory every user can enter: the checkout (and so target/) may live
    // under a directory uid 65534 cannot traverse, such as /root.
    use std::os::unix::fs::PermissionsExt;
    let copy_dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::set_permissions(copy_dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod 755 the copy's directory");
    let exe = copy_dir.path().join("fleet-test");
    std::fs::copy(
        std::env::current_exe().expect("the test binary's path"),
        &exe,
    )
    .expect("copying the test binary");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))
        .expect("chmod 755 the copy");
    let out = std::process::Command::new("setpriv")
        .current_dir("/")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "helper_fleet_new_as_the_current_user",
            "--ignored",
            "--nocapture",
        ])
        .output()
        .expect("running setpriv (util-linux)");
    let text = describe(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("FLEET ERROR: a test fleet of network namespaces needs root")
            && text.contains("uid 65534"),
        "{text}"
    );
}

#[test]
fn only_fleet_resource_names_yield_the_pid_the_sweep_checks() {
    assert_eq!(owner_pid("serin-4242-0-sw"), Some(4242));
    assert_eq!(owner_pid("serin-4242-3-h12"), Some(4242));
    assert_eq!(owner_pid("sn4242-3"), Some(4242));
    for other in [
        "serin-4242-0",
        "serin-4242-0-h",
        "serin-4242-0-x1",
        "serin-abc-0-sw",
        "serin-4242-0-sw-1",
        "sn4242",
        "snap0",
        "eth0",
        "docker0",
        "sn12-3x",
    ] {
        assert_eq!(owner_pid(other), None, "{other}");
    }
}

/// The harness's promise: every host is reachable from the root namespace and from the other
/// hosts (through a bridge that no root-namespace firewall filters), a cut host from nowhere
/// until healed, and a killed host's processes are gone while its network stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_reach_the_root_namespace_and_each_other_until_one_is_cut_or_killed() {
    let mut fleet = new_fleet(3);
    for k in 1..=3 {
        spawn_demo_app(fleet.host_mut(k), &format!("v{k}"));
    }
    let addrs: Vec<Ipv4Addr> = fleet.hosts().iter().map(Host::addr).collect();
    for &addr in &addrs {
        wait_for(
            Duration::from_secs(15),
            &format!("the demo app at {addr} to answer the root namespace"),
            async || root_reaches(addr).await,
            || fleet.diagnostics(),
        )
        .await;
    }
    assert!(
        host_reaches(fleet.host(1), addrs[1]).await,
        "h1 cannot reach h2\n{}",
        fleet.diagnostics()
    );
    assert!(
        host_reaches(fleet.host(3), addrs[0]).await,
        "h3 cannot reach h1\n{}",
        fleet.diagnostics()
    );

    fleet.host_mut(2).cut().expect("cutting h2");
    assert!(
        !root_reaches(addrs[1]).await,
        "the root namespace reaches cut h2"
    );
    assert!(
        !host_reaches(fleet.host(1), addrs[1]).await,
        "h1 reaches cut h2"
    );
    assert!(
        fleet.host_mut(2).proc("app").alive(),
        "cutting h2 must not stop its processes"
    );
    fleet.host_mut(2).heal().expect("healing h2");
    wait_for(
        Duration::from_secs(10),
        "healed h2 to answer the root namespace again",
        async || root_reaches(addrs[1]).await,
        || fleet.diagnostics(),
    )
    .await;
    assert!(
        host_reaches(fleet.host(1), addrs[1]).await,
        "h1 cannot reach healed h2"
    );

    // A daemon that left its parent: kill_all must find it by namespace, not by parentage.
    let out = fleet
        .host(3)
        .exec(
            "bash",
            &["-c", "sleep 600 >/dev/null 2>&1 & disown; echo $!"],
            Duration::from_secs(5),
        )
        .await;
    let orphan: i32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no pid from the orphan's shell: {}", describe(&out)));
    assert!(
        fleet
            .host(3)
            .pids()
            .expect("listing h3's pids")
            .contains(&orphan)
    );
    fleet.host_mut(3).kill_all().expect("killing h3");
    assert_eq!(
        fleet.host(3).pids().expect("listing h3's pids"),
        Vec::<i32>::new()
    );
    assert!(
        !fleet.host_mut(3).proc("app").alive(),
        "h3's demo app survived kill_all"
    );
    assert!(!root_reaches(addrs[2]).await, "killed h3 still answers");
    assert!(root_reaches(addrs[0]).await, "killing h3 affected h1");
}

/// Dropping a fleet deletes everything it made, also when the test panics; prints how long
/// building and tearing down four hosts took.
#[test]
fn a_dropped_fleet_leaves_nothing_behind_even_when_the_test_panicked() {
    let start = Instant::now();
    let fleet = new_fleet(4);
    let built = start.elapsed();
    let names = fleet.resource_names();
    assert_eq!(names.len(), 2 + 4);
    let before = existing_resources();
    for name in &names {
        assert!(before.contains(name), "{name} was not created: {before:?}");
    }
    let dropped = Instant::now();
    drop(fleet);
    let torn_down = dropped.elapsed();
    let after = existing_resources();
    let left: Vec<_> = names.iter().filter(|n| after.contains(n)).collect();
    assert!(left.is_empty(), "left behind by drop: {left:?}");
    eprintln!("Fleet::new(4): {built:?}, teardown: {torn_down:?}");

    let mut panicked_names = Vec::new();
    let mut kept_dir = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let fleet = new_fleet(2);
        panicked_names = fleet.resource_names();
        kept_dir = Some(fleet.dir().to_owned());
        panic!("a test fails while its fleet is alive");
    }));
    assert!(result.is_err());
    let kept_dir = kept_dir.expect("the fleet was built");
    assert!(
        kept_dir.is_dir(),
        "a panicking test's fleet directory is kept for inspection"
    );
    std::fs::remove_dir_all(&kept_dir).expect("removing the kept directory");
    let after = existing_resources();
    let left: Vec<_> = panicked_names
        .iter()
        .filter(|n| after.contains(n))
        .collect();
    assert!(
        !panicked_names.is_empty() && left.is_empty(),
        "left behind by a panic: {left:?}"
    );
}

/// A test process killed before its fleet's drop leaves namespaces and a veth behind; the next
/// `Fleet::new` deletes them because their pid no longer exists, and leaves live ones alone.
#[test]
fn a_new_fleet_deletes_the_leftovers_of_a_dead_test_process_only() {
    let mut exited = std::process::Command::new("true")
        .spawn()
        .expect("spawning true");
    let dead = exited.id();
    exited.wait().expect("waiting for true");
    assert!(!Path::new(&format!("/proc/{dead}")).exists());
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            describe(&out)
        );
    };
    let stale_ns = format!("serin-{dead}-0-h1");
    let stale_link = format!("sn{dead}-0");
    ip(&["netns", "add", &stale_ns]);
    ip(&[
        "link",
        "add",
        &stale_link,
        "type",
        "veth",
        "peer",
        "name",
        &format!("sn{dead}-0p"),
    ]);
    let live = new_fleet(1);
    let after = existing_resources();
    assert!(
        !after.contains(&stale_ns),
        "stale namespace kept: {after:?}"
    );
    assert!(!after.contains(&stale_link), "stale veth kept: {after:?}");
    let second = new_fleet(1);
    let after = existing_resources();
    for name in live.resource_names() {
        assert!(after.contains(&name), "a live fleet's {name} was swept");
    }
    assert_ne!(
        live.subnet(),
        second.subnet(),
        "two live fleets share a subnet"
    );
}

// ---------------------------------------------------------------------------------------------
// serin on the fleet
// ---------------------------------------------------------------------------------------------

/// The balancer host of [`Serin::start_balancer`].
struct Balancer {
    /// Where clients send requests for `web`.
    url: String,
    /// The site file the agent renders.
    site: std::path::PathBuf,
    nginx: serin_agent::nginx::LocalNginx,
    _agent: Proc,
}

impl Balancer {
    async fn stop(self) {
        let _ = self.nginx.stop().await;
    }
}

/// A coordinator in the root namespace on the fleet's gateway address, and on each host a
/// demo app and an agent that declares (and scrapes) only that host's instance.
struct Serin {
    fleet: Fleet,
    coordinator: Proc,
    coordinator_addr: SocketAddr,
}

impl Serin {
    async fn start(hosts: usize) -> Serin {
        let mut fleet = new_fleet(hosts);
        let (coordinator, coordinator_addr) = spawn_coordinator(&fleet, REMOVE_AFTER_SECS);
        for k in 1..=hosts {
            start_app_host(fleet.host_mut(k), k == hosts, coordinator_addr);
        }
        Serin {
            fleet,
            coordinator,
            coordinator_addr,
        }
    }

    fn diagnostics(&self) -> String {
        format!(
            "{}--- coordinator ({})\n{}",
            self.fleet.diagnostics(),
            self.coordinator.log.display(),
            common::tail(&self.coordinator.log, 40)
        )
    }

    /// `serin agent list --json` from the root namespace, by agent name; `None` when the CLI
    /// failed.
    async fn agents(&self) -> Option<Vec<Value>> {
        let out = cli_at(self.coordinator_addr, &["agent", "list", "--json"]).await;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()?
            .as_array()
            .cloned()
    }

    /// Each listed agent's `last_report_ms` (0 before its first report).
    async fn last_reports(&self) -> std::collections::BTreeMap<String, i64> {
        let agents = self
            .agents()
            .await
            .unwrap_or_else(|| panic!("`serin agent list --json` failed\n{}", self.diagnostics()));
        agents
            .iter()
            .map(|a| {
                (
                    a["name"].as_str().unwrap_or("?").to_owned(),
                    a["last_report_ms"].as_i64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Whether the coordinator lists agent `name` as connected (`None`: not listed).
    async fn connected(&self, name: &str) -> Option<bool> {
        self.agents()
            .await?
            .into_iter()
            .find(|a| a["name"] == name)
            .and_then(|a| a["connected"].as_bool())
    }

    async fn wait_connected(&self, name: &str, connected: bool, timeout: Duration) -> Duration {
        let start = Instant::now();
        wait_for(
            timeout,
            &format!(
                "the coordinator to list agent {name} as {}",
                if connected {
                    "connected"
                } else {
                    "disconnected"
                }
            ),
            async || self.connected(name).await == Some(connected),
            || self.diagnostics(),
        )
        .await;
        start.elapsed()
    }

    /// The balancer host: the root namespace, with a private nginx carrying `web` and an
    /// agent that declares no instances; returns once nginx serves the stable version from
    /// every app host's instance, as fed by the inventory.
    async fn start_balancer(&self) -> Balancer {
        self.start_balancer_named("lb").await
    }

    /// [`Serin::start_balancer`] with agent `name`, its files under `name`-prefixed paths.
    async fn start_balancer_named(&self, name: &str) -> Balancer {
        let nginx_binary = serin_agent::nginx::find_nginx().expect("nginx is installed");
        let nginx = serin_agent::nginx::LocalNginx::start(
            &self.fleet.dir().join(format!("{name}-nginx")),
            &nginx_binary,
        )
        .await
        .expect("nginx starts");
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let settings = nginx.settings(vec![serin_agent::nginx::BalancedService {
            service: "web".into(),
            listen: listen.to_string(),
        }]);
        let lb_toml = self.fleet.dir().join(format!("{name}.toml"));
        std::fs::write(
            &lb_toml,
            format!(
                "name = \"{name}\"\ncoordinators = [\"http://{}\"]\ninterval = \"500ms\"\ndata_dir = \"{}\"\n\n[nginx]\nbinary = \"{}\"\nconfig = \"{}\"\nprefix = \"{}\"\nsite = \"{}\"\n\n[[nginx.services]]\nservice = \"web\"\nlisten = \"{listen}\"\n",
                self.coordinator_addr,
                self.fleet.dir().join(format!("{name}-data")).display(),
                settings.binary.display(),
                settings.config.display(),
                settings.prefix.as_deref().expect("a prefix").display(),
                settings.site.display(),
            ),
        )
        .expect("writing the balancer's agent.toml");
        let agent = Proc::spawn(
            &format!("{name}-agent"),
            self.fleet.dir(),
            &[
                "agent".into(),
                "run".into(),
                "--config".into(),
                lb_toml.display().to_string(),
            ],
        );
        let balancer = Balancer {
            url: format!("http://{listen}/"),
            site: settings.site.clone(),
            nginx,
            _agent: agent,
        };
        let hosts = self.fleet.hosts().len();
        let addresses: Vec<String> = (1..=hosts)
            .map(|k| format!("{}:{APP_PORT}", self.fleet.host(k).addr()))
            .collect();
        wait_for(
            Duration::from_secs(30),
            "the balancer to route to the app hosts' instances from the inventory",
            async || {
                let text = std::fs::read_to_string(&balancer.site).unwrap_or_default();
                addresses.iter().all(|a| text.contains(a.as_str()))
            },
            || self.diagnostics(),
        )
        .await;
        let client = fresh_client(Duration::from_secs(2));
        let url = balancer.url.clone();
        wait_for(
            Duration::from_secs(20),
            "nginx to serve the stable version from the app hosts (old workers drained)",
            async || {
                matches!(get_version(&client, &url).await, Ok((200, v)) if v == "v1")
                    && common::burst(&url, 20, 2).await.of("v1") == 20
            },
            || self.diagnostics(),
        )
        .await;
        balancer
    }

    async fn wait_all_connected(&self, hosts: usize) {
        wait_for(
            Duration::from_secs(30),
            &format!("all {hosts} agents to connect, each with only its own instance"),
            async || {
                let Some(agents) = self.agents().await else {
                    return false;
                };
                (1..=hosts).all(|k| {
                    let host = self.fleet.host(k);
                    let own = format!("{}:{APP_PORT}", host.addr());
                    agents.iter().any(|a| {
                        a["name"] == host.name()
                            && a["connected"] == true
                            && a["instances"]
                                .as_array()
                                .is_some_and(|i| i.len() == 1 && i[0]["address"] == own.as_str())
                    })
                })
            },
            || self.diagnostics(),
        )
        .await;
    }
}

/// Three hosts, each with its own agent scraping only its own instance, connect to a
/// coordinator in the root namespace; a host that dies shows its agent disconnected while the
/// others stay connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_three_hosts_connect_and_a_killed_host_shows_disconnected() {
    let mut serin = Serin::start(3).await;
    serin.wait_all_connected(3).await;
    serin.fleet.host_mut(3).kill_all().expect("killing h3");
    let took = serin
        .wait_connected("h3", false, Duration::from_secs(10))
        .await;
    eprintln!("killed h3 listed disconnected after {took:?}");
    for name in ["h1", "h2"] {
        assert_eq!(
            serin.connected(name).await,
            Some(true),
            "{name} disconnected when h3 died\n{}",
            serin.diagnostics()
        );
    }
}

/// A host cut off from the network while its agent runs on is listed disconnected within a
/// bounded time (the coordinator's HTTP/2 keepalive: a 5 s quiet interval plus a 10 s ping
/// timeout), and connected again once healed. Before the server had a keepalive the dead
/// session's stream never ended and the agent stayed listed as connected for as long as the
/// partition lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_host_shows_disconnected_and_reconnects_when_healed() {
    let mut serin = Serin::start(3).await;
    serin.wait_all_connected(3).await;
    serin.fleet.host_mut(2).cut().expect("cutting h2");
    let took = serin
        .wait_connected("h2", false, Duration::from_secs(45))
        .await;
    eprintln!("cut h2 listed disconnected after {took:?}");
    assert!(
        serin.fleet.host_mut(2).proc("agent").alive(),
        "h2's agent exited while cut off\n{}",
        serin.diagnostics()
    );
    serin.fleet.host_mut(2).heal().expect("healing h2");
    let took = serin
        .wait_connected("h2", true, Duration::from_secs(30))
        .await;
    eprintln!("healed h2 listed connected again after {took:?}");
    serin.wait_all_connected(3).await;
}

/// What a partition does today: a cut-off host's reports stop reaching the coordinator while
/// the others' go on; its agent notices the dead session by itself, and once the host is
/// healed it reconnects and its reports resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_hosts_reports_stop_and_its_agent_reconnects_once_healed() {
    let mut serin = Serin::start(3).await;
    serin.wait_all_connected(3).await;
    serin.fleet.host_mut(2).cut().expect("cutting h2");
    let cut_at = Instant::now();
    // A report already on the wire may still land; after that, nothing from h2.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let first = serin.last_reports().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = serin.last_reports().await;
    assert_eq!(
        first["h2"],
        second["h2"],
        "reports from cut h2 still arrive\n{}",
        serin.diagnostics()
    );
    assert!(
        second["h1"] > first["h1"] && second["h3"] > first["h3"],
        "reports from h1 and h3 stopped while only h2 was cut: {first:?} then {second:?}"
    );
    let agent_log = serin.fleet.host_mut(2).proc("agent").log.clone();
    let ended = |log: &Path| common::tail(log, 1000).contains("coordinator session ended");
    wait_for(
        Duration::from_secs(40),
        "h2's agent to notice that its session is dead",
        async || ended(&agent_log),
        || serin.diagnostics(),
    )
    .await;
    eprintln!("cut h2's agent noticed after {:?}", cut_at.elapsed());
    serin.fleet.host_mut(2).heal().expect("healing h2");
    let healed_at = Instant::now();
    wait_for(
        Duration::from_secs(30),
        "healed h2's reports to reach the coordinator again",
        async || serin.last_reports().await.get("h2") > second.get("h2"),
        || serin.diagnostics(),
    )
    .await;
    eprintln!("healed h2 reported again after {:?}", healed_at.elapsed());
    serin.wait_all_connected(3).await;
    assert!(
        serin.fleet.host_mut(2).proc("agent").alive(),
        "h2's agent exited\n{}",
        serin.diagnostics()
    );
}

/// The fleet shape serin is for: a balancer (nginx and an agent that declares only the service
/// it carries, no instances) in front of three app hosts, each in its own network namespace with
/// an agent scraping only its own instance. The coordinator feeds the balancer the upstream
/// servers from its inventory: traffic reaches the app hosts, a dead stable host leaves the
/// upstream after `remove_unhealthy_after` with no failed request afterwards, the canary's
/// share through the balancer lies within a binomial tolerance, and a good canary is promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_fed_by_the_inventory_routes_to_the_app_hosts_drops_a_dead_one_and_promotes() {
    let mut serin = Serin::start(3).await;
    serin.wait_all_connected(3).await;
    let lb = serin.start_balancer().await;
    let (url, site) = (lb.url.clone(), lb.site.clone());
    let h1 = format!("{}:{APP_PORT}", serin.fleet.host(1).addr());
    let h2 = format!("{}:{APP_PORT}", serin.fleet.host(2).addr());
    let h3 = format!("{}:{APP_PORT}", serin.fleet.host(3).addr());
    let site_has = |addresses: &[&str], absent: &[&str]| {
        let text = std::fs::read_to_string(&site).unwrap_or_default();
        addresses.iter().all(|a| text.contains(a)) && absent.iter().all(|a| !text.contains(a))
    };
    let before = common::burst(&url, 100, 4).await;
    assert_eq!(before.of("v1"), 100, "{before:?}\n{}", serin.diagnostics());

    // A stable host dies: after the grace it leaves the upstream, and traffic keeps flowing.
    serin.fleet.host_mut(2).kill_all().expect("killing h2");
    let killed = Instant::now();
    wait_for(
        Duration::from_secs(30),
        "the dead host to leave the balancer's upstream",
        async || site_has(&[&h1, &h3], &[&h2]),
        || serin.diagnostics(),
    )
    .await;
    eprintln!("h2 left the upstream {:?} after it died", killed.elapsed());
    // The fleet view says so: h2's instance out of the upstream, why, and the balancer.
    let out = cli_at(
        serin.coordinator_addr,
        &["agent", "list", "--services", "--json"],
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let fleet: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let web = fleet
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "web"))
        .unwrap_or_else(|| panic!("no web service in {fleet:#}"));
    assert_eq!(web["from_inventory"], true, "{web:#}");
    let h2_instance = web["instances"]
        .as_array()
        .and_then(|i| i.iter().find(|i| i["address"] == h2.as_str()))
        .unwrap_or_else(|| panic!("h2's instance not listed: {web:#}"));
    assert_eq!(h2_instance["in_upstream"], false, "{web:#}");
    assert_eq!(h2_instance["connected"], false, "{web:#}");
    assert!(
        web["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|e| e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("removed") && r.contains(h2.as_str())))),
        "{web:#}"
    );
    assert_eq!(web["balancers"][0]["agent"], "lb", "{web:#}");
    let after = common::burst(&url, 200, 4).await;
    assert_eq!(after.of("v1"), 200, "{after:?}\n{}", serin.diagnostics());

    // A good canary at 50%, then 100%.
    let strategy = serin.fleet.dir().join("strategy.toml");
    std::fs::write(
        &strategy,
        "[[stages]]\nweight = 50\nmin_duration = \"4s\"\n\n[[stages]]\nweight = 100\nmin_duration = \"2s\"\n\n[[checks]]\nname = \"errors\"\nmetric = \"error_rate\"\nmax = 0.05\nmin_requests = 5\n",
    )
    .expect("writing strategy.toml");
    let id = common::start_web_rollout(serin.coordinator_addr, &strategy).await;
    wait_for(
        Duration::from_secs(20),
        "the balancer to send the canary half the traffic",
        async || {
            let text = std::fs::read_to_string(&site).unwrap_or_default();
            text.contains(&h3) && text.contains("weight=")
        },
        || serin.diagnostics(),
    )
    .await;
    // Let the reload settle: old workers still at 0% would bias the measurement.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let half = common::burst(&url, 400, 4).await;
    let canary = half.of("v2") as f64;
    // 50% of 400: mean 200, sd 10; 4.5 sd either way.
    assert!(
        (canary - 200.0).abs() <= 45.0 && half.answered() == 400,
        "canary share through the balancer: {half:?}\n{}",
        serin.diagnostics()
    );
    wait_for(
        Duration::from_secs(40),
        "the good canary to be promoted",
        async || {
            // Traffic for the checks of each stage.
            common::burst(&url, 20, 2).await;
            let out = cli_at(
                serin.coordinator_addr,
                &["rollout", "status", &id, "--json"],
            )
            .await;
            serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| v["state"] == "promoted")
        },
        || serin.diagnostics(),
    )
    .await;
    lb.stop().await;
}

/// The coordinator counts what the app hosts served, from each host's own agent: with one
/// canary host behind the balancer, the live per-variant request counts of a stage equal what
/// the load generator received from each version (the traffic is sent in a quiet gap, so no
/// request straddles the stage's start or a report interval's edge), the split lies within a
/// binomial tolerance, and once the canary starts failing the critical trigger rolls it back
/// and the balancer stops sending it anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_canary_host_is_rolled_back_and_the_coordinator_counted_exactly_what_was_served() {
    let serin = Serin::start(3).await;
    serin.wait_all_connected(3).await;
    let lb = serin.start_balancer().await;
    let canary_addr = format!("{}:{APP_PORT}", serin.fleet.host(3).addr());
    let strategy = serin.fleet.dir().join("strategy.toml");
    // A long first stage: the test decides when it ends (by breaking the canary).
    let stages = [common::StageSpec {
        weight: 25,
        min_duration: "10m",
        manual_gate: false,
    }];
    std::fs::write(&strategy, common::strategy(&stages, "")).expect("writing strategy.toml");
    let id = common::start_web_rollout(serin.coordinator_addr, &strategy).await;
    let status = async || {
        let out = cli_at(
            serin.coordinator_addr,
            &["rollout", "status", &id, "--json"],
        )
        .await;
        assert!(out.status.success(), "{}", describe(&out));
        serde_json::from_slice::<Value>(&out.stdout).expect("status JSON")
    };
    wait_for(
        Duration::from_secs(20),
        "the balancer to send the canary host its share",
        async || {
            let text = std::fs::read_to_string(&lb.site).unwrap_or_default();
            text.contains(&canary_addr) && text.contains("weight=")
        },
        || serin.diagnostics(),
    )
    .await;
    // A quiet gap: the reload settles and every report of the traffic before the stage began
    // has arrived (the agents report every 500 ms).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = status().await;
    let count = |v: &Value, side: &str| v["live"][side]["requests"].as_u64().unwrap_or(0);
    let (stable_before, canary_before) = (count(&before, "stable"), count(&before, "canary"));

    let sent = common::burst(&lb.url, 800, 4).await;
    assert_eq!(sent.answered(), 800, "{sent:?}\n{}", serin.diagnostics());
    // 25% of 800: mean 200, sd 12.2; 4.5 sd either way.
    let canary = sent.of("v2") as f64;
    assert!(
        (canary - 200.0).abs() <= 55.0,
        "canary share through the balancer: {sent:?}"
    );
    // Two report intervals and a control tick for the last requests to be counted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = status().await;
    assert_eq!(after["state"], "progressing", "{after:#}");
    assert_eq!(
        (
            count(&after, "stable") - stable_before,
            count(&after, "canary") - canary_before
        ),
        (sent.of("v1"), sent.of("v2")),
        "the coordinator's per-variant counts differ from what the load generator received\n{}",
        serin.diagnostics()
    );

    // The canary host starts failing every request: the critical trigger rolls it back.
    let admin = format!("http://{canary_addr}/admin");
    assert_eq!(
        common::post_json(&admin, r#"{"error_rate": 1.0}"#).await,
        200,
        "the canary's admin endpoint"
    );
    wait_for(
        Duration::from_secs(30),
        "the failing canary to be rolled back by its trigger",
        async || {
            common::burst(&lb.url, 40, 4).await;
            status().await["state"] == "rolled_back"
        },
        || serin.diagnostics(),
    )
    .await;
    let rolled_back = status().await;
    assert!(
        rolled_back["last_reason"]
            .as_str()
            .is_some_and(|r| r.contains("canary-error-spike")),
        "{rolled_back:#}"
    );
    // The balancer's main upstream (the one clients reach) no longer lists the canary host.
    let main_upstream = |site: &str| -> String {
        site.split("upstream serin_web {")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .unwrap_or_default()
            .to_owned()
    };
    wait_for(
        Duration::from_secs(20),
        "the balancer to take the canary host out of the upstream clients reach",
        async || {
            let site = std::fs::read_to_string(&lb.site).unwrap_or_default();
            let upstream = main_upstream(&site);
            !upstream.is_empty() && !upstream.contains(&canary_addr)
        },
        || serin.diagnostics(),
    )
    .await;
    // Old nginx workers finish their requests; the new ones route to stable only.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_rollback = common::burst(&lb.url, 200, 4).await;
    assert_eq!(
        (after_rollback.of("v1"), after_rollback.server_errors),
        (200, 0),
        "traffic after the rollback: {after_rollback:?}\n{}",
        serin.diagnostics()
    );
    lb.stop().await;
}

/// Not a test but the benchmark of docs/benchmarks.md §5 (run it with
/// `cargo nextest run --test fleet --run-ignored only --no-capture benchmark_`): the time from an
/// app host's death (every process SIGKILLed) or cut-off (its link down) to its removal from
/// every balancer's upstream, with two nginx balancers in front of four app hosts and
/// `remove_unhealthy_after = 3s`; and the time until it is back once it returns. It asserts
/// only that removal and return happen; the times are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run on purpose, see docs/benchmarks.md §5"]
async fn benchmark_host_death_to_removal_from_every_balancer() {
    const HOSTS: usize = 4;
    let mut serin = Serin::start(HOSTS).await;
    serin.wait_all_connected(HOSTS).await;
    let balancers = [
        serin.start_balancer_named("lb1").await,
        serin.start_balancer_named("lb2").await,
    ];
    let fleet_dir = serin.fleet.dir().to_owned();
    let in_main_upstream = |lb: &Balancer, address: &str| {
        let site = std::fs::read_to_string(&lb.site).unwrap_or_default();
        site.split("upstream serin_web {")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .is_some_and(|upstream| upstream.contains(address))
    };
    // Polls every 20 ms until every balancer's membership of `address` is `wanted`; returns
    // each balancer's time (since `since`) and the slowest.
    let wait_all = async |address: &str, wanted: bool, since: Instant| -> Vec<Duration> {
        let mut seen: Vec<Option<Duration>> = vec![None; balancers.len()];
        let deadline = since + Duration::from_secs(60);
        while seen.iter().any(Option::is_none) {
            assert!(
                Instant::now() < deadline,
                "{address} not {} every balancer within 60 s (fleet files in {})",
                if wanted { "back in" } else { "out of" },
                fleet_dir.display()
            );
            for (lb, t) in balancers.iter().zip(seen.iter_mut()) {
                if t.is_none() && in_main_upstream(lb, address) == wanted {
                    *t = Some(since.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen.into_iter().flatten().collect()
    };
    let secs = |d: &Duration| format!("{:.2}", d.as_secs_f64());
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut removed = std::collections::BTreeMap::<&str, Vec<f64>>::new();
    let mut returned = Vec::new();
    let coordinator_addr = serin.coordinator_addr;
    let trials = [
        ("kill", 1),
        ("kill", 2),
        ("kill", 3),
        ("kill", 1),
        ("kill", 2),
        ("cut", 3),
        ("cut", 1),
        ("cut", 2),
    ];
    for (how, k) in trials {
        let address = format!("{}:{APP_PORT}", serin.fleet.host(k).addr());
        let name = serin.fleet.host(k).name().to_owned();
        let at = Instant::now();
        match how {
            "kill" => serin
                .fleet
                .host_mut(k)
                .kill_all()
                .expect("killing the host"),
            _ => serin.fleet.host_mut(k).cut().expect("cutting the host"),
        }
        let times = wait_all(&address, false, at).await;
        let slowest = times.iter().max().copied().unwrap_or_default();
        let back_at = Instant::now();
        match how {
            "kill" => start_app_host(serin.fleet.host_mut(k), false, coordinator_addr),
            _ => serin.fleet.host_mut(k).heal().expect("healing the host"),
        }
        let back = wait_all(&address, true, back_at).await;
        let back_slowest = back.iter().max().copied().unwrap_or_default();
        println!(
            "BENCH {how} {name}: out of every balancer after {} s (each: {}), back in {} s after it returned",
            secs(&slowest),
            times.iter().map(secs).collect::<Vec<_>>().join(", "),
            secs(&back_slowest),
        );
        removed.entry(how).or_default().push(slowest.as_secs_f64());
        returned.push(back_slowest.as_secs_f64());
    }
    for (how, times) in removed {
        println!(
            "BENCH median {how}: {:.2} s to leave every balancer over {} trials",
            median(times.clone()),
            times.len()
        );
    }
    println!(
        "BENCH median return: {:.2} s to be back in every balancer over {} trials",
        median(returned.clone()),
        returned.len()
    );
    for lb in balancers {
        lb.stop().await;
    }
}
