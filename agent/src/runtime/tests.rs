//! [`super::run`] end to end: against the in-test coordinator of `testing`, with in-test
//! metrics pages, and through a real nginx (Debian's package).

use std::net::SocketAddr;
use std::time::Duration;

use serin_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::testing::*;
use super::{AgentError, run};
use crate::config::AgentConfig;
use crate::nginx::{BalancedService, LocalNginx, find_nginx};
use crate::test_support::traffic;

// --- the runtime end to end ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_reports_acks_and_reregisters_after_coordinator_restart() {
    let good = http_server(|n| metrics_page(n, "good")).await;
    let garbage = http_server(|_| "<html><body>garbage</body></html>\n".to_owned()).await;
    // Accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let silent_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let coordinator = listener.local_addr().expect("addr");
    let data = tempfile::tempdir().expect("tempdir");

    let config = AgentConfig::from_toml(&format!(
        r#"
        name = "host-1"
        coordinators = ["http://{coordinator}"]
        interval = "500ms"
        # A generous scrape timeout: under load an 80 ms one made the good and the garbage
        # pages time out too; only the silent instance may time out here.
        scrape_timeout = "400ms"
        data_dir = "{data}"
        labels = {{ zone = "z1" }}

        [[instances]]
        name = "web-stable"
        service = "web"
        variant = "stable"
        address = "{good}"
        metrics_url = "http://{good}/metrics"

        [[instances]]
        name = "web-canary"
        service = "web"
        variant = "canary"
        address = "{garbage}"
        metrics_url = "http://{garbage}/metrics"

        [[instances]]
        name = "web-silent"
        service = "web"
        variant = "canary"
        address = "{silent}"
        metrics_url = "http://{silent}/metrics"
        "#,
        data = data.path().display(),
        good = good.addr,
        garbage = garbage.addr,
        silent = silent_addr,
    ))
    .expect("valid config");

    let mut server = TestServer::start(listener).await;
    let (shutdown, agent) = run_agent(config).await;

    let down = server.session().await;
    let register = expect_register(server.message("Register").await);
    assert_eq!(register.agent, "host-1");
    assert_eq!(register.labels.get("zone").map(String::as_str), Some("z1"));
    assert_eq!(register.last_applied, None);
    assert!(register.balancer_services.is_empty());
    let targets: Vec<(&str, &str, i32)> = register
        .targets
        .iter()
        .map(|t| (t.name.as_str(), t.address.as_str(), t.variant))
        .collect();
    assert_eq!(
        targets,
        [
            (
                "web-stable",
                good.addr.to_string().as_str(),
                pb::Variant::Stable as i32
            ),
            (
                "web-canary",
                garbage.addr.to_string().as_str(),
                pb::Variant::Canary as i32
            ),
            (
                "web-silent",
                silent_addr.to_string().as_str(),
                pb::Variant::Canary as i32
            ),
        ]
    );

    // Reports: the garbage instance fails every time; the good one shows traffic once
    // it has a baseline.
    let mut last_seq = 0;
    loop {
        let report = match server.message("a report with traffic").await {
            pb::agent_message::Body::Report(r) => r,
            other => panic!("expected reports, got {other:?}"),
        };
        assert!(
            report.seq > last_seq,
            "seq must grow: {} after {last_seq}",
            report.seq
        );
        last_seq = report.seq;
        assert!(report.interval_ms > 0);
        let host = report.host.expect("host metrics");
        assert!(host.memory_total_bytes > 0);
        let bad = report
            .instances
            .iter()
            .find(|w| w.instance == "web-canary")
            .expect("the failing instance is in every report");
        assert!(!bad.scrape_ok, "{bad:?}");
        assert!(
            bad.scrape_error
                .contains("not in the Prometheus text format"),
            "{bad:?}"
        );
        assert_eq!(bad.variant, pb::Variant::Canary as i32);
        let silent = report
            .instances
            .iter()
            .find(|w| w.instance == "web-silent")
            .expect("the silent instance is in every report");
        assert!(!silent.scrape_ok, "{silent:?}");
        assert!(silent.scrape_error.contains("within"), "{silent:?}");
        if let Some(ok) = report.instances.iter().find(|w| w.instance == "web-stable") {
            assert!(ok.scrape_ok, "{ok:?}");
            assert!(ok.requests > 0, "{ok:?}");
            assert!(ok.errors > 0 && ok.errors < ok.requests, "{ok:?}");
            assert_eq!(ok.service, "web");
            break;
        }
    }

    // A desired state: no nginx here, so nothing to actuate, acked without failures.
    send_desired(&down, 1, 5, vec![traffic("web", 10, None)]).await;
    let ack = server.ack().await;
    assert_eq!(ack.generation, Some(pb::Generation { term: 1, index: 5 }));
    assert!(ack.failures.is_empty(), "{:?}", ack.failures);

    // An older generation is ignored; the applied one is acknowledged again.
    send_desired(&down, 1, 4, vec![traffic("web", 90, None)]).await;
    send_desired(&down, 1, 5, vec![traffic("web", 10, None)]).await;
    let ack = server.ack().await;
    assert_eq!(ack.generation, Some(pb::Generation { term: 1, index: 5 }));

    // The coordinator goes away and comes back on the same port.
    drop(down);
    server.stop().await;
    let listener = TcpListener::bind(coordinator).await.expect("rebind");
    let mut server = TestServer::start(listener).await;
    let _down = server.session().await;
    let register = expect_register(server.message("Register after reconnect").await);
    assert_eq!(register.agent, "host-1");
    assert_eq!(
        register.last_applied,
        Some(pb::Generation { term: 1, index: 5 })
    );

    stop_agent(shutdown, agent).await;
    drop(_down);
    server.stop().await;
    silent_task.abort();
}

