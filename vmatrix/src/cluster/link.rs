//! The agent protocol over QUIC: one bidirectional stream per agent connection, carrying
//! [`failover::wire`] frames (length, CRC32, postcard payload) both ways.

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Writes one message.
pub async fn write_msg<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> anyhow::Result<()> {
    let frame = failover::wire::encode(msg)?;
    send.write_all(&frame)
        .await
        .context("writing to the agent stream")?;
    Ok(())
}

/// Reads one message (lengths checked before allocation, CRC before decoding). `Ok(None)`
/// when the peer finished the stream cleanly.
pub async fn read_msg<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
) -> anyhow::Result<Option<T>> {
    let mut header = [0u8; failover::wire::HEADER];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e).context("reading a frame header"),
    }
    let len = failover::wire::payload_len(&header)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload)
        .await
        .context("reading a frame payload")?;
    Ok(Some(failover::wire::decode(&header, &payload)?))
}
