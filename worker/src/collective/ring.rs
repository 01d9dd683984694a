//! TCP ring all-reduce for CPU ranks, in the shape of Gloo's ring: reduce-scatter then all-gather
//! over `world` chunks, each chunk streamed in segments so that sending, receiving and adding overlap.
//!
//! Every rank accepts one connection from its left neighbour and opens one to its right neighbour.
//! Chunk `c` is summed in ring order starting at rank `c` and finished by exactly one rank, which
//! then broadcasts it: every rank ends with bit-identical bytes. Every socket operation has a
//! deadline, so a dead or hung peer becomes an [`Error::Collective`] naming it, never a hang.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::Collective;
use crate::{Error, Result};

/// First eight bytes of every handshake.
const MAGIC: u64 = u64::from_le_bytes(*b"ENDOFMRG");
/// Bytes of a handshake: magic, generation, rank, world.
const HELLO_LEN: usize = 24;
/// Bytes of the header that opens every all-reduce: call number and element count.
const CALL_HEADER_LEN: usize = 16;
/// Pause between connection attempts while the right neighbour is not listening yet.
const CONNECT_RETRY: Duration = Duration::from_millis(10);
/// Pause between polls of the listener while the left neighbour has not connected yet.
const ACCEPT_POLL: Duration = Duration::from_millis(2);

/// Who this rank is in which attempt, and how long any operation may take.
#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    /// This rank, in `0..world`.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// The attempt (generation or session id); ranks of another attempt are refused.
    pub generation: u64,
    /// Longest time connecting may take, and longest wait for any single socket read or write.
    pub deadline: Duration,
    /// Bytes per pipelined segment of a chunk.
    pub segment_bytes: usize,
}

impl RingConfig {
    /// A configuration with 1 MiB segments.
    pub fn new(rank: usize, world: usize, generation: u64, deadline: Duration) -> Self {
        Self {
            rank,
            world,
            generation,
            deadline,
            segment_bytes: 1 << 20,
        }
    }
}

/// A segment's id and elements, on their way to or back from the sending thread.
type Segment<'a> = (usize, &'a mut [f32]);

/// The handshake each side of a link sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hello {
    generation: u64,
    rank: u64,
    world: u64,
}

impl Hello {
    fn encode(self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[..8].copy_from_slice(&MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&self.generation.to_le_bytes());
        out[16..20].copy_from_slice(&(self.rank as u32).to_le_bytes());
        out[20..24].copy_from_slice(&(self.world as u32).to_le_bytes());
        out
    }

    /// `None` when the bytes are not an endofm ring handshake.
    fn decode(bytes: &[u8; HELLO_LEN]) -> Option<Self> {
        let u64_at = |i: usize| {
            u64::from_le_bytes([
                bytes[i],
                bytes[i + 1],
                bytes[i + 2],
                bytes[i + 3],
                bytes[i + 4],
                bytes[i + 5],
                bytes[i + 6],
                bytes[i + 7],
            ])
        };
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        (u64_at(0) == MAGIC).then(|| Self {
            generation: u64_at(8),
            rank: u64::from(u32_at(16)),
            world: u64::from(u32_at(20)),
        })
    }

    /// Why `self` (what a peer sent) is not `expected`, or `None` when it is.
    fn mismatch(self, expected: Self) -> Option<String> {
        if self.generation != expected.generation {
            Some(format!(
                "peer belongs to attempt {}, this rank to attempt {}",
                self.generation, expected.generation
            ))
        } else if self.world != expected.world {
            Some(format!(
                "peer has world size {}, this rank {}",
                self.world, expected.world
            ))
        } else if self.rank != expected.rank {
            Some(format!(
                "peer says it is rank {}, expected rank {}",
                self.rank, expected.rank
            ))
        } else {
            None
        }
    }
}

/// The two connections of a rank in a ring of at least two.
#[derive(Debug)]
struct Links {
    /// From the left neighbour (rank - 1): this rank only reads.
    left: TcpStream,
    /// To the right neighbour (rank + 1): this rank only writes.
    right: TcpStream,
}

