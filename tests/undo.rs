//! `serin rollout undo` end to end, on the fleet shape on loopback: a coordinator, two app
//! hosts (each its own agent scraping its own demo app, which declares the version it runs),
//! and a balancer host (an agent with a private real nginx and no instances, fed from the
//! coordinator's inventory). v2 is promoted over v1, then `undo --to-revision 1` sends every
//! request through nginx back to the v1 instance, and a second `undo` forth to v2.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{Proc, cli_at, describe, free_port, fresh_client, get_version, spawn_app, tail};
use serde_json::Value;
use serin_agent::nginx::{BalancedService, LocalNginx, find_nginx};

/// The service of this fleet.
const SERVICE: &str = "api";

/// One app host: its demo app and its agent.
struct AppHost {
    agent: Proc,
    app: Proc,
    /// `host:port` of its instance.
    address: String,
}

/// Everything of one fleet; drops (kills) the balancer's agent, the app hosts, nginx, then the
/// coordinator.
struct Fleet {
    lb: Proc,
    hosts: Vec<AppHost>,
    nginx: LocalNginx,
    coordinator: Proc,
    coordinator_addr: SocketAddr,
    /// `http://` base of the service through nginx.
    url: String,
    site: PathBuf,
    dir: tempfile::TempDir,
}

impl Fleet {
    /// A coordinator and a balancer host (nginx, no instances); no app host yet.
    async fn start() -> Fleet {
        let nginx_binary = find_nginx().expect(
            "nginx is not installed: these tests need Debian's nginx (apt-get install -y nginx-light)",
        );
        let dir = tempfile::Builder::new()
            .prefix("serin-undo-")
            .tempdir()
            .expect("a temporary directory");
        let path = dir.path().to_owned();
        let coordinator_port = free_port();
        let coordinator_addr: SocketAddr = ([127, 0, 0, 1], coordinator_port).into();
        let coordinator =
            common::spawn_coordinator(&path, coordinator_port, &path.join("coordinator"));
        let nginx = LocalNginx::start(&path.join("nginx"), &nginx_binary)
            .await
            .unwrap_or_else(|e| panic!("starting nginx: {e}"));
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let settings = nginx.settings(vec![BalancedService {
            service: SERVICE.into(),
            listen: listen.to_string(),
        }]);
        let lb_toml = format!(
            "name = \"lb\"\ncoordinators = [\"http://{coordinator_addr}\"]\n\
             interval = \"500ms\"\ndata_dir = \"{}\"\n\n[nginx]\nbinary = \"{}\"\n\
             config = \"{}\"\nprefix = \"{}\"\nsite = \"{}\"\n\n[[nginx.services]]\n\
             service = \"{SERVICE}\"\nlisten = \"{listen}\"\n",
            path.join("lb").display(),
            settings.binary.display(),
            settings.config.display(),
            settings.prefix.as_deref().expect("a prefix").display(),
            settings.site.display(),
        );
        let lb = spawn_agent("lb", &path, &lb_toml);
        Fleet {
            lb,
            hosts: Vec::new(),
            nginx,
            coordinator,
            coordinator_addr,
            url: format!("http://{listen}/"),
            site: settings.site.clone(),
            dir,
        }
    }

    /// Starts app host `n` (`host-N`): a demo app answering `version` on `port` and an agent
    /// declaring its one instance (`api-on-host-N`) as `variant`, running `version`. Run again
    /// for the same `n`, it is a redeploy: same host, address and agent identity.
    fn app_host(&mut self, n: usize, variant: &str, version: &str, port: u16) {
        let path = self.dir.path().to_owned();
        let name = format!("host-{n}");
        let address = format!("127.0.0.1:{port}");
        let toml = format!(
            "name = \"{name}\"\ncoordinators = [\"http://{}\"]\ninterval = \"500ms\"\n\
             data_dir = \"{}\"\n\n[[instances]]\nname = \"{SERVICE}-on-{name}\"\n\
             service = \"{SERVICE}\"\nvariant = \"{variant}\"\naddress = \"{address}\"\n\
             metrics_url = \"http://{address}/metrics\"\nversion = \"{version}\"\n",
            self.coordinator_addr,
            path.join(&name).display()
        );
        let host = AppHost {
            app: spawn_app(&format!("app-{n}-{version}"), &path, port, version),
            agent: spawn_agent(&format!("{name}-{version}"), &path, &toml),
            address,
        };
        match self.hosts.get_mut(n - 1) {
            Some(slot) => *slot = host,
            None => self.hosts.push(host),
        }
    }

    /// The address of app host `n`'s instance.
    fn address(&self, n: usize) -> &str {
        &self.hosts[n - 1].address
    }

