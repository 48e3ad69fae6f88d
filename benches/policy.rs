//! Decision cost of `Policy::decide`, the hot path of every connection.
//!
//! - `policy::decide/host`: host-name decisions on the embedded Azure ML preset (real tag data).
//! - `policy::decide/ip`: address decisions with every tag of the whole weekly Service Tags file
//!   loaded (3,039 tags, 93,362 prefixes).
//! - `policy::decide/host_rules`: 10, 1 000 and 100 000 host rules; the cost should follow the
//!   labels of the name, not the number of rules.
//! - `policy::decide/cidr_rules`: 10, 1 000 and 100 000 CIDR rules.
//!
//! Policies are built before timing; inputs go through `black_box`.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use egress_proxy::config::{Config, Origin};
use egress_proxy::load::load;
use egress_proxy::policy::{compile, Host, Policy, Query};
use egress_proxy::service_tags::TagTable;

const FULL_TAGS: &str = include_str!("data/ServiceTags_Public_20251020.json");

fn host(s: &str) -> Host {
    Host::parse(s).unwrap()
}

fn preset() -> Policy {
    load(None, &[]).unwrap().compiled.policy
}

/// One allow rule per tag of the whole file.
fn every_tag() -> (Policy, TagTable) {
    let tags = TagTable::parse(FULL_TAGS).unwrap();
    let mut text = String::new();
    for (i, (name, _)) in tags.iter().enumerate() {
        text.push_str(&format!("[[rule]]\nname = \"t{i}\"\naction = \"allow\"\nservice_tags = [{name:?}]\n"));
    }
    let config = Config::from_str(&text, Origin::Embedded).unwrap();
    (compile(&config, &tags).unwrap().policy, tags)
}

/// `n` host rules: half exact names, half `*.` suffixes, spread over distinct domains.
fn host_rules(n: usize) -> Policy {
    let mut text = String::with_capacity(n * 80);
    for i in 0..n {
        let pattern = if i % 2 == 0 { format!("api{i}.svc{i}.example.com") } else { format!("*.svc{i}.example.net") };
        text.push_str(&format!("[[rule]]\nname = \"r{i}\"\naction = \"allow\"\nhosts = [\"{pattern}\"]\n"));
    }
    let config = Config::from_str(&text, Origin::Embedded).unwrap();
    compile(&config, &TagTable::default()).unwrap().policy
}

/// `n` CIDR rules of one /24 each, spread over 20.0.0.0/8 and 40.0.0.0/8.
fn cidr_rules(n: usize) -> Policy {
    let mut text = String::with_capacity(n * 80);
    for i in 0..n {
        let (a, b, c) = (if i % 2 == 0 { 20 } else { 40 }, (i / 2) / 256 % 256, (i / 2) % 256);
        text.push_str(&format!("[[rule]]\nname = \"c{i}\"\naction = \"allow\"\ncidrs = [\"{a}.{b}.{c}.0/24\"]\n"));
    }
    let config = Config::from_str(&text, Origin::Embedded).unwrap();
    compile(&config, &TagTable::default()).unwrap().policy
}

fn bench_preset(c: &mut Criterion) {
    let policy = preset();
    let mut g = c.benchmark_group("policy::decide/host");
    g.throughput(Throughput::Elements(1));
    for name in
        ["ml.azure.com", "abc.westus2.batch.azure.com", "westus2.data.mcr.microsoft.com", "exfil.attacker.example.com"]
    {
        let h = host(name);
        g.bench_with_input(BenchmarkId::from_parameter(name), &h, |b, h| {
            b.iter(|| policy.decide(black_box(&Query::new(h, 443))))
        });
    }
    g.finish();
}

fn bench_ip(c: &mut Criterion) {
    let (policy, tags) = every_tag();
    let aml: IpAddr = tags.get("AzureMachineLearning").unwrap().1[3].network();
    let cases: [(&str, IpAddr); 3] = [
        ("in_azureml", aml),
        ("outside_azure", "8.8.8.8".parse().unwrap()),
        ("ipv6", "2603:1030:f:1::1".parse().unwrap()),
    ];
    let mut g = c.benchmark_group("policy::decide/ip");
    g.throughput(Throughput::Elements(1));
    for (label, ip) in cases {
        let h = Host::from_ip(ip);
        g.bench_with_input(BenchmarkId::from_parameter(label), &h, |b, h| {
            b.iter(|| policy.decide(black_box(&Query::new(h, 443))))
        });
    }
    g.finish();
}

fn bench_scaling(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy::decide/host_rules");
    g.throughput(Throughput::Elements(1));
    for n in [10, 1_000, 100_000] {
        let policy = host_rules(n);
        // A matching suffix rule near the end, and a name that matches nothing.
        let hit = host(&format!("a.b.svc{}.example.net", n - 1));
        let miss = host("a.b.svc7.example.org");
        g.bench_with_input(BenchmarkId::new("hit", n), &hit, |b, h| {
            b.iter(|| policy.decide(black_box(&Query::new(h, 443))))
        });
        g.bench_with_input(BenchmarkId::new("miss", n), &miss, |b, h| {
            b.iter(|| policy.decide(black_box(&Query::new(h, 443))))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("policy::decide/cidr_rules");
    g.throughput(Throughput::Elements(1));
    for n in [10, 1_000, 100_000] {
        let policy = cidr_rules(n);
        let last = n - 1;
        let hit = Host::from_ip(IpAddr::from([
            if last % 2 == 0 { 20 } else { 40 },
            ((last / 2) / 256 % 256) as u8,
            ((last / 2) % 256) as u8,
            9,
        ]));
        g.bench_with_input(BenchmarkId::new("hit", n), &hit, |b, h| {
            b.iter(|| policy.decide(black_box(&Query::new(h, 443))))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Short runs: each decision takes nanoseconds, so 2 s of samples is plenty on 2 cores.
    config = Criterion::default().warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench_preset, bench_ip, bench_scaling
}
criterion_main!(benches);
