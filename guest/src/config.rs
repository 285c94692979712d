//! The guest config string: `ip=10.0.0.2/24,gw=10.0.0.1,port=7000`.

use core::net::Ipv4Addr;

/// Parsed configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Address.
    pub ip: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway.
    pub gw: Option<Ipv4Addr>,
    /// TCP port of the KV service.
    pub port: u16,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ip: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 24,
            gw: None,
            port: 7000,
        }
    }
}

/// Parses the config string; unknown keys are an error so typos are caught.
pub fn parse(s: &str) -> Result<Config, &'static str> {
    let mut c = Config::default();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item.split_once('=').ok_or("expected key=value")?;
        match k {
            "ip" => {
                let (a, p) = v.split_once('/').unwrap_or((v, "24"));
                c.ip = a.parse().map_err(|_| "bad ip address")?;
                c.prefix = p
                    .parse()
                    .ok()
                    .filter(|&p| p <= 32)
                    .ok_or("bad prefix length")?;
            }
            "gw" => c.gw = Some(v.parse().map_err(|_| "bad gateway address")?),
            "port" => c.port = v.parse().ok().filter(|&p| p != 0).ok_or("bad port")?,
            _ => return Err("unknown key"),
        }
    }
    Ok(c)
}