/// One rank of a TCP ring; see the module documentation.
#[derive(Debug)]
pub struct RingCollective {
    cfg: RingConfig,
    peers: Vec<SocketAddr>,
    /// `None` in a world of one.
    links: Option<Links>,
    /// All-reduces done so far; checked against the left neighbour at every call.
    calls: u64,
    /// Receive buffer of one segment for the reduce-scatter, kept across calls.
    scratch: Vec<f32>,
    /// Why the ring broke, once it has: later calls fail at once.
    broken: Option<String>,
}

impl RingCollective {
    /// Joins the ring: accepts the left neighbour on `listener` (whose address is
    /// `peers[cfg.rank]`) and connects to the right neighbour at `peers[rank + 1]`, retrying until
    /// `cfg.deadline`. Both sides check the other's handshake (attempt, world size, rank).
    pub fn connect(cfg: RingConfig, peers: &[SocketAddr], listener: TcpListener) -> Result<Self> {
        let RingConfig { rank, world, .. } = cfg;
        if world == 0 || rank >= world || peers.len() != world || cfg.segment_bytes < 4 {
            return Err(Error::Input {
                name: "ring".into(),
                reason: format!(
                    "rank {rank} of world {world} with {} peer addresses and {}-byte segments: need rank < world = number of addresses and segments of at least 4 bytes",
                    peers.len(),
                    cfg.segment_bytes
                ),
            });
        }
        let mut ring = Self {
            cfg,
            peers: peers.to_vec(),
            links: None,
            calls: 0,
            scratch: Vec::new(),
            broken: None,
        };
        if world == 1 {
            return Ok(ring);
        }
        let end = Instant::now() + cfg.deadline;
        let me = Hello {
            generation: cfg.generation,
            rank: rank as u64,
            world: world as u64,
        };
        let (left_rank, right_rank) = (ring.left_rank(), ring.right_rank());
        let give_up = AtomicBool::new(false);
        let (left, right) = std::thread::scope(|s| {
            let acceptor = s.spawn(|| {
                let expected = Hello {
                    rank: left_rank as u64,
                    ..me
                };
                accept_left(&listener, me, expected, end, &give_up)
                    .map_err(|reason| ring.error(left_rank, reason))
            });
            let expected = Hello {
                rank: right_rank as u64,
                ..me
            };
            let right = connect_right(peers[right_rank], me, expected, end)
                .map_err(|reason| ring.error(right_rank, reason));
            if right.is_err() {
                give_up.store(true, Ordering::Relaxed);
            }
            let left = acceptor
                .join()
                .unwrap_or_else(|_| Err(ring.error(left_rank, "accepting thread panicked".into())));
            (left, right)
        });
        let right = right?;
        let left = left?;
        for stream in [&left, &right] {
            let configured = stream
                .set_nodelay(true)
                .and_then(|()| stream.set_read_timeout(Some(cfg.deadline)))
                .and_then(|()| stream.set_write_timeout(Some(cfg.deadline)));
            if let Err(e) = configured {
                return Err(ring.error(right_rank, format!("configuring the socket: {e}")));
            }
        }
        ring.links = Some(Links { left, right });
        Ok(ring)
    }

    fn left_rank(&self) -> usize {
        (self.cfg.rank + self.cfg.world - 1) % self.cfg.world
    }

    fn right_rank(&self) -> usize {
        (self.cfg.rank + 1) % self.cfg.world
    }

    fn error(&self, peer: usize, reason: String) -> Error {
        Error::Collective {
            peer,
            addr: self.peers[peer],
            reason,
        }
    }

