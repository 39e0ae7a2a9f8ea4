//! A replicated coordinator for end-to-end tests: a raft group of `serin coordinator run`
//! processes, each on its own data directory, that a test can kill, restart, cut off, shrink and
//! grow.
//!
//! Why a module of its own: failover is only shown by real processes dying (SIGKILL, no
//! goodbye) and coming back on the same data; the one-node [`super::Stack`] keeps its single
//! coordinator, and a stack built with `StackOptions { coordinators: 3, .. }` runs on a
//! [`Group`] instead.
//!
//! Members live either on loopback (each on its own port) or, with [`Group::start_netns`], one
//! per network namespace of a [`Fleet`] (port [`NETNS_PORT`] on the host's address), so that a
//! member can be partitioned from the others while it runs on ([`Group::cut`]).
//!
//! Who leads is asked the way an operator would: `serin cluster status --json`
//! ([`Group::leader`]). A member's own view (its role, term and applied index, which the CLI
//! replaces with the leader's) comes from the `ClusterStatus` call made straight to that member
//! ([`Group::member_view`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use serin_proto::v1::control_service_client::ControlServiceClient;
use serin_proto::v1::{ClusterStatusReply, ClusterStatusRequest};

use super::netns::Fleet;
use super::{Proc, cli_with, describe, free_port, stdout, tail};

/// The port every member listens on inside its own network namespace.
pub const NETNS_PORT: u16 = 7000;
/// How long a direct call to one member may take.
pub const MEMBER_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// One member of a [`Group`].
pub struct Member {
    /// Raft id.
    pub id: u64,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its data directory (kept across restarts).
    pub data_dir: PathBuf,
    /// The running process, `None` while killed.
    pub proc: Option<Proc>,
    /// The `--peers` it is started with.
    peers: String,
    /// Started with `--join` (added by `serin cluster add`, not in the initial group).
    joined: bool,
    /// Index of its host in the group's fleet.
    host: Option<usize>,
    /// Its log file.
    pub log: PathBuf,
    /// True between [`Group::cut`] and [`Group::heal`].
    pub cut: bool,
    /// Removed from the group by `serin cluster remove` (and stopped).
    pub removed: bool,
}

impl Member {
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A coordinator group; see the module docs. Dropping it kills every member (and deletes the
/// fleet's namespaces, if any).
pub struct Group {
    pub members: Vec<Member>,
    dir: PathBuf,
    fleet: Option<Fleet>,
}

impl Group {
    /// Starts `n` members on loopback, each with `--peers` naming all of them, logging to
    /// `dir/coordinator-<id>.log` with data in `dir/coordinator-<id>`.
    pub fn start_local(dir: &Path, n: usize) -> Group {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
            .collect();
        let mut group = Group::new(dir, &addrs, None);
        group.start_all();
        group
    }

    /// Starts `n` members, member `k` alone in host `k` of a new [`Fleet`] (needs root).
    pub fn start_netns(dir: &Path, n: usize) -> Group {
        let fleet = Fleet::new(n).unwrap_or_else(|e| panic!("{e:#}"));
        let addrs: Vec<SocketAddr> = fleet
            .hosts()
            .iter()
            .map(|h| SocketAddr::from((h.addr(), NETNS_PORT)))
            .collect();
        let mut group = Group::new(dir, &addrs, Some(fleet));
        group.start_all();
        group
    }

    fn new(dir: &Path, addrs: &[SocketAddr], fleet: Option<Fleet>) -> Group {
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(k, a)| format!("{}=http://{a}", k + 1))
            .collect::<Vec<_>>()
            .join(",");
        let members = addrs
            .iter()
            .enumerate()
            .map(|(k, addr)| {
                let id = k as u64 + 1;
                let (data_dir, log) = match &fleet {
                    Some(f) => (
                        f.host(k + 1).dir().join("coordinator"),
                        f.host(k + 1).dir().join(format!("coordinator-{id}.log")),
                    ),
                    None => (
                        dir.join(format!("coordinator-{id}")),
                        dir.join(format!("coordinator-{id}.log")),
                    ),
                };
                Member {
                    id,
                    addr: *addr,
                    data_dir,
                    proc: None,
                    peers: peers.clone(),
                    joined: false,
                    host: fleet.as_ref().map(|_| k + 1),
                    log,
                    cut: false,
                    removed: false,
                }
            })
            .collect();
        Group {
            members,
            dir: dir.to_owned(),
            fleet,
        }
    }

    fn start_all(&mut self) {
        let ids: Vec<u64> = self.members.iter().map(|m| m.id).collect();
        for id in ids {
            self.start(id);
        }
    }

    /// The member with raft id `id`.
    pub fn member(&self, id: u64) -> &Member {
        self.members
            .iter()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("the group has no member {id}"))
    }

