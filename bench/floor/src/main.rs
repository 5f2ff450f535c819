//! The kernel floor for bench/run.sh: what one write() of a 66-byte WebSocket frame (2-byte
//! header + 64-byte payload, as `plexus bench fanout --size 64` sends) to a loopback TCP socket
//! costs the writing thread, with every reader on the other core.
//!
//! It mirrors the fan-out test: CONNS sockets, ROUNDS per second; each round writes to every
//! socket once (1 frame per write, or FRAMES frames in one write). The writer is pinned to core
//! 0, the readers (one epoll(7) thread that naps and polls for 1 ms after its last event before
//! it blocks, like `plexus bench fanout`'s reader) to core 1. CPU is the
//! writer thread's own
//! (CLOCK_THREAD_CPUTIME_ID: user + system, including the loopback receive path the kernel runs
//! in the writer's context).
//!
//! Usage: floor [--conns 1000] [--rate 50] [--duration-s 10] [--frames 1]
//! Prints one JSON line: {"conns", "rate", "frames_per_write", "writes", "cpu_us",
//! "us_per_write", "us_per_frame"}.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

fn pin(core: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn thread_cpu_us() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
}

fn main() {
    let (mut conns, mut rate, mut duration_s, mut frames) = (1000usize, 50u64, 10u64, 1usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().and_then(|v| v.parse::<u64>().ok()).expect("a number");
        match arg.as_str() {
            "--conns" => conns = value() as usize,
            "--rate" => rate = value(),
            "--duration-s" => duration_s = value(),
            "--frames" => frames = value() as usize,
            _ => {
                eprintln!("usage: floor [--conns N] [--rate R] [--duration-s S] [--frames F]");
                std::process::exit(2);
            }
        }
    }
    // Both ends of every connection are in this process: 2 × conns descriptors, under the
    // 20,000 a process may hold here.
    assert!((1..=9900).contains(&conns) && (1..=1000).contains(&rate));
    assert!((1..=120).contains(&duration_s) && (1..=64).contains(&frames));

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut writers = Vec::with_capacity(conns);
    let mut readers = Vec::with_capacity(conns);
    for i in 0..conns {
        let w = TcpStream::connect(addr).unwrap_or_else(|error| {
            eprintln!("floor: connection {i} of {conns}: {error} (file-descriptor limit? each connection takes 2)");
            std::process::exit(1);
        });
        w.set_nodelay(true).unwrap();
        let (r, _) = listener.accept().unwrap();
        r.set_nonblocking(true).unwrap();
        writers.push(w);
        readers.push(r);
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            pin(1);
            let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            assert!(epoll >= 0, "epoll_create1");
            for (i, r) in readers.iter().enumerate() {
                let mut event = libc::epoll_event {
                    events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                    u64: i as u64,
                };
                let rc = unsafe {
                    libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, r.as_raw_fd(), &mut event)
                };
                assert_eq!(rc, 0, "epoll_ctl");
            }
            let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
            let mut buf = vec![0u8; 64 * 1024];
            let mut bytes = 0u64;
            // As `plexus bench fanout`'s reader: for 1 ms after the last event it naps 20 µs
            // and polls without blocking, so a burst of writes does not pay for waking a
            // blocked reader at every frame; then it blocks.
            let (window, nap) = (Duration::from_millis(1), Duration::from_micros(20));
            let mut last_event = Instant::now();
            let mut napping = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let timeout = if last_event.elapsed() < window {
                    if napping {
                        std::thread::sleep(nap);
                    }
                    0
                } else {
                    100
                };
                let n = unsafe {
                    libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, timeout)
                };
                napping = n <= 0;
                if n > 0 {
                    last_event = Instant::now();
                }
                for event in &events[..n.max(0) as usize] {
                    let i = event.u64 as usize;
                    // Edge-triggered: read until the socket is empty (a short read says so).
                    while let Ok(n) = (&readers[i]).read(&mut buf) {
                        bytes += n as u64;
                        if n < buf.len() {
                            break;
                        }
                    }
                }
            }
            bytes
        })
    };

    pin(0);
    let mut frame = vec![0x81u8, 64];
    frame.extend(std::iter::repeat(b'x').take(64));
    let payload: Vec<u8> = frame.repeat(frames);
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let rounds = rate * duration_s;
    // Warm-up round, not counted.
    for w in writers.iter_mut() {
        w.write_all(&payload).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    let cpu_start = thread_cpu_us();
    let mut writes = 0u64;
    for round in 0..rounds {
        let due = start + period * round as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        for w in writers.iter_mut() {
            w.write_all(&payload).unwrap();
            writes += 1;
        }
    }
    let cpu = thread_cpu_us() - cpu_start;
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let bytes = reader.join().unwrap();
    let expected = (writes + conns as u64) * payload.len() as u64;
    println!(
        "{{\"conns\":{conns},\"rate\":{rate},\"frames_per_write\":{frames},\"writes\":{writes},\"cpu_us\":{cpu:.0},\"us_per_write\":{:.3},\"us_per_frame\":{:.3},\"bytes_read\":{bytes},\"bytes_expected\":{expected}}}",
        cpu / writes as f64,
        cpu / (writes * frames as u64) as f64
    );
}
