//! Clone bases copied between hosts (issue 11; docs/clones.md, "Clones on any host").
//!
//! Every agent serves the newest clone base of each VM it holds on `--base-port` of its
//! replication address, over QUIC with mutual TLS, on a thread and runtime of its own (a copy
//! of GiBs never delays the agent's heartbeats): only a peer whose certificate grants the
//! agent role, and the primary or backup role for that VM (it may hold the VM's image), gets
//! one; the copier checks the server's the same way, and TLS that its name is the host the
//! manager named. A host with clones of a VM it makes no base of copies one ([`fetch`]) from
//! the hosts its assignment lists, the best first.
//!
//! **The exchange** (one bidirectional stream; every message a [`failover::wire`] frame:
//! length checked before allocation, CRC32, postcard): `Want { vm }` → `Header { term, age,
//! lens }`, then `Chunk { file, offset, len }` each followed by `len` raw bytes (at most
//! [`CHUNK`]; QUIC's AEAD protects them on the way, the snapshot's own CRCs end to end) for the
//! data regions of the base's full snapshot (`snapshot.bin`, `memory.bin`, `disk.img`; holes
//! are not sent and stay holes), then `Done`; or `Refused { why }`. The server opens the three
//! files before it answers, so a base its agent removes meanwhile is still sent whole. Reads
//! (server) and writes (copier) run on threads of their own a few chunks ahead of the stream.
//!
//! **Trust nothing**: the copier checks every length (file sizes within [`LIMITS`], every chunk
//! inside its file), bounds each message by [`READ_TIMEOUT`] and the whole copy by a least
//! average rate ([`SLOW`]), writes off its runtime's thread, and the copy becomes a base only as one
//! full snapshot of the VM's size through `clone::base::prepare`, which verifies every CRC:
//! a peer sending bad bytes makes a copy fail, never a clone start from them. A failed copy is
//! removed and the next source tried. The server serves at most [`SERVING`] copies at once
//! (others are refused as busy), reads its files off its runtime's thread, and gives up on a
//! copier that takes nothing for [`READ_TIMEOUT`] or trickles (the same [`SLOW`] rule): no
//! reader holds a slot for long without making progress.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use failover::clones::BaseSource;
use serde::{Deserialize, Serialize};
use transport::roles::HostRole;
use transport::QuicConfig;
use vmm::snapshot::{files, DISK_FILE, MEMORY_FILE, META_FILE};

use crate::cluster::link::{read_msg, write_msg};

/// Default UDP port of an agent's base server.
pub const DEFAULT_PORT: u16 = 7400;
/// The files of a base's full snapshot, in the order they are sent.
pub const FILES: [&str; 3] = [META_FILE, MEMORY_FILE, DISK_FILE];
/// Largest size accepted for each of [`FILES`]: a snapshot's description, guest RAM (the
/// largest a VM spec allows, rounded up), a disk (idem).
pub const LIMITS: [u64; 3] = [64 << 20, 4 << 30, 1 << 40];
/// Most bytes of data per chunk.
pub const CHUNK: usize = 1 << 20;
/// Chunks read ahead (server) or waiting to be written (copier).
const AHEAD: usize = 4;
/// Longest wait for any one message of a copy.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A copy is given up (by either end) once it has run for `SLOW.0` and averaged less than
/// `SLOW.1` bytes per second: a peer that trickles (a chunk every few seconds) neither holds a
/// server's slot nor keeps a copier waiting for ever, whatever the base's size.
pub const SLOW: (Duration, u64) = (Duration::from_secs(60), 1 << 20);

/// Errs if a copy that began at `t0` and moved `bytes` is too slow (see [`SLOW`]).
fn check_rate(t0: Instant, bytes: u64) -> anyhow::Result<()> {
    let dt = t0.elapsed();
    if dt >= SLOW.0 && (bytes as f64) < SLOW.1 as f64 * dt.as_secs_f64() {
        bail!(
            "too slow: {:.1} MiB in {:.0} s (at least {} KiB/s after {} s)",
            bytes as f64 / (1 << 20) as f64,
            dt.as_secs_f64(),
            SLOW.1 >> 10,
            SLOW.0.as_secs()
        );
    }
    Ok(())
}
/// Copies served at once.
pub const SERVING: usize = 4;

/// One message of the exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Copier → server: the newest base of this VM.
    Want {
        /// The VM.
        vm: String,
    },
    /// The base that follows.
    Header {
        /// The term of the primary whose checkpoint it froze.
        term: u64,
        /// Its age on the server, ms.
        age_ms: u64,
        /// The sizes of [`FILES`].
        lens: [u64; 3],
    },
    /// Bytes of one file: `len` raw bytes follow on the stream.
    Chunk {
        /// Index in [`FILES`].
        file: u8,
        /// Where they go.
        offset: u64,
        /// How many (at most [`CHUNK`]).
        len: u32,
    },
    /// Everything was sent.
    Done,
    /// No base is sent.
    Refused {
        /// Why.
        why: String,
    },
}

