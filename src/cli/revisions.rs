//! `serin rollout undo SERVICE [--to-revision N]` and `serin rollout history SERVICE`: a
//! service's revisions and going back to one (docs/fleet.md, "Revisions").
//!
//! Apart from `rollout.rs` because these commands are about a service, not a rollout. The
//! renderers ([`render_history`], [`history_json`], [`undo_text`], [`undo_json`]) are pure, so
//! they are tested without a network.

use std::process::ExitCode;

use serde_json::{Value, json};
use serin_proto::v1::{ListRevisionsReply, ListRevisionsRequest, RevisionView, UndoServiceReply};

use super::output::{Table, timestamp_utc};
use super::rollout::{Sent, actor, describe_status, on_leader, unknown_outcome};
use super::{CoordinatorArgs, connect};

/// Arguments of `serin rollout undo`.
#[derive(clap::Args, Debug, Clone)]
pub struct UndoArgs {
    /// The service.
    pub service: String,
    /// The revision to go back to (see `serin rollout history SERVICE`); default: the one
    /// before the current revision.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub to_revision: Option<u32>,
    /// Why, recorded in the service's history.
    #[arg(long)]
    pub reason: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// Arguments of `serin rollout history`.
#[derive(clap::Args, Debug, Clone)]
pub struct HistoryArgs {
    /// The service.
    pub service: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// Runs `serin rollout undo`.
pub async fn undo(args: UndoArgs) -> anyhow::Result<ExitCode> {
    let request = serin_proto::v1::UndoServiceRequest {
        service: args.service.clone(),
        to_revision: args.to_revision.unwrap_or(0),
        reason: args.reason.clone().unwrap_or_default(),
        actor: actor(),
    };
    let sent = on_leader(&args.coordinator, None, |mut client| {
        let request = request.clone();
        async move { client.undo_service(request).await }
    })
    .await?;
    let reply = match sent {
        Sent::Answered(reply) => *reply,
        Sent::Unknown(cause) => {
            let check = format!(
                "check with `serin rollout history {}` whether a revision was added",
                args.service
            );
            return Ok(unknown_outcome("undo", &cause, &check));
        }
    };
    if args.json {
        println!("{:#}", undo_json(&reply));
    } else {
        print!("{}", undo_text(&reply));
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `serin rollout history`.
pub async fn history(args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.coordinator).await?;
    let reply = client
        .list_revisions(ListRevisionsRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|s| describe_status(&s, &args.coordinator, None))?
        .into_inner();
    if args.json {
        println!("{:#}", history_json(&reply));
    } else {
        print!("{}", render_history(&reply));
    }
    Ok(ExitCode::SUCCESS)
}

/// How a revision came to be: `initial`, `promoted by rollout api-3f9a1c`, `undo of 1`.
pub fn origin(revision: &RevisionView) -> String {
    if revision.undo_of > 0 {
        format!("undo of {}", revision.undo_of)
    } else if !revision.rollout_id.is_empty() {
        format!("promoted by rollout {}", revision.rollout_id)
    } else {
        "initial".to_owned()
    }
}

/// The revisions as a table, the current one marked, and the pin explained.
pub fn render_history(reply: &ListRevisionsReply) -> String {
    let current = reply.revisions.last().map_or(0, |r| r.number);
    let mut table = Table::new(&["", "REVISION", "VERSION", "HOW", "WHEN"]).right(&[1]);
    for r in &reply.revisions {
        table.row(vec![
            if r.number == current { "*" } else { "" }.to_owned(),
            r.number.to_string(),
            r.version.clone(),
            origin(r),
            timestamp_utc(r.at_ms),
        ]);
    }
    let mut out = format!(
        "service {}: {} revisions\n",
        reply.service,
        reply.revisions.len()
    );
    out.push_str(&table.render(""));
    if reply.pinned > 0 {
        let version = reply
            .revisions
            .iter()
            .find(|r| r.number == reply.pinned)
            .map_or("?", |r| r.version.as_str());
        out.push_str(&format!(
            "traffic is pinned to revision {} ({version}) by an undo until the next rollout starts\n",
            reply.pinned
        ));
    }
    out
}

/// One revision as JSON: `{number, version, how, rollout, undo_of, at_ms, at}`.
pub fn revision_json(r: &RevisionView) -> Value {
    json!({
        "number": r.number,
        "version": r.version,
        "how": origin(r),
        "rollout": (!r.rollout_id.is_empty()).then_some(&r.rollout_id),
        "undo_of": (r.undo_of > 0).then_some(r.undo_of),
        "at_ms": r.at_ms,
        "at": timestamp_utc(r.at_ms),
    })
}

/// `{"service", "current", "pinned", "revisions": [...]}`.
pub fn history_json(reply: &ListRevisionsReply) -> Value {
    json!({
        "service": reply.service,
        "current": reply.revisions.last().map(|r| r.number),
        "pinned": (reply.pinned > 0).then_some(reply.pinned),
        "revisions": reply.revisions.iter().map(revision_json).collect::<Vec<_>>(),
    })
}

/// What an undo did, in words.
pub fn undo_text(reply: &UndoServiceReply) -> String {
    let Some(r) = &reply.revision else {
        return format!(
            "{}: undone (the coordinator sent no revision)\n",
            reply.service
        );
    };
    let mut out = format!(
        "{}: revision {} → revision {} ({}, undo of {})\n",
        reply.service, reply.previous, r.number, r.version, r.undo_of
    );
    if reply.serving.is_empty() {
        out.push_str("traffic: the balancers send all of it to the variant that runs it\n");
    } else {
        out.push_str(&format!("traffic: {}\n", reply.serving.join(", ")));
    }
    out
}

/// `{"service", "previous", "revision": {...}, "serving": [...]}`.
pub fn undo_json(reply: &UndoServiceReply) -> Value {
    json!({
        "service": reply.service,
        "previous": reply.previous,
        "revision": reply.revision.as_ref().map(revision_json),
        "serving": reply.serving,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revision(number: u32, version: &str, rollout: &str, undo_of: u32) -> RevisionView {
        RevisionView {
            number,
            version: version.into(),
            rollout_id: rollout.into(),
            undo_of,
            at_ms: 1_764_614_400_000 + i64::from(number) * 60_000,
        }
    }

    fn reply(pinned: u32) -> ListRevisionsReply {
        ListRevisionsReply {
            service: "api".into(),
            revisions: vec![
                revision(1, "v1", "", 0),
                revision(2, "v2", "api-00beef", 0),
                revision(3, "v1", "", 1),
            ],
            pinned,
        }
    }

    #[test]
    fn history_names_how_each_revision_came_and_marks_the_current_one() {
        let text = render_history(&reply(3));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "service api: 3 revisions");
        assert!(
            lines[2].contains("initial") && lines[2].contains("v1"),
            "{text}"
        );
        assert!(
            lines[3].contains("promoted by rollout api-00beef"),
            "{text}"
        );
        assert!(
            lines[4].starts_with('*') && lines[4].contains("undo of 1"),
            "{text}"
        );
        assert!(
            lines[5].contains("pinned to revision 3 (v1)"),
            "the pin is explained: {text}"
        );
        assert!(!render_history(&reply(0)).contains("pinned"));
    }

    #[test]
    fn history_json_has_the_current_revision_and_nulls_for_what_does_not_apply() {
        let v = history_json(&reply(0));
        assert_eq!(v["current"], 3);
        assert!(v["pinned"].is_null());
        assert_eq!(v["revisions"][0]["how"], "initial");
        assert!(v["revisions"][0]["rollout"].is_null());
        assert_eq!(v["revisions"][1]["rollout"], "api-00beef");
        assert_eq!(v["revisions"][2]["undo_of"], 1);
    }

    #[test]
    fn an_undo_says_where_the_traffic_goes() {
        let mut reply = UndoServiceReply {
            service: "api".into(),
            revision: Some(revision(3, "v1", "", 1)),
            previous: 2,
            serving: vec!["api-1 (10.0.0.11:8080)".into()],
        };
        assert_eq!(
            undo_text(&reply),
            "api: revision 2 → revision 3 (v1, undo of 1)\ntraffic: api-1 (10.0.0.11:8080)\n"
        );
        assert_eq!(undo_json(&reply)["revision"]["undo_of"], 1);
        reply.serving.clear();
        assert!(undo_text(&reply).contains("variant that runs it"));
    }
}
