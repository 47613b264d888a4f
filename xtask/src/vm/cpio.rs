//! A newc cpio archive (the initramfs format), written in memory.

use std::{collections::BTreeSet, fs, os::unix::fs::PermissionsExt as _, path::Path};

use anyhow::{Context as _, Result};

/// A newc cpio archive being written in memory.
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    seen: BTreeSet<String>,
}

impl Cpio {
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            ino: 1,
            seen: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// A directory and its parents, once each.
    pub fn dir(&mut self, path: &str) {
        let mut cur = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            cur.push('/');
            cur.push_str(part);
            if self.seen.insert(cur.clone()) {
                let c = cur.clone();
                self.entry(&c, 0o040755, &[]);
            }
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        if self.seen.insert(path.to_string()) {
            self.entry(path, 0o100000 | mode, data);
        }
    }

    pub fn host_file(&mut self, path: &str, host: &Path) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        self.file(path, mode, &data);
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        if self.seen.insert(path.to_string()) {
            self.entry(path, 0o120777, target.as_bytes());
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, data) of each entry of a newc archive.
    fn entries(buf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let field = |at: usize, i: usize| {
            let h = std::str::from_utf8(&buf[at + 6 + i * 8..at + 14 + i * 8]).expect("ascii");
            usize::from_str_radix(h, 16).expect("hex")
        };
        let align = |n: usize| n.div_ceil(4) * 4;
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            assert_eq!(&buf[at..at + 6], b"070701", "magic at {at}");
            let (mode, size, namesize) = (field(at, 1), field(at, 6), field(at, 11));
            let name =
                String::from_utf8(buf[at + 110..at + 110 + namesize - 1].to_vec()).expect("name");
            let data_at = align(at + 110 + namesize);
            out.push((name, mode as u32, buf[data_at..data_at + size].to_vec()));
            at = align(data_at + size);
        }
        out
    }

    #[test]
    fn newc_entries_parents_once_and_a_trailer() {
        let mut c = Cpio::new();
        c.file("/etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n");
        c.file("/etc/group", 0o600, b"root:x:0:\n");
        c.symlink("/bin/sh", "busybox");
        c.file("/etc/passwd", 0o644, b"ignored: each path once");
        let buf = c.finish();
        assert!(buf.len().is_multiple_of(4));
        let e = entries(&buf);
        let names: Vec<&str> = e.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc",
                "etc/passwd",
                "etc/group",
                "bin",
                "bin/sh",
                "TRAILER!!!"
            ]
        );
        assert_eq!(e[0].1, 0o040755);
        assert_eq!(e[1].1, 0o100644);
        assert_eq!(e[1].2, b"root:x:0:0::/root:/bin/sh\n");
        assert_eq!(e[2].1, 0o100600);
        assert_eq!((e[4].1, e[4].2.as_slice()), (0o120777, &b"busybox"[..]));
    }
}
