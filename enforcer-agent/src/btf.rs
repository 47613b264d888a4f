//! Kernel struct offsets from the running kernel's BTF.
//!
//! Rust eBPF programs carry no CO-RE relocations, so the agent reads the byte offsets the
//! exec/fork programs need from `/sys/kernel/btf/vmlinux` and stores them in `ENF_OFFSETS`
//! ([`KernelOffsets`]). Members nested in anonymous unions/structs are found by recursing and
//! adding offsets; every field must be byte aligned (no bitfields) and of the width the kernel
//! programs read. When anything is missing the caller keeps `valid = 0`, which disables the
//! exec-time lookup: every exec is then pending and attested by the agent from `/proc`.
//!
//! Inode timestamps moved across kernel versions, and each is resolved on its own:
//! - 6.11+: `i_mtime_sec` (`time64_t`) / `i_mtime_nsec` (`u32`), same for `i_ctime_*`;
//! - 6.6–6.10: `__i_ctime` and `i_mtime` or `__i_mtime` (`struct timespec64`);
//! - 5.x: `i_mtime` / `i_ctime` (`struct timespec64`).

use std::path::{Path, PathBuf};

use btf_rs::{Btf, BtfType, Member, Struct, Type};
use enforcer_common::{KernelOffsets, TamperOffsets};

/// Where the running kernel exposes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Deepest nesting of anonymous structs/unions (and typedef chains) followed; a guard against
/// malformed, cyclic BTF.
const MAX_DEPTH: u32 = 32;

/// Why the kernel offsets could not be read. Every case leaves the exec-time lookup disabled.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "cannot read kernel BTF from {path}: {source}; check that the kernel was built with \
         CONFIG_DEBUG_INFO_BTF=y and that the file is readable; the exec-time lookup will be \
         disabled (every exec is attested by the agent)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: btf_rs::Error,
    },
    #[error(
        "kernel BTF in {path} has no `struct {name}`; this kernel is not supported for \
         exec-time lookup, which will be disabled (every exec is attested by the agent)"
    )]
    MissingStruct { path: PathBuf, name: String },
    #[error(
        "kernel BTF has no member `{member}` in `struct {strukt}`; this kernel layout is not \
         supported, the exec-time lookup will be disabled (every exec is attested by the agent)"
    )]
    MissingMember { strukt: String, member: String },
    #[error(
        "member `{member}` of `struct {strukt}` is a bitfield or not byte aligned (bit offset \
         {bit_offset}); it cannot be read by the kernel programs, the exec-time lookup will be \
         disabled (every exec is attested by the agent)"
    )]
    NotByteAligned {
        strukt: String,
        member: String,
        bit_offset: u32,
    },
    #[error(
        "member `{member}` of `struct {strukt}` is {size} bytes wide where the kernel programs \
         read {expected}; this kernel layout is not supported, the exec-time lookup will be \
         disabled (every exec is attested by the agent)"
    )]
    UnexpectedSize {
        strukt: String,
        member: String,
        size: String,
        expected: String,
    },
    #[error(
        "malformed kernel BTF while resolving `struct {strukt}`: {detail}; the exec-time \
         lookup will be disabled (every exec is attested by the agent)"
    )]
    Malformed { strukt: String, detail: String },
}

/// Offsets of the running kernel, from [`VMLINUX_BTF`].
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    kernel_offsets_from(Path::new(VMLINUX_BTF))
}

