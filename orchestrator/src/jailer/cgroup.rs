//! Cgroup limits for one jail: find the hierarchy (v1 per-controller mounts or the v2
//! unified one) from /proc/self/mountinfo, create `<parent>/<id>` in it, write the limits,
//! move the jailed process in and remove the cgroup once it has exited.
//!
//! Limits are given in cgroup v2 names (`memory.max`, `cpu.max`, `pids.max`) and translated
//! for v1 (`memory.limit_in_bytes`, `cpu.cfs_quota_us` + `cpu.cfs_period_us`). Any other
//! `<controller>.<file>=<value>` is written as given. This module never touches a cgroup it
//! did not create, apart from enabling controllers in v2 `cgroup.subtree_control` files on
//! the way down to it (v2 requires that).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Errors of cgroup setup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `--cgroup` was not `KEY=VALUE`.
    #[error("bad --cgroup `{0}`: expected <controller>.<file>=<value>, e.g. memory.max=268435456")]
    BadSetting(String),
    /// No cgroup hierarchy of the wanted version is mounted.
    #[error("no cgroup {0} hierarchy is mounted (see /proc/self/mountinfo)")]
    NoHierarchy(&'static str),
    /// A controller named by a `--cgroup` is not available.
    #[error("cgroup controller `{controller}` is not available: {why}")]
    ControllerUnavailable {
        /// The controller, e.g. `memory`.
        controller: String,
        /// Where we looked.
        why: String,
    },
    /// A per-VM cgroup already exists.
    #[error(
        "cgroup {0} already exists: is a jail with this id still running? Remove it with rmdir"
    )]
    Exists(PathBuf),
    /// Reading or writing a cgroup file failed.
    #[error("{action} {path}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Which cgroup interface to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CgroupVersionArg {
    /// cgroup v1: one hierarchy per controller.
    #[value(name = "1")]
    V1,
    /// cgroup v2: the unified hierarchy.
    #[value(name = "2")]
    V2,
    /// v1 if any v1 controller hierarchy is mounted, else v2.
    Auto,
}

/// The cgroup interface in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

/// One `--cgroup KEY=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The file name, e.g. `memory.max`.
    pub key: String,
    /// What to write.
    pub value: String,
}

impl FromStr for CgroupSetting {
    type Err = CgroupError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CgroupError::BadSetting(s.to_string());
        let (key, value) = s.split_once('=').ok_or_else(bad)?;
        let (controller, file) = key.split_once('.').ok_or_else(bad)?;
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        };
        if !name_ok(controller) || !name_ok(file) || value.is_empty() || value.contains('\n') {
            return Err(bad());
        }
        Ok(CgroupSetting {
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

/// A file write in one controller's cgroup directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupWrite {
    /// The controller whose hierarchy holds the file.
    pub controller: String,
    /// The file name inside the cgroup directory.
    pub file: String,
    /// What to write.
    pub value: String,
}

fn write_of(controller: &str, file: &str, value: &str) -> CgroupWrite {
    CgroupWrite {
        controller: controller.into(),
        file: file.into(),
        value: value.into(),
    }
}

/// Translates a setting into the writes the given cgroup version needs, in order.
pub fn translate(s: &CgroupSetting, version: CgroupVersion) -> Vec<CgroupWrite> {
    let controller = s.key.split('.').next().unwrap_or_default();
    let v = s.value.trim();
    match (version, s.key.as_str()) {
        (CgroupVersion::V1, "memory.max") => {
            let v = if v == "max" { "-1" } else { v };
            vec![write_of("memory", "memory.limit_in_bytes", v)]
        }
        (CgroupVersion::V1, "cpu.max") => {
            // cpu.max is "$QUOTA [$PERIOD]"; v1 keeps the two apart. The period goes first
            // so the quota is checked against the new period.
            let mut parts = v.split_whitespace();
            let quota = parts.next().unwrap_or("max");
            let mut out = Vec::new();
            if let Some(period) = parts.next() {
                out.push(write_of("cpu", "cpu.cfs_period_us", period));
            }
            let quota = if quota == "max" { "-1" } else { quota };
            out.push(write_of("cpu", "cpu.cfs_quota_us", quota));
            out
        }
        (CgroupVersion::V2, "memory.limit_in_bytes") => {
            let v = if v == "-1" { "max" } else { v };
            vec![write_of("memory", "memory.max", v)]
        }
        _ => vec![write_of(controller, &s.key, v)],
    }
}

/// One line of /proc/self/mountinfo that is a cgroup mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The cgroup path mounted there (usually `/`).
    pub root: String,
    /// v1 or v2.
    pub version: CgroupVersion,
    /// v1: the controllers of this hierarchy (`memory`, or `cpu,cpuacct`). Empty for v2.
    pub controllers: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if let Some(n) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(n);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup mounts in a mountinfo text (proc(5): `id parent dev root mountpoint opts
/// [optional...] - fstype source superopts`).
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let version = match r[0] {
            "cgroup" => CgroupVersion::V1,
            "cgroup2" => CgroupVersion::V2,
            _ => continue,
        };
        let controllers = match version {
            CgroupVersion::V1 => r[2]
                .split(',')
                // The rest of a v1 mount's options are flags (cgroup(7), cgroups-v1.rst).
                .filter(|o| {
                    !o.contains('=')
                        && !matches!(
                            *o,
                            "rw" | "ro"
                                | "xattr"
                                | "noprefix"
                                | "clone_children"
                                | "cpuset_v2_mode"
                                | "favordynmods"
                                | "none"
                        )
                })
                .map(String::from)
                .collect(),
            CgroupVersion::V2 => Vec::new(),
        };
        out.push(CgroupMount {
            mount_point: PathBuf::from(unescape(l[4])),
            root: unescape(l[3]),
            version,
            controllers,
        });
    }
    out
}