#[tokio::test]
async fn a_restarted_agent_registers_its_stored_generation() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let coordinator = listener.local_addr().expect("addr");
    let data = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig::from_toml(&format!(
        "name = \"a\"\ncoordinators = [\"http://{coordinator}\"]\ndata_dir = \"{}\"",
        data.path().display()
    ))
    .expect("valid config");
    let mut server = TestServer::start(listener).await;

    let (shutdown, agent) = run_agent(config.clone()).await;
    let down = server.session().await;
    let register = expect_register(server.message("Register").await);
    assert_eq!(register.last_applied, None);
    let first_id = register.instance_id;
    assert_eq!(first_id.len(), 32, "{first_id:?}");
    send_desired(&down, 3, 1, vec![]).await;
    assert!(server.ack().await.failures.is_empty());
    stop_agent(shutdown, agent).await;
    drop(down);

    let (shutdown, agent) = run_agent(config).await;
    let _down = server.session().await;
    let register = expect_register(server.message("Register after restart").await);
    assert_eq!(
        register.last_applied,
        Some(pb::Generation { term: 3, index: 1 })
    );
    assert_eq!(
        register.instance_id, first_id,
        "the same data directory, the same agent"
    );
    stop_agent(shutdown, agent).await;
}

fn minimal_config(coordinator: SocketAddr, data: &tempfile::TempDir) -> AgentConfig {
    AgentConfig::from_toml(&format!(
        "name = \"host-1\"\ncoordinators = [\"http://{coordinator}\"]\ndata_dir = \"{}\"",
        data.path().display()
    ))
    .expect("valid config")
}

#[tokio::test]
async fn an_agent_refused_as_a_duplicate_name_at_start_stops_with_the_coordinators_message() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let coordinator = listener.local_addr().expect("addr");
    let data = tempfile::tempdir().expect("tempdir");
    let message = "agent 'host-1' is already connected from 10.0.0.5:41234";
    let mut server = TestServer::start_refusing(listener, message).await;

    let result = tokio::time::timeout(
        WAIT,
        run(minimal_config(coordinator, &data), CancellationToken::new()),
    )
    .await
    .expect("run returns by itself");
    let err = result.expect_err("a refused first session is fatal");
    assert!(
        matches!(&err, AgentError::DuplicateName(m) if m == message),
        "{err:?}"
    );
    assert!(err.to_string().contains(message), "{err}");
    let register = server.refused().await;
    assert_eq!(register.agent, "host-1");
    assert_eq!(register.instance_id.len(), 32, "{register:?}");
    server.stop().await;
}

