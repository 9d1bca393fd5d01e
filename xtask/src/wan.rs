//! A userspace WAN link, since this kernel has no netem: a TUN in each of two namespaces and a
//! thread per direction that carries the packets between them with a one-way delay, random
//! loss, an optional rate cap with a drop-tail queue, and optional reordering. It counts what
//! it did and how late it sent, so a run can tell whether the link itself fell behind.
//!
//! Each direction is one thread: it waits (`ppoll`, microsecond timeout) for a packet or for
//! the next departure, reads every packet waiting, gives each its departure time, and writes
//! every packet that is due. The TUNs use offload (virtio-net headers), so one read brings a
//! whole GSO super-packet, which tun-rs splits into the packets a real link would carry (each
//! is lost, delayed or reordered on its own), and the due packets are written as a batch that
//! tun-rs coalesces again where they follow one another: few system calls per packet. Departures: arrival + delay; with a rate cap, serialised one after
//! the other at the rate first (a packet that would wait longer than the queue's length in
//! time is dropped at the tail); a reordered packet leaves `reorder_by` later than its turn.
//! Loss and reordering are drawn from a seeded generator, so a run is repeatable. The threads
//! run at a real-time priority, as netem runs in the kernel before any process.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::time::TimeSpec;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tun_rs::{DeviceBuilder, GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::netns::{Netns, run as sh};

/// How the link treats each direction's packets.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// One-way delay.
    pub delay: Duration,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// Rate cap in bits a second, and the queue in front of it (in time at that rate).
    pub rate: Option<(u64, Duration)>,
    /// Probability that a packet is held back `reorder_by` beyond its turn.
    pub reorder: f64,
    pub reorder_by: Duration,
    /// Seed of the loss and reordering draws.
    pub seed: u64,
}

impl Shape {
    /// A link with `delay` each way and nothing else.
    pub fn delay(delay: Duration) -> Shape {
        Shape {
            delay,
            loss: 0.0,
            rate: None,
            reorder: 0.0,
            reorder_by: Duration::from_millis(1),
            seed: 1,
        }
    }
}

/// What one direction did.
#[derive(Debug, Default)]
pub struct Counts {
    pub forwarded: AtomicU64,
    pub bytes: AtomicU64,
    pub lost: AtomicU64,
    pub queue_drops: AtomicU64,
    pub reordered: AtomicU64,
    pub write_errors: AtomicU64,
    /// Packets sent more than 1 ms after their departure time, and the latest (µs).
    pub late: AtomicU64,
    pub latest_us: AtomicU64,
}

impl Counts {
    /// One line for a log or a table.
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "{} packets ({} MB), lost {}, queue drops {}, reordered {}, write errors {}, \
             over 1 ms late {} (latest {} µs)",
            get(&self.forwarded),
            get(&self.bytes) / 1_000_000,
            get(&self.lost),
            get(&self.queue_drops),
            get(&self.reordered),
            get(&self.write_errors),
            get(&self.late),
            get(&self.latest_us),
        )
    }
}

/// A running link; dropping it stops the threads and the TUNs go with them.
pub struct Wan {
    stop: Arc<AtomicBool>,
    shape: Arc<std::sync::RwLock<Shape>>,
    threads: Vec<JoinHandle<()>>,
    /// A to B, B to A.
    pub counts: [Arc<Counts>; 2],
}

/// The link's devices and addresses: `a` in the first namespace, `b` in the second, a /30.
pub const DEV_A: &str = "pwana";
pub const DEV_B: &str = "pwanb";
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);

impl Wan {
    /// Opens the TUNs (`DEV_A` with `ADDR_A` in `a`, `DEV_B` with `ADDR_B` in `b`) and starts
    /// carrying packets shaped by `shape`, each direction with its own seed. Routes over the
    /// link are the caller's.
    pub fn start(a: &Netns, b: &Netns, shape: Shape) -> Result<Wan> {
        let (dev_a, dev_b) = std::thread::scope(|scope| {
            scope
                .spawn(|| open(a, b))
                .join()
                .map_err(|_| anyhow::anyhow!("the link's set-up thread panicked"))?
        })?;
        let (dev_a, dev_b) = (Arc::new(dev_a), Arc::new(dev_b));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(std::sync::RwLock::new(shape));
        let counts = [Arc::new(Counts::default()), Arc::new(Counts::default())];
        let mut threads = Vec::new();
        for (i, (from, to)) in [
            (Arc::clone(&dev_a), Arc::clone(&dev_b)),
            (Arc::clone(&dev_b), Arc::clone(&dev_a)),
        ]
        .into_iter()
        .enumerate()
        {
            let (stop, counts, shape) = (
                Arc::clone(&stop),
                Arc::clone(&counts[i]),
                Arc::clone(&shared),
            );
            threads.push(
                std::thread::Builder::new()
                    .name(format!("wan-{i}"))
                    .spawn(move || carry(&from, &to, &shape, i as u64, &stop, &counts))?,
            );
        }
        Ok(Wan {
            stop,
            shape: shared,
            threads,
            counts,
        })
    }