/// One base a host serves: its term, its snapshot directory, when it was made.
#[derive(Debug, Clone)]
pub struct Served {
    /// The term of the primary whose checkpoint it froze.
    pub term: u64,
    /// Its full snapshot's directory.
    pub snap: PathBuf,
    /// When it was made (or copied).
    pub made: Instant,
}

/// The newest base of each VM this host holds (the clones' bookkeeping keeps it current).
pub type Published = Arc<Mutex<BTreeMap<String, Served>>>;

/// The QUIC settings of copies (both ends): a disk that stalls a second is no lost peer.
pub fn quic_config() -> QuicConfig {
    QuicConfig {
        idle_timeout_ms: READ_TIMEOUT.as_millis() as u64,
        ..QuicConfig::default()
    }
}

/// Starts a base server on `addr` on a thread and runtime of its own, with the certificate of
/// `host` in `certs`; its port.
pub fn start(
    addr: std::net::SocketAddr,
    (certs, host): (PathBuf, String),
    published: Published,
) -> anyhow::Result<u16> {
    let identity = transport::certs::load(&certs, &host)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("base-server".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return drop(tx.send(Err(anyhow::anyhow!("runtime: {e}")))),
            };
            rt.block_on(async move {
                match transport::quic::Server::bind(addr, &identity, &quic_config()) {
                    Ok(server) => {
                        let port = server.local_addr().map_or(0, |a| a.port());
                        let _ = tx.send(Ok(port));
                        serve(server, published).await;
                    }
                    Err(e) => drop(tx.send(Err(e.into()))),
                }
            });
        })?;
    rx.recv().context("the base server's thread ended")?
}

/// Serves the published bases on `server` until the endpoint closes.
pub async fn serve(server: transport::quic::Server, published: Published) {
    let slots = Arc::new(tokio::sync::Semaphore::new(SERVING));
    while let Ok(conn) = server.accept().await {
        let (published, slots) = (published.clone(), slots.clone());
        tokio::spawn(async move {
            let peer = conn.remote_address();
            if let Err(e) = serve_one(&conn, &published, &slots).await {
                tracing::warn!("clone base for {peer}: {e:#}");
            }
            transport::quic::close(&conn, 0, "done");
        });
    }
}

