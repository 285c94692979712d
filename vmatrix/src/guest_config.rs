//! Validation of the guest config string (`ip=10.0.0.2/24,gw=10.0.0.1,port=7000`), with the
//! same grammar the guest parses, so a typo is reported before the VM boots.

use std::net::Ipv4Addr;

/// Checks `s`; returns a message naming the bad item.
pub fn validate(s: &str) -> Result<(), String> {
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("'{item}': expected key=value"))?;
        match k {
            "ip" => {
                let (a, p) = v.split_once('/').unwrap_or((v, "24"));
                a.parse::<Ipv4Addr>()
                    .map_err(|_| format!("'{item}': bad IPv4 address"))?;
                p.parse::<u8>()
                    .ok()
                    .filter(|&p| p <= 32)
                    .ok_or_else(|| format!("'{item}': prefix length must be 0..=32"))?;
            }
            "gw" => {
                v.parse::<Ipv4Addr>()
                    .map_err(|_| format!("'{item}': bad gateway address"))?;
            }
            "port" => {
                v.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("'{item}': port must be 1..=65535"))?;
            }
            _ => return Err(format!("'{item}': unknown key (known: ip, gw, port)")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_the_documented_form() {
        assert!(validate("ip=10.0.0.2/24,gw=10.0.0.1,port=7000").is_ok());
        assert!(validate("").is_ok());
    }

    #[test]
    fn names_the_bad_item() {
        assert!(validate("ip=10.0.0.300/24")
            .unwrap_err()
            .contains("ip=10.0.0.300"));
        assert!(validate("port=0").unwrap_err().contains("port"));
        assert!(validate("colour=blue").unwrap_err().contains("unknown key"));
        assert!(validate("ip").unwrap_err().contains("key=value"));
    }
}
