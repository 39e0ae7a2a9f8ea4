//! Host CPU and memory.
//!
//! [`HostCollector`] refreshes only the global CPU usage and RAM figures (`/proc/stat` and
//! `/proc/meminfo` on Linux): no process table, disks or network, so it is cheap enough to run
//! every second inside the agent's memory budget.

use sysinfo::{MemoryRefreshKind, System};

/// The platform's system information could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot read host metrics: {0}")]
pub struct HostError(#[from] sysinfo::Error);

/// One reading of the host's CPU and memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostSample {
    /// CPU busy share of the whole host since the previous [`HostCollector::sample`] (or since
    /// [`HostCollector::new`]), averaged over all cores: 0 to 100.
    pub cpu_percent: f64,
    /// RAM in use (total minus available on Linux), in bytes.
    pub memory_used_bytes: u64,
    /// RAM installed, in bytes.
    pub memory_total_bytes: u64,
}

/// Reads host CPU and memory; keep one and call [`sample`](Self::sample) periodically, since
/// CPU usage is the difference between two readings.
pub struct HostCollector {
    sys: System,
}

impl HostCollector {
    /// Creates a collector and takes the CPU baseline, so the first
    /// [`sample`](Self::sample) already reports usage since now.
    ///
    /// Fails only on platforms sysinfo cannot read.
    pub fn new() -> Result<Self, HostError> {
        let mut sys = System::new()?;
        sys.refresh_cpu_usage();
        Ok(Self { sys })
    }

    /// Refreshes CPU usage and RAM only, and returns them.
    ///
    /// CPU usage is meaningful when calls are at least
    /// [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`] apart (200 ms or less); the agent samples every
    /// second.
    pub fn sample(&mut self) -> HostSample {
        self.sys.refresh_cpu_usage();
        self.sys
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        HostSample {
            cpu_percent: f64::from(self.sys.global_cpu_usage()),
            memory_used_bytes: self.sys.used_memory(),
            memory_total_bytes: self.sys.total_memory(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_reports_plausible_cpu_and_memory() {
        let mut collector = HostCollector::new().expect("sysinfo supports this platform");
        std::thread::sleep(
            sysinfo::MINIMUM_CPU_UPDATE_INTERVAL.max(std::time::Duration::from_millis(50)),
        );
        // Burn a little CPU so there is something to measure.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        for _ in 0..2 {
            let s = collector.sample();
            assert!(s.memory_total_bytes > 0, "{s:?}");
            assert!(s.memory_used_bytes > 0, "{s:?}");
            assert!(s.memory_used_bytes <= s.memory_total_bytes, "{s:?}");
            assert!(s.cpu_percent.is_finite(), "{s:?}");
            assert!((0.0..=100.0).contains(&s.cpu_percent), "{s:?}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}
