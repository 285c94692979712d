//! The control socket of a running VM or backup (`--control <path>`): HTTP/1.1 with JSON
//! bodies on a Unix socket, in the style of Firecracker's API socket and of the manager's API
//! (`cluster::manager::api`). `vmatrix ctl` ([`ctl`]) and the failover agent are its clients
//! ([`client`]); so is curl:
//!
//! ```sh
//! curl --unix-socket /run/vm.sock http://localhost/status
//! curl --unix-socket /run/vm.sock -X PUT -d '{"state":"paused"}' http://localhost/state
//! ```
//!
//! | resource | who | body | answer |
//! |---|---|---|---|
//! | `GET /status` | all | | `{"role":"vm"\|"primary"\|"backup", ...}` ([`types::Status`]) |
//! | `PUT /state` | VM | `{"state":"paused"\|"running"}` | `{"state":...}`; 409 if the VM ended |
//! | `GET /checksum` | VM | | `{"memory_crc32":n}`; 409 unless paused |
//! | `PUT /snapshot` | VM | `{"kind":"full"\|"diff","dir":"/abs"}` | `{"id","pause_us","pages","total_ms","memory_crc32"}`; 409 (dir holds one, diff without a base) |
//! | `PUT /stop` | all | | `{"stopping":true}` |
//! | `PUT /faults/disk` | VM | `{"count":n}` | `{"failing_writes":n}`; 409 without a disk |
//! | `PUT /backups` | primary | `{"backups":["name@host:port",...]}` (`[]`: none) | `{"backups":n}` |
//! | `PUT /fence` | primary | `{"term":n}` | `{"fenced":bool,"term":n}`; fenced: it stops, exit code 3 |
//! | `PUT /handover` | primary | | `{"checkpoint":seq}`, then exit code 4; 409 unprotected |
//! | `PUT /fence` | backup | `{"term":n}` | `{"min_term":n}` (persisted) |
//! | `PUT /promote` | backup | `{"term":n}` | `{"checkpoint":seq}` once the image is final; 409 |
//!
//! "VM" is `run`, `restore` and `primary`. Errors are `{"error": "..."}` with their status:
//! 400 bad JSON or value, 404 unknown resource (or one this kind of process does not serve),
//! 405 wrong method, 408 request not in time, 409 not valid in the current state, 413 body too
//! large, 500 failed, 503 busy. The protections (client limit, head and body timeouts, body
//! limit, one request at a time in order) are in [`server`]; the vocabulary in [`types`].

pub mod client;
pub mod ctl;
pub mod server;
pub mod types;
pub mod vm;

pub use ctl::{main, CtlArgs};
pub use vm::{answer, serve, Extra, ExtraRequests, StatusExtra};
