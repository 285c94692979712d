//! Writes the seed corpus of the fuzz targets (`fuzz/corpus/{frame,receiver}`): valid frames of
//! every message type and whole checkpoints. Run: `cargo run -p protocol --example fuzz_corpus`.

use protocol::checkpoint::{to_messages, Checkpoint};
use protocol::message::*;
use protocol::page::{encode, EncodeOptions, PageData};

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut old = vec![0u8; 4096];
    old[7] = 1;
    let mut new = old.clone();
    new[100] = 9;
    let cp = Checkpoint {
        epoch: 0,
        kind: Kind::Sync,
        mem_size: 1 << 20,
        pages: vec![
            (1, PageData::Zero),
            (2, PageData::Raw(new.clone())),
            (3, encode(&new, Some(&old), EncodeOptions::default())),
            (
                9,
                encode(
                    &new,
                    Some(&old),
                    EncodeOptions {
                        xor: true,
                        lz4: true,
                    },
                ),
            ),
        ],
        disk: vec![(512, vec![1; 512])],
        state: Some((1, b"state".to_vec())),
    };
    let mut all = Vec::new();
    let mut msgs = to_messages(1, 0, &cp);
    msgs.push(Message::Ack(Ack { term: 1, epoch: 0 }));
    msgs.push(Message::Heartbeat(Heartbeat { term: 1, seq: 3 }));
    msgs.push(Message::Refuse(Refuse {
        code: RefuseCode::Sequence,
        epoch: Some(0),
        detail: "x".into(),
    }));
    msgs.push(Message::Goodbye(Goodbye {
        reason: "bye".into(),
    }));
    msgs.push(Message::Welcome(Welcome {
        version: 3,
        term: 1,
        last_committed: None,
        committed: Some(protocol::message::Position {
            history: 9,
            term: 1,
            seq: 4,
        }),
        data_ports: vec![],
    }));
    msgs.push(Message::Welcome(Welcome {
        version: 4,
        term: 1,
        last_committed: None,
        committed: None,
        data_ports: vec![7001, 7002],
    }));
    for (i, m) in msgs.iter().enumerate() {
        let f = m.encode();
        std::fs::write(dir.join("frame").join(format!("msg{i:02}")), &f)?;
        all.extend_from_slice(&f);
    }
    std::fs::write(dir.join("receiver").join("checkpoint0"), &all)?;
    let cp1 = Checkpoint {
        epoch: 1,
        kind: Kind::Incremental,
        ..cp
    };
    let mut two = all.clone();
    for m in to_messages(1, 0, &cp1) {
        two.extend_from_slice(&m.encode());
    }
    std::fs::write(dir.join("receiver").join("checkpoint01"), &two)?;
    // A session that starts with a quick resync from the committed checkpoint 3 (the fuzz
    // target's receiver holds it), numbered 40, then goes on incrementally.
    let resync = Checkpoint {
        epoch: 40,
        kind: Kind::Resync { from: 3 },
        ..cp1.clone()
    };
    let next = Checkpoint {
        epoch: 41,
        kind: Kind::Incremental,
        ..cp1
    };
    let mut rs = Vec::new();
    for m in to_messages(1, 0, &resync)
        .iter()
        .chain(&to_messages(1, 0, &next))
    {
        rs.extend_from_slice(&m.encode());
    }
    std::fs::write(dir.join("receiver").join("resync40"), &rs)?;
    println!("wrote corpus to {}", dir.display());
    Ok(())
}
