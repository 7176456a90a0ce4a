//! A raw-socket MQTT client for the tests that must send what no library
//! client sends (wrong protocol levels, forbidden flags, packets one byte
//! over a limit) or see exactly the bytes the server answers with.
//! Packets are built by hand from the spec's layouts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// MQTT variable byte integer.
pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// A length-prefixed string or binary field.
pub fn field(b: &[u8]) -> Vec<u8> {
    let mut out = (b.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(b);
    out
}

/// A packet from its first byte and its body (remaining length added).
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// What goes into a CONNECT besides the client id and token.
#[derive(Clone)]
pub struct Connect<'a> {
    /// Protocol name and level: ("MQTT", 4) for 3.1.1, ("MQTT", 5) for 5.
    pub name: &'a str,
    pub level: u8,
    pub client_id: &'a str,
    /// The token, sent as password (with user name "u"), if any.
    pub password: Option<&'a str>,
    pub user_name: bool,
    pub clean: bool,
    pub keep_alive: u16,
    /// MQTT 5 CONNECT properties, encoded (without their length).
    pub props: Vec<u8>,
    /// Will (topic, payload, QoS, retain), with empty MQTT 5 will properties.
    pub will: Option<(&'a str, &'a [u8], u8, bool)>,
    /// Extra bits or'ed into the connect flags (to break the rules).
    pub extra_flags: u8,
}

impl<'a> Connect<'a> {
    pub fn v311(client_id: &'a str, token: &'a str) -> Connect<'a> {
        Connect {
            name: "MQTT",
            level: 4,
            client_id,
            password: Some(token),
            user_name: true,
            clean: true,
            keep_alive: 30,
            props: vec![],
            will: None,
            extra_flags: 0,
        }
    }

    pub fn v5(client_id: &'a str, token: &'a str) -> Connect<'a> {
        Connect {
            level: 5,
            ..Connect::v311(client_id, token)
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let v5 = self.level == 5;
        let mut flags = self.extra_flags;
        if self.clean {
            flags |= 0x02;
        }
        if let Some((_, _, qos, retain)) = self.will {
            flags |= 0x04 | (qos << 3) | if retain { 0x20 } else { 0 };
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.user_name {
            flags |= 0x80;
        }
        let mut body = field(self.name.as_bytes());
        body.push(self.level);
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if v5 {
            body.extend(varint(self.props.len()));
            body.extend_from_slice(&self.props);
        }
        body.extend(field(self.client_id.as_bytes()));
        if let Some((topic, payload, _, _)) = self.will {
            if v5 {
                body.push(0);
            }
            body.extend(field(topic.as_bytes()));
            body.extend(field(payload));
        }
        if self.user_name {
            body.extend(field(b"u"));
        }
        if let Some(pw) = self.password {
            body.extend(field(pw.as_bytes()));
        }
        packet(0x10, &body)
    }
}

/// A PUBLISH. `props` are MQTT 5 properties (ignored for 3.1.1).
pub fn publish(
    v5: bool,
    topic: &str,
    qos: u8,
    packet_id: u16,
    retain: bool,
    props: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = field(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    if v5 {
        body.extend(varint(props.len()));
        body.extend_from_slice(props);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | u8::from(retain), &body)
}

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// A packet from the server: its first byte and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub first: u8,
    pub body: Vec<u8>,
}

impl Packet {
    /// CONNACK: (session present, return/reason code).
    pub fn connack(&self) -> Option<(bool, u8)> {
        (self.first == 0x20 && self.body.len() >= 2).then(|| (self.body[0] == 1, self.body[1]))
    }

    /// MQTT 5 CONNACK properties as (id, value bytes) pairs.
    pub fn connack_props(&self) -> Vec<(u8, Vec<u8>)> {
        let mut out = vec![];
        let Some((len, n)) = read_varint(&self.body[2..]) else {
            return out;
        };
        let mut p = &self.body[2 + n..2 + n + len];
        while let Some((&id, rest)) = p.split_first() {
            let size = match id {
                0x11 | 0x27 => 4,
                0x21 | 0x13 => 2,
                0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
                0x22 => 2,
                // Strings: assigned client id, reason string, etc.
                _ => 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]])),
            };
            out.push((id, rest[..size].to_vec()));
            p = &rest[size..];
        }
        out
    }

    /// PUBACK: (packet id, reason code; 0 when absent).
    pub fn puback(&self) -> Option<(u16, u8)> {
        (self.first == 0x40 && self.body.len() >= 2).then(|| {
            (
                u16::from_be_bytes([self.body[0], self.body[1]]),
                self.body.get(2).copied().unwrap_or(0),
            )
        })
    }

    /// DISCONNECT (MQTT 5): its reason code.
    pub fn disconnect(&self) -> Option<u8> {
        (self.first == 0xE0).then(|| self.body.first().copied().unwrap_or(0))
    }
}

fn read_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut v = 0usize;
    for (i, &byte) in b.iter().take(4).enumerate() {
        v |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// What the server did next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Packet(Packet),
    Closed,
    Silent,
}

pub struct Raw {
    pub sock: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn open(addr: &str) -> Raw {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_nodelay(true).unwrap();
        Raw { sock, buf: vec![] }
    }

    /// Opens a connection and sends `connect`.
    pub fn connect(addr: &str, connect: &[u8]) -> Raw {
        let mut r = Raw::open(addr);
        r.send(connect);
        r
    }

    pub fn send(&mut self, bytes: &[u8]) {
        // The server may have closed already; what it answered is read next.
        let _ = self.sock.write_all(bytes);
    }

    /// The next packet, or the close, waiting at most `within`.
    pub fn next(&mut self, within: Duration) -> Next {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self.take_packet() {
                return Next::Packet(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Silent;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.sock.read(&mut chunk) {
                Ok(0) => return Next::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Next::Closed,
                Err(_) => return Next::Silent,
            }
        }
    }

    /// The next packet; panics on close or silence.
    pub fn expect(&mut self, within: Duration) -> Packet {
        match self.next(within) {
            Next::Packet(p) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// Every packet until the server closes (panics if it does not).
    pub fn until_closed(&mut self, within: Duration) -> Vec<Packet> {
        let deadline = Instant::now() + within;
        let mut got = vec![];
        loop {
            match self.next(deadline.saturating_duration_since(Instant::now())) {
                Next::Packet(p) => got.push(p),
                Next::Closed => return got,
                Next::Silent => panic!("not closed within {within:?}; got {got:?}"),
            }
        }
    }

    fn take_packet(&mut self) -> Option<Packet> {
        let (len, n) = read_varint(self.buf.get(1..)?)?;
        let total = 1 + n + len;
        if self.buf.len() < total {
            return None;
        }
        let p = Packet {
            first: self.buf[0],
            body: self.buf[1 + n..total].to_vec(),
        };
        self.buf.drain(..total);
        Some(p)
    }

    /// Connects and returns the CONNACK's return/reason code.
    pub fn connack_code(addr: &str, connect: &[u8]) -> (Raw, u8) {
        let mut r = Raw::connect(addr, connect);
        let p = r.expect(Duration::from_secs(5));
        let (_, code) = p
            .connack()
            .unwrap_or_else(|| panic!("not a CONNACK: {p:?}"));
        (r, code)
    }

    /// Whether the session answers a PINGREQ with PINGRESP next.
    pub fn alive(&mut self) -> bool {
        self.send(&PINGREQ);
        matches!(self.next(Duration::from_secs(5)), Next::Packet(p) if p.first == 0xD0)
    }
}
