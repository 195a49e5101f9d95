//! A small packet builder for BPF_PROG_TEST_RUN: Ethernet with up to two VLAN
//! tags, IPv4 (options, fragments, any lengths) or IPv6 (extension-header
//! chains), TCP, UDP or ICMP, and payload. Lengths and checksums are right by
//! default; every field the parser looks at can be overridden, and the
//! finished frame can be truncated at any byte or corrupted afterwards.
//!
//! ```
//! use portcullis_testkit::packet::Packet;
//! let frame = Packet::tcp4([10, 0, 0, 2], [10, 0, 0, 1], 40000, 8000)
//!     .syn()
//!     .vlan(10)
//!     .build();
//! assert_eq!(frame.len(), 14 + 4 + 20 + 20);
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

// IPv6 extension header numbers (RFC 8200 §4, RFC 4302).
pub const NH_HOP_BY_HOP: u8 = 0;
pub const NH_ROUTING: u8 = 43;
pub const NH_FRAGMENT: u8 = 44;
pub const NH_AH: u8 = 51;
pub const NH_DEST_OPTS: u8 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Where each header starts in a built frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Start of the IP header (after Ethernet and VLAN tags).
    pub l3: usize,
    /// Start of the upper-layer header (after IPv4 options / IPv6 extensions).
    pub l4: usize,
    /// Start of the payload.
    pub payload: usize,
    /// Frame length before any truncation.
    pub len: usize,
}

#[derive(Clone, Debug)]
enum L3 {
    V4(V4),
    V6(V6),
    /// A non-IP EtherType carrying opaque bytes (ARP, ...).
    Other(u16, Vec<u8>),
}

#[derive(Clone, Debug)]
struct V4 {
    src: [u8; 4],
    dst: [u8; 4],
    version: u8,
    ihl: Option<u8>,
    options: Vec<u8>,
    tot_len: Option<u16>,
    id: u16,
    dont_fragment: bool,
    more_fragments: bool,
    /// In 8-octet units (RFC 791).
    frag_offset: u16,
    ttl: u8,
    proto: Option<u8>,
    checksum: Option<u16>,
}

#[derive(Clone, Debug)]
struct V6 {
    src: [u8; 16],
    dst: [u8; 16],
    version: u8,
    payload_len: Option<u16>,
    hop_limit: u8,
    next_header: Option<u8>,
    ext: Vec<Ext>,
}

/// An IPv6 extension header. Its Next Header byte is filled in by the
/// builder from whatever follows it in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options, `(len + 1) * 8` octets of padding options.
    HopByHop { len: u8 },
    /// Routing header (type 253, experimental; segments left 0).
    Routing { len: u8 },
    /// Destination options, like hop-by-hop.
    DestOpts { len: u8 },
    /// Fragment header: offset in 8-octet units, M flag.
    Fragment { offset: u16, more: bool, id: u32 },
    /// Authentication header with `icv_words` 32-bit words of ICV
    /// (12 + 4 * icv_words octets; use an odd count for 8-octet alignment).
    Ah { icv_words: u8 },
    /// Any header: its number and its raw bytes (first byte overwritten
    /// with the next header).
    Raw { code: u8, bytes: Vec<u8> },
}

impl Ext {
    pub fn code(&self) -> u8 {
        match self {
            Ext::HopByHop { .. } => NH_HOP_BY_HOP,
            Ext::Routing { .. } => NH_ROUTING,
            Ext::DestOpts { .. } => NH_DEST_OPTS,
            Ext::Fragment { .. } => NH_FRAGMENT,
            Ext::Ah { .. } => NH_AH,
            Ext::Raw { code, .. } => *code,
        }
    }

    fn encode(&self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop { len } | Ext::DestOpts { len } => {
                let total = (*len as usize + 1) * 8;
                let mut b = vec![next, *len];
                // One PadN option (RFC 8200 §4.2) fills the rest.
                b.push(1);
                b.push((total - 4) as u8);
                b.resize(total, 0);
                b
            }
            Ext::Routing { len } => {
                let total = (*len as usize + 1) * 8;
                let mut b = vec![next, *len, 253, 0];
                b.resize(total, 0);
                b
            }
            Ext::Fragment { offset, more, id } => {
                let field = (offset << 3) | u16::from(*more);
                let mut b = vec![next, 0];
                b.extend_from_slice(&field.to_be_bytes());
                b.extend_from_slice(&id.to_be_bytes());
                b
            }
            Ext::Ah { icv_words } => {
                let total = 12 + 4 * *icv_words as usize;
                // RFC 4302 §2.2: length in 32-bit words, minus 2.
                let mut b = vec![next, (total / 4 - 2) as u8, 0, 0];
                b.extend_from_slice(&0x100u32.to_be_bytes()); // SPI
                b.extend_from_slice(&1u32.to_be_bytes()); // sequence number
                b.resize(total, 0xa5);
                b
            }
            Ext::Raw { bytes, .. } => {
                let mut b = bytes.clone();
                if let Some(first) = b.first_mut() {
                    *first = next;
                }
                b
            }
        }
    }
}

