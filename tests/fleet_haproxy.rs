//! The fleet shape with HAProxy as the balancer: a private HAProxy and a balancer-only agent
//! in the root namespace, three app hosts in network namespaces (tests/common/netns.rs), each
//! with a demo app and an agent scraping only its own instance. Load runs through HAProxy
//! (a keep-alive client and a connection-per-request client) during a rollout that goes
//! through three stages to promotion: not one request fails, HAProxy is never reloaded for
//! the weight changes, and the split measured through it at the 50% stage lies within a
//! binomial tolerance. The strategy names an override header: at the 10% stage every request
//! carrying `X-Serin-Variant: canary` reaches the canary (turning the override on and off, at
//! the rollout's start and end, are its only reloads, and they fail no request either). Before the rollout, HAProxy is killed and restarted from a config
//! without the service, and a weight is changed by hand: the balancer agent puts both back.
//!
//! Needs root, iproute2 and haproxy (CI installs them); without them the test fails naming
//! what is missing.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::netns::{APP_PORT, Fleet, spawn_coordinator, start_app_host};
use common::{Counts, Proc, cli_at, free_port, fresh_client, get_version, wait_for};
use serde_json::Value;
use serin_agent::haproxy::{LocalHaproxy, RuntimeApi, find_haproxy};

/// Sequential GETs on one client until stopped, counted by version.
struct Loop {
    counts: Arc<Mutex<Counts>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Loop {
    fn start(url: &str, client: reqwest::Client) -> Loop {
        let counts: Arc<Mutex<Counts>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (counts, stop, url) = (counts.clone(), stop.clone(), url.to_owned());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let result = get_version(&client, &url).await;
                    {
                        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                        c.sent += 1;
                        match result {
                            Ok((status, version)) => {
                                if status >= 500 {
                                    c.server_errors += 1;
                                }
                                *c.by_version.entry(version).or_default() += 1;
                            }
                            Err(_) => c.transport_errors += 1,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        Loop { counts, stop, task }
    }

    async fn finish(self) -> Counts {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// (weight of the stable slots, weight of the canary slot), read from HAProxy, for the slots
/// that take traffic; `None` until every app host holds a ready slot.
async fn live_weights(api: &RuntimeApi, canary: &str, hosts: usize) -> Option<(Vec<u32>, u32)> {
    let slots = api.servers_state("serin_web").await.ok()?;
    let ready: Vec<_> = slots.into_iter().filter(|s| s.ready).collect();
    if ready.len() != hosts {
        return None;
    }
    let canary_weight = ready
        .iter()
        .find(|s| format!("{}:{}", s.addr, s.port) == canary)?
        .weight;
    let stable = ready
        .iter()
        .filter(|s| format!("{}:{}", s.addr, s.port) != canary)
        .map(|s| s.weight)
        .collect();
    Some((stable, canary_weight))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_fed_by_the_inventory_is_put_back_after_a_restart_and_promotes_a_canary_through_three_stages_without_a_failed_request()
 {
    let haproxy_binary =
        find_haproxy().expect("haproxy not found (apt-get install -y haproxy; .ci/run does)");
    let mut fleet = Fleet::new(3).unwrap_or_else(|e| panic!("{e:#}"));
    let (coordinator, coordinator_addr) = spawn_coordinator(&fleet, 3);
    for k in 1..=3 {
        start_app_host(fleet.host_mut(k), k == 3, coordinator_addr);
    }

    // The balancer host: the root namespace, with a private HAProxy and an agent that
    // declares only the service it carries.
    let haproxy_dir = fleet.dir().join("lb-haproxy");
    let mut haproxy = LocalHaproxy::start(&haproxy_dir, &haproxy_binary)
        .await
        .expect("haproxy starts");
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let settings = haproxy.settings(Vec::new());
    let lb_toml = fleet.dir().join("lb.toml");
    std::fs::write(
        &lb_toml,
        format!(
            "name = \"lb\"\ncoordinators = [\"http://{coordinator_addr}\"]\ninterval = \"500ms\"\n\
             data_dir = \"{data}\"\n\n[haproxy]\nbinary = \"{binary}\"\nconfig = \"{config}\"\n\
             socket = \"{socket}\"\nmaster_socket = \"{master}\"\nslots = 4\n\n\
             [[haproxy.services]]\nservice = \"web\"\nlisten = \"{listen}\"\n",
            data = fleet.dir().join("lb-data").display(),
            binary = settings.binary.display(),
            config = settings.config.display(),
            socket = settings.socket.display(),
            master = settings.master_socket.display(),
        ),
    )
    .expect("writing lb.toml");
    let lb = Proc::spawn(
        "lb-agent",
        fleet.dir(),
        &[
            "agent".into(),
            "run".into(),
            "--config".into(),
            lb_toml.display().to_string(),
        ],
    );
    let diagnostics = || {
        format!(
            "{}--- coordinator\n{}\n--- lb agent\n{}\n--- haproxy\n{}",
            fleet.diagnostics(),
            common::tail(&coordinator.log, 30),
            common::tail(&lb.log, 40),
            common::tail(&haproxy_dir.join("haproxy.log"), 15)
        )
    };
    let api = haproxy.api();
    let canary_addr = format!("{}:{APP_PORT}", fleet.host(3).addr());
    wait_for(
        Duration::from_secs(40),
        "HAProxy to hold the three app hosts' instances from the inventory, stable only",
        async || live_weights(&api, &canary_addr, 3).await == Some((vec![1, 1], 0)),
        diagnostics,
    )
    .await;

    // HAProxy killed and restarted from a config without the service (a reinstall, say):
    // the balancer agent notices within its resync interval and puts the backend back.
    let empty = std::fs::read_to_string(haproxy_dir.join("haproxy.cfg"))
        .expect("the rendered config")
        .split("\n# service")
        .next()
        .unwrap_or_default()
        .to_owned();
    haproxy.stop().await;
    std::fs::write(haproxy_dir.join("haproxy.cfg"), empty).expect("writing the older config");
    haproxy = LocalHaproxy::start(&haproxy_dir, &haproxy_binary)
        .await
        .expect("haproxy restarts");
    assert!(
        api.servers_state("serin_web").await.is_err(),
        "the restarted HAProxy has no serin_web yet"
    );
    wait_for(
        Duration::from_secs(20),
        "the balancer agent to put the service back into the restarted HAProxy",
        async || live_weights(&api, &canary_addr, 3).await == Some((vec![1, 1], 0)),
        diagnostics,
    )
    .await;
    // And a weight changed by hand is put back.
    api.set("set server serin_web/slot0 weight 7")
        .await
        .expect("set weight by hand");
    wait_for(
        Duration::from_secs(20),
        "the balancer agent to put back a weight changed by hand",
        async || live_weights(&api, &canary_addr, 3).await == Some((vec![1, 1], 0)),
        diagnostics,
    )
    .await;

    let url = format!("http://{listen}/");
    let before = common::burst(&url, 40, 2).await;
    assert_eq!(before.of("v1"), 40, "{before:?}\n{}", diagnostics());
    let before_rollout = api.process().await.expect("show info").pid;

    // Load through HAProxy for the whole rollout.
    let keep_alive = Loop::start(
        &url,
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client"),
    );
    let per_request = Loop::start(&url, fresh_client(Duration::from_secs(5)));

    let strategy = fleet.dir().join("strategy.toml");
    std::fs::write(
        &strategy,
        "[[stages]]\nweight = 10\nmin_duration = \"3s\"\n\n[[stages]]\nweight = 50\nmin_duration = \"8s\"\n\n\
         [[stages]]\nweight = 100\nmin_duration = \"2s\"\n\n[[checks]]\nname = \"errors\"\n\
         metric = \"error_rate\"\nmax = 0.05\nmin_requests = 5\n\n\
         [traffic]\noverride_header = \"X-Serin-Variant\"\n",
    )
    .expect("writing strategy.toml");
    let id = common::start_web_rollout(coordinator_addr, &strategy).await;

    // 10% with two stable servers and one canary: 9 : 2 per server (exact).
    wait_for(
        Duration::from_secs(20),
        "HAProxy to give the canary 10% (weights 9, 9 : 2)",
        async || live_weights(&api, &canary_addr, 3).await == Some((vec![9, 9], 2)),
        diagnostics,
    )
    .await;
    // The override header reaches the canary at 10%, and the rest still splits.
    let worker = api.process().await.expect("show info").pid;
    assert_ne!(
        worker,
        before_rollout,
        "turning the override on is a reload (new backends and rules)\n{}",
        diagnostics()
    );
    let tester = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .default_headers(
            [(
                reqwest::header::HeaderName::from_static("x-serin-variant"),
                reqwest::header::HeaderValue::from_static("Canary"),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .expect("client");
    for i in 0..20 {
        let answer = get_version(&tester, &url).await;
        assert_eq!(
            answer,
            Ok((200, "v2".to_owned())),
            "request {i} with X-Serin-Variant: Canary at 10%\n{}",
            diagnostics()
        );
    }
    // 50%: 1, 1 : 2.
    wait_for(
        Duration::from_secs(30),
        "HAProxy to give the canary 50% (weights 1, 1 : 2)",
        async || live_weights(&api, &canary_addr, 3).await == Some((vec![1, 1], 2)),
        diagnostics,
    )
    .await;
    let half = common::burst(&url, 400, 4).await;
    assert_eq!(
        api.process().await.expect("show info").pid,
        worker,
        "the weight change from 10% to 50% reloaded HAProxy\n{}",
        diagnostics()
    );
    let canary = half.of("v2") as f64;
    // 50% of 400: mean 200, sd 10; 4.5 sd either way.
    assert!(
        (canary - 200.0).abs() <= 45.0 && half.answered() == 400,
        "canary share through HAProxy at 50%: {half:?}\n{}",
        diagnostics()
    );

    wait_for(
        Duration::from_secs(40),
        "the good canary to be promoted",
        async || {
            let out = cli_at(coordinator_addr, &["rollout", "status", &id, "--json"]).await;
            serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| v["state"] == "promoted")
        },
        diagnostics,
    )
    .await;
    // A little more load after the promotion's change.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let keep_alive = keep_alive.finish().await;
    let per_request = per_request.finish().await;
    eprintln!("keep-alive: {keep_alive:?}\nper request: {per_request:?}");
    for (name, counts) in [("keep-alive", &keep_alive), ("per-request", &per_request)] {
        assert_eq!(
            (counts.transport_errors, counts.server_errors),
            (0, 0),
            "{name} client: failed requests through HAProxy during the rollout: {counts:?}\n{}",
            diagnostics()
        );
        assert!(
            counts.of("v1") > 0 && counts.of("v2") > 0,
            "{name} client saw both versions: {counts:?}"
        );
    }
    drop(lb);
    haproxy.stop().await;
}
