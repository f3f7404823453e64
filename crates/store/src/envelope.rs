//! The envelope every stored record is wrapped in: magic, format version and CRC-32 before the payload.
//!
//! Layout (frozen for every future version, so any version can at least be recognised):
//!
//! | bytes   | field                                                      |
//! |---------|------------------------------------------------------------|
//! | 0..4    | magic `b"CPSN"`                                            |
//! | 4..8    | record format version, u32 little-endian                   |
//! | 8..12   | CRC-32 (IEEE) of bytes 4..8 followed by the payload, LE     |
//! | 12..    | payload                                                    |
//!
//! Decoding checks, in order: length, magic, checksum (→ [`StoreError::Corrupt`]), then the version
//! (→ [`StoreError::UnsupportedFormat`] when it is newer than the reader understands). The checksum
//! covers the version, so a flipped version byte reads as corruption rather than as a future format.

use crate::StoreError;

/// Bytes every record starts with.
pub const MAGIC: [u8; 4] = *b"CPSN";
/// Size of the envelope header in front of the payload.
pub const HEADER_BYTES: usize = 12;

/// Appends the envelope for `payload` at `version` to `out`.
pub fn encode_into(out: &mut Vec<u8>, version: u32, payload: &[u8]) {
    let version_bytes = version.to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&version_bytes);
    hasher.update(payload);
    out.reserve(HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version_bytes);
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// Returns a new buffer holding the envelope for `payload` at `version`.
pub fn encode(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, version, payload);
    out
}

/// A decoded envelope: the version it was written with and its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub version: u32,
    pub payload: &'a [u8],
}

/// Checks the envelope of `record` and returns its payload.
///
/// `what` names the record for error messages (e.g. "log entry 1234 in /x/state.redb"); it is
/// only called when there is an error, so the hot path does not allocate.
pub fn decode<'a>(
    record: &'a [u8],
    supported_version: u32,
    what: impl FnOnce() -> String,
) -> Result<Decoded<'a>, StoreError> {
    if record.len() < HEADER_BYTES {
        return Err(StoreError::Corrupt {
            what: what(),
            detail: format!("record is {} bytes, shorter than the {HEADER_BYTES}-byte envelope header", record.len()),
        });
    }
    let (header, payload) = record.split_at(HEADER_BYTES);
    if header[0..4] != MAGIC {
        return Err(StoreError::Corrupt {
            what: what(),
            detail: format!("bad magic {:02x?} (expected {:02x?})", &header[0..4], MAGIC),
        });
    }
    let version_bytes: [u8; 4] = header[4..8].try_into().expect("4 bytes");
    let stored_crc = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&version_bytes);
    hasher.update(payload);
    let computed_crc = hasher.finalize();
    if stored_crc != computed_crc {
        return Err(StoreError::Corrupt {
            what: what(),
            detail: format!("checksum mismatch (stored {stored_crc:#010x}, computed {computed_crc:#010x})"),
        });
    }
    let version = u32::from_le_bytes(version_bytes);
    if version == 0 {
        return Err(StoreError::Corrupt {
            what: what(),
            detail: "record format version 0 was never written by any capstan".to_string(),
        });
    }
    if version > supported_version {
        return Err(StoreError::UnsupportedFormat { found: version, supported: supported_version, what: what() });
    }
    Ok(Decoded { version, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> String {
        "test record".to_string()
    }

    #[test]
    fn round_trips() {
        let record = encode(1, b"hello");
        assert_eq!(record.len(), HEADER_BYTES + 5);
        let decoded = decode(&record, 1, name).unwrap();
        assert_eq!(decoded, Decoded { version: 1, payload: b"hello" });
        let empty = encode(1, b"");
        assert_eq!(decode(&empty, 1, name).unwrap().payload, b"");
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let record = encode(1, b"some payload bytes");
        for byte in 0..record.len() {
            for bit in 0..8 {
                let mut damaged = record.clone();
                damaged[byte] ^= 1 << bit;
                let err = decode(&damaged, 1, name).unwrap_err();
                assert!(matches!(err, StoreError::Corrupt { .. }), "byte {byte} bit {bit}: {err}");
            }
        }
    }

    #[test]
    fn short_record_is_corrupt() {
        let err = decode(b"CPSN", 1, name).unwrap_err();
        assert!(err.to_string().contains("test record"), "{err}");
    }

    #[test]
    fn newer_version_is_unsupported() {
        let record = encode(7, b"x");
        match decode(&record, 2, name).unwrap_err() {
            StoreError::UnsupportedFormat { found, supported, what } => {
                assert_eq!((found, supported, what.as_str()), (7, 2, "test record"));
            }
            other => panic!("unexpected {other}"),
        }
    }
}
