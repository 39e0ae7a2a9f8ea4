//! `serin agent list --services`: the fleet by service — instances by variant and host, whether
//! each is in the balancers' upstreams, the balancers and what each applied, and the latest
//! upstream membership changes.

use std::process::ExitCode;

use serde_json::{Value, json};
use serin_proto::v1::{ListServicesRequest, ServiceView, Variant};

use super::output::{Table, clock_utc, one_line};
use super::rollout::describe_status;
use super::{CoordinatorArgs, connect};

fn variant_name(v: i32) -> &'static str {
    match Variant::try_from(v) {
        Ok(Variant::Stable) => "stable",
        Ok(Variant::Canary) => "canary",
        _ => "?",
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

/// The fleet as text: one block per service.
pub fn render(services: &[ServiceView]) -> String {
    if services.is_empty() {
        return "no services: no agent has declared an instance or a balanced service\n".into();
    }
    let mut out = String::new();
    for s in services {
        let generation = s
            .generation
            .map_or("-".to_owned(), |g| format!("{}.{}", g.term, g.index));
        out.push_str(&format!(
            "service {}  stable {}  generation {generation}  upstreams {}\n",
            s.name,
            if s.stable_version.is_empty() {
                "-"
            } else {
                &s.stable_version
            },
            if s.from_inventory {
                "from the inventory"
            } else {
                "each balancer's own instances"
            }
        ));
        if let Some(current) = s.revisions.last() {
            out.push_str(&format!(
                "  revision {} ({}, {}) of {}; `serin rollout history {}` lists them\n",
                current.number,
                current.version,
                super::revisions::origin(current),
                s.revisions.len(),
                s.name
            ));
        }
        if s.instances.is_empty() {
            out.push_str("  no instances\n");
        } else {
            let mut t = Table::new(&[
                "INSTANCE",
                "VARIANT",
                "ADDRESS",
                "AGENT",
                "CONNECTED",
                "IN UPSTREAM",
            ]);
            for i in &s.instances {
                t.row(vec![
                    i.instance.clone(),
                    variant_name(i.variant).into(),
                    i.address.clone(),
                    i.agent.clone(),
                    yes_no(i.connected),
                    if s.from_inventory {
                        yes_no(i.in_upstream)
                    } else {
                        "-".into()
                    },
                ]);
            }
            out.push_str(&t.render("  "));
        }
        if s.balancers.is_empty() {
            out.push_str("  no balancer carries it\n");
        } else {
            let mut t = Table::new(&["BALANCER", "CONNECTED", "APPLIED", "ERROR"]);
            for b in &s.balancers {
                t.row(vec![
                    b.agent.clone(),
                    yes_no(b.connected),
                    yes_no(b.applied),
                    if b.error.is_empty() {
                        "-".into()
                    } else {
                        one_line(&b.error, 80)
                    },
                ]);
            }
            out.push_str(&t.render("  "));
        }
        for e in &s.history {
            out.push_str(&format!(
                "  {}  {}\n",
                clock_utc(e.at_ms),
                one_line(&e.reason, 160)
            ));
        }
        out.push('\n');
    }
    out
}

/// The fleet as JSON.
pub fn to_json(services: &[ServiceView]) -> Value {
    Value::Array(
        services
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "stable_version": (!s.stable_version.is_empty()).then(|| s.stable_version.clone()),
                    "generation": s.generation.map(|g| json!({"term": g.term, "index": g.index})),
                    "from_inventory": s.from_inventory,
                    "revisions": s.revisions.iter().map(super::revisions::revision_json).collect::<Vec<_>>(),
                    "instances": s.instances.iter().map(|i| json!({
                        "instance": i.instance,
                        "variant": variant_name(i.variant),
                        "address": i.address,
                        "agent": i.agent,
                        "connected": i.connected,
                        "in_upstream": i.in_upstream,
                    })).collect::<Vec<_>>(),
                    "balancers": s.balancers.iter().map(|b| json!({
                        "agent": b.agent,
                        "connected": b.connected,
                        "applied": b.applied,
                        "error": (!b.error.is_empty()).then(|| b.error.clone()),
                    })).collect::<Vec<_>>(),
                    "history": s.history.iter().map(|e| json!({
                        "at_ms": e.at_ms,
                        "reason": e.reason,
                        "generation": e.generation.map(|g| json!({"term": g.term, "index": g.index})),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// Runs `serin agent list --services`.
pub async fn list(json: bool, coordinator: &CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(coordinator).await?;
    let services = client
        .list_services(ListServicesRequest {})
        .await
        .map_err(|s| describe_status(&s, coordinator, None))?
        .into_inner()
        .services;
    if json {
        println!("{:#}", to_json(&services));
    } else {
        print!("{}", render(&services));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use serin_proto::v1::{
        BalancerView, FleetInstance, Generation, RevisionView, ServiceHistoryEvent,
    };

    use super::*;

    fn view() -> ServiceView {
        ServiceView {
            name: "web".into(),
            stable_version: "v1".into(),
            generation: Some(Generation { term: 2, index: 9 }),
            instances: vec![
                FleetInstance {
                    instance: "web-1".into(),
                    address: "10.0.0.11:8080".into(),
                    variant: Variant::Stable as i32,
                    agent: "h1".into(),
                    connected: true,
                    in_upstream: true,
                },
                FleetInstance {
                    instance: "web-2".into(),
                    address: "10.0.0.12:8080".into(),
                    variant: Variant::Stable as i32,
                    agent: "h2".into(),
                    connected: false,
                    in_upstream: false,
                },
            ],
            balancers: vec![BalancerView {
                agent: "lb".into(),
                connected: true,
                applied: false,
                error: "nginx -t failed:\nline 3".into(),
            }],
            history: vec![ServiceHistoryEvent {
                at_ms: 1_777_636_800_000,
                reason: "upstreams: removed web-2 (10.0.0.12:8080) of agent h2".into(),
                generation: Some(Generation { term: 2, index: 9 }),
            }],
            from_inventory: true,
            revisions: vec![],
        }
    }

    #[test]
    fn the_current_revision_is_named_with_how_it_came() {
        let mut service = view();
        assert!(!render(std::slice::from_ref(&service)).contains("revision"));
        service.revisions = vec![
            RevisionView {
                number: 1,
                version: "v1".into(),
                ..RevisionView::default()
            },
            RevisionView {
                number: 2,
                version: "v2".into(),
                rollout_id: "web-00beef".into(),
                ..RevisionView::default()
            },
            RevisionView {
                number: 3,
                version: "v1".into(),
                undo_of: 1,
                ..RevisionView::default()
            },
        ];
        let text = render(std::slice::from_ref(&service));
        assert!(
            text.contains(
                "  revision 3 (v1, undo of 1) of 3; `serin rollout history web` lists them"
            ),
            "{text}"
        );
        let json = to_json(&[service]);
        assert_eq!(
            json[0]["revisions"][1]["how"],
            "promoted by rollout web-00beef"
        );
        assert_eq!(json[0]["revisions"][2]["undo_of"], 1);
    }

    #[test]
    fn the_fleet_shows_instances_by_host_balancers_and_upstream_changes() {
        let text = render(&[view()]);
        assert!(
            text.starts_with(
                "service web  stable v1  generation 2.9  upstreams from the inventory"
            ),
            "{text}"
        );
        let web2 = text.lines().find(|l| l.contains("web-2")).unwrap();
        assert!(
            web2.contains("h2") && web2.trim_end().ends_with("no"),
            "{web2}"
        );
        let lb = text
            .lines()
            .find(|l| l.trim_start().starts_with("lb"))
            .unwrap();
        assert!(lb.contains("nginx -t failed: ⏎ line 3"), "{lb}");
        assert!(
            text.contains("12:00:00  upstreams: removed web-2"),
            "{text}"
        );
        let json = to_json(&[view()]);
        assert_eq!(json[0]["instances"][1]["in_upstream"], false);
        assert_eq!(json[0]["balancers"][0]["error"], "nginx -t failed:\nline 3");
        assert_eq!(render(&[]).lines().count(), 1);
    }
}
