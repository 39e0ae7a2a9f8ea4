//! Tests against a real HAProxy (Debian's package) started through [`LocalHaproxy`], with the
//! in-test HTTP backends of the nginx tests. They fail, rather than skip, when HAProxy is not
//! installed.

use std::path::PathBuf;

use super::*;
use crate::actuator::conformance;
use crate::nginx::tests::{Backend, backend, free_port, get, get_with_headers};
use crate::store::{Generation, ServiceTraffic};
use crate::test_support::traffic;
use crate::traffic::{Server, VariantOverride};

fn haproxy_binary() -> PathBuf {
    find_haproxy()
        .expect("haproxy not found on PATH or at /usr/sbin/haproxy: apt-get install -y haproxy")
}

/// A running HAProxy with an actuator carrying `web` on a free loopback port.
struct Rig {
    /// `None` while a test has it stopped.
    haproxy: Option<LocalHaproxy>,
    dir: PathBuf,
    actuator: HaproxyActuator,
    listen: String,
    _dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let haproxy = LocalHaproxy::start(&dir.path().join("haproxy"), &haproxy_binary())
        .await
        .expect("haproxy starts");
    let listen = format!("127.0.0.1:{}", free_port());
    let settings = haproxy.settings(vec![HaproxyService {
        service: "web".into(),
        listen: listen.clone(),
        algorithm: None,
    }]);
    let actuator = HaproxyActuator::new(settings).await.expect("actuator");
    Rig {
        dir: haproxy.dir().to_owned(),
        haproxy: Some(haproxy),
        actuator,
        listen,
        _dir: dir,
    }
}

impl Rig {
    async fn stop(&mut self) {
        if let Some(haproxy) = self.haproxy.take() {
            haproxy.stop().await;
        }
    }

    /// Starts HAProxy again in the same directory, from the config file as it is.
    async fn start(&mut self) {
        self.stop().await;
        let haproxy = LocalHaproxy::start(&self.dir, &haproxy_binary())
            .await
            .expect("haproxy restarts");
        self.haproxy = Some(haproxy);
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("haproxy.cfg")
    }
}

fn server(name: &str, backend: &Backend, variant: Variant) -> Server {
    Server {
        name: name.into(),
        address: backend.addr.to_string(),
        variant,
    }
}

fn web(servers: &[Server]) -> Upstreams {
    servers
        .iter()
        .map(|s| ("web".to_owned(), s.clone()))
        .collect()
}

fn state(index: u64, services: Vec<ServiceTraffic>) -> DesiredState {
    DesiredState {
        generation: Generation { term: 1, index },
        services,
    }
}

async fn pid(rig: &Rig) -> u32 {
    rig.actuator
        .runtime_api()
        .process()
        .await
        .expect("show info")
        .pid
}

/// Answers per backend name over `n` fresh-connection requests through HAProxy.
async fn split(listen: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let (status, body) = get(listen, "/", None).await;
        assert_eq!(status, 200, "{body}");
        *counts.entry(body).or_insert(0) += 1;
    }
    counts
}

/// (weight, ready) of every slot holding a server, by address.
async fn live_weights(rig: &Rig) -> Vec<(String, u32, bool)> {
    let slots = rig
        .actuator
        .runtime_api()
        .servers_state("serin_web")
        .await
        .expect("show servers state");
    let mut held: Vec<(String, u32, bool)> = slots
        .into_iter()
        .filter(|s| s.ready)
        .map(|s| (format!("{}:{}", s.addr, s.port), s.weight, s.ready))
        .collect();
    held.sort();
    held
}

#[tokio::test]
async fn haproxy_actuator_keeps_the_actuator_contract() {
    let stable = backend("stable").await;
    let canary = backend("canary").await;
    let mut rig = rig().await;
    let upstreams = web(&[
        server("s", &stable, Variant::Stable),
        server("c", &canary, Variant::Canary),
    ]);
    conformance::check(&mut rig.actuator, &upstreams).await;
}

