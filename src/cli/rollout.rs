//! `serin rollout …`: start, inspect, watch and steer rollouts through the coordinator's
//! `ControlService`.
//!
//! The renderers are pure and take the time as an argument ([`render_status`], [`compact_line`],
//! [`rollout_json`], [`render_list`]), so the demo and the tests reuse them without a network.
//! gRPC errors become operator-facing messages in [`describe_status`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use serin_proto::v1::control_service_client::ControlServiceClient;
use serin_proto::v1::{
    ApplyProgress, DeployView, GetRolloutRequest, HookOutcome, ListRolloutsRequest, Rollout,
    RolloutEvent, RolloutReply, RolloutSummary, StartRolloutRequest, SteerAction,
    SteerRolloutRequest, TriggerOutcome, VariantStats,
};
use tonic::Code;
use tonic::transport::Channel;

use super::output::{Table, clock_utc, one_line, percent, short_duration, timestamp_utc};
use super::strategy::{check_outcome, read_strategy};
use super::{CoordinatorArgs, connect};

/// States after which nothing changes a rollout any more.
pub const TERMINAL_STATES: [&str; 3] = ["promoted", "rolled_back", "aborted"];
/// How often `status --watch` asks again.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How long `status --watch` keeps retrying an unreachable coordinator before giving up.
pub const WATCH_GIVE_UP: Duration = Duration::from_secs(30);
/// Longest `last reason` shown by `rollout list`.
const LIST_REASON_CHARS: usize = 60;
/// Longest reason or detail shown in the tables of `rollout status` (the full text is in
/// `--json` and `rollout evidence`).
const STATUS_TEXT_CHARS: usize = 160;
/// Exit code of a change that was sent without an answer coming back: it may or may not have
/// been applied.
pub const EXIT_OUTCOME_UNKNOWN: u8 = 3;
/// Rollouts per page of `rollout list` unless `--limit` says otherwise.
pub const DEFAULT_LIST_LIMIT: u32 = 50;

/// Rollout commands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum RolloutCommand {
    /// Start a rollout of a new version of a service.
    ///
    /// The strategy file is validated locally first (as `serin strategy check` does; exit 2 when
    /// invalid), then sent to the coordinator. Prints only the new rollout's id on stdout, so
    /// scripts can capture it.
    #[command(after_help = "Examples:\n  \
        serin rollout start checkout --version 1.5.0 --strategy canary.toml\n  \
        id=$(serin rollout start checkout --version 1.5.0 --strategy canary.toml \
        --stable-version 1.4.2) && serin rollout status \"$id\" --watch")]
    Start {
        /// The service to roll out.
        service: String,
        /// The new (canary) version.
        #[arg(long)]
        version: String,
        /// Strategy TOML file: stages, checks and triggers.
        #[arg(long)]
        strategy: PathBuf,
        /// Version the stable instances run (default: the service's last promoted version).
        #[arg(long)]
        stable_version: Option<String>,
        /// Print the created rollout as JSON instead of its id.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Show a rollout: stage, weight, live analysis and history.
    ///
    /// Without an id, shows the most recently started rollout that is still running, else the
    /// most recent one. With --watch, redraws every second until the rollout finishes (promoted,
    /// rolled_back or aborted), then prints its final state and exits 0 whatever the outcome;
    /// read `state` from `--json` to branch on it. When stdout is not a terminal, --watch prints
    /// one compact line per change instead of redrawing (one JSON object per change with --json).
    #[command(after_help = "Examples:\n  \
        serin rollout status\n  \
        serin rollout status checkout-3f9a1c --watch\n  \
        serin rollout status checkout-3f9a1c --json | jq -r .state")]
    Status {
        /// Rollout id (default: the latest running rollout, else the latest).
        id: Option<String>,
        /// Follow the rollout until it finishes; always exits 0 once it has.
        #[arg(long)]
        watch: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Shards model: also say which shard this Discord guild id is on ((id >> 22) % shard
        /// count) and which side serves it; repeatable.
        #[arg(long = "guild", value_name = "GUILD_ID")]
        guilds: Vec<u64>,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// List rollouts, newest first, a page at a time (50 by default).
    ///
    /// When there are more, the command for the next page is printed on stderr.
    #[command(after_help = "Examples:\n  \
        serin rollout list --limit 5\n  \
        serin rollout list --json | jq -r '.[] | select(.state == \"paused\") | .id'")]
    List {
        /// Rollouts per page, 1..=500.
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: u32,
        /// Where the page starts: the token printed with the previous page.
        #[arg(long)]
        page_token: Option<String>,
        /// Print a JSON array of summaries instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Print what was measured and decided at every stage end and rollback, with the history.
    ///
    /// Markdown by default (paste it into a change ticket); --json for machines.
    #[command(after_help = "Example:\n  serin rollout evidence checkout-3f9a1c > evidence.md")]
    Evidence {
        /// Rollout id.
        id: String,
        /// Print JSON instead of Markdown.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Hold a rollout at its current stage and weight.
    #[command(
        after_help = "Example:\n  serin rollout pause checkout-3f9a1c --reason \"investigating latency\""
    )]
    Pause(SteerArgs),
    /// Continue a paused rollout, or pass the manual gate of one awaiting promotion.
    #[command(after_help = "Example:\n  serin rollout resume checkout-3f9a1c")]
    Resume(SteerArgs),
    /// Skip the remaining stages: make the canary version the new stable now.
    #[command(
        after_help = "Example:\n  serin rollout promote checkout-3f9a1c --reason \"verified by QA\""
    )]
    Promote(SteerArgs),
    /// Stop a rollout and send all traffic back to stable.
    #[command(
        after_help = "Example:\n  serin rollout abort checkout-3f9a1c --reason \"bad release\""
    )]
    Abort(SteerArgs),
    /// Send a service's traffic back to an earlier revision's version (default: the previous
    /// revision), through the balancers.
    ///
    /// Appends a revision (the old version, "undo of N"); refused while a rollout of the
    /// service runs, for an unknown revision, for the version already current, and when no
    /// instance is known to run that version. See `serin rollout history SERVICE`.
    #[command(after_help = "Examples:\n  \
        serin rollout undo checkout\n  \
        serin rollout undo checkout --to-revision 1 --reason \"1.5.0 corrupts carts\"")]
    Undo(super::revisions::UndoArgs),
    /// List a service's revisions: number, version, how it came (initial, promoted by a
    /// rollout, undo of a revision) and when.
    #[command(after_help = "Example:\n  serin rollout history checkout")]
    History(super::revisions::HistoryArgs),
}

/// Arguments of pause, resume, promote and abort.
#[derive(clap::Args, Debug, Clone)]
pub struct SteerArgs {
    /// Rollout id.
    pub id: String,
    /// Why, recorded in the rollout's history.
    #[arg(long)]
    pub reason: Option<String>,
    /// Print the updated rollout as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub coordinator: CoordinatorArgs,
}

