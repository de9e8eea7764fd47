//! Which process is creating a VM, recorded in the domain while create_vm
//! runs, so that a later call can tell a create_vm still at work from one
//! that was killed (kill -9, a director restart, a libvirtd that died under
//! it) and whose VM the director never learned of.
//!
//! All CPI processes of one director run on one machine: the kernel's boot id
//! names that machine's current boot, and a pid with its start time (in clock
//! ticks since boot, `/proc/<pid>/stat` field 22) names one process, even
//! after the pid is reused. A creator recorded on another machine (a
//! director recreated since, or a second director on the same host) can only
//! be judged by its age: one older than `ELSEWHERE_MAX_AGE_SECS` is dead.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// No create_vm takes this long; the same limit the sweeps of killed
/// creates use.
pub const ELSEWHERE_MAX_AGE_SECS: u64 = 30 * 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creator {
    pub boot_id: String,
    pub pid: u32,
    pub start: u64,
    /// When the record was made, seconds since the epoch (this machine's clock).
    pub since: u64,
}

/// What can be known about a recorded creator from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    /// Recorded on another machine (or an earlier boot of this one), too
    /// recently to call it dead.
    Elsewhere,
}

impl Creator {
    /// This process, or None where /proc does not tell (not Linux).
    pub fn this_process() -> Option<Creator> {
        let pid = std::process::id();
        Some(Creator {
            boot_id: boot_id()?,
            pid,
            start: start_time(pid)?,
            since: now(),
        })
    }

    pub fn liveness(&self) -> Liveness {
        if boot_id().as_deref() != Some(self.boot_id.as_str()) {
            return if now().saturating_sub(self.since) > ELSEWHERE_MAX_AGE_SECS {
                Liveness::Dead
            } else {
                Liveness::Elsewhere
            };
        }
        match start_time(self.pid) {
            Some(start) if start == self.start => Liveness::Alive,
            _ => Liveness::Dead,
        }
    }

    /// The creator a lock volume holds (its text, maybe padded with zeros,
    /// spaces or a newline); `None` when it holds none (a write killed
    /// before it began leaves zeros).
    pub fn from_lock(bytes: &[u8]) -> Option<Creator> {
        Creator::parse(String::from_utf8_lossy(bytes).trim_matches(['\0', ' ', '\n']))
    }

    /// Reads `boot_id:pid:start:since` as `Display` writes it.
    pub fn parse(s: &str) -> Option<Creator> {
        let mut parts = s.trim().split(':');
        let boot_id = parts.next()?.to_string();
        let pid = parts.next()?.parse().ok()?;
        let start = parts.next()?.parse().ok()?;
        let since = parts.next()?.parse().ok()?;
        if boot_id.is_empty() || parts.next().is_some() {
            return None;
        }
        Some(Creator {
            boot_id,
            pid,
            start,
            since,
        })
    }
}

impl fmt::Display for Creator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.boot_id, self.pid, self.start, self.since
        )
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty() && !id.contains(':')).then(|| id.to_string())
}

/// Field 22 of `/proc/<pid>/stat`, counted after the command name (which
/// may itself hold spaces and parentheses, so it is cut at the last `)`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields from 3 (state) on; starttime is field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_holds_its_creator_padded_or_none() {
        let me = Creator::this_process().expect("Linux /proc");
        let mut padded = format!("{me}\n  ").into_bytes();
        padded.extend([0u8; 8]);
        assert_eq!(Creator::from_lock(&padded), Some(me));
        assert_eq!(Creator::from_lock(&[0u8; 64]), None);
        assert_eq!(Creator::from_lock(b""), None);
    }

    #[test]
    fn this_process_is_alive_and_a_dead_one_is_dead() {
        let me = Creator::this_process().expect("Linux /proc");
        assert_eq!(me.liveness(), Liveness::Alive);
        assert_eq!(Creator::parse(&me.to_string()), Some(me.clone()));
        // A pid that has just exited: this test executable run again, only
        // to list its tests (no program from outside the build).
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .arg("--list")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = Creator {
            pid,
            start: 0,
            ..me.clone()
        };
        assert_eq!(dead.liveness(), Liveness::Dead);
        let reused = Creator {
            start: me.start + 1,
            ..me.clone()
        };
        assert_eq!(reused.liveness(), Liveness::Dead, "a reused pid");
        let other = Creator {
            boot_id: "another-boot".into(),
            ..me.clone()
        };
        assert_eq!(other.liveness(), Liveness::Elsewhere);
        let old = Creator {
            since: me.since - ELSEWHERE_MAX_AGE_SECS - 1,
            ..other
        };
        assert_eq!(old.liveness(), Liveness::Dead);
    }

    #[test]
    fn stat_lines_with_odd_command_names() {
        let line =
            "4242 (a) b (c) R 1 4242 4242 0 -1 4194304 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        assert_eq!(parse_start_time(line), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(Creator::parse("b:1:2"), None);
        assert_eq!(Creator::parse("b:x:1:2"), None);
        assert_eq!(Creator::parse(":1:2:3"), None);
        assert_eq!(Creator::parse("b:1:2:3:4"), None);
    }
}