#[tokio::test]
async fn a_weight_change_goes_through_the_runtime_api_without_a_reload() {
    let stable = backend("stable").await;
    let canary = backend("canary").await;
    let mut rig = rig().await;
    let upstreams = web(&[
        server("s", &stable, Variant::Stable),
        server("c", &canary, Variant::Canary),
    ]);
    let first = rig
        .actuator
        .apply(&state(1, vec![traffic("web", 0, None)]), &upstreams)
        .await;
    assert!(first.is_ok(), "{first:?}");
    assert_eq!(
        split(&rig.listen, 20).await.get("stable"),
        Some(&20),
        "all stable at 0%"
    );
    let worker = pid(&rig).await;
    let config_before = std::fs::read_to_string(rig.config_path()).unwrap();

    let plans = rig
        .actuator
        .plans(&state(2, vec![traffic("web", 25, None)]), &upstreams)
        .expect("plans");
    let applied = rig.actuator.apply_services(&plans).await.expect("applied");
    assert!(
        matches!(applied, Applied::Runtime { commands: 2, .. }),
        "two weight commands, no reload: {applied:?}"
    );
    assert_eq!(pid(&rig).await, worker, "the same worker: no reload");
    let mut expected = vec![
        (stable.addr.to_string(), 3, true),
        (canary.addr.to_string(), 1, true),
    ];
    expected.sort();
    assert_eq!(live_weights(&rig).await, expected);
    // roundrobin with weights 3:1 (its position carries over the change, so about 10).
    let counts = split(&rig.listen, 40).await;
    let canary_count = counts.get("canary").copied().unwrap_or(0);
    assert!(
        (8..=12).contains(&canary_count) && counts.values().sum::<usize>() == 40,
        "{counts:?}"
    );
    // The file follows, so a restart comes back with 25%.
    let config_after = std::fs::read_to_string(rig.config_path()).unwrap();
    assert_ne!(config_before, config_after);
    assert!(config_after.contains("weight 3") && config_after.contains("weight 1"));
    rig.stop().await;
}

#[tokio::test]
async fn membership_changes_use_parked_slots_and_only_running_out_of_slots_reloads() {
    let backends = [
        backend("stable-1").await,
        backend("stable-2").await,
        backend("stable-3").await,
        backend("stable-4").await,
        backend("stable-5").await,
    ];
    let mut rig = rig().await;
    let all: Vec<Server> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| server(&format!("stable-{}", i + 1), b, Variant::Stable))
        .collect();
    let desired = state(1, vec![]);
    let result = rig.actuator.apply(&desired, &web(&all[..1])).await;
    assert!(result.is_ok(), "{result:?}");
    let worker = pid(&rig).await;

    // A second server takes a parked slot at run time.
    let result = rig.actuator.apply(&desired, &web(&all[..2])).await;
    assert!(
        matches!(result, Ok(ActuatorOutcome::Changed { .. })),
        "{result:?}"
    );
    assert_eq!(pid(&rig).await, worker, "no reload for a new server");
    let counts = split(&rig.listen, 20).await;
    let second = counts.get("stable-2").copied().unwrap_or(0);
    assert!(
        (8..=12).contains(&second) && counts.contains_key("stable-1"),
        "both serve: {counts:?}"
    );

    // The first leaves: parked, no traffic, no reload.
    let result = rig.actuator.apply(&desired, &web(&all[1..2])).await;
    assert!(
        matches!(result, Ok(ActuatorOutcome::Changed { .. })),
        "{result:?}"
    );
    assert_eq!(pid(&rig).await, worker, "no reload for a server leaving");
    assert_eq!(split(&rig.listen, 10).await.get("stable-2"), Some(&10));

    // Five servers do not fit in four slots: one reload grows the backend to eight.
    let result = rig.actuator.apply(&desired, &web(&all)).await;
    assert!(
        matches!(result, Ok(ActuatorOutcome::Changed { .. })),
        "{result:?}"
    );
    assert_ne!(
        pid(&rig).await,
        worker,
        "more servers than slots is a reload"
    );
    let slots = rig
        .actuator
        .runtime_api()
        .servers_state("serin_web")
        .await
        .unwrap();
    assert_eq!(slots.len(), 8, "{slots:?}");
    let counts = split(&rig.listen, 50).await;
    assert_eq!(counts.len(), 5, "every server answers: {counts:?}");
    assert!(counts.values().all(|n| *n == 10), "{counts:?}");
    rig.stop().await;
}