#[derive(Clone, Debug)]
enum L4 {
    Tcp(Tcp),
    Udp(Udp),
    /// ICMP / ICMPv6 echo request.
    Icmp,
    /// No upper-layer header (the payload follows the IP header directly).
    None,
}

#[derive(Clone, Debug)]
struct Tcp {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    data_offset: Option<u8>,
    options: Vec<u8>,
    window: u16,
}

#[derive(Clone, Debug)]
struct Udp {
    sport: u16,
    dport: u16,
    len: Option<u16>,
}

/// A frame under construction. Start with one of the constructors, chain
/// modifiers, finish with [`Packet::build`].
#[derive(Clone, Debug)]
pub struct Packet {
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    /// (TPID, TCI), outermost first.
    vlans: Vec<(u16, u16)>,
    ether_type: Option<u16>,
    l3: L3,
    l4: L4,
    payload: Vec<u8>,
    truncate: Option<Cut>,
    pokes: Vec<(Base, usize, u8)>,
    /// Bytes after the IP packet (Ethernet padding), outside every length.
    trailer: usize,
}

#[derive(Clone, Copy, Debug)]
enum Base {
    Frame,
    L3,
    L4,
}

#[derive(Clone, Copy, Debug)]
struct Cut {
    base: Base,
    at: usize,
    /// The IP length field is rewritten to end where the cut is: a short
    /// but self-consistent packet rather than a damaged frame.
    consistent: bool,
}

impl Packet {
    fn new(l3: L3, l4: L4) -> Packet {
        Packet {
            eth_dst: [0x02, 0, 0, 0, 0, 0x01],
            eth_src: [0x02, 0, 0, 0, 0, 0x02],
            vlans: Vec::new(),
            ether_type: None,
            l3,
            l4,
            payload: Vec::new(),
            truncate: None,
            pokes: Vec::new(),
            trailer: 0,
        }
    }

    fn v4(src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>) -> L3 {
        L3::V4(V4 {
            src: src.into().octets(),
            dst: dst.into().octets(),
            version: 4,
            ihl: None,
            options: Vec::new(),
            tot_len: None,
            id: 0x1234,
            dont_fragment: false,
            more_fragments: false,
            frag_offset: 0,
            ttl: 64,
            proto: None,
            checksum: None,
        })
    }

    fn v6(src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>) -> L3 {
        L3::V6(V6 {
            src: src.into().octets(),
            dst: dst.into().octets(),
            version: 6,
            payload_len: None,
            hop_limit: 64,
            next_header: None,
            ext: Vec::new(),
        })
    }

    fn tcp_hdr(sport: u16, dport: u16) -> L4 {
        L4::Tcp(Tcp {
            sport,
            dport,
            seq: 1000,
            ack: 0,
            flags: 0,
            data_offset: None,
            options: Vec::new(),
            window: 65535,
        })
    }

    fn udp_hdr(sport: u16, dport: u16) -> L4 {
        L4::Udp(Udp {
            sport,
            dport,
            len: None,
        })
    }

    /// TCP over IPv4, no flags set yet.
    pub fn tcp4(
        src: impl Into<Ipv4Addr>,
        dst: impl Into<Ipv4Addr>,
        sport: u16,
        dport: u16,
    ) -> Packet {
        Packet::new(Self::v4(src, dst), Self::tcp_hdr(sport, dport))
    }

    /// TCP over IPv6, no flags set yet.
    pub fn tcp6(
        src: impl Into<Ipv6Addr>,
        dst: impl Into<Ipv6Addr>,
        sport: u16,
        dport: u16,
    ) -> Packet {
        Packet::new(Self::v6(src, dst), Self::tcp_hdr(sport, dport))
    }

    pub fn udp4(
        src: impl Into<Ipv4Addr>,
        dst: impl Into<Ipv4Addr>,
        sport: u16,
        dport: u16,
    ) -> Packet {
        Packet::new(Self::v4(src, dst), Self::udp_hdr(sport, dport))
    }

