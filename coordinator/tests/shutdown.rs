//! A coordinator stops cleanly, and promptly, even with agent sessions open.

use std::time::Duration;

use serin_coordinator::server::{CoordinatorConfig, run};
use serin_proto::v1::{
    AgentMessage, Register, Target, Variant, agent_message::Body,
    agent_service_client::AgentServiceClient, coordinator_message,
};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn shutdown_with_an_open_agent_session_returns_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig::on_loopback(dir.path().to_owned());
    let shutdown = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(run(config, shutdown.clone(), Some(ready_tx)));
    let addr = ready_rx.await.expect("coordinator started");

    let mut client = AgentServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    // An agent session that registers and keeps its stream open. The node may still be
    // electing itself: retry until a leader accepts the session.
    let mut inbound = None;
    for _ in 0..50 {
        let (tx2, rx2) = tokio::sync::mpsc::channel(4);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx2);
        tx2.send(AgentMessage {
            body: Some(Body::Register(Register {
                agent: "host-a".into(),
                targets: vec![Target {
                    name: "api-1".into(),
                    service: "api".into(),
                    variant: Variant::Stable as i32,
                    address: "127.0.0.1:1".into(),
                    ..Default::default()
                }],
                ..Register::default()
            })),
        })
        .await
        .unwrap();
        let mut s = client.session(stream).await.unwrap().into_inner();
        let first = s.message().await.unwrap().expect("a first message");
        if let Some(coordinator_message::Body::Desired(_)) = first.body {
            inbound = Some((s, tx2));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Keep the agent's side open: only the coordinator's shutdown may end the session.
    let (mut inbound, _keep_open) = inbound.expect("a leader accepted the session");

    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the coordinator stops within 10 s with a session open");
    stopped.unwrap().expect("clean shutdown");
    // The agent's stream ends rather than hanging.
    let end = tokio::time::timeout(Duration::from_secs(5), inbound.message()).await;
    assert!(matches!(end, Ok(Ok(None)) | Ok(Err(_))), "{end:?}");
}