#[tokio::test]
async fn a_restarted_haproxy_gets_the_applied_weights_back() {
    let stable = backend("stable").await;
    let canary = backend("canary").await;
    let mut rig = rig().await;
    let upstreams = web(&[
        server("s", &stable, Variant::Stable),
        server("c", &canary, Variant::Canary),
    ]);
    let at_10 = state(1, vec![traffic("web", 10, None)]);
    assert!(rig.actuator.apply(&at_10, &upstreams).await.is_ok());
    let old_config = std::fs::read_to_string(rig.config_path()).unwrap();
    let at_50 = state(2, vec![traffic("web", 50, None)]);
    assert!(matches!(
        rig.actuator.apply(&at_50, &upstreams).await,
        Ok(ActuatorOutcome::Changed { .. })
    ));

    // A plain restart comes back from the file with 50%: nothing to put back.
    rig.start().await;
    let restarted = pid(&rig).await;
    assert_eq!(
        rig.actuator.apply(&at_50, &upstreams).await,
        Ok(ActuatorOutcome::Unchanged)
    );

    // Killed and restarted from an older file (a restore, or a restart racing the write):
    // the re-apply of the same state puts 50% back through the runtime API, no reload.
    rig.stop().await;
    std::fs::write(rig.config_path(), &old_config).unwrap();
    rig.start().await;
    let again = pid(&rig).await;
    assert_ne!(again, restarted, "a new HAProxy");
    let counts = split(&rig.listen, 20).await;
    assert_eq!(counts.get("canary"), Some(&2), "back at 10%: {counts:?}");
    let result = rig.actuator.apply(&at_50, &upstreams).await;
    assert!(
        matches!(result, Ok(ActuatorOutcome::Changed { .. })),
        "{result:?}"
    );
    assert_eq!(pid(&rig).await, again, "put back without a reload");
    // roundrobin's position survives the change, so check the weights, not a short count.
    let weights: Vec<u32> = live_weights(&rig).await.iter().map(|w| w.1).collect();
    assert_eq!(weights, [1, 1], "back at 50%");

    // A weight changed by hand is put back too.
    let api = rig.actuator.runtime_api().clone();
    api.set("set server serin_web/slot1 weight 7")
        .await
        .unwrap();
    let result = rig.actuator.apply(&at_50, &upstreams).await;
    assert!(
        matches!(result, Ok(ActuatorOutcome::Changed { .. })),
        "{result:?}"
    );
    assert_eq!(
        rig.actuator.apply(&at_50, &upstreams).await,
        Ok(ActuatorOutcome::Unchanged)
    );
    rig.stop().await;
}

#[tokio::test]
async fn a_sticky_split_is_refused_naming_the_service_and_changes_nothing() {
    let stable = backend("stable").await;
    let canary = backend("canary").await;
    let mut rig = rig().await;
    let upstreams = web(&[
        server("s", &stable, Variant::Stable),
        server("c", &canary, Variant::Canary),
    ]);
    let at_25 = state(1, vec![traffic("web", 25, None)]);
    assert!(rig.actuator.apply(&at_25, &upstreams).await.is_ok());
    let sticky = state(2, vec![traffic("web", 50, Some("$cookie_uid"))]);
    let failure = rig
        .actuator
        .apply(&sticky, &upstreams)
        .await
        .expect_err("sticky refused");
    assert_eq!(failure.services, ["web"]);
    assert!(
        failure.error.contains("service 'web'") && failure.error.contains("sticky"),
        "{failure:?}"
    );
    assert_eq!(
        rig.actuator.apply(&at_25, &upstreams).await,
        Ok(ActuatorOutcome::Unchanged),
        "still at 25%"
    );
    rig.stop().await;
}

