//! The 4-byte header macOS utun puts before every packet: the address family as a
//! big-endian u32 (`AF_INET` = 2, `AF_INET6` = 30 on Darwin, not Linux's 10). Pure, so it
//! is tested everywhere; used by the utun device on macOS.

/// Darwin's `AF_INET`.
pub const DARWIN_AF_INET: u32 = 2;
/// Darwin's `AF_INET6`.
pub const DARWIN_AF_INET6: u32 = 30;
pub const HEADER_LEN: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AfError {
    #[error("empty packet")]
    Empty,
    #[error("not an IP packet (version nibble {0})")]
    NotIp(u8),
    #[error("utun header says family {family} but the packet is IPv{version}")]
    Mismatch { family: u32, version: u8 },
    #[error("utun frame shorter than its 4-byte header")]
    Short,
}

/// IP version of a packet from its first nibble.
pub fn ip_version(packet: &[u8]) -> Result<u8, AfError> {
    let first = *packet.first().ok_or(AfError::Empty)?;
    match first >> 4 {
        v @ (4 | 6) => Ok(v),
        other => Err(AfError::NotIp(other)),
    }
}

/// The header to write before `packet`.
pub fn header_for(packet: &[u8]) -> Result<[u8; HEADER_LEN], AfError> {
    let family = if ip_version(packet)? == 4 { DARWIN_AF_INET } else { DARWIN_AF_INET6 };
    Ok(family.to_be_bytes())
}

/// Check a header read from utun against the packet after it.
pub fn check(header: [u8; HEADER_LEN], packet: &[u8]) -> Result<(), AfError> {
    let family = u32::from_be_bytes(header);
    let version = ip_version(packet)?;
    match (family, version) {
        (DARWIN_AF_INET, 4) | (DARWIN_AF_INET6, 6) => Ok(()),
        _ => Err(AfError::Mismatch { family, version }),
    }
}

/// Split a whole utun frame into header and packet, checked.
pub fn strip(frame: &[u8]) -> Result<&[u8], AfError> {
    if frame.len() < HEADER_LEN {
        return Err(AfError::Short);
    }
    let (h, p) = frame.split_at(HEADER_LEN);
    check([h[0], h[1], h[2], h[3]], p)?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &[u8] = &[0x45, 0, 0, 20];
    const V6: &[u8] = &[0x60, 0, 0, 0];

    #[test]
    fn headers_carry_darwin_families() {
        assert_eq!(header_for(V4), Ok([0, 0, 0, 2]));
        assert_eq!(header_for(V6), Ok([0, 0, 0, 30]));
        assert_eq!(header_for(&[]), Err(AfError::Empty));
        assert_eq!(header_for(&[0x20]), Err(AfError::NotIp(2)));
    }

    #[test]
    fn frames_are_checked_and_stripped() {
        let mut f = vec![0, 0, 0, 2];
        f.extend_from_slice(V4);
        assert_eq!(strip(&f), Ok(V4));
        let mut f = vec![0, 0, 0, 30];
        f.extend_from_slice(V6);
        assert_eq!(strip(&f), Ok(V6));
        // Linux's AF_INET6 (10) is wrong here.
        let mut f = vec![0, 0, 0, 10];
        f.extend_from_slice(V6);
        assert_eq!(strip(&f), Err(AfError::Mismatch { family: 10, version: 6 }));
        let mut f = vec![0, 0, 0, 2];
        f.extend_from_slice(V6);
        assert!(matches!(strip(&f), Err(AfError::Mismatch { .. })));
        assert_eq!(strip(&[0, 0, 2]), Err(AfError::Short));
        assert_eq!(strip(&[0, 0, 0, 2]), Err(AfError::Empty));
    }

    #[test]
    fn header_then_strip_round_trips() {
        for p in [V4, V6] {
            let mut f = header_for(p).expect("header").to_vec();
            f.extend_from_slice(p);
            assert_eq!(strip(&f), Ok(p));
        }
    }
}
