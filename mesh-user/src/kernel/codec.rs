//! Conversions at the kernel boundary: our addresses to and from the map types of
//! `mesh-common`, whose addresses and ports are in network byte order.

use std::net::IpAddr;

use mesh_common::{
    Backend, EndpointKey, FAMILY_DESTINATION, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP,
    ServiceKey, destination_key, destination_of,
};

use crate::compile::{BackendAddr, Proto, ServiceAddr};

pub fn service_key(addr: ServiceAddr) -> ServiceKey {
    let (words, family) = ip_words(addr.vip);
    let port = ServiceKey {
        addr: words,
        port: addr.port.to_be(),
        proto: match addr.proto {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        },
        family,
    };
    match addr.destination {
        Some(i) => destination_key(&port, u32::from(i)),
        None => port,
    }
}

/// The inverse of [`service_key`]; `None` for a key we would never write.
pub fn service_addr(key: &ServiceKey) -> Option<ServiceAddr> {
    let (family, destination) = match destination_of(key.family) {
        Some((family, i)) => (family, Some(u8::try_from(i).ok()?)),
        None => (key.family, None),
    };
    Some(ServiceAddr {
        vip: ip_from_words(key.addr, family)?,
        port: u16::from_be(key.port),
        proto: match key.proto {
            PROTO_TCP => Proto::Tcp,
            PROTO_UDP => Proto::Udp,
            _ => return None,
        },
        destination,
    })
}

/// A slot of a table that picks a destination.
pub fn destination_slot(index: u8) -> Backend {
    Backend {
        addr: [u32::from(index), 0, 0, 0],
        port: 0,
        family: FAMILY_DESTINATION,
        _pad: 0,
        backend_id: 0,
    }
}

/// The inverse of [`destination_slot`].
pub fn slot_destination(b: &Backend) -> Option<u8> {
    (b.family == FAMILY_DESTINATION)
        .then(|| u8::try_from(b.addr[0]).ok())
        .flatten()
}

pub fn endpoint_key(endpoint: BackendAddr) -> EndpointKey {
    let (addr, family) = ip_words(endpoint.ip);
    EndpointKey {
        addr,
        port: endpoint.port.to_be(),
        family,
        _pad: 0,
    }
}

/// The inverse of [`endpoint_key`].
pub fn endpoint_addr(key: &EndpointKey) -> Option<BackendAddr> {
    Some(BackendAddr {
        ip: ip_from_words(key.addr, key.family)?,
        port: u16::from_be(key.port),
    })
}

pub fn backend_value(b: BackendAddr, backend_id: u32) -> Backend {
    let (addr, family) = ip_words(b.ip);
    Backend {
        addr,
        port: b.port.to_be(),
        family,
        _pad: 0,
        backend_id,
    }
}

/// The inverse of [`backend_value`]'s address; `None` for a "no backend" slot.
pub fn backend_addr(b: &Backend) -> Option<BackendAddr> {
    Some(BackendAddr {
        ip: ip_from_words(b.addr, b.family)?,
        port: u16::from_be(b.port),
    })
}

/// The inverse of [`ip_words`]; `None` for another family (a "no backend" slot).
fn ip_from_words(words: [u32; 4], family: u8) -> Option<IpAddr> {
    let bytes: [u8; 16] = bytemuck::cast(words);
    match family {
        FAMILY_V4 => Some(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])),
        FAMILY_V6 => Some(IpAddr::from(bytes)),
        _ => None,
    }
}

/// An address as the kernel's `__u32` words hold it (bytes in network order).
fn ip_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => (bytemuck::cast(v6.octets()), FAMILY_V6),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn keys_are_in_network_byte_order() {
        let key = service_key(ServiceAddr {
            destination: None,
            vip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
            port: 80,
            proto: Proto::Tcp,
        });
        assert_eq!(bytemuck::bytes_of(&key.addr[0]), &[10, 96, 0, 1]);
        assert_eq!(bytemuck::bytes_of(&key.port), &[0, 80]);
        assert_eq!((key.proto, key.family), (PROTO_TCP, FAMILY_V4));
        let v6: Ipv6Addr = "fd00::1:2".parse().unwrap_or(Ipv6Addr::LOCALHOST);
        let key = service_key(ServiceAddr {
            destination: None,
            vip: IpAddr::V6(v6),
            port: 443,
            proto: Proto::Udp,
        });
        assert_eq!(bytemuck::bytes_of(&key.addr), &v6.octets());
        assert_eq!(key.family, FAMILY_V6);
    }

    #[test]
    fn keys_and_values_decode_back() {
        for (vip, proto) in [("10.96.0.1", Proto::Tcp), ("fd00::1:2", Proto::Udp)] {
            let ip = vip.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let addr = ServiceAddr {
                destination: None,
                vip: ip,
                port: 8080,
                proto,
            };
            assert_eq!(service_addr(&service_key(addr)), Some(addr));
            let b = BackendAddr { ip, port: 5000 };
            assert_eq!(backend_addr(&backend_value(b, 7)), Some(b));
            assert_eq!(endpoint_addr(&endpoint_key(b)), Some(b));
        }
    }
}
