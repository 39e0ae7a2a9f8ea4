//! Tests against a real nginx (Debian's package) started through [`LocalNginx`], with tiny
//! in-test HTTP backends. They fail, rather than skip, when nginx is not installed.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::*;
use crate::traffic::{Server, Variant, VariantOverride};

fn nginx_binary() -> PathBuf {
    find_nginx().expect("nginx not found on PATH or at /usr/sbin/nginx: apt-get install -y nginx")
}

/// A port that was free a moment ago (bind port 0 on loopback, then release it).
pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// An HTTP/1.1 backend answering every request with its own name, one connection per
/// request. Aborted (with all its connection tasks) on drop.
pub(crate) struct Backend {
    pub(crate) addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn backend(name: &str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend addr");
    let name = name.to_owned();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let body = name.clone();
            connections.spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 2048];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
            // Reap finished connection tasks so the set does not grow without bound.
            while connections.try_join_next().is_some() {}
        }
    });
    Backend { addr, task }
}

/// One request on a fresh connection: (status, body).
pub(crate) async fn get(addr: &str, path: &str, cookie: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{cookie}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read response");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed response from {addr}{path}: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

/// One request on a fresh connection with `headers` (`Name: value` lines): (status, body).
pub(crate) async fn get_with_headers(addr: &str, path: &str, headers: &[String]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{extra}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read response");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed response from {addr}{path}: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}

async fn served_generation(listen: &str) -> String {
    let (status, body) = get(listen, GENERATION_PATH, None).await;
    assert_eq!(status, 200, "{body}");
    body.trim_end().to_owned()
}

/// Counts (canary, total) over `n` sequential fresh-connection requests to `/`.
async fn count_canary(listen: &str, n: usize) -> usize {
    let mut canary = 0;
    for _ in 0..n {
        let (status, body) = get(listen, "/", None).await;
        assert_eq!(status, 200, "body: {body}");
        assert!(
            body.starts_with("stable") || body.starts_with("canary"),
            "{body}"
        );
        if body.starts_with("canary") {
            canary += 1;
        }
    }
    canary
}

fn route(
    listen: &str,
    stable: &[&Backend],
    canary: &[&Backend],
    canary_weight: u32,
    sticky_key: Option<&str>,
) -> Route {
    let upstream = |b: &&Backend, variant| Server {
        name: format!("{variant:?}-{}", b.addr.port()),
        address: b.addr.to_string(),
        variant,
    };
    Route {
        service: "web".into(),
        listen: listen.to_owned(),
        servers: stable
            .iter()
            .map(|b| upstream(b, Variant::Stable))
            .chain(canary.iter().map(|b| upstream(b, Variant::Canary)))
            .collect(),
        canary_weight,
        sticky_key: sticky_key.map(str::to_owned),
        stable_version: "v1".into(),
        canary_version: "v2".into(),
        overrides: Default::default(),
    }
}

struct Harness {
    // Field order: the actuator and nginx go before the temporary directory.
    actuator: NginxActuator,
    nginx: LocalNginx,
    listen: String,
    _dir: tempfile::TempDir,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = LocalNginx::start(dir.path(), &nginx_binary())
        .await
        .expect("start local nginx");
    let listen = format!("127.0.0.1:{}", free_port());
    let settings = nginx.settings(vec![BalancedService {
        service: "web".into(),
        listen: listen.clone(),
    }]);
    let actuator = NginxActuator::new(settings).await.expect("actuator");
    Harness {
        actuator,
        nginx,
        listen,
        _dir: dir,
    }
}

/// (a) and (b): weighted split through real nginx, then back to 0%.
#[tokio::test]
async fn weighted_split_is_exact_and_zero_sends_nothing_to_canary() {
    let mut h = harness().await;
    let (s1, s2, c1) = (
        backend("stable-1").await,
        backend("stable-2").await,
        backend("canary-1").await,
    );
    // 2 stable servers and 1 canary: per-server weights 3, 3 and 2.
    let routes = [route(&h.listen, &[&s1, &s2], &[&c1], 25, None)];
    let applied = h
        .actuator
        .apply_routes(&routes, "1.1")
        .await
        .expect("apply 25%");
    assert!(matches!(applied, Applied::Reloaded { .. }), "{applied:?}");
    assert_eq!(served_generation(&h.listen).await, "1.1");

    // Tolerance: nginx's smooth weighted round robin is deterministic, not random. One
    // worker (worker_processes 1) picks from weights {3, 3, 2} in a cycle of 8 with exactly
    // 2 canary picks, so 400 requests = 50 cycles = exactly 100 canary. The only
    // legitimate slack is a request served by a second worker generation, each worker
    // being off by at most one canary pick; `apply_routes` settles until old workers stopped
    // accepting, so that is at most 2 workers -> |canary - 100| <= 2, plus 1 to spare.
    // A binomial model (as for a random balancer) would need +-4 sigma =
    // +-4*sqrt(400*0.25*0.75) ~ +-35, which would let a wrong ratio such as 1/5 (80)
    // pass; the deterministic bound catches it.
    let canary = count_canary(&h.listen, 400).await;
    assert!(
        canary.abs_diff(100) <= 3,
        "{canary} canary responses out of 400 at 25%"
    );

    // (b) back to 0%: the canary variant leaves the balanced upstream entirely...
    let routes = [route(&h.listen, &[&s1, &s2], &[&c1], 0, None)];
    let applied = h
        .actuator
        .apply_routes(&routes, "1.2")
        .await
        .expect("apply 0%");
    assert!(matches!(applied, Applied::Reloaded { .. }), "{applied:?}");
    assert_eq!(count_canary(&h.listen, 200).await, 0);
    // ...but stays reachable directly.
    let (status, body) = get(&h.listen, "/__serin/canary/", None).await;
    assert_eq!((status, body.as_str()), (200, "canary-1"));
    let (status, body) = get(&h.listen, "/__serin/stable/", None).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("stable-"), "{body}");

    h.nginx.stop().await;
}

/// (c) `nginx -t` failure: error carries nginx's message, file restored, traffic unchanged.
#[tokio::test]
async fn failed_config_test_restores_previous_file_and_traffic() {
    let mut h = harness().await;
    let (s, c) = (backend("stable-1").await, backend("canary-1").await);
    let good = [route(&h.listen, &[&s], &[&c], 25, None)];
    h.actuator
        .apply_routes(&good, "2.1")
        .await
        .expect("apply good");
    let site = h.nginx.site_path().to_owned();
    let before = std::fs::read(&site).expect("read site");

    let bad = [route(&h.listen, &[&s], &[&c], 50, Some("$cokie_uid"))];
    let err = h
        .actuator
        .apply_routes(&bad, "2.2")
        .await
        .expect_err("unknown variable");
    match &err {
        NginxError::ConfigTest { command, stderr } => {
            assert!(
                stderr.contains("unknown \"cokie_uid\" variable"),
                "stderr: {stderr}"
            );
            assert!(
                command.contains(" -t ") && command.contains("nginx.conf"),
                "{command}"
            );
        }
        other => panic!("expected ConfigTest, got {other:?}"),
    }
    assert!(err.to_string().contains("cokie_uid"), "{err}");
    assert_eq!(std::fs::read(&site).expect("read site"), before);
    assert_eq!(served_generation(&h.listen).await, "2.1");
    // Still the 25% weighted split: weights {3, 1}, exactly 1 canary in every 4.
    assert_eq!(count_canary(&h.listen, 40).await, 10);

    // The actuator is still usable after the failure.
    let fixed = [route(&h.listen, &[&s], &[&c], 50, Some("$cookie_uid"))];
    h.actuator
        .apply_routes(&fixed, "2.3")
        .await
        .expect("apply fixed");
    assert_eq!(served_generation(&h.listen).await, "2.3");
    h.nginx.stop().await;
}

/// (d) Up-front checks name the missing path.
#[tokio::test]
async fn new_reports_missing_binary_and_missing_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("nginx.conf");
    std::fs::write(&config, "events {}\n").expect("write config");
    let settings = NginxSettings {
        binary: nginx_binary(),
        config: config.clone(),
        prefix: None,
        site: dir.path().join("site.conf"),
        confirm_timeout: Duration::from_secs(1),
        services: vec![],
    };

    let missing = NginxSettings {
        binary: "/usr/sbin/nginxx".into(),
        ..settings.clone()
    };
    let err = NginxActuator::new(missing)
        .await
        .expect_err("missing binary");
    assert!(matches!(err, NginxError::BinaryNotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "nginx binary '/usr/sbin/nginxx' not found (install Debian's nginx package or set \
         nginx.binary)"
    );
    let bare = NginxSettings {
        binary: "serin-test-no-such-nginx".into(),
        ..settings.clone()
    };
    let err = NginxActuator::new(bare)
        .await
        .expect_err("missing binary on PATH");
    assert!(matches!(err, NginxError::BinaryNotFound { .. }), "{err:?}");

    let no_config = dir.path().join("absent.conf");
    let missing = NginxSettings {
        config: no_config.clone(),
        ..settings.clone()
    };
    let err = NginxActuator::new(missing)
        .await
        .expect_err("missing config");
    match &err {
        NginxError::ConfigMissing { path, .. } => assert_eq!(path, &no_config),
        other => panic!("expected ConfigMissing, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&no_config.display().to_string()) && msg.contains("does not exist"),
        "{msg}"
    );

    let dup = NginxSettings {
        services: vec![
            BalancedService {
                service: "a".into(),
                listen: "127.0.0.1:1".into(),
            },
            BalancedService {
                service: "b".into(),
                listen: "127.0.0.1:1".into(),
            },
        ],
        ..settings.clone()
    };
    let err = NginxActuator::new(dup).await.expect_err("duplicate listen");
    assert!(
        err.to_string().contains("nginx.services[1].listen"),
        "{err}"
    );

    let actuator = NginxActuator::new(settings).await.expect("valid settings");
    assert!(
        actuator.version().contains("nginx"),
        "{}",
        actuator.version()
    );
}

/// (e) Identical routes are not reloaded again, unless the live file was changed by someone.
#[tokio::test]
async fn reapplying_identical_routes_is_unchanged() {
    let mut h = harness().await;
    let (s, c) = (backend("stable-1").await, backend("canary-1").await);
    let routes = [route(&h.listen, &[&s], &[&c], 10, None)];
    let first = h
        .actuator
        .apply_routes(&routes, "3.1")
        .await
        .expect("first apply");
    assert!(matches!(first, Applied::Reloaded { .. }), "{first:?}");

    let again = h
        .actuator
        .apply_routes(&routes, "3.2")
        .await
        .expect("re-apply");
    assert_eq!(again, Applied::Unchanged);
    assert_eq!(served_generation(&h.listen).await, "3.1");

    // A different weight is a change.
    let changed = [route(&h.listen, &[&s], &[&c], 20, None)];
    let applied = h
        .actuator
        .apply_routes(&changed, "3.3")
        .await
        .expect("changed");
    assert!(matches!(applied, Applied::Reloaded { .. }), "{applied:?}");
    assert_eq!(served_generation(&h.listen).await, "3.3");

    // Someone edits the file: it is no longer ours, so the same routes are reloaded.
    let site = h.nginx.site_path().to_owned();
    let mut text = std::fs::read_to_string(&site).expect("read site");
    text.push_str("# hand edit\n");
    std::fs::write(&site, text).expect("edit site");
    let applied = h
        .actuator
        .apply_routes(&changed, "3.4")
        .await
        .expect("re-own");
    assert!(matches!(applied, Applied::Reloaded { .. }), "{applied:?}");
    assert_eq!(served_generation(&h.listen).await, "3.4");
    h.nginx.stop().await;
}

/// A reload nginx accepts (exit 0) but cannot apply: a listen port that is already bound.
/// Only the generation marker notices; the previous file comes back.
#[tokio::test]
async fn reload_that_cannot_bind_is_not_confirmed_and_rolled_back() {
    let mut h = harness().await;
    let mut settings = h.actuator.settings().clone();
    settings.confirm_timeout = Duration::from_millis(800);
    h.actuator = NginxActuator::new(settings).await.expect("actuator");
    let (s, c) = (backend("stable-1").await, backend("canary-1").await);
    let first = [route(&h.listen, &[&s], &[&c], 0, None)];
    h.actuator
        .apply_routes(&first, "4.1")
        .await
        .expect("apply first");
    let site = h.nginx.site_path().to_owned();
    let before = std::fs::read(&site).expect("read site");

    // Held for the whole test; never accepts, so probes to it time out.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind squatter");
    let taken = squatter.local_addr().expect("addr").to_string();
    let mut second = route(&taken, &[&s], &[&c], 0, None);
    second.service = "api".into();

    let both = [first[0].clone(), second];
    let err = h
        .actuator
        .apply_routes(&both, "4.2")
        .await
        .expect_err("port in use");
    match &err {
        NginxError::NotConfirmed {
            generation,
            address,
            last_seen,
            ..
        } => {
            assert_eq!(generation, "4.2");
            // The whole reload failed, so whichever address is probed first never answers
            // 4.2: the old one still says 4.1, the squatted one never answers.
            if address == &h.listen {
                assert_eq!(last_seen, "generation \"4.1\"");
            } else {
                assert_eq!(address, &taken);
            }
        }
        other => panic!("expected NotConfirmed, got {other:?}"),
    }
    assert_eq!(std::fs::read(&site).expect("read site"), before);
    assert_eq!(served_generation(&h.listen).await, "4.1");
    assert_eq!(count_canary(&h.listen, 20).await, 0);

    // nginx's own account, which only error.log has.
    let log = h.nginx.error_log_path().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&format!(
            "bind() to {taken} failed (98: Address already in use)"
        )) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no bind error in {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(squatter);
    h.nginx.stop().await;
}

/// Sticky split: stable per key, and growing the canary share keeps earlier canary users.
#[tokio::test]
async fn sticky_split_keeps_canary_users_as_share_grows() {
    let mut h = harness().await;
    let (s, c) = (backend("stable-1").await, backend("canary-1").await);
    let users: Vec<String> = (0..200).map(|i| format!("uid=user-{i}")).collect();
    let canary_users = |h_listen: String, users: Vec<String>| async move {
        let mut set = HashSet::new();
        for u in &users {
            let (status, body) = get(&h_listen, "/", Some(u)).await;
            assert_eq!(status, 200);
            if body.starts_with("canary") {
                set.insert(u.clone());
            }
        }
        set
    };

    let at30 = [route(&h.listen, &[&s], &[&c], 30, Some("$cookie_uid"))];
    h.actuator
        .apply_routes(&at30, "5.1")
        .await
        .expect("apply 30%");
    let first = canary_users(h.listen.clone(), users.clone()).await;
    let repeat = canary_users(h.listen.clone(), users.clone()).await;
    assert_eq!(first, repeat, "assignment must be stable per key");
    // split_clients hashes the key (MurmurHash2): for 200 distinct keys the canary count
    // behaves like Binomial(200, 0.3): mean 60, sigma ~6.5; +-4 sigma is 34..=86.
    assert!(
        (34..=86).contains(&first.len()),
        "{} of 200 at 30%",
        first.len()
    );

    // Requests without the cookie (first visits) must split by weight too, not all hash to
    // the canary's first bucket: 200 of them behave like Binomial(200, 0.3) as above.
    let mut keyless_canary = 0;
    for _ in 0..200 {
        let (status, body) = get(&h.listen, "/", None).await;
        assert_eq!(status, 200);
        keyless_canary += usize::from(body.starts_with("canary"));
    }
    assert!(
        (34..=86).contains(&keyless_canary),
        "{keyless_canary} of 200 requests without the key went to the canary at 30%"
    );

    let at60 = [route(&h.listen, &[&s], &[&c], 60, Some("$cookie_uid"))];
    h.actuator
        .apply_routes(&at60, "5.2")
        .await
        .expect("apply 60%");
    let grown = canary_users(h.listen.clone(), users.clone()).await;
    assert!(
        first.is_subset(&grown),
        "canary users lost when growing 30% -> 60%"
    );
    assert!(grown.len() > first.len());
    assert!(
        (94..=146).contains(&grown.len()),
        "{} of 200 at 60%",
        grown.len()
    );
    h.nginx.stop().await;
}

/// Every shape the renderer produces is accepted by `nginx -t`.
#[tokio::test]
async fn rendered_variants_pass_nginx_config_test() {
    let h = harness().await;
    let upstreams = |ns: u16, nc: u16| -> Vec<Server> {
        (0..ns)
            .map(|i| Server {
                name: format!("stable-{i}"),
                address: format!("127.0.0.1:{}", 20000 + i),
                variant: Variant::Stable,
            })
            .chain((0..nc).map(|i| Server {
                name: format!("canary-{i}"),
                address: format!("127.0.0.1:{}", 21000 + i),
                variant: Variant::Canary,
            }))
            .collect()
    };
    let mut cases = Vec::new();
    for w in [0, 1, 33, 99, 100] {
        for sticky in [
            None,
            Some("$cookie_uid"),
            Some("${remote_addr}${http_user_agent}"),
        ] {
            let (ns, nc) = match w {
                0 => (2, 0),
                100 => (0, 3),
                _ => (3, 2),
            };
            cases.push(Route {
                service: format!("svc.{w}-{}", cases.len()),
                listen: format!("127.0.0.1:{}", 30000 + cases.len()),
                servers: upstreams(ns, nc),
                canary_weight: w,
                sticky_key: sticky.map(str::to_owned),
                stable_version: "v1".into(),
                canary_version: "v2".into(),
                overrides: Default::default(),
            });
        }
    }
    // A service waiting for its servers from the coordinator: none at all, no rollout.
    for sticky in [None, Some("$cookie_uid")] {
        cases.push(Route {
            service: format!("waiting-{}", cases.len()),
            listen: format!("127.0.0.1:{}", 30000 + cases.len()),
            servers: Vec::new(),
            canary_weight: 0,
            sticky_key: sticky.map(str::to_owned),
            stable_version: String::new(),
            canary_version: String::new(),
            overrides: Default::default(),
        });
    }
    // Overrides (header, cookie, both) in every mode, including variants without servers.
    let names = [
        (Some("X-Serin-Variant"), None),
        (None, Some("serin_variant")),
        (Some("x-tester-9"), Some("SerinVariant")),
    ];
    for (w, ns, nc) in [(0, 2, 0), (0, 1, 1), (5, 3, 2), (100, 1, 1), (100, 0, 2)] {
        for sticky in [None, Some("$cookie_uid")] {
            for (header, cookie) in names {
                cases.push(Route {
                    service: format!("override-{}", cases.len()),
                    listen: format!("127.0.0.1:{}", 30000 + cases.len()),
                    servers: upstreams(ns, nc),
                    canary_weight: w,
                    sticky_key: sticky.map(str::to_owned),
                    stable_version: "v1".into(),
                    canary_version: "v2".into(),
                    overrides: VariantOverride {
                        header: header.map(str::to_owned),
                        cookie: cookie.map(str::to_owned),
                    },
                });
            }
        }
    }
    // One file holding every case at once also checks that identifiers do not collide.
    let text = render_site(&cases, "9.9").expect("render");
    std::fs::write(h.nginx.site_path(), &text).expect("write site");
    if let Err(e) = h.actuator.test_config().await {
        panic!("{e}\n--- rendered ---\n{text}");
    }
}

/// A balancer without `[[instances]]`: nginx answers 503 until the coordinator's inventory
/// sends servers, then routes to exactly those (and to the new ones when they change).
#[tokio::test]
async fn a_balancer_routes_to_the_servers_the_coordinator_sends() {
    use crate::actuator::TrafficActuator;
    use crate::store::{DesiredState, Generation, ServiceTraffic, UpstreamServer};
    use crate::traffic::Upstreams;

    let mut h = harness().await;
    let (s1, s2, c1) = (
        backend("stable-1").await,
        backend("stable-2").await,
        backend("canary-1").await,
    );
    let local = Upstreams::default();
    let state = |index, traffic: Option<ServiceTraffic>| DesiredState {
        generation: Generation { term: 4, index },
        services: traffic.into_iter().collect(),
    };
    let inventory = |weight, servers: &[(&Backend, Variant)]| ServiceTraffic {
        service: "web".into(),
        canary_weight: weight,
        stable_version: "v1".into(),
        canary_version: "v2".into(),
        servers: servers
            .iter()
            .map(|(b, variant)| UpstreamServer {
                instance: format!("web-{}", b.addr.port()),
                address: b.addr.to_string(),
                variant: *variant,
                weight: 1,
                agent: "app".into(),
            })
            .collect(),
        from_inventory: true,
        ..Default::default()
    };
    let carried = h.actuator.services();
    let mut apply = async |desired: DesiredState| {
        let upstreams = Upstreams::for_desired(&desired, &local, &carried).expect("routable");
        h.actuator
            .apply(&desired, &upstreams)
            .await
            .unwrap_or_else(|e| panic!("apply {}: {e:?}", desired.generation));
    };
    // Bodies of `n` requests, counted per backend name.
    let bodies = async |listen: &str, n: usize| {
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..n {
            let (status, body) = get(listen, "/", None).await;
            assert_eq!(status, 200, "{body}");
            *seen.entry(body).or_default() += 1;
        }
        seen
    };

    // Nothing from the coordinator yet.
    apply(state(1, None)).await;
    assert_eq!(served_generation(&h.listen).await, "4.1");
    let (status, body) = get(&h.listen, "/", None).await;
    assert_eq!((status, body.as_str()), (503, "no servers yet\n"));

    let split = inventory(50, &[(&s1, Variant::Stable), (&c1, Variant::Canary)]);
    apply(state(2, Some(split))).await;
    assert_eq!(served_generation(&h.listen).await, "4.2");
    let seen = bodies(&h.listen, 40).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["canary-1", "stable-1"]);
    // One worker's smooth round robin over weights {1, 1}: exactly half, give or take a
    // request served by the previous worker generation.
    assert!(seen["canary-1"].abs_diff(20) <= 1, "{seen:?}");

    // The inventory changes: stable-1 leaves, stable-2 joins; the rollout ended.
    apply(state(3, Some(inventory(0, &[(&s2, Variant::Stable)])))).await;
    assert_eq!(served_generation(&h.listen).await, "4.3");
    let seen = bodies(&h.listen, 10).await;
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["stable-2"], "{seen:?}");
    h.nginx.stop().await;
}