/// Runs a `serin rollout …` command and returns the process exit code.
pub async fn run_rollout(cmd: RolloutCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RolloutCommand::Start {
            service,
            version,
            strategy,
            stable_version,
            json,
            coordinator,
        } => {
            start(
                service,
                version,
                strategy,
                stable_version,
                json,
                &coordinator,
            )
            .await
        }
        RolloutCommand::Status {
            id,
            watch: true,
            json,
            coordinator,
            ..
        } => watch(id, json, &coordinator).await,
        RolloutCommand::Status {
            id,
            watch: false,
            json,
            guilds,
            coordinator,
        } => {
            let mut client = connect(&coordinator).await?;
            let id = match id {
                Some(id) => id,
                None => default_id(&mut client, &coordinator).await?,
            };
            let rollout = get(&mut client, &id)
                .await
                .map_err(|s| describe_status(&s, &coordinator, Some(&id)))?;
            // Checked before anything is printed: a bad --guild prints only its error.
            let guild_lines = match (&rollout.deploy, guilds.is_empty()) {
                (_, true) => Vec::new(),
                (None, false) => anyhow::bail!(
                    "--guild: rollout {id} shows no deployment (serin deploys nothing for it, or it is no longer its service's latest rollout)"
                ),
                (Some(d), false) => guilds
                    .iter()
                    .map(|g| guild_line(d, *g))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(anyhow::Error::msg)?,
            };
            if json {
                let mut value = rollout_json(&rollout);
                if !guild_lines.is_empty() {
                    value["guilds"] = json!(guild_lines);
                }
                println!("{value:#}");
            } else {
                print!("{}", render_status(&rollout, now_ms()));
                for line in &guild_lines {
                    println!("{line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::List {
            limit,
            page_token,
            json,
            coordinator,
        } => {
            let mut client = connect(&coordinator).await?;
            let request = ListRolloutsRequest {
                limit,
                page_token: page_token.unwrap_or_default(),
                running_only: false,
            };
            let (rollouts, next) = list(&mut client, request)
                .await
                .map_err(|s| describe_status(&s, &coordinator, None))?;
            if json {
                let all: Vec<Value> = rollouts.iter().map(summary_json).collect();
                println!("{:#}", Value::Array(all));
            } else {
                print!("{}", render_list(&rollouts));
            }
            if let Some(hint) = next_page_hint(limit, &next) {
                eprintln!("{hint}");
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Evidence {
            id,
            json,
            coordinator,
        } => {
            let mut client = connect(&coordinator).await?;
            let rollout = get(&mut client, &id)
                .await
                .map_err(|s| describe_status(&s, &coordinator, Some(&id)))?;
            let record = super::evidence::decode(&rollout.detail_json)?;
            if json {
                println!("{:#}", super::evidence::to_json(&record));
            } else {
                print!("{}", super::evidence::to_markdown(&record));
            }
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Pause(args) => steer(SteerAction::Pause, args).await,
        RolloutCommand::Resume(args) => steer(SteerAction::Resume, args).await,
        RolloutCommand::Promote(args) => steer(SteerAction::Promote, args).await,
        RolloutCommand::Abort(args) => steer(SteerAction::Abort, args).await,
        RolloutCommand::Undo(args) => super::revisions::undo(args).await,
        RolloutCommand::History(args) => super::revisions::history(args).await,
    }
}

async fn start(
    service: String,
    version: String,
    strategy: PathBuf,
    stable_version: Option<String>,
    json: bool,
    coordinator: &CoordinatorArgs,
) -> anyhow::Result<ExitCode> {
    let text = match read_strategy(&strategy) {
        Ok(text) => text,
        Err(unreadable) => return Ok(unreadable.print()),
    };
    let checked = check_outcome(&strategy.display().to_string(), &text, json);
    if !checked.is_valid() {
        return Ok(checked.print());
    }
    let request = StartRolloutRequest {
        service,
        version,
        strategy_toml: text,
        actor: actor(),
        stable_version: stable_version.unwrap_or_default(),
    };
    let check = format!(
        "check with `serin rollout list --limit 5` whether a rollout of {} {} started",
        request.service, request.version
    );
    let sent = on_leader(coordinator, None, |mut client| {
        let request = request.clone();
        async move { client.start_rollout(request).await }
    })
    .await?;
    let reply = match sent {
        Sent::Answered(reply) => *reply,
        Sent::Unknown(cause) => return Ok(unknown_outcome("start", &cause, &check)),
    };
    let rollout = unwrap_reply(reply)?;
    if json {
        println!("{:#}", rollout_json(&rollout));
    } else {
        println!("{}", rollout.id);
        eprintln!(
            "started {}: {} {} → {}, {}",
            rollout.id,
            rollout.service,
            or_unknown(&rollout.stable_version),
            rollout.version,
            stage_text(&rollout)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn steer(action: SteerAction, args: SteerArgs) -> anyhow::Result<ExitCode> {
    let request = SteerRolloutRequest {
        id: args.id.clone(),
        action: action as i32,
        reason: args.reason.unwrap_or_default(),
        actor: actor(),
    };
    let sent = on_leader(&args.coordinator, Some(&args.id), |mut client| {
        let request = request.clone();
        async move { client.steer_rollout(request).await }
    })
    .await?;
    let reply = match sent {
        Sent::Answered(reply) => *reply,
        Sent::Unknown(cause) => {
            let check = format!("check with `serin rollout status {}`", args.id);
            return Ok(unknown_outcome(action_name(action), &cause, &check));
        }
    };
    let rollout = unwrap_reply(reply)?;
    if args.json {
        println!("{:#}", rollout_json(&rollout));
    } else {
        println!(
            "{}: {}, {}",
            rollout.id,
            rollout.state,
            stage_text(&rollout)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn watch(
    id: Option<String>,
    json: bool,
    coordinator: &CoordinatorArgs,
) -> anyhow::Result<ExitCode> {
    let mut client = connect(coordinator).await?;
    let id = match id {
        Some(id) => id,
        None => default_id(&mut client, coordinator).await?,
    };
    let redraw = !json && std::io::stdout().is_terminal();
    let mut last_printed: Option<String> = None;
    let mut failing_since: Option<Instant> = None;
    let mut ticker = tokio::time::interval(WATCH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        let rollout = match get(&mut client, &id).await {
            Ok(r) => {
                if failing_since.take().is_some() {
                    eprintln!("reconnected to the coordinator");
                }
                r
            }
            Err(status) if status.code() == Code::Unavailable => {
                // Leader change or a lost connection: try every address again, for a while.
                let since = *failing_since.get_or_insert_with(|| {
                    eprintln!(
                        "lost the coordinator ({}); retrying for up to {}s",
                        status.message(),
                        WATCH_GIVE_UP.as_secs()
                    );
                    Instant::now()
                });
                if since.elapsed() >= WATCH_GIVE_UP {
                    return Err(describe_status(&status, coordinator, Some(&id)));
                }
                if let Ok(c) = connect(coordinator).await {
                    client = c;
                }
                continue;
            }
            Err(status) => return Err(describe_status(&status, coordinator, Some(&id))),
        };
        let now = now_ms();
        let finished = is_terminal(&rollout.state);
        if json {
            let line = rollout_json(&rollout).to_string();
            if last_printed.as_deref() != Some(line.as_str()) {
                println!("{line}");
                last_printed = Some(line);
            }
        } else if redraw {
            print!("\x1b[2J\x1b[H{}", render_status(&rollout, now));
            if !finished {
                println!(
                    "\nwatching {id} every {}s; Ctrl-C to stop",
                    WATCH_INTERVAL.as_secs()
                );
            }
        } else {
            let line = compact_line(&rollout, now);
            // Compare without the leading clock so only real changes print.
            let key = line.split_once(' ').map_or("", |(_, rest)| rest).to_owned();
            if last_printed.as_deref() != Some(key.as_str()) {
                println!("{line}");
                last_printed = Some(key);
            }
        }
        if finished {
            if !json {
                println!("{}", finished_line(&rollout));
            }
            return Ok(ExitCode::SUCCESS);
        }
    }
}

async fn get(
    client: &mut ControlServiceClient<Channel>,
    id: &str,
) -> Result<Rollout, tonic::Status> {
    let reply = client
        .get_rollout(GetRolloutRequest { id: id.to_owned() })
        .await?
        .into_inner();
    reply
        .rollout
        .ok_or_else(|| tonic::Status::internal("the coordinator sent an empty reply"))
}

/// One page of summaries and the token of the next page (empty on the last).
async fn list(
    client: &mut ControlServiceClient<Channel>,
    request: ListRolloutsRequest,
) -> Result<(Vec<RolloutSummary>, String), tonic::Status> {
    let reply = client.list_rollouts(request).await?.into_inner();
    Ok((reply.rollouts, reply.next_page_token))
}

/// `more rollouts: serin rollout list --limit 50 --page-token TOKEN`, when there is a next page.
pub fn next_page_hint(limit: u32, next_page_token: &str) -> Option<String> {
    (!next_page_token.is_empty()).then(|| {
        format!(
            "more rollouts: serin rollout list --limit {limit} --page-token '{next_page_token}'"
        )
    })
}

/// The id `status` shows when none is given: the most recently started rollout that is still
/// running, else the most recent one.
async fn default_id(
    client: &mut ControlServiceClient<Channel>,
    coordinator: &CoordinatorArgs,
) -> anyhow::Result<String> {
    for running_only in [true, false] {
        let request = ListRolloutsRequest {
            limit: 1,
            page_token: String::new(),
            running_only,
        };
        let (rollouts, _) = list(client, request)
            .await
            .map_err(|s| describe_status(&s, coordinator, None))?;
        if let Some(r) = rollouts.first() {
            return Ok(r.id.clone());
        }
    }
    Err(anyhow::anyhow!(
        "no rollouts yet; start one with `serin rollout start`"
    ))
}

/// What became of a change sent to the coordinator.
pub(super) enum Sent<T = RolloutReply> {
    /// The coordinator answered.
    Answered(Box<T>),
    /// The request went out but the connection failed or the time ran out before an answer:
    /// it may or may not have been applied. Holds the cause.
    Unknown(String),
}

/// Whether a failed call may still have reached the coordinator and been applied. A status the
/// coordinator sent (it has no local cause) is an answer, and a failure to connect means nothing
/// was sent; anything else the client produced itself (a connection reset or closed mid-request,
/// its own timeout) leaves the outcome unknown.
pub fn outcome_unknown(status: &tonic::Status) -> bool {
    use std::error::Error;
    let Some(cause) = status.source() else {
        return false;
    };
    let mut next: Option<&(dyn Error + 'static)> = Some(cause);
    while let Some(e) = next {
        if e.is::<tonic::ConnectError>() {
            return false;
        }
        next = e.source();
    }
    true
}

/// Prints why the outcome of `action` is unknown and how to check, and returns
/// [`EXIT_OUTCOME_UNKNOWN`].
pub(super) fn unknown_outcome(action: &str, cause: &str, check: &str) -> ExitCode {
    eprintln!("error: {}", unknown_outcome_message(action, cause, check));
    ExitCode::from(EXIT_OUTCOME_UNKNOWN)
}

/// `the pause was sent but no answer came back (cause); its outcome is unknown: check with …`.
pub fn unknown_outcome_message(action: &str, cause: &str, check: &str) -> String {
    format!(
        "the {action} was sent to the coordinator but no answer came back ({cause}); \
         its outcome is unknown: it may or may not have been applied; {check}"
    )
}

fn action_name(action: SteerAction) -> &'static str {
    match action {
        SteerAction::Pause => "pause",
        SteerAction::Resume => "resume",
        SteerAction::Promote => "promote",
        SteerAction::Abort => "abort",
        SteerAction::Unspecified => "command",
    }
}

/// The cause of a lost answer, e.g. `connection error: connection reset`.
fn lost_cause(status: &tonic::Status) -> String {
    use std::error::Error;
    match status.source() {
        Some(cause) => super::error_chain(cause),
        None => status.message().to_owned(),
    }
}

/// Sends a change (start or steer) to the leader. Followers answer `Unavailable` ("not the
/// leader"), so when several addresses are given each is tried in turn until one accepts; the
/// first answer that is not `Unavailable` is final. A request whose answer is lost is never
/// sent again (it may have been applied): its outcome is [`Sent::Unknown`], as is an ABORTED
/// answer (a leader that stepped down before the change committed: the next may commit it).
pub(super) async fn on_leader<T, F, Fut>(
    coordinator: &CoordinatorArgs,
    id: Option<&str>,
    call: F,
) -> anyhow::Result<Sent<T>>
where
    F: Fn(ControlServiceClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let unavailable = match call(connect(coordinator).await?).await {
        Ok(reply) => return Ok(Sent::Answered(Box::new(reply.into_inner()))),
        Err(s) if outcome_unknown(&s) || s.code() == Code::Aborted => {
            return Ok(Sent::Unknown(lost_cause(&s)));
        }
        Err(s) if s.code() == Code::Unavailable => s,
        Err(s) => return Err(describe_status(&s, coordinator, id)),
    };
    let addresses = coordinator.addresses();
    if addresses.len() > 1 {
        for address in addresses {
            let one = CoordinatorArgs {
                coordinator: vec![address],
            };
            let Ok(client) = connect(&one).await else {
                continue;
            };
            match call(client).await {
                Ok(reply) => return Ok(Sent::Answered(Box::new(reply.into_inner()))),
                Err(s) if outcome_unknown(&s) || s.code() == Code::Aborted => {
                    return Ok(Sent::Unknown(lost_cause(&s)));
                }
                Err(s) if s.code() == Code::Unavailable => continue,
                Err(s) => return Err(describe_status(&s, &one, id)),
            }
        }
    }
    Err(describe_status(&unavailable, coordinator, id))
}

fn unwrap_reply(reply: RolloutReply) -> anyhow::Result<Rollout> {
    reply
        .rollout
        .ok_or_else(|| anyhow::anyhow!("the coordinator sent an empty reply"))
}

/// True for promoted, rolled_back and aborted.
pub fn is_terminal(state: &str) -> bool {
    TERMINAL_STATES.contains(&state)
}

/// Turns a gRPC error into the message an operator reads (exit code 1).
pub fn describe_status(
    status: &tonic::Status,
    coordinator: &CoordinatorArgs,
    id: Option<&str>,
) -> anyhow::Error {
    let message = status.message().trim();
    let text = match (status.code(), id) {
        (Code::NotFound, Some(id)) => format!("rollout '{id}' not found"),
        (Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound, _) => {
            message.to_owned()
        }
        (Code::Unavailable, _) => {
            let mut text = format!(
                "coordinator unavailable at {}",
                coordinator.addresses().join(", ")
            );
            if !message.is_empty() {
                text.push_str(": ");
                text.push_str(message);
            }
            text
        }
        (Code::Unimplemented, _) => format!(
            "{} does not serve serin's control API (is it a serin coordinator?): {message}",
            coordinator.addresses().join(", ")
        ),
        (Code::DeadlineExceeded, _) => format!("the coordinator did not answer in time: {message}"),
        (code, _) => format!("the coordinator failed the request ({code:?}): {message}"),
    };
    anyhow::anyhow!(text)
}

/// The actor recorded for operator actions: `$USER`, else `operator`.
pub(super) fn actor() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "operator".to_owned())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "(unknown)" } else { s }
}

/// `2/5 at 5%`: the 1-based stage of the rollout and the canary weight.
fn position_text(r: &Rollout) -> String {
    format!(
        "{}/{} at {}%",
        r.stage_index + 1,
        r.stage_count,
        r.canary_weight
    )
}

/// `stage 2/5 at 5%`.
fn stage_text(r: &Rollout) -> String {
    format!("stage {}", position_text(r))
}

fn finished_line(r: &Rollout) -> String {
    let mut line = format!("rollout {} finished: {}", r.id, r.state);
    if !r.last_reason.is_empty() {
        line.push_str(" (");
        line.push_str(&one_line(&r.last_reason, STATUS_TEXT_CHARS));
        line.push(')');
    }
    line
}

fn p95_text(s: &VariantStats) -> String {
    if s.p95_ms < 0.0 {
        "-".to_owned()
    } else {
        format!("{:.1}", s.p95_ms)
    }
}

/// The strategy's header and cookie overrides, from the full record in `detail_json`
/// (`header X-Serin-Variant: canary|stable`), marked off once the rollout finished (the
/// coordinator stops sending them then); `None` when the strategy names neither or the record
/// is absent or unreadable.
fn override_text(r: &Rollout) -> Option<String> {
    let detail: Value = serde_json::from_str(&r.detail_json).ok()?;
    let traffic = &detail["strategy"]["traffic"];
    let values = "canary|stable";
    let parts: Vec<String> = [
        traffic["override_header"]
            .as_str()
            .map(|h| format!("header {h}: {values}")),
        traffic["override_cookie"]
            .as_str()
            .map(|c| format!("cookie {c}={values}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        return None;
    }
    let mut text = parts.join(", ");
    if is_terminal(&r.state) {
        text.push_str(" (off: the rollout finished)");
    }
    Some(text)
}

/// The full human status of a rollout: header, live analysis, event history.
pub fn render_status(r: &Rollout, now_ms: i64) -> String {
    let mut out = String::new();
    let finished = is_terminal(&r.state);
    let mut head = Table::new(&["rollout", &r.id]);
    head.row(vec!["service".into(), r.service.clone()]);
    head.row(vec![
        "version".into(),
        format!(
            "{} → {} (stable → canary)",
            or_unknown(&r.stable_version),
            r.version
        ),
    ]);
    head.row(vec!["state".into(), r.state.clone()]);
    let mut stage = position_text(r);
    if !finished && r.stage_started_at_ms > 0 {
        stage.push_str(&format!(
            " (for {})",
            short_duration(now_ms - r.stage_started_at_ms)
        ));
    }
    head.row(vec!["stage".into(), stage]);
    if let Some(text) = override_text(r) {
        head.row(vec!["override".into(), text]);
    }
    head.row(vec![
        "started".into(),
        format!(
            "{} ago ({})",
            short_duration(now_ms - r.started_at_ms),
            timestamp_utc(r.started_at_ms)
        ),
    ]);
    head.row(vec![
        "reason".into(),
        if r.last_reason.is_empty() {
            "-".into()
        } else {
            one_line(&r.last_reason, STATUS_TEXT_CHARS)
        },
    ]);
    if let Some(apply) = &r.apply {
        head.row(vec!["agents".into(), apply_summary(apply)]);
    }
    if let Some(deploy) = &r.deploy {
        head.row(vec!["deploy".into(), deploy_summary(deploy)]);
        if deploy.shard_count > 0 {
            head.row(vec!["shards".into(), shards_summary(deploy)]);
        }
    }
    out.push_str(&head.render(""));
    if let Some(deploy) = &r.deploy
        && !(deploy.failures.is_empty() && deploy.waiting.is_empty())
    {
        out.push_str("\nmanaged instances not running their assignment\n");
        let lines = (deploy.failures.iter().map(|f| ("failed ", f)))
            .chain(deploy.waiting.iter().map(|w| ("waiting", w)));
        for (what, line) in lines {
            out.push_str(&format!("  {what}  {}\n", one_line(line, 110)));
        }
    }
    if let Some(apply) = &r.apply
        && !apply.lagging.is_empty()
    {
        out.push_str("\nagents that have not applied the current traffic\n");
        let mut lagging = Table::new(&["AGENT", "CONNECTED", "SINCE", "ERROR"]);
        for l in &apply.lagging {
            lagging.row(vec![
                l.agent.clone(),
                if l.connected { "yes" } else { "no" }.into(),
                if l.since_ms > 0 {
                    format!("{} ago", short_duration(now_ms - l.since_ms))
                } else {
                    "-".into()
                },
                if l.error.is_empty() {
                    if l.connected {
                        "no answer yet".into()
                    } else {
                        "disconnected".into()
                    }
                } else {
                    one_line(&l.error, 90)
                },
            ]);
        }
        out.push_str(&lagging.render("  "));
    }

    match &r.live {
        Some(live) => {
            out.push_str("\nlive analysis (current stage)\n");
            let mut stats = Table::new(&[
                "VARIANT",
                "REQUESTS",
                "ERRORS",
                "ERROR RATE",
                "P95 MS",
                "RPS",
            ])
            .right(&[1, 2, 3, 4, 5]);
            for (name, s) in [("stable", &live.stable), ("canary", &live.canary)] {
                match s {
                    Some(s) => stats.row(vec![
                        name.into(),
                        s.requests.to_string(),
                        s.errors.to_string(),
                        percent(s.error_rate),
                        p95_text(s),
                        format!("{:.1}", s.requests_per_second),
                    ]),
                    None => stats.row(vec![
                        name.into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                    ]),
                }
            }
            out.push_str(&stats.render("  "));
            for (name, s) in [("stable", &live.stable), ("canary", &live.canary)] {
                if let Some(s) = s
                    && !s.last_scrape_error.is_empty()
                {
                    out.push_str(&format!(
                        "  {name} metrics unreadable: {}\n",
                        one_line(&s.last_scrape_error, STATUS_TEXT_CHARS)
                    ));
                }
            }
            if live.checks.is_empty() {
                out.push_str("\n  no checks\n");
            } else {
                let mut checks = Table::new(&["CHECK", "VERDICT", "DETAIL"]);
                for c in &live.checks {
                    checks.row(vec![
                        c.name.clone(),
                        c.verdict.clone(),
                        one_line(&c.detail, STATUS_TEXT_CHARS),
                    ]);
                }
                out.push('\n');
                out.push_str(&checks.render("  "));
            }
            if !live.triggers.is_empty() {
                out.push('\n');
                out.push_str(&render_triggers(&live.triggers, now_ms).render("  "));
            }
        }
        None if !finished => {
            out.push_str("\nlive analysis: none yet (the leader reports it while a stage runs)\n")
        }
        None => {}
    }

    out.push_str(&render_hooks(r));
    out.push_str("\nevents\n");
    if r.events.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut events =
            Table::new(&["TIME (UTC)", "KIND", "STAGE", "WEIGHT", "ACTOR", "REASON"]).right(&[3]);
        for e in &r.events {
            events.row(vec![
                clock_utc(e.at_ms),
                e.kind.clone(),
                format!("{}/{}", e.stage_index + 1, r.stage_count),
                format!("{}%", e.canary_weight),
                e.actor.clone(),
                one_line(&e.reason, STATUS_TEXT_CHARS),
            ]);
        }
        out.push_str(&events.render("  "));
    }
    out
}

/// `3/4 applied generation 1.7`, with a warning mark when some have not.
fn deploy_summary(d: &DeployView) -> String {
    let state = if !d.failures.is_empty() {
        format!("{} failed", d.failures.len())
    } else if !d.waiting.is_empty() {
        format!("{} not ready", d.waiting.len())
    } else {
        "every managed instance runs its assignment".into()
    };
    format!(
        "{} model, {state}{}",
        d.model,
        if d.settled { "; settled" } else { "" }
    )
}

/// `4 of 16 on the canary: 1, 5, 9, 13; 2 moving: 3, 7`.
fn shards_summary(d: &DeployView) -> String {
    let list = |shards: &[u32]| {
        shards
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = format!(
        "{} of {} on the canary{}",
        d.canary_shards.len(),
        d.shard_count,
        if d.canary_shards.is_empty() {
            String::new()
        } else {
            format!(": {}", list(&d.canary_shards))
        }
    );
    if !d.moving_shards.is_empty() {
        text.push_str(&format!(
            "; {} moving: {}",
            d.moving_shards.len(),
            list(&d.moving_shards)
        ));
    }
    text
}

/// Which shard a Discord guild is on and which side serves it, e.g.
/// `guild 81384788765712384: shard 5 of 16, canary`.
pub fn guild_line(d: &DeployView, guild: u64) -> Result<String, String> {
    if d.shard_count == 0 {
        return Err(format!(
            "--guild {guild}: this rollout does not use the shards model (its model is {})",
            d.model
        ));
    }
    let shard = ((guild >> 22) % u64::from(d.shard_count)) as u32;
    let side = if d.canary_shards.contains(&shard) {
        "canary"
    } else if d.moving_shards.contains(&shard) {
        "moving between the sides (released, not yet granted)"
    } else {
        "stable"
    };
    Ok(format!(
        "guild {guild}: shard {shard} of {}, {side}",
        d.shard_count
    ))
}

fn apply_summary(apply: &ApplyProgress) -> String {
    let generation = apply
        .generation
        .map_or("-".to_owned(), |g| format!("{}.{}", g.term, g.index));
    let mark = if apply.lagging.is_empty() {
        ""
    } else {
        "  ⚠ NOT APPLIED EVERYWHERE"
    };
    format!(
        "{}/{} applied generation {generation}{mark}",
        apply.applied, apply.agents
    )
}

/// `value <= threshold` (or `>`), or `-` without data.
fn trigger_value(t: &TriggerOutcome) -> String {
    match (t.value, t.threshold) {
        (Some(v), Some(th)) => {
            let op = if t.verdict == "fail" { ">" } else { "<=" };
            format!(
                "{} {op} {}",
                round_figure(v, &t.unit),
                round_figure(th, &t.unit)
            )
        }
        _ => "-".into(),
    }
}

fn round_figure(v: f64, unit: &str) -> String {
    let v = (v * 10_000.0).round() / 10_000.0;
    format!("{v}{unit}")
}

/// Triggers beside the checks: value, threshold, window, and for a failing warning trigger how
/// long it has failed and how much grace is left.
fn render_triggers(triggers: &[TriggerOutcome], now_ms: i64) -> Table {
    let mut table = Table::new(&["TRIGGER", "SEVERITY", "VERDICT", "VALUE", "WINDOW", "GRACE"]);
    for t in triggers {
        let grace = if t.severity != "warning" {
            "-".to_owned()
        } else if t.failing_since_ms > 0 {
            let failed = (now_ms - t.failing_since_ms).max(0);
            let left = (t.grace_ms as i64 - failed).max(0);
            format!(
                "failing {}, {} left of {}",
                short_duration(failed),
                short_duration(left),
                short_duration(t.grace_ms as i64)
            )
        } else {
            short_duration(t.grace_ms as i64)
        };
        table.row(vec![
            t.name.clone(),
            t.severity.clone(),
            t.verdict.clone(),
            trigger_value(t),
            short_duration(t.window_ms as i64),
            grace,
        ]);
    }
    table
}

/// One line for `status --watch` when stdout is not a terminal:
/// `HH:MM:SS stage 2/5 5% progressing canary err 0.00% p95 12ms | stable err 0.10% p95 11ms`.
pub fn compact_line(r: &Rollout, now_ms: i64) -> String {
    let mut line = format!(
        "{} stage {}/{} {}% {}",
        clock_utc(now_ms),
        r.stage_index + 1,
        r.stage_count,
        r.canary_weight,
        r.state
    );
    let variant = |name: &str, s: &Option<VariantStats>| match s {
        Some(s) => {
            let p95 = if s.p95_ms < 0.0 {
                "-".to_owned()
            } else {
                format!("{:.0}ms", s.p95_ms)
            };
            format!("{name} err {} p95 {p95}", percent(s.error_rate))
        }
        None => format!("{name} no data"),
    };
    if let Some(live) = &r.live
        && !is_terminal(&r.state)
    {
        line.push(' ');
        line.push_str(&variant("canary", &live.canary));
        line.push_str(" | ");
        line.push_str(&variant("stable", &live.stable));
    }
    line
}

/// The `rollout list` table: id, service, version, state, stage, weight, last reason.
pub fn render_list(rollouts: &[RolloutSummary]) -> String {
    if rollouts.is_empty() {
        return "no rollouts\n".to_owned();
    }
    let mut table = Table::new(&[
        "ID",
        "SERVICE",
        "VERSION",
        "STATE",
        "STAGE",
        "WEIGHT",
        "LAST REASON",
    ])
    .right(&[5]);
    for r in rollouts {
        table.row(vec![
            r.id.clone(),
            r.service.clone(),
            r.version.clone(),
            if r.not_applied > 0 {
                format!("{} ⚠ {} agent(s) not applied", r.state, r.not_applied)
            } else {
                r.state.clone()
            },
            format!("{}/{}", r.stage_index + 1, r.stage_count),
            format!("{}%", r.canary_weight),
            one_line(&r.last_reason, LIST_REASON_CHARS),
        ]);
    }
    table.render("")
}

fn stats_json(s: &Option<VariantStats>) -> Value {
    match s {
        Some(s) => json!({
            "requests": s.requests,
            "errors": s.errors,
            "error_rate": s.error_rate,
            "p95_ms": if s.p95_ms < 0.0 { Value::Null } else { json!(s.p95_ms) },
            "requests_per_second": s.requests_per_second,
            "last_scrape_error": if s.last_scrape_error.is_empty() {
                Value::Null
            } else {
                json!(s.last_scrape_error)
            },
        }),
        None => Value::Null,
    }
}

/// A summary as a JSON object (`rollout list --json`); times of 0 are `null`.
pub fn summary_json(r: &RolloutSummary) -> Value {
    let at = |ms: i64| if ms > 0 { json!(ms) } else { Value::Null };
    json!({
        "id": r.id,
        "service": r.service,
        "version": r.version,
        "stable_version": r.stable_version,
        "state": r.state,
        "terminal": is_terminal(&r.state),
        "stage_index": r.stage_index,
        "stage_count": r.stage_count,
        "canary_weight": r.canary_weight,
        "last_reason": r.last_reason,
        "started_at_ms": r.started_at_ms,
        "stage_started_at_ms": at(r.stage_started_at_ms),
        "updated_at_ms": at(r.updated_at_ms),
        "finished_at_ms": at(r.finished_at_ms),
        "not_applied": r.not_applied,
    })
}

/// A hook run as JSON: `status` and `error` are `null` when absent.
fn hook_json(h: &HookOutcome) -> Value {
    json!({
        "name": h.name,
        "on": h.on,
        "passed": h.passed,
        "attempts": h.attempts,
        "status": (h.status > 0).then_some(h.status),
        "error": (!h.error.is_empty()).then(|| h.error.clone()),
        "body": h.body,
        "duration_ms": h.duration_ms,
    })
}

/// `12ms`, `1.5s`, `2m 3s`: a hook's time with the precision that matters.
fn took(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => short_duration(ms as i64),
    }
}

/// The hook runs of a rollout's history, oldest first, as a table (empty without any).
fn render_hooks(r: &Rollout) -> String {
    let runs: Vec<(&RolloutEvent, &HookOutcome)> = r
        .events
        .iter()
        .filter_map(|e| e.hook.as_ref().map(|h| (e, h)))
        .collect();
    if runs.is_empty() {
        return String::new();
    }
    let mut table = Table::new(&[
        "TIME (UTC)",
        "HOOK",
        "ON",
        "STAGE",
        "RESULT",
        "ANSWER",
        "ATTEMPTS",
        "TOOK",
        "BODY",
    ])
    .right(&[6]);
    for (e, h) in runs {
        table.row(vec![
            clock_utc(e.at_ms),
            h.name.clone(),
            h.on.clone(),
            format!("{}/{}", e.stage_index + 1, r.stage_count),
            if h.passed { "passed" } else { "FAILED" }.into(),
            if h.status > 0 {
                format!("HTTP {}", h.status)
            } else if h.error.is_empty() {
                "-".into()
            } else {
                one_line(&h.error, 60)
            },
            h.attempts.to_string(),
            took(h.duration_ms),
            if h.body.is_empty() {
                "-".into()
            } else {
                one_line(&h.body, 80)
            },
        ]);
    }
    format!("\nhooks\n{}", table.render("  "))
}

/// A rollout as a JSON object (`--json`). `stage_index` is 0-based as on the wire; `detail` is
/// the coordinator's full record when it sent one (kept as a string if it is not valid JSON).
pub fn rollout_json(r: &Rollout) -> Value {
    let events: Vec<Value> = r
        .events
        .iter()
        .map(|e| {
            let mut event = json!({
                "at_ms": e.at_ms,
                "kind": e.kind,
                "actor": e.actor,
                "reason": e.reason,
                "stage_index": e.stage_index,
                "canary_weight": e.canary_weight,
            });
            if let Some(h) = &e.hook {
                event["hook"] = hook_json(h);
            }
            event
        })
        .collect();
    let live = match &r.live {
        Some(l) => json!({
            "stable": stats_json(&l.stable),
            "canary": stats_json(&l.canary),
            "checks": l.checks.iter().map(|c| json!({
                "name": c.name,
                "verdict": c.verdict,
                "detail": c.detail,
            })).collect::<Vec<_>>(),
            "triggers": l.triggers.iter().map(|t| json!({
                "name": t.name,
                "severity": t.severity,
                "verdict": t.verdict,
                "detail": t.detail,
                "value": t.value,
                "threshold": t.threshold,
                "unit": t.unit,
                "window_ms": t.window_ms,
                "grace_ms": (t.severity == "warning").then_some(t.grace_ms),
                "failing_since_ms": (t.failing_since_ms > 0).then_some(t.failing_since_ms),
            })).collect::<Vec<_>>(),
        }),
        None => Value::Null,
    };
    let apply = match &r.apply {
        Some(a) => json!({
            "generation": a.generation.map(|g| json!({"term": g.term, "index": g.index})),
            "agents": a.agents,
            "applied": a.applied,
            "lagging": a.lagging.iter().map(|l| json!({
                "agent": l.agent,
                "connected": l.connected,
                "error": (!l.error.is_empty()).then(|| l.error.clone()),
                "since_ms": (l.since_ms > 0).then_some(l.since_ms),
            })).collect::<Vec<_>>(),
        }),
        None => Value::Null,
    };
    let mut value = json!({
        "id": r.id,
        "service": r.service,
        "version": r.version,
        "stable_version": r.stable_version,
        "state": r.state,
        "terminal": is_terminal(&r.state),
        "stage_index": r.stage_index,
        "stage_count": r.stage_count,
        "canary_weight": r.canary_weight,
        "last_reason": r.last_reason,
        "started_at_ms": r.started_at_ms,
        "stage_started_at_ms": r.stage_started_at_ms,
        "events": events,
        "live": live,
        "apply": apply,
        "deploy": r.deploy.as_ref().map(|d| {
            let mut deploy = json!({
                "model": d.model,
                "waiting": d.waiting,
                "failures": d.failures,
                "settled": d.settled,
            });
            if d.shard_count > 0 {
                deploy["shard_count"] = json!(d.shard_count);
                deploy["canary_shards"] = json!(d.canary_shards);
                deploy["moving_shards"] = json!(d.moving_shards);
            }
            deploy
        }),
    });
    if !r.detail_json.is_empty() {
        let detail = serde_json::from_str::<Value>(&r.detail_json)
            .unwrap_or_else(|_| Value::String(r.detail_json.clone()));
        value["detail"] = detail;
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use serin_proto::v1::{CheckOutcome, LiveAnalysis, RolloutEvent};

    /// 2026-05-01 12:00:00 UTC.
    const T0: i64 = 1_777_636_800_000;

    fn sample() -> Rollout {
        Rollout {
            id: "checkout-3f9a1c".into(),
            service: "checkout".into(),
            version: "1.5.0".into(),
            stable_version: "1.4.2".into(),
            state: "progressing".into(),
            stage_index: 1,
            stage_count: 4,
            canary_weight: 5,
            last_reason: "stage 1 passed: all 2 checks pass".into(),
            started_at_ms: T0,
            stage_started_at_ms: T0 + 60_000,
            events: vec![
                RolloutEvent {
                    at_ms: T0,
                    kind: "started".into(),
                    actor: "operator:alice".into(),
                    reason: "release 1.5.0".into(),
                    stage_index: 0,
                    canary_weight: 1,
                    hook: None,
                },
                RolloutEvent {
                    at_ms: T0 + 60_000,
                    kind: "stage_advanced".into(),
                    actor: "controller".into(),
                    reason: "stage 1 passed: all 2 checks pass".into(),
                    stage_index: 1,
                    canary_weight: 5,
                    hook: None,
                },
            ],
            live: Some(LiveAnalysis {
                stable: Some(VariantStats {
                    requests: 1200,
                    errors: 1,
                    error_rate: 1.0 / 1200.0,
                    p95_ms: 11.2,
                    requests_per_second: 20.0,
                    last_scrape_error: String::new(),
                }),
                canary: Some(VariantStats {
                    requests: 60,
                    errors: 0,
                    error_rate: 0.0,
                    p95_ms: 12.4,
                    requests_per_second: 1.0,
                    last_scrape_error: "api-canary: timed out".into(),
                }),
                checks: vec![
                    CheckOutcome {
                        name: "errors-vs-stable".into(),
                        verdict: "pass".into(),
                        detail: "canary 0.00% <= 0.58%".into(),
                    },
                    CheckOutcome {
                        name: "latency_p95".into(),
                        verdict: "no_data".into(),
                        detail: "canary has 60 of 100 requests".into(),
                    },
                ],
                triggers: vec![],
            }),
            detail_json: String::new(),
            apply: None,
            deploy: None,
        }
    }

    #[test]
    fn status_shows_the_managed_instances_that_do_not_run_their_assignment_yet() {
        let mut r = sample();
        r.deploy = Some(DeployView {
            model: "hosts".into(),
            waiting: vec!["worker-h2 on h2: v2 wanted, starting v2 for 3s".into()],
            failures: vec!["worker-h1 on h1: v2 wanted, failed v2 for 0s: not healthy".into()],
            ..Default::default()
        });
        let text = render_status(&r, T0 + 10_000);
        assert!(text.contains("deploy   hosts model, 1 failed"), "{text}");
        assert!(
            text.contains("  failed   worker-h1 on h1: v2 wanted, failed v2 for 0s: not healthy\n  waiting  worker-h2 on h2"),
            "{text}"
        );
        let json = rollout_json(&r);
        assert_eq!(
            json["deploy"]["waiting"][0],
            "worker-h2 on h2: v2 wanted, starting v2 for 3s"
        );
        r.deploy = Some(DeployView {
            model: "weighted".into(),
            settled: true,
            ..Default::default()
        });
        assert!(render_status(&r, T0).contains(
            "deploy   weighted model, every managed instance runs its assignment; settled"
        ));
    }

    #[test]
    fn status_shows_the_canary_shards_and_which_side_serves_a_guild() {
        let mut r = sample();
        r.deploy = Some(DeployView {
            model: "shards".into(),
            shard_count: 16,
            canary_shards: vec![1, 5, 9],
            moving_shards: vec![13],
            ..Default::default()
        });
        let text = render_status(&r, T0);
        assert!(
            text.contains("shards   3 of 16 on the canary: 1, 5, 9; 1 moving: 13"),
            "{text}"
        );
        let json = rollout_json(&r);
        assert_eq!(json["deploy"]["canary_shards"], json!([1, 5, 9]));
        assert_eq!(json["deploy"]["moving_shards"], json!([13]));
        let d = r.deploy.clone().unwrap();
        // (guild >> 22) % 16: shard 5 is canary, 13 moving, 2 stable.
        assert_eq!(
            guild_line(&d, 5 << 22).unwrap(),
            format!("guild {}: shard 5 of 16, canary", 5u64 << 22)
        );
        assert!(
            guild_line(&d, (16 + 13) << 22)
                .unwrap()
                .contains("shard 13 of 16, moving")
        );
        assert!(
            guild_line(&d, (2 << 22) + 12345)
                .unwrap()
                .ends_with("shard 2 of 16, stable")
        );
        let hosts = DeployView {
            model: "hosts".into(),
            ..Default::default()
        };
        assert_eq!(
            guild_line(&hosts, 1).unwrap_err(),
            "--guild 1: this rollout does not use the shards model (its model is hosts)"
        );
        assert!(!render_status(&sample(), T0).contains("shards "));
    }

    #[test]
    fn status_shows_agents_that_have_not_applied_and_triggers_with_grace_left() {
        let mut r = sample();
        r.state = "rolled_back".into();
        r.apply = Some(ApplyProgress {
            generation: Some(serin_proto::v1::Generation { term: 1, index: 9 }),
            agents: 3,
            applied: 1,
            lagging: vec![
                serin_proto::v1::AgentLag {
                    agent: "lb-2".into(),
                    connected: true,
                    error: "api: nginx master is not running".into(),
                    since_ms: T0 + 170_000,
                },
                serin_proto::v1::AgentLag {
                    agent: "lb-3".into(),
                    connected: false,
                    error: String::new(),
                    since_ms: T0 + 120_000,
                },
            ],
        });
        let text = render_status(&r, T0 + 184_000);
        assert!(
            text.contains("agents   1/3 applied generation 1.9  ⚠ NOT APPLIED EVERYWHERE"),
            "{text}"
        );
        let lb2 = text.lines().find(|l| l.contains("lb-2")).unwrap();
        assert!(
            lb2.contains("yes") && lb2.contains("14s ago") && lb2.contains("nginx master"),
            "{lb2}"
        );
        let lb3 = text.lines().find(|l| l.contains("lb-3")).unwrap();
        assert!(
            lb3.contains("1m 4s ago") && lb3.contains("disconnected"),
            "{lb3}"
        );
        let json = rollout_json(&r);
        assert_eq!(json["apply"]["applied"], 1);
        assert_eq!(json["apply"]["lagging"][1]["error"], Value::Null);

        let mut r = sample();
        r.live.as_mut().unwrap().triggers = vec![
            TriggerOutcome {
                name: "error-burst".into(),
                severity: "critical".into(),
                verdict: "pass".into(),
                detail: String::new(),
                value: Some(0.0),
                threshold: Some(0.2),
                unit: String::new(),
                window_ms: 30_000,
                grace_ms: 0,
                failing_since_ms: 0,
            },
            TriggerOutcome {
                name: "slow".into(),
                severity: "warning".into(),
                verdict: "fail".into(),
                detail: String::new(),
                value: Some(612.5),
                threshold: Some(500.0),
                unit: "ms".into(),
                window_ms: 60_000,
                grace_ms: 120_000,
                failing_since_ms: T0 + 154_000,
            },
        ];
        let text = render_status(&r, T0 + 184_000);
        let burst = text.lines().find(|l| l.contains("error-burst")).unwrap();
        assert!(
            burst.contains("0 <= 0.2") && burst.contains("30s"),
            "{burst}"
        );
        let slow = text.lines().find(|l| l.contains("slow")).unwrap();
        assert!(
            slow.contains("612.5ms > 500ms") && slow.contains("failing 30s, 1m 30s left of 2m"),
            "{slow}"
        );
        assert!(!text.contains("⚠"), "{text}");
        let json = rollout_json(&r);
        assert_eq!(
            json["live"]["triggers"][1]["failing_since_ms"],
            T0 + 154_000
        );
        assert_eq!(json["live"]["triggers"][0]["grace_ms"], Value::Null);
    }

    #[test]
    fn status_shows_hook_runs_in_a_table_and_in_json() {
        let mut r = sample();
        r.state = "paused".into();
        r.last_reason = "holding stage 2 (5%): pre_advance hook 'smoke' failed: HTTP 500".into();
        r.events.push(RolloutEvent {
            at_ms: T0 + 120_000,
            kind: "hook".into(),
            actor: "hook:smoke".into(),
            reason: "pre_advance hook 'smoke' failed: HTTP 500 in 1.5s (3 attempts)".into(),
            stage_index: 1,
            canary_weight: 5,
            hook: Some(HookOutcome {
                name: "smoke".into(),
                on: "pre_advance".into(),
                attempts: 3,
                status: 500,
                error: String::new(),
                body: "smoke failed: orders table missing".into(),
                duration_ms: 1_520,
                passed: false,
            }),
        });
        r.events.push(RolloutEvent {
            at_ms: T0 + 121_000,
            kind: "hook".into(),
            actor: "hook:tell-chat".into(),
            reason: "post_promote hook 'tell-chat' failed".into(),
            stage_index: 1,
            canary_weight: 5,
            hook: Some(HookOutcome {
                name: "tell-chat".into(),
                on: "post_promote".into(),
                attempts: 1,
                status: 0,
                error: "no answer within the timeout of 5s".into(),
                body: String::new(),
                duration_ms: 5_004,
                passed: false,
            }),
        });
        let text = render_status(&r, T0 + 184_000);
        let section = text
            .split("\nhooks\n")
            .nth(1)
            .and_then(|rest| rest.split("\nevents\n").next())
            .unwrap_or_else(|| panic!("no hooks section before the events:\n{text}"));
        let lines: Vec<&str> = section.lines().collect();
        assert_eq!(lines.len(), 3, "{section}");
        assert!(
            lines[0].contains("HOOK") && lines[0].contains("ATTEMPTS"),
            "{section}"
        );
        for needle in [
            "smoke",
            "pre_advance",
            "2/4",
            "FAILED",
            "HTTP 500",
            "1.5s",
            "orders table missing",
        ] {
            assert!(lines[1].contains(needle), "{needle}: {}", lines[1]);
        }
        assert!(
            lines[2].contains("no answer within the timeout of 5s"),
            "{}",
            lines[2]
        );
        assert!(
            text.contains("hook:smoke"),
            "the event names the hook as actor:\n{text}"
        );

        let json = rollout_json(&r);
        let hook = &json["events"][2]["hook"];
        assert_eq!(hook["name"], "smoke");
        assert_eq!(hook["passed"], false);
        assert_eq!(hook["status"], 500);
        assert_eq!(hook["error"], Value::Null);
        assert_eq!(hook["attempts"], 3);
        assert_eq!(json["events"][3]["hook"]["status"], Value::Null);
        assert!(
            json["events"][0].get("hook").is_none(),
            "only hook events carry one"
        );
        // Without hook runs there is no hooks section.
        assert!(!render_status(&sample(), T0).contains("\nhooks\n"));
    }

    #[test]
    fn status_shows_header_live_analysis_and_events() {
        let text = render_status(&sample(), T0 + 184_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "rollout  checkout-3f9a1c");
        assert_eq!(lines[1], "service  checkout");
        assert_eq!(lines[2], "version  1.4.2 → 1.5.0 (stable → canary)");
        assert_eq!(lines[3], "state    progressing");
        assert_eq!(lines[4], "stage    2/4 at 5% (for 2m 4s)");
        assert_eq!(lines[5], "started  3m 4s ago (2026-05-01 12:00:00 UTC)");
        assert_eq!(lines[6], "reason   stage 1 passed: all 2 checks pass");
        assert!(
            text.contains(
                "  VARIANT  REQUESTS  ERRORS  ERROR RATE  P95 MS   RPS\n  \
             stable       1200       1       0.08%    11.2  20.0\n  \
             canary         60       0       0.00%    12.4   1.0\n  \
             canary metrics unreadable: api-canary: timed out\n"
            ),
            "{text}"
        );
        assert!(!text.contains("stable metrics unreadable"), "{text}");
        assert!(
            text.contains("  errors-vs-stable  pass     canary 0.00% <= 0.58%\n"),
            "{text}"
        );
        assert!(
            text.contains("  latency_p95       no_data  canary has 60 of 100 requests\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "  12:00:00    started         1/4        1%  operator:alice  release 1.5.0\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "  12:01:00    stage_advanced  2/4        5%  controller      stage 1 passed: all 2 checks pass\n"
        ), "{text}");
    }

    #[test]
    fn status_shows_the_override_names_while_active_and_marks_them_off_when_finished() {
        let mut r = sample();
        r.detail_json = r#"{"strategy":{"traffic":{"override_header":"X-Serin-Variant"}}}"#.into();
        let text = render_status(&r, T0 + 184_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[4], "stage     2/4 at 5% (for 2m 4s)", "{text}");
        assert_eq!(
            lines[5], "override  header X-Serin-Variant: canary|stable",
            "{text}"
        );

        r.detail_json = r#"{"strategy":{"traffic":{"override_header":"X-Serin-Variant",
            "override_cookie":"serin_variant"}}}"#
            .into();
        r.state = "rolled_back".into();
        let text = render_status(&r, T0 + 184_000);
        assert!(
            text.contains(
                "override  header X-Serin-Variant: canary|stable, cookie \
                 serin_variant=canary|stable (off: the rollout finished)\n"
            ),
            "{text}"
        );

        for detail in [
            "",
            "not json",
            r#"{"strategy":{"traffic":{"sticky_key":null}}}"#,
        ] {
            r.detail_json = detail.into();
            let text = render_status(&r, T0 + 184_000);
            assert!(!text.contains("override"), "{detail}: {text}");
        }
    }

    #[test]
    fn finished_status_has_no_live_block_and_unknown_p95_is_a_dash() {
        let mut r = sample();
        r.state = "rolled_back".into();
        r.canary_weight = 0;
        r.live = None;
        let text = render_status(&r, T0 + 10_000);
        assert!(text.contains("state    rolled_back\n"), "{text}");
        assert!(text.contains("stage    2/4 at 0%\n"), "{text}");
        assert!(!text.contains("live analysis"), "{text}");

        let mut r = sample();
        r.live.as_mut().unwrap().canary.as_mut().unwrap().p95_ms = -1.0;
        r.events.clear();
        let text = render_status(&r, T0);
        assert!(
            text.contains("  canary         60       0       0.00%       -   1.0\n"),
            "{text}"
        );
        assert!(text.ends_with("events\n  none\n"), "{text}");
    }

    #[test]
    fn json_has_the_documented_keys() {
        let mut r = sample();
        r.detail_json = r#"{"strategy":{"stages":[]}}"#.into();
        let v = rollout_json(&r);
        for key in [
            "id",
            "service",
            "version",
            "stable_version",
            "state",
            "stage_index",
            "stage_count",
            "canary_weight",
            "last_reason",
            "started_at_ms",
            "events",
            "live",
            "detail",
        ] {
            assert!(v.get(key).is_some(), "missing {key}: {v}");
        }
        assert_eq!(v["id"], "checkout-3f9a1c");
        assert_eq!(v["stage_index"], 1);
        assert_eq!(v["canary_weight"], 5);
        assert_eq!(v["terminal"], false);
        assert_eq!(
            v["events"][1],
            json!({
                "at_ms": T0 + 60_000,
                "kind": "stage_advanced",
                "actor": "controller",
                "reason": "stage 1 passed: all 2 checks pass",
                "stage_index": 1,
                "canary_weight": 5,
            })
        );
        assert_eq!(v["live"]["canary"]["requests"], 60);
        assert_eq!(v["live"]["stable"]["p95_ms"], 11.2);
        assert_eq!(v["live"]["checks"][1]["verdict"], "no_data");
        assert_eq!(v["detail"], json!({"strategy": {"stages": []}}));
    }

    #[test]
    fn json_without_detail_or_live() {
        let mut r = sample();
        r.live = None;
        let v = rollout_json(&r);
        assert!(v.get("detail").is_none(), "{v}");
        assert_eq!(v["live"], Value::Null);
        r.detail_json = "not json".into();
        assert_eq!(rollout_json(&r)["detail"], "not json");
    }

    #[test]
    fn compact_lines_for_watching_without_a_terminal() {
        let r = sample();
        assert_eq!(
            compact_line(&r, T0 + 3_723_000),
            "13:02:03 stage 2/4 5% progressing canary err 0.00% p95 12ms | stable err 0.08% p95 11ms"
        );
        let mut done = r.clone();
        done.state = "promoted".into();
        done.stage_index = 3;
        done.canary_weight = 100;
        assert_eq!(compact_line(&done, T0), "12:00:00 stage 4/4 100% promoted");
        done.last_reason = "all stages passed".into();
        assert_eq!(
            finished_line(&done),
            "rollout checkout-3f9a1c finished: promoted (all stages passed)"
        );
    }

    fn summary() -> RolloutSummary {
        let r = sample();
        RolloutSummary {
            id: r.id,
            service: r.service,
            version: r.version,
            stable_version: r.stable_version,
            state: r.state,
            stage_index: r.stage_index,
            stage_count: r.stage_count,
            canary_weight: r.canary_weight,
            last_reason: r.last_reason,
            started_at_ms: r.started_at_ms,
            stage_started_at_ms: r.stage_started_at_ms,
            updated_at_ms: r.stage_started_at_ms,
            finished_at_ms: 0,
            not_applied: 0,
        }
    }

    #[test]
    fn list_flags_a_rollout_some_agents_have_not_applied() {
        let mut r = summary();
        r.state = "rolled_back".into();
        r.not_applied = 2;
        let text = render_list(&[r.clone(), summary()]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].contains("rolled_back ⚠ 2 agent(s) not applied"),
            "{text}"
        );
        assert!(!lines[2].contains('⚠'), "{text}");
        assert_eq!(summary_json(&r)["not_applied"], 2);
    }

    #[test]
    fn list_is_a_table_with_truncated_reasons() {
        let mut long = summary();
        long.id = "api-1".into();
        long.service = "api".into();
        long.state = "paused".into();
        long.last_reason = "x".repeat(100);
        let text = render_list(&[summary(), long]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with(
                "ID               SERVICE   VERSION  STATE        STAGE  WEIGHT  LAST REASON"
            ),
            "{text}"
        );
        assert!(
            lines[1].starts_with(
                "checkout-3f9a1c  checkout  1.5.0    progressing  2/4        5%  stage 1 passed"
            ),
            "{text}"
        );
        assert!(
            lines[2].ends_with(&format!("{}…", "x".repeat(59))),
            "{text}"
        );
        assert_eq!(render_list(&[]), "no rollouts\n");
    }

    #[test]
    fn multi_line_reasons_are_folded_in_list_and_status_tables_but_kept_in_json() {
        let nginx = "agent 'web-1' could not apply: nginx -t failed:\n\
                     nginx: [emerg] unexpected \"}\" in /etc/nginx/serin.conf:9\n\
                     nginx: configuration file /etc/nginx/nginx.conf test failed\n";
        let mut s = summary();
        s.last_reason = nginx.into();
        let list = render_list(&[s.clone()]);
        assert_eq!(list.lines().count(), 2, "{list}");
        assert!(
            list.contains("agent 'web-1' could not apply: nginx -t failed: ⏎ nginx: [e…\n"),
            "{list}"
        );
        assert_eq!(summary_json(&s)["last_reason"], nginx);

        let mut r = sample();
        r.last_reason = nginx.into();
        r.events[1].reason = nginx.into();
        r.live.as_mut().unwrap().checks[0].detail = "a\nb".into();
        let text = render_status(&r, T0 + 1000);
        assert!(
            text.contains("reason   agent 'web-1' could not apply: nginx -t failed: ⏎ nginx:"),
            "{text}"
        );
        assert!(text.contains("pass     a ⏎ b\n"), "{text}");
        assert!(!text.contains("failed:\n"), "{text}");
        // Every line that starts an event row is one event.
        assert_eq!(
            text.lines()
                .filter(|l| l.contains("operator:alice") || l.contains("controller"))
                .count(),
            2,
            "{text}"
        );
        assert_eq!(rollout_json(&r)["events"][1]["reason"], nginx);
    }

    #[test]
    fn only_a_lost_answer_makes_the_outcome_unknown() {
        // The client's own timeout, or a connection that broke after sending: unknown.
        let timeout = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert!(outcome_unknown(&timeout), "{timeout:?}");
        let reset = tonic::Status::from_error(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(outcome_unknown(&reset), "{reset:?}");
        // Never connected: nothing was sent.
        let refused = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        ))));
        assert!(!outcome_unknown(&refused), "{refused:?}");
        // Whatever the coordinator answered, even "unavailable" or a deadline, is an answer.
        for answered in [
            tonic::Status::unavailable("this coordinator is not the leader; retry"),
            tonic::Status::deadline_exceeded("late"),
            tonic::Status::failed_precondition("it is promoted"),
        ] {
            assert!(!outcome_unknown(&answered), "{answered:?}");
        }
        assert_eq!(
            unknown_outcome_message(
                "pause",
                "connection error: connection reset",
                "check with `serin rollout status api-1`"
            ),
            "the pause was sent to the coordinator but no answer came back (connection error: \
             connection reset); its outcome is unknown: it may or may not have been applied; \
             check with `serin rollout status api-1`"
        );
    }

    #[test]
    fn the_next_page_hint_is_a_command_to_run() {
        assert_eq!(next_page_hint(50, ""), None);
        assert_eq!(
            next_page_hint(5, "1777636800000:api-1").as_deref(),
            Some("more rollouts: serin rollout list --limit 5 --page-token '1777636800000:api-1'")
        );
    }

    #[test]
    fn summaries_in_json_have_the_documented_keys() {
        let v = summary_json(&summary());
        assert_eq!(v["id"], "checkout-3f9a1c");
        assert_eq!(v["stage_index"], 1);
        assert_eq!(v["terminal"], false);
        assert_eq!(v["finished_at_ms"], Value::Null);
        assert_eq!(v["updated_at_ms"], T0 + 60_000);
        assert!(v.get("events").is_none(), "{v}");
    }

    #[test]
    fn grpc_errors_become_operator_messages() {
        let coordinator = CoordinatorArgs {
            coordinator: vec!["c1:7000".into()],
        };
        let msg =
            |s: tonic::Status, id: Option<&str>| describe_status(&s, &coordinator, id).to_string();
        assert_eq!(
            msg(tonic::Status::not_found("no such rollout"), Some("x")),
            "rollout 'x' not found"
        );
        assert_eq!(
            msg(
                tonic::Status::invalid_argument("stages[0].weight: bad\nchecks[0].metric: bad"),
                None
            ),
            "stages[0].weight: bad\nchecks[0].metric: bad"
        );
        assert_eq!(
            msg(tonic::Status::unavailable("no leader"), Some("x")),
            "coordinator unavailable at http://c1:7000: no leader"
        );
        assert_eq!(
            msg(
                tonic::Status::failed_precondition("cannot pause rollout 'x': it is promoted"),
                Some("x")
            ),
            "cannot pause rollout 'x': it is promoted"
        );
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: RolloutCommand,
    }

    #[test]
    fn the_command_line_parses() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "rollout",
            "start",
            "checkout",
            "--version",
            "1.5.0",
            "--strategy",
            "s.toml",
            "--coordinator",
            "a:7000,b:7000",
        ])
        .unwrap();
        match cli.cmd {
            RolloutCommand::Start {
                service,
                version,
                stable_version,
                coordinator,
                ..
            } => {
                assert_eq!(service, "checkout");
                assert_eq!(version, "1.5.0");
                assert_eq!(stable_version, None);
                assert_eq!(coordinator.coordinator, ["a:7000", "b:7000"]);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["rollout", "status", "--watch"]).unwrap();
        assert!(matches!(
            cli.cmd,
            RolloutCommand::Status {
                id: None,
                watch: true,
                json: false,
                ..
            }
        ));
        let cli =
            Cli::try_parse_from(["rollout", "abort", "api-1", "--reason", "bad build"]).unwrap();
        match cli.cmd {
            RolloutCommand::Abort(a) => {
                assert_eq!(a.id, "api-1");
                assert_eq!(a.reason.as_deref(), Some("bad build"));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["rollout", "pause"]).is_err());
    }

    /// An in-process ControlService that keeps rollouts in memory.
    #[derive(Default)]
    struct FakeCoordinator {
        /// Answers changes with `Unavailable`, as a follower does.
        follower: bool,
        rollouts: std::sync::Mutex<Vec<Rollout>>,
        starts: std::sync::Mutex<Vec<StartRolloutRequest>>,
    }

    type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

    #[tonic::async_trait]
    impl serin_proto::v1::control_service_server::ControlService for FakeCoordinator {
        async fn start_rollout(
            &self,
            request: tonic::Request<StartRolloutRequest>,
        ) -> Reply<RolloutReply> {
            if self.follower {
                return Err(tonic::Status::unavailable(
                    "this coordinator is not the leader; retry",
                ));
            }
            let request = request.into_inner();
            let rollout = Rollout {
                id: format!("{}-1", request.service),
                service: request.service.clone(),
                version: request.version.clone(),
                stable_version: request.stable_version.clone(),
                state: "progressing".into(),
                stage_count: 2,
                canary_weight: 1,
                started_at_ms: T0,
                ..Rollout::default()
            };
            self.starts.lock().unwrap().push(request);
            self.rollouts.lock().unwrap().push(rollout.clone());
            Ok(tonic::Response::new(RolloutReply {
                rollout: Some(rollout),
            }))
        }

        async fn get_rollout(
            &self,
            request: tonic::Request<GetRolloutRequest>,
        ) -> Reply<RolloutReply> {
            let id = request.into_inner().id;
            let rollouts = self.rollouts.lock().unwrap();
            match rollouts.iter().find(|r| r.id == id) {
                Some(r) => Ok(tonic::Response::new(RolloutReply {
                    rollout: Some(r.clone()),
                })),
                None => Err(tonic::Status::not_found(format!(
                    "rollout '{id}' not found"
                ))),
            }
        }

        async fn list_rollouts(
            &self,
            request: tonic::Request<ListRolloutsRequest>,
        ) -> Reply<serin_proto::v1::ListRolloutsReply> {
            // Newest first; no paging beyond the limit (the coordinator's paging has its own
            // tests).
            let request = request.into_inner();
            let mut rollouts = self.rollouts.lock().unwrap().clone();
            rollouts.sort_by_key(|r| std::cmp::Reverse(r.started_at_ms));
            let rollouts = rollouts
                .into_iter()
                .filter(|r| !request.running_only || !is_terminal(&r.state))
                .take(request.limit.max(1) as usize)
                .map(|r| RolloutSummary {
                    id: r.id,
                    state: r.state,
                    started_at_ms: r.started_at_ms,
                    ..RolloutSummary::default()
                })
                .collect();
            Ok(tonic::Response::new(serin_proto::v1::ListRolloutsReply {
                rollouts,
                next_page_token: String::new(),
            }))
        }

        async fn steer_rollout(
            &self,
            request: tonic::Request<SteerRolloutRequest>,
        ) -> Reply<RolloutReply> {
            if self.follower {
                return Err(tonic::Status::unavailable(
                    "this coordinator is not the leader; retry",
                ));
            }
            let request = request.into_inner();
            let mut rollouts = self.rollouts.lock().unwrap();
            let Some(r) = rollouts.iter_mut().find(|r| r.id == request.id) else {
                return Err(tonic::Status::not_found("no such rollout"));
            };
            if is_terminal(&r.state) {
                return Err(tonic::Status::failed_precondition(format!(
                    "cannot change rollout '{}': it is {}",
                    r.id, r.state
                )));
            }
            r.state = match request.action() {
                SteerAction::Abort => "aborted",
                SteerAction::Promote => "promoted",
                SteerAction::Pause => "paused",
                _ => "progressing",
            }
            .into();
            r.last_reason = request.reason;
            Ok(tonic::Response::new(RolloutReply {
                rollout: Some(r.clone()),
            }))
        }

        async fn list_agents(
            &self,
            _: tonic::Request<serin_proto::v1::ListAgentsRequest>,
        ) -> Reply<serin_proto::v1::ListAgentsReply> {
            Ok(tonic::Response::new(
                serin_proto::v1::ListAgentsReply::default(),
            ))
        }

        async fn forget_agent(
            &self,
            _: tonic::Request<serin_proto::v1::ForgetAgentRequest>,
        ) -> Reply<serin_proto::v1::ForgetAgentReply> {
            Err(tonic::Status::unimplemented("not in the fake"))
        }

        async fn list_services(
            &self,
            _: tonic::Request<serin_proto::v1::ListServicesRequest>,
        ) -> Reply<serin_proto::v1::ListServicesReply> {
            Err(tonic::Status::unimplemented("not in the fake"))
        }

        async fn undo_service(
            &self,
            _: tonic::Request<serin_proto::v1::UndoServiceRequest>,
        ) -> Reply<serin_proto::v1::UndoServiceReply> {
            Err(tonic::Status::unimplemented("not in the fake"))
        }

        async fn list_revisions(
            &self,
            _: tonic::Request<serin_proto::v1::ListRevisionsRequest>,
        ) -> Reply<serin_proto::v1::ListRevisionsReply> {
            Err(tonic::Status::unimplemented("not in the fake"))
        }

        async fn cluster_status(
            &self,
            _: tonic::Request<serin_proto::v1::ClusterStatusRequest>,
        ) -> Reply<serin_proto::v1::ClusterStatusReply> {
            Err(tonic::Status::unimplemented("not in the fake"))
        }

        async fn change_membership(
            &self,
            _: tonic::Request<serin_proto::v1::ChangeMembershipRequest>,
        ) -> Reply<serin_proto::v1::ClusterStatusReply> {
            Err(tonic::Status::unimplemented("not in the fake"))
        }
    }

    /// Serves `fake` on a free port until the returned sender is dropped or fired.
    async fn serve(
        fake: std::sync::Arc<FakeCoordinator>,
    ) -> (
        CoordinatorArgs,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let incoming =
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(
                    serin_proto::v1::control_service_server::ControlServiceServer::from_arc(fake),
                )
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        let args = CoordinatorArgs {
            coordinator: vec![addr.to_string()],
        };
        (args, stop, server)
    }

    #[tokio::test]
    async fn commands_against_an_in_process_coordinator() {
        let fake = std::sync::Arc::new(FakeCoordinator::default());
        let (coordinator, stop, server) = serve(fake.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        let bad = dir.path().join("bad.toml");
        let strategy = "[[stages]]\nweight = 1\n[[stages]]\nweight = 100\n";
        std::fs::write(&good, strategy).unwrap();
        std::fs::write(&bad, "[[stages]]\nweight = 120\n").unwrap();
        let start = |file: &std::path::Path| RolloutCommand::Start {
            service: "api".into(),
            version: "2.0".into(),
            strategy: file.to_path_buf(),
            stable_version: Some("1.0".into()),
            json: false,
            coordinator: coordinator.clone(),
        };

        // An invalid strategy never reaches the coordinator.
        assert_eq!(run_rollout(start(&bad)).await.unwrap(), ExitCode::from(2));
        assert!(fake.starts.lock().unwrap().is_empty());

        assert_eq!(run_rollout(start(&good)).await.unwrap(), ExitCode::SUCCESS);
        {
            let starts = fake.starts.lock().unwrap();
            assert_eq!(starts.len(), 1);
            assert_eq!(starts[0].strategy_toml, strategy);
            assert_eq!(starts[0].stable_version, "1.0");
            assert!(!starts[0].actor.is_empty());
        }

        let mut client = connect(&coordinator).await.unwrap();
        assert_eq!(
            default_id(&mut client, &coordinator).await.unwrap(),
            "api-1"
        );
        let status = get(&mut client, "nope").await.unwrap_err();
        assert_eq!(
            describe_status(&status, &coordinator, Some("nope")).to_string(),
            "rollout 'nope' not found"
        );

        let steer = |id: &str| SteerArgs {
            id: id.into(),
            reason: Some("bad build".into()),
            json: false,
            coordinator: coordinator.clone(),
        };
        let err = run_rollout(RolloutCommand::Pause(steer("nope")))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "rollout 'nope' not found");
        assert_eq!(
            run_rollout(RolloutCommand::Abort(steer("api-1")))
                .await
                .unwrap(),
            ExitCode::SUCCESS
        );
        let r = get(&mut client, "api-1").await.unwrap();
        assert_eq!(
            (r.state.as_str(), r.last_reason.as_str()),
            ("aborted", "bad build")
        );
        let err = run_rollout(RolloutCommand::Resume(steer("api-1")))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot change rollout 'api-1': it is aborted"
        );

        // Watching a finished rollout returns at once, with success whatever the outcome.
        let watched = tokio::time::timeout(
            Duration::from_secs(5),
            run_rollout(RolloutCommand::Status {
                id: None,
                watch: true,
                json: true,
                guilds: Vec::new(),
                coordinator: coordinator.clone(),
            }),
        )
        .await
        .expect("watch ends when the rollout has finished");
        assert_eq!(watched.unwrap(), ExitCode::SUCCESS);

        stop.send(()).unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn changes_go_past_a_follower_to_the_leader() {
        let follower = std::sync::Arc::new(FakeCoordinator {
            follower: true,
            ..FakeCoordinator::default()
        });
        let leader = std::sync::Arc::new(FakeCoordinator::default());
        leader.rollouts.lock().unwrap().push(sample());
        let (to_follower, stop_follower, follower_task) = serve(follower).await;
        let (to_leader, stop_leader, leader_task) = serve(leader.clone()).await;
        let both = CoordinatorArgs {
            coordinator: [to_follower.coordinator.clone(), to_leader.coordinator].concat(),
        };
        let pause = |coordinator: CoordinatorArgs| {
            RolloutCommand::Pause(SteerArgs {
                id: "checkout-3f9a1c".into(),
                reason: None,
                json: false,
                coordinator,
            })
        };

        assert_eq!(run_rollout(pause(both)).await.unwrap(), ExitCode::SUCCESS);
        assert_eq!(leader.rollouts.lock().unwrap()[0].state, "paused");

        let err = run_rollout(pause(to_follower.clone()))
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "coordinator unavailable at http://{}: this coordinator is not the leader; retry",
                to_follower.coordinator[0]
            )
        );

        stop_follower.send(()).unwrap();
        stop_leader.send(()).unwrap();
        follower_task.await.unwrap();
        leader_task.await.unwrap();
    }
}
