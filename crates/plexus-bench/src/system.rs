//! What the bench asks of the operating system: its open-files limit, and a server's RSS.

use crate::BenchError;

/// The open-files limit of this process, soft and hard, after raising the soft limit to the hard
/// one (as the server does). `None` where it cannot be read.
pub fn raise_fd_limit() -> Option<FdLimit> {
    let (before, hard) = rlimit::Resource::NOFILE.get().ok()?;
    if before < hard {
        // Best effort: if it fails, the limit stays and EMFILE says so later.
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    let (soft, hard) = rlimit::Resource::NOFILE.get().ok()?;
    Some(FdLimit { before, soft, hard })
}

/// `RLIMIT_NOFILE`: the soft limit at start (`before`), and now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FdLimit {
    pub before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// The soft open-files limit now.
pub fn fd_soft_limit() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
}

/// The resident set size of process `pid`, in KiB, from `/proc/PID/status`.
pub fn rss_kib(pid: u32) -> Result<u64, BenchError> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|error| {
        BenchError::Usage(format!("--server-pid {pid}: cannot read {path}: {error}"))
    })?;
    parse_vm_rss(&status)
        .ok_or_else(|| BenchError::Usage(format!("--server-pid {pid}: no VmRSS line in {path}")))
}

/// The `VmRSS:` value (kB) of a `/proc/PID/status` text.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix("VmRSS:")?.trim();
        value
            .strip_suffix("kB")
            .unwrap_or(value)
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tplexus\nVmPeak:\t  200000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
    }

    #[test]
    fn reads_our_own_rss_and_limit() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        let limit = raise_fd_limit().unwrap();
        assert_eq!(limit.soft, limit.hard);
        assert_eq!(fd_soft_limit(), Some(limit.soft));
        match rss_kib(u32::MAX) {
            Err(BenchError::Usage(message)) => {
                assert!(message.contains("--server-pid"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
}