async fn serve_one(
    conn: &quinn::Connection,
    published: &Published,
    slots: &tokio::sync::Semaphore,
) -> anyhow::Result<()> {
    let peer = transport::roles::check_peer(conn, HostRole::Agent, None)?;
    let (mut send, mut recv) = tokio::time::timeout(READ_TIMEOUT, conn.accept_bi())
        .await
        .context("no request")??;
    let vm = match tokio::time::timeout(READ_TIMEOUT, read_msg::<Msg>(&mut recv)).await {
        Ok(Ok(Some(Msg::Want { vm }))) => vm,
        other => bail!("expected a request, got {other:?}"),
    };
    let refuse = |why: String| Msg::Refused { why };
    if let Err(why) = may_hold(&peer, &vm) {
        write_msg(&mut send, &refuse(why.clone())).await?;
        finish(send).await?;
        bail!("{}: {why}", peer.host);
    }
    let Ok(_slot) = slots.try_acquire() else {
        write_msg(
            &mut send,
            &refuse(format!("busy: {SERVING} copies under way")),
        )
        .await?;
        return finish(send).await;
    };
    let base = published.lock().expect("published bases").get(&vm).cloned();
    let Some(base) = base else {
        write_msg(&mut send, &refuse(format!("no clone base of {vm} here"))).await?;
        return finish(send).await;
    };
    let opened = tokio::task::spawn_blocking(move || open_base(&base)).await?;
    let (files, header) = match opened {
        Ok(x) => x,
        Err(e) => {
            write_msg(&mut send, &refuse(format!("{e:#}"))).await?;
            return finish(send).await;
        }
    };
    let t0 = Instant::now();
    write_msg(&mut send, &header).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(AHEAD);
    let reader = tokio::task::spawn_blocking(move || read_chunks(&files, &tx));
    let mut sent = 0u64;
    while let Some(c) = rx.recv().await {
        let (file, offset, data) = c?;
        let head = Msg::Chunk {
            file,
            offset,
            len: data.len() as u32,
        };
        let write = async {
            write_msg(&mut send, &head).await?;
            send.write_all(&data).await.context("sending a chunk")
        };
        tokio::time::timeout(READ_TIMEOUT, write)
            .await
            .with_context(|| format!("{} took nothing for {READ_TIMEOUT:?}", peer.host))??;
        sent += data.len() as u64;
        check_rate(t0, sent).with_context(|| format!("sending to {}", peer.host))?;
    }
    reader.await?;
    tokio::time::timeout(READ_TIMEOUT, write_msg(&mut send, &Msg::Done))
        .await
        .context("the end: timed out")??;
    finish(send).await?;
    tracing::info!(
        "sent the clone base of {vm} to {} ({:.1} MiB of data in {:.0} ms)",
        peer.host,
        sent as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// One chunk read: (file, offset, bytes).
type ReadChunk = std::io::Result<(u8, u64, Vec<u8>)>;

/// Reads the data regions of `files` in chunks into `tx` (a blocking thread; it stops when the
/// receiver is gone).
fn read_chunks(files: &[(File, u64)], tx: &tokio::sync::mpsc::Sender<ReadChunk>) {
    for (i, (file, len)) in files.iter().enumerate() {
        for (start, end) in files::data_regions(file, *len) {
            let mut off = start;
            while off < end {
                let n = (end - off).min(CHUNK as u64) as usize;
                let mut buf = vec![0u8; n];
                let r = file
                    .read_exact_at(&mut buf, off)
                    .map(|()| (i as u8, off, buf));
                let failed = r.is_err();
                if tx.blocking_send(r).is_err() || failed {
                    return;
                }
                off += n as u64;
            }
        }
    }
}

/// Whether `peer`'s certificate lets it hold `vm`'s image (the primary or backup role for it).
fn may_hold(peer: &transport::roles::PeerCert, vm: &str) -> Result<(), String> {
    peer.check(HostRole::Backup, Some(vm))
        .or_else(|_| peer.check(HostRole::Primary, Some(vm)))
        .map_err(|e| format!("may not hold {vm}: {e}"))
}

/// Ends the answer and waits (at most [`READ_TIMEOUT`]) until the copier has it all: the
/// connection is closed right after.
async fn finish(mut send: quinn::SendStream) -> anyhow::Result<()> {
    send.finish()?;
    let _ = tokio::time::timeout(READ_TIMEOUT, send.stopped()).await;
    Ok(())
}

/// Opens a base's files (so that it is sent whole even if it is removed meanwhile).
fn open_base(b: &Served) -> anyhow::Result<(Vec<(File, u64)>, Msg)> {
    let mut out = Vec::new();
    let mut lens = [0u64; 3];
    for (i, name) in FILES.iter().enumerate() {
        let p = b.snap.join(name);
        let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        lens[i] = f.metadata()?.len();
        out.push((f, lens[i]));
    }
    let header = Msg::Header {
        term: b.term,
        age_ms: b.made.elapsed().as_millis() as u64,
        lens,
    };
    Ok((out, header))
}

/// What a copy brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// The term of the base.
    pub term: u64,
    /// Its age on the server when the copy began, ms.
    pub age_ms: u64,
    /// Bytes of data received.
    pub bytes: u64,
}

/// Copies the newest base of `vm` from the first of `sources` that sends one whole, into
/// `snap` (a full snapshot directory; not yet verified: `clone::base::prepare` does it).
/// Blocking: runs its own runtime (the caller is a thread of its own).
pub fn fetch(
    identity: &transport::certs::Identity,
    sources: &[BaseSource],
    vm: &str,
    snap: &Path,
) -> anyhow::Result<(Copied, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ep = transport::quic::client(identity, &quic_config())?;
        let mut why = Vec::new();
        for s in sources {
            let _ = std::fs::remove_dir_all(snap);
            match fetch_one(&ep, s, vm, snap).await {
                Ok(c) => return Ok((c, s.host.clone())),
                Err(e) => why.push(format!("{}: {e:#}", s.host)),
            }
        }
        let _ = std::fs::remove_dir_all(snap);
        bail!("no source sent a base: {}", why.join("; "))
    })
}

/// Copies from one source.
async fn fetch_one(
    ep: &quinn::Endpoint,
    src: &BaseSource,
    vm: &str,
    snap: &Path,
) -> anyhow::Result<Copied> {
    let addr: std::net::SocketAddr = src
        .addr
        .parse()
        .with_context(|| format!("address '{}'", src.addr))?;
    let conn = tokio::time::timeout(
        READ_TIMEOUT,
        transport::quic::connect_raw(ep, addr, &src.host),
    )
    .await
    .context("connecting: timed out")??;
    let r = copy_from(&conn, vm, snap).await;
    transport::quic::close(&conn, 0, "done");
    r
}