/// One line of /proc/self/cgroup: `hierarchy-id:controllers:path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnCgroup {
    /// v1 controllers of this hierarchy; empty for the v2 line (`0::/path`).
    pub controllers: Vec<String>,
    /// The cgroup path.
    pub path: String,
}

/// Parses /proc/self/cgroup.
pub fn parse_proc_cgroup(text: &str) -> Vec<OwnCgroup> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctl = it.next()?;
            let path = it.next()?;
            Some(OwnCgroup {
                controllers: ctl
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// Picks the version: the requested one, or for `auto` v1 when any v1 controller hierarchy
/// is mounted (a hybrid host keeps its controllers there), else v2.
pub fn pick_version(
    mounts: &[CgroupMount],
    want: CgroupVersionArg,
) -> Result<CgroupVersion, CgroupError> {
    let has_v1 = mounts
        .iter()
        .any(|m| m.version == CgroupVersion::V1 && !m.controllers.is_empty());
    let has_v2 = mounts.iter().any(|m| m.version == CgroupVersion::V2);
    match want {
        CgroupVersionArg::V1 if has_v1 => Ok(CgroupVersion::V1),
        CgroupVersionArg::V1 => Err(CgroupError::NoHierarchy("v1")),
        CgroupVersionArg::V2 if has_v2 => Ok(CgroupVersion::V2),
        CgroupVersionArg::V2 => Err(CgroupError::NoHierarchy("v2")),
        CgroupVersionArg::Auto if has_v1 => Ok(CgroupVersion::V1),
        CgroupVersionArg::Auto if has_v2 => Ok(CgroupVersion::V2),
        CgroupVersionArg::Auto => Err(CgroupError::NoHierarchy("v1 or v2")),
    }
}

/// Joins a cgroup path (`/a/b`) under a directory.
fn under(dir: &Path, cgroup_path: &str) -> PathBuf {
    let rel = cgroup_path.trim_start_matches('/');
    if rel.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(rel)
    }
}

/// The cgroup directory a process's path maps to in a mount, or `None` when the path lies
/// outside the mounted subtree.
fn dir_of(m: &CgroupMount, path: &str) -> Option<PathBuf> {
    let root = m.root.trim_end_matches('/');
    let rel = path.strip_prefix(root)?;
    if !(rel.is_empty() || rel.starts_with('/')) {
        return None;
    }
    Some(under(&m.mount_point, rel))
}

/// What a jail's cgroups will be: one directory per hierarchy used, and the writes.
#[derive(Debug)]
pub struct CgroupPlan {
    version: CgroupVersion,
    /// (the parent directory, the per-VM leaf directory, controllers placed there).
    dirs: Vec<(PathBuf, PathBuf, Vec<String>)>,
    writes: Vec<CgroupWrite>,
}

/// The cgroups created for a running jail.
#[derive(Debug)]
pub struct Cgroups {
    leaves: Vec<PathBuf>,
}

impl CgroupPlan {
    /// Works out the directories and writes, failing (before anything is created) when a
    /// controller is unavailable. `parent` is relative to the jailer's own cgroup unless it
    /// starts with `/`, in which case it is taken from the hierarchy's root.
    pub fn new(
        settings: &[CgroupSetting],
        want: CgroupVersionArg,
        parent: &str,
        id: &str,
    ) -> Result<CgroupPlan, CgroupError> {
        let read = |p: &str| fs::read_to_string(p).map_err(io_err("read", Path::new(p)));
        let mounts = parse_mountinfo(&read("/proc/self/mountinfo")?);
        let own = parse_proc_cgroup(&read("/proc/self/cgroup")?);
        let read_file = |p: &Path| fs::read_to_string(p);
        Self::with(settings, want, parent, id, &mounts, &own, &read_file)
    }

    /// `new` on a described host: its mounts, our cgroups in it, and how to read a file
    /// (v2's `cgroup.controllers`).
    fn with(
        settings: &[CgroupSetting],
        want: CgroupVersionArg,
        parent: &str,
        id: &str,
        mounts: &[CgroupMount],
        own: &[OwnCgroup],
        read_file: &dyn Fn(&Path) -> io::Result<String>,
    ) -> Result<CgroupPlan, CgroupError> {
        let version = pick_version(mounts, want)?;
        let writes: Vec<CgroupWrite> = settings
            .iter()
            .flat_map(|s| translate(s, version))
            .collect();
        let controllers: BTreeSet<&str> = writes.iter().map(|w| w.controller.as_str()).collect();
        let unavailable = |c: &str, why: String| CgroupError::ControllerUnavailable {
            controller: c.to_string(),
            why,
        };
        // The parent directory inside a mount, given the jailer's own path there.
        let parent_dir = |m: &CgroupMount, own_path: &str| -> Option<PathBuf> {
            if parent.starts_with('/') {
                dir_of(m, "/").map(|d| under(&d, parent))
            } else {
                dir_of(m, own_path).map(|d| under(&d, parent))
            }
        };
        let mut dirs: Vec<(PathBuf, PathBuf, Vec<String>)> = Vec::new();
        match version {
            CgroupVersion::V1 => {
                for c in controllers {
                    let m = mounts
                        .iter()
                        .find(|m| {
                            m.version == CgroupVersion::V1 && m.controllers.iter().any(|x| x == c)
                        })
                        .ok_or_else(|| {
                            unavailable(c, "no cgroup v1 hierarchy is mounted with it".into())
                        })?;
                    let own_path = own
                        .iter()
                        .find(|o| o.controllers.iter().any(|x| x == c))
                        .map_or("/", |o| o.path.as_str());
                    let p = parent_dir(m, own_path).ok_or_else(|| {
                        unavailable(
                            c,
                            format!(
                                "our cgroup {own_path} is outside the mount at {}",
                                m.mount_point.display()
                            ),
                        )
                    })?;
                    let leaf = p.join(id);
                    match dirs.iter_mut().find(|d| d.1 == leaf) {
                        Some(d) => d.2.push(c.to_string()),
                        None => dirs.push((p, leaf, vec![c.to_string()])),
                    }
                }
            }
            CgroupVersion::V2 => {
                let m = mounts
                    .iter()
                    .find(|m| m.version == CgroupVersion::V2)
                    .ok_or(CgroupError::NoHierarchy("v2"))?;
                let root_ctl = m.mount_point.join("cgroup.controllers");
                let available = read_file(&root_ctl).map_err(io_err("read", &root_ctl))?;
                for c in &controllers {
                    if !available.split_whitespace().any(|a| a == *c) {
                        return Err(unavailable(
                            c,
                            format!("not listed in {}", root_ctl.display()),
                        ));
                    }
                }
                let own_path = own
                    .iter()
                    .find(|o| o.controllers.is_empty())
                    .map_or("/", |o| o.path.as_str());
                let p = parent_dir(m, own_path).ok_or_else(|| {
                    unavailable(
                        controllers.first().copied().unwrap_or("?"),
                        format!(
                            "our cgroup {own_path} is outside {}",
                            m.mount_point.display()
                        ),
                    )
                })?;
                let leaf = p.join(id);
                dirs.push((p, leaf, controllers.iter().map(|c| c.to_string()).collect()));
            }
        }
        Ok(CgroupPlan {
            version,
            dirs,
            writes,
        })
    }

    /// The per-VM leaf directories this plan creates (whether or not they exist yet): how a
    /// supervisor finds a jail's cgroups after losing the jailer's report.
    pub fn leaves(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, leaf, _)| leaf.clone()).collect()
    }

    /// Creates the per-VM cgroups and writes the limits. On error, removes what it created.
    pub fn create(&self) -> Result<Cgroups, CgroupError> {
        let mut made = Cgroups { leaves: Vec::new() };
        match self.create_into(&mut made) {
            Ok(()) => Ok(made),
            Err(e) => {
                made.remove();
                Err(e)
            }
        }
    }

    fn create_into(&self, made: &mut Cgroups) -> Result<(), CgroupError> {
        for (parent, leaf, controllers) in &self.dirs {
            if leaf.exists() {
                return Err(CgroupError::Exists(leaf.clone()));
            }
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            if self.version == CgroupVersion::V2 {
                enable_v2_controllers(parent, controllers)?;
            }
            fs::create_dir(leaf).map_err(io_err("create", leaf))?;
            made.leaves.push(leaf.clone());
            if self.version == CgroupVersion::V1 && controllers.iter().any(|c| c == "cpuset") {
                inherit_cpuset(parent, leaf)?;
            }
        }
        for w in &self.writes {
            let dir = self
                .dirs
                .iter()
                .find(|d| d.2.contains(&w.controller))
                .map(|d| &d.1)
                .ok_or_else(|| CgroupError::ControllerUnavailable {
                    controller: w.controller.clone(),
                    why: "no cgroup directory planned for it".into(),
                })?;
            let file = dir.join(&w.file);
            if !file.exists() {
                return Err(CgroupError::Io {
                    action: "no such cgroup file",
                    path: file,
                    source: io::Error::from(io::ErrorKind::NotFound),
                });
            }
            fs::write(&file, &w.value).map_err(io_err("write limit to", &file))?;
        }
        Ok(())
    }
}