    /// Stops app host `n`'s agent and app.
    async fn stop_host(&mut self, n: usize) {
        let host = &mut self.hosts[n - 1];
        host.agent.kill().await;
        host.app.kill().await;
    }

    async fn cli(&self, args: &[&str]) -> Output {
        cli_at(self.coordinator_addr, args).await
    }

    /// `serin ARGS`, which must succeed; its stdout as JSON.
    async fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args).await;
        assert!(
            out.status.success(),
            "`serin {}` failed: {}\n{}",
            args.join(" "),
            describe(&out),
            self.diagnostics()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`serin {}`: not JSON ({e}): {}",
                args.join(" "),
                describe(&out)
            )
        })
    }

    /// `serin ARGS`, which must fail naming `expected` on stderr.
    async fn cli_fails(&self, args: &[&str], expected: &str) {
        let out = self.cli(args).await;
        assert!(
            !out.status.success(),
            "`serin {}` succeeded: {}",
            args.join(" "),
            describe(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expected),
            "`serin {}`: wanted {expected:?} in: {}",
            args.join(" "),
            describe(&out)
        );
    }

    /// The service's revisions as `serin rollout history --json` prints them.
    async fn history(&self) -> Value {
        self.cli_json(&["rollout", "history", SERVICE, "--json"])
            .await
    }

    /// Waits until the service's history shows the upstream membership change `note` (e.g.
    /// `added api-on-host-3 (127.0.0.1:…) of agent host-3`): the committed membership, with
    /// the instance's declared version, is what an undo looks at.
    async fn wait_membership_change(&self, note: &str) {
        common::wait_for(
            Duration::from_secs(30),
            &format!("the upstream membership change: {note}"),
            async || {
                let services = self
                    .cli_json(&["agent", "list", "--services", "--json"])
                    .await;
                services
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|s| s["history"].as_array().cloned().unwrap_or_default())
                    .filter_map(|e| e["reason"].as_str().map(str::to_owned))
                    .any(|r| {
                        r.trim_start_matches("upstreams: ")
                            .split("; ")
                            .any(|n| n == note)
                    })
            },
            || self.diagnostics(),
        )
        .await;
    }

    /// Waits until the upstream plain requests go to holds all of `present` and none of
    /// `absent`, and a burst of fresh connections through nginx is answered by `version` only
    /// (old workers drained).
    async fn wait_serving(&self, version: &str, present: &[&str], absent: &[&str]) {
        let client = fresh_client(Duration::from_secs(2));
        common::wait_for(
            Duration::from_secs(30),
            &format!("nginx to route every request to {version} ({present:?}) only"),
            async || {
                let site = std::fs::read_to_string(&self.site).unwrap_or_default();
                let routed = routed_block(&site);
                present.iter().all(|a| routed.contains(a))
                    && !absent.iter().any(|a| routed.contains(a))
                    && matches!(get_version(&client, &self.url).await, Ok((200, v)) if v == version)
                    && common::burst(&self.url, 20, 2).await.of(version) == 20
            },
            || self.diagnostics(),
        )
        .await;
    }

    fn diagnostics(&self) -> String {
        let mut out = format!("=== files in {}\n", self.dir.path().display());
        let procs = self
            .hosts
            .iter()
            .flat_map(|h| [&h.agent, &h.app])
            .chain([&self.lb, &self.coordinator]);
        for p in procs {
            out.push_str(&format!("=== {}\n{}\n", p.name, tail(&p.log, 30)));
        }
        out.push_str(&format!(
            "=== nginx error log\n{}\n=== site\n{}\n",
            tail(self.nginx.error_log_path(), 10),
            std::fs::read_to_string(&self.site).unwrap_or_default()
        ));
        out
    }
}

/// `serin agent run` with `toml` as its config, logging to `<dir>/agent-<name>.log`.
fn spawn_agent(name: &str, dir: &Path, toml: &str) -> Proc {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, toml).expect("writing an agent config");
    Proc::spawn(
        &format!("agent-{name}"),
        dir,
        &[
            "agent".into(),
            "run".into(),
            "--config".into(),
            file.display().to_string(),
        ],
    )
}

/// The servers of the upstream that plain requests go to (`upstream serin_api { … }`; the
/// site also has one upstream per variant, for the `/__serin/<variant>/` locations).
fn routed_block(site: &str) -> &str {
    let start = format!("upstream serin_{SERVICE} {{");
    site.split_once(start.as_str())
        .and_then(|(_, rest)| rest.split_once('}'))
        .map_or("", |(block, _)| block)
}

