//! Load generator and upstream for `bench/run`: plain std threads and blocking sockets, so the
//! measuring side adds as little of its own as possible. Every mode stops by itself.
//!
//! ```text
//! loadgen upstream PORT_ECHO PORT_SINK        echo server and discard server on 127.0.0.1
//! loadgen bulk ADDR STREAMS SECONDS           send as fast as possible -> {"bytes_per_sec":..}
//! loadgen connrate ADDR CONCURRENCY SECONDS   connect, 1-byte echo, close -> {"conns_per_sec":..,"connections":..}
//! loadgen latency ADDR SECONDS                64-byte ping-pong on one connection -> {"p50_us":..,"p99_us":..,..}
//! loadgen idle ADDR COUNT                     open COUNT echo-checked connections, print "ready", hold until stdin closes
//! ```

use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| {
        args.get(i)
            .map(String::as_str)
            .context("missing argument (see the header of loadgen.rs)")
    };
    match arg(0)? {
        "upstream" => upstream(arg(1)?.parse()?, arg(2)?.parse()?),
        "bulk" => bulk(arg(1)?.parse()?, arg(2)?.parse()?, seconds(arg(3)?)?),
        "connrate" => connrate(arg(1)?.parse()?, arg(2)?.parse()?, seconds(arg(3)?)?),
        "latency" => latency(arg(1)?.parse()?, seconds(arg(2)?)?),
        "idle" => idle(arg(1)?.parse()?, arg(2)?.parse()?),
        other => bail!("unknown mode {other:?}"),
    }
}

fn seconds(text: &str) -> Result<Duration> {
    let secs: f64 = text.parse()?;
    if !(0.1..=600.0).contains(&secs) {
        bail!("duration {secs}s out of range (0.1..600)");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The upstream runs on one single-threaded runtime: a thread (and its buffer) per connection
/// would make the load side, not the proxy, the bottleneck of the connection-rate figure.
fn upstream(echo_port: u16, sink_port: u16) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let echo = tokio::net::TcpListener::bind(("127.0.0.1", echo_port)).await?;
        let sink = tokio::net::TcpListener::bind(("127.0.0.1", sink_port)).await?;
        tokio::spawn(serve(sink, false));
        serve(echo, true).await;
        Ok(())
    })
}

async fn serve(listener: tokio::net::TcpListener, echo: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            // Echo exchanges are small; the sink reads bulk streams in large gulps.
            let mut buffer = vec![0u8; if echo { 4096 } else { 256 * 1024 }];
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) if echo => {
                        if stream.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                }
            }
        });
    }
}

fn bulk(target: SocketAddr, streams: usize, duration: Duration) -> Result<()> {
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            let sent = Arc::clone(&sent);
            thread::spawn(move || -> Result<()> {
                let mut stream = TcpStream::connect(target)?;
                let buffer = vec![0x5au8; 256 * 1024];
                while start.elapsed() < duration {
                    stream.write_all(&buffer)?;
                    sent.fetch_add(buffer.len() as u64, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    let rate = sent.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!("{{\"bytes_per_sec\": {rate:.0}}}");
    Ok(())
}

fn connrate(target: SocketAddr, concurrency: usize, duration: Duration) -> Result<()> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
            thread::spawn(move || {
                let mut byte = [0u8; 1];
                while start.elapsed() < duration {
                    let ok = TcpStream::connect(target).and_then(|mut s| {
                        s.set_nodelay(true)?;
                        s.write_all(b"x")?;
                        s.read_exact(&mut byte)
                    });
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let done = done.load(Ordering::Relaxed);
    println!(
        "{{\"conns_per_sec\": {:.0}, \"connections\": {done}, \"failed\": {}}}",
        done as f64 / elapsed,
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}

fn latency(target: SocketAddr, duration: Duration) -> Result<()> {
    let mut stream = TcpStream::connect(target)?;
    stream.set_nodelay(true)?;
    let message = [7u8; 64];
    let mut back = [0u8; 64];
    let mut samples: Vec<u32> = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    while start.elapsed() < duration && samples.len() < (1 << 20) {
        let t = Instant::now();
        stream.write_all(&message)?;
        stream.read_exact(&mut back)?;
        samples.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
    }
    samples.sort_unstable();
    let at = |q: f64| f64::from(samples[((samples.len() - 1) as f64 * q) as usize]) / 1000.0;
    println!(
        "{{\"p50_us\": {:.1}, \"p90_us\": {:.1}, \"p99_us\": {:.1}, \"p999_us\": {:.1}, \"samples\": {}}}",
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        samples.len()
    );
    Ok(())
}

fn idle(target: SocketAddr, count: usize) -> Result<()> {
    let mut held = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for i in 0..count {
        let mut stream = TcpStream::connect(target).with_context(|| format!("connection {i}"))?;
        stream.write_all(b"x")?;
        stream.read_exact(&mut byte)?;
        held.push(stream);
    }
    println!("ready");
    std::io::stdout().flush()?;
    // Hold until the runner closes our stdin.
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
    }
    drop(held);
    Ok(())
}
