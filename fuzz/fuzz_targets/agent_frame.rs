//! The exec agent's framing: `read_frame` and `decode_frame` on arbitrary
//! bytes. No panic; no single allocation beyond the 1 MiB frame limit plus
//! something proportional to the input (a length prefix must be checked
//! before it is used to allocate); both decoders agree; a decoded frame
//! re-encodes and decodes to itself.
#![no_main]
use ember_agent_proto::{Frame, MAX_PAYLOAD, ProtoError, decode_frame, encode_frame, read_frame};
use libfuzzer_sys::fuzz_target;
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Records the largest single allocation since the last reset.
struct Peak;
static PEAK: AtomicUsize = AtomicUsize::new(0);
unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        PEAK.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        PEAK.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        PEAK.fetch_max(n, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}
#[global_allocator]
static A: Peak = Peak;

/// Hands out the input in chunks of a fuzzed size, sometimes `Interrupted`.
struct Chunky<'a> {
    data: &'a [u8],
    chunk: usize,
    tick: u8,
}
impl Read for Chunky<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tick = self.tick.wrapping_add(1);
        if self.tick % 7 == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = self.chunk.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn roundtrip(f: &Frame) {
    let mut buf = Vec::new();
    if encode_frame(&mut buf, f).is_ok() {
        let (g, used) = decode_frame(&buf).expect("re-encoded frame decodes").expect("complete");
        assert_eq!(used, buf.len());
        assert_eq!(&g, f);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&c, data)) = data.split_first() else { return };
    let limit = MAX_PAYLOAD + 64 * data.len() + 64 * 1024;
    PEAK.store(0, Ordering::Relaxed);

    // Incremental decoder over the whole buffer.
    let mut from_decode = Vec::new();
    let mut rest = data;
    loop {
        match decode_frame(rest) {
            Ok(Some((f, used))) => {
                assert!(used >= 5 && used <= rest.len());
                rest = &rest[used..];
                from_decode.push(f);
            }
            Ok(None) => break,
            Err(_) => break,
        }
    }
    // Blocking reader over the same bytes, in odd chunks.
    let mut r = Chunky { data, chunk: 1 + (c as usize % 17), tick: c };
    let mut from_read = Vec::new();
    loop {
        match read_frame(&mut r) {
            Ok(f) => from_read.push(f),
            Err(ProtoError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {
                panic!("Interrupted leaked out of read_frame")
            }
            Err(_) => break,
        }
    }
    let peak = PEAK.load(Ordering::Relaxed);
    assert!(peak <= limit, "allocation of {peak} bytes for {} input bytes", data.len());
    assert_eq!(from_decode, from_read, "decode_frame and read_frame disagree");
    for f in &from_decode {
        roundtrip(f);
    }
});
