//! Scaffolding of the runtime's end-to-end tests: an in-test coordinator speaking the real
//! gRPC protocol, in-test HTTP endpoints, and starting and stopping an agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serin_proto::v1 as pb;
use serin_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{AgentError, run};
use crate::config::AgentConfig;
use crate::store::ServiceTraffic;
use crate::traffic::Variant;

/// Upper bound on every wait; a test that needs longer has failed.
pub(super) const WAIT: Duration = Duration::from_secs(20);

// --- in-test coordinator ------------------------------------------------------------

pub(super) type Downstream = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// What the test coordinator saw, in order.
pub(super) enum Event {
    /// A session opened; sending on this reaches the agent, dropping it ends the stream.
    Session(Downstream),
    Message(pb::AgentMessage),
    /// A session was refused as a duplicate name; holds its Register.
    Refused(pb::Register),
}

pub(super) struct TestCoordinator {
    events: mpsc::UnboundedSender<Event>,
    /// When set, every session is refused with `ALREADY_EXISTS` and this message.
    refuse: Option<String>,
}

#[tonic::async_trait]
impl AgentService for TestCoordinator {
    type SessionStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        if let Some(message) = &self.refuse {
            // As the real coordinator does: read Register, then refuse.
            let first = inbound.message().await?;
            if let Some(pb::AgentMessage {
                body: Some(pb::agent_message::Body::Register(r)),
            }) = first
            {
                let _ = self.events.send(Event::Refused(r));
            }
            return Err(Status::already_exists(message.clone()));
        }
        let (tx, rx) = mpsc::channel(16);
        let _ = self.events.send(Event::Session(tx));
        let events = self.events.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if events.send(Event::Message(message)).is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

pub(super) struct TestServer {
    events: mpsc::UnboundedReceiver<Event>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    pub(super) async fn start(listener: TcpListener) -> TestServer {
        Self::start_with(listener, None).await
    }

    /// A coordinator that refuses every session as a duplicate name, with `message`.
    pub(super) async fn start_refusing(listener: TcpListener, message: &str) -> TestServer {
        Self::start_with(listener, Some(message.to_owned())).await
    }

    async fn start_with(listener: TcpListener, refuse: Option<String>) -> TestServer {
        let (tx, events) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(TestCoordinator {
                    events: tx,
                    refuse,
                }))
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    signal.cancelled_owned(),
                ),
        );
        TestServer { events, stop, task }
    }

    /// Stops serving; sessions must have been ended (their `Downstream` dropped).
    pub(super) async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        match tokio::time::timeout(WAIT, &mut task).await {
            Ok(joined) => joined.expect("server task").expect("server"),
            Err(_) => {
                task.abort();
                panic!("test coordinator did not shut down within {WAIT:?}");
            }
        }
    }

    /// Waits for the next session, skipping what earlier sessions still had in flight.
    pub(super) async fn session(&mut self) -> Downstream {
        loop {
            if let Event::Session(down) = self.next_event("a session").await {
                return down;
            }
        }
    }

    /// Waits for the next message from the agent.
    /// Waits for the next refused session's Register.
    pub(super) async fn refused(&mut self) -> pb::Register {
        loop {
            if let Event::Refused(register) = self.next_event("a refused session").await {
                return register;
            }
        }
    }

    pub(super) async fn message(&mut self, what: &str) -> pb::agent_message::Body {
        match self.next_event(what).await {
            Event::Session(_) => panic!("unexpected new session while waiting for {what}"),
            Event::Refused(_) => panic!("unexpected refused session while waiting for {what}"),
            Event::Message(pb::AgentMessage { body: Some(body) }) => body,
            Event::Message(m) => panic!("message without body: {m:?}"),
        }
    }

    /// Skips reports until an ack arrives.
    pub(super) async fn ack(&mut self) -> pb::Ack {
        loop {
            match self.message("an ack").await {
                pb::agent_message::Body::Ack(ack) => return ack,
                pb::agent_message::Body::Report(_) => {}
                pb::agent_message::Body::Register(r) => panic!("unexpected Register: {r:?}"),
            }
        }
    }

    async fn next_event(&mut self, what: &str) -> Event {
        match tokio::time::timeout(WAIT, self.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("test coordinator gone while waiting for {what}"),
            Err(_) => panic!("no {what} within {WAIT:?}"),
        }
    }
}

pub(super) async fn send_desired(
    down: &Downstream,
    term: u64,
    index: u64,
    services: Vec<ServiceTraffic>,
) {
    let message = pb::CoordinatorMessage {
        body: Some(pb::coordinator_message::Body::Desired(pb::DesiredState {
            generation: Some(pb::Generation { term, index }),
            services: services
                .into_iter()
                .map(|s| pb::ServiceTraffic {
                    service: s.service,
                    canary_weight: s.canary_weight,
                    stable_version: s.stable_version,
                    canary_version: s.canary_version,
                    rollout_id: s.rollout_id,
                    sticky_key: s.sticky_key.unwrap_or_default(),
                    workloads: Vec::new(),
                    deploy: None,
                    override_header: s.override_header.unwrap_or_default(),
                    override_cookie: s.override_cookie.unwrap_or_default(),
                    servers: s
                        .servers
                        .into_iter()
                        .map(|u| pb::UpstreamServer {
                            instance: u.instance,
                            address: u.address,
                            variant: match u.variant {
                                Variant::Stable => pb::Variant::Stable,
                                Variant::Canary => pb::Variant::Canary,
                            }
                            .into(),
                            weight: u.weight,
                            agent: u.agent,
                            version: String::new(),
                        })
                        .collect(),
                    from_inventory: s.from_inventory,
                })
                .collect(),
        })),
    };
    down.send(Ok(message)).await.expect("agent session open");
}

pub(super) fn expect_register(body: pb::agent_message::Body) -> pb::Register {
    match body {
        pb::agent_message::Body::Register(r) => r,
        other => panic!("expected Register first, got {other:?}"),
    }
}

// --- in-test HTTP endpoints ---------------------------------------------------------

/// Answers every request with `page(n)`, `n` counting requests from 1. Aborted on drop.
pub(super) struct HttpServer {
    pub(super) addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) async fn http_server(
    page: impl Fn(u64) -> String + Send + Sync + 'static,
) -> HttpServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let page = Arc::new(page);
    let count = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let page = Arc::clone(&page);
            let count = Arc::clone(&count);
            connections.spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 2048];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = page(count.fetch_add(1, Ordering::SeqCst) + 1);
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
            while connections.try_join_next().is_some() {}
        }
    });
    HttpServer { addr, task }
}

/// A metrics page whose request counter grows by 10 per scrape, one in ten a 500.
pub(super) fn metrics_page(n: u64, comment: &str) -> String {
    format!(
        "# {comment}\n# TYPE http_requests_total counter\n\
         http_requests_total{{code=\"200\"}} {}\nhttp_requests_total{{code=\"500\"}} {n}\n",
        n * 9
    )
}

pub(super) async fn run_agent(
    config: AgentConfig,
) -> (CancellationToken, JoinHandle<Result<(), AgentError>>) {
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(run(config, shutdown.clone()));
    (shutdown, agent)
}

pub(super) async fn stop_agent(
    shutdown: CancellationToken,
    agent: JoinHandle<Result<(), AgentError>>,
) {
    shutdown.cancel();
    match tokio::time::timeout(WAIT, agent).await {
        Ok(joined) => joined.expect("agent task").expect("agent run"),
        Err(_) => panic!("agent did not stop within {WAIT:?} of shutdown"),
    }
}