    pub fn udp6(
        src: impl Into<Ipv6Addr>,
        dst: impl Into<Ipv6Addr>,
        sport: u16,
        dport: u16,
    ) -> Packet {
        Packet::new(Self::v6(src, dst), Self::udp_hdr(sport, dport))
    }

    /// ICMP echo request over IPv4.
    pub fn icmp4(src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>) -> Packet {
        Packet::new(Self::v4(src, dst), L4::Icmp)
    }

    /// ICMPv6 echo request.
    pub fn icmp6(src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>) -> Packet {
        Packet::new(Self::v6(src, dst), L4::Icmp)
    }

    /// IPv4 with protocol `proto` and no upper-layer header of ours (the
    /// payload follows the IP header).
    pub fn ip4_raw(src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>, proto: u8) -> Packet {
        Packet::new(Self::v4(src, dst), L4::None).protocol(proto)
    }

    /// A non-IP frame: EtherType and body as given.
    pub fn ethernet(ether_type: u16, body: &[u8]) -> Packet {
        Packet::new(L3::Other(ether_type, body.to_vec()), L4::None)
    }

    /// An ARP request (who-has `target` tell `sender`).
    pub fn arp(sender: impl Into<Ipv4Addr>, target: impl Into<Ipv4Addr>) -> Packet {
        let mut b = vec![0, 1, 8, 0, 6, 4, 0, 1];
        b.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        b.extend_from_slice(&sender.into().octets());
        b.extend_from_slice(&[0; 6]);
        b.extend_from_slice(&target.into().octets());
        Packet::ethernet(ETH_P_ARP, &b)
    }

    // ---- Ethernet ----

    /// Adds an 802.1Q tag (TPID 0x8100) inside any tags already present.
    pub fn vlan(self, vid: u16) -> Packet {
        self.tag(ETH_P_8021Q, vid)
    }

    /// QinQ: an 802.1ad service tag (0x88a8) outside an 802.1Q customer tag.
    pub fn qinq(self, outer: u16, inner: u16) -> Packet {
        self.tag(ETH_P_8021AD, outer).tag(ETH_P_8021Q, inner)
    }

    /// Adds a tag with any TPID (innermost so far).
    pub fn tag(mut self, tpid: u16, vid: u16) -> Packet {
        self.vlans.push((tpid, vid & 0x0fff));
        self
    }

    /// Overrides the innermost EtherType (e.g. IPv6 bytes labelled IPv4).
    pub fn ether_type(mut self, t: u16) -> Packet {
        self.ether_type = Some(t);
        self
    }

    // ---- IP ----

    fn v4_mut(&mut self) -> &mut V4 {
        match &mut self.l3 {
            L3::V4(v) => v,
            _ => panic!("not an IPv4 packet"),
        }
    }

    fn v6_mut(&mut self) -> &mut V6 {
        match &mut self.l3 {
            L3::V6(v) => v,
            _ => panic!("not an IPv6 packet"),
        }
    }

    /// IP version nibble (IPv4 or IPv6 header) as written on the wire.
    pub fn ip_version(mut self, v: u8) -> Packet {
        match &mut self.l3 {
            L3::V4(h) => h.version = v,
            L3::V6(h) => h.version = v,
            L3::Other(..) => panic!("not an IP packet"),
        }
        self
    }

    /// IPv4 options (padded with zeros, End of Options List, to 4 octets).
    pub fn ip_options(mut self, opts: &[u8]) -> Packet {
        let h = self.v4_mut();
        h.options = opts.to_vec();
        while !h.options.len().is_multiple_of(4) {
            h.options.push(0);
        }
        self
    }

    /// IPv4 IHL as written (in 32-bit words); by default it matches the
    /// options. The header bytes laid out stay 20 + options.
    pub fn ihl(mut self, words: u8) -> Packet {
        self.v4_mut().ihl = Some(words);
        self
    }

    /// IPv4 total length as written (default: the real length).
    pub fn total_len(mut self, len: u16) -> Packet {
        self.v4_mut().tot_len = Some(len);
        self
    }

    /// IPv4 fragment: offset in 8-octet units and the More Fragments flag.
    pub fn fragment(mut self, offset_units: u16, more: bool) -> Packet {
        let h = self.v4_mut();
        h.frag_offset = offset_units & 0x1fff;
        h.more_fragments = more;
        self
    }

    pub fn dont_fragment(mut self) -> Packet {
        self.v4_mut().dont_fragment = true;
        self
    }

