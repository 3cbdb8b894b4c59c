//! `netem-lite`: delay and loss for a lab link, for kernels without netem.
//!
//! Runs in a router namespace. Traffic to impair is routed into TUN device `--in`;
//! every packet read there is dropped with probability `--loss` or written, after
//! `--delay-ms`, into TUN device `--out`, where the kernel receives it as if it had
//! arrived on that interface and forwards it on. A policy rule (`ip rule add iif OUT
//! lookup T`) gives packets from `--out` a table with the real routes, so they do
//! not loop back into `--in`. Delay is constant, so packet order is kept.
//!
//!   netem-lite --in wan-in --out wan-out --delay-ms 20 --loss 0.005

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tunnel::{Device, TunConfig, TunDevice, V4Pair};

#[derive(Debug, Parser)]
#[command(name = "netem-lite", about = "Constant delay and random loss between two TUN devices (root)")]
struct Args {
    /// TUN device the impaired traffic is routed into.
    #[arg(long = "in")]
    input: String,
    /// TUN device the surviving packets are injected from.
    #[arg(long = "out")]
    output: String,
    /// One-way delay added to every packet.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Probability of dropping a packet (0.005 = 0.5%).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Seed for the loss decisions (reproducible runs).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn device(name: &str, third: u8) -> std::io::Result<TunDevice> {
    let ipv4 = V4Pair { local: Ipv4Addr::new(100, 126, third, 1), peer: Ipv4Addr::new(100, 126, third, 2) };
    TunDevice::create(&TunConfig { name: Some(name.into()), ipv4, ipv6: None, mtu: 1500 })
        .map_err(|e| std::io::Error::other(e.to_string()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let input = Arc::new(device(&args.input, 1)?);
    let output = Arc::new(device(&args.output, 2)?);
    println!(
        "netem-lite: {} -> {} with {} ms delay, {:.3}% loss",
        args.input,
        args.output,
        args.delay_ms,
        args.loss * 100.0
    );
    let delay = Duration::from_millis(args.delay_ms);
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = {
        let output = output.clone();
        tokio::spawn(async move {
            let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
            loop {
                while let Ok(p) = rx.try_recv() {
                    queue.push_back(p);
                }
                match queue.front() {
                    Some((due, _)) if *due <= Instant::now() => {
                        if let Some((_, p)) = queue.pop_front() {
                            let _ = output.send(&p).await;
                        }
                    }
                    Some((due, _)) => {
                        let due = *due;
                        tokio::select! {
                            () = tokio::time::sleep_until(due) => {}
                            p = rx.recv() => match p { Some(p) => queue.push_back(p), None => return },
                        }
                    }
                    None => match rx.recv().await {
                        Some(p) => queue.push_back(p),
                        None => return,
                    },
                }
            }
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut buf = vec![0u8; 65536];
    let (mut seen, mut dropped) = (0u64, 0u64);
    loop {
        tokio::select! {
            r = input.recv(&mut buf) => {
                let n = r?;
                seen += 1;
                if args.loss > 0.0 && rng.random::<f64>() < args.loss {
                    dropped += 1;
                    continue;
                }
                if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("netem-lite: {seen} packets, {dropped} dropped");
    writer.abort();
    Ok(())
}
