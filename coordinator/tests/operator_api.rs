//! The operator API against a real coordinator (raft node, sled, gRPC) in-process: listing is
//! paged, one rollout's status always fits a reply, and overlong strings are refused before
//! anything is proposed.

use std::time::Duration;

use prost::Message;
use serin_coordinator::limits::{KEEP_FIRST_EVENTS, KEEP_LAST_EVENTS, MAX_REASON};
use serin_coordinator::rollout::{Actor, Command, Generation, Registry, RolloutId};
use serin_coordinator::server::{CoordinatorConfig, run};
use serin_coordinator::service::rollout_to_proto;
use serin_coordinator::strategy::Strategy;
use serin_proto::v1::{
    AgentMessage, GetRolloutRequest, ListRolloutsRequest, Register, StartRolloutRequest,
    SteerAction, SteerRolloutRequest, Target, Variant, agent_message::Body,
    agent_service_client::AgentServiceClient, control_service_client::ControlServiceClient,
    coordinator_message,
};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

/// gRPC's default message limit, which the CLI and tonic use.
const MESSAGE_LIMIT: usize = 4 * 1024 * 1024;

const STRATEGY: &str = "[[stages]]\nweight = 10\nmin_duration = \"1h\"\n";

#[test]
fn one_rollout_with_100000_events_fits_in_a_status_reply() {
    let mut reg = Registry::default();
    let strategy = Strategy::from_toml(STRATEGY).unwrap();
    let id = RolloutId("web-000001".into());
    let mut index = 0;
    let mut next = || {
        index += 1;
        Generation { term: 1, index }
    };
    reg.apply(
        Command::Start {
            id: id.clone(),
            service: "web".into(),
            version: "v2".into(),
            stable_version: Some("v1".into()),
            strategy,
            actor: Actor::Operator("ana".into()),
            at: 1,
        },
        next(),
    )
    .unwrap();
    // The longest reasons an operator may give, with line breaks to escape in JSON.
    let reason = "why\n".repeat(MAX_REASON / 4);
    for n in 0..100_000 {
        let actor = Actor::Operator("a".repeat(64));
        let (reason, at) = (reason.clone(), 2 + n);
        let command = if n % 2 == 0 {
            Command::Pause {
                id: id.clone(),
                actor,
                reason,
                at,
            }
        } else {
            Command::Resume {
                id: id.clone(),
                actor,
                reason,
                at,
            }
        };
        reg.apply(command, next()).unwrap();
    }
    let rollout = reg.rollout(&id).unwrap();
    let reply = rollout_to_proto(rollout, None);
    let size = reply.encoded_len();
    assert!(
        size < MESSAGE_LIMIT / 2,
        "status of a 100,000-event rollout is {size} bytes"
    );
    // Where events were dropped, the history says how many.
    assert_eq!(reply.events.len(), KEEP_FIRST_EVENTS + KEEP_LAST_EVENTS + 1);
    let marker = &reply.events[KEEP_FIRST_EVENTS];
    assert_eq!(marker.kind, "events_dropped");
    assert!(
        marker
            .reason
            .starts_with(&format!("{} events not kept", rollout.events_dropped)),
        "{}",
        marker.reason
    );
    assert_eq!(reply.events[0].kind, "started");
    assert_eq!(reply.events.last().unwrap().at_ms, 100_001);
}

/// A coordinator on a free port with one agent that serves `web` (stable, canary, nginx), so
/// rollouts of `web` can start. Returns the control client, the shutdown token and the server.
async fn coordinator() -> (
    ControlServiceClient<Channel>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig::on_loopback(dir.path().to_owned());
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        run(config, stop, Some(ready_tx)).await.unwrap();
    });
    let addr = ready_rx.await.expect("coordinator started");
    let url = format!("http://{addr}");
    let mut agents = AgentServiceClient::connect(url.clone()).await.unwrap();
    // Retry until the node has elected itself and accepts the session.
    let mut session = None;
    for _ in 0..100 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(AgentMessage {
            body: Some(Body::Register(Register {
                agent: "host-a".into(),
                targets: [
                    ("web-stable", Variant::Stable),
                    ("web-canary", Variant::Canary),
                ]
                .into_iter()
                .map(|(name, variant)| Target {
                    name: name.into(),
                    service: "web".into(),
                    variant: variant as i32,
                    address: "127.0.0.1:1".into(),
                    ..Default::default()
                })
                .collect(),
                balancer_services: vec!["web".into()],
                ..Register::default()
            })),
        })
        .await
        .unwrap();
        let mut inbound = agents
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first = inbound.message().await.unwrap().expect("a first message");
        if let Some(coordinator_message::Body::Desired(_)) = first.body {
            session = Some((inbound, tx));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut inbound, keep_open) = session.expect("a leader accepted the session");
    // Drain desired states for as long as the coordinator runs; keep the agent's side open.
    tokio::spawn(async move {
        let _keep_open = keep_open;
        while let Ok(Some(_)) = inbound.message().await {}
    });
    let client = ControlServiceClient::connect(url).await.unwrap();
    (client, shutdown, server, dir)
}