/// v2 only lets a cgroup use a controller its parent enabled in `cgroup.subtree_control`,
/// all the way from the root. Enables the missing ones from the top down to `parent`.
fn enable_v2_controllers(parent: &Path, controllers: &[String]) -> Result<(), CgroupError> {
    let chain: Vec<&Path> = parent
        .ancestors()
        .take_while(|p| p.join("cgroup.subtree_control").exists())
        .collect();
    for dir in chain.into_iter().rev() {
        let f = dir.join("cgroup.subtree_control");
        let on = fs::read_to_string(&f).map_err(io_err("read", &f))?;
        for c in controllers {
            if on.split_whitespace().any(|x| x == c) {
                continue;
            }
            fs::write(&f, format!("+{c}")).map_err(|source| {
                CgroupError::ControllerUnavailable {
                    controller: c.clone(),
                    why: format!(
                        "cannot enable it in {}: {source} (a v2 cgroup with processes cannot \
                         delegate controllers; pick another --parent-cgroup)",
                        f.display()
                    ),
                }
            })?;
        }
    }
    Ok(())
}

/// A new v1 cpuset cgroup starts with no CPUs and no memory nodes, and no task can join it
/// until they are set: copy them from the parent.
fn inherit_cpuset(parent: &Path, leaf: &Path) -> Result<(), CgroupError> {
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let from = parent.join(f);
        let v = fs::read_to_string(&from).map_err(io_err("read", &from))?;
        let to = leaf.join(f);
        fs::write(&to, v.trim()).map_err(io_err("write", &to))?;
    }
    Ok(())
}