/// `stop` quits gracefully: the master exits and removes its pid file.
/// Header and cookie overrides through a real nginx, in weighted and sticky mode, at 0%, 1%
/// and 100%: every combination of header and cookie value lands where
/// [`VariantOverride::choose`] (the balancer-neutral rules) says, and unmarked requests take
/// the normal split.
#[tokio::test]
async fn overrides_send_marked_requests_to_their_variant_and_the_rest_split() {
    let mut h = harness().await;
    let (s1, s2, c1) = (
        backend("stable-1").await,
        backend("stable-2").await,
        backend("canary-1").await,
    );
    let overrides = VariantOverride {
        header: Some("X-Serin-Variant".into()),
        cookie: Some("serin_variant".into()),
    };
    let header_values = [None, Some("canary"), Some("Stable"), Some("bogus")];
    let cookie_values = [None, Some("CANARY"), Some("stable"), Some("x")];
    let variant_of = |body: &str| match body {
        b if b.starts_with("canary") => Variant::Canary,
        b if b.starts_with("stable") => Variant::Stable,
        b => panic!("unexpected body {b:?}"),
    };
    let mut generation = 0;
    // At 0% and 100% the normal split is deterministic, so every case has one answer.
    // (stable servers, canary servers, weight, sticky)
    type Case<'a> = (&'a [&'a Backend], &'a [&'a Backend], u32, Option<&'a str>);
    let cases: [Case; 5] = [
        (&[&s1, &s2], &[&c1], 0, None),
        (&[&s1, &s2], &[&c1], 0, Some("$cookie_uid")),
        (&[&s1, &s2], &[&c1], 100, None),
        (&[&s1, &s2], &[&c1], 100, Some("$cookie_uid")),
        // No canary server: "canary" falls through to the split (all stable).
        (&[&s1], &[], 0, Some("$cookie_uid")),
    ];
    for (stable, canary, weight, sticky) in cases {
        let mut r = route(&h.listen, stable, canary, weight, sticky);
        r.overrides = overrides.clone();
        generation += 1;
        h.actuator
            .apply_routes(&[r.clone()], &format!("5.{generation}"))
            .await
            .unwrap_or_else(|e| panic!("apply {weight}% {sticky:?}: {e}"));
        let normal = if weight == 100 {
            Variant::Canary
        } else {
            Variant::Stable
        };
        for header in header_values {
            for cookie in cookie_values {
                let mut headers = Vec::new();
                if let Some(v) = header {
                    headers.push(format!("X-Serin-Variant: {v}"));
                }
                let mut cookies = vec!["uid=user-7".to_owned()];
                if let Some(v) = cookie {
                    cookies.push(format!("serin_variant={v}"));
                }
                headers.push(format!("Cookie: {}", cookies.join("; ")));
                let expected = overrides
                    .choose(header, cookie, |v| r.servers_of(v).next().is_some())
                    .unwrap_or(normal);
                let (status, body) = get_with_headers(&h.listen, "/", &headers).await;
                assert_eq!(status, 200, "{body}");
                assert_eq!(
                    variant_of(&body),
                    expected,
                    "{weight}% {sticky:?} header {header:?} cookie {cookie:?}:\n{}",
                    std::fs::read_to_string(h.nginx.site_path()).unwrap_or_default()
                );
            }
        }
    }

    // At 1%: every marked request reaches its variant, unmarked ones split (2 of 200 picks
    // per cycle are canary with weights {99, 99, 2}; a second worker generation may add one).
    // Weighted last: its split is deterministic, the sticky one (random keys) is not.
    for sticky in [Some("$cookie_uid"), None] {
        let mut r = route(&h.listen, &[&s1, &s2], &[&c1], 1, sticky);
        r.overrides = overrides.clone();
        generation += 1;
        h.actuator
            .apply_routes(&[r], &format!("5.{generation}"))
            .await
            .expect("apply 1%");
        for (marker, expected) in [
            ("X-Serin-Variant: canary", Variant::Canary),
            ("Cookie: serin_variant=canary", Variant::Canary),
            ("X-Serin-Variant: stable", Variant::Stable),
        ] {
            for _ in 0..20 {
                let (status, body) = get_with_headers(&h.listen, "/", &[marker.to_owned()]).await;
                assert_eq!(status, 200, "{body}");
                assert_eq!(variant_of(&body), expected, "1% {sticky:?} {marker}");
            }
        }
    }
    let canary = count_canary(&h.listen, 100).await;
    assert!(
        canary <= 3,
        "{canary} of 100 unmarked requests reached the canary at 1%"
    );

    // Without overrides, the marker means nothing: at 0% everything is stable.
    generation += 1;
    h.actuator
        .apply_routes(
            &[route(&h.listen, &[&s1, &s2], &[&c1], 0, None)],
            &format!("5.{generation}"),
        )
        .await
        .expect("apply 0% without overrides");
    for _ in 0..20 {
        let (_, body) =
            get_with_headers(&h.listen, "/", &["X-Serin-Variant: canary".to_owned()]).await;
        assert_eq!(variant_of(&body), Variant::Stable, "{body}");
    }
    h.nginx.stop().await;
}

#[tokio::test]
async fn local_nginx_stops_and_removes_pid_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = LocalNginx::start(dir.path(), &nginx_binary())
        .await
        .expect("start");
    assert!(nginx.pid().is_some());
    let pid_file = nginx.dir().join("nginx.pid");
    assert!(pid_file.exists());
    nginx.stop().await;
    assert!(!pid_file.exists(), "nginx left its pid file behind");
}