async fn copy_from(conn: &quinn::Connection, vm: &str, snap: &Path) -> anyhow::Result<Copied> {
    let peer = transport::roles::check_peer(conn, HostRole::Agent, None)?;
    may_hold(&peer, vm).map_err(|why| anyhow::anyhow!("the server {why}"))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_msg(&mut send, &Msg::Want { vm: vm.into() }).await?;
    let (term, age_ms, lens) = match next(&mut recv).await? {
        Msg::Header { term, age_ms, lens } => (term, age_ms, lens),
        Msg::Refused { why } => bail!("refused: {why}"),
        m => bail!("expected a header, got {}", kind(&m)),
    };
    let out = create_files(snap, &lens)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, u64, Vec<u8>)>(AHEAD);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        for (i, offset, data) in rx {
            out[i].write_all_at(&data, offset)?;
        }
        Ok(())
    });
    let received = receive_chunks(&mut recv, &lens, &tx).await;
    drop(tx);
    // (The writer's error, if any, explains a closed channel best.)
    writer.await??;
    let bytes = received?;
    Ok(Copied {
        term,
        age_ms,
        bytes,
    })
}

/// Receives chunks until `Done` into `tx` (checked against the files' sizes); the bytes.
async fn receive_chunks(
    recv: &mut quinn::RecvStream,
    lens: &[u64; 3],
    tx: &std::sync::mpsc::SyncSender<(usize, u64, Vec<u8>)>,
) -> anyhow::Result<u64> {
    let (t0, mut bytes) = (Instant::now(), 0u64);
    loop {
        check_rate(t0, bytes)?;
        match next(recv).await? {
            Msg::Chunk { file, offset, len } => {
                let i = file as usize;
                let end = offset.checked_add(u64::from(len));
                if i >= FILES.len() || len as usize > CHUNK || end.is_none_or(|e| e > lens[i]) {
                    bail!("a chunk outside its file (file {file}, {offset}+{len})");
                }
                let mut data = vec![0u8; len as usize];
                tokio::time::timeout(READ_TIMEOUT, recv.read_exact(&mut data))
                    .await
                    .context("a chunk's bytes: timed out")?
                    .context("a chunk's bytes")?;
                bytes += u64::from(len);
                // (A full queue waits for the disk, off this runtime's thread.)
                let item = (i, offset, data);
                let sent = match tx.try_send(item) {
                    Ok(()) => Ok(()),
                    Err(std::sync::mpsc::TrySendError::Full(item)) => {
                        let tx = tx.clone();
                        tokio::task::spawn_blocking(move || tx.send(item).map_err(|_| ())).await?
                    }
                    Err(std::sync::mpsc::TrySendError::Disconnected(_)) => Err(()),
                };
                sent.map_err(|()| anyhow::anyhow!("writing the copy failed"))?;
            }
            Msg::Done => return Ok(bytes),
            m => bail!("expected a chunk, got {}", kind(&m)),
        }
    }
}

/// The next message, within [`READ_TIMEOUT`].
async fn next(recv: &mut quinn::RecvStream) -> anyhow::Result<Msg> {
    match tokio::time::timeout(READ_TIMEOUT, read_msg::<Msg>(recv)).await {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => bail!("the server ended the stream early"),
        Ok(Err(e)) => Err(e),
        Err(_) => bail!("nothing for {READ_TIMEOUT:?}"),
    }
}

/// Creates the files of a copy at their sizes (sparse), after checking the sizes.
fn create_files(snap: &Path, lens: &[u64; 3]) -> anyhow::Result<Vec<File>> {
    for (i, (len, max)) in lens.iter().zip(LIMITS).enumerate() {
        if *len > max {
            bail!("{} of {len} bytes (at most {max})", FILES[i]);
        }
    }
    std::fs::create_dir_all(snap).with_context(|| format!("creating {}", snap.display()))?;
    let mut out = Vec::new();
    for (name, len) in FILES.iter().zip(lens) {
        let p = snap.join(name);
        let f = File::create(&p).with_context(|| format!("creating {}", p.display()))?;
        f.set_len(*len)?;
        out.push(f);
    }
    Ok(out)
}

fn kind(m: &Msg) -> &'static str {
    match m {
        Msg::Want { .. } => "a request",
        Msg::Header { .. } => "a header",
        Msg::Chunk { .. } => "a chunk",
        Msg::Done => "the end",
        Msg::Refused { .. } => "a refusal",
    }
}

#[cfg(test)]
#[path = "base_share_tests.rs"]
mod tests;
