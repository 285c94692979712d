//! A load-balancer service as one nftables table, and back: the scripts that build and change
//! it (each applied by one `nft -f -`, one atomic transaction), and the service's state read
//! from the kernel's own ruleset (`nft -j list table`), so the kernel is the only record and
//! any process (the `vmatrix lb` commands, a manager) sees the same service.
//!
//! The table `ip vmatrix_lb_<name>`:
//! ```text
//! chain pre   (nat prerouting)  ip daddr VIP tcp dport PORT jump dispatch_<scheduler>
//! chain out   (nat output)      the same, for clients in the balancer's own namespace
//! chain dispatch_<rr|random>    numgen <inc|random> mod W vmap { 0 : jump be_<id>, ... }
//! chain be_<id>                 counter name new_<id>  dnat to ADDR:PORT
//! chain post  (nat postrouting) [masquerade of the service's connections: --snat]
//! chain count (filter forward)  per server: its connections' packets, counter pkts_<id>
//! chain vipdev_<hex of dev>     empty: the VIP is a /32 of that device, the service's own
//! ```
//! A server of weight w appears w times in the dispatch map (spread, not in a run); weight 0
//! (draining) keeps its chain and counters but no map entry: no new connections. Only a
//! connection's first packet goes through the nat chains; the rest follow its conntrack
//! entry, so changing the map never moves an existing connection.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use serde_json::Value;

use super::{LbError, Scheduler};

/// The service as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub vip: SocketAddrV4,
    pub scheduler: Scheduler,
    pub snat: bool,
    pub vip_dev: Option<String>,
    /// Every server and its weight (0: draining).
    pub servers: BTreeMap<SocketAddrV4, u32>,
    /// Named counters: name -> (packets, bytes).
    pub counters: BTreeMap<String, (u64, u64)>,
}

/// The table of service `name`.
pub fn table(name: &str) -> String {
    format!("vmatrix_lb_{name}")
}

/// A server's id in chain and counter names: `a_b_c_d_port`.
pub fn id(s: SocketAddrV4) -> String {
    let o = s.ip().octets();
    format!("{}_{}_{}_{}_{}", o[0], o[1], o[2], o[3], s.port())
}

fn parse_id(id: &str) -> Option<SocketAddrV4> {
    let p: Vec<u32> = id
        .split('_')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [a, b, c, d, port] = p[..] else {
        return None;
    };
    let oct = |x: u32| u8::try_from(x).ok();
    let ip = Ipv4Addr::new(oct(a)?, oct(b)?, oct(c)?, oct(d)?);
    Some(SocketAddrV4::new(ip, u16::try_from(port).ok()?))
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The script creating the service with no server; an older table of the same name (a crashed
/// run's) is deleted in the same transaction.
pub fn create_script(name: &str, st: &State) -> String {
    let t = table(name);
    let (vip, port) = (st.vip.ip(), st.vip.port());
    let d = format!("dispatch_{}", st.scheduler.as_str());
    let mut s = format!(
        "add table ip {t}\ndelete table ip {t}\nadd table ip {t}\n\
         add chain ip {t} {d}\n\
         add chain ip {t} pre {{ type nat hook prerouting priority dstnat ; policy accept ; }}\n\
         add rule ip {t} pre ip daddr {vip} tcp dport {port} jump {d}\n\
         add chain ip {t} out {{ type nat hook output priority -100 ; policy accept ; }}\n\
         add rule ip {t} out ip daddr {vip} tcp dport {port} jump {d}\n\
         add chain ip {t} post {{ type nat hook postrouting priority srcnat ; policy accept ; }}\n\
         add chain ip {t} count {{ type filter hook forward priority filter ; policy accept ; }}\n"
    );
    if st.snat {
        s += &format!(
            "add rule ip {t} post meta l4proto tcp ct status dnat ct original ip daddr {vip} \
             ct original proto-dst {port} masquerade\n"
        );
    }
    if let Some(dev) = &st.vip_dev {
        s += &format!("add chain ip {t} vipdev_{}\n", hex(dev));
    }
    s
}

/// Dispatch entries for the weights: a smooth weighted round robin (nginx's), so a server of
/// weight 3 among weight-1 servers is not chosen three times in a row.
pub fn dispatch_order(servers: &BTreeMap<SocketAddrV4, u32>) -> Vec<SocketAddrV4> {
    let live: Vec<(SocketAddrV4, i64)> = servers
        .iter()
        .filter(|(_, &w)| w > 0)
        .map(|(&s, &w)| (s, i64::from(w)))
        .collect();
    let total: i64 = live.iter().map(|(_, w)| w).sum();
    let mut current = vec![0i64; live.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, (_, w)) in current.iter_mut().zip(&live) {
            *c += w;
        }
        let Some((best, _)) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, -(*i as i64)))
        else {
            break;
        };
        current[best] -= total;
        out.push(live[best].0);
    }
    out
}