/// After `apply_routes` returns, fresh connections only ever see the new generation, although
/// nginx itself keeps old workers accepting for ~100 ms after the new ones answer.
#[tokio::test]
async fn no_old_generation_after_apply_returns() {
    let mut h = harness().await;
    let (s, c) = (backend("stable-1").await, backend("canary-1").await);
    for i in 0..6u32 {
        let generation = format!("6.{i}");
        let routes = [route(&h.listen, &[&s], &[&c], (i % 2) * 50, None)];
        let applied = h
            .actuator
            .apply_routes(&routes, &generation)
            .await
            .expect("apply");
        assert!(matches!(applied, Applied::Reloaded { .. }), "{applied:?}");
        for _ in 0..30 {
            assert_eq!(served_generation(&h.listen).await, generation);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    h.nginx.stop().await;
}

/// The [`crate::actuator::TrafficActuator`] contract, against real nginx through the
/// [`crate::balancer::Balancer`] the runtime drives; then the traffic it left live is the
/// last state's (all stable).
#[tokio::test]
async fn nginx_actuator_keeps_the_traffic_actuator_contract() {
    let h = harness().await;
    let (s, c) = (backend("stable-1").await, backend("canary-1").await);
    let server = |b: &Backend, variant| {
        let server = Server {
            name: format!("web-{variant:?}"),
            address: b.addr.to_string(),
            variant,
        };
        ("web".to_owned(), server)
    };
    let upstreams: crate::traffic::Upstreams =
        [server(&s, Variant::Stable), server(&c, Variant::Canary)]
            .into_iter()
            .collect();
    let mut balancer = crate::balancer::Balancer::Nginx(h.actuator);
    assert_eq!(balancer.kind(), "nginx");
    crate::actuator::conformance::check(&mut balancer, &upstreams).await;
    assert_eq!(count_canary(&h.listen, 20).await, 0);
    h.nginx.stop().await;
}

/// Raw nginx reload behaviour, without the actuator's settle window:
/// `cargo test -p serin-agent measure_reload -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement, prints timings"]
async fn measure_reload_timing() {
    let h = harness().await;
    let (s, c) = (backend("stable-1").await, backend("canary-1").await);
    let runs = 30;
    let mut firsts = Vec::new();
    let mut last_stales = Vec::new();
    for i in 0..runs {
        let generation = format!("9.{i}");
        let routes = [route(&h.listen, &[&s], &[&c], (i % 2) * 50, None)];
        let text = render_site(&routes, &generation).expect("render");
        write_atomic(h.nginx.site_path(), text.as_bytes())
            .await
            .expect("write");
        h.actuator.test_config().await.expect("nginx -t");
        let t0 = tokio::time::Instant::now();
        h.actuator.reload().await.expect("reload");
        let mut first = None;
        let mut last_stale = None;
        while t0.elapsed() < Duration::from_millis(400) {
            let seen = h
                .actuator
                .probe(&h.listen, t0 + Duration::from_secs(2))
                .await;
            if seen.as_deref() == Ok(generation.as_str()) {
                first.get_or_insert(t0.elapsed());
            } else if first.is_some() {
                last_stale = Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        firsts.push(first.expect("new generation never answered"));
        last_stales.extend(last_stale);
    }
    firsts.sort();
    last_stales.sort();
    eprintln!(
        "reload -> first new answer: p50 {:?}, max {:?}; old answers after the first new one \
         in {}/{runs} reloads, latest {:?} after the reload command",
        firsts[firsts.len() / 2],
        firsts.last(),
        last_stales.len(),
        last_stales.last(),
    );
}

/// What the override maps cost per request, side by side on one nginx: a weighted service
/// without overrides, a sticky one without overrides (its `proxy_pass` takes a variable, as
/// with overrides), and a weighted one with a header and a cookie override, requested
/// unmarked, with the header and with the cookie. Keep-alive requests to nginx (so the
/// connection setup does not drown the difference), interleaved in rounds whose order rotates
/// so that drift and warm-up hit every case alike.
/// `cargo nextest run -p serin-agent measure_override --run-ignored only --no-capture`;
/// results in docs/benchmarks.md §6.
#[tokio::test]
#[ignore = "measurement, prints timings"]
async fn measure_override_cost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nginx = LocalNginx::start(dir.path(), &nginx_binary())
        .await
        .expect("start local nginx");
    let (plain_listen, sticky_listen, override_listen) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let settings = nginx.settings(vec![
        BalancedService {
            service: "plain".into(),
            listen: plain_listen.clone(),
        },
        BalancedService {
            service: "sticky".into(),
            listen: sticky_listen.clone(),
        },
        BalancedService {
            service: "marked".into(),
            listen: override_listen.clone(),
        },
    ]);
    let mut actuator = NginxActuator::new(settings).await.expect("actuator");
    let (s, c) = (backend("stable-1").await, backend("canary-1").await);
    let mut plain = route(&plain_listen, &[&s], &[&c], 5, None);
    plain.service = "plain".into();
    let mut sticky = route(&sticky_listen, &[&s], &[&c], 5, Some("$cookie_uid"));
    sticky.service = "sticky".into();
    let mut marked = route(&override_listen, &[&s], &[&c], 5, None);
    marked.service = "marked".into();
    marked.overrides = VariantOverride {
        header: Some("X-Serin-Variant".into()),
        cookie: Some("serin_variant".into()),
    };
    actuator
        .apply_routes(&[plain, sticky, marked], "8.1")
        .await
        .expect("apply");

    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    // (name, listen address, the request's marker header)
    type Case<'a> = (&'a str, &'a str, Option<(&'a str, &'a str)>);
    let cases: [Case; 5] = [
        ("weighted, no overrides", &plain_listen, None),
        ("sticky, no overrides", &sticky_listen, None),
        ("overrides, unmarked", &override_listen, None),
        (
            "overrides, header canary",
            &override_listen,
            Some(("X-Serin-Variant", "canary")),
        ),
        (
            "overrides, cookie canary",
            &override_listen,
            Some(("Cookie", "serin_variant=canary")),
        ),
    ];
    let (rounds, per_round) = (20, 250);
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for k in 0..cases.len() {
            let i = (k + round) % cases.len();
            let (_, listen, header) = cases[i];
            let url = format!("http://{listen}/");
            for _ in 0..per_round {
                let mut request = client.get(&url);
                if let Some((name, value)) = header {
                    request = request.header(name, value);
                }
                let t0 = std::time::Instant::now();
                let response = request.send().await.expect("request");
                let _ = response.bytes().await.expect("body");
                samples[i].push(t0.elapsed());
            }
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let p99 = |v: &Vec<Duration>| v[v.len() * 99 / 100];
    let base = median(&mut samples[0]);
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let m = median(&mut samples[i]);
        eprintln!(
            "{name:26} median {:>6.1} µs  p99 {:>6.1} µs  ratio {:.3}  ({} requests)",
            m.as_secs_f64() * 1e6,
            p99(&samples[i]).as_secs_f64() * 1e6,
            m.as_secs_f64() / base.as_secs_f64(),
            samples[i].len()
        );
    }
    nginx.stop().await;
}
