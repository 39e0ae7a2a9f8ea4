//! Agent sessions over real gRPC: a taken name is refused, an oversized report ends the stream
//! with a status that names the limit, and a forgotten agent leaves the list.

use std::net::SocketAddr;
use std::time::Duration;

use serin_coordinator::server::{CoordinatorConfig, run};
use serin_proto::v1::{
    AgentMessage, ForgetAgentRequest, InstanceWindow, ListAgentsRequest, Register, Report, Target,
    Variant, agent_message::Body, agent_service_client::AgentServiceClient,
    control_service_client::ControlServiceClient, coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Channel;

struct Coordinator {
    addr: SocketAddr,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn coordinator() -> Coordinator {
    coordinator_with(|_| {}).await
}

async fn coordinator_with(adjust: impl FnOnce(&mut CoordinatorConfig)) -> Coordinator {
    let dir = tempfile::tempdir().unwrap();
    let mut config = CoordinatorConfig::on_loopback(dir.path().to_owned());
    adjust(&mut config);
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(run(config, shutdown.clone(), Some(ready_tx)));
    let addr = ready_rx.await.expect("coordinator started");
    Coordinator {
        addr,
        shutdown,
        _dir: dir,
    }
}

fn register(agent: &str, instance_id: &str) -> AgentMessage {
    AgentMessage {
        body: Some(Body::Register(Register {
            agent: agent.into(),
            instance_id: instance_id.into(),
            targets: vec![Target {
                name: "api-1".into(),
                service: "api".into(),
                variant: Variant::Stable as i32,
                address: "127.0.0.1:1".into(),
                ..Default::default()
            }],
            ..Register::default()
        })),
    }
}

type Session = (
    Streaming<serin_proto::v1::CoordinatorMessage>,
    mpsc::Sender<AgentMessage>,
);

/// Opens a session, retrying while the node is still electing itself.
async fn open(addr: SocketAddr, agent: &str, instance_id: &str) -> Result<Session, tonic::Status> {
    let mut client = AgentServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    for _ in 0..50 {
        let (tx, rx) = mpsc::channel(4);
        tx.send(register(agent, instance_id)).await.unwrap();
        let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
        let first = inbound.message().await?.expect("a first message");
        if let Some(coordinator_message::Body::Desired(_)) = first.body {
            return Ok((inbound, tx));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader accepted the session");
}

async fn control(addr: SocketAddr) -> ControlServiceClient<Channel> {
    ControlServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_second_agent_with_the_same_name_is_refused_naming_the_connected_one() {
    let c = coordinator().await;
    let _first = open(c.addr, "host-a", "id-one").await.unwrap();
    let refused = open(c.addr, "host-a", "id-two").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("'host-a' is already connected from 127.0.0.1:"),
        "{refused:?}"
    );
    // The same agent restarting (same instance id) replaces its session.
    let _again = open(c.addr, "host-a", "id-one").await.unwrap();
    let agents = control(c.addr)
        .await
        .list_agents(ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert!(agents[0].connected);
}

#[tokio::test]
async fn an_oversized_report_ends_the_stream_with_a_status_naming_the_limit() {
    let c = coordinator().await;
    let (mut inbound, tx) = open(c.addr, "host-big", "id").await.unwrap();
    let huge = InstanceWindow {
        instance: "x".repeat(5 * 1024 * 1024),
        service: "api".into(),
        variant: Variant::Stable as i32,
        scrape_ok: true,
        ..InstanceWindow::default()
    };
    tx.send(AgentMessage {
        body: Some(Body::Report(Report {
            seq: 1,
            instances: vec![huge],
            ..Report::default()
        })),
    })
    .await
    .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends");
    let status = end.expect_err("ends with a status");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("agent 'host-big'")
            && status.message().contains("limit of 4194304 bytes"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_disconnected_agent_can_be_forgotten_but_a_connected_one_cannot() {
    let c = coordinator().await;
    let mut ctl = control(c.addr).await;
    let session = open(c.addr, "host-f", "id").await.unwrap();
    let refused = ctl
        .forget_agent(ForgetAgentRequest {
            name: "host-f".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    drop(session);
    // The coordinator notices the closed stream.
    let mut forgotten = Err(tonic::Status::unknown("not tried"));
    for _ in 0..50 {
        forgotten = ctl
            .forget_agent(ForgetAgentRequest {
                name: "host-f".into(),
            })
            .await;
        if forgotten.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    forgotten.expect("forgotten once disconnected");
    let agents = ctl
        .list_agents(ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(agents.is_empty(), "{agents:?}");
    let unknown = ctl
        .forget_agent(ForgetAgentRequest {
            name: "host-f".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(unknown.message().contains("no agent named 'host-f'"));
}

fn app(agent: &str, instance: &str, variant: Variant, address: &str) -> AgentMessage {
    AgentMessage {
        body: Some(Body::Register(Register {
            agent: agent.into(),
            instance_id: format!("{agent}-id"),
            targets: vec![Target {
                name: instance.into(),
                service: "api".into(),
                variant: variant as i32,
                address: address.into(),
                ..Default::default()
            }],
            ..Register::default()
        })),
    }
}

async fn open_with(addr: SocketAddr, register: AgentMessage) -> Result<Session, tonic::Status> {
    let mut client = AgentServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    for _ in 0..50 {
        let (tx, rx) = mpsc::channel(4);
        tx.send(register.clone()).await.unwrap();
        let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
        let first = inbound.message().await?.expect("a first message");
        if let Some(coordinator_message::Body::Desired(_)) = first.body {
            return Ok((inbound, tx));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no leader accepted the session");
}

/// Reads desired states until one satisfies `done` (bounded).
async fn desired_until(
    inbound: &mut Streaming<serin_proto::v1::CoordinatorMessage>,
    what: &str,
    done: impl Fn(&serin_proto::v1::ServiceTraffic) -> bool,
) -> serin_proto::v1::ServiceTraffic {
    let wait = async {
        loop {
            let message = inbound
                .message()
                .await
                .unwrap()
                .expect("the stream stays open");
            if let Some(coordinator_message::Body::Desired(d)) = message.body
                && let Some(api) = d.services.into_iter().find(|s| s.service == "api")
                && done(&api)
            {
                return api;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("no desired state with {what} within 20 s"))
}

/// The servers that get traffic at the current share.
fn addresses(t: &serin_proto::v1::ServiceTraffic) -> Vec<&str> {
    t.servers
        .iter()
        .filter(|s| s.weight > 0)
        .map(|s| s.address.as_str())
        .collect()
}

#[tokio::test]
async fn a_balancer_is_sent_the_inventorys_servers_and_a_disconnected_host_leaves_after_the_grace()
{
    let c = coordinator_with(|c| c.remove_unhealthy_after = Duration::from_secs(2)).await;
    let balancer = AgentMessage {
        body: Some(Body::Register(Register {
            agent: "lb-1".into(),
            instance_id: "lb-1-id".into(),
            balancer_services: vec!["api".into()],
            ..Register::default()
        })),
    };
    let (mut lb, _lb_tx) = open_with(c.addr, balancer).await.unwrap();
    let a = open_with(
        c.addr,
        app("host-a", "api-a", Variant::Stable, "10.0.0.11:80"),
    )
    .await
    .unwrap();
    let b = open_with(
        c.addr,
        app("host-b", "api-b", Variant::Stable, "10.0.0.12:80"),
    )
    .await
    .unwrap();
    let _canary = open_with(
        c.addr,
        app("host-c", "api-c", Variant::Canary, "10.0.0.13:80"),
    )
    .await
    .unwrap();
    let both = desired_until(&mut lb, "all three servers", |t| {
        t.from_inventory && t.servers.len() == 3
    })
    .await;
    // No rollout: traffic to stable only, every server from another host's agent; the canary
    // is a member with weight 0.
    assert_eq!(addresses(&both), ["10.0.0.11:80", "10.0.0.12:80"]);
    let canary = both
        .servers
        .iter()
        .find(|s| s.variant == Variant::Canary as i32)
        .expect("the canary is a member");
    assert_eq!(
        (canary.address.as_str(), canary.weight),
        ("10.0.0.13:80", 0)
    );
    assert_eq!(both.servers[0].agent, "host-a");

    // The same address from a second agent is refused, naming both.
    let twin = open_with(
        c.addr,
        app("host-x", "api-x", Variant::Stable, "10.0.0.11:80"),
    )
    .await
    .unwrap_err();
    assert_eq!(twin.code(), tonic::Code::AlreadyExists, "{twin:?}");
    assert!(
        twin.message().contains("'host-x'")
            && twin.message().contains("10.0.0.11:80")
            && twin.message().contains("'host-a'"),
        "{twin:?}"
    );

    // host-b goes away: after the grace its instance leaves the upstream.
    drop(b);
    let one = desired_until(&mut lb, "host-b's instance removed", |t| {
        t.from_inventory && t.servers.len() == 2
    })
    .await;
    assert_eq!(addresses(&one), ["10.0.0.11:80"]);
    // The last stable instance never leaves, whatever its health.
    drop(a);
    let watch = async {
        loop {
            let message = lb.message().await.unwrap().expect("the stream stays open");
            if let Some(coordinator_message::Body::Desired(d)) = message.body
                && let Some(api) = d.services.into_iter().find(|s| s.service == "api")
            {
                assert_eq!(addresses(&api), ["10.0.0.11:80"], "the last stable left");
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), watch).await;
    let mut ctl = control(c.addr).await;
    let agents = ctl
        .list_agents(ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(agents.iter().any(|a| a.name == "host-a" && !a.connected));
}
