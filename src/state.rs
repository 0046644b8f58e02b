//! App state handed from one generation to the next: an opaque blob in a
//! sealed memfd, passed at `HANDOVER_STATE_FD`.
//!
//! The old generation asks the app for its state (the provider of
//! [`Options::handoff_state`](crate::Options::handoff_state)) when an
//! upgrade starts, writes it with a header (magic, length, FNV-1a checksum)
//! into a memfd, and seals it (no write, grow or shrink) before the new
//! generation is started: the new one finds either the whole blob or none.
//! It reads it with [`Handover::take_state`](crate::Handover::take_state);
//! a blob that fails its checks is dropped with a warning, and the new
//! generation starts without state.
//!
//! The format inside the blob is the app's; put a version in it (see the
//! README).

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

/// First bytes of a state memfd.
const MAGIC: &[u8; 8] = b"HNDVRST1";
/// Magic, length and checksum.
const HEADER: usize = 8 + 8 + 8;
/// The largest blob: more is a sign of a bug in the provider.
pub(crate) const MAX_STATE: usize = 1 << 30;

/// 64-bit FNV-1a: enough to tell a complete blob from a damaged one.
fn checksum(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A sealed memfd holding `state`, close-on-exec.
pub(crate) fn write(state: &[u8]) -> io::Result<OwnedFd> {
    if state.len() > MAX_STATE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the state is {} bytes, more than {MAX_STATE}", state.len()),
        ));
    }
    let fd = memfd_create(
        c"handover-state",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(MAGIC)?;
    file.write_all(&(state.len() as u64).to_le_bytes())?;
    file.write_all(&checksum(state).to_le_bytes())?;
    file.write_all(state)?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(OwnedFd::from(file))
}

/// The blob in a state memfd, or why it cannot be trusted.
pub(crate) fn read(fd: OwnedFd) -> Result<Vec<u8>, String> {
    let mut file = std::fs::File::from(fd);
    file.seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read it: {e}"))?;
    let mut header = [0u8; HEADER];
    file.read_exact(&mut header)
        .map_err(|e| format!("its header is incomplete: {e}"))?;
    if &header[..8] != MAGIC {
        return Err("it does not start with the state header".to_owned());
    }
    let len = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let sum = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
    if len > MAX_STATE as u64 {
        return Err(format!("it claims {len} bytes, more than {MAX_STATE}"));
    }
    let mut state = Vec::with_capacity(len as usize);
    file.read_to_end(&mut state)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if state.len() as u64 != len {
        return Err(format!(
            "it holds {} bytes of the {len} announced",
            state.len()
        ));
    }
    if checksum(&state) != sum {
        return Err("its checksum does not match".to_owned());
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_blob_round_trips_and_is_sealed() {
        let blob: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let fd = write(&blob).unwrap();
        // Sealed: nobody can change it any more.
        let copy = fd.as_fd().try_clone_to_owned().unwrap();
        let mut file = std::fs::File::from(copy);
        assert!(file.write_all(b"x").is_err(), "the memfd is sealed");
        assert_eq!(read(fd).unwrap(), blob);
    }

    #[test]
    fn a_damaged_blob_is_refused() {
        // An unsealed memfd with a header that claims more than it holds,
        // as a writer that died half-way would leave it.
        let fd = memfd_create(c"t", MFdFlags::MFD_CLOEXEC).unwrap();
        let mut file = std::fs::File::from(fd);
        file.write_all(MAGIC).unwrap();
        file.write_all(&100u64.to_le_bytes()).unwrap();
        file.write_all(&checksum(b"abc").to_le_bytes()).unwrap();
        file.write_all(b"abc").unwrap();
        let err = read(OwnedFd::from(file)).unwrap_err();
        assert!(err.contains("3 bytes of the 100"), "{err}");
        let fd = memfd_create(c"t", MFdFlags::MFD_CLOEXEC).unwrap();
        assert!(read(fd).unwrap_err().contains("header"));
    }
}
