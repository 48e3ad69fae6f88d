//! Built-in protections: addresses no rule can open, unless the operator names the range in
//! `[safety] allow_internal`.
//!
//! IPv6 forms that embed an IPv4 address (NAT64, 6to4, Teredo, IPv4-compatible) are judged by the
//! address they embed, so `64:ff9b::a9fe:a9fe` is as protected as `169.254.169.254`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::host::fold_mapped;

/// The built-in protections plus the operator's exceptions.
#[derive(Clone, Debug, Default)]
pub struct Safety {
    allow_internal: Vec<IpNet>,
}

impl Safety {
    pub fn new(allow_internal: Vec<IpNet>) -> Self {
        Self { allow_internal }
    }

    /// True when the address may be reached: it is not protected, or the operator allowed it.
    pub fn permits(&self, ip: IpAddr) -> bool {
        match judge(ip) {
            None => true,
            Some((addr, p)) => self.allow_internal.iter().any(|net| {
                // Metadata and wire-server addresses are opened only by naming the single address:
                // `allow_internal = ["169.254.0.0/16"]` must not expose the instance's credentials.
                net.contains(&addr) && (!p.exact_only || net.prefix_len() == net.max_prefix_len())
            }),
        }
    }
}

/// The name of the built-in protection that covers `ip`, judged on the embedded IPv4 address for
/// IPv6 forms that carry one.
pub fn classify(ip: IpAddr) -> Option<&'static str> {
    judge(ip).map(|(_, p)| p.name)
}

struct Protection {
    name: &'static str,
    /// Only an `allow_internal` entry naming exactly this address opens it.
    exact_only: bool,
}

/// The address that is judged (the embedded IPv4 address where there is a protected one) and the
/// protection that covers it.
fn judge(ip: IpAddr) -> Option<(IpAddr, &'static Protection)> {
    match fold_mapped(ip) {
        IpAddr::V4(v4) => {
            // Mask compares on integers: this runs for every address of every connection.
            let x = u32::from(v4);
            V4.iter()
                .find(|(net, _)| x & net_mask(net.prefix_len()) == u32::from(net.network()))
                .map(|(_, p)| (IpAddr::V4(v4), p))
        }
        IpAddr::V6(v6) => {
            if let Some(inner) = embedded_v6(v6).and_then(|v4| judge(IpAddr::V4(v4))) {
                return Some(inner);
            }
            V6.iter().find(|(net, _)| net.contains(&v6)).map(|(_, p)| (IpAddr::V6(v6), p))
        }
    }
}

/// The IPv4 address carried by NAT64 (RFC 6052, RFC 8215), 6to4 (RFC 3056), Teredo (RFC 4380,
/// client address, stored inverted) and IPv4-compatible (RFC 4291 §2.5.5.1, deprecated) addresses.
fn embedded_v6(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(v6);
    // Each shift and mask leaves at most 32 bits, so the `as u32` casts are lossless.
    let low32 = (bits & 0xffff_ffff) as u32;
    let seg = v6.segments();
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || seg[..3] == [0x64, 0xff9b, 1] {
        return Some(Ipv4Addr::from(low32));
    }
    if seg[0] == 0x2002 {
        return Some(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32));
    }
    if seg[0] == 0x2001 && seg[1] == 0 {
        return Some(Ipv4Addr::from(!low32));
    }
    if seg[..6] == [0; 6] && bits > 1 {
        return Some(Ipv4Addr::from(low32));
    }
    None
}

const fn net_mask(len: u8) -> u32 {
    match u32::MAX.checked_shl(32 - len as u32) {
        Some(m) => m,
        None => 0,
    }
}

const fn p(name: &'static str) -> Protection {
    Protection { name, exact_only: false }
}

const fn metadata(name: &'static str) -> Protection {
    Protection { name, exact_only: true }
}