    /// The ring algorithm on `data`, which is this rank's buffer in place.
    ///
    /// `data` is cut into segments whose `&mut` borrows travel between this thread and the
    /// sending thread: a segment being sent is never written here, and is written (in the
    /// all-gather) only after the sender has handed it back. Segments are sent straight from
    /// `data` and the all-gather receives straight into it; only the reduce-scatter reads into
    /// `self.scratch`, a buffer kept across calls.
    fn ring_sum(&mut self, data: &mut [f32]) -> Result<()> {
        let Some(links) = &self.links else {
            return Ok(());
        };
        let (w, r) = (self.cfg.world, self.cfg.rank);
        let n = data.len();
        let seg = (self.cfg.segment_bytes / 4).max(1);
        let chunk = |c: usize| (c * n / w)..((c + 1) * n / w);
        let (left_rank, right_rank) = (self.left_rank(), self.right_rank());
        let deadline = self.cfg.deadline;
        self.calls += 1;
        let calls = self.calls;
        let mut header = [0u8; CALL_HEADER_LEN];
        header[..8].copy_from_slice(&calls.to_le_bytes());
        header[8..].copy_from_slice(&(n as u64).to_le_bytes());

        // Segment ids run chunk by chunk; `first[c]` is the first id of chunk c.
        let mut first = Vec::with_capacity(w + 1);
        let mut slots: Vec<Option<&mut [f32]>> = Vec::new();
        let mut rest = data;
        for c in 0..w {
            first.push(slots.len());
            for part in segments(chunk(c), seg) {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(part.len());
                slots.push(Some(head));
                rest = tail;
            }
        }
        first.push(slots.len());
        let ids = |c: usize| first[c]..first[c + 1];
        if self.scratch.len() < seg.min(n) {
            self.scratch.resize(seg.min(n), 0.0);
        }
        let scratch = &mut self.scratch;

        // The first failure wins; it closes both links so that the other side of this rank and
        // both neighbours stop waiting at once instead of at the deadline.
        let first_error: Mutex<Option<(usize, String)>> = Mutex::new(None);
        let fail = |peer: usize, reason: String| {
            let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some((peer, reason));
                let _ = links.left.shutdown(Shutdown::Both);
                let _ = links.right.shutdown(Shutdown::Both);
            }
        };
        let (to_send, outbox) = mpsc::channel::<Segment<'_>>();
        let (give_back, returned) = mpsc::channel::<Segment<'_>>();
        std::thread::scope(|s| {
            s.spawn(|| {
                let give_back = give_back;
                let mut right = &links.right;
                if let Err(e) = right.write_all(&header) {
                    fail(right_rank, io_reason("sending to", &e, deadline));
                    return;
                }
                for (id, values) in outbox {
                    if let Err(e) = right.write_all(host::bytes(values)) {
                        fail(right_rank, io_reason("sending to", &e, deadline));
                        return;
                    }
                    let _ = give_back.send((id, values));
                }
            });
            let received = (|| -> std::result::Result<(), String> {
                for id in ids(r) {
                    send(&mut slots, id, &to_send);
                }
                let mut left = &links.left;
                let mut theirs = [0u8; CALL_HEADER_LEN];
                left.read_exact(&mut theirs)
                    .map_err(|e| io_reason("receiving from", &e, deadline))?;
                if theirs != header {
                    let call = u64::from_le_bytes(header_word(&theirs, 0));
                    let len = u64::from_le_bytes(header_word(&theirs, 8));
                    return Err(format!(
                        "out of step: peer is at all-reduce {call} of {len} elements, this rank at all-reduce {calls} of {n}"
                    ));
                }
                // Reduce-scatter: add the left neighbour's partial sum of one chunk and pass it on.
                // The last step finishes chunk r + 1, whose sends open the all-gather.
                for step in 0..w - 1 {
                    for id in ids((r + 2 * w - step - 1) % w) {
                        let values = take(&mut slots, id, &returned)?;
                        let theirs = &mut scratch[..values.len()];
                        left.read_exact(host::bytes_mut(theirs))
                            .map_err(|e| io_reason("receiving from", &e, deadline))?;
                        add(values, theirs);
                        slots[id] = Some(values);
                        send(&mut slots, id, &to_send);
                    }
                }
                // All-gather: take each finished chunk and pass it on until it has gone round.
                for step in 0..w - 1 {
                    for id in ids((r + w - step) % w) {
                        let values = take(&mut slots, id, &returned)?;
                        left.read_exact(host::bytes_mut(values))
                            .map_err(|e| io_reason("receiving from", &e, deadline))?;
                        slots[id] = Some(values);
                        if step + 2 < w {
                            send(&mut slots, id, &to_send);
                        }
                    }
                }
                Ok(())
            })();
            drop(to_send);
            if let Err(reason) = received {
                fail(left_rank, reason);
            }
        });
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some((peer, reason)) => Err(self.error(peer, reason)),
            None => Ok(()),
        }
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.cfg.rank
    }

    fn world_size(&self) -> usize {
        self.cfg.world
    }

    fn all_reduce_sum(&mut self, buffer: &mut Tensor) -> Result<()> {
        super::check_float32(buffer)?;
        if buffer.device() != Device::Cpu {
            return Err(Error::Input {
                name: "all-reduce buffer".into(),
                reason: format!(
                    "on {:?}: the TCP ring reduces CPU tensors only",
                    buffer.device()
                ),
            });
        }
        if let Some(reason) = &self.broken {
            return Err(self.error(
                self.left_rank(),
                format!("the ring broke earlier ({reason}); join a new attempt"),
            ));
        }
        if self.links.is_none() {
            return Ok(());
        }
        // Reduce in the tensor's own memory when it allows; otherwise in a contiguous copy.
        let direct = buffer.is_contiguous() && !buffer.requires_grad();
        let summed = if direct {
            match host::floats_mut(buffer) {
                Some(data) => self.ring_sum(data),
                None => Err(unaddressable()),
            }
        } else {
            let mut work = Tensor::f_empty(buffer.size(), (Kind::Float, Device::Cpu))?;
            work.f_copy_(buffer)?;
            let summed = match host::floats_mut(&mut work) {
                Some(data) => self.ring_sum(data),
                None => Err(unaddressable()),
            };
            if summed.is_ok() {
                buffer.f_copy_(&work)?;
            }
            summed
        };
        if let Err(e) = summed {
            self.broken = Some(e.to_string());
            return Err(e);
        }
        Ok(())
    }
}

