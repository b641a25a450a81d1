//! `unpack` on tars *built* from the input, so every entry gets past the
//! header checksum: names such as `../x`, `/abs`, `a/b`, `l/x` through a
//! symlink, symlinks and hardlinks aimed inside and outside (including the
//! absolute path of the harness's sentinel), whiteouts, opaque markers,
//! fifos, devices, GNU sparse entries, PAX headers (path/linkpath/xattrs).
//! Same invariants as `unpack` (see `common/unpack_harness.rs`).
#![no_main]
#[path = "../common/unpack_harness.rs"]
mod harness;
use libfuzzer_sys::fuzz_target;
use tar::{EntryType, Header};

struct In<'a>(&'a [u8]);
impl In<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn pick<'t>(&mut self, t: &[&'t str]) -> &'t str {
        t[self.byte() as usize % t.len()]
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.byte() as usize % (max + 1)).min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
}

const PIECES: &[&str] = &[
    "a", "b", "l", "d", "f", "..", ".", "outside", ".wh.a", ".wh.l", ".wh..wh..opq", ".wh..",
    ".wh.", "a/b", "l/f", "x",
];

fn name(i: &mut In) -> String {
    let mut s = match i.byte() % 4 {
        0 => String::from("/"),
        1 => String::from("./"),
        _ => String::new(),
    };
    let n = 1 + i.byte() % 3;
    for k in 0..n {
        if k > 0 {
            s.push('/');
        }
        s.push_str(i.pick(PIECES));
    }
    if i.byte() % 5 == 0 {
        s.push('/');
    }
    s
}

fn target(i: &mut In, abs_outside: &str) -> String {
    match i.byte() % 20 {
        0 => abs_outside.to_string(),
        1 => format!("{abs_outside}/f"),
        2 => "../outside".into(),
        3 => "../outside/f".into(),
        4 => "../../outside/f".into(),
        5 => "/".into(),
        6 => "..".into(),
        7 => "/etc/passwd".into(),
        8 => String::new(),
        9 => "outside/f".into(),
        _ => name(i),
    }
}

fn put(field: &mut [u8; 100], s: &[u8]) {
    let n = s.len().min(100);
    field[..n].copy_from_slice(&s[..n]);
}

fn pad(out: &mut Vec<u8>) {
    while out.len() % 512 != 0 {
        out.push(0);
    }
}

fn pax(out: &mut Vec<u8>, recs: &[(String, Vec<u8>)]) {
    let mut body = Vec::new();
    for (k, v) in recs {
        let rest = k.len() + v.len() + 3; // ' ' '=' '\n'
        let mut len = rest + 1;
        while len.to_string().len() + rest != len {
            len += 1;
        }
        body.extend_from_slice(len.to_string().as_bytes());
        body.push(b' ');
        body.extend_from_slice(k.as_bytes());
        body.push(b'=');
        body.extend_from_slice(v);
        body.push(b'\n');
    }
    let mut h = Header::new_ustar();
    put(&mut h.as_old_mut().name, b"PaxHeaders/x");
    h.set_entry_type(EntryType::XHeader);
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&body);
    pad(out);
}

