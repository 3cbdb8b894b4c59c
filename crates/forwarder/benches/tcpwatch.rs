//! The per-packet cost the daemon's device reader pays for
//! [`forwarder::tcpwatch::FlowWatch`]: one parse and one table update per
//! packet, with 1,000 connections in the table (the mutex around it is
//! uncontended and not measured here).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::PacketBuilder;
use forwarder::tcpwatch::FlowWatch;

fn segment(port: u16, ack: u32) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4([100, 127, 0, 1], [10, 10, 0, 2], 64)
        .tcp(port, 443, 1, 65535)
        .ack(ack)
        .write(&mut out, &[0u8; 1200])
        .expect("segment");
    out
}

fn observe(c: &mut Criterion) {
    let packets: Vec<Vec<u8>> = (0..1000u16).map(|p| segment(20000 + p, u32::from(p))).collect();
    let mut w = FlowWatch::default();
    for p in &packets {
        w.observe(p);
    }
    let mut g = c.benchmark_group("tcpwatch");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("observe one 1,240-byte segment, 1,000 connections", |b| {
        b.iter(|| {
            i = (i + 1) % packets.len();
            w.observe(&packets[i]);
        })
    });
    g.finish();
}

criterion_group!(benches, observe);
criterion_main!(benches);