/// The script taking the service from `old` to `new` servers (weights): new servers' chains and
/// counters, the dispatch map and the packet counting rules rewritten, removed servers' chains
/// and counters deleted. One transaction.
pub fn update_script(name: &str, old: &State, new: &BTreeMap<SocketAddrV4, u32>) -> String {
    let t = table(name);
    let (vip, port) = (old.vip.ip(), old.vip.port());
    let d = format!("dispatch_{}", old.scheduler.as_str());
    let mut s = String::new();
    for srv in new.keys().filter(|k| !old.servers.contains_key(k)) {
        let i = id(*srv);
        s += &format!(
            "add counter ip {t} new_{i}\nadd counter ip {t} pkts_{i}\nadd chain ip {t} be_{i}\n\
             add rule ip {t} be_{i} counter name new_{i} meta l4proto tcp dnat to {srv}\n"
        );
    }
    s += &format!("flush chain ip {t} {d}\n");
    let order = dispatch_order(new);
    if !order.is_empty() {
        let map: Vec<String> = order
            .iter()
            .enumerate()
            .map(|(k, srv)| format!("{k} : jump be_{}", id(*srv)))
            .collect();
        s += &format!(
            "add rule ip {t} {d} numgen {} mod {} vmap {{ {} }}\n",
            old.scheduler.numgen(),
            order.len(),
            map.join(", ")
        );
    }
    s += &format!("flush chain ip {t} count\n");
    for srv in new.keys() {
        s += &format!(
            "add rule ip {t} count meta l4proto tcp ct original ip daddr {vip} ct original \
             proto-dst {port} ct reply ip saddr {} ct reply proto-src {} counter name pkts_{}\n",
            srv.ip(),
            srv.port(),
            id(*srv)
        );
    }
    for srv in old.servers.keys().filter(|k| !new.contains_key(k)) {
        let i = id(*srv);
        s += &format!(
            "flush chain ip {t} be_{i}\ndelete chain ip {t} be_{i}\n\
             delete counter ip {t} new_{i}\ndelete counter ip {t} pkts_{i}\n"
        );
    }
    s
}

/// Every `{"jump": {"target": X}}` inside `v`.
fn jumps<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            if let Some(t) = m
                .get("jump")
                .and_then(|j| j.get("target"))
                .and_then(Value::as_str)
            {
                out.push(t);
            }
            m.values().for_each(|x| jumps(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| jumps(x, out)),
        _ => {}
    }
}

/// The right side of the `match` on `payload protocol.field` among a rule's expressions.
fn payload_match<'a>(expr: &'a [Value], protocol: &str, field: &str) -> Option<&'a Value> {
    expr.iter().find_map(|e| {
        let m = e.get("match")?;
        let p = m.get("left")?.get("payload")?;
        (p.get("protocol")? == protocol && p.get("field")? == field).then(|| m.get("right"))?
    })
}