fn build(i: &mut In) -> Vec<u8> {
    let abs_outside = harness::outside_path_hint().display().to_string();
    let mut out = Vec::new();
    let mut count = 0;
    while !i.0.is_empty() && count < 32 {
        count += 1;
        let op = i.byte() % 13;
        let mut h = Header::new_gnu();
        let nm = if op == 10 { i.bytes(100) } else { name(i).into_bytes() };
        put(&mut h.as_old_mut().name, &nm);
        let mode = match i.byte() % 8 {
            0 => 0o755,
            1 => 0o644,
            2 => 0o000,
            3 => 0o4755,
            4 => 0o1777,
            5 => 0o777,
            _ => u32::from(i.byte()) * 8 + 5,
        };
        h.set_mode(mode);
        h.set_uid(u64::from(i.byte() % 3) * 1000);
        h.set_gid(u64::from(i.byte() % 3) * 1000);
        h.set_mtime(u64::from(i.byte()) * 1_000_000);
        let mut data: Vec<u8> = Vec::new();
        match op {
            0 | 11 => h.set_entry_type(EntryType::Directory),
            1 | 10 => {
                h.set_entry_type(EntryType::Regular);
                data = i.bytes(64);
            }
            2 => {
                h.set_entry_type(EntryType::Symlink);
                let t = target(i, &abs_outside);
                put(&mut h.as_old_mut().linkname, t.as_bytes());
            }
            3 => {
                h.set_entry_type(EntryType::Link);
                let t = target(i, &abs_outside);
                put(&mut h.as_old_mut().linkname, t.as_bytes());
            }
            4 => h.set_entry_type(EntryType::Fifo),
            5 => h.set_entry_type(if i.byte() & 1 == 0 { EntryType::Char } else { EntryType::Block }),
            6 => {
                // GNU sparse: one data block after a hole.
                h.set_entry_type(EntryType::GNUSparse);
                let hole = u64::from(i.byte()) << (i.byte() % 13);
                data = i.bytes(64);
                let len = data.len() as u64;
                let g = h.as_gnu_mut().expect("gnu header");
                g.sparse[0].set_offset(hole);
                g.sparse[0].set_length(len);
                g.set_real_size(hole + len);
            }
            7 => {
                // PAX attributes for the next entry.
                let mut recs = Vec::new();
                for _ in 0..(1 + i.byte() % 3) {
                    let (k, v): (String, Vec<u8>) = match i.byte() % 8 {
                        0 => ("path".into(), target(i, &abs_outside).into_bytes()),
                        1 => ("linkpath".into(), target(i, &abs_outside).into_bytes()),
                        2 => ("SCHILY.xattr.user.x".into(), i.bytes(16)),
                        3 => ("SCHILY.xattr.trusted.overlay.opaque".into(), b"y".to_vec()),
                        4 => ("SCHILY.xattr.security.capability".into(), i.bytes(20)),
                        5 => ("uid".into(), b"4294967296".to_vec()),
                        6 => ("mtime".into(), b"-1.5".to_vec()),
                        _ => ("SCHILY.xattr.trusted.overlay.redirect".into(), b"/etc".to_vec()),
                    };
                    recs.push((k, v));
                }
                pax(&mut out, &recs);
                continue;
            }
            8 => {
                // Whiteout or opaque marker under a generated directory.
                let dir = name(i);
                let leaf = if i.byte() & 1 == 0 { ".wh..wh..opq" } else { ".wh.a" };
                let full = format!("{}/{leaf}", dir.trim_end_matches('/'));
                h.as_old_mut().name = [0; 100];
                put(&mut h.as_old_mut().name, full.as_bytes());
                h.set_entry_type(EntryType::Regular);
            }
            9 => {
                h.set_entry_type(EntryType::Regular);
                data = b"hello".to_vec();
            }
            _ => {
                h.set_entry_type(EntryType::new(i.byte()));
                data = i.bytes(8);
            }
        }
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&data);
        pad(&mut out);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

/// `EMBER_FUZZ_DUMP_TARS=<dir>`: also write each generated tar there (to
/// seed the raw `unpack` target with valid archives).
fn dump(tar: &[u8]) {
    use std::hash::{DefaultHasher, Hash, Hasher};
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    if let Some(d) = DIR.get_or_init(|| std::env::var_os("EMBER_FUZZ_DUMP_TARS").map(Into::into)) {
        let mut h = DefaultHasher::new();
        tar.hash(&mut h);
        let _ = std::fs::write(d.join(format!("{:016x}.tar", h.finish())), tar);
    }
}

fuzz_target!(|data: &[u8]| {
    let tar = build(&mut In(data));
    dump(&tar);
    harness::run(&tar);
});
