//! The demo's coordinator: a group of three `serin coordinator run` processes, one per
//! "machine" (127.0.2.1, .2, .3), so that the demo can SIGKILL the leader in the middle of a
//! rollout and show the group electing another and the rollout carrying on.
//!
//! Each node gets a config file (node id, listen address, data directory, the peers and the
//! demo's `remove_unhealthy_after`), its log at `<dir>/coordinator-<id>/coordinator.log`, and is
//! killed when the demo ends (`kill_on_drop`, [`Coordinators::shutdown`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serin_proto::v1::ClusterStatusRequest;
use serin_proto::v1::control_service_client::ControlServiceClient;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// How many members the demo's group has.
pub const MEMBERS: u64 = 3;

/// One member.
struct Member {
    id: u64,
    addr: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

/// The running group.
pub struct Coordinators {
    serin: PathBuf,
    members: Vec<Member>,
}

impl Coordinators {
    /// Writes each member's config and starts the three processes; returns once one of them is
    /// the leader.
    pub async fn start(
        serin: &Path,
        dir: &Path,
        remove_unhealthy_after: Duration,
    ) -> anyhow::Result<Coordinators> {
        let addresses: Vec<Ipv4Addr> = (1..=MEMBERS as u8)
            .map(|i| Ipv4Addr::new(127, 0, 2, i))
            .collect();
        let port = super::fleet::port_free_on(&addresses, &[])?;
        let peers: Vec<(u64, SocketAddr)> = addresses
            .iter()
            .enumerate()
            .map(|(i, a)| (i as u64 + 1, SocketAddr::from((*a, port))))
            .collect();
        let peer_lines: String = peers
            .iter()
            .map(|(id, addr)| format!("{id} = \"http://{addr}\"\n"))
            .collect();
        let mut group = Coordinators {
            serin: serin.to_owned(),
            members: Vec::new(),
        };
        for (id, addr) in &peers {
            let member_dir = dir.join(format!("coordinator-{id}"));
            std::fs::create_dir_all(&member_dir)
                .with_context(|| format!("creating {}", member_dir.display()))?;
            let config = format!(
                "# Written by `serin demo`: member {id} of the coordinator group.\n\
                 node_id = {id}\n\
                 listen = \"{addr}\"\n\
                 data_dir = \"{data}\"\n\
                 remove_unhealthy_after = \"{secs}s\"\n\n\
                 [peers]\n{peer_lines}",
                data = member_dir.join("data").display(),
                secs = remove_unhealthy_after.as_secs(),
            );
            std::fs::write(member_dir.join("coordinator.toml"), config)
                .context("writing a coordinator config")?;
            group.members.push(Member {
                id: *id,
                addr: *addr,
                dir: member_dir,
                child: None,
            });
        }
        for id in 1..=MEMBERS {
            group.spawn(id)?;
        }
        group.wait_leader(Duration::from_secs(20), None).await?;
        Ok(group)
    }

    fn member(&mut self, id: u64) -> anyhow::Result<&mut Member> {
        self.members
            .iter_mut()
            .find(|m| m.id == id)
            .with_context(|| format!("no coordinator member {id}"))
    }

    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let serin = self.serin.clone();
        let member = self.member(id)?;
        let log = member.dir.join("coordinator.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = file.try_clone().context("duplicating a log file handle")?;
        let config = member.dir.join("coordinator.toml");
        let child = Command::new(&serin)
            .args(["coordinator", "run", "--config"])
            .arg(&config)
            .current_dir(&member.dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting coordinator member {id}"))?;
        member.child = Some(child);
        Ok(())
    }

    /// Every member's gRPC address.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.addr).collect()
    }

    /// The leader, as the first running member that names one says.
    pub async fn leader(&self) -> Option<(u64, SocketAddr)> {
        for member in self.members.iter().filter(|m| m.child.is_some()) {
            let Ok(mut client) = crate::cli::connect_to(&format!("http://{}", member.addr)).await
            else {
                continue;
            };
            let Ok(reply) = client.cluster_status(ClusterStatusRequest {}).await else {
                continue;
            };
            let reply = reply.into_inner();
            if reply.leader_id != 0
                && let Some(leader) = self.members.iter().find(|m| m.id == reply.leader_id)
                && leader.child.is_some()
            {
                return Some((leader.id, leader.addr));
            }
        }
        None
    }

    /// Waits until a running member other than `not` leads.
    pub async fn wait_leader(
        &self,
        timeout: Duration,
        not: Option<u64>,
    ) -> anyhow::Result<(u64, SocketAddr)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((id, addr)) = self.leader().await
                && Some(id) != not
            {
                return Ok((id, addr));
            }
            if Instant::now() > deadline {
                bail!(
                    "no coordinator member became the leader within {}s (logs in {})",
                    timeout.as_secs(),
                    self.members
                        .iter()
                        .map(|m| m.dir.join("coordinator.log").display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client of the leader.
    pub async fn leader_client(&self) -> anyhow::Result<ControlServiceClient<Channel>> {
        let (_, addr) = self.wait_leader(Duration::from_secs(20), None).await?;
        crate::cli::connect_to(&format!("http://{addr}"))
            .await
            .map_err(|e| anyhow::anyhow!("connecting to the leader at {addr}: {e}"))
    }

    /// SIGKILLs member `id` and reaps it.
    pub async fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let member = self.member(id)?;
        if let Some(mut child) = member.child.take() {
            child.start_kill().context("sending SIGKILL")?;
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        }
        Ok(())
    }

    /// Starts member `id` again on its data directory.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.spawn(id)
    }

    /// Members whose process exited by itself.
    pub fn exited(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for m in &mut self.members {
            if let Some(child) = &mut m.child
                && let Ok(Some(status)) = child.try_wait()
            {
                out.push(format!(
                    "coordinator-{} ({status}; see {})",
                    m.id,
                    m.dir.join("coordinator.log").display()
                ));
            }
        }
        out
    }

    /// Kills and reaps every member (their state is crash-safe, and the demo's is temporary).
    pub async fn shutdown(&mut self) {
        for m in &mut self.members {
            if let Some(child) = &mut m.child {
                let _ = child.start_kill();
            }
        }
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            }
        }
    }
}
