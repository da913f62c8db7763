//! A tiny upstream for the README demo: answers every connection on 127.0.0.1:PORT with
//! `hello from NAME`, then closes.
//!
//! Usage: `demo-upstream NAME PORT`

use std::{io::Write, net::TcpListener};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(name), Some(port)) = (args.next(), args.next()) else {
        eprintln!("usage: demo-upstream NAME PORT");
        std::process::exit(64);
    };
    let listener = TcpListener::bind(("127.0.0.1", port.parse::<u16>()?))?;
    for stream in listener.incoming() {
        let mut stream = stream?;
        let _ = writeln!(stream, "hello from {name}");
    }
    Ok(())
}
