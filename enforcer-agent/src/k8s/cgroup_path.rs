//! cgroup v2 path -> container id (and pod UID), for the path shapes the kubelet's two cgroup
//! drivers produce with containerd, CRI-O and cri-dockerd.
//!
//! The kubelet names the top of the pods' tree `kubepods` (a constant in the kubelet), below an
//! optional `--cgroup-root`; under it an optional QOS level (`besteffort`, `burstable`; guaranteed
//! pods have none), then one cgroup per pod, then one per container:
//!
//! | driver   | pod segment                                   | container segment                 |
//! |----------|-----------------------------------------------|-----------------------------------|
//! | cgroupfs | `pod<uid>`                                    | `<id>` (containerd, cri-dockerd), `crio-<id>` |
//! | systemd  | `kubepods[-<qos>]-pod<uid with _ for ->.slice` | `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` |
//!
//! CRI-O also runs its monitor (`conmon`) in `crio-conmon-<id>[.scope]` beside the container:
//! that is not the container, and nothing is returned for it.
//!
//! A container may make sub-cgroups of its own (systemd inside a pod, a nested runtime): a path
//! that continues below the container segment is still that container. The segment right below
//! the pod segment decides, so ids that a nested runtime writes deeper do not matter, and neither
//! does a container id above `kubepods` (a kind or minikube node is itself a container).
//!
//! The pod-level cgroup (`.../pod<uid>` with no container segment below it) gives `None`: the
//! kubelet never runs a process there (the sandbox's `pause` has its own container cgroup), so
//! there is no container whose metadata could apply.
//!
//! Outside a pod tree, a lone container segment (`/system.slice/docker-<id>.scope`, `/docker/<id>`)
//! gives the container with `pod_uid: None` (a container, but not of a Kubernetes pod).

/// The runtime whose naming the container's cgroup segment follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `cri-containerd-<id>.scope` (systemd driver).
    Containerd,
    /// `crio-<id>.scope` (systemd) or `crio-<id>` (cgroupfs).
    CriO,
    /// `docker-<id>.scope` (cri-dockerd or Docker, systemd driver).
    Docker,
    /// A bare `<id>` (cgroupfs driver): containerd or cri-dockerd, the path does not say which.
    Unnamed,
}

/// The container a cgroup belongs to, as its path tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    pub runtime: Runtime,
    /// 64 lowercase hex digits, as the CRI spells container ids.
    pub id: String,
    /// The pod's UID with dashes (as the API server spells it); `None` outside a kubelet's tree.
    pub pod_uid: Option<String>,
}

/// Parses a cgroup v2 path relative to the cgroup2 root (`/kubepods/...`, leading `/` optional).
pub fn parse(path: &str) -> Option<ContainerRef> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if let Some((i, uid)) = segs
        .iter()
        .enumerate()
        .find_map(|(i, s)| pod_segment(&segs[..i], s).map(|uid| (i, uid)))
    {
        // Below a pod, only the segment right under it can be the container.
        let (runtime, id) = container_segment(segs.get(i + 1)?)?;
        return Some(ContainerRef {
            runtime,
            id: id.to_owned(),
            pod_uid: Some(uid),
        });
    }
    // Not in a kubelet's tree: the outermost container segment is the container; a conmon
    // scope is not one.
    segs.iter().find_map(|s| {
        if is_conmon(s) {
            return Some(None);
        }
        container_segment(s).map(|(runtime, id)| {
            Some(ContainerRef {
                runtime,
                id: id.to_owned(),
                pod_uid: None,
            })
        })
    })?
}

/// The pod UID if `seg` is a kubelet pod cgroup under `parents`.
fn pod_segment(parents: &[&str], seg: &str) -> Option<String> {
    if let Some(stem) = seg.strip_suffix(".slice") {
        // systemd: `[<root>-]kubepods[-<qos>]-pod<uid_with_underscores>.slice`
        let (prefix, uid) = stem.rsplit_once("-pod")?;
        if !prefix.split('-').any(|c| c == "kubepods") {
            return None;
        }
        return pod_uid(&uid.replace('_', "-"));
    }
    // cgroupfs: `.../kubepods[/<qos>]/pod<uid>`
    let uid = seg.strip_prefix("pod")?;
    let under_kubepods = match parents {
        [.., "kubepods"] => true,
        [.., "kubepods", qos] => matches!(*qos, "besteffort" | "burstable"),
        _ => false,
    };
    if !under_kubepods {
        return None;
    }
    pod_uid(uid)
}

/// A pod UID: an RFC 4122 UUID (`8-4-4-4-12` hex), or the 32-hex hash the kubelet gives a
/// static pod.
fn pod_uid(s: &str) -> Option<String> {
    let hex_only = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    let groups: Vec<&str> = s.split('-').collect();
    let ok = match groups.as_slice() {
        [one] => one.len() == 32 && hex_only(one),
        [a, b, c, d, e] => {
            [a.len(), b.len(), c.len(), d.len(), e.len()] == [8, 4, 4, 4, 12]
                && groups.iter().all(|g| hex_only(g))
        }
        _ => false,
    };
    ok.then(|| s.to_ascii_lowercase())
}