#[tokio::test]
async fn an_algorithm_that_ignores_runtime_weights_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let settings = HaproxySettings {
        binary: haproxy_binary(),
        config: dir.path().join("haproxy.cfg"),
        socket: dir.path().join("admin.sock"),
        master_socket: dir.path().join("master.sock"),
        slots: 4,
        confirm_timeout: Duration::from_secs(1),
        resync_interval: Duration::from_secs(1),
        services: vec![HaproxyService {
            service: "web".into(),
            listen: "127.0.0.1:1".into(),
            algorithm: Some("uri".into()),
        }],
    };
    let err = HaproxyActuator::new(settings).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("haproxy.services[0].algorithm")
            && text.contains("backend serin_web")
            && text.contains("\"uri\" is hash-based"),
        "{text}"
    );
    assert!(!dir.path().join("haproxy.cfg").exists(), "nothing written");
}

#[tokio::test]
async fn an_haproxy_that_is_not_running_is_an_apply_error_naming_the_socket() {
    let stable = backend("stable").await;
    let mut rig = rig().await;
    let socket = rig.actuator.settings().socket.clone();
    rig.stop().await;
    let failure = rig
        .actuator
        .apply(
            &state(1, vec![]),
            &web(&[server("s", &stable, Variant::Stable)]),
        )
        .await
        .expect_err("no haproxy");
    assert_eq!(failure.services, ["web"]);
    assert!(
        failure.error.contains(&socket.display().to_string()),
        "{failure:?}"
    );
}

/// `traffic("web", weight)` with the override header `X-Serin-Variant` and cookie
/// `serin_variant`.
fn with_overrides(weight: u32) -> ServiceTraffic {
    ServiceTraffic {
        override_header: Some("X-Serin-Variant".into()),
        override_cookie: Some("serin_variant".into()),
        ..traffic("web", weight, None)
    }
}

fn variant_of(body: &str) -> Variant {
    match body {
        b if b.starts_with("canary") => Variant::Canary,
        b if b.starts_with("stable") => Variant::Stable,
        b => panic!("unexpected body {b:?}"),
    }
}

/// The variant one request with the override `header` and `cookie` values reaches (and a
/// `uid` cookie beside, as a browser would send).
async fn reached(listen: &str, header: Option<&str>, cookie: Option<&str>) -> Variant {
    let mut headers = Vec::new();
    if let Some(v) = header {
        headers.push(format!("X-Serin-Variant: {v}"));
    }
    let mut cookies = vec!["uid=user-7".to_owned()];
    if let Some(v) = cookie {
        cookies.push(format!("serin_variant={v}"));
    }
    headers.push(format!("Cookie: {}", cookies.join("; ")));
    let (status, body) = get_with_headers(listen, "/", &headers).await;
    assert_eq!(status, 200, "{body}");
    variant_of(&body)
}

