//! A DNS server on 127.0.0.1 (UDP, and TCP on the same port) that answers by the first label of
//! the name asked, and records every question: the resolver the proxy is pointed at with
//! `[resolve] upstream` in tests. Nothing here sends a packet anywhere but back to the asker.
//!
//! | first label | answer |
//! | --- | --- |
//! | `slow` | none, ever (a resolver that times out); TCP connections are held unanswered |
//! | `fail` | SERVFAIL |
//! | `nothing` | NOERROR with no records |
//! | `missing` | NXDOMAIN |
//! | `escape` | CNAME `leak.evil.test`, and its A 127.0.0.1 |
//! | `chain` | CNAME `edge.front.test`, and its A 127.0.0.1 |
//! | `rotate` | A 127.0.0.N, N counting up from 2 with every question |
//! | any other | A 127.0.0.1 (and no AAAA) |

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::{TcpListener, UdpSocket};

pub struct DnsServer {
    pub addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
}

impl DnsServer {
    pub async fn start() -> Self {
        let (udp, tcp) = bind_pair().await;
        let addr = udp.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let record = asked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                if let Some(q) = query.queries().first() {
                    record.lock().unwrap().push(format!("{} {}", q.name(), q.query_type()));
                }
                if let Some(answer) = answer(&query) {
                    // Answers go back to the asker, on loopback.
                    #[allow(clippy::disallowed_methods)]
                    let _ = udp.send_to(&answer, from).await;
                }
            }
        });
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = tcp.accept().await {
                held.push(s);
            }
        });
        Self { addr, asked }
    }

    /// Every question asked so far, as `name. TYPE`.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

/// A UDP and a TCP socket on the same free port of 127.0.0.1.
async fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

static ROTATE: AtomicU8 = AtomicU8::new(2);

fn answer(query: &Message) -> Option<Vec<u8>> {
    let q = query.queries().first()?;
    let label = q.name().iter().next().map(|l| String::from_utf8_lossy(l).to_lowercase()).unwrap_or_default();
    let mut resp = Message::new();
    resp.set_id(query.id()).set_message_type(MessageType::Response).set_recursion_desired(true);
    resp.set_recursion_available(true).add_query(q.clone());
    match label.as_str() {
        "slow" => return None,
        "fail" => {
            resp.set_response_code(ResponseCode::ServFail);
        }
        "missing" => {
            resp.set_response_code(ResponseCode::NXDomain);
        }
        "nothing" => {}
        "escape" | "chain" if q.query_type() == RecordType::A => {
            let target = if label == "escape" { "leak.evil.test." } else { "edge.front.test." };
            let target = Name::from_ascii(target).unwrap();
            resp.add_answer(Record::from_rdata(q.name().clone(), 60, RData::CNAME(CNAME(target.clone()))));
            resp.add_answer(Record::from_rdata(target, 60, RData::A(A(Ipv4Addr::LOCALHOST))));
        }
        "rotate" if q.query_type() == RecordType::A => {
            let n = ROTATE.fetch_add(1, Ordering::SeqCst);
            resp.add_answer(Record::from_rdata(q.name().clone(), 300, RData::A(A(Ipv4Addr::new(127, 0, 0, n)))));
        }
        _ if q.query_type() == RecordType::A => {
            resp.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A(Ipv4Addr::LOCALHOST))));
        }
        _ => {}
    }
    resp.to_vec().ok()
}
