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
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig::on_loopback(dir.path().to_owned());
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