/// Offsets from a BTF file (raw BTF, as `/sys/kernel/btf/vmlinux`). On success `valid == 1`.
pub fn kernel_offsets_from(path: &Path) -> Result<KernelOffsets, BtfError> {
    let btf = Btf::from_file(path).map_err(|source| BtfError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let r = Resolver { btf: &btf, path };
    offsets_with(&r)
}

fn offsets_with(r: &Resolver<'_>) -> Result<KernelOffsets, BtfError> {
    let ptr = [core::mem::size_of::<usize>()];
    let binprm = r.strukt("linux_binprm")?;
    let file = r.strukt("file")?;
    let inode = r.strukt("inode")?;
    let sb = r.strukt("super_block")?;
    let task = r.strukt("task_struct")?;
    let signal = r.strukt("signal_struct")?;
    let mm = r.strukt("mm_struct")?;

    let (mtime_sec, mtime_nsec) = r.timestamp(&inode, "mtime")?;
    let (ctime_sec, ctime_nsec) = r.timestamp(&inode, "ctime")?;

    Ok(KernelOffsets {
        valid: 1,
        binprm_file: r.offset(&binprm, "file", &ptr)?,
        file_inode: r.offset(&file, "f_inode", &ptr)?,
        inode_ino: r.offset(&inode, "i_ino", &[8])?,
        inode_sb: r.offset(&inode, "i_sb", &ptr)?,
        sb_dev: r.offset(&sb, "s_dev", &[4])?,
        inode_size: r.offset(&inode, "i_size", &[8])?,
        inode_mtime_sec: mtime_sec,
        inode_mtime_nsec: mtime_nsec,
        inode_ctime_sec: ctime_sec,
        inode_ctime_nsec: ctime_nsec,
        task_pid: r.offset(&task, "pid", &[4])?,
        task_tgid: r.offset(&task, "tgid", &[4])?,
        task_signal: r.offset(&task, "signal", &ptr)?,
        signal_live: r.offset(&signal, "live", &[4])?,
        task_start_boottime: r.offset(&task, "start_boottime", &[8])?,
        task_mm: r.offset(&task, "mm", &ptr)?,
        mm_start_stack: r.offset(&mm, "start_stack", &[8])?,
    })
}

/// Offsets of the tamper programs ([`TamperOffsets`]) of the running kernel.
pub fn tamper_offsets() -> Result<TamperOffsets, BtfError> {
    tamper_offsets_from(Path::new(VMLINUX_BTF))
}

/// Tamper offsets from a BTF file. On success `valid == 1`.
pub fn tamper_offsets_from(path: &Path) -> Result<TamperOffsets, BtfError> {
    let btf = Btf::from_file(path).map_err(|source| BtfError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let r = Resolver { btf: &btf, path };
    tamper_with(&r)
}

fn tamper_with(r: &Resolver<'_>) -> Result<TamperOffsets, BtfError> {
    let ptr = [core::mem::size_of::<usize>()];
    let task = r.strukt("task_struct")?;
    let files = r.strukt("files_struct")?;
    let fdt = r.strukt("fdtable")?;
    let file = r.strukt("file")?;
    let path = r.strukt("path")?;
    let inode = r.strukt("inode")?;
    let sb = r.strukt("super_block")?;
    let dentry = r.strukt("dentry")?;
    let qstr = r.strukt("qstr")?;
    let proc_inode = r.strukt("proc_inode")?;
    let pid = r.strukt("pid")?;
    let thread_info = r.strukt("thread_info")?;
    let vfs_inode = r.offset(&proc_inode, "vfs_inode", &[])?;
    let proc_pid = r.offset(&proc_inode, "pid", &ptr)?;
    Ok(TamperOffsets {
        valid: 1,
        task_ptrace: r.offset(&task, "ptrace", &[4])?,
        task_ptraced: r.offset(&task, "ptraced", &[])?,
        task_ptrace_entry: r.offset(&task, "ptrace_entry", &[])?,
        task_tgid: r.offset(&task, "tgid", &[4])?,
        task_files: r.offset(&task, "files", &ptr)?,
        task_thread_pid: r.offset(&task, "thread_pid", &ptr)?,
        task_pid_links: r.offset(&task, "pid_links", &[])?,
        files_fdt: r.offset(&files, "fdt", &ptr)?,
        fdt_max_fds: r.offset(&fdt, "max_fds", &[4])?,
        fdt_fd: r.offset(&fdt, "fd", &ptr)?,
        file_mode: r.offset(&file, "f_mode", &[4])?,
        file_inode: r.offset(&file, "f_inode", &ptr)?,
        file_dentry: r.offset(&file, "f_path", &[])? + r.offset(&path, "dentry", &ptr)?,
        file_private: r.offset(&file, "private_data", &ptr)?,
        inode_private: r.offset(&inode, "i_private", &ptr)?,
        inode_sb: r.offset(&inode, "i_sb", &ptr)?,
        sb_magic: r.offset(&sb, "s_magic", &[8])?,
        dentry_name: r.offset(&dentry, "d_name", &[])? + r.offset(&qstr, "name", &ptr)?,
        proc_inode_pid: proc_pid as i32 - vfs_inode as i32,
        pid_tasks: r.offset(&pid, "tasks", &[])?,
        ti_status: r.offset(&task, "thread_info", &[])? + r.offset(&thread_info, "status", &[4])?,
    })
}

/// A struct looked up by name, with that name kept for error messages.
struct Named {
    name: String,
    body: Struct,
}

/// A member found in a struct: absolute bit offset, bitfield width, type id.
struct Found {
    bit_offset: u32,
    bitfield: Option<u32>,
    type_id: u32,
}

struct Resolver<'a> {
    btf: &'a Btf,
    path: &'a Path,
}

impl Resolver<'_> {
    fn malformed(strukt: &str, detail: impl std::fmt::Display) -> BtfError {
        BtfError::Malformed {
            strukt: strukt.to_string(),
            detail: detail.to_string(),
        }
    }

    /// The first `struct NAME` with members (a name may also denote a forward declaration).
    fn strukt(&self, name: &str) -> Result<Named, BtfError> {
        let missing = || BtfError::MissingStruct {
            path: self.path.to_path_buf(),
            name: name.to_string(),
        };
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| missing())?;
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) => Some(s),
                _ => None,
            })
            .map(|body| Named {
                name: name.to_string(),
                body,
            })
            .ok_or_else(missing)
    }

    /// Follow typedef/const/volatile/restrict/type-tag links to the underlying type.
    fn strip(&self, strukt: &str, mut id: u32) -> Result<Type, BtfError> {
        for _ in 0..MAX_DEPTH {
            let t = self
                .btf
                .resolve_type_by_id(id)
                .map_err(|e| Self::malformed(strukt, e))?;
            let next = match &t {
                Type::Typedef(x) => x.get_type_id(),
                Type::Volatile(x) | Type::Const(x) | Type::Restrict(x) => x.get_type_id(),
                Type::TypeTag(x) => x.get_type_id(),
                _ => return Ok(t),
            };
            id = next.ok_or_else(|| Self::malformed(strukt, "modifier without a type"))?;
        }
        Err(Self::malformed(strukt, "type chain too deep"))
    }

    /// Size in bytes of a type, where it has one.
    fn size_of(&self, strukt: &str, id: u32, depth: u32) -> Result<Option<usize>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(Self::malformed(strukt, "type chain too deep"));
        }
        Ok(match self.strip(strukt, id)? {
            Type::Int(i) => Some(i.size()),
            Type::Ptr(_) => Some(core::mem::size_of::<usize>()),
            Type::Struct(s) | Type::Union(s) => Some(s.size()),
            Type::Enum(e) => Some(e.size()),
            Type::Enum64(e) => Some(e.size()),
            Type::Float(f) => Some(f.size()),
            Type::Array(a) => match a.get_type_id() {
                Some(elem) => self
                    .size_of(strukt, elem, depth + 1)?
                    .and_then(|s| s.checked_mul(a.len())),
                None => None,
            },
            _ => None,
        })
    }

    fn member_name(&self, strukt: &str, m: &Member) -> Result<String, BtfError> {
        self.btf
            .resolve_name(m as &dyn BtfType)
            .map_err(|e| Self::malformed(strukt, e))
    }

    /// Find `member` in `body`, descending into anonymous structs/unions.
    fn find(
        &self,
        strukt: &str,
        body: &Struct,
        member: &str,
        base_bits: u32,
        depth: u32,
    ) -> Result<Option<Found>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(Self::malformed(strukt, "anonymous members nested too deep"));
        }
        for m in &body.members {
            let name = self.member_name(strukt, m)?;
            let bits = base_bits
                .checked_add(m.bit_offset())
                .ok_or_else(|| Self::malformed(strukt, "member offset overflows"))?;
            let type_id = m
                .get_type_id()
                .ok_or_else(|| Self::malformed(strukt, "member without a type"))?;
            if name == member {
                return Ok(Some(Found {
                    bit_offset: bits,
                    bitfield: m.bitfield_size().filter(|&w| w != 0),
                    type_id,
                }));
            }
            if name.is_empty()
                && let Type::Struct(inner) | Type::Union(inner) = self.strip(strukt, type_id)?
                && let Some(found) = self.find(strukt, &inner, member, bits, depth + 1)?
            {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Byte offset of `s.member`, whose size must be one of `sizes` (empty: any).
    fn offset(&self, s: &Named, member: &str, sizes: &[usize]) -> Result<u32, BtfError> {
        self.try_offset(s, member, sizes)?
            .ok_or_else(|| BtfError::MissingMember {
                strukt: s.name.clone(),
                member: member.to_string(),
            })
    }

    fn try_offset(
        &self,
        s: &Named,
        member: &str,
        sizes: &[usize],
    ) -> Result<Option<u32>, BtfError> {
        let Some(found) = self.find(&s.name, &s.body, member, 0, 0)? else {
            return Ok(None);
        };
        self.checked_offset(s, member, &found, sizes).map(Some)
    }

    fn checked_offset(
        &self,
        s: &Named,
        member: &str,
        found: &Found,
        sizes: &[usize],
    ) -> Result<u32, BtfError> {
        if found.bitfield.is_some() || !found.bit_offset.is_multiple_of(8) {
            return Err(BtfError::NotByteAligned {
                strukt: s.name.clone(),
                member: member.to_string(),
                bit_offset: found.bit_offset,
            });
        }
        if !sizes.is_empty() {
            let size = self.size_of(&s.name, found.type_id, 0)?;
            if !size.is_some_and(|n| sizes.contains(&n)) {
                let expected = sizes
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" or ");
                return Err(BtfError::UnexpectedSize {
                    strukt: s.name.clone(),
                    member: member.to_string(),
                    size: size.map_or_else(|| "of unknown size".into(), |n| n.to_string()),
                    expected: format!("{expected} bytes"),
                });
            }
        }
        Ok(found.bit_offset / 8)
    }

    /// Offset of the nanoseconds' low 32 bits in a field of `size` bytes.
    fn low_half(offset: u32, size: usize) -> u32 {
        if cfg!(target_endian = "big") && size == 8 {
            offset + 4
        } else {
            offset
        }
    }

    /// Absolute (seconds, nanoseconds) offsets of `inode.i_{which}` for `which` in mtime/ctime,
    /// whichever layout this kernel uses.
    fn timestamp(&self, inode: &Named, which: &str) -> Result<(u32, u32), BtfError> {
        // 6.11+: split members.
        let sec = self.try_offset(inode, &format!("i_{which}_sec"), &[8])?;
        let nsec_name = format!("i_{which}_nsec");
        if let (Some(sec), Some(found)) =
            (sec, self.find(&inode.name, &inode.body, &nsec_name, 0, 0)?)
        {
            let size = self.size_of(&inode.name, found.type_id, 0)?.unwrap_or(0);
            let nsec = self.checked_offset(inode, &nsec_name, &found, &[4, 8])?;
            return Ok((sec, Self::low_half(nsec, size)));
        }
        // 6.6–6.10 (`__i_ctime`, `__i_mtime`) and older (`i_mtime`, `i_ctime`): timespec64.
        for name in [format!("__i_{which}"), format!("i_{which}")] {
            let Some(found) = self.find(&inode.name, &inode.body, &name, 0, 0)? else {
                continue;
            };
            let base = self.checked_offset(inode, &name, &found, &[])?;
            let Type::Struct(ts) = self.strip(&inode.name, found.type_id)? else {
                return Err(BtfError::UnexpectedSize {
                    strukt: inode.name.clone(),
                    member: name,
                    size: "not a struct".into(),
                    expected: "a struct timespec64".into(),
                });
            };
            let ts = Named {
                name: "timespec64".into(),
                body: ts,
            };
            let tv_sec = self.offset(&ts, "tv_sec", &[8])?;
            let nsec_found = self
                .find(&ts.name, &ts.body, "tv_nsec", 0, 0)?
                .ok_or_else(|| BtfError::MissingMember {
                    strukt: ts.name.clone(),
                    member: "tv_nsec".into(),
                })?;
            let nsec_size = self.size_of(&ts.name, nsec_found.type_id, 0)?.unwrap_or(0);
            let tv_nsec = self.checked_offset(&ts, "tv_nsec", &nsec_found, &[4, 8])?;
            let add = |off: u32| {
                base.checked_add(off)
                    .ok_or_else(|| Self::malformed(&inode.name, "member offset overflows"))
            };
            return Ok((add(tv_sec)?, Self::low_half(add(tv_nsec)?, nsec_size)));
        }
        Err(BtfError::MissingMember {
            strukt: inode.name.clone(),
            member: format!("i_{which}_sec/i_{which}_nsec, __i_{which} or i_{which}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF. Missing: under CI=true the test fails (a machine of the
    /// supported kind has it); otherwise it says why and the test returns early.
    fn vmlinux(test: &str) -> Option<&'static Path> {
        let p = Path::new(VMLINUX_BTF);
        if p.exists() {
            return Some(p);
        }
        assert!(
            !crate::in_ci(),
            "{test}: no {VMLINUX_BTF} and CI=true forbids skipping; run on a kernel built with CONFIG_DEBUG_INFO_BTF"
        );
        eprintln!("{test}: skipped: no {VMLINUX_BTF} (kernel without CONFIG_DEBUG_INFO_BTF)");
        None
    }

    #[test]
    fn offsets_of_running_kernel_are_plausible() {
        let Some(path) = vmlinux("offsets_of_running_kernel_are_plausible") else {
            return;
        };
        let o = kernel_offsets_from(path).expect("offsets of the running kernel");
        assert_eq!(o.valid, 1);
        // Members that are never first in their struct.
        for (name, v) in [
            ("binprm_file", o.binprm_file),
            ("inode_ino", o.inode_ino),
            ("inode_sb", o.inode_sb),
            ("sb_dev", o.sb_dev),
            ("inode_size", o.inode_size),
            ("inode_mtime_sec", o.inode_mtime_sec),
            ("inode_mtime_nsec", o.inode_mtime_nsec),
            ("inode_ctime_sec", o.inode_ctime_sec),
            ("inode_ctime_nsec", o.inode_ctime_nsec),
            ("task_pid", o.task_pid),
            ("task_tgid", o.task_tgid),
            ("task_signal", o.task_signal),
            ("signal_live", o.signal_live),
            ("task_start_boottime", o.task_start_boottime),
            ("task_mm", o.task_mm),
            ("mm_start_stack", o.mm_start_stack),
        ] {
            assert_ne!(v, 0, "{name} should not be at offset 0: {o:?}");
        }
        assert_eq!(o.task_tgid, o.task_pid + 4, "{o:?}");
        assert_eq!(o.inode_ino % 8, 0);
        assert_eq!(o.inode_size % 8, 0);
        assert_eq!(o.inode_mtime_sec % 8, 0);
        assert_eq!(o.inode_ctime_sec % 8, 0);
        assert_ne!(o.inode_mtime_sec, o.inode_ctime_sec);
        assert_ne!(o.inode_mtime_nsec, o.inode_ctime_nsec);
        // Sizes in the kernel tree are a few hundred bytes (inode) to a few KiB (task_struct).
        assert!(o.inode_size < 1024 && o.inode_ctime_nsec < 1024, "{o:?}");
        assert!(o.task_start_boottime < 16 * 1024, "{o:?}");
    }

    #[test]
    fn tamper_offsets_of_running_kernel_are_plausible() {
        let Some(path) = vmlinux("tamper_offsets_of_running_kernel_are_plausible") else {
            return;
        };
        let o = tamper_offsets_from(path).expect("tamper offsets of the running kernel");
        assert_eq!(o.valid, 1);
        assert_eq!(o.task_ptrace_entry, o.task_ptraced + 16, "{o:?}");
        assert!(o.proc_inode_pid < 0, "{o:?}");
        assert_ne!(o.task_files, 0);
        assert_ne!(o.dentry_name, 0);
        assert_eq!(
            o.task_tgid,
            kernel_offsets_from(path).expect("offsets").task_tgid
        );
    }

    #[test]
    fn inode_fields_do_not_overlap() {
        let Some(path) = vmlinux("inode_fields_do_not_overlap") else {
            return;
        };
        let o = kernel_offsets_from(path).expect("offsets of the running kernel");
        assert_ne!(o.inode_ino, o.inode_size);
        // Every 8-byte field lies apart from the others.
        let eight = [
            o.inode_ino,
            o.inode_size,
            o.inode_sb,
            o.inode_mtime_sec,
            o.inode_ctime_sec,
        ];
        for (i, a) in eight.iter().enumerate() {
            for b in &eight[i + 1..] {
                assert!(a.abs_diff(*b) >= 8, "overlap in {o:?}");
            }
        }
        for n in [o.inode_mtime_nsec, o.inode_ctime_nsec] {
            for s in eight {
                assert!(n >= s + 8 || n + 4 <= s, "nsec overlaps in {o:?}");
            }
        }
    }

    #[test]
    fn anonymous_members_are_found() {
        // `task_struct` keeps most members inside a `randomized_struct_fields` anonymous struct
        // on some configs, and `inode.i_nlink` sits in an anonymous union everywhere.
        let Some(path) = vmlinux("anonymous_members_are_found") else {
            return;
        };
        let btf = Btf::from_file(path).expect("btf");
        let r = Resolver { btf: &btf, path };
        let inode = r.strukt("inode").expect("inode");
        let nlink = r.offset(&inode, "i_nlink", &[4]).expect("i_nlink");
        let raw = r.offset(&inode, "__i_nlink", &[4]).expect("__i_nlink");
        assert_eq!(nlink, raw, "both union members start at the same place");
        assert!(
            inode
                .body
                .members
                .iter()
                .all(|m| r.member_name("inode", m).is_ok_and(|n| n != "i_nlink")),
            "i_nlink is expected inside an anonymous union"
        );
    }

    #[test]
    fn missing_things_are_reported() {
        let Some(path) = vmlinux("missing_things_are_reported") else {
            return;
        };
        let btf = Btf::from_file(path).expect("btf");
        let r = Resolver { btf: &btf, path };
        let e = r.strukt("no_such_struct_hopefully").err().expect("missing");
        assert!(e.to_string().contains("no_such_struct_hopefully"), "{e}");
        assert!(e.to_string().contains("disabled"), "{e}");
        let inode = r.strukt("inode").expect("inode");
        let e = r
            .offset(&inode, "i_nothing", &[])
            .expect_err("missing member");
        assert!(matches!(e, BtfError::MissingMember { .. }), "{e}");
        let e = r.offset(&inode, "i_ino", &[4]).expect_err("wrong size");
        assert!(matches!(e, BtfError::UnexpectedSize { .. }), "{e}");
    }

    #[test]
    fn unreadable_file_is_an_error() {
        let e = kernel_offsets_from(Path::new("/nonexistent/vmlinux")).expect_err("no file");
        assert!(matches!(e, BtfError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
    }
}
