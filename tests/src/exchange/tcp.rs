//! The practical ceiling for the exchange: the same bytes copied over loopback TCP with nothing
//! else in the way. A server thread per client (in this process) and one client process per
//! worker; per round every client writes its bytes, the server reads them all from every
//! client (a barrier stands for the coordinator needing every upload before it can reply), then
//! writes the same bytes back to each client.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use super::{Spawned, check_none_failed, gb_per_s, this_exe};

/// How long one read or write may block before the copy is declared stuck.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// A barrier that a failing thread can break, so the others do not wait for it forever.
#[derive(Debug)]
struct Gate {
    parties: usize,
    state: Mutex<GateState>,
    turned: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    waiting: usize,
    generation: u64,
    broken: bool,
}

impl Gate {
    fn new(parties: usize) -> Gate {
        Gate {
            parties,
            state: Mutex::new(GateState::default()),
            turned: Condvar::new(),
        }
    }

    /// Waits for every party; the last to arrive returns the time it did (the others None).
    fn wait(&self) -> anyhow::Result<Option<Instant>> {
        let mut state = self.state.lock().expect("gate lock");
        if state.broken {
            bail!("another connection failed");
        }
        state.waiting += 1;
        if state.waiting == self.parties {
            state.waiting = 0;
            state.generation += 1;
            self.turned.notify_all();
            return Ok(Some(Instant::now()));
        }
        let generation = state.generation;
        while state.generation == generation && !state.broken {
            state = self.turned.wait(state).expect("gate lock");
        }
        if state.broken {
            bail!("another connection failed");
        }
        Ok(None)
    }

    fn break_it(&self) {
        self.state.lock().expect("gate lock").broken = true;
        self.turned.notify_all();
    }
}

/// Measures `rounds` rounds of `bytes` up and down for each of `clients` client processes;
/// the first round is left out.
pub fn run(clients: u32, rounds: u64, bytes: usize) -> anyhow::Result<serde_json::Value> {
    if clients == 0 {
        bail!("--workers must be at least 1 (the TCP copy needs a client)");
    }
    if rounds < 2 {
        bail!("the TCP copy needs at least 2 rounds (the first is left out)");
    }
    let logs = tempfile::tempdir().context("cannot create a temporary folder")?;
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    let address = listener.local_addr()?.to_string();
    listener.set_nonblocking(true)?;
    let mut children = Vec::new();
    for i in 0..clients {
        let mut command = Command::new(this_exe()?);
        command.args([
            "tcp-client",
            "--addr",
            &address,
            "--bytes",
            &bytes.to_string(),
            "--rounds",
            &rounds.to_string(),
        ]);
        let name = format!("tcp client {i}");
        children.push(Spawned::start(
            &name,
            command,
            logs.path().join(format!("tcp-client-{i}.log")),
        )?);
    }
    let mut streams = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while streams.len() < clients as usize {
        match listener.accept() {
            Ok((stream, _)) => streams.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                check_none_failed(&mut children)?;
                if Instant::now() >= deadline {
                    bail!("only {} of {clients} TCP clients connected within 60 s", streams.len());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accept failed"),
        }
    }
    eprintln!("tcp copy: {clients} clients, {rounds} rounds of {bytes} bytes each way");
    let gate = Gate::new(streams.len());
    let stamps = Mutex::new(Vec::new());
    let outcomes: Vec<anyhow::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|stream| {
                let (gate, stamps) = (&gate, &stamps);
                scope.spawn(move || {
                    let outcome = serve(stream, bytes, rounds, gate, stamps);
                    if outcome.is_err() {
                        gate.break_it();
                    }
                    outcome
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a server thread panicked")))
            })
            .collect()
    });
    for (i, outcome) in outcomes.into_iter().enumerate() {
        if let Err(e) = outcome {
            check_none_failed(&mut children)?;
            return Err(e.context(format!("server side of TCP client {i}")));
        }
    }
    for child in &mut children {
        child.wait(Duration::from_secs(30))?;
        child.check_success()?;
    }
    let stamps = stamps.into_inner().expect("stamps lock");
    // stamps[r] is when round r began (every connection ready to read); the last is when
    // every client had read its final round back (it acknowledges with one byte).
    let timed = (rounds - 1) as f64;
    let round_s = stamps[stamps.len() - 1].duration_since(stamps[1]).as_secs_f64() / timed;
    let rounds_s: Vec<f64> = stamps
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64())
        .collect();
    let moved = 2.0 * f64::from(clients) * bytes as f64;
    Ok(json!({
        "clients": clients,
        "rounds": rounds,
        "rounds_timed": rounds - 1,
        "bytes_per_client_each_way": bytes,
        "bytes_up_per_round": u64::from(clients) * bytes as u64,
        "mean_round_s": round_s,
        "first_round_s": rounds_s[0],
        "gb_per_s": gb_per_s(moved, round_s),
    }))
}

/// The server side of one connection.
fn serve(
    mut stream: TcpStream,
    bytes: usize,
    rounds: u64,
    gate: &Gate,
    stamps: &Mutex<Vec<Instant>>,
) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buffer = vec![0u8; bytes];
    let stamp = |at: Option<Instant>| {
        if let Some(at) = at {
            stamps.lock().expect("stamps lock").push(at);
        }
    };
    for _ in 0..rounds {
        stamp(gate.wait()?);
        stream.read_exact(&mut buffer).context("reading a client's upload")?;
        gate.wait()?;
        stream.write_all(&buffer).context("writing back to a client")?;
    }
    let mut ack = [0u8; 1];
    stream
        .read_exact(&mut ack)
        .context("reading a client's final acknowledgement")?;
    stamp(gate.wait()?);
    Ok(())
}

/// The client process: `rounds` times, writes `bytes` and reads as many back; then one byte.
/// Whole-buffer writes and reads: the kernel's loopback socket buffers autotune, which
/// setting SO_SNDBUF/SO_RCVBUF would switch off.
pub fn client(address: &str, bytes: usize, rounds: u64) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(address).with_context(|| format!("cannot connect to {address}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let upload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut download = vec![0u8; bytes];
    for round in 0..rounds {
        stream
            .write_all(&upload)
            .with_context(|| format!("round {round}: write"))?;
        stream
            .read_exact(&mut download)
            .with_context(|| format!("round {round}: read"))?;
    }
    if download != upload {
        bail!("the echoed bytes differ from those sent");
    }
    stream.write_all(&[1])?;
    Ok(())
}