static V4: [(Ipv4Net, Protection); 12] = [
    // Metadata first, so that it wins over the link-local range it sits in.
    (v4net([169, 254, 169, 254], 32), metadata("cloud_metadata")),
    (v4net([168, 63, 129, 16], 32), metadata("azure_wire_server")),
    (v4net([0, 0, 0, 0], 8), p("unspecified")),
    (v4net([10, 0, 0, 0], 8), p("private")),
    (v4net([100, 64, 0, 0], 10), p("cgnat")),
    (v4net([127, 0, 0, 0], 8), p("loopback")),
    (v4net([169, 254, 0, 0], 16), p("link_local")),
    (v4net([172, 16, 0, 0], 12), p("private")),
    (v4net([192, 0, 0, 0], 24), p("ietf_protocol_assignments")),
    (v4net([192, 168, 0, 0], 16), p("private")),
    (v4net([224, 0, 0, 0], 4), p("multicast")),
    // 240.0.0.0/4 is reserved and holds the limited broadcast address 255.255.255.255.
    (v4net([240, 0, 0, 0], 4), p("reserved_or_broadcast")),
];

static V6: [(Ipv6Net, Protection); 6] = [
    (v6net([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128), metadata("cloud_metadata")),
    (v6net([0, 0, 0, 0, 0, 0, 0, 0], 128), p("unspecified")),
    (v6net([0, 0, 0, 0, 0, 0, 0, 1], 128), p("loopback")),
    (v6net([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), p("unique_local")),
    (v6net([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), p("link_local")),
    (v6net([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), p("multicast")),
];

const fn v4net(o: [u8; 4], len: u8) -> Ipv4Net {
    match Ipv4Net::new(Ipv4Addr::new(o[0], o[1], o[2], o[3]), len) {
        Ok(n) => n,
        Err(_) => panic!("prefix length is at most 32"),
    }
}

const fn v6net(s: [u16; 8], len: u8) -> Ipv6Net {
    match Ipv6Net::new(Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]), len) {
        Ok(n) => n,
        Err(_) => panic!("prefix length is at most 128"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn protects_every_internal_range_and_its_boundaries() {
        let protected = [
            ("0.0.0.0", "unspecified"),
            ("10.0.0.5", "private"),
            ("100.64.0.0", "cgnat"),
            ("100.127.255.255", "cgnat"),
            ("127.0.0.1", "loopback"),
            ("169.254.169.254", "cloud_metadata"),
            ("168.63.129.16", "azure_wire_server"),
            ("169.254.1.1", "link_local"),
            ("172.16.0.0", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved_or_broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fd00:ec2::254", "cloud_metadata"),
            ("fc00::1", "unique_local"),
            ("fe80::1", "link_local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "cloud_metadata"),
            ("64:ff9b:1::a00:5", "private"),
            ("2002:7f00:1::", "loopback"),
            ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"), // client 10.0.0.1, inverted
            ("::10.0.0.1", "private"),
        ];
        for (addr, name) in protected {
            assert_eq!(classify(ip(addr)), Some(name), "{addr}");
            assert!(!Safety::default().permits(ip(addr)), "{addr}");
        }
        let public = [
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "20.42.0.1",
            "2603:1030::1",
            "64:ff9b::1414:1414",
            "2002:1414:1414::",
            "168.63.129.17",
        ];
        for addr in public {
            assert_eq!(classify(ip(addr)), None, "{addr}");
            assert!(Safety::default().permits(ip(addr)), "{addr}");
        }
    }

    #[test]
    fn allow_internal_opens_only_what_it_names() {
        let s = Safety::new(vec!["127.0.0.0/8".parse().unwrap(), "169.254.0.0/16".parse().unwrap()]);
        assert!(s.permits(ip("127.0.0.1")));
        assert!(s.permits(ip("::ffff:127.0.0.1")));
        assert!(s.permits(ip("169.254.1.1")));
        assert!(!s.permits(ip("169.254.169.254")), "metadata needs its own /32");
        assert!(!s.permits(ip("10.0.0.5")));
        assert!(!s.permits(ip("::1")));
        let exact = Safety::new(vec!["169.254.169.254/32".parse().unwrap()]);
        assert!(exact.permits(ip("169.254.169.254")));
    }
}
