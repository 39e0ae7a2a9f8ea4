//! [`LocalNginx`]: a private nginx master running in the foreground in its own directory,
//! for `serin demo` and for tests against real nginx.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::{BalancedService, NginxError, NginxSettings, default_confirm_timeout};

/// How long `start` waits for the master to write its pid file.
const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits for a graceful quit (covers `worker_shutdown_timeout 5s`).
const QUIT_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a fast stop (`nginx -s stop`, SIGTERM) may take before the master is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// Finds an nginx binary: `nginx` on `PATH`, then `/usr/sbin/nginx` (Debian's location,
/// often missing from a non-root `PATH`).
pub fn find_nginx() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nginx"))
        .find(|candidate| is_executable(candidate));
    on_path.or_else(|| {
        let debian = Path::new("/usr/sbin/nginx");
        is_executable(debian).then(|| debian.to_owned())
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A private nginx: `dir/nginx.conf` includes `dir/site.conf`, pid and logs live in `dir`.
/// The master is a child process; [`LocalNginx::stop`] quits it gracefully and `Drop` stops
/// it fast (SIGTERM via `nginx -s stop`, then SIGKILL), so its workers do not outlive it.
#[derive(Debug)]
pub struct LocalNginx {
    dir: PathBuf,
    binary: PathBuf,
    config: PathBuf,
    site: PathBuf,
    pid_file: PathBuf,
    error_log: PathBuf,
    child: Option<Child>,
}

impl LocalNginx {
    /// Writes the configs into `dir` (created if needed) and starts
    /// `nginx -p dir -c dir/nginx.conf -g 'daemon off;'`, returning once the master has
    /// written its pid file.
    pub async fn start(dir: &Path, binary: &Path) -> Result<LocalNginx, NginxError> {
        let start_error = |reason: String| NginxError::LocalStart {
            dir: dir.to_owned(),
            reason,
        };
        tokio::fs::create_dir_all(dir.join("tmp"))
            .await
            .map_err(|e| NginxError::io("create directory", &dir.join("tmp"), e))?;
        let dir = tokio::fs::canonicalize(dir)
            .await
            .map_err(|e| NginxError::io("resolve", dir, e))?;
        let quoted = |p: &Path| -> Result<String, NginxError> {
            let s = p.to_str().filter(|s| {
                !s.chars()
                    .any(|c| c == '"' || c == '\\' || c == '$' || c.is_control())
            });
            match s {
                Some(s) => Ok(format!("\"{s}\"")),
                None => Err(start_error(format!(
                    "path '{}' cannot be quoted in nginx.conf",
                    p.display()
                ))),
            }
        };

        let config = dir.join("nginx.conf");
        let site = dir.join("site.conf");
        let pid_file = dir.join("nginx.pid");
        let error_log = dir.join("error.log");
        let tmp = dir.join("tmp");
        let text = format!(
            "# Private nginx started by serin (LocalNginx); serin renders {site_name}.\n\
             worker_processes 1;\n\
             worker_shutdown_timeout 5s;\n\
             pid {pid};\n\
             error_log {log} notice;\n\
             events {{}}\n\
             http {{\n    \
                 access_log off;\n    \
                 client_body_temp_path {body};\n    \
                 proxy_temp_path {proxy};\n    \
                 fastcgi_temp_path {fastcgi};\n    \
                 uwsgi_temp_path {uwsgi};\n    \
                 scgi_temp_path {scgi};\n    \
                 include {site};\n\
             }}\n",
            site_name = site.display(),
            pid = quoted(&pid_file)?,
            log = quoted(&error_log)?,
            body = quoted(&tmp.join("client_body"))?,
            proxy = quoted(&tmp.join("proxy"))?,
            fastcgi = quoted(&tmp.join("fastcgi"))?,
            uwsgi = quoted(&tmp.join("uwsgi"))?,
            scgi = quoted(&tmp.join("scgi"))?,
            site = quoted(&site)?,
        );
        tokio::fs::write(&config, text)
            .await
            .map_err(|e| NginxError::io("write", &config, e))?;
        tokio::fs::write(&site, "# serin: placeholder until the first apply\n")
            .await
            .map_err(|e| NginxError::io("write", &site, e))?;
        match tokio::fs::remove_file(&pid_file).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(NginxError::io("remove stale pid file", &pid_file, e)),
        }
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| NginxError::io("create", &stderr_path, e))?;

        let mut command = Command::new(binary);
        command
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&config)
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                NginxError::BinaryNotFound {
                    binary: binary.to_owned(),
                }
            } else {
                NginxError::Spawn {
                    command: format!(
                        "{} -p {} -c {} -g 'daemon off;'",
                        binary.display(),
                        dir.display(),
                        config.display()
                    ),
                    source,
                }
            }
        })?;
        let mut local = LocalNginx {
            dir: dir.clone(),
            binary: binary.to_owned(),
            config,
            site,
            pid_file,
            error_log,
            child: Some(child),
        };

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(pid) = tokio::fs::read_to_string(&local.pid_file).await
                && !pid.trim().is_empty()
            {
                return Ok(local);
            }
            let exited = match local.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(status) = exited {
                local.child = None;
                return Err(NginxError::LocalStart {
                    dir,
                    reason: format!("nginx exited ({status}): {}", local.logs()),
                });
            }
            if Instant::now() >= deadline {
                return Err(NginxError::LocalStart {
                    dir,
                    reason: format!(
                        "no pid file '{}' after {START_TIMEOUT:?}: {}",
                        local.pid_file.display(),
                        local.logs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Actuator settings pointing at this instance.
    pub fn settings(&self, services: Vec<BalancedService>) -> NginxSettings {
        NginxSettings {
            binary: self.binary.clone(),
            config: self.config.clone(),
            prefix: Some(self.dir.clone()),
            site: self.site.clone(),
            confirm_timeout: default_confirm_timeout(),
            services,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn site_path(&self) -> &Path {
        &self.site
    }

    pub fn error_log_path(&self) -> &Path {
        &self.error_log
    }

    /// Process id of the nginx master, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Graceful stop: `nginx -s quit` (SIGQUIT; workers finish in-flight requests), then
    /// `nginx -s stop`, then SIGKILL, each after a timeout. Waits for the master to exit.
    pub async fn stop(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        for (signal, timeout) in [("quit", QUIT_TIMEOUT), ("stop", STOP_TIMEOUT)] {
            let sent = Command::new(&self.binary)
                .arg("-p")
                .arg(&self.dir)
                .arg("-c")
                .arg(&self.config)
                .arg("-s")
                .arg(signal)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .map(|s| s.success())
                .unwrap_or(false);
            if sent && tokio::time::timeout(timeout, child.wait()).await.is_ok() {
                return;
            }
            tracing::warn!(dir = %self.dir.display(), signal, "local nginx did not exit in time");
        }
        let _ = child.kill().await;
    }

    /// Tail of stderr.log and error.log, for start failures.
    fn logs(&self) -> String {
        let tail = |p: &Path| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(10)..].join("\n")
        };
        let stderr = tail(&self.dir.join("stderr.log"));
        let log = tail(&self.error_log);
        format!("stderr: {stderr:?}; {}: {log:?}", self.error_log.display())
    }
}

impl Drop for LocalNginx {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGTERM through the pid file: the master takes its workers down with it, which a
        // SIGKILL of the master alone would not do.
        let _ = std::process::Command::new(&self.binary)
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(&self.config)
            .arg("-s")
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.start_kill();
    }
}
