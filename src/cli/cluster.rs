//! `serin cluster status|add|remove`: the coordinator group.
//!
//! `status` asks the first member that answers, then the leader it names (only the leader
//! knows each member's progress); with no leader it prints what the member knows and says so.
//! `add` and `remove` go to the leader; `add` then waits (with a progress line) until the new
//! member has caught up and been promoted to voter.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};
use serin_proto::v1::{
    AddMember, ChangeMembershipRequest, ClusterStatusReply, ClusterStatusRequest,
    change_membership_request::Change,
};

use super::rollout::describe_status;
use super::{CoordinatorArgs, connect, connect_any, connect_to};

/// How long `serin cluster add` waits for the new member to become a voter.
pub const PROMOTION_WAIT: Duration = Duration::from_secs(120);

/// `serin cluster …`
#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Members, leader, term, commit and applied index, and each member's health and lag.
    ///
    /// Example: serin cluster status --coordinator http://10.0.0.1:7000,http://10.0.0.2:7000
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Add a member: start it first with `serin coordinator run --join --node-id ID
    /// --listen … --peers <a running member>`; it catches up (by snapshot) as a learner and
    /// becomes a voter once it has.
    ///
    /// Example: serin cluster add 4 http://10.0.0.4:7000
    Add {
        /// The new member's raft id (not used by any member).
        id: u64,
        /// Its gRPC address, http://HOST:PORT.
        address: String,
        /// Return once the member is added as a learner, without waiting for its promotion.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Remove a member (not the leader: stop the leader first, then remove it from the new
    /// one).
    ///
    /// Example: serin cluster remove 3
    Remove {
        /// The member's raft id.
        id: u64,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
}

/// Runs a `serin cluster` command.
pub async fn run_cluster(command: ClusterCommand) -> anyhow::Result<ExitCode> {
    match command {
        ClusterCommand::Status { json, coordinator } => status(json, &coordinator).await,
        ClusterCommand::Add {
            id,
            address,
            no_wait,
            coordinator,
        } => add(id, address, no_wait, &coordinator).await,
        ClusterCommand::Remove { id, coordinator } => remove(id, &coordinator).await,
    }
}

async fn status(json: bool, coordinator: &CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let (_, mut client) = connect_any(coordinator).await?;
    let mut reply = client
        .cluster_status(ClusterStatusRequest {})
        .await
        .map_err(|s| describe_status(&s, coordinator, None))?
        .into_inner();
    let mut note = None;
    if reply.role != "leader" {
        if reply.leader_address.is_empty() {
            note = Some(format!(
                "no leader known to node {}: the members' progress is unknown",
                reply.node_id
            ));
        } else {
            let leader = reply.leader_address.clone();
            let asked = match connect_to(&leader).await {
                Ok(mut leader_client) => leader_client
                    .cluster_status(ClusterStatusRequest {})
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| s.message().to_owned()),
                Err(e) => Err(e),
            };
            match asked {
                Ok(leader_reply) => reply = leader_reply,
                Err(e) => {
                    note = Some(format!(
                        "the leader at {leader} did not answer ({e}): showing node {}'s view",
                        reply.node_id
                    ))
                }
            }
        }
    }
    if json {
        let mut value = to_json(&reply);
        if let Some(note) = &note {
            value["note"] = json!(note);
        }
        println!("{value:#}");
    } else {
        print!("{}", render(&reply));
        if let Some(note) = note {
            println!("note: {note}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn add(
    id: u64,
    address: String,
    no_wait: bool,
    coordinator: &CoordinatorArgs,
) -> anyhow::Result<ExitCode> {
    let address = super::normalize_address(&address);
    let mut client = connect(coordinator).await?;
    client
        .change_membership(ChangeMembershipRequest {
            change: Some(Change::Add(AddMember {
                id,
                address: address.clone(),
            })),
        })
        .await
        .map_err(|s| describe_status(&s, coordinator, None))?;
    println!("added node {id} at {address} as a learner");
    if no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = tokio::time::Instant::now() + PROMOTION_WAIT;
    let mut last_line = String::new();
    loop {
        let reply = match client.cluster_status(ClusterStatusRequest {}).await {
            Ok(r) => r.into_inner(),
            Err(_) => {
                // The leader changed: find the new one.
                client = connect(coordinator).await?;
                continue;
            }
        };
        let Some(member) = reply.members.iter().find(|m| m.id == id) else {
            anyhow::bail!("node {id} is no longer a member (removed meanwhile?)");
        };
        if member.suffrage == "voter" {
            println!("node {id} caught up and is a voter");
            return Ok(ExitCode::SUCCESS);
        }
        let line = format!(
            "node {id}: {} behind the leader ({}), {}",
            member.lag,
            if member.progress_state.is_empty() {
                "progress unknown"
            } else {
                &member.progress_state
            },
            if member.reachable {
                "reachable"
            } else {
                "not answering yet"
            }
        );
        if line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "node {id} is still a learner after {}s: is `serin coordinator run --join \
                 --node-id {id}` running at {address}? (`serin cluster status` shows its lag)",
                PROMOTION_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn remove(id: u64, coordinator: &CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(coordinator).await?;
    client
        .change_membership(ChangeMembershipRequest {
            change: Some(Change::Remove(id)),
        })
        .await
        .map_err(|s| describe_status(&s, coordinator, None))?;
    println!("removed node {id}");
    Ok(ExitCode::SUCCESS)
}

/// The reply as JSON (`--json`).
pub fn to_json(reply: &ClusterStatusReply) -> Value {
    json!({
        "answered_by": reply.node_id,
        "role": reply.role,
        "leader": (reply.leader_id != 0).then_some(reply.leader_id),
        "leader_address": (!reply.leader_address.is_empty()).then_some(&reply.leader_address),
        "term": reply.term,
        "commit_index": reply.commit_index,
        "applied_index": reply.applied_index,
        "last_index": reply.last_index,
        "pending_change": (!reply.pending_change.is_empty()).then_some(&reply.pending_change),
        "progress_known": reply.progress_known,
        "members": reply.members.iter().map(|m| json!({
            "id": m.id,
            "address": m.address,
            "suffrage": m.suffrage,
            "leader": m.is_leader,
            "matched_index": reply.progress_known.then_some(m.matched_index),
            "lag": reply.progress_known.then_some(m.lag),
            "reachable": reply.progress_known.then_some(m.reachable),
            "progress": (!m.progress_state.is_empty()).then_some(&m.progress_state),
        })).collect::<Vec<_>>(),
    })
}

/// The reply as text.
pub fn render(reply: &ClusterStatusReply) -> String {
    let mut out = String::new();
    let leader = if reply.leader_id == 0 {
        "none elected".to_owned()
    } else {
        format!("node {} at {}", reply.leader_id, reply.leader_address)
    };
    out.push_str(&format!(
        "leader   {leader}\nterm     {}\ncommit   {}   applied {}   last {}   (as node {}, {}, sees it)\n",
        reply.term,
        reply.commit_index,
        reply.applied_index,
        reply.last_index,
        reply.node_id,
        reply.role
    ));
    if !reply.pending_change.is_empty() {
        out.push_str(&format!("pending  {}\n", reply.pending_change));
    }
    let mut table = super::output::Table::new(&[
        "ID", "ADDRESS", "ROLE", "HEALTH", "MATCHED", "LAG", "PROGRESS",
    ])
    .right(&[4, 5]);
    for row in reply.members.iter().map(|m| {
        let (health, lag, matched) = if reply.progress_known {
            (
                if m.reachable { "ok" } else { "unreachable" }.to_owned(),
                m.lag.to_string(),
                m.matched_index.to_string(),
            )
        } else {
            ("?".into(), "?".into(), "?".into())
        };
        vec![
            m.id.to_string(),
            m.address.clone(),
            format!(
                "{}{}",
                m.suffrage,
                if m.is_leader { " (leader)" } else { "" }
            ),
            health,
            matched,
            lag,
            if m.progress_state.is_empty() {
                "-".into()
            } else {
                m.progress_state.clone()
            },
        ]
    }) {
        table.row(row);
    }
    out.push_str(&table.render(""));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serin_proto::v1::ClusterMember;

    fn reply(progress_known: bool) -> ClusterStatusReply {
        ClusterStatusReply {
            node_id: 1,
            role: "leader".into(),
            leader_id: 1,
            leader_address: "http://a:1".into(),
            term: 4,
            commit_index: 40,
            applied_index: 40,
            last_index: 41,
            members: vec![
                ClusterMember {
                    id: 1,
                    address: "http://a:1".into(),
                    suffrage: "voter".into(),
                    is_leader: true,
                    matched_index: 41,
                    lag: 0,
                    reachable: true,
                    progress_state: "replicate".into(),
                },
                ClusterMember {
                    id: 2,
                    address: "http://b:2".into(),
                    suffrage: "voter".into(),
                    is_leader: false,
                    matched_index: 30,
                    lag: 11,
                    reachable: false,
                    progress_state: "probe".into(),
                },
            ],
            pending_change: String::new(),
            progress_known,
        }
    }

    #[test]
    fn the_table_shows_each_members_health_and_lag_and_unknown_progress_as_question_marks() {
        let text = render(&reply(true));
        assert!(text.contains("leader   node 1 at http://a:1"), "{text}");
        let row = text.lines().find(|l| l.starts_with("2 ")).unwrap();
        assert!(
            row.contains("unreachable") && row.contains("11") && row.contains("probe"),
            "{row}"
        );
        let text = render(&reply(false));
        let row = text.lines().find(|l| l.starts_with("2 ")).unwrap();
        assert!(row.contains('?') && !row.contains("unreachable"), "{row}");
    }

    #[test]
    fn json_leaves_progress_null_when_the_answering_member_does_not_know_it() {
        let value = to_json(&reply(false));
        assert_eq!(value["members"][1]["lag"], Value::Null);
        assert_eq!(to_json(&reply(true))["members"][1]["lag"], 11);
        assert_eq!(value["leader"], 1);
    }
}
