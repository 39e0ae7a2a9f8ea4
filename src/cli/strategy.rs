//! `serin strategy check`: validates a strategy file locally, exactly as the coordinator will.
//!
//! The checking is pure ([`check_strategy_text`], [`check_outcome`]); [`run_strategy`] only reads
//! the file and prints. `serin rollout start` runs the same check before contacting anyone.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::json;
use serin_coordinator::strategy::{FieldError, Strategy};

use super::output::plural;

/// Exit code of an invalid or unreadable strategy file.
pub const EXIT_INVALID: u8 = 2;

/// Strategy file commands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum StrategyCommand {
    /// Validate a strategy file.
    ///
    /// Prints a one-line summary and exits 0 when the file is valid. Otherwise prints every
    /// problem, one per line as `FILE: field: reason`, on stderr and exits 2 (also when the file
    /// cannot be read).
    #[command(after_help = "Examples:\n  \
        serin strategy check canary.toml\n  \
        serin strategy check canary.toml --json | jq '.problems[].field'")]
    Check {
        /// The strategy TOML file.
        file: PathBuf,
        /// Print `{"valid": bool, "problems": [{"field", "reason"}]}` on stdout instead.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `serin strategy …` command and returns the process exit code.
pub fn run_strategy(cmd: StrategyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        StrategyCommand::Check { file, json } => {
            let outcome = match read_strategy(&file) {
                Ok(text) => check_outcome(&file.display().to_string(), &text, json),
                Err(unreadable) => unreadable,
            };
            Ok(outcome.print())
        }
    }
}

/// What a check prints and the exit code it ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    /// Lines for stdout.
    pub stdout: Vec<String>,
    /// Lines for stderr.
    pub stderr: Vec<String>,
    /// 0 when valid, [`EXIT_INVALID`] otherwise.
    pub code: u8,
}

impl CheckOutcome {
    /// True when the strategy is valid.
    pub fn is_valid(&self) -> bool {
        self.code == 0
    }

    /// Prints the lines and returns the exit code.
    pub fn print(&self) -> ExitCode {
        for line in &self.stdout {
            println!("{line}");
        }
        for line in &self.stderr {
            eprintln!("{line}");
        }
        ExitCode::from(self.code)
    }
}

/// Reads a strategy file; an unreadable file becomes an outcome naming the path (exit 2).
pub fn read_strategy(path: &Path) -> Result<String, CheckOutcome> {
    std::fs::read_to_string(path).map_err(|e| CheckOutcome {
        stdout: Vec::new(),
        stderr: vec![format!(
            "cannot read strategy file '{}': {e}",
            path.display()
        )],
        code: EXIT_INVALID,
    })
}

/// Checks a strategy's text: the summary line when valid, else one `NAME: field: reason` line
/// per problem. `name` is what the lines start with (usually the file path).
pub fn check_strategy_text(name: &str, text: &str) -> Result<String, Vec<String>> {
    match Strategy::from_toml(text) {
        Ok(strategy) => Ok(format!("{name}: valid ({})", summary(&strategy))),
        Err(e) => Err(e
            .problems()
            .iter()
            .map(|p| format!("{name}: {p}"))
            .collect()),
    }
}

/// The full outcome of checking `text`, human or `--json`.
pub fn check_outcome(name: &str, text: &str, json: bool) -> CheckOutcome {
    if json {
        let problems: Vec<FieldError> = match Strategy::from_toml(text) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems(),
        };
        let value = json!({
            "valid": problems.is_empty(),
            "problems": problems
                .iter()
                .map(|p| json!({"field": p.field, "reason": p.reason}))
                .collect::<Vec<_>>(),
        });
        return CheckOutcome {
            stdout: vec![value.to_string()],
            stderr: Vec::new(),
            code: if problems.is_empty() { 0 } else { EXIT_INVALID },
        };
    }
    match check_strategy_text(name, text) {
        Ok(line) => CheckOutcome {
            stdout: vec![line],
            stderr: Vec::new(),
            code: 0,
        },
        Err(lines) => CheckOutcome {
            stdout: Vec::new(),
            stderr: lines,
            code: EXIT_INVALID,
        },
    }
}