impl Cgroups {
    /// Moves a process (by its pid in our namespace) into every per-VM cgroup.
    pub fn join(&self, pid: i32) -> Result<(), CgroupError> {
        for leaf in &self.leaves {
            let f = leaf.join("cgroup.procs");
            fs::write(&f, pid.to_string()).map_err(io_err("move the process into", &f))?;
        }
        Ok(())
    }

    /// The per-VM cgroup directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.leaves
    }

    /// Why the memory controller killed a process of these cgroups, if it did: the OOM
    /// kill count (cgroup v2 `memory.events`, or v1 `memory.oom_control`) and the limit
    /// file with its value, for a message naming both.
    pub fn oom_report(&self) -> Option<String> {
        for leaf in &self.leaves {
            let (events, limit) = if leaf.join("memory.events").exists() {
                (leaf.join("memory.events"), leaf.join("memory.max"))
            } else if leaf.join("memory.oom_control").exists() {
                (
                    leaf.join("memory.oom_control"),
                    leaf.join("memory.limit_in_bytes"),
                )
            } else {
                continue;
            };
            let kills = fs::read_to_string(&events).ok().and_then(|t| oom_kills(&t));
            if let Some(n) = kills.filter(|&n| n > 0) {
                let value = fs::read_to_string(&limit).unwrap_or_default();
                return Some(format!(
                    "the kernel's OOM killer killed {n} process(es) for going over the cgroup memory limit ({} = {})",
                    limit.display(),
                    value.trim()
                ));
            }
        }
        None
    }

    /// Removes the per-VM cgroups (best effort: they must have no processes left).
    pub fn remove(&self) {
        for leaf in self.leaves.iter().rev() {
            if let Err(e) = fs::remove_dir(leaf) {
                eprintln!(
                    "jailer: warning: cannot remove cgroup {}: {e}",
                    leaf.display()
                );
            }
        }
    }
}

