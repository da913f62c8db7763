//! Finding the container Embassy itself runs in.
//!
//! Docker leaves the container id in places a process can read: its cgroup path
//! (`/docker/<id>` with cgroup v1 or a host cgroup namespace) and the sources of the files it
//! bind-mounts (`/var/lib/docker/containers/<id>/hostname`, visible in mountinfo even with
//! cgroup v2). The hostname (the short id unless `--hostname` was given) is the last resort,
//! checked with the engine like the others.

/// A 64-hex container id found in `/proc/self/cgroup` or `/proc/self/mountinfo` text.
pub fn id_in_proc_text(cgroup: &str, mountinfo: &str) -> Option<String> {
    let from_cgroup = cgroup.lines().find_map(|line| {
        ["/docker/", "docker-"]
            .iter()
            .find_map(|marker| id_after(line, marker))
    });
    from_cgroup.or_else(|| {
        mountinfo
            .lines()
            .find_map(|line| id_after(line, "/containers/"))
    })
}

fn id_after(text: &str, marker: &str) -> Option<String> {
    text.match_indices(marker).find_map(|(at, _)| {
        let rest = &text[at + marker.len()..];
        let candidate = rest.get(..64)?;
        let ends = !rest[64..].starts_with(|c: char| c.is_ascii_hexdigit());
        (ends && candidate.chars().all(|c| c.is_ascii_hexdigit())).then(|| candidate.to_string())
    })
}

/// Candidates for Embassy's own container, best first: ids read from `/proc`, then the
/// hostname.
pub fn own_container_candidates() -> Vec<String> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let mut candidates = Vec::new();
    if let Some(id) = id_in_proc_text(&read("/proc/self/cgroup"), &read("/proc/self/mountinfo")) {
        candidates.push(id);
    }
    let hostname = read("/proc/sys/kernel/hostname").trim().to_string();
    if !hostname.is_empty() {
        candidates.push(hostname);
    }
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c3a3b2e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b";

    #[test]
    fn finds_the_id_in_a_cgroup_v1_path() {
        let cgroup = format!("12:pids:/docker/{ID}\n0::/system.slice\n");
        assert_eq!(id_in_proc_text(&cgroup, ""), Some(ID.to_string()));
        let systemd = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(id_in_proc_text(&systemd, ""), Some(ID.to_string()));
    }

    #[test]
    fn finds_the_id_in_mountinfo_under_cgroup_v2() {
        let mountinfo = format!(
            "600 590 0:30 / / rw - overlay overlay rw\n\
             611 600 8:1 /var/lib/docker/containers/{ID}/hostname /etc/hostname rw - ext4 /dev/sda1 rw\n"
        );
        assert_eq!(id_in_proc_text("0::/\n", &mountinfo), Some(ID.to_string()));
    }

    #[test]
    fn ignores_what_is_not_a_full_id() {
        assert_eq!(id_in_proc_text("0::/docker/abc\n", ""), None);
        let longer = format!("0::/docker/{ID}ff\n");
        assert_eq!(id_in_proc_text(&longer, ""), None);
        assert_eq!(id_in_proc_text("0::/\n", "1 2 0:1 / / rw\n"), None);
    }
}