/// Accepts connections until one carries the `expected` handshake; replies with `me` to every
/// handshake so that a refused peer learns why.
fn accept_left(
    listener: &TcpListener,
    me: Hello,
    expected: Hello,
    end: Instant,
    give_up: &AtomicBool,
) -> std::result::Result<TcpStream, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let mut refused = String::new();
    loop {
        match listener.accept() {
            Ok((mut stream, from)) => {
                let remaining = end.saturating_duration_since(Instant::now());
                let mut hello = [0u8; HELLO_LEN];
                let read = stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(remaining.max(ACCEPT_POLL))))
                    .and_then(|()| stream.set_write_timeout(Some(remaining.max(ACCEPT_POLL))))
                    .and_then(|()| stream.read_exact(&mut hello));
                match read.map(|()| Hello::decode(&hello)) {
                    Ok(Some(theirs)) => {
                        let _ = stream.write_all(&me.encode());
                        match theirs.mismatch(expected) {
                            None => return Ok(stream),
                            Some(why) => refused = format!("; refused {from}: {why}"),
                        }
                    }
                    Ok(None) => refused = format!("; refused {from}: not an endofm ring handshake"),
                    Err(e) => refused = format!("; refused {from}: {e}"),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("accepting: {e}")),
        }
        if give_up.load(Ordering::Relaxed) {
            return Err(format!(
                "stopped waiting for the left neighbour: the right one failed{refused}"
            ));
        }
        if Instant::now() >= end {
            return Err(format!("no valid connection before the deadline{refused}"));
        }
        std::thread::sleep(ACCEPT_POLL);
    }
}