/// `(number, version, how)` of every revision in `serin rollout history --json`.
fn revisions(history: &Value) -> Vec<(u64, String, String)> {
    history["revisions"]
        .as_array()
        .unwrap_or_else(|| panic!("no revisions in {history:#}"))
        .iter()
        .map(|r| {
            (
                r["number"].as_u64().unwrap_or(0),
                r["version"].as_str().unwrap_or("").to_owned(),
                r["how"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn rev(number: u64, version: &str, how: &str) -> (u64, String, String) {
    (number, version.to_owned(), how.to_owned())
}

/// v2 promoted over v1; host-1 redeployed with v2 (as operators do after a promotion), so no
/// instance runs v1 and the undo is refused; a v1 instance on host-3 returns, and `undo
/// --to-revision 1` sends every request to it only (not to host-1, though it is labelled
/// stable too: the declared versions decide); a second `undo` goes forth to v2 on hosts 1 and 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_to_revision_1_sends_every_request_through_the_balancer_back_to_the_v1_instances() {
    let mut fleet = Fleet::start().await;
    let ports = [free_port(), free_port(), free_port()];
    fleet.app_host(1, "stable", "v1", ports[0]);
    fleet.app_host(2, "canary", "v2", ports[1]);
    let (h1, h2) = (fleet.address(1).to_owned(), fleet.address(2).to_owned());
    fleet.wait_serving("v1", &[&h1], &[&h2]).await;

    // Promote v2 over v1 (one long stage, promoted by hand so the test does not wait on it).
    let strategy = fleet.dir.path().join("strategy.toml");
    std::fs::write(
        &strategy,
        "[[stages]]\nweight = 50\nmin_duration = \"1h\"\n",
    )
    .unwrap();
    let strategy = strategy.display().to_string();
    let started = fleet
        .cli_json(&[
            "rollout",
            "start",
            SERVICE,
            "--version",
            "v2",
            "--stable-version",
            "v1",
            "--strategy",
            &strategy,
            "--json",
        ])
        .await;
    let id = started["id"].as_str().expect("an id").to_owned();
    fleet.cli_json(&["rollout", "promote", &id, "--json"]).await;
    fleet.wait_serving("v2", &[&h2], &[&h1]).await;
    let promoted_by = format!("promoted by rollout {id}");
    let history = fleet.history().await;
    assert_eq!(
        revisions(&history),
        [rev(1, "v1", "initial"), rev(2, "v2", &promoted_by)]
    );

    // Bad input: a clear error, a non-zero exit, and nothing changes.
    for (args, expected) in [
        (
            vec!["rollout", "undo", SERVICE, "--to-revision", "7"],
            "revision 7 does not exist: service 'api' has revisions 1..=2",
        ),
        (
            vec!["rollout", "undo", SERVICE, "--to-revision", "2"],
            "already at revision 2 (v2)",
        ),
        (vec!["rollout", "undo", "nope"], "service 'nope' not found"),
        (
            vec!["rollout", "undo", SERVICE, "--to-revision", "0"],
            "--to-revision",
        ),
        (
            vec!["rollout", "history", "nope"],
            "service 'nope' not found",
        ),
    ] {
        fleet.cli_fails(&args, expected).await;
    }

    // host-1 is redeployed with v2: nobody runs v1 any more, so the undo is refused.
    fleet.stop_host(1).await;
    fleet.app_host(1, "stable", "v2", ports[0]);
    fleet
        .wait_membership_change(&format!("api-on-host-1 ({h1}) of agent host-1 now runs v2"))
        .await;
    fleet
        .cli_fails(
            &["rollout", "undo", SERVICE, "--to-revision", "1"],
            "no instance of service 'api' is known to run v1 (revision 1); the fleet runs v2",
        )
        .await;
    assert_eq!(
        fleet.history().await,
        history,
        "a refused undo changed the revisions"
    );

    // A v1 instance returns on host-3; undo to revision 1 routes to it alone.
    fleet.app_host(3, "stable", "v1", ports[2]);
    let h3 = fleet.address(3).to_owned();
    fleet
        .wait_membership_change(&format!("added api-on-host-3 ({h3}) of agent host-3"))
        .await;
    let undo_sent = std::time::Instant::now();
    let undone = fleet
        .cli_json(&[
            "rollout",
            "undo",
            SERVICE,
            "--to-revision",
            "1",
            "--reason",
            "v2 corrupts carts",
            "--json",
        ])
        .await;
    assert_eq!(undone["previous"], 2, "{undone:#}");
    assert_eq!(undone["revision"]["number"], 3, "{undone:#}");
    assert_eq!(undone["revision"]["undo_of"], 1, "{undone:#}");
    assert_eq!(
        undone["serving"],
        serde_json::json!([format!("api-on-host-3 ({h3})")]),
        "{undone:#}"
    );
    fleet.wait_serving("v1", &[&h3], &[&h1, &h2]).await;
    // Measured, not asserted (docs/benchmarks.md §7): from sending the undo until nginx
    // answers a burst with v1 only.
    eprintln!(
        "undo to v1 served by nginx {} ms after the CLI was started",
        undo_sent.elapsed().as_millis()
    );
    let burst = common::burst(&fleet.url, 200, 4).await;
    assert_eq!(
        burst.of("v1"),
        200,
        "after the undo some requests did not reach v1: {burst:?}\n{}",
        fleet.diagnostics()
    );
    let history = fleet.history().await;
    assert_eq!(
        revisions(&history),
        [
            rev(1, "v1", "initial"),
            rev(2, "v2", &promoted_by),
            rev(3, "v1", "undo of 1")
        ]
    );
    assert_eq!(history["pinned"], 3, "{history:#}");
    // The service's history records it, with who and why.
    let services = fleet
        .cli_json(&["agent", "list", "--services", "--json"])
        .await;
    assert!(
        services
            .to_string()
            .contains("undo to revision 1 (v1) by operator:e2e, as revision 3: v2 corrupts carts"),
        "{services:#}"
    );
    let api = services
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == SERVICE))
        .unwrap_or_else(|| panic!("no {SERVICE} in {services:#}"));
    assert_eq!(api["revisions"], history["revisions"], "{services:#}");
    assert_eq!(api["stable_version"], "v1", "{services:#}");

    // Undo again (default: the previous revision): forth to v2, on hosts 1 and 2.
    let again = fleet
        .cli_json(&["rollout", "undo", SERVICE, "--json"])
        .await;
    assert_eq!(again["revision"]["number"], 4, "{again:#}");
    assert_eq!(again["revision"]["version"], "v2", "{again:#}");
    fleet.wait_serving("v2", &[&h1, &h2], &[&h3]).await;
    let burst = common::burst(&fleet.url, 200, 4).await;
    assert_eq!(burst.of("v2"), 200, "{burst:?}\n{}", fleet.diagnostics());
}

/// The loopback stack of tests/rollout_e2e.rs, one agent with both instances and nginx, whose
/// instances declare no version: after v2 is promoted, an undo sends every request back to the
/// stable instance (v1 ran there in the last rollout), and a new rollout after it starts from
/// v1 and splits by variant again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_declared_versions_undo_follows_the_last_rollouts_variants() {
    use common::{CANARY, STABLE, Stack, stage, strategy};
    let stack = Stack::start().await;
    let id = stack.start_rollout(&strategy(&[stage(50)], "")).await;
    stack.cli_ok(&["rollout", "promote", &id]).await;
    stack.wait_nginx_weight(100).await;
    assert_eq!(stack.burst(100).await.of(CANARY), 100);
    // The leader commits the service's upstream membership at its first once-a-second
    // reconciliation; before that an undo has no members to name (and says so).
    stack
        .wait_until(
            Duration::from_secs(10),
            "the service's upstream membership to be committed",
            async || {
                let out = stack.cli(&["agent", "list", "--services", "--json"]).await;
                serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| {
                    v.as_array().is_some_and(|a| {
                        a.iter()
                            .any(|s| s["name"] == common::SERVICE && s["from_inventory"] == true)
                    })
                })
            },
        )
        .await;

    let out = stack
        .cli_ok(&["rollout", "undo", common::SERVICE, "--to-revision", "1"])
        .await;
    assert_eq!(
        out,
        format!(
            "web: revision 2 → revision 3 (v1, undo of 1)\ntraffic: web-stable ({})\n",
            stack.stable_addr
        )
    );
    stack.wait_nginx_weight(0).await;
    let burst = stack.burst(200).await;
    assert_eq!(burst.of(STABLE), 200, "{burst:?}\n{}", stack.diagnostics());

    // A new rollout after the undo: its stable version is v1 again, and the stage's share
    // goes to the canary instance.
    let second = stack
        .start_rollout(&strategy(
            &[common::StageSpec {
                weight: 50,
                min_duration: "1h",
                manual_gate: false,
            }],
            "",
        ))
        .await;
    stack.wait_nginx_weight(50).await;
    let status = stack.status_json(&second).await;
    assert_eq!(status["stable_version"], STABLE, "{status:#}");
    let history: Value = serde_json::from_str(
        &stack
            .cli_ok(&["rollout", "history", common::SERVICE, "--json"])
            .await,
    )
    .expect("JSON");
    assert_eq!(history["current"], 3, "{history:#}");
    assert!(
        history["pinned"].is_null(),
        "the rollout ended the pin: {history:#}"
    );
    // And while it runs, an undo is refused naming it.
    let out = stack.cli(&["rollout", "undo", common::SERVICE]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("abort rollout {second} first")),
        "{}",
        describe(&out)
    );
}