/// The service's state from `nft -j list table ip vmatrix_lb_<name>`.
pub fn parse_state(json: &str) -> Result<State, LbError> {
    let bad = |what: &str| LbError::Parse(what.to_string());
    let v: Value = serde_json::from_str(json).map_err(|e| LbError::Parse(e.to_string()))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no nftables array"))?;
    let (mut vip, mut scheduler, mut snat, mut vip_dev) = (None, None, false, None);
    let mut servers = BTreeMap::new();
    let mut counters = BTreeMap::new();
    let mut dispatch: Vec<String> = Vec::new();
    for it in items {
        if let Some(c) = it.get("chain") {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("");
            if let Some(i) = name.strip_prefix("be_") {
                servers.insert(parse_id(i).ok_or_else(|| bad(name))?, 0);
            } else if let Some(h) = name.strip_prefix("vipdev_") {
                vip_dev = Some(unhex(h).ok_or_else(|| bad(name))?);
            }
        } else if let Some(c) = it.get("counter") {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("");
            let n = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
            counters.insert(name.to_string(), (n("packets"), n("bytes")));
        } else if let Some(r) = it.get("rule") {
            let chain = r.get("chain").and_then(Value::as_str).unwrap_or("");
            let expr = r.get("expr").and_then(Value::as_array);
            let expr = expr.map(Vec::as_slice).unwrap_or(&[]);
            let mut targets = Vec::new();
            jumps(r, &mut targets);
            match chain {
                "pre" => {
                    let ip = payload_match(expr, "ip", "daddr").and_then(Value::as_str);
                    let port = payload_match(expr, "tcp", "dport").and_then(Value::as_u64);
                    let (Some(ip), Some(port)) = (ip, port) else {
                        return Err(bad("the pre chain's rule has no VIP"));
                    };
                    let ip: Ipv4Addr = ip.parse().map_err(|_| bad(ip))?;
                    let port = u16::try_from(port).map_err(|_| bad("port"))?;
                    vip = Some(SocketAddrV4::new(ip, port));
                    let d = targets.first().and_then(|t| t.strip_prefix("dispatch_"));
                    scheduler = d.and_then(|d| d.parse().ok());
                }
                "post" => snat = true,
                c if c.starts_with("dispatch_") => {
                    dispatch.extend(targets.iter().map(|t| t.to_string()))
                }
                _ => {}
            }
        }
    }
    for t in dispatch {
        let srv = t
            .strip_prefix("be_")
            .and_then(parse_id)
            .ok_or_else(|| bad(&t))?;
        *servers.entry(srv).or_insert(0) += 1;
    }
    Ok(State {
        vip: vip.ok_or_else(|| bad("no VIP rule"))?,
        scheduler: scheduler.ok_or_else(|| bad("no dispatch chain"))?,
        snat,
        vip_dev,
        servers,
        counters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn ids_round_trip() {
        for s in ["10.77.5.10:7000", "0.0.0.1:1", "255.255.255.255:65535"] {
            assert_eq!(parse_id(&id(sa(s))), Some(sa(s)));
        }
        for bad in [
            "1_2_3_4",
            "1_2_3_4_5_6",
            "256_0_0_0_1",
            "1_2_3_4_70000",
            "a_b_c_d_e",
            "",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
        assert_eq!(unhex(&hex("vmxt5-h")).as_deref(), Some("vmxt5-h"));
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn weights_are_spread_not_in_runs() {
        let m: BTreeMap<_, _> = [
            (sa("1.0.0.1:1"), 3),
            (sa("1.0.0.2:1"), 1),
            (sa("1.0.0.3:1"), 0),
        ]
        .into_iter()
        .collect();
        let o = dispatch_order(&m);
        assert_eq!(o.len(), 4);
        assert_eq!(o.iter().filter(|s| **s == sa("1.0.0.1:1")).count(), 3);
        assert!(
            !o.contains(&sa("1.0.0.3:1")),
            "weight 0 gets no new connections"
        );
        assert!(
            o.windows(3).all(|w| w.iter().any(|s| *s != w[0])),
            "never three in a row: {o:?}"
        );
        assert!(dispatch_order(&BTreeMap::new()).is_empty());
    }

    /// What nft 1.0.6 printed for a service with two servers, one draining.
    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
      {"table": {"family": "ip", "name": "vmatrix_lb_t", "handle": 1}},
      {"counter": {"family": "ip", "name": "new_10_77_5_10_7000", "table": "vmatrix_lb_t", "handle": 4, "packets": 7, "bytes": 420}},
      {"chain": {"family": "ip", "table": "vmatrix_lb_t", "name": "dispatch_rr", "handle": 2}},
      {"chain": {"family": "ip", "table": "vmatrix_lb_t", "name": "be_10_77_5_10_7000", "handle": 6}},
      {"chain": {"family": "ip", "table": "vmatrix_lb_t", "name": "be_10_77_5_2_7000", "handle": 8}},
      {"chain": {"family": "ip", "table": "vmatrix_lb_t", "name": "vipdev_6c616e30", "handle": 9}},
      {"rule": {"family": "ip", "table": "vmatrix_lb_t", "chain": "pre", "handle": 9, "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.77.5.100"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 7000}},
        {"jump": {"target": "dispatch_rr"}}]}},
      {"rule": {"family": "ip", "table": "vmatrix_lb_t", "chain": "post", "handle": 10, "expr": [{"masquerade": null}]}},
      {"rule": {"family": "ip", "table": "vmatrix_lb_t", "chain": "dispatch_rr", "handle": 7, "expr": [
        {"vmap": {"key": {"numgen": {"mode": "inc", "mod": 2, "offset": 0}}, "data": {"set": [
          [0, {"jump": {"target": "be_10_77_5_10_7000"}}], [1, {"jump": {"target": "be_10_77_5_10_7000"}}]]}}}]}}]}"#;

    #[test]
    fn state_is_read_back_from_the_listing() {
        let st = parse_state(LISTED).unwrap();
        assert_eq!(st.vip, sa("10.77.5.100:7000"));
        assert_eq!(st.scheduler, Scheduler::RoundRobin);
        assert!(st.snat);
        assert_eq!(st.vip_dev.as_deref(), Some("lan0"));
        assert_eq!(st.servers[&sa("10.77.5.10:7000")], 2);
        assert_eq!(st.servers[&sa("10.77.5.2:7000")], 0, "draining");
        assert_eq!(st.counters["new_10_77_5_10_7000"], (7, 420));
    }

    #[test]
    fn scripts_name_every_object_of_the_state() {
        let mut st = parse_state(LISTED).unwrap();
        let create = create_script("t", &st);
        assert!(create.contains("delete table ip vmatrix_lb_t"), "{create}");
        assert!(create.contains("vipdev_6c616e30"));
        let mut new = st.servers.clone();
        new.remove(&sa("10.77.5.2:7000"));
        new.insert(sa("10.77.5.11:7000"), 1);
        let up = update_script("t", &st, &new);
        assert!(
            up.contains("add chain ip vmatrix_lb_t be_10_77_5_11_7000"),
            "{up}"
        );
        assert!(up.contains("numgen inc mod 3 vmap"), "{up}");
        assert!(
            up.contains("delete chain ip vmatrix_lb_t be_10_77_5_2_7000"),
            "{up}"
        );
        st.servers.clear();
        let none = update_script("t", &st, &BTreeMap::new());
        assert!(
            !none.contains("numgen"),
            "no server: no dispatch rule: {none}"
        );
    }

    #[test]
    fn broken_listings_are_typed_errors() {
        for j in ["", "{}", r#"{"nftables": []}"#, "[1,2]"] {
            assert!(matches!(parse_state(j), Err(LbError::Parse(_))), "{j}");
        }
        let bad_chain = LISTED.replace("be_10_77_5_2_7000", "be_10_77_999_2_7000");
        assert!(matches!(parse_state(&bad_chain), Err(LbError::Parse(_))));
    }
}