#[tokio::test]
async fn an_agent_refused_as_a_duplicate_name_after_it_was_connected_keeps_retrying() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let coordinator = listener.local_addr().expect("addr");
    let data = tempfile::tempdir().expect("tempdir");
    let mut server = TestServer::start(listener).await;
    let (shutdown, agent) = run_agent(minimal_config(coordinator, &data)).await;
    let down = server.session().await;
    let first = expect_register(server.message("Register").await);
    drop(down);
    server.stop().await;

    // Meanwhile another agent took the name: the coordinator refuses this one.
    let listener = TcpListener::bind(coordinator).await.expect("rebind");
    let mut server =
        TestServer::start_refusing(listener, "agent 'host-1' is already connected").await;
    for _ in 0..3 {
        let register = server.refused().await;
        assert_eq!(register.instance_id, first.instance_id, "the same agent");
    }
    assert!(
        !agent.is_finished(),
        "a refusal after a registration is not fatal"
    );
    stop_agent(shutdown, agent).await;
    server.stop().await;
}

/// The lease expires while no coordinator answers during a canary: the next `Register`
/// tells it (revert, the generation, the canary's service and rollout) until a leader sent a
/// desired state in that session; the one after carries none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_canary_lease_is_told_in_the_next_register_until_a_leader_answers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let coordinator = listener.local_addr().expect("addr");
    let data = tempfile::tempdir().expect("tempdir");
    let config = AgentConfig::from_toml(&format!(
        "name = \"host-1\"\ncoordinators = [\"http://{coordinator}\"]\ndata_dir = \"{}\"\n\
         [canary_lease]\nafter = \"1s\"\n",
        data.path().display()
    ))
    .expect("valid config");
    let mut server = TestServer::start(listener).await;
    let (shutdown, agent) = run_agent(config).await;
    let down = server.session().await;
    let first = expect_register(server.message("Register").await);
    assert_eq!(first.lease_expired, None);
    send_desired(&down, 3, 42, vec![traffic("web", 10, None)]).await;
    let ack = server.ack().await;
    assert_eq!(ack.generation, Some(pb::Generation { term: 3, index: 42 }));
    drop(down);
    server.stop().await;

    // Down for longer than the lease (1 s): the agent's reconnect attempts fail meanwhile.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let listener = TcpListener::bind(coordinator).await.expect("rebind");
    let mut server = TestServer::start(listener).await;
    let down = server.session().await;
    let second = expect_register(server.message("Register").await);
    let expiry = second.lease_expired.expect("the expiry is told");
    assert_eq!(expiry.action, "revert");
    assert_eq!(expiry.after_ms, 1000);
    assert_eq!(
        expiry.generation,
        Some(pb::Generation { term: 3, index: 42 })
    );
    assert_eq!(
        expiry.services,
        [pb::LeaseService {
            service: "web".into(),
            rollout_id: "r1".into(),
            canary_weight: 10,
        }]
    );
    assert!(expiry.expired_at_ms > 0);
    // The leader answers; the same generation is applied again and acknowledged.
    send_desired(&down, 3, 42, vec![traffic("web", 10, None)]).await;
    let ack = server.ack().await;
    assert_eq!(ack.generation, Some(pb::Generation { term: 3, index: 42 }));
    drop(down);
    let _down = server.session().await;
    let third = expect_register(server.message("Register").await);
    assert_eq!(third.lease_expired, None, "told once a leader answered");
    drop(_down);
    stop_agent(shutdown, agent).await;
    server.stop().await;
}