/// Connects to the right neighbour, retrying while it does not listen yet, and checks its reply.
fn connect_right(
    addr: SocketAddr,
    me: Hello,
    expected: Hello,
    end: Instant,
) -> std::result::Result<TcpStream, String> {
    loop {
        let remaining = end.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err("could not connect before the deadline".into());
        }
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, remaining) else {
            std::thread::sleep(CONNECT_RETRY);
            continue;
        };
        let mut reply = [0u8; HELLO_LEN];
        stream
            .set_read_timeout(Some(remaining))
            .and_then(|()| stream.set_write_timeout(Some(remaining)))
            .and_then(|()| stream.write_all(&me.encode()))
            .and_then(|()| stream.read_exact(&mut reply))
            .map_err(|e| format!("handshake failed: {e}"))?;
        let theirs = Hello::decode(&reply).ok_or("handshake refused: not an endofm ring rank")?;
        return match theirs.mismatch(expected) {
            None => Ok(stream),
            Some(why) => Err(format!("handshake refused: {why}")),
        };
    }
}

/// `range` cut into pieces of at most `len` elements.
fn segments(range: Range<usize>, len: usize) -> impl Iterator<Item = Range<usize>> {
    let end = range.end;
    range
        .step_by(len)
        .map(move |start| start..(start + len).min(end))
}

/// Hands segment `id` to the sending thread.
fn send<'a>(slots: &mut [Option<&'a mut [f32]>], id: usize, to_send: &Sender<Segment<'a>>) {
    if let Some(values) = slots[id].take() {
        let _ = to_send.send((id, values));
    }
}

/// Segment `id`, waiting for the sending thread to hand it back if it has it.
fn take<'a>(
    slots: &mut [Option<&'a mut [f32]>],
    id: usize,
    returned: &Receiver<Segment<'a>>,
) -> std::result::Result<&'a mut [f32], String> {
    loop {
        if let Some(values) = slots[id].take() {
            return Ok(values);
        }
        match returned.recv() {
            Ok((back, values)) => slots[back] = Some(values),
            Err(_) => return Err("the sending thread stopped".into()),
        }
    }
}

fn unaddressable() -> Error {
    Error::Input {
        name: "all-reduce buffer".into(),
        reason: "its memory is not addressable as f32".into(),
    }
}

/// `mine[i] += theirs[i]`: the partial sum so far plus the left neighbour's.
fn add(mine: &mut [f32], theirs: &[f32]) {
    for (x, y) in mine.iter_mut().zip(theirs) {
        *x += *y;
    }
}

#[allow(unsafe_code)]
mod host {
    //! Views of host memory as the wire format (little-endian f32) and of a CPU float tensor's
    //! storage as a slice, so that the ring neither copies nor allocates per call.
    use tch::{Device, Kind, Tensor};

    #[cfg(not(target_endian = "little"))]
    compile_error!("the ring's wire format is little-endian f32, sent straight from memory");

    /// The bytes of `values` (little-endian, see the check above).
    pub fn bytes(values: &[f32]) -> &[u8] {
        // SAFETY: the pointer and length cover exactly the memory of `values`, which stays
        // borrowed (shared) for the result's lifetime; u8 has alignment 1 and every byte of an
        // f32 is initialised.
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), size_of_val(values)) }
    }

    /// The bytes of `values`, writable.
    pub fn bytes_mut(values: &mut [f32]) -> &mut [u8] {
        // SAFETY: as in `bytes`, with the exclusive borrow of `values` carried over to the
        // result; any bit pattern written is a valid f32.
        unsafe {
            std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), size_of_val(values))
        }
    }

    /// The elements of `tensor`, which must be a contiguous float32 CPU tensor; `None` otherwise
    /// or when its data pointer is unusable.
    pub fn floats_mut(tensor: &mut Tensor) -> Option<&mut [f32]> {
        if tensor.kind() != Kind::Float || tensor.device() != Device::Cpu || !tensor.is_contiguous()
        {
            return None;
        }
        let n = tensor.numel();
        if n == 0 {
            return Some(&mut []);
        }
        let ptr = tensor.data_ptr().cast::<f32>();
        if ptr.is_null() || !ptr.is_aligned() {
            return None;
        }
        // SAFETY: a contiguous float32 CPU tensor with n elements has n initialised f32 at
        // `data_ptr()` (which includes the storage offset), and the storage lives as long as the
        // tensor, which stays exclusively borrowed for the slice's lifetime. This handle is
        // borrowed mutably; other handles sharing the storage are not used while the slice
        // lives (the all-reduce owns its buffer for the call, as an in-place op would).
        Some(unsafe { std::slice::from_raw_parts_mut(ptr, n) })
    }
}