    /// Shapes the packets from now on by `shape` (the loss and reordering draws start again
    /// from its seed).
    pub fn set_shape(&self, shape: Shape) {
        if let Ok(mut current) = self.shape.write() {
            *current = shape;
        }
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Opens both TUNs in `a` (this thread enters it), then moves the second into `b`.
fn open(a: &Netns, b: &Netns) -> Result<(SyncDevice, SyncDevice)> {
    crate::netns::enter(a.name())?;
    let build = |name: &str| {
        DeviceBuilder::new()
            .name(name)
            .mtu(1500)
            .offload(true)
            .tx_queue_len(10_000)
            .build_sync()
            .with_context(|| format!("cannot open TUN {name}"))
    };
    let dev_a = build(DEV_A)?;
    let dev_b = build(DEV_B)?;
    // A descriptor keeps working after its device moves to another namespace.
    sh("ip", &["link", "set", DEV_B, "netns", b.name()])?;
    a.ip(&format!("addr add {ADDR_A} peer {ADDR_B} dev {DEV_A}"))?;
    a.ip(&format!("link set {DEV_A} up"))?;
    b.ip(&format!("addr add {ADDR_B} peer {ADDR_A} dev {DEV_B}"))?;
    b.ip(&format!("link set {DEV_B} up"))?;
    for dev in [&dev_a, &dev_b] {
        dev.set_nonblocking(true)?;
    }
    Ok((dev_a, dev_b))
}

/// Gives this thread a real-time priority (`SCHED_FIFO`), as netem runs in the kernel's softirq
/// and so before any process: a link that waits its turn behind the busy endpoints it
/// connects falls behind, and its delay and rate are then the machine's load, not the shape
/// asked for. The thread sleeps in `ppoll` between packets, and the kernel keeps 5% of each
/// second for other tasks whatever real-time threads do. Without the privilege it says so
/// and runs at the normal priority.
fn realtime(direction: u64) {
    let tid = nix::unistd::gettid().to_string();
    let set = std::process::Command::new("chrt")
        .args(["--fifo", "--pid", "10", &tid])
        .stderr(std::process::Stdio::null())
        .status();
    if !set.is_ok_and(|status| status.success()) {
        eprintln!(
            "wan: direction {direction} runs without real-time priority (chrt failed): it may \
             fall behind when the machine is busy"
        );
    }
}

/// A packet waiting for its departure; ordered by departure, then arrival.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Waiting {
    due: Instant,
    seq: u64,
    packet: Vec<u8>,
}

/// Reads of the device between two writes of what is due.
const READS_BEFORE_WRITING: usize = 4;

fn carry(
    from: &SyncDevice,
    to: &SyncDevice,
    shared: &std::sync::RwLock<Shape>,
    direction: u64,
    stop: &AtomicBool,
    c: &Counts,
) {
    const OFFSET: usize = VIRTIO_NET_HDR_LEN;
    realtime(direction);
    let current = |shared: &std::sync::RwLock<Shape>| shared.read().map(|s| *s).ok();
    let Some(mut shape) = current(shared) else {
        return;
    };
    let mut rng = SmallRng::seed_from_u64(shape.seed.wrapping_add(direction));
    let mut waiting: BinaryHeap<Reverse<Waiting>> = BinaryHeap::new();
    // When the rate-capped line is free again.
    let mut line_free = Instant::now();
    let mut seq = 0u64;
    let mut original = vec![0u8; OFFSET + 65536];
    let mut bufs = vec![vec![0u8; OFFSET + 65536]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut gro = GROTable::default();
    let mut due_now: Vec<Vec<u8>> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = waiting
            .peek()
            .map(|Reverse(w)| w.due.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(100))
            .min(Duration::from_millis(100));
        let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
        let _ = ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None);
        if let Some(now_shape) = current(shared)
            && (
                now_shape.seed,
                now_shape.loss,
                now_shape.delay,
                now_shape.rate,
            ) != (shape.seed, shape.loss, shape.delay, shape.rate)
        {
            shape = now_shape;
            rng = SmallRng::seed_from_u64(shape.seed.wrapping_add(direction));
        }
        // What arrived, split into packets: a few reads, then what is due goes out, so a
        // sender that keeps the device busy cannot hold the due packets back.
        let mut reads = 0;
        while reads < READS_BEFORE_WRITING
            && let Ok(n) = from.recv_multiple(&mut original, &mut bufs, &mut sizes, OFFSET)
        {
            reads += 1;
            let now = Instant::now();
            for (buf, &size) in bufs.iter().zip(&sizes).take(n) {
                if rng.gen_bool(shape.loss) {
                    c.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut due = now;
                if let Some((bps, queue)) = shape.rate {
                    let start = line_free.max(now);
                    if start.duration_since(now) > queue {
                        c.queue_drops.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let bits = size as u64 * 8;
                    line_free = start + Duration::from_nanos(bits * 1_000_000_000 / bps);
                    due = line_free;
                }
                due += shape.delay;
                if shape.reorder > 0.0 && rng.gen_bool(shape.reorder) {
                    due += shape.reorder_by;
                    c.reordered.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
                // Headroom for the virtio-net header the batch write puts in front.
                let packet = buf.get(..OFFSET + size).unwrap_or_default().to_vec();
                waiting.push(Reverse(Waiting { due, seq, packet }));
            }
        }
        // Everything due, in batches.
        let now = Instant::now();
        while waiting.peek().is_some_and(|Reverse(w)| w.due <= now) {
            while due_now.len() < IDEAL_BATCH_SIZE
                && waiting.peek().is_some_and(|Reverse(w)| w.due <= now)
            {
                let Some(Reverse(w)) = waiting.pop() else {
                    break;
                };
                let late = now.duration_since(w.due);
                if late > Duration::from_millis(1) {
                    c.late.fetch_add(1, Ordering::Relaxed);
                }
                c.latest_us
                    .fetch_max(late.as_micros() as u64, Ordering::Relaxed);
                due_now.push(w.packet);
            }
            let packets = due_now.len() as u64;
            let bytes: usize = due_now.iter().map(|p| p.len() - OFFSET).sum();
            match to.send_multiple(&mut gro, &mut due_now, OFFSET) {
                Ok(_) => {
                    c.forwarded.fetch_add(packets, Ordering::Relaxed);
                    c.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    c.write_errors.fetch_add(packets, Ordering::Relaxed);
                }
            }
            due_now.clear();
        }
    }
}