    /// IPv4 protocol / IPv6 upper-layer Next Header as written.
    pub fn protocol(mut self, proto: u8) -> Packet {
        match &mut self.l3 {
            L3::V4(h) => h.proto = Some(proto),
            L3::V6(h) => h.next_header = Some(proto),
            L3::Other(..) => panic!("not an IP packet"),
        }
        self
    }

    /// IPv4 header checksum as written (default: correct).
    pub fn ip_checksum(mut self, sum: u16) -> Packet {
        self.v4_mut().checksum = Some(sum);
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Packet {
        match &mut self.l3 {
            L3::V4(h) => h.ttl = ttl,
            L3::V6(h) => h.hop_limit = ttl,
            L3::Other(..) => panic!("not an IP packet"),
        }
        self
    }

    /// Appends an IPv6 extension header to the chain (in order).
    pub fn ext(mut self, e: Ext) -> Packet {
        self.v6_mut().ext.push(e);
        self
    }

    /// IPv6 payload length as written (default: the real length).
    pub fn payload_len(mut self, len: u16) -> Packet {
        self.v6_mut().payload_len = Some(len);
        self
    }

    // ---- TCP / UDP ----

    fn tcp_mut(&mut self) -> &mut Tcp {
        match &mut self.l4 {
            L4::Tcp(t) => t,
            _ => panic!("not a TCP packet"),
        }
    }

    /// Sets exactly these TCP flags.
    pub fn flags(mut self, flags: u8) -> Packet {
        self.tcp_mut().flags = flags;
        self
    }

    pub fn syn(self) -> Packet {
        self.flags(TCP_SYN)
    }

    pub fn ack(self) -> Packet {
        self.flags(TCP_ACK)
    }

    pub fn syn_ack(self) -> Packet {
        self.flags(TCP_SYN | TCP_ACK)
    }

    pub fn seq(mut self, seq: u32, ack: u32) -> Packet {
        let t = self.tcp_mut();
        t.seq = seq;
        t.ack = ack;
        self
    }

    /// TCP options (padded with zeros, End of Option List, to 4 octets).
    pub fn tcp_options(mut self, opts: &[u8]) -> Packet {
        let t = self.tcp_mut();
        t.options = opts.to_vec();
        while !t.options.len().is_multiple_of(4) {
            t.options.push(0);
        }
        self
    }

    /// TCP data offset as written, in 32-bit words (default: matches options).
    pub fn data_offset(mut self, words: u8) -> Packet {
        self.tcp_mut().data_offset = Some(words);
        self
    }

    /// UDP length field as written (default: header + payload).
    pub fn udp_len(mut self, len: u16) -> Packet {
        match &mut self.l4 {
            L4::Udp(u) => u.len = Some(len),
            _ => panic!("not a UDP packet"),
        }
        self
    }

    pub fn payload(mut self, bytes: &[u8]) -> Packet {
        self.payload = bytes.to_vec();
        self
    }

    /// Pads the payload so the whole frame is exactly `len` bytes.
    pub fn frame_len(self, len: usize) -> Packet {
        let now = self.layout().len;
        assert!(
            len >= now - self.payload.len(),
            "headers alone are longer than {len}"
        );
        let want = len - (now - self.payload.len());
        let mut p = self;
        p.payload.resize(want, 0x5a);
        p
    }

    // ---- damage ----

    /// Cuts the finished frame to its first `n` bytes.
    pub fn truncate(mut self, n: usize) -> Packet {
        self.truncate = Some(Cut {
            base: Base::Frame,
            at: n,
            consistent: false,
        });
        self
    }

    /// Cuts the frame `n` bytes into the IP header.
    pub fn truncate_l3(mut self, n: usize) -> Packet {
        self.truncate = Some(Cut {
            base: Base::L3,
            at: n,
            consistent: false,
        });
        self
    }

    /// Cuts the frame `n` bytes into the upper-layer header (after IPv4
    /// options and IPv6 extension headers).
    pub fn truncate_l4(mut self, n: usize) -> Packet {
        self.truncate = Some(Cut {
            base: Base::L4,
            at: n,
            consistent: false,
        });
        self
    }

    /// Ends the IP packet `n` bytes into the upper-layer header: the frame
    /// is cut there *and* the IPv4 total length (with its checksum) or the
    /// IPv6 payload length says so. A short but consistent packet, where
    /// [`Packet::truncate_l4`] leaves lengths that promise more.
    pub fn cut_l4(mut self, n: usize) -> Packet {
        self.truncate = Some(Cut {
            base: Base::L4,
            at: n,
            consistent: true,
        });
        self
    }

    /// Appends `n` bytes after the IP packet that no length field counts
    /// (what Ethernet padding of a short frame looks like).
    pub fn trailer(mut self, n: usize) -> Packet {
        self.trailer = n;
        self
    }

    /// Overwrites one byte of the finished frame (after checksums).
    pub fn poke(mut self, offset: usize, byte: u8) -> Packet {
        self.pokes.push((Base::Frame, offset, byte));
        self
    }

    /// Overwrites one byte `offset` bytes into the IP header.
    pub fn poke_l3(mut self, offset: usize, byte: u8) -> Packet {
        self.pokes.push((Base::L3, offset, byte));
        self
    }

    /// Overwrites one byte `offset` bytes into the upper-layer header.
    pub fn poke_l4(mut self, offset: usize, byte: u8) -> Packet {
        self.pokes.push((Base::L4, offset, byte));
        self
    }

    // ---- output ----

    /// Where the headers will be, without building.
    pub fn layout(&self) -> Layout {
        self.encode().1
    }

    pub fn build(&self) -> Vec<u8> {
        self.build_with_layout().0
    }

    pub fn build_with_layout(&self) -> (Vec<u8>, Layout) {
        let (mut frame, layout) = self.encode();
        let at = |base: Base, off: usize| match base {
            Base::Frame => off,
            Base::L3 => layout.l3 + off,
            Base::L4 => layout.l4 + off,
        };
        for &(base, off, byte) in &self.pokes {
            let i = at(base, off);
            assert!(
                i < frame.len(),
                "poke at {i} outside a {}-byte frame",
                frame.len()
            );
            frame[i] = byte;
        }
        if let Some(cut) = self.truncate {
            let end = at(cut.base, cut.at);
            frame.truncate(end);
            if cut.consistent {
                self.rewrite_ip_length(&mut frame, &layout, end);
            }
        }
        frame.resize(frame.len() + self.trailer, 0);
        (frame, layout)
    }

    /// Makes the IP length field end the packet at `end` (a frame offset).
    fn rewrite_ip_length(&self, frame: &mut [u8], layout: &Layout, end: usize) {
        let l3 = layout.l3;
        match &self.l3 {
            L3::V4(_) => {
                let tot = (end - l3) as u16;
                frame[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
                frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
                let ihl = usize::from(frame[l3] & 0x0f) * 4;
                let sum = checksum(&[&frame[l3..l3 + ihl]]);
                frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
            }
            L3::V6(_) => {
                let len = (end - l3 - 40) as u16;
                frame[l3 + 4..l3 + 6].copy_from_slice(&len.to_be_bytes());
            }
            L3::Other(..) => {}
        }
    }

    fn encode(&self) -> (Vec<u8>, Layout) {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.eth_dst);
        f.extend_from_slice(&self.eth_src);
        let inner_type = match &self.l3 {
            L3::V4(_) => ETH_P_IPV4,
            L3::V6(_) => ETH_P_IPV6,
            L3::Other(t, _) => *t,
        };
        let inner_type = self.ether_type.unwrap_or(inner_type);
        // Each TPID sits where the previous header's EtherType goes; the
        // innermost tag carries the payload's EtherType.
        for (tpid, vid) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&inner_type.to_be_bytes());
        let l3 = f.len();
        let l4_bytes = self.encode_l4();
        let (l3_bytes, hdr_len) = match &self.l3 {
            L3::V4(h) => {
                let hdr = self.encode_v4(h, l4_bytes.len());
                let n = hdr.len();
                (hdr, n)
            }
            L3::V6(h) => {
                let hdr = self.encode_v6(h, l4_bytes.len());
                let n = hdr.len();
                (hdr, n)
            }
            L3::Other(_, body) => (body.clone(), body.len()),
        };
        f.extend_from_slice(&l3_bytes);
        let l4 = l3 + hdr_len;
        f.extend_from_slice(&l4_bytes);
        let payload = f.len() - self.payload.len();
        let len = f.len();
        (
            f,
            Layout {
                l3,
                l4,
                payload,
                len,
            },
        )
    }