fn is_conmon(seg: &str) -> bool {
    seg.strip_prefix("crio-conmon-")
        .map(|rest| rest.strip_suffix(".scope").unwrap_or(rest))
        .is_some_and(is_container_id)
}

/// The runtime and id of a container cgroup segment.
fn container_segment(seg: &str) -> Option<(Runtime, &str)> {
    let scoped = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
    ];
    if let Some(stem) = seg.strip_suffix(".scope") {
        return scoped.iter().find_map(|(prefix, rt)| {
            let id = stem.strip_prefix(prefix)?;
            is_container_id(id).then_some((*rt, id))
        });
    }
    if let Some(id) = seg.strip_prefix("crio-") {
        return is_container_id(id).then_some((Runtime::CriO, id));
    }
    is_container_id(seg).then_some((Runtime::Unnamed, seg))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(runtime: Runtime, id: &str, pod: Option<&str>) -> Option<ContainerRef> {
        Some(ContainerRef {
            runtime,
            id: id.into(),
            pod_uid: pod.map(Into::into),
        })
    }

    /// Real paths, copied from public reports (the source is named on each), and the paths this
    /// project's containerd node test produces.
    #[test]
    fn real_paths() {
        use Runtime::*;
        let cases: &[(&str, Option<ContainerRef>)] = &[
            // containerd, systemd driver, burstable and guaranteed (no QOS level):
            // `systemd-cgls` in github.com/netdata/netdata/issues/4868.
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podd84adcbc_b3e3_4f4f_9560_fa2e7c3d1a73.slice/cri-containerd-1ddb9e8fe53f6d5639d50a764206953da44f4c1765591d3be9a00c54614baff7.scope",
                some(
                    Containerd,
                    "1ddb9e8fe53f6d5639d50a764206953da44f4c1765591d3be9a00c54614baff7",
                    Some("d84adcbc-b3e3-4f4f-9560-fa2e7c3d1a73"),
                ),
            ),
            (
                "/kubepods.slice/kubepods-pod91f5b561_369f_4103_8015_66391059996a.slice/cri-containerd-24c53b774a586f06abc058619b47f71d9d869ac50c92898adbd199106fd0aaeb.scope",
                some(
                    Containerd,
                    "24c53b774a586f06abc058619b47f71d9d869ac50c92898adbd199106fd0aaeb",
                    Some("91f5b561-369f-4103-8015-66391059996a"),
                ),
            ),
            // Same report: a static pod, whose UID is the kubelet's 32-hex config hash.
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8daa50c3a64c9ff60bb9eab7b44b56fd.slice/cri-containerd-2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5.scope",
                some(
                    Containerd,
                    "2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5",
                    Some("8daa50c3a64c9ff60bb9eab7b44b56fd"),
                ),
            ),
            // containerd or dockershim/cri-dockerd, cgroupfs driver: the fixture of
            // github.com/Qard/container-info (test/fixtures/result.js), a GKE node.
            (
                "/kubepods/besteffort/pod74c13223-5a00-11e9-b385-42010a80018d/34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376",
                some(
                    Unnamed,
                    "34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376",
                    Some("74c13223-5a00-11e9-b385-42010a80018d"),
                ),
            ),
            // CRI-O, systemd driver, on a minikube node that is itself a Docker container (the
            // node's container id sits above kubepods): github.com/kubernetes/minikube/issues/11280.
            (
                "/docker/d6701ec289c56e4391acb11d07474b3139466857a305490575508a8b7a9fcf22/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/crio-358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c.scope",
                some(
                    CriO,
                    "358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c",
                    Some("2ca4a155-3599-498d-bb9d-4446693fa3ea"),
                ),
            ),
            // CRI-O's conmon, systemd driver: github.com/opencontainers/runc/issues/4620.
            (
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod207aaad1_659f_4db8_88e0_46e0cdcc3004.slice/crio-conmon-32da98c8522068be05a7510a3eddb09cad6ed2f03286180d0e931d0d0b6224a6.scope",
                None,
            ),
            // CRI-O, cgroupfs driver, the container and its conmon:
            // github.com/cri-o/cri-o/pull/5511.
            (
                "/kubepods/burstable/pod44e2e33e-776b-4284-a647-4bd959899c91/crio-dc4b5f11a034ac50f4bf7a0f2396fce881f58dcb5b2fa5f0f74d5c2ad924c083",
                some(
                    CriO,
                    "dc4b5f11a034ac50f4bf7a0f2396fce881f58dcb5b2fa5f0f74d5c2ad924c083",
                    Some("44e2e33e-776b-4284-a647-4bd959899c91"),
                ),
            ),
            (
                "/kubepods/burstable/pod44e2e33e-776b-4284-a647-4bd959899c91/crio-conmon-dc4b5f11a034ac50f4bf7a0f2396fce881f58dcb5b2fa5f0f74d5c2ad924c083",
                None,
            ),
            // dockershim / cri-dockerd, systemd driver: `systemd-cgls` in
            // github.com/kontena/pharos-cluster/issues/440.
            (
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9692aa0e_748e_11e8_8dfa_76d458035df6.slice/docker-abddff03dfd7710c79a750ce3e730365cbb2c8247a974170c1062683bc3e9152.scope",
                some(
                    Docker,
                    "abddff03dfd7710c79a750ce3e730365cbb2c8247a974170c1062683bc3e9152",
                    Some("9692aa0e-748e-11e8-8dfa-76d458035df6"),
                ),
            ),
            // Docker outside Kubernetes, systemd driver: github.com/neuvector/neuvector
            // (share/system/cgroup_test.go, TestDockerIDCentOS).
            (
                "/system.slice/docker-9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d.scope",
                some(
                    Docker,
                    "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d",
                    None,
                ),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(&parse(path), want, "{path}");
        }
    }

    const ID: &str = "0e768f8db752fcd648adb264498daa1d8f31562320e881d6a9ec593d24b1f779";
    const UID: &str = "1234abcd-5678-90ab-cdef-1234567890ab";

    /// The shapes the rest of the matrix implies (kubelet naming rules), with one id.
    #[test]
    fn driver_shapes() {
        use Runtime::*;
        let u = UID.replace('-', "_");
        let cases = [
            // containerd, cgroupfs, guaranteed (no QOS level), as on this project's test node.
            (
                format!("/kubepods/pod{UID}/{ID}"),
                some(Unnamed, ID, Some(UID)),
            ),
            (
                format!("kubepods/besteffort/pod{UID}/{ID}"),
                some(Unnamed, ID, Some(UID)),
            ),
            // kubelet --cgroup-root=/custom (cgroupfs) and =/custom.slice (systemd).
            (
                format!("/custom/kubepods/burstable/pod{UID}/{ID}"),
                some(Unnamed, ID, Some(UID)),
            ),
            (
                format!(
                    "/custom.slice/custom-kubepods.slice/custom-kubepods-besteffort.slice/custom-kubepods-besteffort-pod{u}.slice/cri-containerd-{ID}.scope"
                ),
                some(Containerd, ID, Some(UID)),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{u}.slice/crio-{ID}.scope"),
                some(CriO, ID, Some(UID)),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{u}.slice/docker-{ID}.scope"),
                some(Docker, ID, Some(UID)),
            ),
            (
                format!("/kubepods/pod{UID}/crio-{ID}"),
                some(CriO, ID, Some(UID)),
            ),
            // A container that made cgroups of its own, even ones named like containers.
            (
                format!(
                    "/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope/init.scope"
                ),
                some(Containerd, ID, Some(UID)),
            ),
            (
                format!(
                    "/kubepods/besteffort/pod{UID}/{ID}/nested/{}",
                    "f".repeat(64)
                ),
                some(Unnamed, ID, Some(UID)),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(parse(&path), want, "{path}");
        }
    }

    #[test]
    fn not_a_container() {
        let u = UID.replace('-', "_");
        for path in [
            // Pod-level cgroups: no container below.
            format!("/kubepods/besteffort/pod{UID}"),
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"),
            // QOS and root levels, the host.
            "/kubepods/besteffort".into(),
            "/kubepods.slice".into(),
            "/".into(),
            String::new(),
            "/system.slice/containerd.service".into(),
            "/user.slice/user-0.slice/session-1.scope".into(),
            // Below a pod, something that is not a container segment.
            format!("/kubepods/pod{UID}/not-a-container/{ID}"),
            format!("/kubepods.slice/kubepods-pod{u}.slice/crio-conmon-{ID}.scope"),
            // Ids of the wrong length or case.
            format!("/kubepods/pod{UID}/{}", &ID[1..]),
            format!("/kubepods/pod{UID}/{}", ID.to_uppercase()),
            format!("/kubepods/pod{UID}/cri-containerd-{ID}"),
        ] {
            assert_eq!(parse(&path), None, "{path}");
        }
    }

    #[test]
    fn pod_segments_need_the_kubelet_tree() {
        // A `pod<uid>` outside kubepods is not a pod: the container is still found, without a pod.
        assert_eq!(
            parse(&format!("/mine/pod{UID}/{ID}")),
            some(Runtime::Unnamed, ID, None)
        );
        // A malformed UID is not a pod UID.
        assert_eq!(
            parse(&format!("/kubepods/besteffort/pod1234/{ID}")),
            some(Runtime::Unnamed, ID, None)
        );
    }
}
