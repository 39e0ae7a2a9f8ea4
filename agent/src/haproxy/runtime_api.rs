//! HAProxy's runtime API over a unix socket: the client ([`RuntimeApi`]) and the parsing of
//! its answers (pure).
//!
//! Non-interactive mode: one command per connection, the answer runs until HAProxy closes
//! the socket. A `set server` that succeeds answers an empty line (an address change
//! answers "IP changed from …" or "no need to change …"); anything else is its error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Upper bound on one runtime API command (connect, send, read the whole answer).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// `srv_admin_state` bits that keep a server from taking traffic: forced, inherited,
/// resolution and hostname maintenance, forced and inherited drain. `CMAINT` (0x04, "disabled"
/// in the config) is left out: HAProxy keeps it set after `set server … state ready`.
const NOT_READY_ADMIN_BITS: u32 = 0x01 | 0x02 | 0x08 | 0x10 | 0x20 | 0x40;

/// One server slot as `show servers state` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSlot {
    pub name: String,
    /// The server's IP address, as HAProxy prints it.
    pub addr: String,
    pub port: u16,
    /// The current (user) weight.
    pub weight: u32,
    /// Takes traffic: running and in no maintenance or drain state.
    pub ready: bool,
}

/// Why the runtime API could not be used or refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeApiError {
    #[error("HAProxy runtime API at '{}': {reason}", socket.display())]
    Unreachable { socket: PathBuf, reason: String },
    #[error("HAProxy refused `{command}`: {answer}")]
    Refused { command: String, answer: String },
    #[error("HAProxy has no backend '{backend}' (the running config is not serin's rendering)")]
    NoBackend { backend: String },
    #[error("cannot read HAProxy's answer to `{command}`: {reason}: {answer:?}")]
    Malformed {
        command: String,
        reason: String,
        answer: String,
    },
}

/// A client of one admin socket (`stats socket <path> level admin`).
#[derive(Debug, Clone)]
pub struct RuntimeApi {
    socket: PathBuf,
}

impl RuntimeApi {
    pub fn new(socket: &Path) -> Self {
        RuntimeApi {
            socket: socket.to_owned(),
        }
    }

    /// Sends one command and returns HAProxy's whole answer.
    pub async fn command(&self, command: &str) -> Result<String, RuntimeApiError> {
        let unreachable = |reason: String| RuntimeApiError::Unreachable {
            socket: self.socket.clone(),
            reason,
        };
        let exchange = async {
            let mut stream = UnixStream::connect(&self.socket).await?;
            stream.write_all(command.as_bytes()).await?;
            stream.write_all(b"\n").await?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => Ok(String::from_utf8_lossy(&answer).into_owned()),
            Ok(Err(e)) => Err(unreachable(format!("`{command}`: {e}"))),
            Err(_) => Err(unreachable(format!(
                "`{command}`: no answer within {COMMAND_TIMEOUT:?}"
            ))),
        }
    }

    /// Sends a `set server …` command; `Err` unless HAProxy answered success.
    pub async fn set(&self, command: &str) -> Result<(), RuntimeApiError> {
        let answer = self.command(command).await?;
        check_set_answer(command, &answer)
    }

    /// The slots of `backend`, in HAProxy's order.
    pub async fn servers_state(&self, backend: &str) -> Result<Vec<LiveSlot>, RuntimeApiError> {
        let command = format!("show servers state {backend}");
        let answer = self.command(&command).await?;
        parse_servers_state(&command, backend, &answer)
    }

    /// The worker's `Pid` and `Uptime_sec` from `show info`: a change of pid the agent did
    /// not cause is a restart.
    pub async fn process(&self) -> Result<ProcessInfo, RuntimeApiError> {
        let answer = self.command("show info").await?;
        parse_info("show info", &answer)
    }
}

/// What `show info` says about the process answering the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub uptime_sec: u64,
}

/// Success of a `set server` command, from its answer.
pub fn check_set_answer(command: &str, answer: &str) -> Result<(), RuntimeApiError> {
    let text = answer.trim();
    let ok = text.is_empty()
        || (command.contains(" addr ")
            && (text.starts_with("IP changed from") || text.starts_with("no need to change")));
    if ok {
        Ok(())
    } else {
        Err(RuntimeApiError::Refused {
            command: command.to_owned(),
            answer: text.to_owned(),
        })
    }
}

/// Parses `show servers state <backend>` (format version 1: a version line, a `#` header
/// naming the columns, one line per server). Columns are found by their header names.
pub fn parse_servers_state(
    command: &str,
    backend: &str,
    answer: &str,
) -> Result<Vec<LiveSlot>, RuntimeApiError> {
    let malformed = |reason: &str| RuntimeApiError::Malformed {
        command: command.to_owned(),
        reason: reason.to_owned(),
        answer: answer.chars().take(300).collect(),
    };
    let trimmed = answer.trim();
    if trimmed.starts_with("Can't find backend") {
        return Err(RuntimeApiError::NoBackend {
            backend: backend.to_owned(),
        });
    }
    let mut lines = trimmed.lines();
    if lines.next().map(str::trim) != Some("1") {
        return Err(malformed("expected format version 1 on the first line"));
    }
    let header: Vec<&str> = lines
        .next()
        .and_then(|h| h.strip_prefix('#'))
        .ok_or_else(|| malformed("expected a '#' header line"))?
        .split_whitespace()
        .collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| malformed(&format!("no column '{name}'")))
    };
    let (be_name, srv_name, srv_addr, op_state, admin_state, uweight, srv_port) = (
        column("be_name")?,
        column("srv_name")?,
        column("srv_addr")?,
        column("srv_op_state")?,
        column("srv_admin_state")?,
        column("srv_uweight")?,
        column("srv_port")?,
    );
    let mut slots = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .copied()
                .ok_or_else(|| malformed("a server line has too few fields"))
        };
        let number = |i: usize| -> Result<u32, RuntimeApiError> {
            field(i)?
                .parse()
                .map_err(|_| malformed("a numeric field is not a number"))
        };
        if field(be_name)? != backend {
            continue;
        }
        let port = field(srv_port)?
            .parse()
            .map_err(|_| malformed("srv_port is not a port"))?;
        slots.push(LiveSlot {
            name: field(srv_name)?.to_owned(),
            addr: field(srv_addr)?.to_owned(),
            port,
            weight: number(uweight)?,
            ready: number(op_state)? == 2 && number(admin_state)? & NOT_READY_ADMIN_BITS == 0,
        });
    }
    Ok(slots)
}