/// The `oom_kill N` count of a `memory.events` (v2) or `memory.oom_control` (v1) file.
pub fn oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some("oom_kill")).then(|| it.next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counts_parse_from_both_versions() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(oom_kills(v2), Some(1));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(oom_kills(v1), Some(3));
        assert_eq!(oom_kills("oom_kill_disable 0\n"), None);
        assert_eq!(oom_kills("oom_kill many\n"), None);
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PURE_V2: &str =
        "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";

    fn no_files(p: &Path) -> io::Result<String> {
        panic!("read {}", p.display())
    }

    fn setting(s: &str) -> CgroupSetting {
        s.parse().unwrap()
    }

    #[test]
    fn mountinfo_finds_v1_controllers_and_v2() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].controllers, ["cpu"]);
        assert_eq!(m[2].controllers, ["cpu", "cpuacct"]);
        assert_eq!(
            m[4].controllers,
            Vec::<String>::new(),
            "name=systemd is no controller"
        );
        assert_eq!(m[5].version, CgroupVersion::V2);
        assert_eq!(m[5].mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(
            pick_version(&m, CgroupVersionArg::Auto).unwrap(),
            CgroupVersion::V1
        );
        let v2 = parse_mountinfo(PURE_V2);
        assert_eq!(
            pick_version(&v2, CgroupVersionArg::Auto).unwrap(),
            CgroupVersion::V2
        );
        assert!(matches!(
            pick_version(&v2, CgroupVersionArg::V1),
            Err(CgroupError::NoHierarchy("v1"))
        ));
        assert!(pick_version(&[], CgroupVersionArg::Auto).is_err());
    }

    #[test]
    fn mountinfo_unescapes_paths() {
        let m = parse_mountinfo("1 2 0:1 / /a\\040b rw - cgroup2 cgroup2 rw\n");
        assert_eq!(m[0].mount_point, Path::new("/a b"));
    }

    #[test]
    fn proc_cgroup_lines() {
        let c = parse_proc_cgroup("4:memory:/process_api/x\n1:cpu,cpuacct:/\n0::/user.slice\n");
        assert_eq!(c[0].controllers, ["memory"]);
        assert_eq!(c[0].path, "/process_api/x");
        assert_eq!(c[1].controllers, ["cpu", "cpuacct"]);
        assert!(c[2].controllers.is_empty());
        assert_eq!(c[2].path, "/user.slice");
    }

    #[test]
    fn settings_parse_and_refuse_junk() {
        assert_eq!(setting("memory.max=1G").value, "1G");
        assert_eq!(setting("cpu.max=50000 100000").value, "50000 100000");
        for bad in [
            "memory",
            "memory.max",
            "=1",
            "memory.max=",
            "mem/../x.max=1",
            ".max=1",
        ] {
            assert!(bad.parse::<CgroupSetting>().is_err(), "{bad}");
        }
    }

    #[test]
    fn v2_names_translate_to_v1() {
        let t = |s: &str| translate(&setting(s), CgroupVersion::V1);
        assert_eq!(
            t("memory.max=268435456"),
            [write_of("memory", "memory.limit_in_bytes", "268435456")]
        );
        assert_eq!(
            t("memory.max=max"),
            [write_of("memory", "memory.limit_in_bytes", "-1")]
        );
        assert_eq!(
            t("cpu.max=50000 100000"),
            [
                write_of("cpu", "cpu.cfs_period_us", "100000"),
                write_of("cpu", "cpu.cfs_quota_us", "50000")
            ]
        );
        assert_eq!(
            t("cpu.max=max"),
            [write_of("cpu", "cpu.cfs_quota_us", "-1")]
        );
        assert_eq!(t("pids.max=64"), [write_of("pids", "pids.max", "64")]);
        let v2 = translate(&setting("memory.limit_in_bytes=-1"), CgroupVersion::V2);
        assert_eq!(v2, [write_of("memory", "memory.max", "max")]);
        let same = translate(&setting("cpu.max=max 100000"), CgroupVersion::V2);
        assert_eq!(same, [write_of("cpu", "cpu.max", "max 100000")]);
    }

    #[test]
    fn plan_nests_under_our_own_cgroup_per_controller() {
        let mounts = parse_mountinfo(HYBRID);
        let own = parse_proc_cgroup("4:memory:/box/a\n8:pids:/\n1:cpu:/\n");
        let s = [
            setting("memory.max=1M"),
            setting("pids.max=9"),
            setting("cpu.max=1000 2000"),
        ];
        let p = CgroupPlan::with(
            &s,
            CgroupVersionArg::Auto,
            "vmm",
            "id1",
            &mounts,
            &own,
            &no_files,
        )
        .unwrap();
        let leaves: Vec<_> = p.dirs.iter().map(|d| d.1.clone()).collect();
        assert_eq!(
            leaves,
            [
                PathBuf::from("/sys/fs/cgroup/cpu/vmm/id1"),
                PathBuf::from("/sys/fs/cgroup/memory/box/a/vmm/id1"),
                PathBuf::from("/sys/fs/cgroup/pids/vmm/id1"),
            ]
        );
        let abs = CgroupPlan::with(
            &s[..1],
            CgroupVersionArg::V1,
            "/jails",
            "id1",
            &mounts,
            &own,
            &no_files,
        )
        .unwrap();
        assert_eq!(abs.dirs[0].1, Path::new("/sys/fs/cgroup/memory/jails/id1"));
    }

    #[test]
    fn plan_names_a_missing_controller() {
        let mounts = parse_mountinfo(HYBRID);
        let err = CgroupPlan::with(
            &[setting("hugetlb.2MB.limit_in_bytes=0")],
            CgroupVersionArg::Auto,
            "vmm",
            "x",
            &mounts,
            &[],
            &no_files,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`hugetlb`") && msg.contains("v1"), "{msg}");
    }

    #[test]
    fn v2_plan_uses_one_directory_and_checks_the_root_controllers() {
        let mounts = parse_mountinfo(PURE_V2);
        let own = parse_proc_cgroup("0::/system.slice/orch.service\n");
        let ctl = |p: &Path| {
            assert_eq!(p, Path::new("/sys/fs/cgroup/cgroup.controllers"));
            Ok("cpuset cpu io memory pids".to_string())
        };
        let s = [setting("memory.max=1G"), setting("cpu.max=max 100000")];
        let p =
            CgroupPlan::with(&s, CgroupVersionArg::Auto, "vmm", "v", &mounts, &own, &ctl).unwrap();
        assert_eq!(p.version, CgroupVersion::V2);
        assert_eq!(p.dirs.len(), 1);
        assert_eq!(
            p.dirs[0].1,
            Path::new("/sys/fs/cgroup/system.slice/orch.service/vmm/v")
        );
        assert_eq!(p.dirs[0].2, ["cpu", "memory"]);
        assert_eq!(p.writes[0], write_of("memory", "memory.max", "1G"));

        let only_cpu = |_: &Path| Ok("cpu".to_string());
        let err = CgroupPlan::with(
            &s,
            CgroupVersionArg::V2,
            "vmm",
            "v",
            &mounts,
            &own,
            &only_cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`memory`") && err.contains("/sys/fs/cgroup/cgroup.controllers"),
            "{err}"
        );
    }

    #[test]
    fn v2_controllers_are_enabled_from_the_top_down() {
        let top = std::env::temp_dir().join(format!("jailer-v2-{}", std::process::id()));
        let leaf_parent = top.join("a/b");
        fs::create_dir_all(&leaf_parent).unwrap();
        for d in [&top, &top.join("a"), &leaf_parent] {
            fs::write(d.join("cgroup.subtree_control"), "cpu").unwrap();
        }
        enable_v2_controllers(&leaf_parent, &["cpu".into(), "memory".into()]).unwrap();
        for d in [&top, &top.join("a"), &leaf_parent] {
            // A real subtree_control would now list both; a plain file keeps the last write.
            let got = fs::read_to_string(d.join("cgroup.subtree_control")).unwrap();
            assert_eq!(got, "+memory", "{}", d.display());
        }
        fs::remove_dir_all(&top).unwrap();
    }
}