/// `4 stages: 1% → 5% → 50% → 100%, 2 checks, 1 trigger`, then the hooks if there are any
/// (`, 1 hook: smoke (pre_advance)`).
fn summary(s: &Strategy) -> String {
    let weights: Vec<String> = s
        .stages
        .iter()
        .map(|st| format!("{}%", st.weight))
        .collect();
    let mut text = format!(
        "{}: {}, {}, {}",
        plural(s.stages.len(), "stage"),
        weights.join(" → "),
        plural(s.checks.len(), "check"),
        plural(s.triggers.len(), "trigger"),
    );
    if !s.hooks.is_empty() {
        let hooks: Vec<String> = s
            .hooks
            .iter()
            .map(|h| format!("{} ({})", h.name, h.on))
            .collect();
        text.push_str(&format!(
            ", {}: {}",
            plural(s.hooks.len(), "hook"),
            hooks.join(", ")
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
[[stages]]
weight = 1
min_duration = "30s"

[[stages]]
weight = 5

[[stages]]
weight = 100

[[checks]]
metric = "error_rate"
max_ratio = 1.5
slack = 0.005

[[checks]]
metric = "latency_p95"
max = 200

[[triggers]]
metric = "error_rate"
name = "hard-down"
max = 0.2
"#;

    #[test]
    fn a_valid_strategy_is_summarized() {
        assert_eq!(
            check_strategy_text("canary.toml", VALID),
            Ok("canary.toml: valid (3 stages: 1% → 5% → 100%, 2 checks, 1 trigger)".to_owned())
        );
    }

    #[test]
    fn hooks_are_listed_in_the_summary() {
        let text = format!(
            "{VALID}\n[[hooks]]\non = \"pre_advance\"\nurl = \"http://smoke/\"\n\
             [[hooks]]\nname = \"chat\"\non = \"post_promote\"\nurl = \"http://chat/\"\n"
        );
        assert_eq!(
            check_strategy_text("canary.toml", &text),
            Ok("canary.toml: valid (3 stages: 1% → 5% → 100%, 2 checks, 1 trigger, 2 hooks: pre_advance (pre_advance), chat (post_promote))".to_owned())
        );
        let bad = format!("{VALID}\n[[hooks]]\non = \"pre_advance\"\nurl = \"https://smoke/\"\n");
        let problems = check_strategy_text("canary.toml", &bad).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("canary.toml: hooks[0].url: https hooks are not supported yet"),
            "{problems:?}"
        );
    }

    #[test]
    fn weight_120_is_reported_with_file_and_field() {
        assert_eq!(
            check_strategy_text("bad.toml", "[[stages]]\nweight = 120\n"),
            Err(vec![
                "bad.toml: stages[0].weight: must be in 1..=100 (percent of traffic), got 120"
                    .to_owned()
            ])
        );
    }

    #[test]
    fn every_problem_gets_its_own_line() {
        let lines = check_strategy_text(
            "s.toml",
            "[[stages]]\nweight = 120\nmin_duration = \"soon\"\n",
        )
        .unwrap_err();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("s.toml: stages[0].weight: "));
        assert!(lines[1].starts_with("s.toml: stages[0].min_duration: "));
    }

    #[test]
    fn json_outcome_lists_fields_and_reasons() {
        let out = check_outcome("bad.toml", "[[stages]]\nweight = 120\n", true);
        assert_eq!(out.code, EXIT_INVALID);
        assert!(out.stderr.is_empty());
        let v: serde_json::Value = serde_json::from_str(&out.stdout[0]).unwrap();
        assert_eq!(v["valid"], false);
        assert_eq!(v["problems"][0]["field"], "stages[0].weight");
        assert_eq!(
            v["problems"][0]["reason"],
            "must be in 1..=100 (percent of traffic), got 120"
        );

        let out = check_outcome("ok.toml", VALID, true);
        assert_eq!(out.code, 0);
        let v: serde_json::Value = serde_json::from_str(&out.stdout[0]).unwrap();
        assert_eq!(v, json!({"valid": true, "problems": []}));
    }

    #[test]
    fn files_on_disk_exit_0_when_valid_and_2_when_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        let bad = dir.path().join("bad.toml");
        std::fs::write(&good, VALID).unwrap();
        std::fs::write(&bad, "[[stages]]\nweight = 120\n").unwrap();

        let check = |path: &Path| {
            let text = read_strategy(path).unwrap();
            check_outcome(&path.display().to_string(), &text, false)
        };
        let out = check(&good);
        assert!(out.is_valid());
        assert_eq!(out.code, 0);
        assert!(
            out.stdout[0]
                .ends_with("good.toml: valid (3 stages: 1% → 5% → 100%, 2 checks, 1 trigger)")
        );

        let out = check(&bad);
        assert_eq!(out.code, EXIT_INVALID);
        assert!(out.stdout.is_empty());
        assert_eq!(out.stderr.len(), 1);
        assert!(out.stderr[0].contains("bad.toml: stages[0].weight: must be in 1..=100"));

        assert_eq!(
            run_strategy(StrategyCommand::Check {
                file: good,
                json: false
            })
            .unwrap(),
            ExitCode::SUCCESS
        );
        assert_eq!(
            run_strategy(StrategyCommand::Check {
                file: bad,
                json: false
            })
            .unwrap(),
            ExitCode::from(EXIT_INVALID)
        );
    }

    #[test]
    fn an_unreadable_file_is_named_and_exits_2() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let out = read_strategy(&missing).unwrap_err();
        assert_eq!(out.code, EXIT_INVALID);
        assert!(
            out.stderr[0].starts_with(&format!(
                "cannot read strategy file '{}': ",
                missing.display()
            )),
            "{:?}",
            out.stderr
        );
        assert_eq!(
            run_strategy(StrategyCommand::Check {
                file: missing,
                json: true
            })
            .unwrap(),
            ExitCode::from(EXIT_INVALID)
        );
    }
}
