//! Headers → a small packet summary. Works on raw `data`/`data_end` so XDP
//! and TC share it. Every read is bounds-checked against `data_end` (the
//! verifier insists, and malformed packets are the point).

use core::mem::size_of;

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use portcullis_common::{FAMILY_V4, FAMILY_V6, MAX_IPV6_EXT_HEADERS, PROTO_TCP, PROTO_UDP, Reason};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

// IPv6 extension headers (RFC 8200 §4; IANA "IPv6 Extension Header Types").
const NH_HOP_BY_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_ESP: u8 = 50;
const NH_AH: u8 = 51;
const NH_NO_NEXT: u8 = 59;
const NH_DEST_OPTS: u8 = 60;
const NH_MOBILITY: u8 = 135;
const NH_HIP: u8 = 139;
const NH_SHIM6: u8 = 140;

/// Offsets past this are not plausible headers; bounding them keeps the
/// verifier's range tracking simple.
const MAX_L4_OFFSET: usize = 512;

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

const UDP_HDR_LEN: usize = 8;

/// What the ingress decision needs to know about a TCP/UDP packet.
#[derive(Clone, Copy)]
pub struct Summary {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub tcp_flags: u8,
    /// TCP sequence number (0 for UDP).
    pub tcp_seq: u32,
    /// First fragment of a fragmented datagram (ports valid, payload not).
    pub first_fragment: bool,
}

pub enum Parsed {
    /// Not IP, not TCP/UDP, a non-first fragment, ESP, ...: not ours to judge.
    Pass,
    /// A TCP or UDP header we could read.
    L4(Summary),
    /// An IP packet we cannot judge safely: dropped with this reason
    /// (the kernel's own stack would reject every one of these too).
    Bad(Reason),
}

#[inline(always)]
fn ptr_at<T>(data: usize, end: usize, off: usize) -> Option<*const T> {
    let start = data.checked_add(off)?;
    if start + size_of::<T>() > end {
        return None;
    }
    Some(start as *const T)
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Ingress (XDP) parses strictly: every length field must agree with the
/// frame, since the frame is all there is. Egress (TC) sees the stack's own
/// packets, which may be GSO super-packets whose headers describe more
/// bytes than the linear buffer holds, so it trusts only the buffer end.
#[inline(always)]
pub fn parse<const STRICT: bool>(data: usize, end: usize) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(data, end, 0) else {
        return Parsed::Pass; // runt frame: not IP as far as we can tell
    };
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut off = EthHdr::LEN;
    // Up to two VLAN tags (IEEE 802.1Q, 802.1ad QinQ).
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let Some(vlan) = ptr_at::<VlanHdr>(data, end, off) else {
            return Parsed::Pass;
        };
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        off += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IPV4 => parse_v4::<STRICT>(data, end, off),
        ETH_P_IPV6 => parse_v6::<STRICT>(data, end, off),
        _ => Parsed::Pass,
    }
}

/// Bytes of the frame from `off` to its end.
#[inline(always)]
fn avail(data: usize, end: usize, off: usize) -> usize {
    end.saturating_sub(data.saturating_add(off))
}

/// IPv4 (RFC 791 §3.1): IHL ≥ 5 words, total length covers the header
/// and, strictly, lies within the frame (trailing Ethernet padding is
/// allowed: a frame may be longer than its packet, never shorter).
#[inline(always)]
fn parse_v4<const STRICT: bool>(data: usize, end: usize, off: usize) -> Parsed {
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, end, off) else {
        return Parsed::Bad(Reason::Malformed);
    };
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    let tot_len = be16(ip.tot_len) as usize;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || tot_len < ihl {
        return Parsed::Bad(Reason::Malformed);
    }
    if STRICT && tot_len > avail(data, end, off) {
        return Parsed::Bad(Reason::Malformed);
    }
    // Where the packet ends (relative to `data`): headers past it are not
    // part of this packet, whatever the frame holds beyond.
    let limit = off + tot_len;
    let proto = ip.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Parsed::Pass;
    }
    let frags = be16(ip.frags);
    let frag_offset = frags & 0x1fff;
    let more_fragments = frags & 0x2000 != 0;
    if frag_offset != 0 {
        // Non-first fragment: carries no ports. Without its first fragment
        // (which we judge) it can never be reassembled.
        return Parsed::Pass;
    }
    let mut s = Summary {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        proto,
        family: FAMILY_V4,
        tcp_flags: 0,
        tcp_seq: 0,
        first_fragment: more_fragments,
    };
    s.src[10] = 0xff;
    s.src[11] = 0xff;
    s.src[12..16].copy_from_slice(&ip.src_addr);
    s.dst[10] = 0xff;
    s.dst[11] = 0xff;
    s.dst[12..16].copy_from_slice(&ip.dst_addr);
    parse_l4::<STRICT>(data, end, off + ihl, limit, s)
}