fn start_request() -> StartRolloutRequest {
    StartRolloutRequest {
        service: "web".into(),
        version: "v2".into(),
        strategy_toml: STRATEGY.into(),
        actor: "ana".into(),
        stable_version: "v1".into(),
    }
}

fn list_request(limit: u32, page_token: &str) -> ListRolloutsRequest {
    ListRolloutsRequest {
        limit,
        page_token: page_token.into(),
        running_only: false,
    }
}

#[tokio::test]
async fn listing_through_grpc_pages_newest_first_each_rollout_exactly_once() {
    let (mut client, shutdown, server, _dir) = coordinator().await;
    const ROLLOUTS: usize = 120;
    let mut started = Vec::new();
    for _ in 0..ROLLOUTS {
        let id = client
            .start_rollout(start_request())
            .await
            .unwrap()
            .into_inner()
            .rollout
            .unwrap()
            .id;
        client
            .steer_rollout(SteerRolloutRequest {
                id: id.clone(),
                action: SteerAction::Abort as i32,
                reason: "next".into(),
                actor: "ana".into(),
            })
            .await
            .unwrap();
        started.push(id);
    }

    // The default page: the 50 newest, newest first.
    let first = client
        .list_rollouts(list_request(0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.rollouts.len(), 50);
    assert_eq!(first.rollouts[0].id, *started.last().unwrap());
    assert_eq!(first.rollouts[0].state, "aborted");
    assert!(first.rollouts[0].finished_at_ms >= first.rollouts[0].started_at_ms);
    assert!(!first.next_page_token.is_empty());

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_rollouts(list_request(50, &token))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.rollouts.into_iter().map(|r| r.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    started.reverse();
    assert_eq!(seen, started, "every rollout once, newest first");

    let err = client
        .list_rollouts(list_request(501, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("limit: at most 500"), "{err}");
    let err = client
        .list_rollouts(list_request(10, "not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("page_token: "), "{err}");

    shutdown.cancel();
    server.await.unwrap();
}

#[tokio::test]
async fn overlong_operator_strings_are_refused_before_anything_is_proposed() {
    let (mut client, shutdown, server, _dir) = coordinator().await;
    let over = |n: usize| "x".repeat(n + 1);
    let cases: Vec<(&str, StartRolloutRequest)> = vec![
        (
            "service: 65 bytes is longer than the limit of 64 bytes",
            StartRolloutRequest {
                service: over(64),
                ..start_request()
            },
        ),
        (
            "version: 65 bytes is longer than the limit of 64 bytes",
            StartRolloutRequest {
                version: over(64),
                ..start_request()
            },
        ),
        (
            "stable_version: 65 bytes is longer than the limit of 64 bytes",
            StartRolloutRequest {
                stable_version: over(64),
                ..start_request()
            },
        ),
        (
            "actor: 65 bytes is longer than the limit of 64 bytes",
            StartRolloutRequest {
                actor: over(64),
                ..start_request()
            },
        ),
        (
            "strategy_toml: 65537 bytes is longer than the limit of 65536 bytes",
            StartRolloutRequest {
                strategy_toml: format!("{STRATEGY}#{}", "x".repeat(65536 - STRATEGY.len())),
                ..start_request()
            },
        ),
        (
            "checks[0].name: 65 bytes is longer than the limit of 64 bytes",
            StartRolloutRequest {
                strategy_toml: format!(
                    "{STRATEGY}[[checks]]\nname = \"{}\"\nmetric = \"error_rate\"\nmax = 0.1\n",
                    over(64)
                ),
                ..start_request()
            },
        ),
    ];
    for (expected, request) in cases {
        let err = client.start_rollout(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{expected}: {err}");
        assert!(err.message().contains(expected), "{expected}: {err}");
    }
    let listed = client
        .list_rollouts(list_request(0, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.rollouts.is_empty(), "{:?}", listed.rollouts);

    // Steering: an overlong reason, actor or id changes nothing.
    let id = client
        .start_rollout(start_request())
        .await
        .unwrap()
        .into_inner()
        .rollout
        .unwrap()
        .id;
    let steer = |id: String, reason: String, actor: String| SteerRolloutRequest {
        id,
        action: SteerAction::Pause as i32,
        reason,
        actor,
    };
    let cases = [
        (
            "reason: 1025 bytes is longer than the limit of 1024 bytes",
            steer(id.clone(), over(1024), "ana".into()),
        ),
        (
            "actor: 65 bytes is longer than the limit of 64 bytes",
            steer(id.clone(), "r".into(), over(64)),
        ),
        (
            "id: 81 bytes is longer than the limit of 80 bytes",
            steer(over(80), "r".into(), "ana".into()),
        ),
    ];
    for (expected, request) in cases {
        let err = client.steer_rollout(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{expected}: {err}");
        assert!(err.message().contains(expected), "{expected}: {err}");
    }
    let err = client
        .get_rollout(GetRolloutRequest { id: over(80) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let rollout = client
        .get_rollout(GetRolloutRequest { id })
        .await
        .unwrap()
        .into_inner()
        .rollout
        .unwrap();
    assert_eq!(rollout.state, "progressing");
    assert_eq!(rollout.events.len(), 1, "{:?}", rollout.events);

    shutdown.cancel();
    server.await.unwrap();
}

/// `UndoService` and `ListRevisions` over gRPC: each bad request gets the status code an
/// operator's script can branch on and a message naming the problem, and changes nothing.
#[tokio::test]
async fn undo_refusals_have_their_own_status_codes_and_change_nothing() {
    use serin_proto::v1::{ListRevisionsRequest, UndoServiceRequest};
    let (mut client, shutdown, server, _dir) = coordinator().await;
    let undo = |service: &str, to_revision: u32| UndoServiceRequest {
        service: service.into(),
        to_revision,
        reason: "bad release".into(),
        actor: "ana".into(),
    };
    let refused = async |client: &mut ControlServiceClient<Channel>,
                         request: UndoServiceRequest,
                         code: Code,
                         expected: &str| {
        let err = client.undo_service(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{expected}: {err}");
        assert!(err.message().contains(expected), "{expected}: {err}");
    };
    refused(
        &mut client,
        undo("web", 0),
        Code::NotFound,
        "service 'web' not found",
    )
    .await;
    refused(
        &mut client,
        undo("we b", 0),
        Code::InvalidArgument,
        "service: must be",
    )
    .await;
    refused(
        &mut client,
        UndoServiceRequest {
            reason: "x".repeat(MAX_REASON + 1),
            ..undo("web", 0)
        },
        Code::InvalidArgument,
        "reason: 1025 bytes is longer than the limit",
    )
    .await;
    let err = client
        .list_revisions(ListRevisionsRequest {
            service: "web".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");

    let id = client
        .start_rollout(start_request())
        .await
        .unwrap()
        .into_inner()
        .rollout
        .unwrap()
        .id;
    refused(
        &mut client,
        undo("web", 1),
        Code::FailedPrecondition,
        &format!("abort rollout {id} first"),
    )
    .await;
    client
        .steer_rollout(SteerRolloutRequest {
            id: id.clone(),
            action: SteerAction::Promote as i32,
            reason: String::new(),
            actor: "ana".into(),
        })
        .await
        .unwrap();
    refused(
        &mut client,
        undo("web", 9),
        Code::InvalidArgument,
        "revision 9 does not exist: service 'web' has revisions 1..=2",
    )
    .await;
    refused(
        &mut client,
        undo("web", 2),
        Code::FailedPrecondition,
        "already at revision 2 (v2)",
    )
    .await;
    let revisions = |client: &mut ControlServiceClient<Channel>| {
        let mut client = client.clone();
        async move {
            client
                .list_revisions(ListRevisionsRequest {
                    service: "web".into(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let before = revisions(&mut client).await;
    assert_eq!(before.revisions.len(), 2, "{before:?}");
    assert_eq!(before.revisions[1].rollout_id, id);
    assert_eq!(before.pinned, 0);

    // The default goes to the previous revision.
    let reply = client
        .undo_service(undo("web", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.previous, 2);
    let revision = reply.revision.expect("the new revision");
    assert_eq!(
        (revision.number, revision.version.as_str(), revision.undo_of),
        (3, "v1", 1)
    );
    let after = revisions(&mut client).await;
    assert_eq!(after.revisions.len(), 3);
    assert_eq!(after.pinned, 3);
    shutdown.cancel();
    server.await.unwrap();
}