#[tokio::test]
async fn overrides_send_marked_requests_to_their_variant_and_the_rest_split() {
    let (s1, s2, c1) = (
        backend("stable-1").await,
        backend("stable-2").await,
        backend("canary-1").await,
    );
    let mut rig = rig().await;
    let overrides = VariantOverride {
        header: Some("X-Serin-Variant".into()),
        cookie: Some("serin_variant".into()),
    };
    let header_values = [None, Some("canary"), Some("Stable"), Some("bogus")];
    let cookie_values = [None, Some("CANARY"), Some("stable"), Some("x")];
    let both = vec![
        server("stable-1", &s1, Variant::Stable),
        server("stable-2", &s2, Variant::Stable),
        server("canary-1", &c1, Variant::Canary),
    ];
    let no_canary = vec![server("stable-1", &s1, Variant::Stable)];
    // At 0% and 100% the normal split is deterministic, so every case has one answer.
    let cases: [(&[Server], u32); 3] = [(&both, 0), (&both, 100), (&no_canary, 0)];
    let mut index = 0;
    for (servers, weight) in cases {
        index += 1;
        let desired = state(index, vec![with_overrides(weight)]);
        let upstreams = web(servers);
        let applied = rig.actuator.apply(&desired, &upstreams).await;
        assert!(applied.is_ok(), "apply {weight}%: {applied:?}");
        let normal = if weight == 100 {
            Variant::Canary
        } else {
            Variant::Stable
        };
        let route = Route::for_service("web", &rig.listen, &desired, &upstreams);
        for header in header_values {
            for cookie in cookie_values {
                let expected = overrides
                    .choose(header, cookie, |v| route.servers_of(v).next().is_some())
                    .unwrap_or(normal);
                assert_eq!(
                    reached(&rig.listen, header, cookie).await,
                    expected,
                    "{weight}% ({} servers) header {header:?} cookie {cookie:?}:\n{}",
                    servers.len(),
                    std::fs::read_to_string(rig.config_path()).unwrap_or_default()
                );
            }
        }
    }

    // At 1%: every marked request reaches its variant, unmarked ones split (roundrobin over
    // weights {99, 99, 2}: 2 canary picks per 200).
    index += 1;
    let applied = rig
        .actuator
        .apply(&state(index, vec![with_overrides(1)]), &web(&both))
        .await;
    assert!(applied.is_ok(), "apply 1%: {applied:?}");
    for (header, cookie, expected) in [
        (Some("canary"), None, Variant::Canary),
        (None, Some("canary"), Variant::Canary),
        (Some("stable"), None, Variant::Stable),
        (Some("stable"), Some("canary"), Variant::Stable),
    ] {
        for _ in 0..20 {
            assert_eq!(
                reached(&rig.listen, header, cookie).await,
                expected,
                "1% header {header:?} cookie {cookie:?}"
            );
        }
    }
    let counts = split(&rig.listen, 100).await;
    let canary = counts.get("canary-1").copied().unwrap_or(0);
    assert!(
        canary <= 3,
        "{canary} of 100 unmarked requests reached the canary at 1%: {counts:?}"
    );

    // Without overrides, the marker means nothing: at 0% everything is stable.
    index += 1;
    let applied = rig
        .actuator
        .apply(&state(index, vec![traffic("web", 0, None)]), &web(&both))
        .await;
    assert!(applied.is_ok(), "apply 0% without overrides: {applied:?}");
    for _ in 0..20 {
        assert_eq!(
            reached(&rig.listen, Some("canary"), Some("canary")).await,
            Variant::Stable
        );
    }
    assert!(
        !std::fs::read_to_string(rig.config_path())
            .unwrap()
            .contains("use_backend"),
        "no override rules left"
    );
    rig.stop().await;
}

