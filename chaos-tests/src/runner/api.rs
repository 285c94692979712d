//! A small blocking client of the manager's HTTP/JSON API (`docs/failover.md`, "The HTTP
//! API"): the VMs' views (who is primary, who are backups, protected or not), the hosts, and
//! creating a VM. HTTP/1.0 with `Connection: close` over a `TcpStream` with timeouts: the API
//! is plain HTTP on loopback and the runner needs four requests, not a client library.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use failover::manager::{HostView, VmView};
use failover::model::VmSpec;
use serde::de::DeserializeOwned;

use super::RunnerError;

/// The manager's API at one address.
#[derive(Debug, Clone, Copy)]
pub struct Api {
    /// Its address (loopback).
    pub addr: SocketAddr,
    /// Connect, read and write timeout of one request.
    pub timeout: Duration,
}

impl Api {
    /// The API at `addr`, with a 1 s timeout.
    pub fn new(addr: SocketAddr) -> Api {
        Api {
            addr,
            timeout: Duration::from_secs(1),
        }
    }

    /// One request; returns the status code and the body.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String), String> {
        let mut s = TcpStream::connect_timeout(&self.addr, self.timeout)
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        s.set_read_timeout(Some(self.timeout))
            .and_then(|_| s.set_write_timeout(Some(self.timeout)))
            .map_err(|e| e.to_string())?;
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes())
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, rest) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("{method} {path}: no HTTP header in {} bytes", raw.len()))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("{method} {path}: bad status line"))?;
        Ok((status, rest.to_string()))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, RunnerError> {
        let (status, body) = self.call("GET", path, None).map_err(RunnerError::Api)?;
        if status != 200 {
            return Err(RunnerError::Api(format!("GET {path}: {status} {body}")));
        }
        serde_json::from_str(&body).map_err(|e| RunnerError::Api(format!("GET {path}: {e}")))
    }

    /// Every VM.
    pub fn vms(&self) -> Result<Vec<VmView>, RunnerError> {
        self.get("/v1/vms")
    }

    /// Every host.
    pub fn hosts(&self) -> Result<Vec<HostView>, RunnerError> {
        self.get("/v1/hosts")
    }

    /// Creates a VM (the record is durable when this returns).
    pub fn create(&self, spec: &VmSpec) -> Result<VmView, RunnerError> {
        let body = serde_json::to_string(spec).map_err(|e| RunnerError::Api(e.to_string()))?;
        let (status, text) = self
            .call("POST", "/v1/vms", Some(&body))
            .map_err(RunnerError::Api)?;
        if status != 201 {
            return Err(RunnerError::Api(format!("POST /v1/vms: {status} {text}")));
        }
        serde_json::from_str(&text).map_err(|e| RunnerError::Api(format!("POST /v1/vms: {e}")))
    }
}

/// The hosts of a VM as the manager sees it: primary, backups (in the manager's order).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Roles {
    /// The primary's host.
    pub primary: Option<String>,
    /// The backups' hosts.
    pub backups: Vec<String>,
    /// The VM's status.
    pub status: String,
    /// Its term.
    pub term: u64,
}

impl Roles {
    /// From a VM's view.
    pub fn of(v: &VmView) -> Roles {
        Roles {
            primary: v.primary.clone(),
            backups: v.backups.iter().map(|b| b.host.clone()).collect(),
            status: v.status.clone(),
            term: v.term,
        }
    }

    /// `"primary b, backups [c], protected, term 2"`.
    pub fn describe(&self) -> String {
        format!(
            "primary {}, backups [{}], {}, term {}",
            self.primary.as_deref().unwrap_or("-"),
            self.backups.join(","),
            self.status,
            self.term
        )
    }
}