/// IPv6 (RFC 8200 §3-4): walk at most `MAX_IPV6_EXT_HEADERS` extension
/// headers to the upper-layer header. Strictly, the payload length
/// (§3) lies within the frame and every extension header within the
/// payload. A payload length of 0 (a jumbogram, RFC 2675, which Ethernet
/// cannot carry) leaves no room for an upper-layer header.
#[inline(always)]
fn parse_v6<const STRICT: bool>(data: usize, end: usize, off: usize) -> Parsed {
    let Some(ip) = ptr_at::<Ipv6Hdr>(data, end, off) else {
        return Parsed::Bad(Reason::Malformed);
    };
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Parsed::Bad(Reason::Malformed);
    }
    let payload_len = be16(ip.payload_len) as usize;
    if STRICT && Ipv6Hdr::LEN + payload_len > avail(data, end, off) {
        return Parsed::Bad(Reason::Malformed);
    }
    let limit = off + Ipv6Hdr::LEN + payload_len;
    let mut s = Summary {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport: 0,
        dport: 0,
        proto: 0,
        family: FAMILY_V6,
        tcp_flags: 0,
        tcp_seq: 0,
        first_fragment: false,
    };
    let mut next = ip.next_hdr;
    let mut off = off + Ipv6Hdr::LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            PROTO_TCP | PROTO_UDP => {
                s.proto = next;
                return parse_l4::<STRICT>(data, end, off, limit, s);
            }
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS | NH_MOBILITY | NH_HIP | NH_SHIM6 => {
                let Some(h) = ptr_at::<[u8; 2]>(data, end, off) else {
                    return Parsed::Bad(Reason::Malformed);
                };
                let h = unsafe { *h };
                next = h[0];
                off += (h[1] as usize + 1) * 8; // §4.3: length in 8-octet units, not counting the first 8
            }
            NH_AH => {
                let Some(h) = ptr_at::<[u8; 2]>(data, end, off) else {
                    return Parsed::Bad(Reason::Malformed);
                };
                let h = unsafe { *h };
                next = h[0];
                off += (h[1] as usize + 2) * 4; // RFC 4302 §2.2: 4-octet units, minus 2
            }
            NH_FRAGMENT => {
                // RFC 8200 §4.5: offset in the top 13 bits, M flag in bit 0.
                let Some(h) = ptr_at::<[u8; 8]>(data, end, off) else {
                    return Parsed::Bad(Reason::Malformed);
                };
                let h = unsafe { *h };
                let frag = be16([h[2], h[3]]);
                if frag >> 3 != 0 {
                    return Parsed::Pass; // non-first fragment: no ports
                }
                // An atomic fragment (offset 0, M clear) is a whole packet
                // (RFC 6946 §4); otherwise it is a first fragment.
                if frag & 1 != 0 {
                    s.first_fragment = true;
                }
                next = h[0];
                off += 8;
            }
            NH_ESP | NH_NO_NEXT => return Parsed::Pass,
            _ => return Parsed::Pass, // ICMPv6 and other upper layers
        }
        // A header whose length runs past the packet is malformed, not a
        // long chain: checked before the chain bound.
        if off > end.saturating_sub(data) || (STRICT && off > limit) {
            return Parsed::Bad(Reason::Malformed);
        }
        if off > MAX_L4_OFFSET {
            return Parsed::Bad(Reason::ExtChain);
        }
    }
    if next == PROTO_TCP || next == PROTO_UDP {
        s.proto = next;
        return parse_l4::<STRICT>(data, end, off, limit, s);
    }
    match next {
        NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS | NH_MOBILITY | NH_HIP | NH_SHIM6 | NH_AH
        | NH_FRAGMENT => Parsed::Bad(Reason::ExtChain),
        _ => Parsed::Pass,
    }
}

/// TCP or UDP at `off`; the IP packet ends at `limit` (both relative to
/// `data`). A first fragment may legitimately end early: too short for its
/// ports it is a `fragment` drop, and its length fields describe the whole
/// datagram, so they are not held against this piece.
#[inline(always)]
fn parse_l4<const STRICT: bool>(
    data: usize,
    end: usize,
    off: usize,
    limit: usize,
    mut s: Summary,
) -> Parsed {
    if off > MAX_L4_OFFSET {
        return Parsed::Bad(Reason::Malformed);
    }
    let short = if s.first_fragment {
        Reason::Fragment
    } else {
        Reason::Malformed
    };
    let whole = STRICT && !s.first_fragment;
    if s.proto == PROTO_TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(data, end, off) else {
            return Parsed::Bad(short);
        };
        let tcp = unsafe { &*tcp };
        // RFC 9293 §3.1: data offset ≥ 5 words, and the header it
        // describes (options included) lies within the segment.
        let raw = unsafe { *(tcp as *const TcpHdr as *const [u8; 14]) };
        let doff = (raw[12] >> 4) as usize * 4;
        if doff < TcpHdr::LEN {
            return Parsed::Bad(Reason::Malformed);
        }
        if STRICT && off + TcpHdr::LEN > limit {
            return Parsed::Bad(short);
        }
        if whole && off + doff > limit {
            return Parsed::Bad(Reason::Malformed);
        }
        s.sport = be16(tcp.source);
        s.dport = be16(tcp.dest);
        s.tcp_flags = raw[13];
        s.tcp_seq = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
    } else {
        let Some(udp) = ptr_at::<UdpHdr>(data, end, off) else {
            return Parsed::Bad(short);
        };
        let udp = unsafe { &*udp };
        // RFC 768: the length counts the 8-byte header and the data, so it
        // is at least 8 and, strictly, within the IP payload.
        let ulen = be16(udp.len) as usize;
        if STRICT && off + UDP_HDR_LEN > limit {
            return Parsed::Bad(short);
        }
        if whole && (ulen < UDP_HDR_LEN || off + ulen > limit) {
            return Parsed::Bad(Reason::Malformed);
        }
        s.sport = be16(udp.src);
        s.dport = be16(udp.dst);
    }
    Parsed::L4(s)
}
