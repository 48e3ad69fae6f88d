//! Renders the packet-filter layer of a policy as an nftables ruleset, so one policy drives both
//! layers: TCP is redirected to the proxy's transparent listeners (443 → `tls`, 80 → `plain`,
//! every other port → `catch_all`); DNS (UDP and TCP 53) to the DNS filter when `[listen] dns` is
//! set, or else allowed to the configured resolvers; other UDP, which the proxy cannot carry, is
//! allowed only by the policy's `protocol = "udp"` rules; QUIC (UDP 443) is
//! rejected so that clients fall back to TCP; every drop is logged with a prefix.
//!
//! Two shapes: `gateway` (a subnet routes through this machine: prerouting and forward hooks) and
//! `sidecar` (on the node itself: output hooks, exempting the proxy's own user). Pure: policy and
//! settings in, text out.

use std::fmt::Write;
use std::net::SocketAddr;

use ipnet::IpNet;

use crate::config::{Action, Config, Protocol};
use crate::policy::{Policy, PortSet};

#[derive(Clone, Copy, Debug, Eq, PartialEq, clap::ValueEnum)]
pub enum Shape {
    Gateway,
    Sidecar,
}

/// The listener ports the ruleset redirects to, from `[listen]`, or the documented defaults.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub tls: u16,
    pub plain: u16,
    pub catch_all: u16,
    pub http: Option<u16>,
    pub admin: Option<u16>,
    /// `[listen] dns`: the nodes' DNS is redirected there, and nothing else reaches a resolver.
    pub dns: Option<u16>,
}

impl Ports {
    pub fn of(config: &Config) -> Self {
        let port = |a: Option<SocketAddr>, default| a.map_or(default, |a| a.port());
        let l = &config.listen;
        Self {
            tls: port(l.tls, DEFAULT_TLS),
            plain: port(l.plain, DEFAULT_PLAIN),
            catch_all: port(l.catch_all, DEFAULT_CATCH_ALL),
            http: l.http.map(|a| a.port()),
            admin: l.admin.map(|a| a.port()),
            dns: l.dns.map(|a| a.port()),
        }
    }
}