    fn member_mut(&mut self, id: u64) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("the group has no member {id}"))
    }

    /// The ids of the members not removed.
    pub fn ids(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|m| !m.removed)
            .map(|m| m.id)
            .collect()
    }

    /// Every member's address (removed ones included: the CLI skips those that do not answer),
    /// comma-separated, as `--coordinator` and `SERIN_COORDINATOR` take them.
    pub fn addresses(&self) -> String {
        self.members
            .iter()
            .map(Member::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The addresses of the members that run and are not cut off, comma-separated.
    pub fn reachable_addresses(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.proc.is_some() && !m.cut && !m.removed)
            .map(Member::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// (Re)starts member `id` on its data directory (it must not run).
    pub fn start(&mut self, id: u64) {
        let host = self.member(id).host;
        let m = self.member(id);
        assert!(m.proc.is_none(), "member {id} already runs");
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "run".into(),
            "--node-id".into(),
            id.to_string(),
            "--listen".into(),
            m.addr.to_string(),
            "--peers".into(),
            m.peers.clone(),
            "--data-dir".into(),
            m.data_dir.display().to_string(),
        ];
        if m.joined {
            args.push("--join".into());
        }
        let name = format!("coordinator-{id}");
        let proc = match (host, &self.fleet) {
            (Some(k), Some(fleet)) => fleet.host(k).spawn_serin_owned(&name, &args),
            _ => Proc::spawn(&name, &self.dir, &args),
        };
        self.member_mut(id).proc = Some(proc);
    }

    /// SIGKILLs member `id` and reaps it.
    pub async fn kill(&mut self, id: u64) {
        let m = self.member_mut(id);
        let mut proc = m
            .proc
            .take()
            .unwrap_or_else(|| panic!("member {id} does not run"));
        proc.kill().await;
    }

    /// SIGKILLs every running member.
    pub async fn kill_all(&mut self) {
        for m in &mut self.members {
            if let Some(mut p) = m.proc.take() {
                p.kill().await;
            }
        }
    }

    /// Starts every member that is not running and not removed.
    pub fn start_stopped(&mut self) {
        let ids: Vec<u64> = self
            .members
            .iter()
            .filter(|m| m.proc.is_none() && !m.removed)
            .map(|m| m.id)
            .collect();
        for id in ids {
            self.start(id);
        }
    }

    /// Partitions member `id` (netns groups only): its packets are dropped, it runs on.
    pub fn cut(&mut self, id: u64) {
        let k = self.member(id).host.expect("cut needs a netns group");
        let fleet = self.fleet.as_mut().expect("cut needs a netns group");
        fleet
            .host_mut(k)
            .cut()
            .unwrap_or_else(|e| panic!("cutting member {id}: {e:#}"));
        self.member_mut(id).cut = true;
    }

    /// Ends a [`Group::cut`].
    pub fn heal(&mut self, id: u64) {
        let k = self.member(id).host.expect("heal needs a netns group");
        let fleet = self.fleet.as_mut().expect("heal needs a netns group");
        fleet
            .host_mut(k)
            .heal()
            .unwrap_or_else(|e| panic!("healing member {id}: {e:#}"));
        self.member_mut(id).cut = false;
    }

    /// The fleet of a netns group.
    pub fn fleet(&self) -> Option<&Fleet> {
        self.fleet.as_ref()
    }

    /// Runs `serin ARGS` inside member `id`'s namespace (netns groups only) to completion;
    /// `SERIN_COORDINATOR` is not set there, so ARGS carry `--coordinator`.
    pub async fn exec_in(&self, id: u64, args: &[&str], timeout: Duration) -> std::process::Output {
        let k = self.member(id).host.expect("exec_in needs a netns group");
        let fleet = self.fleet.as_ref().expect("exec_in needs a netns group");
        fleet.host(k).exec(super::SERIN, args, timeout).await
    }

    /// Adds member `id` at `addr` on loopback: starts `serin coordinator run --join` (peers:
    /// the running members), runs `serin cluster add ID ADDR` (which waits until it is a
    /// voter) and returns the CLI's output.
    pub async fn add_local(&mut self, id: u64) -> std::process::Output {
        assert!(self.fleet.is_none(), "add_local: loopback groups only");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let peers = self
            .members
            .iter()
            .filter(|m| !m.removed)
            .map(|m| format!("{}={}", m.id, m.url()))
            .collect::<Vec<_>>()
            .join(",");
        self.members.push(Member {
            id,
            addr,
            data_dir: self.dir.join(format!("coordinator-{id}")),
            proc: None,
            peers,
            joined: true,
            host: None,
            log: self.dir.join(format!("coordinator-{id}.log")),
            cut: false,
            removed: false,
        });
        self.start(id);
        let url = format!("http://{addr}");
        cli_with(
            &self.reachable_addresses(),
            &["cluster", "add", &id.to_string(), &url],
        )
        .await
    }

    /// `serin cluster remove ID`; on success the member is stopped and marked removed.
    pub async fn remove(&mut self, id: u64) -> std::process::Output {
        let out = cli_with(
            &self.reachable_addresses(),
            &["cluster", "remove", &id.to_string()],
        )
        .await;
        if out.status.success() {
            self.member_mut(id).removed = true;
            if let Some(mut p) = self.member_mut(id).proc.take() {
                p.kill().await;
            }
        }
        out
    }

    /// `serin cluster status --json` against the reachable members; `Err` with the CLI's
    /// output when it fails.
    pub async fn status(&self) -> Result<Value, String> {
        let out = cli_with(
            &self.reachable_addresses(),
            &["cluster", "status", "--json"],
        )
        .await;
        if !out.status.success() {
            return Err(describe(&out));
        }
        serde_json::from_str(&stdout(&out)).map_err(|e| {
            format!(
                "cluster status --json is not JSON ({e}): {}",
                describe(&out)
            )
        })
    }

    /// The leader according to `serin cluster status --json`, when the answer came from a
    /// leader (a follower's view of a leader it cannot reach does not count).
    pub async fn leader(&self) -> Option<u64> {
        let s = self.status().await.ok()?;
        if s["role"] == "leader" && s["leader"] == s["answered_by"] {
            s["leader"].as_u64()
        } else {
            None
        }
    }

    /// Waits (at most `timeout`) for a leader other than `not`; returns it and how long it took.
    pub async fn wait_leader(&self, not: Option<u64>, timeout: Duration) -> (u64, Duration) {
        let start = Instant::now();
        loop {
            if let Some(l) = self.leader().await
                && Some(l) != not
            {
                return (l, start.elapsed());
            }
            if start.elapsed() > timeout {
                panic!(
                    "no leader other than {not:?} within {timeout:?}\n{}",
                    self.diagnostics()
                );
            }
            tokio::time::sleep(super::POLL).await;
        }
    }

    /// Member `id`'s own view (`ClusterStatus` called on it, not forwarded to the leader).
    pub async fn member_view(&self, id: u64) -> Result<ClusterStatusReply, String> {
        member_view_at(&self.member(id).url()).await
    }

    /// Every member's log tail.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            out.push_str(&format!(
                "=== coordinator {} at {}{}{}{} ({})\n{}\n",
                m.id,
                m.addr,
                if m.proc.is_none() { ", STOPPED" } else { "" },
                if m.cut { ", CUT" } else { "" },
                if m.removed { ", REMOVED" } else { "" },
                m.log.display(),
                tail(&m.log, 40)
            ));
        }
        out
    }
}

/// `ClusterStatus` called straight on the member at `url`, within [`MEMBER_CALL_TIMEOUT`].
pub async fn member_view_at(url: &str) -> Result<ClusterStatusReply, String> {
    let call = async {
        let mut client = ControlServiceClient::connect(url.to_owned())
            .await
            .map_err(|e| e.to_string())?;
        client
            .cluster_status(ClusterStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.message().to_owned())
    };
    tokio::time::timeout(MEMBER_CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer from {url} within {MEMBER_CALL_TIMEOUT:?}"
            ))
        })
}