fn header_word(header: &[u8; CALL_HEADER_LEN], at: usize) -> [u8; 8] {
    let mut word = [0u8; 8];
    word.copy_from_slice(&header[at..at + 8]);
    word
}

/// A socket error in words a person can act on.
fn io_reason(action: &str, e: &std::io::Error, deadline: Duration) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("{action} the peer: no progress for {deadline:?} (peer hung or too slow)")
        }
        ErrorKind::UnexpectedEof => format!("{action} the peer: connection closed (peer exited)"),
        _ => format!("{action} the peer: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn listeners(world: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
        let listeners: Vec<TcpListener> = (0..world)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let addrs = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr"))
            .collect();
        (listeners, addrs)
    }

    /// Runs `rank(r, listener, addrs)` for every rank of a world on its own thread (each with
    /// a bound loopback listener and every rank's address); returns the results in rank order.
    fn on_ranks<T: Send>(
        world: usize,
        rank: impl Fn(usize, TcpListener, &[SocketAddr]) -> T + Sync,
    ) -> Vec<T> {
        let (listeners, addrs) = listeners(world);
        std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(r, listener)| {
                    let (addrs, rank) = (&addrs, &rank);
                    s.spawn(move || rank(r, listener, addrs))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect()
        })
    }

    /// Runs one ring on threads; `inputs[r]` is rank r's buffer; returns every rank's result.
    fn ring_sum(inputs: &[Vec<f32>], segment_bytes: usize) -> Vec<Vec<f32>> {
        let world = inputs.len();
        on_ranks(world, |rank, listener, addrs| {
            let cfg = RingConfig {
                segment_bytes,
                ..RingConfig::new(rank, world, 7, Duration::from_secs(10))
            };
            let mut ring = RingCollective::connect(cfg, addrs, listener).expect("connect");
            let mut out = Vec::new();
            // Twice, so that the call counter and buffer reuse are exercised.
            for _ in 0..2 {
                let mut t = Tensor::from_slice(&inputs[rank]);
                ring.all_reduce_sum(&mut t).expect("all-reduce");
                out = Vec::<f32>::try_from(&t).expect("to vec");
            }
            out
        })
    }

    fn check(world: usize, len: usize, integers: bool, segment_bytes: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64((world * 1000 + len) as u64);
        let inputs: Vec<Vec<f32>> = (0..world)
            .map(|_| {
                (0..len)
                    .map(|_| {
                        if integers {
                            rng.random_range(-1000i32..1000) as f32
                        } else {
                            rng.random_range(-1.0f32..1.0)
                        }
                    })
                    .collect()
            })
            .collect();
        let expected: Vec<f64> = (0..len)
            .map(|i| inputs.iter().map(|v| f64::from(v[i])).sum::<f64>())
            .collect();
        let results = ring_sum(&inputs, segment_bytes);
        let worst = results[0]
            .iter()
            .zip(&expected)
            .map(|(&got, &want)| (f64::from(got) - want).abs())
            .fold(0.0f64, f64::max);
        let tolerance = if integers { 0.0 } else { 1e-4 };
        assert!(
            worst <= tolerance,
            "world {world}, {len} elements: worst error {worst}"
        );
        for (rank, result) in results.iter().enumerate() {
            let same = result
                .iter()
                .zip(&results[0])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "world {world}: rank {rank} differs from rank 0");
        }
    }

    #[test]
    fn sums_are_exact_and_bit_identical() {
        for world in [2, 3, 4] {
            for len in [1, 2, 3, 5, 1001, 4099] {
                check(world, len, true, 64);
                check(world, len, false, 64);
            }
        }
        check(3, 100_003, false, 1 << 20);
    }

    /// A strided buffer (a transposed view) is summed through a contiguous copy and written back.
    #[test]
    fn strided_buffers_are_summed_in_place() {
        let results = on_ranks(2, |rank, listener, addrs| {
            let cfg = RingConfig {
                segment_bytes: 16,
                ..RingConfig::new(rank, 2, 5, Duration::from_secs(10))
            };
            let mut ring = RingCollective::connect(cfg, addrs, listener).expect("connect");
            let base = Tensor::arange(12, (Kind::Float, Device::Cpu))
                .f_add_scalar(rank as f64 * 100.0)
                .expect("add")
                .reshape([3, 4]);
            let mut t = base.tr();
            assert!(!t.is_contiguous());
            ring.all_reduce_sum(&mut t).expect("all-reduce");
            Vec::<f32>::try_from(&t.contiguous().reshape([-1])).expect("to vec")
        });
        let expected: Vec<f32> = (0..4)
            .flat_map(|c| (0..3).map(move |r| (2 * (r * 4 + c) + 100) as f32))
            .collect();
        assert_eq!(results[0], expected);
        assert_eq!(results[1], expected);
    }

    #[test]
    fn a_world_of_one_is_the_identity() {
        let (mut listeners, addrs) = listeners(1);
        let cfg = RingConfig::new(0, 1, 1, Duration::from_secs(1));
        let mut ring = RingCollective::connect(cfg, &addrs, listeners.remove(0)).expect("connect");
        let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
        ring.all_reduce_sum(&mut t).expect("all-reduce");
        assert_eq!(Vec::<f32>::try_from(&t).expect("vec"), vec![1.0, 2.0]);
    }

    #[test]
    fn other_dtypes_are_refused() {
        let (mut listeners, addrs) = listeners(1);
        let cfg = RingConfig::new(0, 1, 1, Duration::from_secs(1));
        let mut ring = RingCollective::connect(cfg, &addrs, listeners.remove(0)).expect("connect");
        let mut t = Tensor::from_slice(&[1.0f64]);
        assert!(matches!(
            ring.all_reduce_sum(&mut t),
            Err(Error::DType { .. })
        ));
    }

    #[test]
    fn another_attempt_is_refused() {
        let started = Instant::now();
        let results = on_ranks(2, |rank, listener, addrs| {
            // Rank 1 belongs to the next attempt.
            let cfg = RingConfig::new(rank, 2, 40 + rank as u64, Duration::from_secs(5));
            RingCollective::connect(cfg, addrs, listener)
        });
        for result in results {
            let err = result.expect_err("a ring across attempts must not form");
            assert!(err.to_string().contains("attempt"), "{err}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "refusal took too long"
        );
    }

    /// Rank 1 of a ring of two stops taking part; rank 0 must fail within about the deadline.
    fn peer_failure(drop_peer: bool) {
        let deadline = Duration::from_millis(300);
        let mut results = on_ranks(2, |rank, listener, addrs| {
            let cfg = RingConfig::new(rank, 2, 3, deadline);
            let mut ring = RingCollective::connect(cfg, addrs, listener).expect("connect");
            let mut t = Tensor::ones([1000], (Kind::Float, Device::Cpu));
            ring.all_reduce_sum(&mut t).expect("first all-reduce");
            if rank == 1 {
                if drop_peer {
                    drop(ring);
                } else {
                    std::thread::sleep(deadline * 5);
                }
                return None;
            }
            let started = Instant::now();
            let result = ring.all_reduce_sum(&mut t);
            Some((result, started.elapsed()))
        });
        let (result, took) = results.remove(0).expect("rank 0 reports");
        let err = result.expect_err("the all-reduce must fail");
        assert!(
            matches!(err, Error::Collective { peer: 1, .. }),
            "unexpected error: {err}"
        );
        assert!(took < deadline * 3, "took {took:?}: {err}");
    }

    #[test]
    fn a_dead_peer_is_an_error() {
        peer_failure(true);
    }

    #[test]
    fn a_hung_peer_is_an_error_within_the_deadline() {
        peer_failure(false);
    }
}