#[tokio::test]
async fn with_overrides_active_weight_and_membership_changes_do_not_reload() {
    let stable = backend("stable").await;
    let canary = backend("canary").await;
    let mut rig = rig().await;
    let both = web(&[
        server("s", &stable, Variant::Stable),
        server("c", &canary, Variant::Canary),
    ]);
    let stable_only = web(&[server("s", &stable, Variant::Stable)]);
    let first = rig
        .actuator
        .apply(&state(1, vec![traffic("web", 0, None)]), &both)
        .await;
    assert!(first.is_ok(), "{first:?}");
    let before = pid(&rig).await;

    // Turning overrides on adds backends and rules: one reload.
    let plans = rig
        .actuator
        .plans(&state(2, vec![with_overrides(0)]), &both)
        .expect("plans");
    let applied = rig.actuator.apply_services(&plans).await.expect("applied");
    assert!(matches!(applied, Applied::Reloaded { .. }), "{applied:?}");
    let worker = pid(&rig).await;
    assert_ne!(worker, before, "new override names are structure");
    assert_eq!(
        reached(&rig.listen, Some("canary"), None).await,
        Variant::Canary
    );

    // Weight changes with overrides active: runtime commands on the main backend only.
    for (index, weight) in [(3, 25), (4, 50), (5, 1)] {
        let plans = rig
            .actuator
            .plans(&state(index, vec![with_overrides(weight)]), &both)
            .expect("plans");
        let applied = rig.actuator.apply_services(&plans).await.expect("applied");
        assert!(
            matches!(applied, Applied::Runtime { .. }),
            "{weight}%: {applied:?}"
        );
        assert_eq!(pid(&rig).await, worker, "{weight}%: no reload");
        for (variant, backend) in [(Variant::Stable, "stable"), (Variant::Canary, "canary")] {
            let slots = rig
                .actuator
                .runtime_api()
                .servers_state(&variant_backend_name("web", variant))
                .await
                .expect("override backend");
            let held: Vec<u32> = slots.iter().filter(|s| s.ready).map(|s| s.weight).collect();
            assert_eq!(
                held,
                [1],
                "{weight}%: {backend} backend holds one server at 1"
            );
        }
    }

    // The canary leaves: parked in its override backend too, "canary" falls through to the
    // split (all stable at 0%), no reload; it comes back the same way.
    let at_0 = state(6, vec![with_overrides(0)]);
    let applied = rig.actuator.apply(&at_0, &stable_only).await;
    assert!(
        matches!(applied, Ok(ActuatorOutcome::Changed { .. })),
        "{applied:?}"
    );
    assert_eq!(pid(&rig).await, worker, "a server leaving: no reload");
    for _ in 0..10 {
        assert_eq!(
            reached(&rig.listen, Some("canary"), None).await,
            Variant::Stable
        );
    }
    let applied = rig.actuator.apply(&at_0, &both).await;
    assert!(
        matches!(applied, Ok(ActuatorOutcome::Changed { .. })),
        "{applied:?}"
    );
    assert_eq!(pid(&rig).await, worker, "a server returning: no reload");
    assert_eq!(
        reached(&rig.listen, Some("canary"), None).await,
        Variant::Canary
    );
    assert_eq!(
        rig.actuator.apply(&at_0, &both).await,
        Ok(ActuatorOutcome::Unchanged)
    );

    // A restart from the file keeps the override backends and rules.
    rig.start().await;
    assert_eq!(
        rig.actuator.apply(&at_0, &both).await,
        Ok(ActuatorOutcome::Unchanged),
        "the file held the override backends"
    );
    assert_eq!(
        reached(&rig.listen, None, Some("canary")).await,
        Variant::Canary
    );

    // Turning them off is structure again.
    let restarted = pid(&rig).await;
    let plans = rig
        .actuator
        .plans(&state(7, vec![traffic("web", 0, None)]), &both)
        .expect("plans");
    let applied = rig.actuator.apply_services(&plans).await.expect("applied");
    assert!(matches!(applied, Applied::Reloaded { .. }), "{applied:?}");
    assert_ne!(pid(&rig).await, restarted);
    let missing = rig
        .actuator
        .runtime_api()
        .servers_state(&variant_backend_name("web", Variant::Canary))
        .await;
    assert!(
        matches!(missing, Err(RuntimeApiError::NoBackend { .. })),
        "{missing:?}"
    );
    rig.stop().await;
}

#[tokio::test]
async fn an_unusable_override_name_is_refused_naming_the_service_and_field() {
    let stable = backend("stable").await;
    let mut rig = rig().await;
    let upstreams = web(&[server("s", &stable, Variant::Stable)]);
    assert!(
        rig.actuator
            .apply(&state(1, vec![traffic("web", 0, None)]), &upstreams)
            .await
            .is_ok()
    );
    let bad = ServiceTraffic {
        override_header: Some("X-V) -m found }".into()),
        ..traffic("web", 0, None)
    };
    let failure = rig
        .actuator
        .apply(&state(2, vec![bad]), &upstreams)
        .await
        .expect_err("refused");
    assert_eq!(failure.services, ["web"]);
    assert!(
        failure
            .error
            .starts_with("service 'web': override_header \"X-V) -m found }\""),
        "{failure:?}"
    );
    assert!(
        !std::fs::read_to_string(rig.config_path())
            .unwrap()
            .contains("use_backend"),
        "nothing written"
    );
    rig.stop().await;
}
