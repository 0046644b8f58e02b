//! The process tree, from `/proc`: who belongs to a generation.

/// How far up the process tree a notification sender may be from the
/// generation it speaks for.
const MAX_TREE_DEPTH: usize = 64;

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`, from field 3 on.
fn stat_field(pid: i32, n: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold anything; split at the last ')'.
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().nth(n.checked_sub(3)?))
        .and_then(|p| p.parse().ok())
}

/// The parent of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    stat_field(pid, 4).and_then(|p| i32::try_from(p).ok())
}

/// When `pid` started (clock ticks since boot): with the pid, it names one
/// process, not whichever reuses the number later.
pub(super) fn start_time(pid: i32) -> Option<u64> {
    stat_field(pid, 22)
}

/// [`descendants`] of `root`, each with its [`start_time`].
pub(super) fn descendants_with_start(root: i32) -> Vec<(i32, u64)> {
    descendants(root)
        .into_iter()
        .filter_map(|p| start_time(p).map(|t| (p, t)))
        .collect()
}

/// Whether `pid` is `ancestor` or one of its descendants, by `/proc`.
pub(super) fn in_tree_of(pid: i32, ancestor: i32) -> bool {
    let mut pid = pid;
    for _ in 0..MAX_TREE_DEPTH {
        if pid == ancestor {
            return true;
        }
        if pid <= 1 {
            return false;
        }
        let Some(ppid) = parent_of(pid) else {
            return false;
        };
        pid = ppid;
    }
    false
}

/// Every process below `root` in the process tree (children, grandchildren,
/// ...), by the parent pids in `/proc`.
pub(super) fn descendants(root: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parents: Vec<(i32, i32)> = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = parent_of(pid) {
            parents.push((pid, ppid));
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, _) in parents.iter().filter(|(_, ppid)| *ppid == parent) {
            if !found.contains(pid) && *pid != root {
                found.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use std::time::{Duration, Instant};

    #[test]
    fn descendants_are_found() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .spawn()
            .unwrap();
        let root = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let found = descendants(root);
            if found.len() == 2 || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(found.len(), 2, "{found:?}");
        for pid in found {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn start_times() {
        let me = std::process::id() as i32;
        let mine = start_time(me).expect("own start time");
        assert_eq!(start_time(me), Some(mine));
        assert!(start_time(nix::unistd::getppid().as_raw()).is_some_and(|t| t <= mine));
        assert_eq!(parent_of(me), Some(nix::unistd::getppid().as_raw()));
        assert_eq!(start_time(i32::MAX), None);
    }

    #[test]
    fn process_tree() {
        let me = std::process::id() as i32;
        assert!(in_tree_of(me, me));
        let parent = nix::unistd::getppid().as_raw();
        assert!(in_tree_of(me, parent));
        assert!(!in_tree_of(parent, me));
        assert!(!in_tree_of(i32::MAX, me));
    }
}