/// The ruleset for `shape`, as `nft -f` reads it. It replaces the `inet egress_proxy` table whole.
pub fn render(policy: &Policy, config: &Config, shape: Shape) -> String {
    let ports = Ports::of(config);
    let nft = &config.nftables;
    let mut out = String::new();
    let shape_name = match shape {
        Shape::Gateway => "gateway",
        Shape::Sidecar => "sidecar",
    };
    let _ = writeln!(out, "#!/usr/sbin/nft -f");
    let _ = writeln!(out, "# Rendered by `egress-proxy nft --shape {shape_name}` from {}.", config.source.origin);
    let _ = writeln!(
        out,
        "# Do not edit: change the policy and render again. Remove with `nft delete table inet egress_proxy`."
    );
    let _ = writeln!(out, "table inet egress_proxy");
    let _ = writeln!(out, "delete table inet egress_proxy");
    let _ = writeln!(out, "table inet egress_proxy {{");

    // Sets: DNS resolvers, and the ranges of each UDP rule, by family.
    let (dns4, dns6): (Vec<IpNet>, Vec<IpNet>) =
        nft.dns.iter().map(|ip| IpNet::from(*ip)).partition(|n| matches!(n, IpNet::V4(_)));
    set(&mut out, "dns_v4", "ipv4_addr", &dns4);
    set(&mut out, "dns_v6", "ipv6_addr", &dns6);
    let udp: Vec<_> =
        policy.rules().iter().filter(|r| r.protocol == Protocol::Udp && r.action == Action::Allow).collect();
    for (i, r) in udp.iter().enumerate() {
        let (v4, v6): (Vec<IpNet>, Vec<IpNet>) = r.ranges.iter().partition(|n| matches!(n, IpNet::V4(_)));
        let _ = writeln!(
            out,
            "\t# rule {:?}: {}",
            r.name,
            r.tags.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(", ")
        );
        set(&mut out, &format!("udp_{i}_v4"), "ipv4_addr", &v4);
        set(&mut out, &format!("udp_{i}_v6"), "ipv6_addr", &v6);
    }

    // TCP: redirect to the transparent listeners.
    let (nat_hook, filter_hook) = match shape {
        Shape::Gateway => ("prerouting", "forward"),
        Shape::Sidecar => ("output", "output"),
    };
    let _ = writeln!(out, "\tchain to_proxy {{");
    // `dstnat` names -100 only on prerouting; output takes the number.
    let _ = writeln!(out, "\t\ttype nat hook {nat_hook} priority -100; policy accept;");
    match shape {
        Shape::Gateway => {
            let _ = writeln!(out, "\t\tiifname \"lo\" return");
            let _ = writeln!(out, "\t\tfib daddr type local return comment \"traffic for this machine itself\"");
        }
        Shape::Sidecar => {
            let _ = writeln!(out, "\t\tmeta skuid {} return comment \"the proxy's own connections\"", nft.proxy_uid);
            let _ = writeln!(out, "\t\toifname \"lo\" return");
            let _ = writeln!(out, "\t\tfib daddr type local return");
        }
    }
    if let Some(dns) = ports.dns {
        let _ = writeln!(
            out,
            "\t\tmeta l4proto {{ tcp, udp }} th dport 53 redirect to :{dns} comment \"DNS: the proxy's DNS filter\""
        );
    }
    let _ = writeln!(out, "\t\ttcp dport 443 redirect to :{} comment \"TLS: SNI listener\"", ports.tls);
    let _ = writeln!(out, "\t\ttcp dport 80 redirect to :{} comment \"plain HTTP: Host listener\"", ports.plain);
    let _ = writeln!(
        out,
        "\t\tmeta l4proto tcp redirect to :{} comment \"every other TCP port: refused and logged\"",
        ports.catch_all
    );
    let _ = writeln!(out, "\t}}");

    // Everything else: default drop, with the exceptions the policy names.
    let _ = writeln!(out, "\tchain egress {{");
    let _ = writeln!(out, "\t\ttype filter hook {filter_hook} priority filter; policy drop;");
    let _ = writeln!(out, "\t\tct state established,related accept");
    let _ = writeln!(out, "\t\tct state invalid drop");
    match shape {
        Shape::Gateway => {}
        Shape::Sidecar => {
            let _ = writeln!(out, "\t\toifname \"lo\" accept");
            let _ =
                writeln!(out, "\t\tmeta l4proto tcp ct status dnat accept comment \"redirected to the proxy above\"");
            if ports.dns.is_some() {
                let _ = writeln!(
                    out,
                    "\t\tmeta l4proto udp ct status dnat accept comment \"DNS redirected to the filter above\""
                );
            }
            let _ = writeln!(out, "\t\tmeta skuid {} accept comment \"the proxy dials out itself\"", nft.proxy_uid);
            for (what, port) in [("admin", ports.admin), ("http", ports.http)] {
                if let Some(p) = port {
                    let _ = writeln!(out, "\t\ttcp sport {p} accept comment \"replies from the {what} listener\"");
                }
            }
        }
    }
    // With the DNS filter, the nodes' DNS was redirected to it above, and only the proxy's own
    // queries (its user in the sidecar; its own output on the gateway) reach the resolvers.
    if ports.dns.is_none() {
        if !dns4.is_empty() {
            let _ = writeln!(out, "\t\tmeta l4proto {{ tcp, udp }} th dport 53 ip daddr @dns_v4 accept");
        }
        if !dns6.is_empty() {
            let _ = writeln!(out, "\t\tmeta l4proto {{ tcp, udp }} th dport 53 ip6 daddr @dns_v6 accept");
        }
    }
    let _ = writeln!(out, "\t\tudp dport 443 reject comment \"QUIC: clients fall back to TCP through the proxy\"");
    for (i, r) in udp.iter().enumerate() {
        let ports = port_list(&r.ports);
        let sources = source_match(&r.sources);
        for (family, suffix, empty) in [
            ("ip", "v4", r.ranges.iter().all(|n| !matches!(n, IpNet::V4(_)))),
            ("ip6", "v6", r.ranges.iter().all(|n| !matches!(n, IpNet::V6(_)))),
        ] {
            if !empty {
                let _ = writeln!(
                    out,
                    "\t\t{sources}udp dport {ports} {family} daddr @udp_{i}_{suffix} accept comment \"rule {}\"",
                    r.name
                );
            }
        }
    }
    if shape == Shape::Gateway {
        let _ = writeln!(out, "\t\tmeta l4proto tcp accept comment \"TCP was redirected to the proxy above\"");
    }
    let _ = writeln!(out, "\t\tlog prefix \"egress-proxy drop: \" level info");
    let _ = writeln!(out, "\t\tdrop");
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "}}");
    out
}