    fn upper_proto(&self) -> u8 {
        let v6 = matches!(self.l3, L3::V6(_));
        match self.l4 {
            L4::Tcp(_) => IPPROTO_TCP,
            L4::Udp(_) => IPPROTO_UDP,
            L4::Icmp if v6 => IPPROTO_ICMPV6,
            L4::Icmp => IPPROTO_ICMP,
            L4::None => 255,
        }
    }

    /// Upper-layer header and payload, checksummed against the pseudo header.
    fn encode_l4(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match &self.l4 {
            L4::Tcp(t) => {
                let words = (20 + t.options.len()) / 4;
                let doff = t.data_offset.unwrap_or(words as u8);
                b.extend_from_slice(&t.sport.to_be_bytes());
                b.extend_from_slice(&t.dport.to_be_bytes());
                b.extend_from_slice(&t.seq.to_be_bytes());
                b.extend_from_slice(&t.ack.to_be_bytes());
                b.push(doff << 4);
                b.push(t.flags);
                b.extend_from_slice(&t.window.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                b.extend_from_slice(&t.options);
                b.extend_from_slice(&self.payload);
                let sum = self.l4_checksum(IPPROTO_TCP, &b);
                b[16..18].copy_from_slice(&sum.to_be_bytes());
            }
            L4::Udp(u) => {
                let len = u.len.unwrap_or((8 + self.payload.len()) as u16);
                b.extend_from_slice(&u.sport.to_be_bytes());
                b.extend_from_slice(&u.dport.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(&self.payload);
                let mut sum = self.l4_checksum(IPPROTO_UDP, &b);
                if sum == 0 {
                    sum = 0xffff; // RFC 768: zero means "no checksum"
                }
                b[6..8].copy_from_slice(&sum.to_be_bytes());
            }
            L4::Icmp => {
                let v6 = matches!(self.l3, L3::V6(_));
                b.push(if v6 { 128 } else { 8 }); // echo request
                b.extend_from_slice(&[0, 0, 0, 0, 1, 0, 1]); // code, sum, id, seq
                b.extend_from_slice(&self.payload);
                let sum = if v6 {
                    self.l4_checksum(IPPROTO_ICMPV6, &b)
                } else {
                    checksum(&[&b])
                };
                b[2..4].copy_from_slice(&sum.to_be_bytes());
            }
            L4::None => b.extend_from_slice(&self.payload),
        }
        b
    }

    fn l4_checksum(&self, proto: u8, seg: &[u8]) -> u16 {
        let len = seg.len() as u32;
        match &self.l3 {
            L3::V4(h) => {
                let mut ph = Vec::with_capacity(12);
                ph.extend_from_slice(&h.src);
                ph.extend_from_slice(&h.dst);
                ph.extend_from_slice(&[0, proto]);
                ph.extend_from_slice(&(len as u16).to_be_bytes());
                checksum(&[&ph, seg])
            }
            L3::V6(h) => {
                let mut ph = Vec::with_capacity(40);
                ph.extend_from_slice(&h.src);
                ph.extend_from_slice(&h.dst);
                ph.extend_from_slice(&len.to_be_bytes());
                ph.extend_from_slice(&[0, 0, 0, proto]);
                checksum(&[&ph, seg])
            }
            L3::Other(..) => 0,
        }
    }

    fn encode_v4(&self, h: &V4, upper_len: usize) -> Vec<u8> {
        let hdr_len = 20 + h.options.len();
        let ihl = h.ihl.unwrap_or((hdr_len / 4) as u8);
        let tot_len = h.tot_len.unwrap_or((hdr_len + upper_len) as u16);
        let mut frags = h.frag_offset & 0x1fff;
        if h.dont_fragment {
            frags |= 0x4000;
        }
        if h.more_fragments {
            frags |= 0x2000;
        }
        let mut b = Vec::with_capacity(hdr_len);
        b.push((h.version << 4) | (ihl & 0x0f));
        b.push(0); // DSCP/ECN
        b.extend_from_slice(&tot_len.to_be_bytes());
        b.extend_from_slice(&h.id.to_be_bytes());
        b.extend_from_slice(&frags.to_be_bytes());
        b.push(h.ttl);
        b.push(h.proto.unwrap_or_else(|| self.upper_proto()));
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&h.src);
        b.extend_from_slice(&h.dst);
        b.extend_from_slice(&h.options);
        let sum = h.checksum.unwrap_or_else(|| checksum(&[&b]));
        b[10..12].copy_from_slice(&sum.to_be_bytes());
        b
    }

    fn encode_v6(&self, h: &V6, upper_len: usize) -> Vec<u8> {
        let upper = h.next_header.unwrap_or_else(|| self.upper_proto());
        let mut ext = Vec::new();
        for (i, e) in h.ext.iter().enumerate() {
            let next = h.ext.get(i + 1).map_or(upper, Ext::code);
            ext.extend_from_slice(&e.encode(next));
        }
        let first = h.ext.first().map_or(upper, Ext::code);
        let payload_len = h.payload_len.unwrap_or((ext.len() + upper_len) as u16);
        let mut b = Vec::with_capacity(40 + ext.len());
        b.extend_from_slice(&[h.version << 4, 0, 0, 0]); // traffic class, flow label 0
        b.extend_from_slice(&payload_len.to_be_bytes());
        b.push(first);
        b.push(h.hop_limit);
        b.extend_from_slice(&h.src);
        b.extend_from_slice(&h.dst);
        b.extend_from_slice(&ext);
        b
    }
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &byte in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, byte])),
                None => odd = Some(byte),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const C4: [u8; 4] = [10, 0, 0, 2];
    const S4: [u8; 4] = [10, 0, 0, 1];

    fn c6() -> Ipv6Addr {
        "fd00::2".parse().unwrap()
    }
    fn s6() -> Ipv6Addr {
        "fd00::1".parse().unwrap()
    }

    #[test]
    fn ipv4_checksum_matches_a_known_header() {
        // The worked example from RFC 1071-style references (Wikipedia,
        // "IPv4 header checksum"): 4500 0073 0000 4000 4011 b861 c0a8 0001
        // c0a8 00c7.
        let mut p = Packet::udp4([192, 168, 0, 1], [192, 168, 0, 199], 1, 2)
            .payload(&[0; 0x73 - 28])
            .dont_fragment();
        p.v4_mut().id = 0;
        let f = p.build();
        assert_eq!(
            &f[14..34],
            &[
                0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
                0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7
            ]
        );
        // A header including its checksum sums to zero.
        assert_eq!(checksum(&[&f[14..34]]), 0);
    }

    #[test]
    fn checksum_handles_odd_lengths_and_split_parts() {
        assert_eq!(checksum(&[&[0x01]]), !0x0100);
        let whole = [0x12, 0x34, 0x56, 0x78, 0x9a];
        assert_eq!(
            checksum(&[&whole]),
            checksum(&[&whole[..1], &whole[1..3], &whole[3..]])
        );
        // Carries fold back in.
        assert_eq!(checksum(&[&[0xff, 0xff, 0x00, 0x01]]), !0x0001);
    }

    #[test]
    fn tcp4_layout_flags_and_checksums() {
        let (f, l) = Packet::tcp4(C4, S4, 40000, 8000)
            .syn()
            .payload(b"hi")
            .build_with_layout();
        assert_eq!(
            l,
            Layout {
                l3: 14,
                l4: 34,
                payload: 54,
                len: 56
            }
        );
        assert_eq!(f.len(), 56);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[14], 0x45);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 42); // total length
        assert_eq!(f[23], IPPROTO_TCP);
        assert_eq!(&f[26..30], &C4);
        assert_eq!(&f[30..34], &S4);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 40000);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 8000);
        assert_eq!(f[46], 5 << 4);
        assert_eq!(f[47], TCP_SYN);
        assert_eq!(checksum(&[&f[14..34]]), 0);
        // TCP checksum verifies over pseudo header + segment.
        let mut ph = Vec::new();
        ph.extend_from_slice(&C4);
        ph.extend_from_slice(&S4);
        ph.extend_from_slice(&[0, IPPROTO_TCP, 0, 22]);
        assert_eq!(checksum(&[&ph, &f[34..]]), 0);
    }

    #[test]
    fn vlan_tags_sit_between_macs_and_ethertype() {
        let f = Packet::udp4(C4, S4, 1, 2).vlan(10).build();
        assert_eq!(&f[12..18], &[0x81, 0x00, 0x00, 0x0a, 0x08, 0x00]);
        assert_eq!(f[18], 0x45);
        let (f, l) = Packet::udp6(c6(), s6(), 1, 2)
            .qinq(100, 200)
            .build_with_layout();
        assert_eq!(
            &f[12..22],
            &[0x88, 0xa8, 0x00, 100, 0x81, 0x00, 0x00, 200, 0x86, 0xdd]
        );
        assert_eq!(l.l3, 22);
        assert_eq!(f[22] >> 4, 6);
    }

    #[test]
    fn ipv4_options_ihl_lengths_and_fragments() {
        let (f, l) = Packet::tcp4(C4, S4, 1, 2)
            .ip_options(&[1, 1, 1]) // three NOPs, padded to 4
            .fragment(185, true)
            .build_with_layout();
        assert_eq!(l.l4 - l.l3, 24);
        assert_eq!(f[14], 0x46);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 44);
        assert_eq!(u16::from_be_bytes([f[20], f[21]]), 0x2000 | 185);
        assert_eq!(checksum(&[&f[14..38]]), 0);

        let f = Packet::tcp4(C4, S4, 1, 2)
            .ihl(4)
            .total_len(10)
            .ip_version(6)
            .build();
        assert_eq!(f[14], 0x64);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 10);
        assert_eq!(checksum(&[&f[14..34]]), 0, "checksum covers the overrides");
        let f = Packet::tcp4(C4, S4, 1, 2).dont_fragment().build();
        assert_eq!(&f[20..22], &[0x40, 0x00]);
    }

    #[test]
    fn ipv6_extension_chain_links_next_headers() {
        let (f, l) = Packet::tcp6(c6(), s6(), 1, 2)
            .ext(Ext::HopByHop { len: 0 })
            .ext(Ext::Routing { len: 1 })
            .ext(Ext::Fragment {
                offset: 0,
                more: true,
                id: 7,
            })
            .ext(Ext::Ah { icv_words: 1 })
            .ext(Ext::DestOpts { len: 0 })
            .syn()
            .build_with_layout();
        assert_eq!(l.l3, 14);
        let ip = &f[14..];
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(ip[6], NH_HOP_BY_HOP);
        let ext_len = 8 + 16 + 8 + 16 + 8;
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]) as usize, ext_len + 20);
        assert_eq!(l.l4, 14 + 40 + ext_len);
        let e = &ip[40..];
        assert_eq!((e[0], e[1]), (NH_ROUTING, 0)); // hop-by-hop → routing
        assert_eq!((e[8], e[9]), (NH_FRAGMENT, 1)); // routing, 16 bytes
        assert_eq!(e[24], NH_AH); // fragment → AH
        assert_eq!(u16::from_be_bytes([e[26], e[27]]), 1); // offset 0, M=1
        assert_eq!(u32::from_be_bytes([e[28], e[29], e[30], e[31]]), 7);
        assert_eq!((e[32], e[33]), (NH_DEST_OPTS, 2)); // AH: 16 bytes = (2+2)*4
        assert_eq!(e[48], IPPROTO_TCP);
        assert_eq!(f[l.l4 + 13], TCP_SYN);
        let f = Packet::udp6(c6(), s6(), 1, 2)
            .ext(Ext::Fragment {
                offset: 100,
                more: false,
                id: 1,
            })
            .build();
        assert_eq!(u16::from_be_bytes([f[56], f[57]]), 100 << 3);
    }

    #[test]
    fn udp_and_icmp_headers() {
        let f = Packet::udp6(c6(), s6(), 5353, 8001)
            .payload(&[1, 2, 3])
            .build();
        let u = &f[54..];
        assert_eq!(u16::from_be_bytes([u[4], u[5]]), 11);
        let mut ph = Vec::new();
        ph.extend_from_slice(&c6().octets());
        ph.extend_from_slice(&s6().octets());
        ph.extend_from_slice(&[0, 0, 0, 11, 0, 0, 0, IPPROTO_UDP]);
        assert_eq!(checksum(&[&ph, u]), 0);
        let f = Packet::icmp4(C4, S4).build();
        assert_eq!(f[23], IPPROTO_ICMP);
        assert_eq!(checksum(&[&f[34..]]), 0);
        let f = Packet::icmp6(c6(), s6()).build();
        assert_eq!(f[20], IPPROTO_ICMPV6);
        let f = Packet::arp(C4, S4).build();
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(f.len(), 14 + 28);
    }

    #[test]
    fn truncation_and_pokes() {
        let p = Packet::tcp4(C4, S4, 1, 2).syn();
        assert_eq!(p.clone().truncate(20).build().len(), 20);
        assert_eq!(p.clone().truncate_l3(10).build().len(), 24);
        assert_eq!(p.clone().truncate_l4(4).build().len(), 38);
        let full = p.build();
        let cut = p.clone().truncate_l4(4).build();
        assert_eq!(
            &cut[..],
            &full[..38],
            "truncation keeps the original lengths"
        );
        let f = p.clone().poke_l4(12, 0x40).build();
        assert_eq!(f[34 + 12], 0x40);
        let f = p.clone().poke(0, 0xff).poke_l3(9, 99).build();
        assert_eq!((f[0], f[23]), (0xff, 99));
        assert_ne!(
            checksum(&[&f[14..34]]),
            0,
            "a poke lands after checksumming"
        );
        let f = Packet::tcp4(C4, S4, 1, 2).frame_len(100).build();
        assert_eq!(f.len(), 100);
    }
}