#[tokio::test]
async fn unusable_nginx_fails_at_once_naming_the_problem() {
    let data = tempfile::tempdir().expect("tempdir");
    // Nothing listens at the coordinator address: run must fail before connecting.
    let config = AgentConfig::from_toml(&format!(
        r#"
        name = "a"
        coordinators = ["http://127.0.0.1:9"]
        data_dir = "{data}"
        [[instances]]
        name = "web-1"
        service = "web"
        variant = "stable"
        address = "127.0.0.1:8081"
        metrics_url = "http://127.0.0.1:8081/metrics"
        [nginx]
        binary = "/nonexistent/serin-test/nginx"
        config = "/etc/nginx/nginx.conf"
        site = "{data}/serin.conf"
        services = [{{ service = "web", listen = "127.0.0.1:8080" }}]
        "#,
        data = data.path().display(),
    ))
    .expect("valid config");
    let result = tokio::time::timeout(WAIT, run(config, CancellationToken::new()))
        .await
        .expect("run returns at once");
    let err = result.expect_err("a missing nginx binary is fatal");
    assert!(matches!(err, AgentError::Nginx(_)), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/serin-test/nginx"),
        "{err}"
    );
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

async fn get_body(url: &str) -> String {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let response = client
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(
        response.status().is_success(),
        "GET {url}: {}",
        response.status()
    );
    response.text().await.expect("body")
}

/// Real nginx (Debian's package): desired weights become live routes; a state nginx
/// cannot take is acknowledged with the error and leaves the previous routes live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_desired_weights_through_real_nginx() {
    let binary = find_nginx()
        .expect("nginx not found on PATH or at /usr/sbin/nginx: apt-get install -y nginx");
    let stable = http_server(|n| metrics_page(n, "backend stable")).await;
    let canary = http_server(|n| metrics_page(n, "backend canary")).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let coordinator = listener.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = LocalNginx::start(&dir.path().join("nginx"), &binary)
        .await
        .expect("local nginx starts");
    let listen = format!("127.0.0.1:{}", free_port());

    let mut config = AgentConfig::from_toml(&format!(
        r#"
        name = "lb-1"
        coordinators = ["http://{coordinator}"]
        interval = "100ms"
        data_dir = "{data}"
        [[instances]]
        name = "web-stable"
        service = "web"
        variant = "stable"
        address = "{stable}"
        metrics_url = "http://{stable}/metrics"
        [[instances]]
        name = "web-canary"
        service = "web"
        variant = "canary"
        address = "{canary}"
        metrics_url = "http://{canary}/metrics"
        "#,
        data = dir.path().join("agent").display(),
        stable = stable.addr,
        canary = canary.addr,
    ))
    .expect("valid config");
    config.nginx = Some(nginx.settings(vec![BalancedService {
        service: "web".into(),
        listen: listen.clone(),
    }]));

    let mut server = TestServer::start(listener).await;
    let (shutdown, agent) = run_agent(config).await;
    let down = server.session().await;
    let register = expect_register(server.message("Register").await);
    assert_eq!(register.balancer_services, ["web"]);

    send_desired(&down, 1, 1, vec![traffic("web", 100, None)]).await;
    let ack = server.ack().await;
    assert_eq!(ack.generation, Some(pb::Generation { term: 1, index: 1 }));
    assert!(ack.failures.is_empty(), "{:?}", ack.failures);
    for _ in 0..5 {
        let body = get_body(&format!("http://{listen}/")).await;
        assert!(body.contains("backend canary"), "{body}");
    }

    // A sticky key nginx cannot use: the apply fails, the error is acknowledged, and
    // the previous routes stay live.
    send_desired(&down, 1, 2, vec![traffic("web", 50, Some("cookie_uid"))]).await;
    let ack = server.ack().await;
    assert_eq!(ack.generation, Some(pb::Generation { term: 1, index: 2 }));
    assert_eq!(ack.failures.len(), 1, "{:?}", ack.failures);
    assert_eq!(ack.failures[0].service, "web");
    assert!(
        ack.failures[0].error.contains("cookie_uid"),
        "{:?}",
        ack.failures
    );
    let body = get_body(&format!("http://{listen}/")).await;
    assert!(body.contains("backend canary"), "{body}");

    // Back to stable.
    send_desired(&down, 1, 3, vec![traffic("web", 0, None)]).await;
    let ack = server.ack().await;
    assert!(ack.failures.is_empty(), "{:?}", ack.failures);
    let body = get_body(&format!("http://{listen}/")).await;
    assert!(body.contains("backend stable"), "{body}");

    stop_agent(shutdown, agent).await;
    drop(down);
    server.stop().await;
    nginx.stop().await;
}