fn set(out: &mut String, name: &str, ty: &str, nets: &[IpNet]) {
    let _ = writeln!(out, "\tset {name} {{");
    let _ = writeln!(out, "\t\ttype {ty}; flags interval;");
    if !nets.is_empty() {
        let elements: Vec<String> = IpNet::aggregate(&nets.to_vec()).iter().map(|n| n.to_string()).collect();
        let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(", "));
    }
    let _ = writeln!(out, "\t}}");
}

/// One port or range as is (`443`, `8000-8080`), more as an anonymous set (`{ 80, 443 }`).
fn port_list(ports: &PortSet) -> String {
    match ports.ranges() {
        [one] => one.to_string(),
        many => format!("{{ {} }}", many.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
    }
}

fn source_match(sources: &[IpNet]) -> String {
    let v4: Vec<String> = sources.iter().filter(|n| matches!(n, IpNet::V4(_))).map(|n| n.to_string()).collect();
    match v4.as_slice() {
        [] => String::new(),
        list => format!("ip saddr {{ {} }} ", list.join(", ")),
    }
}

const DEFAULT_TLS: u16 = 3129;
const DEFAULT_PLAIN: u16 = 3130;
const DEFAULT_CATCH_ALL: u16 = 3131;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::load;

    #[test]
    fn the_preset_renders_udp_sets_dns_quic_reject_and_redirects() {
        let loaded = load(None, &[]).unwrap();
        let text = render(&loaded.compiled.policy, &loaded.config, Shape::Sidecar);
        assert!(text.contains("meta skuid 65532 return"), "{text}");
        assert!(text.contains("tcp dport 443 redirect to :3129"));
        assert!(text.contains("tcp dport 80 redirect to :3130"));
        assert!(text.contains("meta l4proto tcp redirect to :3131"));
        assert!(text.contains("elements = { 168.63.129.16/32 }"));
        assert!(text.contains("udp dport 443 reject"));
        assert!(text.contains("udp dport 5831 ip daddr @udp_0_v4 accept comment \"rule azureml-udp\""));
        assert!(text.contains("log prefix \"egress-proxy drop: \""));
        let gateway = render(&loaded.compiled.policy, &loaded.config, Shape::Gateway);
        assert!(gateway.contains("type nat hook prerouting") && gateway.contains("type filter hook forward"));
        assert!(!gateway.contains("skuid"));
        // The preset serves the DNS filter: the nodes' DNS goes to it, and to no resolver directly.
        for text in [&text, &gateway] {
            assert!(text.contains("meta l4proto { tcp, udp } th dport 53 redirect to :3053"), "{text}");
            assert!(!text.contains("th dport 53 ip daddr @dns_v4 accept"), "{text}");
        }
    }

    #[test]
    fn without_the_dns_filter_dns_goes_to_the_configured_resolvers_only() {
        let text =
            "[nftables]\ndns = [\"10.0.0.2\"]\n[[rule]]\nname = \"a\"\naction = \"allow\"\nhosts = [\"a.example\"]\n";
        let config = Config::from_str(text, crate::config::Origin::Embedded).unwrap();
        let compiled = crate::policy::compile(&config, &Default::default()).unwrap();
        let rendered = render(&compiled.policy, &config, Shape::Gateway);
        assert!(rendered.contains("th dport 53 ip daddr @dns_v4 accept"), "{rendered}");
        assert!(!rendered.contains("th dport 53 redirect"), "{rendered}");
    }
}
