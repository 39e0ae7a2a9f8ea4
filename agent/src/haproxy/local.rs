//! [`LocalHaproxy`]: a private master-worker HAProxy in its own directory, for tests and
//! benchmarks against real HAProxy.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::settings::{default_confirm_timeout, default_resync_interval};
use super::{HaproxyError, HaproxyService, HaproxySettings, RuntimeApi, render_config};

/// How long `start` waits for the admin socket to answer.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Finds an haproxy binary: `haproxy` on `PATH`, then `/usr/sbin/haproxy` (Debian's).
pub fn find_haproxy() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| is_executable(candidate));
    on_path.or_else(|| {
        let debian = Path::new("/usr/sbin/haproxy");
        is_executable(debian).then(|| debian.to_owned())
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A private HAProxy: `haproxy -W -S dir/master.sock -f dir/haproxy.cfg -db` (master-worker,
/// foreground), admin socket `dir/admin.sock`. The master is a child process; stopping or
/// dropping it kills the master, and its worker exits with it.
#[derive(Debug)]
pub struct LocalHaproxy {
    dir: PathBuf,
    binary: PathBuf,
    child: Option<Child>,
}

impl LocalHaproxy {
    /// Starts HAProxy in `dir` (created if needed) from `dir/haproxy.cfg`, which is written
    /// with no services when it does not exist yet (an existing one is kept: a restart).
    /// Returns once the admin socket answers.
    pub async fn start(dir: &Path, binary: &Path) -> Result<LocalHaproxy, HaproxyError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| HaproxyError::io("create directory", dir, e))?;
        let dir = tokio::fs::canonicalize(dir)
            .await
            .map_err(|e| HaproxyError::io("resolve", dir, e))?;
        let config = dir.join("haproxy.cfg");
        if tokio::fs::metadata(&config).await.is_err() {
            let text = render_config(&dir.join("admin.sock"), &[])?;
            tokio::fs::write(&config, text)
                .await
                .map_err(|e| HaproxyError::io("write", &config, e))?;
        }
        for socket in ["admin.sock", "master.sock"] {
            let _ = tokio::fs::remove_file(dir.join(socket)).await;
        }
        let log_path = dir.join("haproxy.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| HaproxyError::io("open", &log_path, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| HaproxyError::io("open", &log_path, e))?;
        let child = Command::new(binary)
            .arg("-W")
            .arg("-S")
            .arg(dir.join("master.sock"))
            .arg("-f")
            .arg(&config)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    HaproxyError::BinaryNotFound {
                        binary: binary.to_owned(),
                    }
                } else {
                    HaproxyError::Spawn {
                        command: format!("{} -W -S … -f {}", binary.display(), config.display()),
                        source,
                    }
                }
            })?;
        let mut local = LocalHaproxy {
            dir: dir.clone(),
            binary: binary.to_owned(),
            child: Some(child),
        };
        let api = RuntimeApi::new(&dir.join("admin.sock"));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if api.process().await.is_ok() {
                return Ok(local);
            }
            if let Some(Ok(Some(status))) = local.child.as_mut().map(Child::try_wait) {
                local.child = None;
                return Err(HaproxyError::LocalStart {
                    dir,
                    reason: format!("haproxy exited ({status}): {}", local.log_tail()),
                });
            }
            if Instant::now() >= deadline {
                return Err(HaproxyError::LocalStart {
                    dir,
                    reason: format!(
                        "the admin socket did not answer within {START_TIMEOUT:?}: {}",
                        local.log_tail()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Actuator settings pointing at this instance, with `slots` slots per step.
    pub fn settings(&self, services: Vec<HaproxyService>) -> HaproxySettings {
        HaproxySettings {
            binary: self.binary.clone(),
            config: self.config_path(),
            socket: self.dir.join("admin.sock"),
            master_socket: self.dir.join("master.sock"),
            slots: 4,
            confirm_timeout: default_confirm_timeout(),
            resync_interval: default_resync_interval(),
            services,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("haproxy.cfg")
    }

    /// A client of this instance's admin socket.
    pub fn api(&self) -> RuntimeApi {
        RuntimeApi::new(&self.dir.join("admin.sock"))
    }

    /// The master's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Kills the master (SIGKILL; its worker exits with it) and waits for it.
    pub async fn stop(mut self) {
        self.kill().await;
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        // The worker notices its master is gone; wait until the admin socket is dead so a
        // restart in the same directory cannot race it.
        let api = self.api();
        let deadline = Instant::now() + START_TIMEOUT;
        while api.process().await.is_ok() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The last lines of HAProxy's output, for diagnostics.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for LocalHaproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
        }
    }
}
