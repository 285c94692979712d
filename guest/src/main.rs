//! # vmatrix-guest
//!
//! The test guest of vmatrix: a `no_std` unikernel that runs entirely in ring 3 (no ring-0
//! code at all), talks to its devices through MMIO and port I/O, runs smoltcp over its own
//! virtio-net driver, and serves a line-based key-value protocol whose every write is logged
//! to a virtio-blk disk and flushed before it is acknowledged.
//!
//! Unlike the host crates, the guest necessarily uses `unsafe` (device registers, the
//! allocator, memory functions); each block carries a `// SAFETY:` comment.

#![no_std]
#![no_main]

extern crate alloc;

mod blk;
mod churn;
mod config;
mod io;
mod kv;
mod kvlog;
mod layout;
mod net;
mod platform;
mod rt;
mod server;
mod virtio;

use crate::virtio::Transport;

const TYPE_NET: u32 = 1;
const TYPE_BLOCK: u32 = 2;

fn fail(what: &str) -> ! {
    println!("vmatrix-guest: fatal: {}", what);
    platform::exit(1)
}

#[no_mangle]
extern "C" fn guest_main() -> ! {
    if !platform::present() {
        platform::exit(2);
    }
    let mem = platform::mem_size();
    let heap_start = rt::image_end().next_multiple_of(4096);
    // RAM is [0, PLATFORM) and [HIGH_RAM, ..) for the rest (`layout`).
    let low_end = mem.min(layout::PLATFORM);
    if low_end <= heap_start + (4 << 20) {
        fail("not enough memory for the heap");
    }
    rt::init_heap(0, heap_start, low_end);
    let high = mem - low_end;
    if high > 0 {
        rt::init_heap(1, layout::HIGH_RAM, layout::HIGH_RAM + high);
    }
    println!(
        "vmatrix-guest: booting, {} MiB RAM, heap {:#x}..{:#x} (+{} MiB at 4 GiB), generation {}",
        mem >> 20,
        heap_start,
        low_end,
        high >> 20,
        platform::generation()
    );
    let cfg_str = platform::config();
    let cfg = config::parse(&cfg_str).unwrap_or_else(|e| {
        println!("vmatrix-guest: bad config '{}': {}", cfg_str, e);
        platform::exit(3)
    });

    let mut net = None;
    let mut blk = None;
    for i in 0..layout::VIRTIO_SLOTS {
        match Transport::probe(layout::virtio_slot(i)) {
            Some((t, TYPE_NET)) if net.is_none() => {
                net = Some(net::VirtioNet::new(t).unwrap_or_else(|e| fail(e)));
            }
            Some((t, TYPE_BLOCK)) if blk.is_none() => {
                blk = Some(blk::VirtioBlk::new(t).unwrap_or_else(|e| fail(e)));
            }
            _ => {}
        }
    }
    let net = net.unwrap_or_else(|| fail("no virtio-net device"));
    let blk = blk.unwrap_or_else(|| fail("no virtio-blk device"));
    println!("vmatrix-guest: disk {} sectors", blk.sectors);

    let mut store = kv::Store::default();
    let (log, replay) = kvlog::Log::open(blk, |k, v| store.load(k, v)).unwrap_or_else(|e| fail(e));
    println!(
        "vmatrix-guest: log replayed {} records, {} keys, tail {}{}",
        replay.records,
        store.len(),
        replay.tail,
        if replay.torn {
            ", torn last record dropped"
        } else {
            ""
        }
    );
    let m = net.mac;
    println!(
        "vmatrix-guest: net mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip {}/{} gw {:?}",
        m[0], m[1], m[2], m[3], m[4], m[5], cfg.ip, cfg.prefix, cfg.gw
    );
    let mut server = server::Server::new(net, &cfg, store, log);
    server.announce(cfg.ip);
    println!("vmatrix-guest: ready on {}:{}", cfg.ip, cfg.port);
    server.run()
}