/// Real nginx, at most one reload per second: two states sent together within the second
/// after a reload are one reload, of the newest (the one in between is never applied nor
/// acknowledged); a rollback to 0% right after it is applied too, and every request then
/// reaches stable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_real_nginx_applies_only_its_newest_state_then_a_rollback() {
    let binary = find_nginx()
        .expect("nginx not found on PATH or at /usr/sbin/nginx: apt-get install -y nginx");
    let stable = http_server(|n| metrics_page(n, "backend stable")).await;
    let canary = http_server(|n| metrics_page(n, "backend canary")).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let coordinator = listener.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = LocalNginx::start(&dir.path().join("nginx"), &binary)
        .await
        .expect("local nginx starts");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut config = AgentConfig::from_toml(&format!(
        "name = \"lb-1\"\ncoordinators = [\"http://{coordinator}\"]\ninterval = \"100ms\"\n\
         data_dir = \"{}\"\n",
        dir.path().join("agent").display(),
    ))
    .expect("valid config");
    config.nginx = Some(nginx.settings(vec![BalancedService {
        service: "web".into(),
        listen: listen.clone(),
    }]));
    let servers = [
        ("web-stable", stable.addr, crate::traffic::Variant::Stable),
        ("web-canary", canary.addr, crate::traffic::Variant::Canary),
    ]
    .map(
        |(instance, address, variant)| crate::store::UpstreamServer {
            instance: instance.into(),
            address: address.to_string(),
            variant,
            weight: 1,
            agent: "app-1".into(),
        },
    );
    let at = |weight| crate::store::ServiceTraffic {
        servers: servers.to_vec(),
        from_inventory: true,
        ..traffic("web", weight, None)
    };

    let mut server = TestServer::start(listener).await;
    let (shutdown, agent) = run_agent(config).await;
    let down = server.session().await;
    expect_register(server.message("Register").await);

    send_desired(&down, 1, 1, vec![at(10)]).await;
    let ack = server.ack().await;
    assert_eq!(ack.generation, Some(pb::Generation { term: 1, index: 1 }));
    // Both within the second after that reload: 2 is held, then replaced by 3. (The gap
    // lets the applier pick 2 up on its own: without the limit it would reload for it and
    // ack it before 3.)
    send_desired(&down, 1, 2, vec![at(25)]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send_desired(&down, 1, 3, vec![at(50)]).await;
    let ack = server.ack().await;
    assert_eq!(
        ack.generation,
        Some(pb::Generation { term: 1, index: 3 }),
        "the held generation 2 was applied"
    );
    assert!(ack.failures.is_empty(), "{:?}", ack.failures);
    let marker = format!("http://{listen}{}", crate::nginx::GENERATION_PATH);
    assert_eq!(get_body(&marker).await.trim(), "1.3");

    // The rollback, within the second after that reload.
    send_desired(&down, 1, 4, vec![at(0)]).await;
    let ack = server.ack().await;
    assert_eq!(ack.generation, Some(pb::Generation { term: 1, index: 4 }));
    assert!(ack.failures.is_empty(), "{:?}", ack.failures);
    assert_eq!(get_body(&marker).await.trim(), "1.4");
    for _ in 0..5 {
        let body = get_body(&format!("http://{listen}/")).await;
        assert!(body.contains("backend stable"), "{body}");
    }

    stop_agent(shutdown, agent).await;
    drop(down);
    server.stop().await;
    nginx.stop().await;
}

/// A balancer-only agent (no `[[instances]]`) starts and, through a real nginx, routes a
/// service to the servers the coordinator sends over the session, not to local ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_without_instances_routes_to_the_servers_the_coordinator_sends() {
    let binary = find_nginx()
        .expect("nginx not found on PATH or at /usr/sbin/nginx: apt-get install -y nginx");
    let remote = http_server(|n| metrics_page(n, "backend remote")).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let coordinator = listener.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = LocalNginx::start(&dir.path().join("nginx"), &binary)
        .await
        .expect("local nginx starts");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut config = AgentConfig::from_toml(&format!(
        "name = \"lb-1\"\ncoordinators = [\"http://{coordinator}\"]\ninterval = \"100ms\"\n\
         data_dir = \"{}\"\n",
        dir.path().join("agent").display(),
    ))
    .expect("valid config");
    config.nginx = Some(nginx.settings(vec![BalancedService {
        service: "web".into(),
        listen: listen.clone(),
    }]));

    let mut server = TestServer::start(listener).await;
    let (shutdown, agent) = run_agent(config).await;
    let down = server.session().await;
    let register = expect_register(server.message("Register").await);
    assert_eq!(register.balancer_services, ["web"]);

    let from_inventory = crate::store::ServiceTraffic {
        servers: vec![crate::store::UpstreamServer {
            instance: "web-remote".into(),
            address: remote.addr.to_string(),
            variant: crate::traffic::Variant::Stable,
            weight: 1,
            agent: "app-1".into(),
        }],
        from_inventory: true,
        ..traffic("web", 0, None)
    };
    send_desired(&down, 1, 1, vec![from_inventory]).await;
    let ack = server.ack().await;
    assert_eq!(ack.generation, Some(pb::Generation { term: 1, index: 1 }));
    assert!(ack.failures.is_empty(), "{:?}", ack.failures);
    let body = get_body(&format!("http://{listen}/")).await;
    assert!(body.contains("backend remote"), "{body}");

    stop_agent(shutdown, agent).await;
    drop(down);
    server.stop().await;
    nginx.stop().await;
}
