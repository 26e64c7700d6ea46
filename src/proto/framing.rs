//! The length-delimited framing of a byte stream (the WebTransport session stream): each frame is
//! a Protobuf varint length followed by that many bytes, exactly one encoded `ClientFrame` or
//! `ServerFrame`, as protobuf's own "delimited" messages. Pure; shared by the node and the client.

use bytes::BufMut;

/// Longest protobuf varint (a u64) in bytes.
const MAX_VARINT: usize = 10;

/// Appends `frame` with its length prefix to `out`.
pub fn delimit_into(frame: &[u8], out: &mut impl BufMut) {
    prost::encoding::encode_varint(frame.len() as u64, out);
    out.put_slice(frame);
}

/// Outcome of looking for one length-delimited frame at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Delimited {
    /// A whole frame: the prefix length and the frame length.
    Frame { prefix: usize, len: usize },
    /// More bytes are needed; at least this many in total.
    Incomplete { need: usize },
    /// The prefix announces more than `max` bytes.
    TooBig { len: u64 },
    /// Not a varint (more than ten bytes).
    Invalid,
}

/// Parses the varint length prefix at the front of `buf` (pure; the unit of the framing tests).
pub fn parse_delimited(buf: &[u8], max: usize) -> Delimited {
    let Some(end) = buf.iter().take(MAX_VARINT).position(|b| b & 0x80 == 0) else {
        return if buf.len() >= MAX_VARINT {
            Delimited::Invalid
        } else {
            Delimited::Incomplete {
                need: buf.len() + 1,
            }
        };
    };
    let prefix = end + 1;
    let Ok(len) = prost::encoding::decode_varint(&mut &buf[..prefix]) else {
        return Delimited::Invalid;
    };
    if len > max as u64 {
        return Delimited::TooBig { len };
    }
    let len = len as usize;
    if buf.len() < prefix + len {
        return Delimited::Incomplete { need: prefix + len };
    }
    Delimited::Frame { prefix, len }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    #[test]
    fn length_prefixes_are_parsed_like_protobuf_delimited_messages() {
        let mut buf = BytesMut::new();
        delimit_into(&[7; 300], &mut buf);
        assert_eq!(
            parse_delimited(&buf, 1000),
            Delimited::Frame {
                prefix: 2,
                len: 300
            }
        );
        assert_eq!(
            parse_delimited(&buf[..100], 1000),
            Delimited::Incomplete { need: 302 }
        );
        assert_eq!(
            parse_delimited(&buf[..1], 1000),
            Delimited::Incomplete { need: 2 }
        );
        assert_eq!(
            parse_delimited(&[], 1000),
            Delimited::Incomplete { need: 1 }
        );
        assert_eq!(parse_delimited(&buf, 299), Delimited::TooBig { len: 300 });
        assert_eq!(parse_delimited(&[0xff; 11], 1000), Delimited::Invalid);
        assert_eq!(
            parse_delimited(&[0], 10),
            Delimited::Frame { prefix: 1, len: 0 }
        );
    }
}