/// Parses the `Pid` and `Uptime_sec` lines of `show info`.
pub fn parse_info(command: &str, answer: &str) -> Result<ProcessInfo, RuntimeApiError> {
    let value = |key: &str| {
        answer
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (value("Pid"), value("Uptime_sec")) {
        (Some(pid), Some(uptime_sec)) if pid <= u64::from(u32::MAX) => Ok(ProcessInfo {
            pid: pid as u32,
            uptime_sec,
        }),
        _ => Err(RuntimeApiError::Malformed {
            command: command.to_owned(),
            reason: "no numeric Pid and Uptime_sec lines".into(),
            answer: answer.chars().take(300).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As HAProxy 2.6.12 printed it: slot0 running, slot1 `disabled` in the config, slot2
    /// made ready at run time (CMAINT stays set), slot3 forced to maintenance.
    const STATE: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n\
3 serin_web 1 slot0 127.0.0.1 2 0 3 3 0 1 0 2 0 0 0 0 - 18081 - 0 0 - - 0\n\
3 serin_web 2 slot1 127.0.0.1 0 5 0 0 0 1 0 0 8 0 0 0 - 1 - 0 0 - - 0\n\
3 serin_web 3 slot2 127.0.0.2 2 4 256 0 0 1 0 0 8 0 0 0 - 18082 - 0 0 - - 0\n\
3 serin_web 4 slot3 10.0.0.9 0 1 7 0 0 1 0 0 8 0 0 0 - 8080 - 0 0 - - 0\n\n";

    #[test]
    fn servers_state_is_parsed_by_column_name_with_readiness_from_both_states() {
        let slots =
            parse_servers_state("show servers state serin_web", "serin_web", STATE).unwrap();
        let slot = |name: &str, addr: &str, port, weight, ready| LiveSlot {
            name: name.into(),
            addr: addr.into(),
            port,
            weight,
            ready,
        };
        assert_eq!(
            slots,
            [
                slot("slot0", "127.0.0.1", 18081, 3, true),
                slot("slot1", "127.0.0.1", 1, 0, false),
                slot("slot2", "127.0.0.2", 18082, 256, true),
                slot("slot3", "10.0.0.9", 8080, 7, false),
            ]
        );
    }

    #[test]
    fn a_missing_backend_and_garbage_are_errors_naming_what_is_wrong() {
        let err = parse_servers_state("c", "serin_api", "Can't find backend.\n\n").unwrap_err();
        assert_eq!(
            err,
            RuntimeApiError::NoBackend {
                backend: "serin_api".into()
            }
        );
        let err = parse_servers_state("c", "b", "Unknown command.\n").unwrap_err();
        assert!(err.to_string().contains("format version 1"), "{err}");
        let err = parse_servers_state("c", "b", "1\n# be_name srv_name\n").unwrap_err();
        assert!(err.to_string().contains("no column 'srv_addr'"), "{err}");
        let bad_port = STATE.replace(" 18081 ", " eighty ");
        let err = parse_servers_state("c", "serin_web", &bad_port).unwrap_err();
        assert!(err.to_string().contains("srv_port"), "{err}");
    }

    #[test]
    fn set_answers_are_success_only_when_empty_or_an_address_change() {
        assert_eq!(check_set_answer("set server b/s weight 3", "\n"), Ok(()));
        assert_eq!(check_set_answer("set server b/s state ready", ""), Ok(()));
        assert_eq!(
            check_set_answer(
                "set server b/s addr 127.0.0.2 port 8",
                "IP changed from '127.0.0.1' to '127.0.0.2', port changed from '1' to '8' by 'stats socket command'\n\n"
            ),
            Ok(())
        );
        assert_eq!(
            check_set_answer(
                "set server b/s addr 127.0.0.1 port 1",
                "no need to change the addr, no need to change the port by 'stats socket command'\n"
            ),
            Ok(())
        );
        let err = check_set_answer(
            "set server b/s weight 257",
            "Absolute weight can only be between 0 and 256 inclusive.\n\n",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "HAProxy refused `set server b/s weight 257`: Absolute weight can only be between 0 \
             and 256 inclusive."
        );
        // A success text of `addr` does not make another command succeed.
        assert!(check_set_answer("set server b/s weight 1", "IP changed from x").is_err());
    }

    #[test]
    fn show_info_gives_pid_and_uptime() {
        let info =
            "Name: HAProxy\nVersion: 2.6.12\nPid: 15339\nUptime: 0d 0h00m03s\nUptime_sec: 3\n";
        assert_eq!(
            parse_info("show info", info),
            Ok(ProcessInfo {
                pid: 15339,
                uptime_sec: 3
            })
        );
        assert!(parse_info("show info", "Name: HAProxy\n").is_err());
    }
}
